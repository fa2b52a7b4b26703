"""Explanation heatmaps: which parts of an image made a trained classifier choose its class.

Method: gradient x input on the image tokens the classifier reads, for the target's log-odds.
- MedGemma, `level="tokens"` (default): the projected image soft tokens, the language model's
  input (256 = 16 x 16 at 896 px, each pooling 4 x 4 SigLIP patches; the tiny test model has
  4 x 4). `level="patches"`: the vision tower's patch embeddings (64 x 64 at 896 px), before
  the tower mixes the patches; it costs a backward pass through the tower.
- SigLIP (`SiglipClassifier`, any mode): the patch embeddings (the embeddings module's output,
  position embeddings included, before the transformer layers), image_size / patch_size a side.
  A linear probe, trained on cached pooled embeddings, is explained by running its encoder on the
  image and applying its head: the same probabilities (tested).
The score is the log-odds of the target, log P(target) - log P(not target), from the
probabilities the classifier reports (predict_proba's first-token or answer-likelihood scoring for
MedGemma, the head's softmax for SigLIP): evidence for the target against the other classes. Not
log P itself: its gradient is (1 - P) times smaller and vanishes in float32 for the confident
predictions a fine-tuned model makes (the tiny SigLIP's maps went uniform at P = 1.0).
Per token, the attribution is the sum over the hidden dimension of gradient x token (its
first-order contribution to the score); the map keeps the positive part (evidence for the target;
`sign="abs"` keeps magnitudes) normalised to sum 1. Where nothing is positive the map has no
evidence to show: `Explanation.evidence` is False, the grid uniform (it still sums to 1), and the
overlay and the JSON say so instead of drawing a uniform map at full strength. The positive
part, not the absolute value: with two classes the log-odds of one is minus the other's, so
absolute values would give both classes the same map.

`method="integrated_gradients"` averages the gradient along the straight path from a grey image
(the processor's mean colour: pixel values 0) over `steps` points and multiplies by the
difference of the inputs; its attributions add up to log-odds(image) - log-odds(grey) (tested).
It is `steps` times dearer, and its map depends on the baseline: on the test task it finds the
region on every SigLIP image, but gives MedGemma's red-corner images only ~30 % on the corner,
because their pink background, grey's opposite, also reads as red. Gradient x input is the
default.

Why not attention rollout: attention from the answer position, aggregated over layers, ignores the
value vectors, the MLPs and the residual stream, and is the same whatever class is asked about (it
cannot pass the class-sensitivity check); Gemma 3's image tokens also attend to each other
bidirectionally, outside rollout's assumptions. Gradient x input costs one forward and one
backward pass per batch, is class specific, and is among the methods that pass Adebayo et al.
(2018)'s model-randomisation check (guided backpropagation and similar do not); plain autograd,
no extra dependency (captum's InputXGradient / IntegratedGradients would compute the same).

The overlay puts the map, bilinearly upsampled, on the image the caller gives: MedGemma's processor
stretches every image to its square input, a SigLIP classifier stretches or pads (`model.resize`);
`Explanation.box` is the image's place in that square, so the map lines up either way. A padded
image's padding is no part of it: the grid cells that lie wholly in the padding get attribution 0
and no share of the normalisation (`image_cells`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from breakhis_ft.models.base import Classifier
from breakhis_ft.models.medgemma import MedGemmaClassifier
from breakhis_ft.models.siglip import SiglipClassifier

SIGNS = ("positive", "abs")
LEVELS = ("tokens", "patches")  # MedGemma: soft tokens or vision patch embeddings
METHODS = ("grad_x_input", "integrated_gradients")
FULL_BOX = (0.0, 0.0, 1.0, 1.0)
NO_EVIDENCE = "no positive evidence for {target} anywhere in the image: no map to show"


@dataclass
class Explanation:
    """One image's explanation: the map and what the classifier said.

    grid: (side, side) float64, non-negative, sums to 1 (row 0 is the top of the image); 0 on
        cells wholly in padding; uniform over the image's cells when `evidence` is False.
    attribution: the same grid before the sign and normalisation (signed, in log-odds units; 0
        on cells wholly in padding).
    target: the class the map explains; predicted: the classifier's class; probs: (n_classes,).
    box: (left, top, right, bottom), fractions of the model's square input that the image fills.
    level: what the grid covers: "tokens" (MedGemma's soft tokens) or "patches" (vision patches).
    method: "grad_x_input" or "integrated_gradients".
    score: the target's log-odds, log P(target) - log P(not target), the quantity attributed.
    baseline_score: integrated gradients only: the log-odds at the grey baseline image; the
        attributions add up to score - baseline_score (up to the path integral's error).
    evidence: whether any cell of the image holds positive evidence for the target (for
        sign="abs": any non-zero attribution); False: no map to show.
    """

    grid: np.ndarray
    attribution: np.ndarray
    target: int
    predicted: int
    probs: np.ndarray
    box: tuple[float, float, float, float] = FULL_BOX
    level: str = "patches"
    method: str = "grad_x_input"
    score: float = math.nan
    baseline_score: float | None = None
    evidence: bool = True

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """A JSON-ready record (class names added when given)."""
        out: dict[str, Any] = {
            "method": self.method,
            "level": self.level,
            "score": self.score,
            "baseline_score": self.baseline_score,
            "target": self.target,
            "predicted": self.predicted,
            "probs": [float(p) for p in self.probs],
            "box": list(self.box),
            "evidence": self.evidence,
            "grid": self.grid.tolist(),
            "attribution": self.attribution.tolist(),
        }
        if not self.evidence:
            target = class_names[self.target] if class_names is not None else self.target
            out["note"] = NO_EVIDENCE.format(target=target)
        if class_names is not None:
            out["target_name"] = class_names[self.target]
            out["predicted_name"] = class_names[self.predicted]
            out["class_names"] = list(class_names)
        return out


# ---- attribution --------------------------------------------------------------------------------


def grid_side(n_tokens: int) -> int:
    """The side of the square grid of `n_tokens` image tokens."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} image tokens do not form a square grid")
    return side


def _kept(attribution: np.ndarray, sign: str, cells: np.ndarray | None) -> np.ndarray:
    """The positive part (or absolute value) of a signed map, 0 outside `cells`."""
    if sign not in SIGNS:
        raise ValueError(f"sign: got {sign!r}, allowed: {', '.join(SIGNS)}")
    kept = np.clip(attribution, 0, None) if sign == "positive" else np.abs(attribution)
    kept = kept.astype(np.float64)
    return kept if cells is None else np.where(cells, kept, 0.0)


def has_evidence(
    attribution: np.ndarray, sign: str = "positive", cells: np.ndarray | None = None
) -> bool:
    """Whether the map keeps anything (a positive part, for sign="abs" a non-zero) in `cells`."""
    total = _kept(attribution, sign, cells).sum()
    return bool(np.isfinite(total) and total > 0)


def normalise(
    attribution: np.ndarray, sign: str = "positive", cells: np.ndarray | None = None
) -> np.ndarray:
    """Positive part (or absolute value) of a signed map over `cells` (default: all; 0 on the
    others), scaled to sum 1; uniform over them when it keeps nothing (`has_evidence`)."""
    kept = _kept(attribution, sign, cells)
    if not has_evidence(attribution, sign, cells):
        inside = np.ones(kept.shape, dtype=bool) if cells is None else cells
        return inside / inside.sum()
    return kept / kept.sum()


def image_cells(side: int, box: tuple[float, ...]) -> np.ndarray:
    """(side, side) bool: the grid cells that overlap the image's `box` in the square input (a
    padded image's padding rows or columns are False)."""
    left, top, right, bottom = box
    edges = np.arange(side + 1) / side
    eps = 1e-9
    rows = (edges[1:] > top + eps) & (edges[:-1] < bottom - eps)
    columns = (edges[1:] > left + eps) & (edges[:-1] < right - eps)
    return rows[:, None] & columns[None, :]


def patch_embeddings_module(encoder: torch.nn.Module) -> torch.nn.Module:
    """The SigLIP vision embeddings module (patches + positions) inside `encoder` (peft or not)."""
    for module in encoder.modules():
        if type(module).__name__.endswith("VisionEmbeddings"):
            return module
    raise TypeError(f"no vision embeddings module in {type(encoder).__name__}")


@contextmanager
def _replaced_output(module: torch.nn.Module, value: torch.Tensor) -> Iterator[None]:
    """While open, `module` returns `value` (the attributed input) instead of its own output."""
    handle = module.register_forward_hook(lambda *_: value)
    try:
        yield
    finally:
        handle.remove()


def log_odds(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log P(target) - log P(not target) per row, from class scores or log-probabilities (B, C)."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    others = scores.masked_fill(
        torch.nn.functional.one_hot(target, scores.shape[1]).bool(), float("-inf")
    )
    return scores[rows, target] - others.logsumexp(dim=1)


class _Scorer:
    """A classifier seen as f(X): the attributed input X (B, N, D) of a batch of images -> log P.

    `pixel_values` are the images' model inputs; the baseline image is all zeros there, the
    processor's mean colour (grey), whose X is `inputs(zeros)`.
    """

    pixel_values: torch.Tensor
    level: str

    def inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """X of some pixel values, without autograd."""
        raise NotImplementedError

    def log_probs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The classifier's log-probabilities (B, C), float32, with X = `inputs`."""
        raise NotImplementedError


class _SiglipScorer(_Scorer):
    """X: the encoder's patch embeddings (position embeddings added)."""

    def __init__(self, classifier: SiglipClassifier, images: Sequence[Image.Image]) -> None:
        self.classifier = classifier
        self.level = "patches"
        self.embeddings = patch_embeddings_module(classifier.encoder)
        weight = next(classifier.encoder.parameters())
        self.pixel_values = classifier.preprocessor(images).to(weight.device, weight.dtype)

    @torch.no_grad()
    def inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embeddings(pixel_values)

    def log_probs(self, inputs: torch.Tensor) -> torch.Tensor:
        # without "embeddings" the batch runs through the encoder, whatever the mode (probe too)
        with _replaced_output(self.embeddings, inputs):
            logits = self.classifier.logits({"pixel_values": self.pixel_values})
        return logits.log_softmax(dim=-1)


class _MedGemmaScorer(_Scorer):
    """X: the projected soft tokens (level "tokens") or the vision tower's patch embeddings."""

    def __init__(
        self, classifier: MedGemmaClassifier, images: Sequence[Image.Image], level: str
    ) -> None:
        self.classifier = classifier
        self.level = level
        examples = [{"image": image, "label": 0, "index": i} for i, image in enumerate(images)]
        store, classifier.feature_store = classifier.feature_store, None  # pixels, not cache
        try:
            batch = classifier._to_device(classifier.collate(examples, train=False))
        finally:
            classifier.feature_store = store
        self.pixel_values = batch.pop("pixel_values").to(classifier.core.dtype)
        if self.pixel_values.shape[0] != len(images):
            raise ValueError("one image per prompt expected (pan and scan is not supported)")
        self.batch = batch
        self.embeddings = patch_embeddings_module(classifier.core.model.vision_tower)
        method = classifier.scoring
        if method == "auto":
            method = "first_token" if classifier.first_tokens_distinct else "sequence"
        self.scoring = method

    @torch.no_grad()
    def inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.level == "tokens":
            return self.classifier.image_features(pixel_values)
        return self.embeddings(pixel_values)

    def log_probs(self, inputs: torch.Tensor) -> torch.Tensor:
        clf = self.classifier
        features = inputs
        if self.level == "patches":
            with _replaced_output(self.embeddings, inputs):
                features = clf.core.model.get_image_features(self.pixel_values).pooler_output
        batch = {**self.batch, "image_features": features}
        if self.scoring == "sequence":
            return clf._sequence_scores(batch).log_softmax(dim=-1)
        # first_token, as MedGemmaClassifier.predict_proba
        hidden = clf.hidden_states(batch, features=features)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, clf.last_real_index(batch["attention_mask"])]
        first = torch.tensor([ids[0] for ids in clf.answer_ids], device=hidden.device)
        return clf.core.lm_head(last).float()[:, first].log_softmax(dim=-1)


def _scorer(classifier: Classifier, images: Sequence[Image.Image], level: str) -> _Scorer:
    if isinstance(classifier, MedGemmaClassifier):
        return _MedGemmaScorer(classifier, images, level)
    if isinstance(classifier, SiglipClassifier):
        return _SiglipScorer(classifier, images)
    raise TypeError(
        f"explanations need a MedGemmaClassifier or a SiglipClassifier, got "
        f"{type(classifier).__name__} (zero-shot SigLIP is not supported)"
    )


def _gradient(scorer: _Scorer, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d log-odds(target) / d X at X = `inputs`, (B, N, D); images are independent: one pass."""
    inputs = inputs.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_odds(scorer.log_probs(inputs), target).sum(), inputs)
    return grad


def attributions(
    scorer: _Scorer, target: torch.Tensor, method: str, steps: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token attributions (B, N), float32, by gradient x input or integrated gradients; and
    for the latter the target's log-odds at the baseline (B,) (None for gradient x input)."""
    inputs = scorer.inputs(scorer.pixel_values)
    if method == "grad_x_input":
        return (_gradient(scorer, inputs, target) * inputs).sum(dim=-1).float(), None
    baseline = scorer.inputs(torch.zeros_like(scorer.pixel_values))
    with torch.no_grad():
        baseline_score = log_odds(scorer.log_probs(baseline), target).float()
    total = torch.zeros_like(inputs, dtype=torch.float32)
    for step in range(steps):  # midpoint rule along the straight path baseline -> inputs
        alpha = (step + 0.5) / steps
        point = baseline + alpha * (inputs - baseline)
        total += _gradient(scorer, point, target).float()
    return ((inputs - baseline).float() * total / steps).sum(dim=-1), baseline_score


def _boxes(classifier: Classifier, images: Sequence[Image.Image]) -> list[tuple[float, ...]]:
    """Each image's place in the model's square input (a padding SigLIP centres it)."""
    if isinstance(classifier, SiglipClassifier) and classifier.preprocessor.resize not in (
        "pad",
        "stretch",
    ):
        raise ValueError(
            f"model.resize={classifier.preprocessor.resize}: the model saw a crop of each image, "
            "which the overlay cannot place yet; explain a run trained with pad or stretch"
        )
    if not isinstance(classifier, SiglipClassifier) or classifier.preprocessor.resize != "pad":
        return [FULL_BOX] * len(images)
    boxes = []
    for image in images:
        width, height = image.size
        side = max(width, height)
        left, top = (side - width) // 2, (side - height) // 2  # as SiglipPreprocessor.square
        boxes.append((left / side, top / side, (left + width) / side, (top + height) / side))
    return boxes


def _explain_batch(
    classifier: Classifier,
    images: Sequence[Image.Image],
    target: Sequence[int] | None,
    sign: str,
    level: str,
    method: str,
    steps: int,
) -> list[Explanation]:
    scorer = _scorer(classifier, images, level)
    with torch.no_grad():
        log_probs = scorer.log_probs(scorer.inputs(scorer.pixel_values))
    predicted = log_probs.argmax(dim=-1)
    wanted = predicted if target is None else torch.tensor(list(target), device=predicted.device)
    if wanted.min() < 0 or wanted.max() >= log_probs.shape[1]:
        raise ValueError(f"target classes must lie in 0..{log_probs.shape[1] - 1}")
    per_token, baseline = attributions(scorer, wanted, method, steps)
    per_token = per_token.cpu().numpy().astype(np.float64)
    side = grid_side(per_token.shape[1])
    probs = log_probs.float().exp().cpu().numpy().astype(np.float64)
    scores = log_odds(log_probs, wanted).float().cpu().tolist()
    baselines = [None] * len(images) if baseline is None else baseline.cpu().tolist()
    out = []
    for row, box in enumerate(_boxes(classifier, images)):
        cells = image_cells(side, box)  # a padded image: its padding kept out of the map
        # tokens are row-major over the image
        attribution = np.where(cells, per_token[row].reshape(side, side), 0.0)
        out.append(
            Explanation(
                grid=normalise(attribution, sign, cells),
                attribution=attribution,
                target=int(wanted[row]),
                predicted=int(predicted[row]),
                probs=probs[row],
                box=tuple(float(b) for b in box),  # type: ignore[arg-type]
                level=scorer.level,
                method=method,
                score=scores[row],
                baseline_score=baselines[row],
                evidence=has_evidence(attribution, sign, cells),
            )
        )
    return out


def explain_images(
    classifier: Classifier,
    images: list[Image.Image],
    target: list[int] | None = None,
    *,
    method: str = "grad_x_input",
    steps: int = 16,
    level: str = "tokens",
    sign: str = "positive",
    batch_size: int = 8,
) -> list[Explanation]:
    """Maps of `images` for the class `target[i]` (None: the predicted class).

    `method`: "grad_x_input" (one forward and backward pass per batch) or "integrated_gradients"
    (`steps` of them, along the path from a grey image). `level` (MedGemma only; a SigLIP
    classifier always maps its patches): "tokens", the soft tokens the language model reads
    (16 x 16 at 896 px), or "patches", the vision tower's patch embeddings (64 x 64; backward
    through the vision tower, so a smaller `batch_size` on the GPU). `sign`: "positive"
    (evidence for the target) or "abs".
    The images get the classifier's own preprocessing only: resize them as training did first
    (`resize_longest(image, data.image_size)`, as predict.py does). Runs on the classifier's
    device, in eval mode (restored afterwards); needs autograd (not under torch.inference_mode).
    """
    if target is not None and len(target) != len(images):
        raise ValueError(f"{len(target)} targets for {len(images)} images")
    for name, value, allowed in (("method", method, METHODS), ("level", level, LEVELS)):
        if value not in allowed:
            raise ValueError(f"{name}: got {value!r}, allowed: {', '.join(allowed)}")
    if sign not in SIGNS:
        raise ValueError(f"sign: got {sign!r}, allowed: {', '.join(SIGNS)}")
    if steps < 1:
        raise ValueError(f"steps: got {steps}, need at least 1")
    images = [image.convert("RGB") for image in images]
    was_training = classifier.training
    classifier.eval()
    out: list[Explanation] = []
    try:
        with torch.enable_grad():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                wanted = None if target is None else target[start : start + batch_size]
                out += _explain_batch(classifier, chunk, wanted, sign, level, method, steps)
    finally:
        classifier.train(was_training)
    return out
