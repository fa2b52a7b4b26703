"""A bounded stop: SIGTERM mid-accumulation and mid-evaluation stops at the next batch, saves the
last completed update, and resume equals the uninterrupted run; checkpoints by time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.engine_toy import (
    ToyClassifier,
    ToyDataset,
    fit,
    fresh_accelerator,
    toy_metrics,
    trainer_config,
)

from breakhis_ft.engine.checkpoint import list_checkpoints, read_trainer_state
from breakhis_ft.engine.optim import adamw
from breakhis_ft.engine.recipe import RecipeSettings, TrainingRecipe
from breakhis_ft.engine.stop import RunInterrupted

# 32 training images, batches of 4, 4 micro-batches an update: 2 updates an epoch, 4 in all
ACCUM = {"epochs": 2, "grad_accum": 4}
# the files of a checkpoint that hold the training state (trainer_state.json aside)
STATE_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def train(run_dir: Path, classifier: ToyClassifier, resume: bool = False, **cfg):
    """The toy run (validation on 16 images) with this trainer config."""
    cfg = trainer_config(**cfg)
    val = ToyDataset(n=16, seed=1)
    acc = fresh_accelerator(cfg)
    return fit(classifier, ToyDataset(n=32), val, cfg, run_dir, acc, resume=resume)


def weights(classifier: ToyClassifier) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in classifier.trainable_state_dict().items()}


def assert_same_weights(a: ToyClassifier, b: ToyClassifier) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_mid_accumulation_saves_the_last_update_and_resume_is_exact(tmp_path):
    """SIGTERM during the 7th micro-batch (the 3rd of update 2): the run stops after that
    micro-batch, not at the end of the update; its checkpoint is byte for byte the one an
    uninterrupted run saves at step 1 (weights, optimizer, scheduler, RNG, loop state), and the
    resumed run ends with the uninterrupted run's weights and evaluations."""
    reference = ToyClassifier()
    ref = train(tmp_path / "ref", reference, checkpoint_every_steps=1, keep_checkpoints=0, **ACCUM)

    cut = ToyClassifier()
    cut.sigterm_at = 7
    with pytest.raises(RunInterrupted) as stopped:
        train(tmp_path / "cut", cut, **ACCUM)
    assert (stopped.value.signal_name, stopped.value.step) == ("SIGTERM", 1)
    assert cut.calls == 7, "the micro-batches after the signal ran (the update was finished)"
    (step, saved), *_ = list_checkpoints(tmp_path / "cut")
    assert step == 1 and len(list_checkpoints(tmp_path / "cut")) == 1
    uninterrupted = dict(list_checkpoints(tmp_path / "ref"))[1]
    for name in (*STATE_FILES, "trainer_state.json"):
        assert (saved / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert read_trainer_state(saved)["batch_in_epoch"] == 4

    resumed = ToyClassifier(seed=123)  # other initial weights: all must come from the checkpoint
    result = train(tmp_path / "cut", resumed, resume=True, **ACCUM)
    assert result.global_step == ref.global_step == 4
    assert_same_weights(reference, resumed)
    assert result.history == ref.history and result.best_step == ref.best_step


def test_sigterm_during_an_evaluation_stops_it_and_resume_evaluates_that_step(tmp_path):
    """SIGTERM during the 3rd of 8 batches of the first evaluation (after update 2, the end of
    epoch 0): the evaluation stops there; the checkpoint of step 2 says its evaluation is pending,
    resume runs it first, and the run ends as the uninterrupted one (history, best, weights)."""
    cfg = {**ACCUM, "eval_batch_size": 2}
    reference = ToyClassifier()
    ref = train(tmp_path / "ref", reference, **cfg)
    assert [h["step"] for h in ref.history] == [2, 4]

    cut = ToyClassifier()
    cut.sigterm_in_eval_at = 3
    with pytest.raises(RunInterrupted) as stopped:
        train(tmp_path / "cut", cut, **cfg)
    assert stopped.value.step == 2
    assert cut.proba_calls == 3, "the evaluation went on after the signal"
    state = read_trainer_state(list_checkpoints(tmp_path / "cut")[-1][1])
    assert state["global_step"] == 2 and state["eval_pending"] and state["history"] == []

    resumed = ToyClassifier(seed=123)
    result = train(tmp_path / "cut", resumed, resume=True, **cfg)
    assert result.history == ref.history
    assert (result.best_step, result.best_value) == (ref.best_step, ref.best_value)
    assert_same_weights(reference, resumed)
    assert not read_trainer_state(list_checkpoints(tmp_path / "cut")[-1][1])["eval_pending"]


def _timed_run(run_dir: Path, keep: int) -> list[int]:
    """16 updates (no validation) with a clock that moves 10 s per micro-batch and a checkpoint
    every half minute by time; the steps of the checkpoints left."""
    cfg = trainer_config(
        epochs=2, batch_size=4, checkpoint_every_minutes=0.5, keep_checkpoints=keep
    )
    classifier = ToyClassifier()
    settings = RecipeSettings(cfg, run_dir, adamw, toy_metrics, None, 42)
    recipe = TrainingRecipe(classifier, ToyDataset(n=32), None, fresh_accelerator(cfg), settings)
    recipe.clock = lambda: 10.0 * classifier.calls
    assert recipe.fit().global_step == 16
    return [step for step, _ in list_checkpoints(run_dir)]


def test_checkpoints_by_time_and_pruning(tmp_path):
    """30 s after the last checkpoint (3 updates here) a checkpoint is saved at the next update;
    the epoch's own checkpoint (step 8) restarts the count; keep_checkpoints prunes them too."""
    assert _timed_run(tmp_path / "all", keep=0) == [3, 6, 8, 11, 14, 16]
    assert _timed_run(tmp_path / "kept", keep=2) == [14, 16]
