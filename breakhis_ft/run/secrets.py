"""Secrets never leave the process: values of secret-looking keys are masked wherever a run
records its configuration (run_info.json, .hydra/*.yaml, W&B config and run name)."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# the last word of a secret-looking key (hf_token, WANDB_API_KEY, apiKey); matched as a word so
# that max_new_tokens, pad_token_id or exclude_keys (config keys, not secrets) stay readable
_SECRET_LAST_WORDS = {"token", "key", "apikey", "secret", "password", "passwd"}
_SECRET_ANYWHERE = ("secret", "password")  # client_secret_id, password_file
# `key=value` inside a string (a command-line override, Hydra's override_dirname "a=1,b=2")
_ASSIGNMENT = re.compile(r"(?P<key>[\w.+~@/-]+)=(?P<value>[^,\s]+)")


def is_secret_key(key: str) -> bool:
    """Whether a config key or override key (`+hf_token`, `a.b.WANDB_API_KEY`) looks secret."""
    last = str(key).lstrip("+~").rsplit(".", 1)[-1]
    words = re.split(r"[^a-z0-9]+", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", last).lower())
    words = [w for w in words if w]
    if not words:
        return False
    return words[-1] in _SECRET_LAST_WORDS or any(s in w for w in words for s in _SECRET_ANYWHERE)


def _mask_assignment(match: re.Match[str]) -> str:
    return f"{match['key']}={MASK}" if is_secret_key(match["key"]) else match[0]


def mask_secrets(value: Any) -> Any:
    """A copy with the value of every secret-looking key masked: in nested dicts and lists, and in
    `key=value` strings (overrides, command lines); other values are returned as they are."""
    if isinstance(value, dict):
        return {k: MASK if _is_secret_leaf(k, v) else mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_secrets(v) for v in value]
    if isinstance(value, str) and "=" in value:
        return _ASSIGNMENT.sub(_mask_assignment, value)
    return value


def _is_secret_leaf(key: Any, value: Any) -> bool:
    # a container under a secret-looking key holds no secret itself; its own keys are checked
    scalar = isinstance(value, str | int | float) and not isinstance(value, bool)
    return scalar and value != "" and is_secret_key(str(key))
