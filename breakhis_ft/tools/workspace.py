"""Build the project's W&B dashboard: a saved workspace of a W&B project, or of one group in it.

breakhis-ft-workspace --entity my-team --project breakhis-ft
breakhis-ft-workspace --entity my-team --project breakhis-ft --group demo/2026-12-07_10-00-00
breakhis-ft-workspace --entity my-team --project breakhis-ft --swept peft.r trainer.lr --dry-run

Runs grouped by experiment, a runs table of the swept keys and the validation headline +- its
interval, validation curves, parallel coordinates over the swept keys, the per-class F1 tables.
Saving needs the W&B server (WANDB_API_KEY from the environment, or `wandb login`); the command
prints the workspace's URL. --dry-run prints the view's JSON and sends nothing.
Needs the optional extra: pip install 'breakhis-ft[workspace]' (wandb-workspaces).
"""

from __future__ import annotations

import argparse
import importlib.util
import json

from breakhis_ft.analysis.workspace import (
    WorkspaceRequest,
    build_workspace,
    swept_or_presets,
    workspace_spec,
)
from breakhis_ft.tools import run_tool, tool_parser


class WorkspaceError(Exception):
    """The workspace cannot be built or saved (missing extra, W&B refused it)."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = tool_parser("breakhis-ft-workspace", __doc__)
    parser.add_argument("--entity", required=True, help="the W&B entity (user or team)")
    parser.add_argument("--project", required=True, help="the W&B project (logger.project)")
    parser.add_argument("--group", help="one W&B group: an experiment, or <experiment>/<sweep>")
    parser.add_argument(
        "--swept",
        nargs="+",
        default=[],
        metavar="KEY",
        help="config keys the runs vary (default: those of conf/hparams_search's presets)",
    )
    parser.add_argument("--name", help="the saved view's name (default: breakhis-ft <group>)")
    parser.add_argument("--dry-run", action="store_true", help="print the view's JSON, send none")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build the workspace; save it (or print it with --dry-run); 0 on success."""
    return run_tool(build_parser(), workspace, argv, (WorkspaceError,))


def workspace(args: argparse.Namespace) -> int:
    """Build the workspace the options ask for; print its spec or save it and print its URL."""
    if importlib.util.find_spec("wandb_workspaces") is None:
        raise WorkspaceError(
            "breakhis-ft-workspace needs wandb-workspaces: pip install 'breakhis-ft[workspace]'"
        )
    swept, log_scale = swept_or_presets(args.swept)
    request = WorkspaceRequest(args.entity, args.project, args.group, swept, log_scale, args.name)
    built = build_workspace(request)
    if args.dry_run:
        print(json.dumps(workspace_spec(built), indent=2))
        return 0
    try:
        saved = built.save()
    except Exception as err:  # the W&B client's errors (no key, no network, refused) vary
        raise WorkspaceError(
            f"W&B did not save the workspace ({type(err).__name__}: {err})"
        ) from err
    print(saved.url)
    return 0
