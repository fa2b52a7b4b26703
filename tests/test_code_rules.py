"""Rules of the code itself, read from the package's source: a bad config is a ConfigError of the
config checks only, and only the model factory tells the model families apart by `model.kind`."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "breakhis_ft"
FAMILIES = {"medgemma", "siglip"}  # the values of model.kind


def _sources() -> Iterator[tuple[str, ast.AST]]:
    """(path relative to the repository, syntax tree) of every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(REPO)), ast.parse(path.read_text(), filename=str(path))


# where a bad config is found before anything runs: the compose-time checks, the schema (its
# resolvers), and the entrypoint's checks of its arguments and of a saved config it would compose
CONFIG_CHECKS = (
    "breakhis_ft/validate.py",
    "breakhis_ft/config.py",
    "breakhis_ft/run/cli.py",
    "breakhis_ft/run/saved_config.py",
)


def test_config_errors_are_raised_by_the_config_checks_only() -> None:
    """The stages raise their own errors (DeviceError, StainFitError, ModelLoadError, ...); the
    `config error: <key>: ...` line is validate.py's."""
    found = []
    for name, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                named = isinstance(raised, ast.Name) and raised.id == "ConfigError"
                if named and name not in CONFIG_CHECKS:
                    found.append(f"{name}:{node.lineno}: raise ConfigError")
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if "config error:" in node.value and name != "breakhis_ft/validate.py":
                    found.append(f"{name}:{node.lineno}: {node.value[:40]!r}")
    assert not found, "\n".join(found)


def test_model_families_are_told_apart_by_the_factory_only() -> None:
    """No `kind == "medgemma"` (or `!=`, `in`) outside models/factory.py: what differs between
    families is a method of the family's Classifier, or a table keyed by kind."""
    found = []
    for name, tree in _sources():
        if name == "breakhis_ft/models/factory.py":
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            about_kind = any("kind" in ast.unparse(o) for o in operands)
            constants = {
                n.value for o in operands for n in ast.walk(o) if isinstance(n, ast.Constant)
            }
            if about_kind and constants & FAMILIES:
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)
