"""The user's command-line tools, installed as `breakhis-ft-<tool>` ([project.scripts] in
pyproject.toml): report, predict, explain, export, estimate-vram, data-stats, make-replica,
download-breakhis, demo-metrics. Each module holds one tool's options and its `main(argv)`; the
work is done by the pipeline's stages (analysis, deploy, data, vram), which never import a tool.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


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


def log_to_stderr() -> None:
    """INFO messages of the library (loading, progress) on stderr, as `LEVEL logger: message`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
