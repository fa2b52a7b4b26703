"""The peer benchmark: breakhis-ft against the recipe a user would otherwise run.

  python -m benchmarks bench --only peer          # writes peer.json, peer.md into --out

Paths on the same MedGemma-proportioned stand-in (pretrained so that it learns: benchmarks/
pretrain.py), replica images and patient split: `notebook` (the seed blog's trl recipe,
benchmarks/notebook.py), `breakhis-ft` (the project's engine, benchmarks/project.py: at the
notebook's settings, and its default path) and `google` (Google's QLoRA notebook, 4-bit base).
Sections: speed (one epoch over the same images, every configuration in turn, best of repeats: the
notebook's recipe, the project's engine at the notebook's settings, then one change at a time to
the project's default); accuracy (benchmarks/peer_accuracy.py: the notebook and the default path
from each seed, validation curves, time to a stated validation balanced accuracy, test scores of
label scoring and generation on both, per-image predictions and the paired patient bootstrap
against a stated non-inferiority margin); MedGemma 4B's peak memory under each recipe's settings by
breakhis_ft.vram; optionally the scan, split and image cache of the full 7,909-image replica. Peak
memory is the peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus the
resident size before the model loads.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks import notebook as nb
from benchmarks import project as bp
from benchmarks.models import build_checkpoint, peer_vocab, proportional_sizes
from benchmarks.peer_accuracy import accuracy_section
from benchmarks.peer_report import write_report
from benchmarks.pretrain import pretrain
from breakhis_ft.config import SplitConfig
from breakhis_ft.data.breakhis import BreakhisScan, load_image, scan_breakhis
from breakhis_ft.data.dataset import ImageDataset, build_image_cache, labels_for
from breakhis_ft.data.records import class_names
from breakhis_ft.data.splits import assign_splits
from breakhis_ft.data.synthetic import ensure_replica
from breakhis_ft.models.tiny import OUTPUT_SCALE, SIZES, ensure_tiny_gemma3


class PeakRSS:
    """Peak resident memory of a block over the resident memory at its start, in MiB."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        try:  # hand freed heap back to the OS, so the baseline is what is really in use
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.base = self._read("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.mib = (self._read("VmHWM") - self.base) / 1024

    @staticmethod
    def _read(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB
        raise RuntimeError(f"/proc/self/status has no {field}")


def balanced_accuracy(labels: list[int], preds: list[int]) -> float:
    """Mean recall over the classes present; an unparsed answer (-1) is wrong."""
    recalls = []
    for c in sorted(set(labels)):
        rows = [p for y, p in zip(labels, preds, strict=True) if y == c]
        recalls.append(sum(p == c for p in rows) / len(rows))
    return sum(recalls) / len(recalls)


def peer_checkpoint(work: Path, replicas: Path, item: dict, args) -> tuple:
    """The proportional model (benchmarks/models.py) with MedGemma's output-layer share,
    pretrained (benchmarks/pretrain.py) on another replica (seed 1, unused by the benchmark), at
    every magnification."""
    sizes, _ = proportional_sizes(work / "proportional_probe", class_names("subtype8"), item)
    sizes["vocab_size"] = peer_vocab(sizes)
    recipe = {
        **sizes,
        "output_scale": OUTPUT_SCALE,  # the tiny models' learnable scale (models/tiny.py)
        "pretrain_vision_epochs": args.peer_pretrain_epochs,
        "pretrain_language_steps": args.peer_pretrain_steps,
        "pretrain_replica": {"fraction": args.peer_pretrain_fraction, "seed": 1},
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = work / f"peer_model_{digest}"
    if (path / "pretrain.json").is_file():
        return path, json.loads((path / "pretrain.json").read_text())
    build_checkpoint(path, sizes)
    root = ensure_replica(replicas, args.peer_pretrain_fraction, (700, 460), 1)
    records = scan_breakhis(root).records
    labels = labels_for(records, "subtype8")
    data = ImageDataset(records, labels, root, image_size=sizes["image_size"])
    images = [data.load(i) for i in range(len(data))]
    start = time.perf_counter()
    recipe["pretrain"] = pretrain(
        path, images, labels, args.peer_pretrain_epochs, args.peer_pretrain_steps
    )
    recipe["pretrain"].update(images=len(images), seconds=time.perf_counter() - start)
    (path / "pretrain.json").write_text(json.dumps(recipe, indent=1))
    return path, recipe


def replica_splits(replicas: Path, fraction: float, args) -> tuple[BreakhisScan, dict]:
    """The replica at `fraction` (700x460 unless told), scanned and patient split (70/15/15 by
    stem) at `--peer-magnifications`; train and validation thinned to `--peer-max-train` and
    `--peer-max-val` images when given (test never)."""
    root = ensure_replica(replicas, fraction, tuple(args.peer_replica_size), 0)
    scan = scan_breakhis(root)
    splits = assign_splits(scan.records, SplitConfig(), "subtype8", args.peer_magnifications)
    if args.peer_max_train:
        splits["train"] = subset(splits["train"], args.peer_max_train)
    if args.peer_max_val:  # evaluated after every epoch of every run: its size sets the cost
        splits["val"] = subset(splits["val"], args.peer_max_val)
    return scan, {k: splits[k] for k in ("train", "val", "test")}


def subset(records: list, n: int) -> list:
    """`n` records spread evenly over the list (every class and patient mixed)."""
    step = max(1, len(records) // n)
    return records[::step][:n]


class Paths:
    """Runs the three paths on given records; keeps what each produced."""

    def __init__(self, checkpoint: Path, work: Path, image_size: int) -> None:
        self.checkpoint, self.work, self.image_size = checkpoint, work, image_size

    def notebook(self, scan: BreakhisScan, splits: dict, epochs: int, google: bool) -> dict:
        """The notebook's trl recipe (blog, or Google's QLoRA): train, then its test dataset."""
        recs = splits["train"]
        start = time.perf_counter()
        train_ds = nb.notebook_dataset(
            [scan.root / r.path for r in recs], labels_for(recs, "subtype8"), google
        )
        map_s = time.perf_counter() - start
        with PeakRSS() as mem:
            trainer, processor, epoch_s = nb.train(
                self.checkpoint, train_ds, self.work / "trl_out", epochs, google
            )
        return {
            "trainer": trainer,
            "processor": processor,
            "google": google,
            "times": {"dataset_map_s": map_s, "epoch_s": epoch_s},
            "peak_rss_mib": mem.mib,
            "trainable_parameters": sum(
                p.numel() for p in trainer.model.parameters() if p.requires_grad
            ),
        }

    def project(
        self, scan: BreakhisScan, splits: dict, epochs: int, settings: dict, image_cache: bool
    ) -> dict:
        """breakhis-ft through its setup and engine with the given settings."""
        base = bp.base_settings(self.checkpoint, self.work / "cache", epochs, self.image_size)
        with PeakRSS() as mem:
            run = bp.train_project(
                {**base, **settings}, scan, splits, self.work / "project_run", image_cache
            )
        run["peak_rss_mib"] = mem.mib
        run["trainable_parameters"] = run["classifier"].parameter_counts()[0]
        return run


def speed_section(paths: Paths, scan, splits: dict, args) -> dict:
    """One epoch over the same images for every configuration, in turn, best of repeats."""
    chosen = {"train": subset(splits["train"], args.peer_speed_images), "test": []}
    configs: list[tuple[str, Any]] = [
        ("notebook recipe (trl)", lambda: paths.notebook(scan, chosen, 1, False))
    ]
    if not args.peer_no_google:
        configs.append(("google qlora (trl)", lambda: paths.notebook(scan, chosen, 1, True)))
    for name, settings, cache in bp.step_settings():
        configs.append((name, lambda s=settings, c=cache: paths.project(scan, chosen, 1, s, c)))
    rows = {name: {"epoch_s": [], "peak_rss_mib": [], "one_off_s": []} for name, _ in configs}
    for _ in range(args.peer_repeats):  # alternating: a busy moment does not hit one side only
        for name, make in configs:
            out = make()
            times = out["times"]
            rows[name]["epoch_s"].append(times["epoch_s"][0])
            rows[name]["peak_rss_mib"].append(out["peak_rss_mib"])
            one_off = times.get("train_features_s", 0.0) + times.get("image_cache_s", 0.0)
            rows[name]["one_off_s"].append(one_off + times.get("dataset_map_s", 0.0))
            rows[name]["trainable_parameters"] = out["trainable_parameters"]
            del out
    n = len(chosen["train"])
    for row in rows.values():
        row["images_per_s"] = n / min(row["epoch_s"])
        row["peak_mib"] = min(row["peak_rss_mib"])
    return {"images": n, "repeats": args.peer_repeats, "configs": rows}


def full_replica_section(work: Path, image_size: int) -> dict:
    """Scan + split and the image cache of the full 7,909-image replica, timed."""
    root = ensure_replica(work, 1.0, (700, 460), 0)  # built once; its generation is not timed
    start = time.perf_counter()
    scan = scan_breakhis(root)
    assign_splits(scan.records, SplitConfig(), "subtype8", [40, 100, 200, 400])
    scan_s = time.perf_counter() - start
    cache_dir = work / "full_image_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    start = time.perf_counter()
    build_image_cache(scan.records, root, image_size, cache_dir, progress=False)
    cache_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    shutil.rmtree(cache_dir, ignore_errors=True)  # ~1.6 MB per image at 896 px
    return {
        "images": len(scan.records),
        "scan_split_s": scan_s,
        "image_cache_s": cache_s,
        "image_size": image_size,
        "image_cache_gb": size / 1e9,
    }


def run_peer_section(replicas: Path, out: Path, args, meta: dict | None = None) -> dict:
    """Every peer section; writes peer.json, peer.md and the per-image predictions into `out`.

    Replicas are built (once) under `replicas`, the rest under `replicas/peer`."""
    work = replicas / "peer"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {**(meta or {}), "threads": args.threads}
    # the machine may be shared: its load (1, 5, 15 min) at the start and end of each run
    results["load_average"] = {"start": os.getloadavg()}
    results["settings"] = {k: v for k, v in vars(args).items() if "peer" in k}
    scan, splits = replica_splits(replicas, args.peer_fraction, args)
    if args.peer_tiny:  # the tests' tiny Gemma 3: only checks that the code path works
        checkpoint, sizes = ensure_tiny_gemma3(work / "tiny_gemma3", work), dict(SIZES)
    else:
        item = {"image": load_image(scan.root / splits["train"][0].path), "label": 0, "index": 0}
        checkpoint, sizes = peer_checkpoint(work, replicas, item, args)
    results["model"] = sizes
    args.out, args.image_size = out, sizes["image_size"]
    partial = work / "peer_partial.json"  # what is done so far, should a long run be cut short

    def save(section: dict | None = None) -> None:
        if section is not None:
            results["accuracy"] = section
        partial.write_text(json.dumps(results, indent=1, default=str))

    paths = Paths(checkpoint, work, sizes["image_size"])
    results["speed"] = speed_section(paths, scan, splits, args)
    save()
    results["accuracy"] = accuracy_section(checkpoint, work, scan, splits, args, save)
    results["medgemma_vram_gib"] = bp.medgemma_vram()
    save()
    if not args.peer_no_full:
        results["full_replica"] = full_replica_section(replicas, args.peer_full_image_size)
    results["load_average"]["end"] = os.getloadavg()
    write_report(results, out)
    return results
