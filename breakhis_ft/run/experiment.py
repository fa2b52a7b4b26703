"""One run, start to end: data -> split -> dataset -> model -> engine -> evaluate -> track.

The entrypoint (cli.py) composes and validates the config, then calls `run_experiment`. Everything
the run produces goes into its own folder (Hydra's run dir).
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from breakhis_ft.data.breakhis import BreakhisScan, data_stats, scan_from_config, write_bad_files
from breakhis_ft.data.records import ImageRecord, Task, label_of
from breakhis_ft.data.splits import (
    assign_splits,
    coverage_lines,
    coverage_problems,
    duplicate_leaks,
    split_coverage,
    split_rows,
    straddle_warning,
)
from breakhis_ft.engine.stop import sigterm_interrupts
from breakhis_ft.run.batch_size import resolve_batch_size
from breakhis_ft.run.calibrate import temperature_fit_warning
from breakhis_ft.run.identity import job_identity, recorded_overrides
from breakhis_ft.run.run_folder import (
    group_choices,
    is_main_process,
    record_resume,
    write_json,
    write_run_info,
    write_splits_csv,
)

log = logging.getLogger(__name__)


def prepare_data(cfg: DictConfig, run_dir: Path) -> tuple[BreakhisScan, dict[str, list]]:
    """Scan (or build) the data; write data_stats.json and splits.csv; return scan and splits."""
    scan = scan_from_config(cfg.data, cfg.paths.synthetic)
    task = Task.from_config(cfg.task)
    splits = assign_splits(
        scan.records, cfg.split, task, list(cfg.magnification.factors), folds=scan.folds
    )
    if cfg.trainer.overfit_batches > 0:
        splits = overfit_splits(splits, cfg.trainer.overfit_batches * cfg.trainer.batch_size, task)
    stats = data_stats(scan)
    stats["split"] = split_coverage(splits, task, cfg.split)
    if "both" in scan.duplicate_kept.values():  # data.duplicate_keep=both: the notebook's leak
        stats["duplicate_leak"] = leaks = duplicate_leaks(splits)
        log.warning(
            "data.duplicate_keep=both: %d test and %d val images have an identical copy, filed "
            "under another subtype, in train (slides %s)",
            leaks["test"],
            leaks["val"],
            ", ".join(sorted(scan.duplicate_kept)),
        )
    if is_main_process():
        if write_bad_files(scan, run_dir):
            log.warning("skipped %d bad files (listed in bad_files.csv)", len(scan.bad_files))
        write_json(run_dir / "data_stats.json", stats)
        write_splits_csv(run_dir / "splits.csv", split_rows(splits, task), task.classes)
    for line in coverage_lines(stats["split"]):
        log.info("split %s", line)
    if warning := straddle_warning(stats["split"]):  # e.g. split=official_fold's published folds
        log.warning("split=%s: %s", cfg.split.kind, warning)
    for problem in coverage_problems(stats["split"]):
        if problem.startswith("train"):  # a class the model cannot learn
            log.error("%s: the model cannot learn these classes", problem)
        else:
            log.warning("%s: too few patient groups; its metrics cannot measure them", problem)
    val = stats["split"]["splits"].get("val")
    if warning := temperature_fit_warning(val, cfg.evaluate.temperature_scaling):
        log.warning(warning)
    return scan, splits


def overfit_splits(
    splits: dict[str, list[ImageRecord]], n: int, task: Task
) -> dict[str, list[ImageRecord]]:
    """debug=overfit: train and val become the same `n` training images, taken in turn from each
    class; test is kept. A check that the model can learn at all, never a result."""
    by_label: dict[Any, list[ImageRecord]] = defaultdict(list)
    for record in splits["train"]:
        by_label[label_of(record, task)].append(record)
    queues = [by_label[k] for k in sorted(by_label)]
    chosen = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    chosen = chosen[:n]
    log.warning(
        "trainer.overfit_batches: train and val are the same %d training images (a check that "
        "the model can learn, not a result)",
        len(chosen),
    )
    return {**splits, "train": chosen, "val": list(chosen)}


def hydra_record() -> dict[str, Any]:
    """What Hydra knows of this job, for the W&B config: overrides, sweep job number, choices."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return {
        "overrides": recorded_overrides(hydra_cfg.overrides.task),
        "job_num": int(hydra_cfg.job.num) if multirun else None,
        "sweep_dir": str(hydra_cfg.sweep.dir) if multirun else None,
        "choices": group_choices(OmegaConf.to_container(hydra_cfg.runtime)),
    }


def _set_status(run_dir: Path, status: str, **extra: object) -> None:
    if is_main_process():  # one writer of run_info.json in a multi-process launch
        write_run_info(run_dir, status, **extra)


def _latest_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run folder's latest complete checkpoint (None when it has none)."""
    from breakhis_ft.engine.checkpoint import list_checkpoints  # heavy: torch, accelerate

    found = list_checkpoints(run_dir)
    return found[-1][0] if found else None


def _resume_step(cfg: DictConfig, run_dir: Path) -> int | None:
    """On `resume=`: the step of the run folder's newest checkpoint that verifies (0 when none);
    a `best/` left between its two renames by a crash is put back first."""
    if cfg.resume is None:
        return None
    # heavy: torch, accelerate
    from breakhis_ft.engine.checkpoint import recover_best, resumable_checkpoint

    if is_main_process():
        recover_best(run_dir / "best")
    found = resumable_checkpoint(run_dir)
    return found[0] if found else 0


def run_experiment(cfg: DictConfig) -> float | None:
    """Run one configured experiment in Hydra's run folder; return `optimized_metric`'s value.

    SIGTERM anywhere in the run acts as Ctrl-C: the status becomes `interrupted` with the step of
    the checkpoint saved, and RunInterrupted (a KeyboardInterrupt) goes up to the entrypoint.
    """
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resume_step = _resume_step(cfg, run_dir)
    if resume_step is not None and is_main_process():
        record_resume(run_dir, resume_step)
    _set_status(run_dir, "running")
    try:
        with sigterm_interrupts():
            value = _run(cfg, run_dir, resume_step)
    except KeyboardInterrupt as err:
        name = getattr(err, "signal_name", "SIGINT")
        # outside training (data, the final evaluation) the signal saves nothing: the latest
        # checkpoint is where resume= continues
        step = getattr(err, "step", None)
        step = _latest_checkpoint_step(run_dir) if step is None else step
        _set_status(run_dir, "interrupted", step=step, signal=name)
        log.warning(
            "%s: the run stopped%s; continue it with: breakhis-ft %s",
            name,
            f" with a checkpoint at step {step}" if step is not None else "",
            shlex.quote(f"resume={run_dir}"),
        )
        raise
    except BaseException:
        _set_status(run_dir, "failed")
        raise
    _set_status(run_dir, "completed", optimized_metric=cfg.optimized_metric, value=value)
    return value


def _run(cfg: DictConfig, run_dir: Path, resume_step: int | None) -> float | None:
    resolve_batch_size(cfg, run_dir, is_main_process())  # batch_size=auto: sizes from here on
    scan, splits = prepare_data(cfg, run_dir)
    if not cfg.train and not cfg.test:
        log.info("train=false test=false: data prepared in %s", run_dir)
        return None
    from breakhis_ft.run.training_run import TrackedJob, train_and_evaluate  # heavy: torch

    # named from what differs: a sweep job by its swept values (the command line is the sweep's)
    identity = job_identity(cfg, HydraConfig.get(), sys.argv[1:])
    config = OmegaConf.to_container(cfg, resolve=True)
    config["hydra"] = hydra_record()  # a dashboard groups and filters by what was swept
    job = TrackedJob(config, identity.name, identity.group, identity.tags, identity.notes)
    return train_and_evaluate(cfg, run_dir, scan, splits, job, resume_step)
