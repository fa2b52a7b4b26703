"""The peer benchmark: its code path at a minimal size (--peer-quick), the time to accuracy, the
paired comparisons per seed and pooled, the non-inferiority verdict and the two speed rows.

Timings are never asserted: only that every recipe trains, evaluates and reports.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from breakhis_ft.data.records import ImageRecord
from breakhis_ft.models.tiny import ensure_tiny_gemma3

pytest.importorskip("bitsandbytes")
pytest.importorskip("trl")  # the `bench` extra; the benchmarks below import it

from benchmarks import notebook as nb  # noqa: E402
from benchmarks import peer, peer_accuracy, peer_report  # noqa: E402


def test_notebook_collator_masks_only_padding_and_image_markers(tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ensure_tiny_gemma3(tmp_path / "tiny", tmp_path))
    tok = processor.tokenizer
    image = Image.new("RGB", (64, 48), (200, 120, 160))
    examples = [
        {"image": image, "messages": nb.format_messages(nb.BLOG_PROMPT, answer)}
        for answer in ("3", "12")  # different lengths: the first row gets right padding
    ]
    batch = nb.make_collate_fn(processor)(examples)
    ids, labels = batch["input_ids"], batch["labels"]
    masked = {tok.pad_token_id, tok.boi_token_id, tok.image_token_id}
    hidden = ids.clone().apply_(lambda t: t in masked).bool()
    assert hidden.any() and (ids == tok.pad_token_id).any()
    assert (labels[hidden] == -100).all()
    assert torch_equal(labels[~hidden], ids[~hidden])  # the prompt and the answer are trained
    assert (ids == tok.convert_tokens_to_ids("<end_of_image>")).any()  # not masked by the blog


def torch_equal(a, b) -> bool:
    """Tensor equality as a bool."""
    import torch

    return bool(torch.equal(a, b))


def test_blog_parser_and_balanced_accuracy_count_unparsed_as_wrong() -> None:
    assert [nb.parse_blog(t) for t in ("3", " 7\n", "class 5.", "8", "12", "none")] == [
        3,
        7,
        5,
        -1,
        -1,
        -1,
    ]
    assert nb.parse_google("B: fibroadenoma") == 1
    assert nb.parse_google("B") == -1  # Google's fine-tuned parser wants the whole option
    assert peer.balanced_accuracy([0, 0, 1, 1], [0, -1, 1, 1]) == pytest.approx(0.75)


@pytest.mark.slow
def test_peer_benchmark_quick_runs_every_recipe_and_compares_seeds(tmp_path: Path) -> None:
    from benchmarks import bench

    out = tmp_path / "out"
    args = ["--only", "peer", "--peer-quick", "--out", str(out), "--work", str(tmp_path / "work")]
    assert bench.main(args) == 0
    result = json.loads((out / "peer.json").read_text())
    same, default = result["speed_rows"]  # the same recipe on both sides, then the default
    assert same["configuration"] == "engine, notebook settings"
    assert default["configuration"].endswith("(= default)")
    for key in ("training_speedup_same_recipe", "training_speedup_default_recipe"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    steps = [row["step"] for row in result["breakdown"]]
    assert steps[0] == "notebook recipe (trl)" and steps[-1].endswith("(= default)")
    for scorer in ("label", "generation"):  # both paths scored both ways
        for path in ("notebook", "breakhis-ft"):
            assert set(result["time_to_accuracy"][scorer][path]["per_seed"]) == {"1", "2"}
            for seed in ("1", "2"):
                csv = out / "peer_predictions" / path / f"seed{seed}" / scorer
                rows = (csv / "predictions_test.csv").read_text().splitlines()
                assert len(rows) == 1 + result["accuracy"]["images"]["test"]
        comparison = result["accuracy"]["comparison"][scorer]
        assert set(comparison["per_seed"]) == {"1", "2"}
        for verdict in [*comparison["per_seed"].values(), comparison["pooled"]]:
            lower = verdict["ci95"][0]
            assert verdict["non_inferior"] == (lower > result["non_inferiority_margin"])
    assert "| same recipe: engine, notebook settings |" in (out / "peer.md").read_text()


def _record(patient: str, subtype: str, seq: int) -> ImageRecord:
    return ImageRecord(
        path=f"{subtype}/{patient}/{seq}.png",
        tumor_class="benign" if subtype == "adenosis" else "malignant",
        subtype=subtype,
        patient=patient,
        stem=patient,
        magnification=100,
        seq=seq,
    )


def _hits(records: list[ImageRecord], wrong_patients: set[str]) -> np.ndarray:
    """Label-scoring rows: the true class, except on the given patients' images."""
    names = peer_accuracy.CLASSES
    probs = np.full((len(records), len(names)), 0.01)
    for i, r in enumerate(records):
        cls = names.index(r.subtype)
        probs[i, (cls + 1) % len(names) if r.patient in wrong_patients else cls] = 0.93
    return probs


def test_paired_comparison_per_seed_and_pooled_with_the_margin(tmp_path: Path) -> None:
    records = [
        _record(p, subtype, i)
        for p, subtype in (("11", "adenosis"), ("12", "adenosis"), ("13", "ductal_carcinoma"))
        for i in range(3)
    ] + [_record("14", "ductal_carcinoma", i) for i in range(3)]
    root = tmp_path / "predictions"
    wrong = {("breakhis-ft", 2): {"13"}}  # the project misses one patient on seed 2
    for path in peer_accuracy.PATHS:
        for seed in (1, 2):
            probs = _hits(records, wrong.get((path, seed), set()))
            generation = peer_accuracy.one_hot([int(x) for x in probs.argmax(axis=1)])
            scores = {"label": {"probs": probs}, "generation": {"probs": generation}}
            peer_accuracy.write_test_predictions(root / path / f"seed{seed}", records, scores)
    result = peer_accuracy.paired_comparisons(root, [1, 2], -0.03, tmp_path / "work")
    for scorer in peer_accuracy.SCORERS:
        seed1, seed2 = result[scorer]["per_seed"]["1"], result[scorer]["per_seed"]["2"]
        assert seed1["difference"] == 0.0 and seed1["ci95"] == [0.0, 0.0]
        assert seed1["non_inferior"]  # 0 lies above -0.03
        assert seed2["difference"] == pytest.approx(-0.25)  # ductal recall 1/2 instead of 1
        assert seed2["ci95"][0] < -0.03 and not seed2["non_inferior"]
        pooled = result[scorer]["pooled"]
        # the stack's balanced accuracy is the mean of the seeds'; a patient is one unit across
        # the seeds (the same 4 patients, each image once per seed)
        assert pooled["breakhis_ft"] == pytest.approx(
            (seed1["breakhis_ft"] + seed2["breakhis_ft"]) / 2
        )
        assert pooled["difference"] == pytest.approx(-0.125)
        assert (pooled["patients"], pooled["images"]) == (4, 2 * len(records))
        assert seed2["ci95"][0] <= pooled["ci95"][0] <= 0.0
        assert seed1["predicted_classes"] == {"breakhis-ft": 2, "notebook": 2}
        assert not pooled["vacuous"]
        assert pooled["interval"]["unit"] == "stem"  # the split's grouping, as report --compare


def test_paired_comparison_of_two_one_class_paths_is_vacuous(tmp_path: Path) -> None:
    pairs = (
        ("11", "adenosis"),
        ("12", "adenosis"),
        ("13", "ductal_carcinoma"),
        ("14", "ductal_carcinoma"),
    )
    records = [_record(p, subtype, i) for p, subtype in pairs for i in range(2)]
    root = tmp_path / "predictions"
    one_class = _hits(records, set())
    one_class[:, :] = 0.01
    one_class[:, 0] = 0.93  # adenosis on every image: balanced accuracy 1 / 2 on both paths
    for path in peer_accuracy.PATHS:
        scores = {"label": {"probs": one_class}, "generation": {"probs": one_class}}
        peer_accuracy.write_test_predictions(root / path / "seed1", records, scores)
    result = peer_accuracy.paired_comparisons(root, [1], -0.03, tmp_path / "work")
    pooled = result["label"]["pooled"]
    assert pooled["ci95"] == [0.0, 0.0] and pooled["non_inferior"]  # lower bound 0 > -0.03 ...
    assert pooled["vacuous"] and pooled["predicted_classes"] == {"breakhis-ft": 1, "notebook": 1}


def test_generation_scores_count_unparsed_answers_wrong() -> None:
    labels = [0, 0, 1, 1]
    score = peer_accuracy.scored(peer_accuracy.one_hot([0, -1, 1, -1]), labels, seconds=2.0)
    assert score["unparsed"] == 2 and score["images_per_s"] == 2.0
    assert score["balanced_accuracy"] == pytest.approx(0.5)


def test_time_to_accuracy_is_the_training_time_of_the_first_epoch_at_the_target() -> None:
    curve = [
        {"epoch": 1, "train_s": 12.0, "val_label": 0.31, "val_generation": 0.0},
        {"epoch": 2, "train_s": 22.5, "val_label": 0.52, "val_generation": 0.2},
        {"epoch": 3, "train_s": 33.0, "val_label": 0.48, "val_generation": 0.5},
    ]
    assert peer_accuracy.time_to_accuracy(curve, "label", 0.5) == {"epoch": 2, "seconds": 22.5}
    assert peer_accuracy.time_to_accuracy(curve, "generation", 0.5) == {"epoch": 3, "seconds": 33.0}
    assert peer_accuracy.time_to_accuracy(curve, "label", 0.6) is None


def test_two_speed_rows_same_recipe_and_default() -> None:
    def row(rate: float, peak: float) -> dict:
        return {"images_per_s": rate, "peak_mib": peak, "trainable_parameters": 10}

    configs = {
        "notebook recipe (trl)": row(2.0, 150),
        "engine, notebook settings": row(2.5, 130),
        "+ image cache": row(2.4, 131),
        "+ no checkpointing, AdamW (= default)": row(12.0, 400),
    }
    same, default = peer_report.speed_rows({"speed": {"configs": configs}})
    assert (same["row"], same["speedup"]) == ("same recipe", 1.25)
    assert (default["row"], default["speedup"]) == ("default recipe", 6.0)
    assert default["peak_rss_mib"] == {"notebook": 150, "breakhis_ft": 400}


def test_pretraining_stand_in_teaches_the_answer_format(tmp_path: Path) -> None:
    from PIL import Image

    from benchmarks.pretrain import pretrain

    path = ensure_tiny_gemma3(tmp_path / "tiny", tmp_path)
    images = [Image.new("RGB", (40, 30), (40 * i, 90, 160)) for i in range(4)]
    out = pretrain(path, images, [0, 1, 2, 3], epochs=1, steps=30)
    assert len(out["vision_probe_accuracy"]) == 1
    assert out["language_loss"][-1] < out["language_loss"][0]  # it learns the prompts' text
