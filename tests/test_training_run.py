"""The model half of a run as one object: `TrainingRun` resolves its parts once, in pipeline order,
checks the device as it is set up, and closes what it opened whatever happens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from helpers.cli_runs import FAST
from test_entrypoint import compose_train

from breakhis_ft.errors import DeviceError, StainFitError
from breakhis_ft.models.medgemma import MedGemmaClassifier
from breakhis_ft.models.precision import Precision
from breakhis_ft.run import setup
from breakhis_ft.run.experiment import prepare_data
from breakhis_ft.run.tracking import RunTracker
from breakhis_ft.run.training_run import TrackedJob, TrainingRun

JOB = TrackedJob(config={}, name="run", group="group")


def tiny_config(*overrides: str):
    """The tiny MedGemma run of the entrypoint tests, W&B off."""
    return compose_train(["logger=none", *FAST, *overrides])


@pytest.fixture(scope="module")
def prepared(module_cache, tmp_path_factory):
    """(scan, splits) of the tiny replica, as the experiment prepares them."""
    return prepare_data(tiny_config(), tmp_path_factory.mktemp("data"))


def released() -> bool:
    """Whether accelerate's process-wide state was reset (the next run builds its own)."""
    return not AcceleratorState._shared_state


def test_the_run_is_resolved_once_into_typed_parts(prepared, tmp_path: Path) -> None:
    scan, splits = prepared
    cfg = tiny_config()
    with TrainingRun(cfg, tmp_path, scan, splits, JOB) as run:
        assert run.precision == Precision.of("fp32")
        assert run.accelerator.mixed_precision == "no" and run.main
        assert run.stain is None  # data.stain_norm=none
        assert (
            isinstance(run.classifier, MedGemmaClassifier) and run.classifier.eval_mode == "score"
        )
        assert set(run.datasets) == {"train", "val", "test"}
        assert len(run.datasets["test"]) == len(splits["test"])
        assert run.evaluation.batch_size == 32 and run.evaluation.max_batches is None
        assert run.recipe_settings.trainer.max_steps == 4 and run.recipe_settings.seed == cfg.seed
        assert run.recipe is None  # fit() builds it
        assert not released()
    assert released()
    run.close()  # closing twice does nothing


def test_a_setup_that_fails_closes_what_it_opened(prepared, tmp_path: Path, monkeypatch) -> None:
    scan, splits = prepared
    finished: list[bool] = []
    monkeypatch.setattr(RunTracker, "finish", lambda self, failed=False: finished.append(failed))
    cfg = tiny_config("data.stain_norm=macenko")  # fitted to training images: there are none
    with pytest.raises(StainFitError, match="data.stain_reference=train: the training split"):
        TrainingRun(cfg, tmp_path, scan, {**splits, "train": []}, JOB)
    assert finished == [True] and released()


def test_the_device_is_checked_before_anything_is_built(prepared, tmp_path, monkeypatch) -> None:
    scan, splits = prepared
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)

    def built(*args, **kwargs):
        raise AssertionError("nothing may be built on a device that cannot run the config")

    monkeypatch.setattr(setup, "build_classifier", built)
    monkeypatch.setattr(setup, "fit_stain_normalizer", built)
    cfg = tiny_config("precision=bf16", "data.stain_norm=macenko")
    with pytest.raises(DeviceError, match="precision=bf16: this GPU has no bfloat16"):
        TrainingRun(cfg, tmp_path, scan, splits, JOB)
    assert not any(tmp_path.iterdir())  # no tracker file, no normaliser
    cfg.trainer.cpu = True  # the run computes on the CPU: bf16 is fine there
    assert setup.run_precision(cfg).dtype == torch.bfloat16


@pytest.mark.gpu
def test_a_tiny_run_trains_and_evaluates_on_the_gpu_in_bf16(prepared, tmp_path: Path) -> None:
    scan, splits = prepared
    cfg = tiny_config("precision=bf16", "trainer.max_steps=2", "evaluate.bootstrap_resamples=0")
    with TrainingRun(cfg, tmp_path, scan, splits, JOB) as run:
        assert run.accelerator.device.type == "cuda" and run.accelerator.mixed_precision == "bf16"
        assert run.precision.dtype == torch.bfloat16
        monitor, value, step = run.fit()
        assert run.classifier.device.type == "cuda" and step is not None and value is not None
        metrics = run.evaluate()
    assert set(metrics) == {"val", "test"} and metrics["test"]["n"] == len(splits["test"])
    assert (tmp_path / "predictions_test.csv").is_file() and (tmp_path / "best").is_dir()
