"""Explanation maps: the API, the files, and Adebayo et al. (2018)'s sanity checks.

Task: 3 classes that differ only in the top-left quadrant (red, blue, or like the rest), learnt in
seconds by the tiny SigLIP (full fine-tune) and the tiny Gemma 3 (LoRA). Checks: a randomised copy
of the trained model gives a different map; the map depends on the class asked about; the map of
a red or blue image puts most of its mass on the top-left quadrant. MedGemma's soft-token map
(level="tokens") is not held to the last: the tiny model's random 2-layer vision tower spreads the
quadrant's colour over every soft token, so no faithful token map can single the quadrant out; its
patch map (level="patches", before the tower) is. Nor are MedGemma's integrated gradients: from the
grey baseline, the pink background also reads as red, and red-corner maps put ~30 % on the corner.
Each check fails when the maps ignore the model, ignore the target or are uniform (tried).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from helpers.builders import build
from helpers.medgemma_toy import classifier as medgemma_classifier
from helpers.medgemma_toy import tiny_path as tiny_gemma_path
from helpers.siglip_toy import FP32, PROBE, model_cfg
from helpers.siglip_toy import tiny_path as tiny_siglip_path
from PIL import Image

from breakhis_ft.deploy.explain import (
    Explanation,
    explain_images,
    image_cells,
    log_odds,
    normalise,
)
from breakhis_ft.deploy.overlay import RAMP, caption, heatmap, save_overlay
from breakhis_ft.models.tiny import SIZES as GEMMA_SIZES
from breakhis_ft.models.tiny_siglip import SIZES as SIGLIP_SIZES

CLASSES = ("red_corner", "blue_corner", "plain")
CORNERS = np.array([[0.9, 0.15, 0.2], [0.15, 0.2, 0.9], [0.85, 0.6, 0.75]])
PLAIN = np.array([0.85, 0.6, 0.75])  # an H&E-like pink: the whole image of class 2
# (fixture, MedGemma level) of every explainer checked
EXPLAINERS = [("siglip", "patches"), ("medgemma", "tokens"), ("medgemma", "patches")]
METHODS = ["integrated_gradients", "grad_x_input"]


def quadrant_image(cls: int, rng: np.random.Generator, size: int) -> Image.Image:
    """Pink noise everywhere; the top-left quadrant red (0), blue (1) or pink as the rest (2)."""
    pixels = PLAIN + rng.uniform(-0.05, 0.05, 3) + rng.normal(0, 0.08, (size, size, 3))
    half = size // 2
    pixels[:half, :half] = CORNERS[cls] + rng.normal(0, 0.08, (half, half, 3))
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def quadrant_examples(n: int, seed: int, size: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"image": quadrant_image(i % 3, rng, size), "label": i % 3, "index": i} for i in range(n)
    ]


def fit(classifier, train: list[dict], steps: int, lr: float, batch_size: int = 8) -> None:
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad], lr=lr)
    classifier.train()
    for step in range(steps):
        start = (step * batch_size) % len(train)
        batch = classifier.collate(train[start : start + batch_size], train=True)
        classifier.loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    classifier.eval()


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    torch.manual_seed(0)
    cfg = model_cfg(tiny_siglip_path(tmp_path_factory), freeze_encoder=False)
    classifier = build(cfg, PROBE, FP32, CLASSES)  # full fine-tune
    fit(classifier, quadrant_examples(48, seed=0, size=64), steps=30, lr=1e-3)
    return classifier


@pytest.fixture(scope="module")
def medgemma(tmp_path_factory):
    classifier = medgemma_classifier(
        tiny_gemma_path(tmp_path_factory), CLASSES, target_modules="all-linear"
    )
    fit(classifier, quadrant_examples(48, seed=0, size=112), steps=60, lr=5e-3)
    return classifier


def held_out(name: str, classes=(0, 1, 2), n: int = 6) -> tuple[list[Image.Image], list[int]]:
    size = 64 if name == "siglip" else 112
    examples = [e for e in quadrant_examples(3 * n, seed=1, size=size) if e["label"] in classes]
    return [e["image"] for e in examples[:n]], [e["label"] for e in examples[:n]]


def randomised(classifier, seed: int = 123):
    """A copy with every weight matrix (all layers, head included) redrawn at its own scale."""
    copied = copy.deepcopy(classifier)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in copied.parameters():
            if param.dim() >= 2:
                scale = float(param.float().std()) or 0.02
                noise = torch.randn(param.shape, generator=generator) * scale
                param.copy_(noise.to(param))
    return copied


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation, ties averaged (positive-part maps have many zeros)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        x = x.ravel()
        out = np.empty(x.size)
        out[x.argsort(kind="stable")] = np.arange(x.size)
        for value in np.unique(x):
            out[x == value] = out[x == value].mean()
        return out

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def test_log_odds_and_normalise():
    scores = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
    odds = log_odds(scores, torch.tensor([0, 2]))
    expected = [2.0 - np.log(2.0), -1.0 - np.log(1.0 + np.e)]
    assert np.allclose(odds.numpy(), expected, atol=1e-6)
    grid = normalise(np.array([[1.0, -3.0], [3.0, 0.0]]))
    assert np.allclose(grid, [[0.25, 0.0], [0.75, 0.0]])
    assert np.allclose(normalise(np.array([[1.0, -3.0]]), sign="abs"), [[0.25, 0.75]])
    assert np.allclose(normalise(-np.ones((2, 2))), 0.25)  # no positive evidence: uniform


@pytest.mark.parametrize("name,level", EXPLAINERS)
def test_maps_are_grids_over_the_image_and_probs_are_the_classifiers(request, name, level):
    classifier = request.getfixturevalue(name)
    images, _ = held_out(name, n=3)
    explanations = explain_images(classifier, images, batch_size=2, level=level)
    # grid side from the token count: tiny Gemma 3 16 soft tokens (4 x 4) or 8 x 8 patches;
    # tiny SigLIP 64 px / 8 px patches
    if level == "patches":
        sizes = SIGLIP_SIZES if name == "siglip" else GEMMA_SIZES
        side = sizes["image_size"] // sizes["patch_size"]
    else:
        side = int(GEMMA_SIZES["mm_tokens_per_image"] ** 0.5)
    examples = [{"image": im, "label": 0, "index": i} for i, im in enumerate(images)]
    with torch.no_grad():
        expected = classifier.predict_proba(classifier.collate(examples, train=False)).numpy()
    for explanation, probs in zip(explanations, expected, strict=True):
        assert explanation.grid.shape == explanation.attribution.shape == (side, side)
        assert explanation.grid.min() >= 0 and np.isclose(explanation.grid.sum(), 1.0)
        assert np.allclose(explanation.probs, probs, atol=1e-5)
        assert explanation.target == explanation.predicted == int(probs.argmax())
    chosen = explain_images(classifier, images, target=[2, 1, 0], level=level)
    assert [e.target for e in chosen] == [2, 1, 0]
    assert not classifier.training  # eval mode restored (it was eval)


def test_medgemma_sequence_scoring_gives_the_same_probabilities(medgemma):
    images, _ = held_out("medgemma", n=2)
    examples = [{"image": im, "label": 0, "index": i} for i, im in enumerate(images)]
    medgemma.scoring = "sequence"
    try:
        explanations = explain_images(medgemma, images)
        with torch.no_grad():
            expected = medgemma.predict_proba(medgemma.collate(examples, train=False)).numpy()
    finally:
        medgemma.scoring = "auto"
    assert np.allclose(np.stack([e.probs for e in explanations]), expected, atol=1e-5)


def test_a_linear_probe_is_explained_through_its_encoder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = model_cfg(tiny_siglip_path(tmp_path_factory), freeze_encoder=True)
    probe = build(cfg, PROBE, FP32, CLASSES)
    images, _ = held_out("siglip", n=2)
    explanations = explain_images(probe, images)
    with torch.no_grad():
        expected = probe.predict_proba({"embeddings": probe.embed_images(images)}).numpy()
    assert np.allclose(np.stack([e.probs for e in explanations]), expected, atol=1e-5)
    assert all(p.grad is None for p in probe.parameters())  # nothing accumulated in the weights


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,level", EXPLAINERS)
def test_randomised_weights_change_the_map(request, name, level, method):
    """Model randomisation (Adebayo et al.): a map that survives it does not explain the model."""
    trained = request.getfixturevalue(name)
    images, labels = held_out(name)
    options = {"level": level, "method": method}
    ours = explain_images(trained, images, target=labels, **options)
    theirs = explain_images(randomised(trained), images, target=labels, **options)
    correlations = [rank_correlation(a.grid, b.grid) for a, b in zip(ours, theirs, strict=True)]
    signed = [
        rank_correlation(a.attribution, b.attribution) for a, b in zip(ours, theirs, strict=True)
    ]
    print(
        f"{name}/{level}/{method}: rank correlation trained vs randomised, maps "
        f"{np.round(correlations, 2)} (mean {np.mean(correlations):.2f}), signed "
        f"{np.round(signed, 2)} (mean {np.mean(signed):.2f})"
    )
    assert np.mean(correlations) < 0.5, correlations


def relative_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|a - b|_1 / (|a|_1 + |b|_1): 0 for equal maps, 1 for opposite or disjoint ones."""
    return float(np.abs(a - b).sum() / (np.abs(a).sum() + np.abs(b).sum()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,level", EXPLAINERS)
def test_the_map_changes_with_the_target_class(request, name, level, method):
    """On red- and blue-corner images, the maps for "red" and "blue" differ (signed: the soft-token
    maps of the tiny Gemma are near uniform whatever the class, their sign is what changes)."""
    classifier = request.getfixturevalue(name)
    images, _ = held_out(name, classes=(0, 1))
    options = {"level": level, "method": method}
    red = explain_images(classifier, images, target=[0] * len(images), **options)
    blue = explain_images(classifier, images, target=[1] * len(images), **options)
    signed = [
        relative_distance(a.attribution, b.attribution) for a, b in zip(red, blue, strict=True)
    ]
    grids = [np.abs(a.grid - b.grid).sum() for a, b in zip(red, blue, strict=True)]
    print(
        f"{name}/{level}/{method}: red vs blue map, signed relative L1 {np.round(signed, 2)} "
        f"(mean {np.mean(signed):.2f}), L1 of the maps {np.round(grids, 2)} "
        f"(mean {np.mean(grids):.2f} of 2)"
    )
    assert np.mean(signed) > 0.5, signed
    assert min(grids) > 0, grids


@pytest.mark.parametrize(
    "name,level,method",
    [
        ("siglip", "patches", "grad_x_input"),
        ("siglip", "patches", "integrated_gradients"),
        ("medgemma", "patches", "grad_x_input"),
    ],
)
def test_the_map_finds_the_region_that_carries_the_class(request, name, level, method):
    classifier = request.getfixturevalue(name)
    images, labels = held_out(name, classes=(0, 1))
    explanations = explain_images(classifier, images, level=level, method=method)
    accuracy = np.mean([e.predicted == y for e, y in zip(explanations, labels, strict=True)])
    assert accuracy == 1.0, "the tiny model did not learn the quadrant task"
    side = explanations[0].grid.shape[0]
    masses = [e.grid[: side // 2, : side // 2].sum() for e in explanations]
    print(
        f"{name}/{level}/{method}: map mass on the top-left quadrant {np.round(masses, 3)} "
        f"(mean {np.mean(masses):.2f})"
    )
    assert np.mean(masses) > 0.5, masses  # a quarter of the image; uniform would give 0.25


@pytest.mark.parametrize("name,level", [("siglip", "patches"), ("medgemma", "tokens")])
def test_integrated_gradients_add_up_to_the_change_of_log_odds(request, name, level):
    """Completeness: the attributions sum to log-odds(image) - log-odds(grey baseline)."""
    classifier = request.getfixturevalue(name)
    images, labels = held_out(name, n=3)
    options = {"level": level, "method": "integrated_gradients", "steps": 64}
    explanations = explain_images(classifier, images, target=labels, **options)
    for e in explanations:
        probs = e.probs[e.target]
        # the score is the log-odds: compared as a probability, since a confident model's float32
        # probability near 1 leaves too few digits of 1 - p to recompute its log-odds exactly
        assert np.isclose(1 / (1 + np.exp(-e.score)), probs, rtol=0, atol=1e-6)
        change = e.score - e.baseline_score
        assert abs(e.attribution.sum() - change) < 0.05 * abs(change) + 0.02, (e, change)
    (plain,) = explain_images(classifier, images[:1], target=labels[:1], level=level)
    assert plain.baseline_score is None and np.isclose(plain.score, explanations[0].score)


def test_overlay_png_and_record(siglip, tmp_path):
    images, labels = held_out("siglip", n=1)
    (explanation,) = explain_images(siglip, images)
    path = save_overlay(images[0], explanation, CLASSES, tmp_path / "a" / "x.png", labels[0])
    picture = Image.open(path)
    assert picture.format == "PNG" and picture.width > 640 and picture.height > 320
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["predicted_name"] == CLASSES[explanation.predicted]
    assert record["true_name"] == CLASSES[labels[0]] and record["level"] == "patches"
    assert np.isclose(np.sum(record["grid"]), 1.0)


def test_padded_images_get_the_map_of_their_part_of_the_square(tmp_path_factory):
    cfg = model_cfg(tiny_siglip_path(tmp_path_factory), freeze_encoder=True, resize="pad")
    probe = build(cfg, PROBE, FP32, CLASSES)
    wide = Image.new("RGB", (64, 32), (200, 120, 160))  # padded into rows 16..47 of 64
    (explanation,) = explain_images(probe, [wide])
    assert explanation.box == (0.0, 0.25, 1.0, 0.75)
    # all mass in the square's top band: only the image's top rows get heat, none at its bottom
    grid = np.zeros((4, 4))
    grid[1] = 0.25  # square rows 16..31, the image's top half
    heat = heatmap(Explanation(grid, grid, 0, 0, np.ones(3) / 3, explanation.box), (64, 32))
    assert heat.shape == (32, 64)
    assert heat[:8].mean() > 0.5 and heat[-4:].max() < 0.05


def test_a_map_without_positive_evidence_says_so_and_draws_no_wash(tmp_path_factory, tmp_path):
    """A probe whose head is all zeros: every class has the same log-odds whatever the image, so
    no cell is evidence for anything. The JSON and the picture say so; no uniform yellow wash."""
    cfg = model_cfg(tiny_siglip_path(tmp_path_factory), freeze_encoder=True)
    probe = build(cfg, PROBE, FP32, CLASSES)
    with torch.no_grad():
        probe.head.weight.zero_()
        probe.head.bias.zero_()
    images, labels = held_out("siglip", n=1)
    (explanation,) = explain_images(probe, images)
    assert not explanation.evidence
    path = save_overlay(images[0], explanation, CLASSES, tmp_path / "x.png", labels[0])
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["evidence"] is False and "no positive evidence for" in record["note"]
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    left, right = picture[:320, :320], picture[:320, -320:]  # image | gap | mapped image (320 px)
    assert np.abs(left - right).max() <= 1  # the mapped image is the image: nothing drawn
    assert "no positive evidence" in " ".join(caption(explanation, CLASSES))


def test_the_overlay_draws_a_colour_scale(siglip, tmp_path):
    images, _ = held_out("siglip", n=1)
    (explanation,) = explain_images(siglip, images)
    picture = np.asarray(
        Image.open(save_overlay(images[0], explanation, CLASSES, tmp_path / "x.png"))
    )
    band = picture[320:, :, :3].reshape(-1, 3).astype(int)  # the caption band under the images
    strongest = np.round(255 * (0.4 + 0.6 * RAMP[-1])).astype(int)  # the ramp's end over white
    assert (np.abs(band - strongest).max(axis=1) <= 3).sum() >= 3  # the scale's strongest end


def test_padding_is_kept_out_of_the_attribution_and_its_normalisation(tmp_path_factory):
    """A wide image padded into rows 16..47 of SigLIP's 64 x 64 square: the grid's top and bottom
    quarters are padding only; they get no attribution and no share of the map."""
    cfg = model_cfg(tiny_siglip_path(tmp_path_factory), freeze_encoder=False, resize="pad")
    probe = build(cfg, PROBE, FP32, CLASSES)
    fit(probe, quadrant_examples(24, seed=0, size=64), steps=10, lr=1e-3)
    rng = np.random.default_rng(3)
    wide = [quadrant_image(c, rng, 64).resize((64, 32)) for c in range(3)]
    for explanation in explain_images(probe, wide, method="grad_x_input"):
        assert explanation.box == (0.0, 0.25, 1.0, 0.75)
        side = explanation.grid.shape[0]
        padding = ~image_cells(side, explanation.box)
        assert padding[: side // 4].all() and padding[-(side // 4) :].all()
        assert not padding[side // 4 : -(side // 4)].any()
        assert not explanation.attribution[padding].any()
        assert explanation.grid[padding].sum() == 0 and np.isclose(explanation.grid.sum(), 1.0)
    assert image_cells(4, (0.0, 0.25, 1.0, 0.75))[:, 0].tolist() == [False, True, True, False]
