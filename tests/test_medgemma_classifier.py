"""MedGemma classifier on the tiny Gemma 3: label masking, loss, label scoring, generation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers.builders import build
from helpers.medgemma_toy import EVA4, classifier, examples, tiny_path
from transformers.modeling_layers import GradientCheckpointingLayer

from breakhis_ft.config import MedGemmaConfig, PeftConfig
from breakhis_ft.models.medgemma import MedGemmaClassifier


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_path(tmp_path_factory)


@pytest.fixture(scope="module")
def letters(tiny):
    return classifier(tiny, style="letters")


def decoded_labels(clf: MedGemmaClassifier, batch) -> list[str]:
    tok = clf.processor.tokenizer
    return [tok.decode(row[row != -100]) for row in batch["labels"]]


def test_answer_labels_are_exactly_the_answer_and_end_of_turn(tiny, letters):
    numbered = classifier(tiny, style="numbered")
    batch = numbered.collate(examples(4, seed=0), train=True)
    assert decoded_labels(numbered, batch) == [f"{i}<end_of_turn>" for i in range(4)]
    # letters: answers of different lengths, so rows have different lengths (right padding)
    batch = letters.collate(examples(4, seed=0), train=True)
    expected = [
        f"{k}: {n.replace('_', ' ')}<end_of_turn>" for k, n in zip("ABCD", EVA4, strict=True)
    ]
    assert decoded_labels(letters, batch) == expected
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) > 1
    eot = letters.end_of_turn_id
    for row, length in enumerate(lengths.tolist()):
        labelled = (batch["labels"][row] != -100).nonzero().flatten()
        # contiguous, ending at the end of turn, just before the template's final newline
        assert labelled.tolist() == list(range(labelled[0], labelled[-1] + 1))
        assert batch["input_ids"][row, labelled[-1]] == eot
        assert labelled[-1] == length - 2
        assert (batch["attention_mask"][row, length:] == 0).all()  # right padding
    assert batch["class_label"].tolist() == [0, 1, 2, 3]
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_token_type_ids_are_kept_and_padded(letters):
    batch = letters.collate(examples(4, seed=1), train=True)
    types = batch["token_type_ids"]
    assert types.shape == batch["input_ids"].shape
    assert (types.sum(dim=1) == 16).all()  # 16 image soft tokens per image
    assert (types[batch["attention_mask"] == 0] == 0).all()
    image_id = letters.processor.tokenizer.image_token_id
    assert torch.equal(types == 1, batch["input_ids"] == image_id)


def test_all_text_labels_mask_what_the_blog_collator_masked(tiny):
    """The notebook: labels -100 on padding, <start_of_image> and the image soft tokens only,
    on the templated text `.strip()`ped (no final newline)."""
    clf = classifier(tiny, loss_on="all_text")
    batch = clf.collate(examples(3, seed=0), train=True)
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    tok = clf.processor.tokenizer
    masked = (ids == tok.image_token_id) | (ids == tok.boi_token_id)
    assert torch.equal(labels != -100, (mask == 1) & ~masked)
    text = decoded_labels(clf, batch)[0]
    assert "Analyze this breast tissue" in text and text.endswith("0<end_of_turn>")
    assert text.startswith("<bos>") and "<end_of_image>" in text
    assert "<image_soft_token>" not in text and "<start_of_image>" not in text


def test_loss_equals_the_models_own_causal_lm_loss(letters):
    batch = letters.collate(examples(4, seed=2), train=True)
    ours = letters.loss(batch)
    reference = letters.model(
        **{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")},
        labels=batch["labels"],
    ).loss
    assert torch.allclose(ours, reference, atol=1e-5)


def test_predict_proba_sums_to_one_and_needs_a_prompt_batch(letters):
    batch = letters.collate(examples(5, seed=3), train=False)
    assert "labels" not in batch
    probs = letters.predict_proba(batch)
    assert probs.shape == (5, 4)
    assert torch.allclose(probs.sum(dim=1), torch.ones(5), atol=1e-5)
    with pytest.raises(ValueError, match="train=False"):
        letters.predict_proba(letters.collate(examples(2, seed=3), train=True))


def mixed_length_batch(clf: MedGemmaClassifier, long_prompt: str, exs) -> dict:
    """A right-padded batch whose rows have different lengths (first row: a longer prompt)."""
    texts = [long_prompt] + [clf.prompt_text] * (len(exs) - 1)
    batch = dict(
        clf.processor(
            text=texts,
            images=[[e["image"]] for e in exs],
            return_tensors="pt",
            padding=True,
            padding_side="right",
            add_special_tokens=False,
        )
    )
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths[0] > lengths[1]
    return batch


def score_rows_alone(clf: MedGemmaClassifier, batch) -> torch.Tensor:
    rows = []
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        single = {k: v[row : row + 1, :n] for k, v in batch.items() if k != "pixel_values"}
        single["pixel_values"] = batch["pixel_values"][row : row + 1]
        rows.append(clf.predict_proba(single))
    return torch.cat(rows)


@pytest.mark.parametrize("scoring", ["first_token", "sequence"])
def test_scoring_reads_each_rows_last_real_token_under_right_padding(tiny, scoring):
    clf = classifier(tiny, style="letters")
    clf.scoring = scoring
    longer = dataclasses.replace(clf.prompt, system="You are an expert pathologist.")
    long_text = clf.processor.apply_chat_template(
        longer.messages(), add_generation_prompt=True, tokenize=False
    )
    batch = mixed_length_batch(clf, long_text, examples(3, seed=4))
    batched = clf.predict_proba(batch)
    assert torch.allclose(batched.sum(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(batched, score_rows_alone(clf, batch), atol=1e-5)
    if scoring == "first_token":
        # what reading the last column would give for the short rows: not the same thing
        hidden = clf.hidden_states(batch)
        first = [ids[0] for ids in clf.answer_ids]
        naive = clf.core.lm_head(hidden[:, -1]).float()[:, first].softmax(dim=-1)
        assert not torch.allclose(naive[1:], batched[1:], atol=1e-3)


def test_sequence_scoring_is_the_answers_log_likelihood(letters):
    exs = examples(4, seed=5)
    letters.scoring = "sequence"
    try:
        scores = letters._sequence_scores(letters.collate(exs, train=False))
    finally:
        letters.scoring = "auto"
    train = letters.collate(exs, train=True)
    n_tokens = (train["labels"] != -100).sum(dim=1)
    for row in range(4):
        one = {k: v[row : row + 1] for k, v in train.items()}
        nll = letters.loss(one) * n_tokens[row]
        assert torch.allclose(scores[row, row], -nll, atol=1e-4)


def test_frozen_vision_runs_without_autograd_even_with_checkpointing(tiny):
    clf = classifier(tiny, target_modules="language_model")
    clf.enable_gradient_checkpointing()
    clf.train()
    tower = clf.core.model.vision_tower
    vision_layers = [m for m in tower.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert vision_layers and not any(layer.gradient_checkpointing for layer in vision_layers)
    assert all(layer.gradient_checkpointing for layer in clf.core.model.language_model.layers)
    batch = clf.collate(examples(2, seed=6), train=True)
    assert not clf.image_features(batch["pixel_values"]).requires_grad
    clf.loss(batch).backward()
    lora = [p for n, p in clf.named_parameters() if "lora_A" in n]
    assert lora and all(p.grad is not None for p in lora)
    # the vision tower's LoRA (all-linear) needs autograd through it, and gets it
    everything = classifier(tiny, target_modules="all-linear")
    assert everything.vision_trainable
    everything.loss(everything.collate(examples(2, seed=6), train=True)).backward()
    vision_lora = [
        p for n, p in everything.named_parameters() if "vision_tower" in n and "lora_B" in n
    ]
    assert vision_lora and all(p.grad is not None for p in vision_lora)


def test_generation_left_pads_and_unparseable_answers_are_minus_one(tiny):
    clf = classifier(tiny, style="letters")
    long_text = clf.processor.apply_chat_template(
        dataclasses.replace(clf.prompt, system="Be brief.").messages(),
        add_generation_prompt=True,
        tokenize=False,
    )
    batch = mixed_length_batch(clf, long_text, examples(2, seed=7))
    answers = clf.generate_answers(batch, max_new_tokens=3)
    alone = []
    for row in range(2):
        n = int(batch["attention_mask"][row].sum())
        single = {k: v[row : row + 1, :n] for k, v in batch.items() if k != "pixel_values"}
        single["pixel_values"] = batch["pixel_values"][row : row + 1]
        alone += clf.generate_answers(single, max_new_tokens=3)
    assert answers == alone
    assert clf.parse_answers(["C: fibroadenoma", "###"]).tolist() == [2, -1]


def test_bf16_weights_train_and_score(tiny):
    model_cfg = MedGemmaConfig(name_or_path=str(tiny), max_new_tokens=3)
    clf = build(model_cfg, PeftConfig(), "bf16", EVA4)
    assert clf.core.dtype == torch.bfloat16 and clf.max_new_tokens == 3
    loss = clf.loss(clf.collate(examples(2, seed=8), train=True))
    assert torch.isfinite(loss)
    loss.backward()
    probs = clf.predict_proba(clf.collate(examples(2, seed=8), train=False))
    assert probs.dtype == torch.float32
    assert torch.allclose(probs.sum(dim=1), torch.ones(2), atol=1e-5)


def test_class_weights_weigh_each_example_by_its_class(letters):
    batch = letters.collate(examples(4, seed=9), train=True)
    per_example = torch.stack(
        [letters.loss({k: v[i : i + 1] for k, v in batch.items()}) for i in range(4)]
    )
    n_tokens = (batch["labels"] != -100).sum(dim=1).float()
    weights = torch.tensor([1.0, 3.0, 0.5, 2.0])
    row_w = weights[batch["class_label"]] * n_tokens
    expected = (row_w * per_example).sum() / row_w.sum()
    assert torch.allclose(letters.loss(batch, class_weights=weights), expected, atol=1e-5)
    assert torch.allclose(letters.loss(batch, class_weights=torch.ones(4)), letters.loss(batch))
