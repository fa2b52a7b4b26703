"""What the terminal shows: the composed config at start, the result block at the end, and a console
that leaves other libraries' records (accelerate's per-checkpoint INFO lines, transformers' and
Python's warnings) below ERROR, and a failed run's traceback, to the log file.

Everything goes through logging, so Hydra's file handler (`<run>/breakhis-ft.log`) keeps it all; the
config tree and the summary block are marked `bare` and reach the console without the log prefix.
Imports stay light (no torch): the entrypoint calls this before the heavy imports.
"""

from __future__ import annotations

import io
import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from breakhis_ft.run.secrets import mask_secrets
from breakhis_ft.third_party import ThirdPartyFilter, add_console_filter

log = logging.getLogger(__name__)

BARE = {"bare": True}  # `extra=` of a record printed on the console without the log prefix
FILE_ONLY = {"file_only": True}  # `extra=` of a record kept off the console (a traceback)
HEADLINE = ("balanced_accuracy", "accuracy", "f1_macro", "auroc_macro", "patient_recognition_rate")
WIDTH = 100


class ConsoleFilter(ThirdPartyFilter):
    """The run's console: no record marked FILE_ONLY, and other libraries' records (accelerate's
    checkpoint lines, transformers' warnings, Python warnings) only from ERROR up; the file
    handler keeps them all."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether the console shows the record."""
        return not getattr(record, "file_only", False) and super().filter(record)


class ConsoleFormatter(logging.Formatter):
    """The handler's own format, except records marked `bare`: their message alone."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        """The record as the console shows it."""
        if getattr(record, "bare", False):
            return record.getMessage()
        return self.inner.format(record)


def _console_handlers() -> list[logging.Handler]:
    return [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


def configure_console() -> None:
    """Put ConsoleFilter on the console handlers Hydra configured and print bare records bare
    (once per job: Hydra reconfigures logging for each job of a multirun)."""
    for handler in _console_handlers():
        add_console_filter(handler, ConsoleFilter)
        if not isinstance(handler.formatter, ConsoleFormatter):
            handler.setFormatter(ConsoleFormatter(handler.formatter))


# ---- the config at start ------------------------------------------------------------------------


def _leaves(value: Any, prefix: str = "") -> list[str]:
    """`key=value` of every leaf; an instantiated node shows its target's name."""
    if isinstance(value, Mapping):
        if "_target_" in value:
            args = [a for k, v in value.items() if k[0] != "_" for a in _leaves(v, k)]
            target = str(value["_target_"]).rpartition(".")[2]
            return [f"{prefix}={target}" + (f"({', '.join(args)})" if args else "")]
        return [
            leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else k)
        ]
    return [f"{prefix}={value}"]


def config_tree(cfg: DictConfig, choices: Mapping[str, Any] | None = None) -> str:
    """The composed config as a compact tree: one node per section, its group choice, its keys."""
    from rich.console import Console
    from rich.markup import escape  # values such as tags=[demo] are not markup
    from rich.tree import Tree

    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - outside a Hydra job ${hydra:...} cannot resolve: show as is
        config = OmegaConf.to_container(cfg, resolve=False)
    config = mask_secrets(config)  # a `+hf_token=...` override is shown as ***
    choices = {k: v for k, v in (choices or {}).items() if not k.startswith("hydra/")}
    picked = ", ".join(f"{k}={v}" for k, v in choices.items() if v and "/" not in k)
    tree = Tree(escape(f"config ({picked})" if picked else "config"))
    top = [f"{k}={v}" for k, v in config.items() if not isinstance(v, Mapping)]
    if top:
        tree.add(escape("run: " + "  ".join(top)))
    for key, value in config.items():
        if isinstance(value, Mapping):
            label = f"{key} ({choices[key]})" if choices.get(key) else key
            tree.add(escape(f"{label}: " + "  ".join(_leaves(value))))
    out = io.StringIO()
    Console(file=out, width=WIDTH, no_color=True, highlight=False).print(tree)
    return out.getvalue().rstrip()


def log_config_tree(cfg: DictConfig, choices: Mapping[str, Any] | None = None) -> None:
    """Show the composed config on the console and in the log file (main process only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("%s", config_tree(cfg, choices), extra=BARE)


# ---- the result at the end ----------------------------------------------------------------------


def format_metric(split_metrics: Mapping[str, Any], name: str) -> str | None:
    """`0.6200 [0.4800, 0.7500]`: the value and its 95% interval (`<name>_ci95`) when recorded."""
    value = split_metrics.get(name)
    if not isinstance(value, int | float):
        return None
    text = f"{value:.4f}"
    ci = split_metrics.get(f"{name}_ci95")
    if isinstance(ci, Sequence) and len(ci) == 2 and all(isinstance(v, int | float) for v in ci):
        text += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    return text


def metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The headline metrics (rows) of each split (columns), with intervals where recorded."""
    splits = {s: m for s, m in metrics.items() if isinstance(m, Mapping)}
    if not splits:
        return []
    rows = [(name, [format_metric(m, name) for m in splits.values()]) for name in HEADLINE]
    binary = [
        m.get("binary") if isinstance(m.get("binary"), Mapping) else {} for m in splits.values()
    ]
    rows.append(("binary accuracy", [format_metric(b, "accuracy") for b in binary]))
    rows = [(name, cells) for name, cells in rows if any(c is not None for c in cells)]
    heads = [f"{s} (n={m.get('n', '?')})" for s, m in splits.items()]
    first = max(len(n) for n, _ in rows)
    width = max(len(h) for h in heads + [c or "" for _, cells in rows for c in cells])
    lines = ["  " + " " * first + "".join(f"  {h:<{width}}" for h in heads)]
    for name, cells in rows:
        lines.append(f"  {name:<{first}}" + "".join(f"  {c or '-':<{width}}" for c in cells))
    return [line.rstrip() for line in lines]


def fixed_classes_note(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A line naming, per split, the classes no interval covers (`interval.fixed_classes`: each
    resample draws the same groups of them), or none."""
    parts = []
    for split, m in metrics.items():
        scheme = m.get("interval") if isinstance(m, Mapping) else None
        fixed = scheme.get("fixed_classes") if isinstance(scheme, Mapping) else None
        if fixed:
            parts.append(f"{split} {len(fixed)} of {len(m.get('classes') or fixed)}")
    if not parts:
        return []
    return [
        "  intervals leave out the sampling of the classes in one group each ("
        + ", ".join(parts)
        + "; metrics.json interval.fixed_classes)"
    ]


def _shown_path(path: Path) -> str:
    """A path relative to the working folder when it lies below it (shorter to copy)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def summary_block(
    run_dir: Path,
    metrics: Mapping[str, Mapping[str, Any]],
    best: tuple[str, float | None, int | None] | None = None,
) -> str:
    """The end-of-run block: headline metrics per split, the best step, the folder, what next.

    `best`: (monitored metric, its best value, the step) when the run trained.
    """
    folder = _shown_path(run_dir)
    quoted = shlex.quote(folder)  # the commands below paste into a shell as they are
    rule = "-" * WIDTH
    lines = [rule, f"breakhis-ft: run finished, metrics of the best model ({folder})"]
    lines += metrics_table(metrics)
    lines += fixed_classes_note(metrics)
    if best is not None:
        monitor, value, step = best
        shown = "undefined" if value is None else f"{value:.4f}"
        lines.append(f"  best step: {step} ({monitor} {shown})")
    lines += [
        f"  run folder: {folder}",
        f"  compare: breakhis-ft-report {quoted}",
        f"  predict: breakhis-ft-predict {quoted} IMAGES --out predictions.csv",
        rule,
    ]
    return "\n".join(lines)


def log_summary(
    run_dir: Path,
    metrics: Mapping[str, Mapping[str, Any]],
    best: tuple[str, float | None, int | None] | None = None,
) -> None:
    """Show the end-of-run block on the console and in the log file."""
    log.info("%s", summary_block(run_dir, metrics, best), extra=BARE)
