"""The training loop with a toy classifier: accumulation, best checkpoint, early stopping, Ctrl-C,
the non-finite stop, atomic checkpoints, pruning, class balancing."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.engine_toy import (
    ToyClassifier,
    ToyDataset,
    evaluate_dataset,
    fit,
    fresh_accelerator,
    trainer_config,
)
from safetensors.torch import load_file

from breakhis_ft.engine.checkpoint import (
    CheckpointManager,
    find_latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
)
from breakhis_ft.engine.recipe import TrainingRecipe
from breakhis_ft.engine.sampling import EpochSampler, inverse_frequency_weights
from breakhis_ft.errors import NonFiniteError

REAL_EVALUATE = TrainingRecipe.evaluate


def run(
    tmp_path,
    name="run",
    classifier=None,
    val=True,
    resume=False,
    log_fn=None,
    n=32,
    precision="fp32",
    **cfg,
):
    cfg = trainer_config(**cfg)
    classifier = classifier or ToyClassifier()
    acc = fresh_accelerator(cfg, precision)
    val_ds = ToyDataset(n=16, seed=1) if val else None
    result = fit(
        classifier, ToyDataset(n=n), val_ds, cfg, tmp_path / name, acc, log_fn, resume=resume
    )
    return classifier, result


def weights(classifier):
    return {k: v.clone() for k, v in classifier.trainable_state_dict().items()}


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    start = weights(ToyClassifier(dropout=0.0))
    small, _ = run(tmp_path, "acc", ToyClassifier(dropout=0.0), False, batch_size=2, grad_accum=4,
                   max_steps=1)  # fmt: skip
    big, _ = run(tmp_path, "big", ToyClassifier(dropout=0.0), False, batch_size=8, grad_accum=1,
                 max_steps=1)  # fmt: skip
    a, b = weights(small), weights(big)
    assert any(not torch.equal(a[k], start[k]) for k in a), "the update changed nothing"
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_training_learns_and_best_checkpoint_reloads(tmp_path):
    logged = []
    clf, result = run(tmp_path, log_fn=lambda m, s: logged.append((s, m)), epochs=3,
                      eval_every_steps=5)  # fmt: skip
    assert result.global_step == 24 and not result.stopped_early
    values = [h["val/balanced_accuracy"] for h in result.history]
    assert [h["step"] for h in result.history] == [5, 10, 15, 20, 24]  # and the final step
    assert result.best_value == max(values) and result.best_value > 0.5  # chance is 0.25
    assert result.best_step == result.history[values.index(max(values))]["step"]
    fresh = ToyClassifier()
    fresh.load_trained(result.best_dir)
    again = evaluate_dataset(
        fresh, ToyDataset(n=16, seed=1), fresh_accelerator(trainer_config()), 8
    )
    assert again["balanced_accuracy"] == result.best_value
    info = json.loads((result.best_dir / "best.json").read_text())
    assert info["step"] == result.best_step and info["value"] == result.best_value
    train_logs = [m for _, m in logged if "train/loss" in m]
    assert len(train_logs) == 24
    assert {"train/loss", "train/lr", "train/images_per_s", "train/epoch"} <= set(train_logs[0])
    assert any("val/patient_recognition_rate" in m and "val/binary/auroc" in m for _, m in logged)


def scripted_evaluations(monkeypatch, values):
    """Replace validation by scripted balanced accuracies; snapshot the weights at each call."""
    snapshots = []

    def fake(recipe):
        snapshots.append(weights(recipe.classifier))
        return {"balanced_accuracy": values[len(snapshots) - 1], "accuracy": 0.0}

    def evaluate(recipe):  # the recipe's own bookkeeping, on scripted metrics
        # one uniform prediction: evaluate computes val/class_nll from it (log 4), the rest scripted
        uniform = (torch.full((1, 4), 0.25), torch.zeros(1, dtype=torch.long), torch.zeros(1))
        monkeypatch.setattr(recipe, "predict", lambda ds, bs, **_: uniform)
        monkeypatch.setattr(recipe, "metrics_fn", lambda *a: fake(recipe))
        REAL_EVALUATE(recipe)

    monkeypatch.setattr(TrainingRecipe, "evaluate", evaluate)
    return snapshots


def test_best_checkpoint_is_the_best_evaluation(tmp_path, monkeypatch):
    snaps = scripted_evaluations(monkeypatch, [0.3, 0.6, 0.5, 0.4, 0.55, 0.2])
    _, result = run(tmp_path, n=16, epochs=3, eval_every_steps=2)
    assert result.best_step == 4 and result.best_value == 0.6
    saved = load_file(str(result.best_dir / "trainable.safetensors"))
    for k, v in snaps[1].items():
        assert torch.equal(saved[k], v)
    assert any(not torch.equal(saved[k], snaps[-1][k]) for k in saved)


def test_early_stopping_and_min_mode(tmp_path, monkeypatch):
    scripted_evaluations(monkeypatch, [0.3, 0.6, 0.5, 0.4, 0.9, 0.9])
    _, result = run(tmp_path, "max", n=16, epochs=3, eval_every_steps=2, early_stopping_patience=2)
    assert result.stopped_early and result.global_step == 8 and result.best_step == 4
    assert find_latest_checkpoint(tmp_path / "max").name == "step_000008"
    scripted_evaluations(monkeypatch, [0.3, 0.6, 0.5, 0.4, 0.9, 0.9])
    _, result = run(tmp_path, "min", n=16, epochs=3, eval_every_steps=2, monitor_mode="min")
    assert result.best_value == 0.3 and result.best_step == 2 and not result.stopped_early
    assert result.global_step == 12


def test_ctrl_c_saves_then_resume_equals_uninterrupted(tmp_path):
    reference, _ = run(tmp_path, "ref", epochs=2)
    clf = ToyClassifier()
    clf.interrupt_at = 7  # during the 7th batch: 6 updates done
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "cut", clf, epochs=2)
    latest = find_latest_checkpoint(tmp_path / "cut")
    assert latest.name == "step_000006"
    assert read_trainer_state(latest)["batch_in_epoch"] == 6
    resumed, result = run(tmp_path, "cut", ToyClassifier(seed=123), resume=True, epochs=2)
    assert result.global_step == 16
    a, b = weights(reference), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: accelerate's CPU autocast
def test_nonfinite_loss_stops_with_failed_marker(tmp_path, precision):
    clf = ToyClassifier()
    clf.inf_loss_at = 6
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at training step 6"):
        run(tmp_path, classifier=clf, checkpoint_every_steps=2, precision=precision)
    failed = (tmp_path / "run" / "FAILED").read_text()
    assert "training step 6" in failed and "step_000004" in failed
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4]
    # the last good checkpoint loads and training continues from it
    _, result = run(tmp_path, resume=True, checkpoint_every_steps=2, precision=precision)
    assert result.global_step == 16 and not (tmp_path / "run" / "FAILED").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_gradient_names_the_parameter(tmp_path, precision):
    clf = ToyClassifier()
    clf.nan_grad_at = 3
    with pytest.raises(NonFiniteError, match=r"gradient .* step 3 .*'conv.weight'"):
        run(tmp_path, classifier=clf, precision=precision)
    assert (tmp_path / "run" / "FAILED").is_file()


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    saves = []
    original = CheckpointManager.save

    def crashing(self, step, state):
        saves.append(step)
        if len(saves) == 2:  # the second save dies half-way: one file written, no state, no rename
            tmp = self.run_dir / "checkpoints" / f".tmp-step_{step:06d}"
            tmp.mkdir(parents=True)
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise OSError("disk full")
        return original(self, step, state)

    monkeypatch.setattr(CheckpointManager, "save", crashing)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, val=False, checkpoint_every_steps=2)
    assert find_latest_checkpoint(tmp_path / "run").name == "step_000002"
    monkeypatch.setattr(CheckpointManager, "save", original)
    _, result = run(tmp_path, val=False, resume=True, checkpoint_every_steps=2)
    assert result.global_step == 16
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_checkpoints_are_pruned_and_hold_only_trainable_weights(tmp_path):
    clf = ToyClassifier()
    clf.conv.requires_grad_(False)
    run(tmp_path, classifier=clf, val=False, max_steps=5, checkpoint_every_steps=1)
    found = list_checkpoints(tmp_path / "run")
    assert [s for s, _ in found] == [4, 5]
    keys = set(load_file(str(found[-1][1] / "model.safetensors")))
    assert keys == set(clf.trainable_state_dict()) and "conv.weight" not in keys
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json"} <= {
        p.name for p in found[-1][1].iterdir()
    }


def test_dataset_epochs_and_class_weights(tmp_path, monkeypatch):
    seen = []
    clf = ToyClassifier()
    original = clf.loss

    def spy(batch, class_weights=None):
        seen.append(class_weights)
        return original(batch, class_weights=class_weights)

    monkeypatch.setattr(clf, "loss", spy)
    ds = ToyDataset(n=32)
    ds.labels = [0] * 20 + [1] * 4 + [2] * 4 + [3] * 4
    cfg = trainer_config(class_weighting="inverse_frequency", epochs=2)
    fit(clf, ds, None, cfg, tmp_path / "w", fresh_accelerator(cfg))
    # set_epoch may be repeated (accelerate's loader calls it too): epochs in order, both seen
    assert set(ds.epochs_seen) == {0, 1} and ds.epochs_seen == sorted(ds.epochs_seen)
    expected = inverse_frequency_weights(ds.labels, 4)
    torch.testing.assert_close(expected, torch.tensor([32 / 80, 2.0, 2.0, 2.0]))
    assert all(torch.equal(w, expected) for w in seen)


def test_class_weighting_needs_the_classifier_to_accept_it(tmp_path):
    class NoWeights(ToyClassifier):
        def loss(self, batch):
            return super().loss(batch)

    with pytest.raises(TypeError, match="class_weighting"):
        run(tmp_path, classifier=NoWeights(), class_weighting="inverse_frequency")


def test_epoch_sampler_is_seeded_and_balances():
    labels = [0] * 900 + [1] * 100
    sampler = EpochSampler(labels, seed=3, balanced=True)
    first = list(sampler)
    assert first == list(sampler)  # replayable
    sampler.set_epoch(1)
    assert first != list(sampler)
    share = sum(labels[i] for i in first) / len(first)
    assert 0.4 < share < 0.6
    shuffled = EpochSampler(labels, seed=3)
    assert sorted(shuffled) == list(range(1000))


def test_bf16_autocast_runs_on_cpu(tmp_path):
    cfg = trainer_config(max_steps=2)
    acc = fresh_accelerator(cfg, precision="bf16")
    assert acc.mixed_precision == "bf16"
    result = fit(ToyClassifier(), ToyDataset(n=16), None, cfg, tmp_path / "bf16", acc)
    assert result.global_step == 2
