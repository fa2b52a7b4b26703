"""The peer benchmark: breakhis-ft against the recipe a user would otherwise run.

  python -m benchmarks bench --only peer          # writes peer.json, peer.md, PNG into --out

Three paths on the same MedGemma-proportioned model, replica images and patient split:
`notebook` (the seed blog's trl recipe, benchmarks/notebook.py), `breakhis-ft` (the project's
default path through its own engine, benchmarks/project.py) and `google` (Google's QLoRA
notebook, 4-bit base).
Sections: speed (one epoch over the same images, every configuration in turn, best of repeats,
including the breakdown STEPS from the notebook's settings to the project's defaults); runs (each
path trained at each replica fraction, `--peer-epochs` at the largest (Google's recipe only there)
and `--peer-scaling-epochs` at the others: test balanced accuracy, best epoch time per image,
one-off costs); evaluation (best of repeats on the largest fraction's test split); MedGemma 4B's
peak memory under each recipe's settings by breakhis_ft.vram; the scan, split and image cache of
the full 7,909-image replica. Peak memory is the peak resident set size
(VmHWM, reset through /proc/self/clear_refs) minus the resident size before the model loads.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks import notebook as nb
from benchmarks import project as bp
from benchmarks.models import build_checkpoint, proportional_sizes
from benchmarks.peer_report import write_report
from benchmarks.pretrain import pretrain
from breakhis_ft.config import SplitConfig
from breakhis_ft.data.breakhis import BreakhisScan, load_image, scan_breakhis
from breakhis_ft.data.dataset import ImageDataset, build_image_cache, labels_for
from breakhis_ft.data.records import class_names
from breakhis_ft.data.splits import assign_splits
from breakhis_ft.data.synthetic import ensure_replica
from breakhis_ft.models.tiny import SIZES, ensure_tiny_gemma3

# MedGemma 4B (docs/references.md): output layer (= embedding) parameters over the language
# model's other parameters; the peer model's vocabulary is widened to the same share
HEAD_SHARE = 671_252_480 / (3_880_263_168 - 671_252_480)


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
    pretrained (benchmarks/pretrain.py) on another replica (seed 1, unused by the benchmark)."""
    sizes, _ = proportional_sizes(work / "proportional_probe", class_names("subtype8"), item)
    h, i, n = sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"]
    q, kv = sizes["num_attention_heads"] * sizes["head_dim"], sizes["num_key_value_heads"]
    body = n * (2 * h * q + 2 * h * kv * sizes["head_dim"] + 3 * h * i)  # attention + MLP
    sizes["vocab_size"] = round(HEAD_SHARE * body / h)
    recipe = {
        **sizes,
        "pretrain_vision_epochs": args.peer_pretrain_epochs,
        "pretrain_language_steps": args.peer_pretrain_steps,
        "pretrain_replica": {"fraction": 0.05, "seed": 1},
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = work / f"peer_model_{digest}"
    if (path / "pretrain.json").is_file():
        return path, json.loads((path / "pretrain.json").read_text())
    build_checkpoint(path, sizes)
    root = ensure_replica(replicas, 0.05, (700, 460), 1)
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
    stem) at one magnification; train thinned to `--peer-max-train` images when given."""
    root = ensure_replica(replicas, fraction, tuple(args.peer_replica_size), 0)
    scan = scan_breakhis(root)
    splits = assign_splits(scan.records, SplitConfig(), "subtype8", [args.peer_magnification])
    train = splits["train"]
    if args.peer_max_train:
        train = subset(train, args.peer_max_train)
    return scan, {"train": train, "test": splits["test"]}


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

    def evaluate(self, run: dict, scan: BreakhisScan, test: list, first: bool) -> dict:
        """Test predictions and seconds of a trained path (first: the one-off parts too)."""
        labels = labels_for(test, "subtype8")
        if "classifier" in run:
            features_s = bp.test_features_seconds(run, scan.root) if first else 0.0
            preds, secs = bp.evaluate_project(run)
            return {"preds": preds, "seconds": secs, "one_off_s": features_s, "labels": labels}
        if first:
            start = time.perf_counter()
            run["model"] = nb.merged_model(run["trainer"], run["google"])
            run["test_ds"] = nb.notebook_dataset(
                [scan.root / r.path for r in test], labels, run["google"]
            )
            one_off = time.perf_counter() - start
        preds, secs, texts = nb.predict(
            run["model"], run["processor"], run["test_ds"], 16, run["google"]
        )
        return {
            "preds": preds,
            "seconds": secs,
            "one_off_s": one_off if first else 0.0,
            "answers": texts[:3],
        }


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


def run_fraction(paths: Paths, scan, splits: dict, epochs: int, google: bool) -> tuple:
    """Each path trained `epochs` epochs, then evaluated on the test split once."""
    out: dict[str, Any] = {
        "train_images": len(splits["train"]),
        "test_images": len(splits["test"]),
        "epochs": epochs,
    }
    defaults = bp.step_settings()[-1][1]
    makers = {
        "notebook": lambda: paths.notebook(scan, splits, epochs, False),
        "breakhis-ft": lambda: paths.project(scan, splits, epochs, defaults, True),
    }
    if google:
        makers["google"] = lambda: paths.notebook(scan, splits, epochs, True)
    labels = labels_for(splits["test"], "subtype8")
    runs = {}
    for name, make in makers.items():
        run = runs[name] = make()
        ev = paths.evaluate(run, scan, splits["test"], first=True)
        out[name] = {
            "times": run["times"],
            "peak_rss_mib": run["peak_rss_mib"],
            "balanced_accuracy": balanced_accuracy(labels, ev["preds"]),
            "unparsed": sum(p < 0 for p in ev["preds"]),
            "eval_s": ev["seconds"],
            "eval_one_off_s": ev["one_off_s"],
            "example_answers": ev.get("answers"),
        }
    return out, runs


def eval_section(paths: Paths, runs: dict, scan, test: list, repeats: int) -> dict:
    """Evaluation of the trained paths over the same test images, alternating, best of repeats."""
    secs: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            secs[name].append(paths.evaluate(run, scan, test, first=False)["seconds"])
    return {name: {"seconds": s, "images_per_s": len(test) / min(s)} for name, s in secs.items()}


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
    """Every peer section; writes peer.json, peer.md and peer_scaling.png into `out`.

    Replicas are built (once) under `replicas`, the rest under `replicas/peer`."""
    work = replicas / "peer"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {**(meta or {}), "threads": args.threads}
    results["settings"] = {k: v for k, v in vars(args).items() if "peer" in k}
    fractions = sorted(args.peer_fractions)
    scan, splits = replica_splits(replicas, fractions[-1], args)
    if args.peer_tiny:  # the tests' tiny Gemma 3: only checks that the code path works
        checkpoint, sizes = ensure_tiny_gemma3(work / "tiny_gemma3", work), dict(SIZES)
    else:
        item = {"image": load_image(scan.root / splits["train"][0].path), "label": 0, "index": 0}
        checkpoint, sizes = peer_checkpoint(work, replicas, item, args)
    results["model"] = sizes
    paths = Paths(checkpoint, work, sizes["image_size"])
    partial = work / "peer_partial.json"  # what is done so far, should a long run be cut short

    def save() -> None:
        partial.write_text(json.dumps(results, indent=1, default=str))

    results["speed"] = speed_section(paths, scan, splits, args)
    save()
    results["runs"] = {}
    for fraction in fractions:  # scaling: a few epochs; the largest: `peer_epochs`, every path
        last = fraction == fractions[-1]
        f_scan, f_splits = replica_splits(replicas, fraction, args)
        epochs = args.peer_epochs if last else args.peer_scaling_epochs
        google = last and not args.peer_no_google
        results["runs"][str(fraction)], runs = run_fraction(paths, f_scan, f_splits, epochs, google)
        save()
    results["evaluation"] = eval_section(paths, runs, f_scan, f_splits["test"], args.peer_repeats)
    results["evaluation"]["test_images"] = len(f_splits["test"])
    results["medgemma_vram_gib"] = bp.medgemma_vram()
    save()
    if not args.peer_no_full:
        results["full_replica"] = full_replica_section(replicas, args.peer_full_image_size)
    write_report(results, out)
    return results
