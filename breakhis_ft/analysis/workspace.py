"""The project's W&B dashboard as code: a saved workspace (wandb-workspaces) of a project or group.

Runs grouped by experiment; a runs table whose columns are the swept keys and the validation
headline with its interval; validation curves (each panel one quantity: the class NLL apart from
the training loss); a parallel-coordinates panel over the swept keys; the per-class tables (F1 per
class, overall and per magnification). The keys are the ones the training run logs
(run/tracking.py); the swept keys default to those the sweep presets vary (conf/hparams_search).
Building the spec needs no network; saving it does (W&B credentials from the environment).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import yaml

from breakhis_ft.run.tracking import STEP, SUMMARY_METRICS

# the validation metrics shown as columns (value and interval), curves and parallel axes
VAL_METRICS = tuple(f"val/{name}" for name in SUMMARY_METRICS)
SELECTION = ("best/monitor", "best/value", "best/step")
CI_SUFFIX = "_ci95"  # metrics.json's interval key at evaluate.ci_level=0.95 (the default)
TRAINING_CURVES = ("train/loss", "train/lr")
PER_CLASS_TABLES = ("val/per_class", "test/per_class")
PER_CLASS_FIGURE = "plots/per_class_f1_test"


@dataclass(frozen=True)
class WorkspaceRequest:
    """What the workspace shows: which project (and group), and the keys a sweep varies."""

    entity: str
    project: str
    group: str | None = None  # a W&B group: an experiment, or <experiment>/<sweep folder>
    swept: tuple[str, ...] = ()  # config keys, e.g. peft.r; default: the sweep presets' keys
    log_scale: frozenset[str] = field(default_factory=frozenset)  # swept keys drawn on log axes
    name: str | None = None  # the saved view's name; default: breakhis-ft <group or project>


def preset_swept_keys() -> tuple[tuple[str, ...], frozenset[str]]:
    """(keys, keys on a log scale) the installed sweep presets vary (conf/hparams_search):
    `hydra.sweeper.params`, a key on a log axis where its search is `tag(log, ...)`."""
    keys: dict[str, None] = {}
    log_scale = set()
    folder = files("breakhis_ft.conf").joinpath("hparams_search")
    for preset in sorted(folder.iterdir(), key=lambda p: p.name):
        if not preset.name.endswith(".yaml"):
            continue
        params = (yaml.safe_load(preset.read_text()) or {}).get("hydra", {}).get("sweeper", {})
        for key, search in (params.get("params") or {}).items():
            keys[key] = None
            if "tag(log" in str(search).replace(" ", ""):
                log_scale.add(key)
    return tuple(keys), frozenset(log_scale)


def _column(key: str) -> str:
    """A config key as the runs table's column name (the W&B config nests each top-level key
    under `value`: peft.r is config:peft.value.r)."""
    head, _, rest = key.partition(".")
    return f"config:{head}.value" + (f".{rest}" if rest else "")


def build_workspace(request: WorkspaceRequest) -> Any:
    """The wandb_workspaces Workspace of `request` (nothing is sent: `.save()` sends it)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    columns = ["run:displayName", "run:group", *(_column(k) for k in request.swept)]
    for metric in VAL_METRICS:
        columns += [f"summary:{metric}", f"summary:{metric}{CI_SUFFIX}"]
    columns += [f"summary:{key}" for key in SELECTION]
    runset = ws.RunsetSettings(
        groupby=[expr.Config("experiment_name")],
        filters=expr.And(expr.Metric("Group") == request.group) if request.group else "",
        pinned_columns=columns,
    )
    curves = [
        wr.LinePlot(title=metric, x=STEP, y=[metric], range_y=(0, 1)) for metric in VAL_METRICS
    ]
    curves.append(wr.LinePlot(title="val/class_nll (true class)", x=STEP, y=["val/class_nll"]))
    training = [wr.LinePlot(title=key, x=STEP, y=[key]) for key in TRAINING_CURVES]
    parallel = wr.ParallelCoordinatesPlot(
        title="swept keys against the validation headline",
        columns=[
            wr.ParallelCoordinatesPlotColumn(
                metric=wr.Config(key), log=True if key in request.log_scale else None
            )
            for key in request.swept
        ]
        + [
            wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(m))
            for m in ("val/balanced_accuracy", "val/f1_macro")
        ],
    )
    per_class = [wr.WeavePanelSummaryTable(table_name=t) for t in PER_CLASS_TABLES]
    per_class.append(wr.MediaBrowser(title="test F1 per class", media_keys=[PER_CLASS_FIGURE]))
    sections = [
        ws.Section(name="validation curves", panels=curves, is_open=True),
        ws.Section(name="sweep: parameters against validation", panels=[parallel], is_open=True),
        ws.Section(name="per-class F1 (tables: overall and per magnification)", panels=per_class),
        ws.Section(name="training (train/loss: the training objective)", panels=training),
    ]
    name = request.name or f"breakhis-ft {request.group or request.project}"
    return ws.Workspace(
        entity=request.entity,
        project=request.project,
        name=name,
        sections=sections,
        settings=ws.WorkspaceSettings(x_axis=STEP),
        runset_settings=runset,
    )


def workspace_spec(workspace: Any) -> dict[str, Any]:
    """The view W&B would save (its JSON), built offline."""
    return json.loads(workspace._to_model().model_dump_json(by_alias=True, exclude_none=True))


def swept_or_presets(swept: Sequence[str]) -> tuple[tuple[str, ...], frozenset[str]]:
    """The swept keys given, or the presets' (log axes as the presets search them)."""
    keys, log_scale = preset_swept_keys()
    return (tuple(swept), log_scale) if swept else (keys, log_scale)
