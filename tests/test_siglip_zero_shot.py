"""Zero-shot SigLIP: probabilities sum to 1 and agree with transformers' own SigLIP logits."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.builders import build
from helpers.siglip_toy import FP32, LORA, model_cfg, tiny_path
from PIL import Image
from transformers import AutoTokenizer, SiglipModel

from breakhis_ft.data.records import class_names
from breakhis_ft.models.siglip_zero_shot import ZeroShotClassifier, build_zero_shot_classifier
from breakhis_ft.models.tiny_siglip import RECIPE_FILE, ensure_tiny_siglip

CLASSES = class_names("subtype8")


def zero_shot(cfg):
    """The zero-shot classifier of a SigLIP model config, in float32."""
    return build_zero_shot_classifier(cfg, str(cfg.name_or_path), torch.float32, CLASSES)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_path(tmp_path_factory)


def images(n=5):
    return [Image.new("RGB", (48, 32), (40 * i, 255 - 30 * i, 120)) for i in range(n)]


def test_zero_shot_probabilities_sum_to_one_through_the_engine_interface(tiny):
    classifier = build(model_cfg(tiny, zero_shot=True), LORA, FP32, CLASSES)
    assert isinstance(classifier, ZeroShotClassifier)
    assert classifier.parameter_counts()[0] == 0  # nothing trains
    batch = classifier.collate(
        [
            {"image": im, "label": i % 8, "index": i, "path": f"{i}.png"}
            for i, im in enumerate(images())
        ],
        train=False,
    )
    probs = classifier.predict_proba(batch)
    assert probs.shape == (5, 8)
    assert (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(classifier.zero_shot_proba(images()), probs)
    with pytest.raises(RuntimeError, match="train=false"):
        classifier.loss(batch)


def test_zero_shot_equals_softmax_of_siglip_logits(tiny):
    template = "H&E histopathology image of breast {}"
    cfg = model_cfg(tiny, zero_shot_templates=[template])
    classifier = zero_shot(cfg)
    # transformers' SiglipModel forward on the same texts and pixels, as its docs show it.
    model = SiglipModel.from_pretrained(str(tiny)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    texts = [template.format(c.replace("_", " ")) for c in CLASSES]
    ids = tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    assert (ids != tokenizer.unk_token_id).all()  # the tiny vocabulary knows every class word
    pixels = classifier.preprocessor(images())
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits_per_image
    assert torch.allclose(classifier.zero_shot_proba(images()), logits.softmax(-1), atol=1e-5)


def test_templates_are_averaged_and_checked(tiny):
    two = ["H&E histopathology image of breast {}", "a photo of {} tissue"]
    classifier = zero_shot(model_cfg(tiny, zero_shot_templates=two))
    assert classifier.prompts[4] == [
        "H&E histopathology image of breast ductal carcinoma",
        "a photo of ductal carcinoma tissue",
    ]
    assert torch.allclose(classifier.text_embeds.norm(dim=-1), torch.ones(8), atol=1e-5)
    single = zero_shot(model_cfg(tiny, zero_shot_templates=two[:1]))
    assert not torch.allclose(single.text_embeds, classifier.text_embeds)
    with pytest.raises(ValueError, match="zero_shot_templates"):
        zero_shot(model_cfg(tiny, zero_shot_templates=["no slot"]))


def test_tiny_siglip_is_built_once_and_rebuilt_when_the_recipe_changes(tmp_path):
    path = ensure_tiny_siglip(tmp_path / "tiny", tmp_path)
    weights = path / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert ensure_tiny_siglip(path, path.parent) == path and weights.stat().st_mtime_ns == first
    recipe = json.loads((path / RECIPE_FILE).read_text())
    (path / RECIPE_FILE).write_text(json.dumps({**recipe, "hash": "older"}))
    ensure_tiny_siglip(path, path.parent)
    assert json.loads((path / RECIPE_FILE).read_text())["hash"] == recipe["hash"]
    assert weights.stat().st_mtime_ns != first
