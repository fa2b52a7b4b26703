"""A run with stain normalisation, end to end, and what reads its folder afterwards.

One tiny MedGemma run (data.stain_norm=macenko, reference estimated from training images, W&B
offline) is trained once for the module through the real entrypoint. Checked on it: the fitted
normaliser in the run folder and its reference (training images only), the pass-through count in
data_stats.json, prediction applying the normaliser (and matching the run's own predictions),
the export carrying it, `breakhis-ft-explain` on the run's test images and errors, the error
gallery of `breakhis-ft-report`, the most confused pairs in metrics.json, and the W&B
`test/errors` table.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from helpers.tiny_runs import train_runs
from PIL import Image

from breakhis_ft.analysis.gallery import data_root
from breakhis_ft.data.stain import NORMALIZER_FILE, StainNormalizer, load_normalizer
from breakhis_ft.deploy.export import export_adapter
from breakhis_ft.deploy.predict import (
    PredictError,
    find_images,
    load_predictor,
    predict_to_csv,
    read_export_info,
)
from breakhis_ft.evaluate.errors import confused_pairs, most_confident_errors
from breakhis_ft.tools import explain as explain_tool
from breakhis_ft.tools import report as report_tool

REFERENCE_IMAGES = 12
RUN = [
    "model=tiny_gemma3",
    "peft.target_modules=all-linear",
    "trainer.lr=0.05",
    "trainer.warmup_ratio=0",
    "data.stain_norm=macenko",
    f"data.stain_reference_images={REFERENCE_IMAGES}",
    "logger=wandb",
    "logger.mode=offline",
]
TOL = 1e-5

pytestmark = pytest.mark.slow  # one tiny stain-normalised run trained for the module (minutes)


@pytest.fixture(scope="module")
def run(module_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the tiny stain-normalised run."""
    return train_runs({"stain": RUN}, tmp_path_factory.mktemp("outputs"), module_cache)["stain"]


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def split_paths(run: Path) -> dict[str, set[str]]:
    """The image paths of each split, from the run's splits.csv."""
    out: dict[str, set[str]] = {}
    for row in read_csv(run / "splits.csv"):
        out.setdefault(row["split"], set()).add(row["path"])
    return out


@pytest.fixture(scope="module")
def test_images(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with copies of the run's first 8 test images (names kept)."""
    folder = tmp_path_factory.mktemp("to_predict")
    root = data_root(run)
    for row in read_csv(run / "predictions_test.csv")[:8]:
        shutil.copy(root / row["path"], folder / Path(row["path"]).name)
    return folder


def probs(rows: list[dict[str, str]], names: tuple[str, ...]) -> torch.Tensor:
    """The probability columns of CSV rows, (rows, classes)."""
    return torch.tensor([[float(r[f"prob_{n}"]) for n in names] for r in rows])


def test_normalizer_saved_and_fitted_on_training_images_only(run: Path) -> None:
    stain = load_normalizer(run)
    assert stain is not None and stain.method == "macenko"
    splits = split_paths(run)
    reference = set(stain.reference)
    # at most the asked number (a blank tile is skipped), all from train, none from val or test
    assert REFERENCE_IMAGES // 2 <= len(reference) <= REFERENCE_IMAGES
    assert reference <= splits["train"]
    assert not reference & (splits["val"] | splits["test"])
    stats = json.loads((run / "data_stats.json").read_text())["stain_normalization"]
    assert stats["method"] == "macenko" and stats["identity"] == stain.identity()
    assert stats["passed_through"] == len(stats["passed_through_files"])
    used = set().union(*splits.values())
    assert all(f["path"] in used and f["reason"] for f in stats["passed_through_files"])


def cached_images(cache: Path, stain: StainNormalizer) -> dict[str, bytes]:
    """The pixels of the run's image cache (the one built with this normaliser) by path."""
    (info,) = [
        f
        for f in cache.glob("data/images/*/cache.json")
        if json.loads(f.read_text()).get("stain") == stain.to_dict()
    ]
    table = datasets.Dataset.from_file(str(info.parent / "data.arrow"))
    return dict(zip(table["path"], table["pixels"], strict=True))


def test_predict_applies_the_runs_normalizer(
    run: Path, module_cache: Path, test_images: Path, tmp_path: Path
) -> None:
    predictor = load_predictor(run_dir=run, temperature=False)  # the run's CSV: raw probs
    assert predictor.stain == load_normalizer(run)
    # the image predict gives the model is the one training cached for the same file
    trained_on = cached_images(module_cache, predictor.stain)
    root = data_root(run)
    for row in read_csv(run / "predictions_test.csv")[:8]:
        prepared = predictor.prepare(Image.open(root / row["path"]).convert("RGB"))
        assert prepared.tobytes() == trained_on[row["path"]], row["path"]
    paths = find_images([test_images])
    predict_to_csv(predictor, paths, tmp_path / "with.csv", cpu=True, progress=False)
    expected = {Path(r["path"]).name: r for r in read_csv(run / "predictions_test.csv")}
    rows = read_csv(tmp_path / "with.csv")
    names = predictor.class_names
    want = probs([expected[Path(r["path"]).name] for r in rows], names)
    assert (probs(rows, names) - want).abs().max() <= TOL / 10  # measured: 0
    predictor.stain = None  # the same model without the normaliser: other numbers
    predict_to_csv(predictor, paths, tmp_path / "without.csv", cpu=True, progress=False)
    unnormalised = probs(read_csv(tmp_path / "without.csv"), names)
    # the tiny 4-step model barely looks at its images (measured: 8e-5), but enough to tell
    assert (unnormalised - want).abs().max() > TOL


def test_export_carries_the_normalizer(run: Path, test_images: Path, tmp_path: Path) -> None:
    out = export_adapter(run, tmp_path / "adapter")
    saved = load_normalizer(run)
    assert (out / NORMALIZER_FILE).is_file()
    info = read_export_info(out)
    assert StainNormalizer.from_dict(info["stain_normalizer"]) == saved
    exported = load_predictor(model_dir=out)
    assert exported.stain == saved
    image = Image.open(find_images([test_images])[0]).convert("RGB")
    assert exported.prepare(image).tobytes() == load_predictor(run_dir=run).prepare(image).tobytes()
    (out / NORMALIZER_FILE).unlink()  # an export that lost it is refused, not silently different
    with pytest.raises(PredictError, match="stain_norm=macenko"):
        load_predictor(model_dir=out)


def test_explain_script_on_the_runs_test_images(run: Path, tmp_path: Path) -> None:
    from breakhis_ft.tools import explain as cli

    out = tmp_path / "split"
    assert cli.main([str(run), "--split", "test", "--n", "4", "--out", str(out), "--cpu"]) == 0
    rows = read_csv(out / "explanations.csv")
    root, test = data_root(run).resolve(), split_paths(run)["test"]
    assert len(rows) == 4
    for row in rows:
        assert Path(row["path"]).resolve().relative_to(root).as_posix() in test
        assert row["true"] and row["source"] == str(run.resolve())
        overlay = out / row["overlay"]
        assert Image.open(overlay).size[0] > 0 and overlay.with_suffix(".json").is_file()
    errors = tmp_path / "errors"
    assert cli.main([str(run), "--errors", "--n", "3", "--out", str(errors), "--cpu"]) == 0
    expected = most_confident_errors(run / "predictions_test.csv", 3)
    rows = read_csv(errors / "explanations.csv")
    assert [Path(r["path"]).resolve() for r in rows] == [(root / e.path) for e in expected]
    assert all(r["true"] != r["pred"] for r in rows)  # the run's own errors, predicted again


def test_report_gallery_and_confused_pairs(run: Path, tmp_path: Path) -> None:
    explained = tmp_path / "explained"
    explain = [str(run), "--errors", "--n", "2", "--out", str(explained), "--cpu"]
    assert explain_tool.main(explain) == 0
    out = tmp_path / "report"
    argv = [str(run), "--gallery", "5", "--explanations", str(explained), "--out", str(out)]
    assert report_tool.main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    pairs = confused_pairs(metrics["confusion_matrix"], metrics["classes"])
    assert metrics["most_confused"] == pairs and pairs
    every = confused_pairs(metrics["confusion_matrix"], metrics["classes"], None)
    wrong = [r for r in read_csv(run / "predictions_test.csv") if r["label"] != r["pred"]]
    assert sum(p["count"] for p in every) == len(wrong)
    report = (out / "report.md").read_text()
    top = pairs[0]
    assert f"{top['true']} -> {top['pred']}: {top['count']}" in report
    (gallery,) = (out / "gallery").iterdir()
    assert f"({(gallery / 'index.html').relative_to(out).as_posix()})" in report
    page = (gallery / "gallery.md").read_text()
    errors = most_confident_errors(run / "predictions_test.csv", 5)
    lines = [line for line in page.splitlines() if line.startswith("| ") and "thumbs/" in line]
    assert len(lines) == len(errors)
    for line, error in zip(lines, errors, strict=True):  # most confident first, with the facts
        assert error.path in line and f"{error.prob:.3f}" in line and error.patient in line
        assert f"| {error.true} | {error.pred} |" in line and f"{error.magnification}X" in line
    assert sorted(p.name for p in (gallery / "overlays").iterdir()) == ["000.png", "001.png"]
    assert len(list((gallery / "thumbs").iterdir())) == len(errors)
    assert "overlays/000.png" in (gallery / "index.html").read_text()


def test_wandb_gets_the_errors_table(run: Path) -> None:
    (log,) = run.glob("wandb/offline-run-*/run-*.wandb")
    assert b"test/errors" in log.read_bytes()
    n_errors = len(most_confident_errors(run / "predictions_test.csv"))
    (table,) = run.glob("wandb/offline-run-*/files/media/table/test/errors_*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"][:4] == ["image", "true", "pred", "prob"]
    assert len(data["data"]) == min(32, n_errors)
    shown = [row[3] for row in data["data"]]
    assert shown == sorted(shown, reverse=True)  # most confident first
    images = list(run.glob("wandb/offline-run-*/files/media/images/**/*.png"))
    assert len(images) >= 1
