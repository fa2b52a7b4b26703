"""The peer benchmark's outputs: headline ratios, peer.json, the peer.md table and the plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

NOTEBOOK = "notebook recipe (trl)"
GOOGLE = "google qlora (trl)"
# modules_to_save lm_head + embed_tokens on MedGemma 4B: two trainable 262,208 x 2,560 copies
MODULES_TO_SAVE_PARAMS = 1_342_504_960


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """The peer section's options (python -m benchmarks bench --only peer)."""
    group = parser.add_argument_group("peer (--only peer)")
    group.add_argument("--peer-fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    group.add_argument("--peer-magnification", type=int, default=100)
    group.add_argument("--peer-epochs", type=int, default=5, help="the largest fraction's runs")
    group.add_argument("--peer-scaling-epochs", type=int, default=2, help="the other fractions")
    group.add_argument("--peer-speed-images", type=int, default=48)
    group.add_argument("--peer-repeats", type=int, default=3)
    group.add_argument("--peer-pretrain-epochs", type=int, default=3, help="vision tower")
    group.add_argument("--peer-pretrain-steps", type=int, default=300, help="language model")
    group.add_argument("--peer-no-google", action="store_true", help="skip Google's QLoRA")
    group.add_argument("--peer-full-image-size", type=int, default=896)
    group.add_argument("--peer-no-full", action="store_true", help="skip the 7,909-image replica")
    group.add_argument("--peer-replica-size", type=int, nargs=2, default=[700, 460])
    group.add_argument("--peer-max-train", type=int, default=0, help="thin train (0: all)")
    group.add_argument("--peer-tiny", action="store_true", help="tiny model: a code-path check")


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios the issue asks for (breakhis-ft over the notebook's recipe)."""
    speed = results["speed"]["configs"]
    default = list(speed)[-1]  # the last breakdown step is the project's default path
    nb, ours = speed[NOTEBOOK], speed[default]
    n = results["speed"]["images"]
    largest = results["runs"][max(results["runs"], key=float)]
    ev = results["evaluation"]
    test_n = ev["test_images"]
    ours_eval_once = test_n / (
        min(ev["breakhis-ft"]["seconds"]) + largest["breakhis-ft"]["eval_one_off_s"]
    )

    def with_caching(row: dict, epochs: int) -> float:  # images/s, one-off costs included
        return epochs * n / (epochs * min(row["epoch_s"]) + min(row["one_off_s"]))

    out = {
        "training_speedup": ours["images_per_s"] / nb["images_per_s"],
        "training_speedup_1_epoch_with_caching": with_caching(ours, 1) / with_caching(nb, 1),
        "training_speedup_5_epochs_with_caching": with_caching(ours, 5) / with_caching(nb, 5),
        "eval_speedup": ev["breakhis-ft"]["images_per_s"] / ev["notebook"]["images_per_s"],
        "eval_speedup_with_feature_computation": ours_eval_once / ev["notebook"]["images_per_s"],
        "peak_memory_ratio": ours["peak_mib"] / nb["peak_mib"],
        "accuracy_notebook": largest["notebook"]["balanced_accuracy"],
        "accuracy_breakhis_ft": largest["breakhis-ft"]["balanced_accuracy"],
        "epochs": results["settings"]["peer_epochs"],
    }
    vram = results.get("medgemma_vram_gib")
    if vram:
        out["peak_memory_ratio_medgemma_estimate"] = vram["breakhis-ft"] / vram["notebook"]
    if "google" in largest:
        out["accuracy_google"] = largest["google"]["balanced_accuracy"]
        out["training_speedup_over_google"] = ours["images_per_s"] / speed[GOOGLE]["images_per_s"]
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


def scaling(results: dict[str, Any]) -> dict[str, Any]:
    """Per path: train images, best epoch seconds, seconds per image, one-off seconds; and the
    spread of seconds per image (largest / smallest: 1.0 is a perfectly linear cost)."""
    out: dict[str, Any] = {}
    for run in results["runs"].values():
        n = run["train_images"]
        for name in ("notebook", "breakhis-ft", "google"):
            if name not in run:
                continue
            times = run[name]["times"]
            epoch = min(times["epoch_s"])  # the least disturbed epoch (a shared machine)
            one_off = sum(
                times.get(k, 0.0) for k in ("train_features_s", "image_cache_s", "dataset_map_s")
            )
            out.setdefault(name, []).append(
                {"images": n, "epoch_s": epoch, "s_per_image": epoch / n, "one_off_s": one_off}
            )
    return out


def per_image_spread(points: list[dict[str, float]]) -> float:
    """Largest over smallest seconds per image across data sizes (1.0: linear cost)."""
    per_image = [p["s_per_image"] for p in points]
    return max(per_image) / min(per_image)


def table(results: dict[str, Any]) -> str:
    """Markdown: the headline, the breakdown and the scaling."""
    h = results["headline"]
    lines = [
        "| measure | value |",
        "|---|---|",
        *(f"| {k} | {v:.3g} |" for k, v in h.items() if isinstance(v, float)),
        "",
        "| step (one epoch, same images) | images/s | factor | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    for row in results["breakdown"]:
        factor = "-" if row["factor"] is None else f"{row['factor']:.2f}x"
        lines.append(
            f"| {row['step']} | {row['images_per_s']:.2f} | {factor} | {row['peak']:.0f} |"
        )
    lines += [
        "",
        "| path | train images | best epoch s | ms per image | one-off s |",
        "|---|---|---|---|---|",
    ]
    for name, points in results["scaling"].items():
        for p in points:
            lines.append(
                f"| {name} | {p['images']} | {p['epoch_s']:.1f} | {1000 * p['s_per_image']:.0f} "
                f"| {p['one_off_s']:.1f} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Epoch time (and one-off caching) against training images, per path."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in results["scaling"].items():
        xs = [p["images"] for p in points]
        line = ax.plot(xs, [p["epoch_s"] for p in points], "o-", label=f"{name}: epoch")[0]
        if any(p["one_off_s"] > 0 for p in points):
            ax.plot(
                xs,
                [p["one_off_s"] for p in points],
                "x--",
                color=line.get_color(),
                label=f"{name}: one-off (caches / dataset map)",
            )
    ax.set_xlabel("training images")
    ax.set_ylabel("seconds")
    ax.set_title("Cost vs data size (peer benchmark)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> None:
    """Add headline, breakdown and scaling to `results`; write peer.json, peer.md, the plot."""
    results["headline"] = headline(results)
    results["breakdown"] = breakdown(results)
    results["scaling"] = scaling(results)
    results["scaling_spread"] = {k: per_image_spread(v) for k, v in results["scaling"].items()}
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
    plot(results, out / "peer_scaling.png")
    print(text)
