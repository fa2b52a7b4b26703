"""The peer benchmark's code path (python -m benchmarks bench --only peer) at a minimal size.

Timings are never asserted: only that every recipe trains, evaluates and reports.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from breakhis_ft.models.tiny import ensure_tiny_gemma3

pytest.importorskip("bitsandbytes")
nb = pytest.importorskip("benchmarks.notebook")  # trl: the `bench` extra
peer = pytest.importorskip("benchmarks.peer")


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
def test_peer_benchmark_runs_every_recipe(tmp_path: Path) -> None:
    from benchmarks import bench

    out = tmp_path / "out"
    args = ["--only", "peer", "--out", str(out), "--work", str(tmp_path / "work")]
    args += ["--peer-tiny", "--peer-fractions", "0.02", "0.03", "--peer-epochs", "1"]
    args += ["--peer-scaling-epochs", "1"]
    args += ["--peer-speed-images", "8", "--peer-repeats", "1", "--peer-max-train", "16"]
    args += ["--peer-replica-size", "96", "64", "--peer-no-full"]
    assert bench.main(args) == 0
    result = json.loads((out / "peer.json").read_text())
    for key in ("accuracy_notebook", "accuracy_breakhis_ft", "accuracy_google"):
        assert 0.0 <= result[key] <= 1.0, key
    for key in ("training_speedup", "eval_speedup", "peak_memory_ratio"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    steps = [row["step"] for row in result["breakdown"]]
    assert steps[0] == "notebook recipe (trl)" and steps[-1].endswith("(= default)")
    assert set(result["scaling"]) == {"notebook", "breakhis-ft", "google"}
    assert (out / "peer.md").is_file() and (out / "peer_scaling.png").stat().st_size > 0


def test_pretraining_stand_in_teaches_the_answer_format(tmp_path: Path) -> None:
    from PIL import Image

    from benchmarks.pretrain import pretrain

    path = ensure_tiny_gemma3(tmp_path / "tiny", tmp_path)
    images = [Image.new("RGB", (40, 30), (40 * i, 90, 160)) for i in range(4)]
    out = pretrain(path, images, [0, 1, 2, 3], epochs=1, steps=30)
    assert len(out["vision_probe_accuracy"]) == 1
    assert out["language_loss"][-1] < out["language_loss"][0]  # it learns the prompts' text
