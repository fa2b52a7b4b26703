"""The user's command-line tools, installed as `breakhis-ft-<tool>` ([project.scripts] in
pyproject.toml): report, predict, explain, export, estimate-vram, data-stats, make-replica,
download-breakhis, demo-metrics, stain-preview. Each module holds one tool's options and its
`main(argv)`; the work is done by the pipeline's stages (analysis, deploy, data, vram), which
never import a tool.

Importing this package holds bitsandbytes back for the process (third_party.py): a tool module
imports peft, which would import it, before its `main` runs; a tool that loads a 4-bit model lets
it in where it loads it. The terminal shows the project's messages; other libraries' records
and Python warnings only from ERROR up (`console_logging`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from breakhis_ft.third_party import add_console_filter, defer_bitsandbytes, route_library_logs

defer_bitsandbytes()  # before the tool's module imports peft


def tool_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A tool's parser: its installed name, its docstring's first line as the description."""
    return argparse.ArgumentParser(
        prog=prog,
        description=doc.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """A trained run or an export to load, images to give it, and how to load it (predict,
    explain)."""
    parser.add_argument(
        "source", nargs="?", help="a run folder (outputs/runs/<experiment>/<time>); or use --model"
    )
    parser.add_argument("inputs", nargs="*", help="image files and folders (searched recursively)")
    parser.add_argument("--model", help="an exported model folder (breakhis-ft-export)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    parser.add_argument("--precision", choices=("bf16", "fp32", "fp16"), help="default: the run's")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the run's config, e.g. model.name_or_path=/local/medgemma-4b-it",
    )


@contextmanager
def user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """End the command with `error: <message>` (status 1, no traceback) on these error types:
    the ones whose message already names the file or option at fault and what would fix it."""
    try:
        yield
    except kinds as err:
        message, cause = str(err), str(err.__cause__ or "")
        if cause and cause not in message:  # Hydra's "Error merging override" wraps the reason
            message += f" ({cause})"
        raise SystemExit(f"error: {message}") from err


def console_logging(verbose: bool) -> None:
    """Log records on stderr: with `verbose` the project's INFO messages (loading, progress) as
    `LEVEL logger: message`, else its warnings as bare messages; other libraries' records (their
    own stderr handlers replaced, transformers' progress bars off) and Python warnings only from
    ERROR up."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        route_library_logs()  # a tool that loads models: transformers is imported already
    else:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            add_console_filter(handler)


def run_tool(
    parser: argparse.ArgumentParser,
    work: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
    errors: tuple[type[Exception], ...],
    log: bool = False,
) -> int:
    """A tool's `main`: parse argv, show the library's messages if `log` (`console_logging`), run
    `work(args)` and end on the user's `errors` with their message (user_errors); `work`'s exit
    status."""
    args = parser.parse_args(argv)
    console_logging(log)
    with user_errors(*errors):
        return work(args)
