"""Predict on new images from a run folder, merged and adapter-only export, the W&B artifact.

One tiny MedGemma run (LoRA on every linear layer, a learning rate high enough that the adapter
changes the predictions) and one SigLIP linear-probe run are trained once for the module, in
parallel subprocesses, through the real entrypoint.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.tiny_runs import train_runs
from PIL import Image

from breakhis_ft.config import PromptConfig
from breakhis_ft.data.breakhis import scan_from_config
from breakhis_ft.deploy.export import (
    ExportError,
    export_adapter,
    export_merged,
    upload_adapter_artifact,
)
from breakhis_ft.deploy.predict import (
    ImageFiles,
    PredictError,
    find_images,
    load_predictor,
    load_run_config,
    predict_to_csv,
    read_export_info,
)
from breakhis_ft.evaluate.calibration import read_temperature

RUNS = {
    "medgemma": [
        "model=tiny_gemma3",
        "peft.target_modules=all-linear",  # the vision tower's adapters are merged too
        "trainer.lr=0.05",
        "trainer.warmup_ratio=0",
    ],
    # lr 0.01: at the default 2e-4 the 4-step probe is worse than uniform on val, its temperature
    # ends at the search bound (100) and is not applied; these tests apply a fitted one
    "probe": ["model=tiny_siglip", "peft=none", "model.freeze_encoder=true", "trainer.lr=0.01"],
}
N_COPIED = 8  # test-split images copied from each run into the folder to predict
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(module_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The run folder of each tiny run, trained once by the entrypoint."""
    return train_runs(RUNS, tmp_path_factory.mktemp("outputs"), module_cache)


def run_predictions(run_dir: Path) -> dict[str, dict[str, str]]:
    """The run's own test predictions by file name."""
    with (run_dir / "predictions_test.csv").open() as f:
        return {Path(r["path"]).name: r for r in csv.DictReader(f)}


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a predictions CSV."""
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def images(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A nested folder: test images of the runs, one corrupt PNG, one larger TIFF, a text file."""
    folder = tmp_path_factory.mktemp("new_images")
    run_cfg = load_run_config(runs["medgemma"])
    root = scan_from_config(run_cfg.data, run_cfg.paths.synthetic).root
    (folder / "a" / "b").mkdir(parents=True)
    rows = list(run_predictions(runs["medgemma"]).items())[:N_COPIED]
    for i, (name, row) in enumerate(rows):
        shutil.copy(root / row["path"], folder / ("a/b" if i % 2 else "a") / name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    big = Image.open(folder / "a" / rows[0][0]).resize((120, 80))  # another size than training's
    big.save(folder / "a" / "big.tif")
    (folder / "notes.txt").write_text("not an image")
    return folder


def probs_of(row: dict[str, str], names: tuple[str, ...]) -> torch.Tensor:
    """The probability columns of a CSV row as a tensor."""
    return torch.tensor([float(row[f"prob_{n}"]) for n in names])


def batch_of(classifier, folder: Path, image_size: int | None) -> dict:
    """A prompt-only batch of the readable images in `folder`."""
    paths = [p for p in find_images([folder]) if p.name != "corrupt.png"]
    files = ImageFiles(paths, image_size)
    return classifier.collate([{**files[i], "label": 0} for i in range(len(files))], train=False)


# ---- predict ------------------------------------------------------------------------------------


def scaled(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T), computed here independently of the package."""
    return torch.softmax(torch.log(probs.double()) / temperature, dim=-1).float()


@pytest.mark.parametrize("kind", ["medgemma", "probe"])
def test_predict_folder_matches_run_and_lists_corrupt_image(
    kind: str, runs: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    # the model's own probabilities: exactly the run's evaluation
    predictor = load_predictor(run_dir=runs[kind], temperature=False)
    assert predictor.temperature is None
    # A probe's embeddings came from the original files: no resizing before its processor.
    assert predictor.image_size == (None if kind == "probe" else 32)
    paths = find_images([images])
    assert {p.suffix for p in paths} == {".png", ".tif"}  # notes.txt is not an image
    out = tmp_path / "pred.csv"
    done, failed = predict_to_csv(predictor, paths, out, batch_size=3, cpu=True, progress=False)
    assert (done, failed) == (N_COPIED + 1, 1)
    rows = read_csv(out)
    names = predictor.class_names
    assert list(rows[0]) == ["path", "pred", *[f"prob_{n}" for n in names], "error"]
    assert [r["path"] for r in rows] == [str(p) for p in paths]  # every image, in order
    bad = next(r for r in rows if r["path"].endswith("corrupt.png"))
    assert "corrupt.png" in bad["error"] and bad["pred"] == "" and bad["prob_" + names[0]] == ""
    expected = run_predictions(runs[kind])
    compared = 0
    for row in rows:
        if row["error"]:
            continue
        p = probs_of(row, names)
        assert abs(float(p.sum()) - 1) < TOL and row["pred"] == names[int(p.argmax())]
        name = Path(row["path"]).name
        if name in expected:  # the same image: the same probabilities as the run's evaluation
            assert torch.allclose(p, probs_of(expected[name], names), atol=TOL), name
            assert row["pred"] == expected[name]["pred"]
            compared += 1
    assert compared == N_COPIED
    # by default scaled by the temperature the run fitted on its validation split
    temperature = json.loads((runs[kind] / "calibration.json").read_text())["temperature"]
    calibrated = load_predictor(run_dir=runs[kind])
    assert calibrated.temperature == pytest.approx(temperature) and temperature != 1.0
    predict_to_csv(calibrated, paths, tmp_path / "t.csv", batch_size=3, cpu=True, progress=False)
    for row in read_csv(tmp_path / "t.csv"):
        name = Path(row["path"]).name
        if name in expected:
            want = scaled(probs_of(expected[name], names), temperature)
            assert torch.allclose(probs_of(row, names), want, atol=TOL), name


def test_other_sizes_get_the_training_resize(tmp_path: Path) -> None:
    for size in [(700, 460), (30, 90)]:
        Image.new("RGB", size, (200, 100, 150)).save(tmp_path / f"{size[0]}.png")
    files = ImageFiles(find_images([tmp_path]), 64)
    assert sorted(files[i]["image"].size for i in range(2)) == [(21, 64), (64, 42)]
    missing = ImageFiles([tmp_path / "gone.png"], 64)[0]
    assert missing["image"] is None and "not found" in missing["error"]


def test_predict_cli_and_clear_errors(runs: dict[str, Path], images: Path, tmp_path: Path) -> None:
    from breakhis_ft.tools import predict as cli

    out = tmp_path / "cli.csv"
    argv = [str(runs["probe"]), str(images / "a"), str(images / "corrupt.png"), "--out", str(out)]
    assert cli.main([*argv, "--cpu", "--workers", "0", "--no-progress"]) == 0
    rows = read_csv(out)
    assert len(rows) == N_COPIED + 2 and sum(bool(r["error"]) for r in rows) == 1
    # --patient: the images are one patient's; one fused row, the image rows beside it
    fused_out = tmp_path / "patient.csv"
    patient_args = [str(runs["probe"]), str(images / "a"), str(images / "corrupt.png")]
    patient_args += ["--out", str(fused_out), "--patient", "P7", "--cpu", "--workers", "0"]
    assert cli.main([*patient_args, "--no-progress"]) == 0
    (fused,) = read_csv(fused_out)
    per_image = read_csv(tmp_path / "patient_images.csv")
    assert [r["path"] for r in per_image] == [r["path"] for r in rows]
    good = [r for r in per_image if not r["error"]]
    assert (fused["patient"], fused["fusion"]) == ("P7", "mean_log_prob")
    assert (int(fused["n_images"]), int(fused["n_unreadable"])) == (len(good), 1)
    names = load_predictor(run_dir=runs["probe"]).class_names
    log_mean = torch.stack([probs_of(r, names).double().log() for r in good]).mean(dim=0)
    assert torch.allclose(probs_of(fused, names).double(), log_mean.softmax(dim=0), atol=1e-6)
    assert fused["pred"] == names[int(log_mean.argmax())]
    assert cli.main([*patient_args, "--fusion", "majority_vote", "--no-progress"]) == 0
    votes = torch.bincount(torch.stack([probs_of(r, names) for r in good]).argmax(1))
    assert read_csv(fused_out)[0]["pred"] == names[int(votes.argmax())]
    with pytest.raises(PredictError, match="no saved config"):
        load_predictor(run_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="no images found"):
        find_images([tmp_path / "empty"])


# ---- export -------------------------------------------------------------------------------------


def test_merged_export_loads_with_from_pretrained_and_predicts_like_the_adapter(
    runs: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from breakhis_ft.models.medgemma import MedGemmaClassifier
    from breakhis_ft.models.prompts import make_prompt

    adapter = load_predictor(run_dir=runs["medgemma"]).classifier.eval()
    out = export_merged(runs["medgemma"], tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    info = read_export_info(out)
    assert info["format"] == "merged" and info["class_names"] == list(adapter.class_names)
    # Only transformers: no peft, no project code to rebuild the weights.
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(out)
    assert not isinstance(model, PeftModel)
    assert not [k for k in model.state_dict() if "lora" in k]
    merged = MedGemmaClassifier(
        model, processor, make_prompt(PromptConfig(**info["prompt"]), info["class_names"])
    ).eval()
    batch = batch_of(adapter, images, info["image_size"])
    with torch.no_grad():
        p_adapter = adapter.predict_proba(batch)
        with adapter.model.disable_adapter():
            p_base = adapter.predict_proba(batch)
        p_merged = merged.predict_proba(batch)
    assert (p_adapter - p_base).abs().max() > 1e-2  # the adapter matters: the check below bites
    assert torch.allclose(p_merged, p_adapter, atol=TOL)
    # predict.py --model DIR: the same numbers through export_info.json, with its temperature
    temperature = json.loads((runs["medgemma"] / "calibration.json").read_text())["temperature"]
    assert info["temperature"] == temperature
    exported = load_predictor(model_dir=out)
    predict_to_csv(exported, find_images([images]), tmp_path / "m.csv", cpu=True, progress=False)
    readable = [r for r in read_csv(tmp_path / "m.csv") if not r["error"]]
    got = torch.stack([probs_of(r, adapter.class_names) for r in readable])
    assert torch.allclose(got, scaled(p_adapter, temperature), atol=TOL)
    with pytest.raises(ExportError, match="not empty"):
        export_merged(runs["medgemma"], out)


def test_adapter_only_export_reloads_with_peft(
    runs: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out = export_adapter(runs["medgemma"], tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").is_file() and not (
        out / "model.safetensors"
    ).exists()
    info = read_export_info(out)
    assert info["format"] == "adapter" and info["source_run"] == str(runs["medgemma"].resolve())
    assert info["temperature"] == read_temperature(out) == read_temperature(runs["medgemma"])
    base = AutoModelForImageTextToText.from_pretrained(info["base_model"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out)
    reference = load_predictor(run_dir=runs["medgemma"]).classifier.eval()
    from breakhis_ft.models.medgemma import MedGemmaClassifier

    reloaded = MedGemmaClassifier(peft_model, reference.processor, reference.prompt).eval()
    batch = batch_of(reference, images, info["image_size"])
    with torch.no_grad():
        assert torch.allclose(
            reloaded.predict_proba(batch), reference.predict_proba(batch), atol=TOL
        )


def test_siglip_probe_merged_export_predicts_like_the_run(
    runs: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    out = export_merged(runs["probe"], tmp_path / "siglip")
    assert (out / "head.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    paths = find_images([images])
    predict_to_csv(load_predictor(run_dir=runs["probe"]), paths, tmp_path / "r.csv", cpu=True)
    predict_to_csv(load_predictor(model_dir=out), paths, tmp_path / "e.csv", cpu=True)
    names = load_predictor(model_dir=out).class_names
    for a, b in zip(read_csv(tmp_path / "r.csv"), read_csv(tmp_path / "e.csv"), strict=True):
        assert a["error"] == b["error"]
        if not a["error"]:
            assert torch.allclose(probs_of(a, names), probs_of(b, names), atol=TOL)


def test_adapter_logged_as_wandb_artifact_offline(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    name = upload_adapter_artifact(runs["medgemma"], name="tiny-adapter", mode="offline")
    assert name.startswith("tiny-adapter")
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    content = log.read_bytes()
    for expected in (b"tiny-adapter", b"adapter_model.safetensors", b"export_info.json"):
        assert expected in content


# ---- exports that describe themselves -----------------------------------------------------------


def card_snippet(out: Path) -> str:
    """The Python block of an export's model card."""
    return (out / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]


def machine_paths(*folders: Path) -> list[str]:
    """Absolute paths of this machine a card must not show: the given folders, home, the cache."""
    import os

    roots = [*folders, Path.home(), Path(__file__).resolve().parents[1]]
    roots.append(Path(os.environ.get("BREAKHIS_FT_CACHE", Path.home() / ".cache")))
    return sorted({str(Path(p).resolve()) for p in roots} | {str(p) for p in roots})


@pytest.mark.parametrize(
    ("kind", "fmt"), [("medgemma", "merged"), ("medgemma", "adapter"), ("probe", "merged")]
)
def test_model_card_snippet_alone_reproduces_the_run(
    kind: str,
    fmt: str,
    runs: dict[str, Path],
    images: Path,
    tmp_path: Path,
    capsys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from huggingface_hub import ModelCard

    out = (export_merged if fmt == "merged" else export_adapter)(runs[kind], tmp_path / fmt)
    card = (out / "README.md").read_text()
    meta = ModelCard.load(out / "README.md").data
    tag = "image-text-to-text" if kind == "medgemma" else "image-classification"
    assert meta.pipeline_tag == tag and "breakhis" in meta.tags
    assert meta.library_name == ("peft" if fmt == "adapter" else "transformers")
    assert meta.base_model is None and meta.license is None  # the tiny base is a local folder
    assert meta.datasets == ["breakhis-synthetic-replica"]
    for path in machine_paths(tmp_path, runs[kind], images):
        assert path not in card, path
    for section in ("## Classes", "## Data and split", "## Results", "## Usage"):
        assert section in card
    test = json.loads((runs[kind] / "metrics.json").read_text())["test"]
    assert f"| test (n={test['n']}) | balanced_accuracy | {test['balanced_accuracy']:.4f} |" in card
    code = card_snippet(out)
    assert "breakhis_ft" not in code  # plain transformers (and peft): no project code
    expected = run_predictions(runs[kind])
    names = tuple(json.loads((out / "export_info.json").read_text())["class_names"])
    temperature = read_temperature(runs[kind])  # fitted on val: the snippet applies it
    assert temperature is not None and f"TEMPERATURE = {temperature!r}" in code
    checked = 0
    monkeypatch.chdir(out)  # MODEL = ".": the snippet runs in the export's folder
    for image in find_images([images]):
        if image.name not in expected:
            continue
        namespace: dict = {}
        exec(code.replace("path/to/image.png", str(image)), namespace)  # noqa: S102
        want = scaled(probs_of(expected[image.name], names), temperature)
        assert torch.allclose(namespace["probs"], want, atol=TOL)
        checked += 1
    assert checked == N_COPIED
    assert names[int(namespace["probs"].argmax())] in capsys.readouterr().out  # it prints


@pytest.mark.parametrize("fmt", ["merged", "adapter"])
def test_model_card_of_a_hub_base_has_the_hubs_metadata_and_results(
    fmt: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    from huggingface_hub import ModelCard

    from breakhis_ft.deploy.model_card import model_card

    out = (export_merged if fmt == "merged" else export_adapter)(runs["medgemma"], tmp_path / fmt)
    info = read_export_info(out)
    info["base_model"] = "google/medgemma-4b-it"  # as a run on the real model records it
    model_card(info, runs["medgemma"]).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert data.base_model == "google/medgemma-4b-it"
    assert data.base_model_relation == ("adapter" if fmt == "adapter" else "finetune")
    assert (data.license, data.license_name) == ("other", "health-ai-developer-foundations")
    assert (
        data.license_link == "https://developers.google.com/health-ai-developer-foundations/terms"
    )
    assert data.datasets == ["breakhis-synthetic-replica"]
    assert data.pipeline_tag == "image-text-to-text"
    test = json.loads((runs["medgemma"] / "metrics.json").read_text())["test"]
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {
        "balanced_accuracy",
        "accuracy",
        "f1_macro",
        "auroc_macro",
        "patient_recognition_rate",
    }
    for name, result in results.items():
        assert result.dataset_split == "test" and result.task_type == "image-classification"
        assert result.metric_value == pytest.approx(test[name], abs=5e-5)
        assert result.metric_args["interval"] == test[f"{name}_ci95"]
        low, high = test[f"{name}_ci95"]
        shown = f"95% CI {low:.3f}-{high:.3f}, stem bootstrap, stratified by class"
        assert shown in result.metric_name
    if fmt == "adapter":  # the snippet loads the base from the hub
        assert 'BASE = "google/medgemma-4b-it"' in card.text
    for path in machine_paths(tmp_path, runs["medgemma"]):
        assert path not in card.content, path


def test_export_info_holds_the_exact_prompt_preprocessing_and_temperature(
    runs: dict[str, Path], tmp_path: Path, caplog
) -> None:
    import logging

    run = tmp_path / "run"
    shutil.copytree(runs["medgemma"], run)
    (run / "calibration.json").write_text(json.dumps({"temperature": 1.7}))
    with caplog.at_level(logging.INFO):
        out = export_merged(run, tmp_path / "merged")
    assert "trainable" not in caplog.text  # a merged inference model trains nothing
    info = read_export_info(out)
    clf = load_predictor(run_dir=runs["medgemma"]).classifier
    assert info["user_text"] == clf.prompt.user_text()
    assert info["messages"] == clf.prompt.messages()
    assert [(a["class"], a["answer"]) for a in info["answers"]] == list(
        zip(clf.class_names, clf.prompt.answers, strict=True)
    )
    rendered = clf.processor.apply_chat_template(
        info["messages"], add_generation_prompt=True, tokenize=False
    )
    assert rendered == clf.prompt_text
    assert info["preprocessing"] == {
        "convert": "RGB",
        "resize": "longest_side",
        "size": 32,
        "model_side": 112,  # the tiny Gemma 3's square: the cache's size cap
        "resample": "bicubic",
        "stain_norm": "none",
        "then": info["preprocessing"]["then"],
    }
    assert info["temperature"] == 1.7 and "TEMPERATURE = 1.7" in card_snippet(out)
