"""The debug presets' trainer keys (limit, profile), validation loss and gradient norm with the toy
classifier; `debug=fdr`, `--help`; slow: `debug=overfit` learns its batch, an Optuna search."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli_runs import FAST as ENTRY_FAST
from helpers.cli_runs import run_cli
from helpers.engine_toy import ToyClassifier, ToyDataset, evaluate_dataset, fit, fresh_accelerator
from helpers.engine_toy import trainer_config as toy_config
from test_entrypoint import CONF, compose_train

# test_entrypoint's small, fast data; evaluations of 8 images (fdr: one batch of them)
FAST = [a for a in ENTRY_FAST if not a.startswith(("trainer.max_steps", "trainer.eval_batch"))]
FAST.append("trainer.eval_batch_size=8")


def toy_run(tmp_path: Path, n: int = 32, val_n: int = 16, log=None, classifier=None, **cfg):
    """Fit the toy classifier on n examples, validating on val_n; (classifier, result, config)."""
    config = toy_config(**cfg)
    classifier = classifier or ToyClassifier(dropout=0.0)
    val = ToyDataset(n=val_n, seed=1)
    result = fit(classifier, ToyDataset(n=n), val, config, tmp_path, fresh_accelerator(config), log)
    return classifier, result, config


# ---- the trainer keys, with the toy classifier --------------------------------------------------


@pytest.mark.parametrize(("grad_accum", "updates"), [(1, 3), (2, 2)])
def test_limit_train_batches_ends_epochs_at_whole_updates(tmp_path, grad_accum, updates) -> None:
    # 32 examples at batch 4: 8 batches an epoch; 3 batches (rounded up to 4 with accumulation 2)
    _, result, _ = toy_run(tmp_path, epochs=2, limit_train_batches=3, grad_accum=grad_accum)
    assert result.global_step == 2 * updates
    assert [h["step"] for h in result.history] == [updates, 2 * updates]  # one eval an epoch
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_limit_eval_batches_predicts_the_first_examples_only(tmp_path) -> None:
    _, result, _ = toy_run(tmp_path, max_steps=2, limit_eval_batches=1, eval_batch_size=8)
    assert result.history[-1]["val/n"] == 8  # of 16


def test_val_class_nll_is_the_true_class_nll_and_grad_norm_is_before_clipping(tmp_path) -> None:
    logged: list[dict] = []
    clf, result, cfg = toy_run(
        tmp_path, log=lambda m, s: logged.append(m), max_steps=3, max_grad_norm=1e-4
    )
    probs, labels, _ = _predict(clf, cfg)
    nll = float(-probs[torch.arange(len(labels)), labels].log().mean())
    assert result.history[-1]["val/class_nll"] == pytest.approx(nll, rel=1e-5)
    norms = [m["train/grad_norm"] for m in logged if "train/grad_norm" in m]
    assert len(norms) == 3 and min(norms) > 100 * 1e-4  # the norm before clipping to 1e-4


def _predict(clf, cfg):
    from breakhis_ft.engine.predict import predict

    return predict(clf, ToyDataset(n=16, seed=1), fresh_accelerator(cfg), 8)


def test_profile_steps_write_a_trace_into_the_run_folder(tmp_path) -> None:
    toy_run(tmp_path, max_steps=5, profile_steps=2)
    traces = list((tmp_path / "profile").glob("trace_step*.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("ProfilerStep" in str(e.get("name")) for e in events)
    assert "Self CPU" in (tmp_path / "profile" / "operators.txt").read_text()


def test_final_metrics_agree_with_the_toy_evaluation(tmp_path) -> None:
    """The recipe's last evaluation is the final weights' (nothing else changed them)."""
    clf, result, cfg = toy_run(tmp_path, max_steps=2)
    again = evaluate_dataset(clf, ToyDataset(n=16, seed=1), fresh_accelerator(cfg), 8)
    assert result.history[-1]["val/balanced_accuracy"] == again["balanced_accuracy"]


# ---- the presets through the entrypoint ---------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "debug").glob("*.yaml")))
def test_every_debug_preset_composes_over_the_demo(preset: str) -> None:
    from breakhis_ft.engine.profiling import WAIT, WARMUP
    from breakhis_ft.validate import validate_config

    cfg = compose_train(["experiment=demo", f"debug={preset}"])
    validate_config(cfg)
    assert cfg.logger.mode == "disabled" and cfg.experiment_name == "demo"
    if cfg.trainer.profile_steps:  # enough updates for the profiler to record
        assert cfg.trainer.max_steps >= WAIT + WARMUP + cfg.trainer.profile_steps


def test_help_shows_the_app_groups_presets_and_past_runs(tmp_path) -> None:
    done = run_cli(["--help"], tmp_path / "cache", timeout=120)
    assert done.returncode == 0, done.stderr
    for text in (
        "breakhis-ft: fine-tune MedGemma",
        "rerun=RUN_DIR",
        "resume=RUN_DIR",
        "debug: default, fdr, limit, overfit, profile",
        "model: medgemma_4b_it, medsiglip_448, tiny_gemma3, tiny_siglip",
    ):
        assert text in done.stdout, text
    (searches,) = [line for line in done.stdout.splitlines() if line.startswith("hparams_search:")]
    assert {"lora_optuna", "lora_rank_lr"} <= set(searches.partition(": ")[2].split(", "))
    assert "Powered by Hydra" not in done.stdout  # not Hydra's bare default


@pytest.mark.slow
def test_debug_fdr_runs_the_pipeline_on_one_batch_each(tmp_path) -> None:
    done = run_cli(["model=tiny_gemma3", "debug=fdr", *FAST, f"paths.output_dir={tmp_path}"],
               tmp_path / "cache")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "debug" / "default").iterdir()  # debug runs apart from outputs/runs
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 1
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        rows = (run / f"predictions_{split}.csv").read_text().splitlines()[1:]
        assert len(rows) == metrics[split]["n"] == 8  # one eval batch
    assert not (run / "wandb").exists()  # W&B off in debug runs
    assert done.stdout.rstrip().endswith("-" * 100)


@pytest.mark.slow
def test_debug_overfit_learns_its_batch_on_the_demo(tmp_path) -> None:
    done = run_cli(["experiment=demo", "debug=overfit", f"paths.output_dir={tmp_path}"],
               tmp_path / "cache", timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "debug" / "demo").iterdir()
    splits = (run / "splits.csv").read_text().splitlines()[1:]
    train = sorted(r.split(",")[0] for r in splits if r.split(",")[1] == "train")
    val = sorted(r.split(",")[0] for r in splits if r.split(",")[1] == "val")
    assert train == val and len(train) == 16  # one batch of the demo, as train and val
    assert len({r.split(",")[2] for r in splits if r.split(",")[1] == "train"}) == 8  # 8 classes
    assert json.loads((run / "metrics.json").read_text())["val"]["accuracy"] == 1.0


@pytest.mark.slow
def test_optuna_search_runs_three_trials_of_the_demo(tmp_path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the optuna extra")
    from helpers.wandb_records import records, run_record, run_summary

    done = run_cli(
        [
            "experiment=demo",
            "hparams_search=lora_optuna",
            "hydra.sweeper.n_trials=3",
            "logger.mode=offline",
            *FAST,
            "trainer.max_steps=3",
            f"paths.output_dir={tmp_path}",
        ],
        tmp_path / "cache",
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "sweeps" / "demo").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["job0", "job1", "job2"]
    ranks = set()
    for num, job in enumerate(jobs):
        info = json.loads((sweep / job / "run_info.json").read_text())
        assert info["status"] == "completed" and isinstance(info["value"], float)
        r = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())["peft"]["r"]
        ranks.add(r)
        # the W&B config says which trial this is and what it swept (a dashboard groups by it)
        (offline,) = (sweep / job / "wandb").glob("offline-run-*")
        hydra = run_summary(offline)["config"]["hydra"]
        assert hydra["job_num"] == num and f"peft.r={r}" in hydra["overrides"]
        # named by the trial's values, rounded (Optuna's floats have 17 digits), tagged by study
        run = run_record(records(offline))
        assert run["display_name"].startswith(f"r={r},alpha=") and len(run["display_name"]) < 64
        assert re.fullmatch(
            r"r=\d+,alpha=\d+,dropout=[\d.e-]{1,9},lr=[\d.e-]{1,9}", run["display_name"]
        )
        assert set(run["tags"]) == {"demo", f"sweep:{sweep.name}", "optuna:lora_optuna"}
        assert run["run_group"] == f"demo/{sweep.name}"
    assert ranks <= {4, 8, 16, 32}
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"peft.r", "peft.alpha", "peft.dropout", "trainer.lr"}
