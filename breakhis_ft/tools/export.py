"""Export a trained run: the adapter merged into a standard transformers checkpoint, or alone.

breakhis-ft-export outputs/runs/demo/2025-01-01_10-00-00-000000 exports/demo_merged
breakhis-ft-export RUN exports/demo_adapter --adapter-only
breakhis-ft-export RUN exports/demo_merged --precision bf16 --wandb-artifact

Merged (MedGemma): loads with AutoModelForImageTextToText.from_pretrained(DIR) and
AutoProcessor.from_pretrained(DIR). Both kinds hold export_info.json (class names, prompt,
preprocessing, source run) and a model card (README.md, the Hub's metadata); classify with
`breakhis-ft-predict --model DIR images/`.
--wandb-artifact logs the adapter as a W&B `model` artifact (WANDB_API_KEY from the environment;
WANDB_MODE=offline or --wandb-mode offline to keep it local).
"""

from __future__ import annotations

import argparse
import sys

from breakhis_ft.deploy.export import (
    ExportError,
    export_adapter,
    export_merged,
    upload_adapter_artifact,
)
from breakhis_ft.deploy.predict import PredictError
from breakhis_ft.tools import run_tool, tool_parser


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = tool_parser("breakhis-ft-export", __doc__)
    parser.add_argument("run", help="a run folder (outputs/runs/<experiment>/<time>)")
    parser.add_argument("out", help="the folder to write (must be empty unless --overwrite)")
    parser.add_argument("--adapter-only", action="store_true", help="copy the adapter, no merge")
    parser.add_argument(
        "--precision", choices=("bf16", "fp32", "fp16"), help="merged weights' dtype (the run's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    parser.add_argument("--wandb-artifact", action="store_true", help="log the adapter to W&B")
    parser.add_argument("--artifact-name", help="default: <experiment>-<model>-<task>-adapter")
    parser.add_argument("--wandb-project", help="default: the run's logger.project")
    parser.add_argument("--wandb-entity", help="default: the run's logger.entity")
    parser.add_argument("--wandb-mode", choices=("online", "offline"), help="default: the run's")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export the run (and log the artifact when asked); 0 on success."""
    errors = (ExportError, PredictError, FileNotFoundError)
    return run_tool(build_parser(), export, argv, errors, log=True)


def export(args: argparse.Namespace) -> int:
    """Write the merged model or the adapter into args.out; log the W&B artifact if asked."""
    if args.adapter_only:
        out = export_adapter(args.run, args.out, overwrite=args.overwrite)
    else:
        out = export_merged(
            args.run, args.out, args.precision, overwrite=args.overwrite, overrides=args.set
        )
    print(f"exported to {out}", file=sys.stderr)
    if args.wandb_artifact:
        name = upload_adapter_artifact(
            args.run, args.artifact_name, args.wandb_project, args.wandb_entity, args.wandb_mode
        )
        print(f"logged W&B artifact {name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
