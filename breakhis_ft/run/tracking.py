"""Tracking: W&B (online / offline / disabled) beside the local files every run writes."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from breakhis_ft.run.run_folder import read_run_info, update_run_info, write_json
from breakhis_ft.run.secrets import mask_secrets
from breakhis_ft.validate import BINARY_METRICS, SCALAR_METRICS

log = logging.getLogger(__name__)

ERROR_TABLE_ROWS = 32  # test/errors: the most confident errors, kept small for the dashboard
ERROR_THUMBNAIL = 128  # their longest side in pixels
# WANDB_MODE values W&B accepts, as the mode they mean
_ENV_MODES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}
# metrics.jsonl holds every value logged; W&B's history the per-step scalars (per-class and
# per-magnification values stay in the run folder, and the end's W&B tables hold them)
_LOCAL_ONLY = re.compile(r"/(per_class|by_magnification)/|/n$")
_FACTS = re.compile(r"^model/")  # logged once: the summary's, never history
STEP = "trainer/step"  # the x-axis of every history key
# The summary is the runs table's columns: the headline of val and test with their intervals
# (summary_of), train/loss, the selection (best/*), the run's facts (model/, data/, run/*) and the
# end's tables. A history key is defined by its exact name as it is first logged: the latest value
# of these stays in the summary, the rest none (a glob would match the tables' keys too).
SUMMARY_METRICS = (
    "balanced_accuracy",
    "accuracy",
    "f1_macro",
    "auroc_macro",
    "patient_recognition_rate",
    "binary/accuracy",
)
_HISTORY_IN_SUMMARY = {"train/loss"} | {
    f"{split}/{name}" for split in ("val", "test") for name in SUMMARY_METRICS
}
# the columns of the by-magnification table: a split's scalars, then its binary collapse (its
# `all` row is the split's binary figures)
_SPLIT_COLUMNS = ("n", *SCALAR_METRICS)
_BINARY_COLUMNS = BINARY_METRICS


def wandb_mode(configured: str) -> str:
    """The W&B mode of a run: WANDB_MODE from the environment when set (as W&B users expect),
    else `logger.mode`."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if not env:
        return str(configured)
    if env not in _ENV_MODES:
        log.warning("WANDB_MODE=%s is not a W&B mode; using logger.mode=%s", env, configured)
        return str(configured)
    if _ENV_MODES[env] != str(configured):
        log.info("WANDB_MODE=%s from the environment replaces logger.mode=%s", env, configured)
    return _ENV_MODES[env]


def _json_safe(value: Any) -> Any:
    """Replace NaN / inf by None so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class TrackedJob:
    """What a run is recorded as on the dashboard: its resolved config, name and group."""

    config: dict[str, Any]  # the resolved config (secret-looking values masked before W&B)
    name: str  # the run's readable name (what differs: run/identity.py)
    group: str  # the W&B group: the experiment, or the sweep
    tags: tuple[str, ...] = ()  # sweep:<folder>, optuna:<study>, rerun (besides logger.tags)
    notes: str | None = None  # a rerun's source


class RunTracker:
    """Writes metrics.jsonl / metrics.json in the run folder and mirrors them to W&B.

    A W&B failure (no network, bad key, missing package) warns once and the run goes on with its
    local files. Only the main process tracks; the others get a tracker with `active=False`.
    """

    def __init__(
        self,
        run_dir: Path,
        job: TrackedJob,
        logger_cfg: Any,
        active: bool = True,
        resume_step: int | None = None,
        resumed: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.active = active
        self._wandb_run = None
        self._defined: set[str] = set()  # history keys given their summary rule
        self._metrics_file = self.run_dir / "metrics.jsonl"
        self._history: list[dict[str, Any]] = []  # the rows of metrics.jsonl, for the curves
        self._logged: set[tuple[int, str]] = set()  # (step, key) already in metrics.jsonl
        if active and resume_step is not None:
            self._keep_rows_until(resume_step)
        mode = wandb_mode(logger_cfg.mode) if logger_cfg.kind == "wandb" else "disabled"
        if active and mode != "disabled":
            self._start_wandb(job, logger_cfg, mode, resumed)

    def _keep_rows_until(self, step: int) -> None:
        """On resume: keep metrics.jsonl's rows up to the checkpoint's step and drop the later
        ones, which the resumed training logs again (a step is never logged twice)."""
        if not self._metrics_file.exists():
            return
        rows = []
        for line in self._metrics_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        self._history = [r for r in rows if isinstance(r, dict) and r.get("step", 0) <= step]
        self._logged = {(r["step"], k) for r in self._history for k in r if k != "step"}
        tmp = self._metrics_file.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self._history))
        tmp.replace(self._metrics_file)
        if len(rows) > len(self._history):
            log.info(
                "resume: %d metrics.jsonl rows after step %d dropped; training logs them again",
                len(rows) - len(self._history),
                step,
            )

    def _start_wandb(self, job: TrackedJob, logger_cfg: Any, mode: str, resumed: bool) -> None:
        try:
            import wandb

            previous = read_run_info(self.run_dir).get("wandb") if resumed else None
            kwargs: dict[str, Any] = {
                "project": logger_cfg.project,
                "entity": logger_cfg.entity,
                "group": logger_cfg.group or job.group,
                "job_type": logger_cfg.job_type,
                "tags": list(dict.fromkeys([*logger_cfg.tags, *job.tags])),
                "notes": job.notes,
                "name": job.name,
                "config": mask_secrets(job.config),
                "dir": str(self.run_dir),
                "reinit": "create_new",
                "settings": wandb.Settings(init_timeout=float(logger_cfg.init_timeout)),
            }
            if previous:  # the same W&B run continues (its first name and group kept)
                kwargs.update(
                    id=previous["id"],
                    resume="allow",
                    name=previous["name"],
                    group=previous["group"],
                )
            run, mode = self._init_wandb(wandb, mode, kwargs)
            names = {"name": kwargs["name"], "group": kwargs["group"]}
            update_run_info(self.run_dir, wandb={"id": run.id, **names, "mode": mode})
            run.define_metric(STEP, summary="none")
            self._wandb_run = run
        except Exception as err:  # noqa: BLE001 - any W&B failure must not stop training
            log.warning(
                "W&B is off for this run (%s: %s); local files are still written",
                type(err).__name__,
                err,
            )
            self._wandb_run = None

    def _init_wandb(self, wandb: Any, mode: str, kwargs: dict[str, Any]) -> tuple[Any, str]:
        """(wandb.init's run, its mode); online without an answer within logger.init_timeout
        seconds (no network, server down) goes on offline."""
        if mode != "online":
            return wandb.init(mode=mode, **kwargs), mode
        try:
            return wandb.init(mode="online", **kwargs), mode
        except wandb.errors.Error as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.warning(
                "W&B online did not start (%s): this run continues offline; sync it later with: "
                "wandb sync %s",
                reason,
                self.run_dir / "wandb" / "offline-run-*",
            )
            return wandb.init(mode="offline", **kwargs), "offline"

    @property
    def wandb_run(self) -> Any:
        """The live W&B run, or None."""
        return self._wandb_run

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Append one line to metrics.jsonl; per-step scalars to W&B history, the run's facts
        (model/*) to its summary, per-class and per-magnification values nowhere else."""
        if not self.active:
            return
        metrics = {k: v for k, v in metrics.items() if (step, k) not in self._logged}
        if not metrics:  # all of it is already in the log (a resumed run's step 0)
            return
        self._logged.update((step, k) for k in metrics)
        row = _json_safe({"step": step, **metrics})
        self._history.append(row)
        with self._metrics_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        facts = {k: v for k, v in metrics.items() if _FACTS.search(k)}
        history = {k: v for k, v in metrics.items() if k not in facts and not _LOCAL_ONLY.search(k)}
        if history:
            self._safe_wandb(lambda run: self._define(run, history))
            self._safe_wandb(lambda run: run.log({**history, STEP: step}))
        if facts:
            self.log_summary(facts)

    def _define(self, run: Any, keys: Iterable[str]) -> None:
        """Plot each new history key against trainer/step; keep its latest value in the summary
        for the headline (and train/loss) only."""
        for key in keys:
            if key not in self._defined:
                summary = {} if key in _HISTORY_IN_SUMMARY else {"summary": "none"}
                run.define_metric(key, step_metric=STEP, **summary)
                self._defined.add(key)

    def log_final(
        self, metrics: dict[str, dict], predictions: dict[str, tuple[list, list]]
    ) -> None:
        """Write metrics.json (also among the W&B run's files); send the headline with its
        intervals to the summary, and each split's tables and confusion matrix chart to W&B.

        `predictions` maps a split to (true labels, predicted labels), as class indices.
        """
        if not self.active:
            return
        path = self.run_dir / "metrics.json"
        write_json(path, _json_safe(metrics))  # atomic
        if self._wandb_run is None:
            return
        self.log_summary(summary_of(metrics))
        for split, split_metrics in metrics.items():
            self._log_split_tables(split, split_metrics, predictions.get(split))
        self._safe_wandb(lambda run: run.save(str(path), base_path=str(self.run_dir), policy="now"))

    def log_summary(self, values: dict[str, Any]) -> None:
        """Put values into the W&B run's summary (the runs table); nothing without W&B."""
        self._safe_wandb(lambda run: run.summary.update(_json_safe(values)))

    def log_plots(self, metrics: dict[str, dict], title: str | None = None) -> None:
        """With W&B on: plot the finished run (per-class F1, curves; `title` names the run) into
        its folder and log the PNGs; the confusion matrix is W&B's own chart (log_final), so its
        PNG stays in the folder only. matplotlib is the optional `plots` extra."""
        if self._wandb_run is None:
            return
        try:
            from breakhis_ft.evaluate.figures import plot_run_figures

            paths = plot_run_figures(self.run_dir, metrics, self._history, title=title)
            paths += sorted(self.run_dir.glob("reliability_*.png"))  # written by the run
        except ImportError as err:
            log.warning("no plots for W&B (%s); pip install -e '.[plots]'", err)
            return
        paths = [p for p in paths if not p.name.startswith("confusion_matrix")]
        self._safe_wandb(lambda run: _log_images(run, paths))
        # images for the run's media panels (history), not columns of the runs table: W&B's
        # summary="none" covers numbers only, so they leave the summary once logged
        self._safe_wandb(lambda run: _drop_from_summary(run, [f"plots/{p.stem}" for p in paths]))

    def log_model(self, folder: Path, which: str, metadata: dict[str, Any]) -> None:
        """Log `folder` (an exported model) as a version of the W&B `model` artifact
        `model-<run id>`, aliases `which` (best | last) and the run id, linked to the run."""
        if self._wandb_run is None or not Path(folder).is_dir():
            return
        import wandb

        def upload(run: Any) -> None:
            artifact = wandb.Artifact(
                f"model-{run.id}", type="model", metadata=_json_safe(metadata)
            )
            artifact.add_dir(str(folder))  # copied to W&B's staging area here
            run.log_artifact(artifact, aliases=[which, run.id])

        self._safe_wandb(upload)

    def _log_split_tables(self, split: str, metrics: dict, predicted: tuple | None) -> None:
        """Per-class (overall and per magnification) and by-magnification tables, and W&B's
        confusion matrix chart (from the predictions) of one split."""
        import wandb

        tables = {
            f"{split}/{name}": wandb.Table(columns=list(cols), data=rows)
            for name, cols, rows in split_tables(metrics)
            if rows
        }
        if predicted is not None:
            tables[f"{split}/confusion_matrix"] = wandb.plot.confusion_matrix(
                y_true=list(predicted[0]),
                preds=list(predicted[1]),
                class_names=list(metrics["classes"]),
                title=f"{split} confusion matrix",
            )
        self._safe_wandb(lambda run: run.log(tables))

    def log_errors(self, predictions: Path, image_root: Path, n: int = ERROR_TABLE_ROWS) -> None:
        """W&B table `test/errors`: thumbnails of the run's `n` most confident test errors, with
        true and predicted class, probability, patient and magnification (W&B on only)."""
        if self._wandb_run is None or not Path(predictions).is_file():
            return
        import wandb

        from breakhis_ft.evaluate.errors import most_confident_errors, thumbnail

        columns = ["image", "true", "pred", "prob", "prob_true", "patient", "magnification", "path"]
        table = wandb.Table(columns=columns)
        for e in most_confident_errors(predictions, n):
            picture = thumbnail(Path(image_root) / e.path, ERROR_THUMBNAIL)
            image = None if picture is None else wandb.Image(picture, caption=f"{e.true}->{e.pred}")
            table.add_data(
                image, e.true, e.pred, e.prob, e.prob_true, e.patient, e.magnification, e.path
            )
        self._safe_wandb(lambda run: run.log({"test/errors": table}))

    def _safe_wandb(self, action: Any) -> None:
        if self._wandb_run is None:
            return
        try:
            action(self._wandb_run)
        except Exception as err:  # noqa: BLE001
            log.warning("W&B logging failed (%s); turning W&B off for this run", err)
            self._wandb_run = None

    def finish(self, failed: bool = False) -> None:
        """Close the W&B run (marked failed when the run raised)."""
        if self._wandb_run is not None:
            try:
                self._wandb_run.finish(exit_code=1 if failed else 0)
            except Exception as err:  # noqa: BLE001
                log.warning("W&B finish failed: %s", err)
            self._wandb_run = None


def summary_of(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The headline of each split for the W&B summary: `split/<metric>` and its interval as
    metrics.json holds it (`split/<metric>_ci95: [lo, hi]`); the rest stays in metrics.json."""
    out: dict[str, Any] = {}
    for split, block in metrics.items():
        if not isinstance(block, Mapping):
            continue
        for name in SUMMARY_METRICS:
            scope, _, key = name.rpartition("/")
            values = block.get(scope) if scope else block
            if not isinstance(values, Mapping):
                continue
            for found, value in values.items():
                if found == key or (found.startswith(f"{key}_ci") and isinstance(value, list)):
                    out[f"{split}/{scope + '/' if scope else ''}{found}"] = value
    return out


# blocks of a split's metrics that the statistics table leaves to the other tables (or to
# metrics.json: the bootstrap's and interval's settings, the most confused pairs)
_NOT_STATISTICS = {
    "per_class",
    "by_magnification",
    "confusion_matrix",
    "classes",
    "diagnoses",
    "most_confused",
    "bootstrap",
    "interval",
}


def statistics_rows(metrics: Mapping[str, Any], scope: str = "image") -> list[list]:
    """[scope, metric, value, ci_low, ci_high] of each number of a split's metrics: image level,
    binary, patient level and calibration (before / after temperature scaling)."""
    rows: list[list] = []
    for key, value in metrics.items():
        if key in _NOT_STATISTICS:
            continue
        if isinstance(value, Mapping):
            inner = key if scope == "image" else f"{scope}/{key}"
            rows += statistics_rows(value, inner)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            ci = next(
                (
                    v
                    for k, v in metrics.items()
                    if k.startswith(f"{key}_ci") and isinstance(v, list)
                ),
                [None, None],
            )
            rows.append([scope, key, value, *ci])
    return rows


def split_tables(metrics: dict[str, Any]) -> list[tuple[str, tuple[str, ...], list[list]]]:
    """(name, columns, rows) of a split's tables: per_class (overall and per magnification),
    by_magnification (its `all` row: the split's own figures, binary collapse included) and
    statistics (every figure with its interval: image and patient level, calibration)."""
    scopes = [("all", metrics), *(metrics.get("by_magnification") or {}).items()]
    per_class = [
        [str(mag), name, pc["precision"], pc["recall"], pc["f1"], pc["support"]]
        for mag, scope in scopes
        for name, pc in (scope.get("per_class") or {}).items()
    ]
    by_mag = []
    for mag, scope in scopes:
        binary = scope.get("binary") or {}
        by_mag.append(
            [str(mag), *(scope.get(k) for k in _SPLIT_COLUMNS)]
            + [binary.get(k) for k in _BINARY_COLUMNS]
        )
    return [
        (
            "per_class",
            ("magnification", "class", "precision", "recall", "f1", "support"),
            per_class,
        ),
        (
            "by_magnification",
            ("magnification", *_SPLIT_COLUMNS, *(f"binary_{k}" for k in _BINARY_COLUMNS)),
            by_mag,
        ),
        ("statistics", ("scope", "metric", "value", "ci_low", "ci_high"), statistics_rows(metrics)),
    ]


def _drop_from_summary(run: Any, keys: Iterable[str]) -> None:
    """Take logged history keys out of the W&B summary (the runs table's columns)."""
    for key in keys:
        if key in run.summary.keys():
            del run.summary[key]


def _log_images(run: Any, paths: list[Path]) -> None:
    """Log PNG files to a live W&B run as images keyed `plots/<file stem>`."""
    import wandb

    images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in paths}
    if images:
        run.log(images)
