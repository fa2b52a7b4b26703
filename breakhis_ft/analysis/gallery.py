"""What a run gets wrong: a page of its misclassified test images and its most confused classes.

`write_gallery(run_dir, out_dir)` writes `index.html` and `gallery.md` into `out_dir`: the test
images the run got wrong, most confident first, each with a thumbnail, the true and predicted
class, the probability the run gave its (wrong) answer and the true class, the patient and the
magnification; beside it the explanation heatmap where `breakhis-ft-explain` computed one (its
`explanations.csv`, matched by image and by the run it explained). Above them, the class pairs
the run confuses most, by count (from the confusion matrix of `metrics.json`).

Read from the run folder only (`predictions_test.csv`, `metrics.json`, `data_stats.json` for
the data root): no torch, no model.
"""

from __future__ import annotations

import csv
import html
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from breakhis_ft.evaluate.errors import (
    PredictionError,
    confused_pairs,
    most_confident_errors,
    thumbnail,
)

GALLERY_ROWS = 32  # errors shown per run
THUMBNAIL = 192  # longest side of a thumbnail, pixels
PAIRS_SHOWN = 5  # confused class pairs listed per run


@dataclass
class GalleryEntry:
    """One misclassified image on the page; pictures relative to the gallery folder."""

    error: PredictionError
    thumbnail: str | None  # None: the image could not be read from the data root
    overlay: str | None  # the explanation heatmap, when one was computed


def data_root(run_dir: str | Path) -> Path | None:
    """The folder a run's image paths are relative to: data_stats.json's root, else data.root."""
    run_dir = Path(run_dir)
    stats = run_dir / "data_stats.json"
    if stats.is_file():
        root = json.loads(stats.read_text()).get("root")
        if root:
            return Path(root)
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        root = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("root")
        if root:
            return Path(root)
    return None


def run_confused_pairs(
    metrics: dict[str, Any], split: str = "test", top: int | None = PAIRS_SHOWN
) -> list[dict[str, Any]]:
    """The most confused class pairs of a split, from its confusion matrix in metrics.json."""
    split_metrics = metrics.get(split) or {}
    confusion, classes = split_metrics.get("confusion_matrix"), split_metrics.get("classes")
    if not confusion or not classes:
        return []
    return confused_pairs(confusion, classes, top)


def explanation_overlays(folder: str | Path, run_dir: str | Path) -> dict[Path, Path]:
    """Overlay PNGs of `breakhis-ft-explain` output by resolved image path, for this run only."""
    folder, run = Path(folder), Path(run_dir).resolve()
    index = folder / "explanations.csv"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: not found; give the --out folder of breakhis-ft-explain")
    with index.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        Path(row["path"]).resolve(): folder / row["overlay"]
        for row in rows
        if row.get("source") and Path(row["source"]).resolve() == run
    }


def _entries(
    errors: list[PredictionError], root: Path | None, overlays: dict[Path, Path], out: Path
) -> list[GalleryEntry]:
    """Write each error's thumbnail (and copy its overlay) into `out`; the page's entries."""
    entries = []
    for number, error in enumerate(errors):
        image_path = None if root is None else (root / error.path).resolve()
        picture = None if image_path is None else thumbnail(image_path, THUMBNAIL)
        thumb = overlay = None
        if picture is not None:
            thumb = f"thumbs/{number:03d}.png"
            picture.save(out / thumb)
        if image_path is not None and image_path in overlays:
            overlay = f"overlays/{number:03d}.png"
            shutil.copyfile(overlays[image_path], out / overlay)
        entries.append(GalleryEntry(error, thumb, overlay))
    return entries


def write_gallery(
    run_dir: str | Path,
    out_dir: str | Path,
    n: int = GALLERY_ROWS,
    explanations: str | Path | None = None,
) -> Path | None:
    """Write the run's error gallery (index.html, gallery.md, pictures) into `out_dir`; the path of
    index.html, or None when the run has no predictions_test.csv."""
    run_dir, out = Path(run_dir), Path(out_dir)
    predictions = run_dir / "predictions_test.csv"
    if not predictions.is_file():
        return None
    all_errors = most_confident_errors(predictions)
    with predictions.open(newline="") as f:
        total = sum(1 for _ in csv.DictReader(f))
    overlays = explanation_overlays(explanations, run_dir) if explanations else {}
    for sub in ("thumbs", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    entries = _entries(all_errors[:n], data_root(run_dir), overlays, out)
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    page = {
        "run": str(run_dir),
        "errors": len(all_errors),
        "total": total,
        "pairs": run_confused_pairs(metrics),
        "entries": entries,
    }
    (out / "gallery.md").write_text(gallery_markdown(page))
    (out / "index.html").write_text(gallery_html(page))
    return out / "index.html"


def _pair_text(pair: dict[str, Any]) -> str:
    true, pred = pair["true"], pair["pred"]
    return f"{true} -> {pred}: {pair['count']} ({pair['share']:.0%} of {true})"


def _summary(page: dict[str, Any]) -> str:
    shown = len(page["entries"])
    return (
        f"{page['errors']} of {page['total']} test images misclassified; the {shown} most "
        "confident errors, highest probability of the wrong class first."
    )


def gallery_markdown(page: dict[str, Any]) -> str:
    """The gallery as Markdown: confused pairs, then a table row per error."""
    lines = [f"# Errors of {page['run']}", "", _summary(page), "", "Most confused (true -> pred):"]
    lines += [f"- {_pair_text(p)}" for p in page["pairs"]] or ["- none"]
    lines += [
        "",
        "| # | image | heatmap | true | predicted | p(pred) | p(true) | patient | mag | path |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for number, entry in enumerate(page["entries"]):
        e = entry.error
        image = f"![]({entry.thumbnail})" if entry.thumbnail else "(unreadable)"
        heat = f"![]({entry.overlay})" if entry.overlay else "-"
        cells = [number, image, heat, e.true, e.pred, f"{e.prob:.3f}", f"{e.prob_true:.3f}"]
        cells += [e.patient, f"{e.magnification}X", e.path]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def gallery_html(page: dict[str, Any]) -> str:
    """The gallery as a standalone HTML page (pictures linked from the folder beside it)."""
    esc = html.escape
    pairs = "".join(f"<li>{esc(_pair_text(p))}</li>" for p in page["pairs"]) or "<li>none</li>"
    rows = []
    for number, entry in enumerate(page["entries"]):
        e = entry.error
        image = f'<img src="{esc(entry.thumbnail)}">' if entry.thumbnail else "(unreadable)"
        heat = f'<img src="{esc(entry.overlay)}" height="{THUMBNAIL}">' if entry.overlay else ""
        cells = [str(number), image, heat, esc(e.true), esc(e.pred), f"{e.prob:.3f}"]
        cells += [f"{e.prob_true:.3f}", esc(e.patient), f"{e.magnification}X", esc(e.path)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(
        f"<th>{h}</th>"
        for h in ("#", "image", "heatmap", "true", "predicted", "p(pred)", "p(true)")
        + ("patient", "mag", "path")
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Errors of "
        f"{esc(page['run'])}</title><style>td{{vertical-align:top;padding:4px;"
        f"font:13px sans-serif}}</style></head><body><h1>Errors of {esc(page['run'])}</h1>"
        f"<p>{esc(_summary(page))}</p><p>Most confused (true -&gt; pred):</p><ul>{pairs}</ul>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table></body></html>\n"
    )


def errors_section(
    runs: Sequence[Any], root: Path, galleries: dict[Path, str] | None = None
) -> list[str]:
    """Markdown lines: each run's most confused test class pairs, and a link to its error gallery
    (`galleries`: run folder -> the gallery page, relative to the report's folder)."""
    title = f"## Most confused class pairs (test; true -> predicted: count, top {PAIRS_SHOWN})"
    lines = [title, ""]
    for run in runs:
        name = os.path.relpath(run.path, root) if run.path != root else run.path.name
        pairs = run_confused_pairs(run.metrics)
        text = ", ".join(f"{p['true']} -> {p['pred']}: {p['count']}" for p in pairs)
        page = (galleries or {}).get(run.path)
        link = f" ([errors]({page}))" if page else ""
        lines.append(f"- {name}: {text or 'no errors or no test metrics'}{link}")
    return [*lines, ""]
