"""Evaluation by generation: metrics of parsed answers (unparseable = wrong), checked against
sklearn as the blog notebook computed them; merging; compose-time rules of the new keys."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers.medgemma_toy import EVA4, classifier, examples, tiny_path
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from test_entrypoint import compose_train

from breakhis_ft.data.records import class_names
from breakhis_ft.errors import ConfigError
from breakhis_ft.evaluate.generation import (
    UNPARSEABLE,
    GeneratedAnswers,
    agreement,
    generation_metrics,
)
from breakhis_ft.validate import validate_config

CLASSES = class_names("subtype8")


def _answers(preds: list[int], labels: list[int]) -> GeneratedAnswers:
    return GeneratedAnswers(
        answers=[str(p) if p >= 0 else "no idea" for p in preds],
        preds=torch.tensor(preds),
        labels=torch.tensor(labels),
        indices=torch.arange(len(labels)),
    )


def _dataset(n: int, mags: tuple[int, ...] = (100,)) -> SimpleNamespace:
    records = [
        SimpleNamespace(patient=f"p{i % 5}", magnification=mags[i % len(mags)]) for i in range(n)
    ]
    return SimpleNamespace(records=records)


def test_generation_metrics_are_the_notebooks_with_unparseable_wrong() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = (torch.arange(64) % 8).tolist()
    preds = torch.randint(-1, 8, (64,), generator=gen).tolist()  # -1: unparseable
    preds[:8] = labels[:8]  # some right answers
    answers = _answers(preds, labels)
    m = generation_metrics(answers, _dataset(64), CLASSES)
    failures = preds.count(-1)
    assert failures > 0 and m["parse_failures"] == failures
    assert m["parse_failure_rate"] == pytest.approx(failures / 64)
    # what sklearn gives with the notebook's -1 predictions
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, preds))
    real = list(range(8))
    weighted = f1_score(labels, preds, labels=real, average="weighted", zero_division=0)
    macro = f1_score(labels, preds, labels=real, average="macro", zero_division=0)
    assert m["f1_weighted"] == pytest.approx(weighted)
    assert m["f1_macro"] == pytest.approx(macro)
    # binary as the notebook: p > 3 malignant, -1 never right
    right = [(p >= 0 and (p > 3) == (y > 3)) for p, y in zip(preds, labels, strict=True)]
    assert m["binary"]["accuracy"] == pytest.approx(sum(right) / 64)
    assert m["auroc_macro"] is None and m["binary"]["auroc"] is None
    assert m["classes"] == [*CLASSES, UNPARSEABLE] and UNPARSEABLE not in m["per_class"]
    assert [row[-1] for row in m["confusion_matrix"][:8]] == [
        sum(1 for p, y in zip(preds, labels, strict=True) if y == c and p < 0) for c in range(8)
    ]


def test_generation_metrics_by_magnification_and_agreement() -> None:
    labels = [0, 1, 2, 3, 4, 5, 6, 7] * 2
    preds = [0, 1, -1, 3, 4, 4, -1, 7] * 2
    m = generation_metrics(_answers(preds, labels), _dataset(16, (40, 400)), CLASSES)
    assert set(m["by_magnification"]) == {"40", "400"}
    assert sum(s["parse_failures"] for s in m["by_magnification"].values()) == 4
    scored = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0] * 2)
    assert agreement(scored, _answers(preds, labels)) == pytest.approx(8 / 16)


def test_merge_adapter_keeps_the_predictions(tmp_path_factory) -> None:
    clf = classifier(tiny_path(tmp_path_factory), EVA4)
    for name, param in clf.model.named_parameters():  # a trained-looking adapter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(1))
    batch = clf.collate(examples(4, seed=5), train=False)
    before = clf.predict_proba(batch)
    assert clf.merge_adapter() and not clf.merge_adapter()  # merged once, then nothing to merge
    assert not any("lora" in n for n, _ in clf.model.named_parameters())
    assert torch.allclose(clf.predict_proba(batch), before, atol=1e-5)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["trainer.eval_split=test"], "trainer.eval_split"),
        (
            ["trainer.eval_split=test", "trainer.select=last", "trainer.early_stopping_patience=3"],
            "trainer.eval_split",
        ),
        (["optimized_metric=test/balanced_accuracy"], "optimized_metric"),
        (["peft=qlora", "model.merge_for_eval=true"], "model.merge_for_eval"),
        (["model.prompt.style=letters", "model.prompt.parse=blog_regex"], "model.prompt.parse"),
    ],
)
def test_selection_on_test_and_misplaced_options_are_refused(override, key) -> None:
    cfg = compose_train(override)
    with pytest.raises(ConfigError, match=rf"config error: {key}"):
        validate_config(cfg)


def test_notebook_and_eva_presets_compose_with_their_settings() -> None:
    cfg = compose_train(["experiment=blog_notebook_100x", "data.root=/x"])
    validate_config(cfg)
    assert cfg.trainer.optimizer._target_ == "bitsandbytes.optim.PagedAdamW8bit"
    assert (cfg.trainer.eval_split, cfg.trainer.select, cfg.split.val_fraction) == (
        "test",
        "last",
        0.0,
    )
    assert cfg.data.duplicate_keep == "both" and not cfg.data.augment.flips
    assert (cfg.model.eval_mode, cfg.model.loss_on, cfg.model.prompt.class_names) == (
        "generate",
        "all_text",
        "blog",
    )
    # its draw of the balanced subset, its tokenisation, its evaluation batches (8 before, 4 after)
    assert (cfg.split.balance_draw, cfg.split.seed, cfg.model.add_special_tokens) == (
        "pandas",
        42,
        True,
    )
    baseline = compose_train(["experiment=blog_notebook_100x_baseline", "data.root=/x"])
    validate_config(baseline)
    assert (cfg.trainer.eval_batch_size, baseline.trainer.eval_batch_size) == (4, 8)
    assert cfg.train and not baseline.train and baseline.split == cfg.split
    corrected = compose_train(["experiment=blog_medgemma_100x", "data.root=/x"])
    assert (corrected.trainer.eval_split, corrected.trainer.select) == ("val", "best")
    assert corrected.data.duplicate_keep == "ductal_carcinoma"
    assert not corrected.model.add_special_tokens  # the template's <bos> only
    eva = compose_train(["experiment=eva_medsiglip_linear_probe", "data.root=/x"])
    validate_config(eva)
    assert (eva.trainer.lr, eva.trainer.batch_size, eva.trainer.max_steps) == (3e-4, 256, 12500)
    assert (eva.trainer.early_stopping_patience, eva.trainer.eval_every_steps) == (500, 0)
    assert eva.model.resize == "shorter_side_crop" and eva.trainer.weight_decay == 0.01


def test_8bit_optimizer_without_bitsandbytes_names_the_extra(monkeypatch) -> None:
    cfg = compose_train(["trainer/optimizer=paged_adamw_8bit"])
    validate_config(cfg)  # bitsandbytes is a dev dependency: present here
    monkeypatch.setattr("breakhis_ft.validate.bitsandbytes_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer.optimizer: .*breakhis-ft\[quant\]"):
        validate_config(cfg)


def test_generation_bypasses_the_feature_cache_and_matches_plain_answers(
    tmp_path_factory, tmp_path
) -> None:
    """A run that scores from cached vision features still generates from the images."""
    import numpy as np
    from accelerate import Accelerator
    from helpers.medgemma_toy import class_image
    from test_vision_cache import N_IMAGES, NO_AUGMENT, dataset, run_cfg

    from breakhis_ft.evaluate.generation import generate_split
    from breakhis_ft.models.vision_cache import configure_feature_cache

    tiny = tiny_path(tmp_path_factory)
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        class_image(i % 4, rng, size=40).save(tmp_path / f"img{i}.png")
    plain, cached = classifier(tiny), classifier(tiny)
    cfg = run_cfg(
        tmp_path / "features", tiny, **{f"data.augment.{k}": v for k, v in NO_AUGMENT.items()}
    )
    assert configure_feature_cache(cached, cfg)
    no_images = dataset(tmp_path, with_images=False)
    cached.prepare_cached_inputs([no_images], tmp_path)
    store = cached.feature_store
    acc = Accelerator(cpu=True)
    got = generate_split(cached, no_images, acc, batch_size=4)
    want = generate_split(plain, dataset(tmp_path, with_images=True), acc, batch_size=4)
    assert cached.feature_store is store and not cached.needs_images  # restored
    assert got.answers == want.answers and len(got.answers) == N_IMAGES
    assert torch.equal(got.preds, want.preds) and got.labels.tolist() == [0, 1, 2, 3, 0, 1]


def test_the_pandas_draw_needs_the_official_folds() -> None:
    overrides = ["split.balance_binary=1.0", "split.balance_draw=pandas"]  # split=patient
    cfg = compose_train(["experiment=demo", *overrides])
    with pytest.raises(ConfigError, match="config error: split.balance_draw"):
        validate_config(cfg)
