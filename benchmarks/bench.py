"""Benchmarks, side by side in one run: prints a table and writes bench.json (+ bench.md).

  python -m benchmarks bench                           # the CPU sections (about 5-10 min)
  python -m benchmarks bench --gpu --only gpu --out benchmarks/results/h200   # MedGemma 4B, CUDA
  python -m benchmarks bench --gpu-section-on-cpu --only gpu  # the GPU code path on the CPU
  python -m benchmarks bench --only peer               # vs the notebooks' trl recipes

Sections: (1) evaluation: label scoring vs greedy generation (max_new_tokens 40, answer parsed) on
a briefly fine-tuned tiny Gemma 3; (2) a training epoch with and without cached vision features,
on the tiny model and on a "proportional" tiny model whose vision : language FLOP ratio matches
MedGemma 4B at 896 px; (3) a data epoch decoding PNGs vs reading the Arrow image cache, on a
full-size (700x460) replica; (4) GPU: benchmarks/gpu.py; (5) peer: the project against the
blog's and Google's trl recipes (benchmarks/peer.py, writes peer.json). Targets are reported,
never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu import run_gpu_section
from benchmarks.models import (
    TARGET_RATIO,
    build_checkpoint,
    flop_ratio,
    make_classifier,
    proportional_sizes,
)
from benchmarks.peer_report import add_peer_arguments, apply_quick
from breakhis_ft.data.breakhis import scan_breakhis
from breakhis_ft.data.dataset import ImageDataset, build_image_cache, labels_for
from breakhis_ft.data.records import class_names
from breakhis_ft.data.synthetic import ensure_replica
from breakhis_ft.models.medgemma import MedGemmaClassifier
from breakhis_ft.models.tiny import ensure_tiny_gemma3

REPEATS = 3  # timed repetitions per side (best counts)
TARGETS = {"label_scoring_vs_generation": 2.0, "cached_proportional": 1.6, "data_cache": 3.0}


def train_epoch(clf: MedGemmaClassifier, items: list[dict], batch_size: int, lr: float) -> float:
    """One epoch (collate, loss, backward, AdamW step per batch); returns seconds."""
    params = [p for p in clf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    clf.train()
    start = time.perf_counter()
    for i in range(0, len(items), batch_size):
        clf.loss(clf.collate(items[i : i + batch_size], train=True)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def eval_section(clf: MedGemmaClassifier, train: list[dict], test: list[dict], bs: int) -> dict:
    """Fine-tune briefly, then label scoring vs greedy generation over the same test images."""
    train_s = sum(train_epoch(clf, train, 8, 2e-3) for _ in range(3))
    clf.eval()
    generated: list[torch.Tensor] = []
    original = clf.core.generate

    def counting_generate(**kwargs: Any) -> torch.Tensor:
        out = original(**kwargs)
        generated.append(out[:, kwargs["input_ids"].shape[1] :])
        return out

    clf.core.generate = counting_generate  # count the tokens generation emits
    scoring_times, generation_times = [], []
    for _ in range(REPEATS):  # alternating, best of REPEATS (a shared machine)
        generated.clear()
        start = time.perf_counter()
        scored = [
            clf.predict_proba(clf.collate(test[i : i + bs], False)) for i in range(0, len(test), bs)
        ]
        scoring_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        answers = []
        for i in range(0, len(test), bs):
            batch = clf.collate(test[i : i + bs], False)
            answers += clf.generate_answers(batch, max_new_tokens=40)
        generation_times.append(time.perf_counter() - start)
    clf.core.generate = original
    scoring_s, generation_s = min(scoring_times), min(generation_times)
    pad = clf.processor.tokenizer.pad_token_id
    tokens = sum(int((g != pad).sum()) for g in generated)
    by_scoring = torch.cat(scored).argmax(dim=1)
    by_generation = clf.parse_answers(answers)
    labels = torch.tensor([it["label"] for it in test])
    return {
        "fine_tune": {"images": len(train), "epochs": 3, "batch_size": 8, "seconds": train_s},
        "test_images": len(test),
        "batch_size": bs,
        "scoring_method": clf.scoring,
        "label_scoring_images_per_s": len(test) / scoring_s,
        "generation_images_per_s": len(test) / generation_s,
        "speedup": generation_s / scoring_s,
        "generated_tokens": tokens,
        "generated_tokens_per_image": tokens / len(test),
        "unparsed_answers": int((by_generation < 0).sum()),
        "agreement": float((by_scoring == by_generation).float().mean()),
        "accuracy_scoring": float((by_scoring == labels).float().mean()),
        "accuracy_generation": float((by_generation == labels).float().mean()),
        "example_answers": answers[:3],
    }


def cache_section(
    clf: MedGemmaClassifier, name: str, items: list[dict], root: Path, ds, work: Path, bs: int
) -> dict:
    """A training epoch from pixels vs from cached features (same model, same images).

    Epochs alternate and the best of `REPEATS` counts: the machine is shared, so a slow moment
    should not land on one side only.
    """
    store = clf.use_feature_cache(work / "vision_features", name, None)
    start = time.perf_counter()
    computed = clf.prepare_cached_inputs([ds], root)
    precompute_s = time.perf_counter() - start
    no_images = [{k: v for k, v in it.items() if k != "image"} for it in items]
    times: dict[str, list[float]] = {"pixels": [], "cached": []}
    for _ in range(REPEATS):
        for mode, data in (("pixels", items), ("cached", no_images)):
            clf.feature_store = store if mode == "cached" else None
            train_epoch(clf, data[:bs], bs, 1e-4)  # warm-up: first-call overheads stay out
            times[mode].append(train_epoch(clf, data, bs, 1e-4))
    clf.feature_store = None
    uncached_s, cached_s = min(times["pixels"]), min(times["cached"])
    return {
        "images": len(items),
        "batch_size": bs,
        "repeats": REPEATS,
        "uncached_images_per_s": len(items) / uncached_s,
        "cached_images_per_s": len(items) / cached_s,
        "speedup": uncached_s / cached_s,
        "precompute_s": precompute_s,
        "precomputed_images": computed,
        "epoch_seconds": times,
    }


def data_section(root: Path, records: list, image_size: int, work: Path) -> dict:
    """An epoch of decoded, resized images: from the PNG files vs from the Arrow cache."""
    labels = labels_for(records, "subtype8")

    def epoch(ds: ImageDataset) -> float:
        start = time.perf_counter()
        for i in range(len(ds)):
            ds[i]["image"].load()
        return time.perf_counter() - start

    png_s = epoch(ImageDataset(records, labels, root, image_size=image_size))
    start = time.perf_counter()
    cache = build_image_cache(records, root, image_size, work / "data", progress=False)
    build_s = time.perf_counter() - start
    cache_s = epoch(ImageDataset(records, labels, cache))
    return {
        "images": len(records),
        "source_size": "700x460 PNG",
        "image_size": image_size,
        "png_epoch_s": png_s,
        "cache_epoch_s": cache_s,
        "cache_build_s": build_s,
        "speedup": png_s / cache_s,
    }


def hardware() -> dict[str, Any]:
    """CPU model and counts, torch threads, GPU if any."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor()
    import os

    return {
        "cpu": model,
        "cpus_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def table(results: dict) -> str:
    """Markdown table of the headline ratios against their targets."""
    rows = ["| measurement | A | B | ratio | target |", "|---|---|---|---|---|"]
    if "evaluation" in results:
        e = results["evaluation"]
        rows.append(
            f"| eval images/s: label scoring (A) vs generation (B), {e['test_images']} images "
            f"| {e['label_scoring_images_per_s']:.1f} | {e['generation_images_per_s']:.1f} "
            f"| {e['speedup']:.2f}x | >= 2x |"
        )
    for key in ("tiny", "proportional"):
        t = results.get("training", {}).get(key)
        if t:
            rows.append(
                f"| train images/s, {key}: cached (A) vs pixels (B), {t['images']} images "
                f"| {t['cached_images_per_s']:.1f} | {t['uncached_images_per_s']:.1f} "
                f"| {t['speedup']:.2f}x | {'>= 1.6x' if key == 'proportional' else '-'} |"
            )
    if "data" in results:
        d = results["data"]
        rows.append(
            f"| data epoch s, {d['images']} images at {d['image_size']}px: PNG (A) vs cache (B) "
            f"| {d['png_epoch_s']:.2f} | {d['cache_epoch_s']:.2f} | {d['speedup']:.2f}x | >= 3x |"
        )
    for r in results.get("gpu", {}).get("rows", []):
        est = r["vram_estimate_gib"]
        rows.append(
            f"| gpu cached={r['cached_features']} gc={r['gradient_checkpointing']}: images/s, MFU "
            f"| {r['images_per_s']:.2f} | {r['mfu']:.1%} "
            f"| peak {r['peak_allocated_gib'] or 0:.1f} GiB "
            f"| est. {'-' if est is None else f'{est:.1f} GiB'} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections, print the table, write bench.json and bench.md to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=Path("outputs/bench_work"))
    parser.add_argument(
        "--only",
        nargs="*",
        default=["eval", "train", "data"],
        choices=["eval", "train", "data", "gpu", "peer"],
    )
    parser.add_argument("--data-fraction", type=float, default=0.1)
    parser.add_argument("--data-image-size", type=int, default=896)
    parser.add_argument("--replica", type=Path, help="an existing full-size replica to reuse")
    parser.add_argument("--gpu", action="store_true", help="run the GPU section (CUDA)")
    parser.add_argument("--gpu-section-on-cpu", action="store_true")
    parser.add_argument("--gpu-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    add_peer_arguments(parser)
    args = parser.parse_args(argv)
    apply_quick(args)  # --peer-quick
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"date": datetime.date.today().isoformat(), "hardware": hardware()}
    names = class_names("subtype8")
    tiny = ensure_tiny_gemma3(work / "tiny_gemma3", work)
    sections = set(args.only) | ({"gpu"} if args.gpu or args.gpu_section_on_cpu else set())
    if sections & {"eval", "train", "data"}:
        root = args.replica or ensure_replica(work, args.data_fraction, (700, 460), 0)
        records = scan_breakhis(root).records
        results["replica"] = {
            "root": str(root),
            "fraction": args.data_fraction,
            "images": len(records),
        }
        small = ImageDataset(records, labels_for(records, "subtype8"), root, image_size=64)
        step = max(1, len(records) // 128)
        picked = list(range(0, len(records), step))[:128]  # every class and patient mixed
        items = [small[i] for i in picked]
    if "eval" in sections:
        clf = make_classifier(tiny, names)
        results["evaluation"] = eval_section(clf, items[:64], items[64:], 16)
    if "train" in sections:
        subset = _Subset(small, picked[:48])
        training = {"target_ratio": TARGET_RATIO}
        clf = make_classifier(tiny, names)
        training["tiny"] = {
            **cache_section(clf, str(tiny), items[:48], root, subset, work / "tiny", 8),
            "flops": flop_ratio(clf, items[0]),
        }
        sizes, _ = proportional_sizes(work / "proportional_probe", names, items[0])
        path = build_checkpoint(work / "proportional", sizes)
        clf = make_classifier(path, names)
        training["proportional"] = {
            **cache_section(clf, str(path), items[:48], root, subset, work / "proportional", 8),
            "flops": flop_ratio(clf, items[0]),
            "sizes": sizes,
        }
        results["training"] = training
    if "data" in sections:
        results["data"] = data_section(root, records, args.data_image_size, work)
    if "gpu" in sections:
        results["gpu"] = run_gpu_section(
            on_cpu=args.gpu_section_on_cpu, batch=args.gpu_batch, tiny_path=str(tiny)
        )
    if "peer" in sections:  # writes its own peer.json / peer.md
        from benchmarks.peer import run_peer_section  # trl: the optional `bench` extra

        run_peer_section(work, args.out, args, meta=dict(results))
    if not sections - {"peer"}:
        return 0
    results["targets"] = TARGETS
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.out / "bench.md").write_text(text + "\n")
    return 0


class _Subset:
    """`records` and `load(i)` of some items of an ImageDataset (for prepare_cached_inputs)."""

    def __init__(self, ds: ImageDataset, indices: list[int]) -> None:
        self.ds, self.indices = ds, indices
        self.records = [ds.records[i] for i in indices]

    def load(self, i: int):
        return self.ds.load(self.indices[i])


if __name__ == "__main__":
    raise SystemExit(main())
