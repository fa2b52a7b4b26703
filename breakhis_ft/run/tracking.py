"""Tracking: W&B (online / offline / disabled) beside the local files every run writes."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from breakhis_ft.run.run_folder import write_json
from breakhis_ft.validate import BINARY_METRICS, SCALAR_METRICS

log = logging.getLogger(__name__)

# keys whose values never leave the process: tokens, API keys, passwords
_SECRET_KEY = re.compile(r"(token|api_?key|secret|password)", re.IGNORECASE)
# W&B history holds the headline scalars only (a dashboard compares runs on a handful of keys);
# per-class and per-magnification values go to the summary and to tables, all to metrics.jsonl
_NOT_HISTORY = re.compile(r"/(per_class|by_magnification)/|^model/|/n$")
# the columns of the by-magnification table: a split's scalars, then its binary collapse
_SPLIT_COLUMNS = ("n", *SCALAR_METRICS)
_BINARY_COLUMNS = BINARY_METRICS


def strip_secrets(value: Any) -> Any:
    """A copy of a nested config dict without any key that looks like a secret."""
    if isinstance(value, dict):
        return {k: strip_secrets(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(value, list):
        return [strip_secrets(v) for v in value]
    return value


def _json_safe(value: Any) -> Any:
    """Replace NaN / inf by None so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class RunTracker:
    """Writes metrics.jsonl / metrics.json in the run folder and mirrors them to W&B.

    A W&B failure (no network, bad key, missing package) warns once and the run goes on with its
    local files. Only the main process tracks; the others get a tracker with `active=False`.
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        logger_cfg: Any,
        run_name: str,
        group: str,
        active: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.active = active
        self._wandb_run = None
        self._metrics_file = self.run_dir / "metrics.jsonl"
        self._history: list[dict[str, Any]] = []  # the rows of metrics.jsonl, for the curves
        if active and logger_cfg.kind == "wandb" and logger_cfg.mode != "disabled":
            self._start_wandb(strip_secrets(config), logger_cfg, run_name, group)

    def _start_wandb(self, config: dict, logger_cfg: Any, run_name: str, group: str) -> None:
        try:
            import wandb

            self._wandb_run = wandb.init(
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                group=logger_cfg.group or group,
                job_type=logger_cfg.job_type,
                tags=list(logger_cfg.tags),
                name=run_name,
                config=config,
                mode=logger_cfg.mode,
                dir=str(self.run_dir),
                reinit="create_new",
            )
            # best-value summaries, so the dashboard compares runs by their best epoch
            self._wandb_run.define_metric("train/*", step_metric="trainer/step")
            self._wandb_run.define_metric("val/loss", summary="min", step_metric="trainer/step")
            self._wandb_run.define_metric("val/*", summary="max", step_metric="trainer/step")
        except Exception as err:  # noqa: BLE001 - any W&B failure must not stop training
            log.warning(
                "W&B is off for this run (%s: %s); local files are still written",
                type(err).__name__,
                err,
            )
            self._wandb_run = None

    @property
    def wandb_run(self) -> Any:
        """The live W&B run, or None."""
        return self._wandb_run

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Append one line to metrics.jsonl; headline scalars to W&B history, the rest to its
        summary."""
        if not self.active:
            return
        row = _json_safe({"step": step, **metrics})
        self._history.append(row)
        with self._metrics_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        history = {k: v for k, v in metrics.items() if not _NOT_HISTORY.search(k)}
        rest = _json_safe({k: v for k, v in metrics.items() if k not in history})
        if history:
            self._safe_wandb(lambda run: run.log({**history, "trainer/step": step}))
        if rest:
            self._safe_wandb(lambda run: run.summary.update(rest))

    def log_final(
        self, metrics: dict[str, dict], predictions: dict[str, tuple[list, list]]
    ) -> None:
        """Write metrics.json; send summaries, a confusion matrix and a per-class table to W&B.

        `predictions` maps a split to (true labels, predicted labels), as class indices.
        """
        if not self.active:
            return
        write_json(self.run_dir / "metrics.json", _json_safe(metrics))  # atomic
        if self._wandb_run is None:
            return
        for split, split_metrics in metrics.items():
            scalars = _flat_scalars(split_metrics, split)
            self._safe_wandb(lambda run, s=scalars: run.summary.update(_json_safe(s)))
            self._log_split_tables(split, split_metrics, predictions.get(split))

    def log_plots(self, metrics: dict[str, dict], title: str | None = None) -> None:
        """With W&B on: plot the finished run (per-class F1, curves; `title` names the run) into
        its folder and log the PNGs; the confusion matrix is W&B's own chart (log_final), so its
        PNG stays in the folder only. matplotlib is the optional `plots` extra."""
        if self._wandb_run is None:
            return
        try:
            from breakhis_ft.evaluate.figures import plot_run_figures

            paths = plot_run_figures(self.run_dir, metrics, self._history, title=title)
        except ImportError as err:
            log.warning("no plots for W&B (%s); pip install -e '.[plots]'", err)
            return
        paths = [p for p in paths if not p.name.startswith("confusion_matrix")]
        self._safe_wandb(lambda run: _log_images(run, paths))

    def log_model(self, best_dir: Path, metadata: dict[str, Any]) -> None:
        """Log the best adapter (or head) folder as a W&B `model` artifact, alias `best`."""
        if self._wandb_run is None or not Path(best_dir).is_dir():
            return
        import wandb

        def upload(run: Any) -> None:
            artifact = wandb.Artifact(
                f"model-{run.id}", type="model", metadata=_json_safe(metadata)
            )
            artifact.add_dir(str(best_dir))
            run.log_artifact(artifact, aliases=["best"])

        self._safe_wandb(upload)

    def _log_split_tables(self, split: str, metrics: dict, predicted: tuple | None) -> None:
        """Per-class (overall and per magnification), by-magnification and binary tables, and
        W&B's confusion matrix chart (from the predictions) of one split."""
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


def _flat_scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """Every numeric leaf as `prefix/key/...` (per class and per magnification included)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flat_scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
    return out


def split_tables(metrics: dict[str, Any]) -> list[tuple[str, tuple[str, ...], list[list]]]:
    """(name, columns, rows) of a split's tables: per_class, by_magnification, binary."""
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
    binary = metrics.get("binary")
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
        ("binary", _BINARY_COLUMNS, [[binary.get(k) for k in _BINARY_COLUMNS]] if binary else []),
    ]


def _log_images(run: Any, paths: list[Path]) -> None:
    """Log PNG files to a live W&B run as images keyed `plots/<file stem>`."""
    import wandb

    images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in paths}
    if images:
        run.log(images)
