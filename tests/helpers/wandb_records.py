"""Read an offline W&B run back with W&B's own reader, `wandb leet inspect` (wandb >= 0.2x)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def _leet(run_dir: Path, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of the run's .wandb transaction log, as W&B prints them (one JSON per line)."""
    return [json.loads(line) for line in _leet(run_dir).splitlines() if line.strip()]


def run_summary(run_dir: Path) -> dict[str, Any]:
    """The run's state, config and summary as `wandb leet inspect --summary --json` gives them."""
    return json.loads(_leet(run_dir, "--summary"))


def history_keys(recs: list[dict[str, Any]]) -> set[str]:
    """The run's history keys (a logged Table or image is one key; W&B's own `_` keys left out).

    leet prints a media value's fields as `key.field`; metric names here never hold a dot."""
    keys = {k.split(".")[0] for r in recs if r["type"] == "history" for k in r["history"]["item"]}
    return {k for k in keys if not k.startswith("_")}


def media_types(recs: list[dict[str, Any]]) -> dict[str, str]:
    """Each history key logged as media (a Table, a chart's table, an image): its W&B `_type`."""
    return {
        k.split(".")[0]: v
        for r in recs
        if r["type"] == "history"
        for k, v in r["history"]["item"].items()
        if k.endswith("._type")
    }


def run_record(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's first `run` record: display_name, run_group, tags, notes, config."""
    return next(r["run"] for r in recs if r["type"] == "run")


def artifacts(recs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The artifacts of one type (`model`, `run_table`) the run logged."""
    return [
        r["artifact"] for r in recs if r["type"] == "artifact" and r["artifact"]["type"] == kind
    ]
