"""Third-party libraries in a breakhis-ft process: bitsandbytes imported only where 4-bit or 8-bit
is used, and the libraries' warnings, log records and progress bars kept off the terminal (a run
keeps them in its log file).

bitsandbytes: peft imports it whenever it is installed (`peft.helpers`; transformers.trainer_utils
imports peft), and importing it where its compiled kernels are not trusted or not built logs
"Failed to load CPU gemm_4bit_forward from kernels-community ..." and costs seconds, in every run
and every tool. The entrypoints hold it back (`defer_bitsandbytes`, before anything imports
peft); the code that loads a 4-bit model or builds an 8-bit optimizer lets it in first
(`enable_bitsandbytes`). Held back is `sys.modules["bitsandbytes"] = None`: `import bitsandbytes`
raises ImportError and `importlib.util.find_spec` answers None, which is how peft, transformers
and accelerate decide that it is not installed (their is_bnb_available checks), so none of them
imports it.

A leaf module: it imports the standard library only; `route_library_logs` imports the libraries'
logging modules when it is called.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from typing import Any

BITSANDBYTES = "bitsandbytes"
# loggers whose records the terminal shows at every level: the project's, Hydra's (a sweep's
# "Launching jobs") and a script run as __main__; any other logger's only from ERROR up
OWN_LOGGERS = ("breakhis_ft", "hydra", "hydra_plugins", "benchmarks", "__main__")
# the libraries' "is bitsandbytes installed" checks that cache their answer (functools.lru_cache):
# asked while it was held back they answered no, so they are cleared when it is let in
CACHED_CHECKS = (
    ("peft.import_utils", ("is_bnb_available", "is_bnb_4bit_available")),
    ("transformers.utils.import_utils", ("is_bitsandbytes_available",)),
    (
        "accelerate.utils.imports",
        ("is_bnb_available", "is_4bit_bnb_available", "is_8bit_bnb_available"),
    ),
)
# libraries that log to stderr through handlers of their own: routed to the root logger instead
OWN_HANDLER_LIBRARIES = ("huggingface_hub", "datasets")


def defer_bitsandbytes() -> None:
    """Hold bitsandbytes back from imports until `enable_bitsandbytes` (no-op once imported)."""
    sys.modules.setdefault(BITSANDBYTES, None)  # type: ignore[arg-type]


def bitsandbytes_deferred() -> bool:
    """Whether this process holds bitsandbytes back."""
    return BITSANDBYTES in sys.modules and sys.modules[BITSANDBYTES] is None


def bitsandbytes_installed() -> bool:
    """Whether bitsandbytes is installed (held back or not)."""
    try:
        importlib.metadata.version(BITSANDBYTES)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def enable_bitsandbytes() -> None:
    """Let bitsandbytes be imported (a 4-bit model, an 8-bit optimizer), and tell peft, which may
    have cached "not installed" or imported without it, that it is there."""
    if not bitsandbytes_deferred():
        return
    del sys.modules[BITSANDBYTES]
    for module, names in CACHED_CHECKS:
        checks = sys.modules.get(module)
        for name in names:
            cache_clear = getattr(getattr(checks, name, None), "cache_clear", None)
            if cache_clear is not None:
                cache_clear()
    helpers = sys.modules.get("peft.helpers")
    if helpers is not None and getattr(helpers, "bnb", False) is None and bitsandbytes_installed():
        import bitsandbytes

        helpers.bnb = bitsandbytes  # type: ignore[attr-defined]


class ThirdPartyFilter(logging.Filter):
    """On a console handler: the project's records at every level, other libraries' (and
    Python warnings, captured as `py.warnings` records) only from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether the console shows the record."""
        if record.levelno >= logging.ERROR or getattr(record, "bare", False):
            return True
        return record.name == "root" or record.name.split(".")[0] in OWN_LOGGERS


def _no_bar(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """transformers' tqdm hook: its bars built disabled (the "Loading weights" bar)."""
    return factory(*args, **{**kwargs, "disable": True})


def route_library_logs() -> None:
    """Python warnings, and transformers', huggingface_hub's and datasets' log records, through
    the root logger (the run's log file; the console's ThirdPartyFilter) instead of stderr; no
    progress bars from transformers (huggingface_hub's download bars stay). Imports transformers'
    logging module: call it where the process is about to load the libraries anyway."""
    logging.captureWarnings(True)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    transformers_logging.set_tqdm_hook(_no_bar)
    import datasets.utils.logging  # noqa: F401 - adds its stderr handler, removed below
    import huggingface_hub.utils.logging  # noqa: F401

    for name in OWN_HANDLER_LIBRARIES:
        library = logging.getLogger(name)
        for handler in [h for h in library.handlers if type(h) is logging.StreamHandler]:
            library.removeHandler(handler)
        library.propagate = True


def add_console_filter(
    handler: logging.Handler, kind: type[ThirdPartyFilter] = ThirdPartyFilter
) -> None:
    """Put a ThirdPartyFilter (of `kind`) on a console handler, once."""
    if not any(isinstance(f, kind) for f in handler.filters):
        handler.addFilter(kind())
