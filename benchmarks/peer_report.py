"""The peer benchmark's outputs: the headline (two speed rows, time to accuracy, the verdict),
peer.json and the peer.md tables."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

NOTEBOOK = "notebook recipe (trl)"
GOOGLE = "google qlora (trl)"
SAME_RECIPE = "engine, notebook settings"  # the first breakdown step (benchmarks/project.py)
# modules_to_save lm_head + embed_tokens on MedGemma 4B: two trainable 262,208 x 2,560 copies
MODULES_TO_SAVE_PARAMS = 1_342_504_960
PATHS = ("notebook", "breakhis-ft")
SCORERS = ("label", "generation")


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """The peer section's options (python -m benchmarks bench --only peer)."""
    group = parser.add_argument_group("peer (--only peer)")
    group.add_argument("--peer-fraction", type=float, default=0.2, help="replica share")
    group.add_argument("--peer-magnifications", type=int, nargs="+", default=[40, 100, 200, 400])
    group.add_argument("--peer-max-train", type=int, default=320, help="thin train (0: all)")
    group.add_argument(
        "--peer-max-val", type=int, default=0, help="thin validation (0: all); never test"
    )
    group.add_argument("--peer-epochs", type=int, default=6, help="each accuracy run")
    group.add_argument("--peer-seeds", type=int, nargs="+", default=[1, 2, 3])
    group.add_argument(
        "--peer-target",
        type=float,
        default=0.5,
        help="validation balanced accuracy of time to accuracy (stated before the run)",
    )
    group.add_argument(
        "--peer-margin",
        type=float,
        default=-0.03,
        help="non-inferiority margin of breakhis-ft - notebook test balanced accuracy",
    )
    group.add_argument("--peer-speed-images", type=int, default=48)
    group.add_argument("--peer-repeats", type=int, default=3)
    group.add_argument("--peer-pretrain-epochs", type=int, default=3, help="vision tower")
    group.add_argument("--peer-pretrain-steps", type=int, default=300, help="language model")
    group.add_argument("--peer-pretrain-fraction", type=float, default=0.05, help="its replica")
    group.add_argument("--peer-no-google", action="store_true", help="skip Google's QLoRA")
    group.add_argument("--peer-full-image-size", type=int, default=896)
    group.add_argument("--peer-no-full", action="store_true", help="skip the 7,909-image replica")
    group.add_argument("--peer-replica-size", type=int, nargs=2, default=[700, 460])
    group.add_argument("--peer-tiny", action="store_true", help="tiny model: a code-path check")
    group.add_argument(
        "--peer-quick",
        action="store_true",
        help="a minutes-long check of every code path (tiny model and replica, 2 seeds, 1 epoch)",
    )


QUICK = {  # --peer-quick: what it sets
    "peer_tiny": True,
    "peer_fraction": 0.03,
    "peer_replica_size": [96, 64],
    "peer_magnifications": [100, 200],
    "peer_max_train": 16,
    "peer_epochs": 1,
    "peer_seeds": [1, 2],
    "peer_speed_images": 8,
    "peer_repeats": 1,
    "peer_no_full": True,
}


def apply_quick(args: argparse.Namespace) -> None:
    """Set QUICK's values when --peer-quick is given."""
    if args.peer_quick:
        for key, value in QUICK.items():
            setattr(args, key, value)


def speed_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The two speed rows over the notebook's recipe: the same recipe on the project's engine
    (what the engine alone buys) and the project's default recipe (what a user gets)."""
    speed = results["speed"]["configs"]
    default = list(speed)[-1]  # the last breakdown step is the project's default path
    nb = speed[NOTEBOOK]
    rows = []
    for label, name in (("same recipe", SAME_RECIPE), ("default recipe", default)):
        ours = speed[name]
        rows.append(
            {
                "row": label,
                "configuration": name,
                "notebook_images_per_s": nb["images_per_s"],
                "breakhis_ft_images_per_s": ours["images_per_s"],
                "speedup": ours["images_per_s"] / nb["images_per_s"],
                "peak_rss_mib": {"notebook": nb["peak_mib"], "breakhis_ft": ours["peak_mib"]},
                "trainable_parameters": {
                    "notebook": nb["trainable_parameters"],
                    "breakhis_ft": ours["trainable_parameters"],
                },
            }
        )
    return rows


def time_to_accuracy(accuracy: dict[str, Any]) -> dict[str, Any]:
    """Per path and scorer: each seed's seconds (None: target not reached) and their median
    over the seeds that reached it; per scorer the notebook's median over the project's."""
    out: dict[str, Any] = {}
    for scorer in SCORERS:
        row: dict[str, Any] = {}
        for path in PATHS:
            runs = accuracy["runs"][path]
            reached = {s: r["time_to_accuracy"][scorer] for s, r in runs.items()}
            seconds = [t["seconds"] for t in reached.values() if t is not None]
            row[path] = {
                "per_seed": reached,
                "reached": f"{len(seconds)}/{len(reached)}",
                "median_s": statistics.median(seconds) if seconds else None,
            }
        nb, ours = row["notebook"]["median_s"], row["breakhis-ft"]["median_s"]
        row["speedup"] = nb / ours if nb and ours else None
        out[scorer] = row
    return out


def test_scores(accuracy: dict[str, Any]) -> dict[str, Any]:
    """Per path and scorer: test balanced accuracy and evaluation images/s of each seed."""
    out: dict[str, Any] = {}
    for path in PATHS:
        for scorer in SCORERS:
            runs = accuracy["runs"][path].values()
            out.setdefault(path, {})[scorer] = {
                "balanced_accuracy": [r["test"][scorer]["balanced_accuracy"] for r in runs],
                "images_per_s": [r["test"][scorer]["images_per_s"] for r in runs],
                "unparsed": [r["test"][scorer]["unparsed"] for r in runs],
            }
    return out


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures quoted elsewhere: both speed rows, time to accuracy, the pooled verdicts."""
    same, default = speed_rows(results)
    accuracy = results["accuracy"]
    tta = time_to_accuracy(accuracy)
    out: dict[str, Any] = {
        "training_speedup_same_recipe": same["speedup"],
        "training_speedup_default_recipe": default["speedup"],
        "target_val_balanced_accuracy": accuracy["target_val_balanced_accuracy"],
        "non_inferiority_margin": accuracy["non_inferiority_margin"],
    }
    for scorer in SCORERS:
        out[f"time_to_accuracy_speedup_{scorer}"] = tta[scorer]["speedup"]
        pooled = accuracy["comparison"][scorer]["pooled"]
        out[f"difference_{scorer}"] = pooled["difference"]
        out[f"ci95_{scorer}"] = pooled["ci95"]
        out[f"non_inferior_{scorer}"] = pooled["non_inferior"]
        out[f"vacuous_{scorer}"] = pooled["vacuous"]  # both paths answer one class throughout
    if GOOGLE in results["speed"]["configs"]:
        google = results["speed"]["configs"][GOOGLE]["images_per_s"]
        out["training_speedup_default_over_google"] = default["breakhis_ft_images_per_s"] / google
    vram = results.get("medgemma_vram_gib")
    if vram:
        out["peak_memory_ratio_medgemma_estimate"] = vram["breakhis-ft"] / vram["notebook"]
    return out


def breakdown(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each step's images/s and its factor over the step before (the notebook first)."""
    rows, before = [], None
    for name, row in results["speed"]["configs"].items():
        if name == GOOGLE:
            continue
        rate = row["images_per_s"]
        factor = None if before is None else rate / before
        rows.append({"step": name, "images_per_s": rate, "factor": factor, "peak": row["peak_mib"]})
        before = rate
    return rows


def _f(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _seconds(entry: dict | None) -> str:
    return "not reached" if entry is None else f"{entry['seconds']:.0f} s (epoch {entry['epoch']})"


def table(results: dict[str, Any]) -> str:
    """Markdown: speed rows, breakdown, time to accuracy, test accuracy and the verdicts."""
    acc = results["accuracy"]
    seeds = [str(s) for s in acc["seeds"]]
    lines = [
        "| speed (one epoch, same images) | notebook images/s | breakhis-ft images/s | speedup "
        "| peak RSS MiB (notebook / breakhis-ft) |",
        "|---|---|---|---|---|",
    ]
    for row in results["speed_rows"]:
        peak = row["peak_rss_mib"]
        lines.append(
            f"| {row['row']}: {row['configuration']} | {row['notebook_images_per_s']:.2f} "
            f"| {row['breakhis_ft_images_per_s']:.2f} | {row['speedup']:.2f}x "
            f"| {peak['notebook']:.0f} / {peak['breakhis_ft']:.0f} |"
        )
    lines += [
        "",
        "| step (one epoch, same images) | images/s | factor | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    for row in results["breakdown"]:
        factor = "-" if row["factor"] is None else f"{row['factor']:.2f}x"
        lines.append(
            f"| {row['step']} | {row['images_per_s']:.2f} | {factor} | {row['peak']:.0f} |"
        )
    target = acc["target_val_balanced_accuracy"]
    lines += [
        "",
        f"| time to validation balanced accuracy {target} | scorer | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | median |",
        "|---|---|" + "---|" * len(seeds) + "---|",
    ]
    for scorer, row in results["time_to_accuracy"].items():
        for path in PATHS:
            cell = row[path]
            per_seed = " | ".join(_seconds(cell["per_seed"][s]) for s in seeds)
            median = cell["median_s"]
            lines.append(
                f"| {path} | {scorer} | {per_seed} | "
                f"{'-' if median is None else f'{median:.0f} s'} ({cell['reached']}) |"
            )
    margin = acc["non_inferiority_margin"]
    lines += [
        "",
        f"| test balanced accuracy | seed | notebook | breakhis-ft | difference | 95% paired "
        f"interval | non-inferior (margin {margin:+.2f}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for scorer, comparison in acc["comparison"].items():
        for seed, v in [*comparison["per_seed"].items(), ("pooled", comparison["pooled"])]:
            ci = v["ci95"]
            interval = "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"
            lines.append(
                f"| {scorer} | {seed} | {_f(v['notebook'])} | {_f(v['breakhis_ft'])} | "
                f"{_f(v['difference'], '+.3f')} | {interval} | "
                f"{'yes' if v['non_inferior'] else 'no'}"
                f"{' (vacuous: both answer one class)' if v.get('vacuous') else ''} |"
            )
    lines += [
        "",
        "| test evaluation images/s (per seed) | label scoring | generation |",
        "|---|---|---|",
    ]
    for path, scores in results["test_scores"].items():
        cells = [", ".join(f"{x:.1f}" for x in scores[s]["images_per_s"]) for s in SCORERS]
        lines.append(f"| {path} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path) -> None:
    """Add the headline and derived tables to `results`; write peer.json and peer.md."""
    results["speed_rows"] = speed_rows(results)
    results["breakdown"] = breakdown(results)
    results["time_to_accuracy"] = time_to_accuracy(results["accuracy"])
    results["test_scores"] = test_scores(results["accuracy"])
    results["headline"] = headline(results)
    results["modules_to_save_medgemma"] = {
        "extra_trainable_parameters": MODULES_TO_SAVE_PARAMS,
        # bf16 weight + bf16 gradient + two AdamW states in the parameter dtype (trl casts the
        # trainable parameters of a quantized model to bf16)
        "gib_bf16_weights_grads_adamw": MODULES_TO_SAVE_PARAMS * 8 / 2**30,
    }
    out.mkdir(parents=True, exist_ok=True)
    flat = {**results["headline"], **results}
    (out / "peer.json").write_text(json.dumps(flat, indent=1, default=str) + "\n")
    text = table(results)
    (out / "peer.md").write_text(text + "\n")
    print(text)
