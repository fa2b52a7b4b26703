"""Secrets never leave the process: values of secret-looking keys are masked wherever a run
records its configuration (run_info.json, .hydra/*.yaml, the log, W&B config and run name).

The rule (`is_secret_key`), on the words of a key's last dotted part (split at `_`, `-` and
camelCase, lower-cased; `api key` and `api keys` count as one word, `apikey`):

1. a word contains `secret`, `password`, `passwd`, `passphrase` or `credential`, or is `auth`,
   `authorization`, `bearer` or `cookie`: always secret (`client_secret_id`, `credentials`);
2. a word is `token`, `tokens`, `key` or `apikey`: secret (`hf_token`, `my_token_value`,
   `auth_tokens`, `WANDB_API_KEY`, `apiKeys`), unless another word says that the key counts,
   limits or identifies tokens rather than holding one: `max`, `min`, `num`, `n`, `new`, `count`,
   `length`, `len`, `limit`, `budget`, `size`, `per`, `id`, `ids`, `idx`, `index`, `type`,
   `types` (`max_new_tokens`, `pad_token_id`, `token_budget`, `token_type_ids` stay readable).

Words are whole words: `tokenizer`, `keyboard` and `exclude_keys` (`keys` alone names a list of
key names) are no secrets. A masked value is a string or a number; a list or a mapping under a
secret-looking key is not masked, its own keys are checked.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_ALWAYS_SECRET_PARTS = ("secret", "password", "passwd", "passphrase", "credential")
_ALWAYS_SECRET_WORDS = {"auth", "authorization", "bearer", "cookie"}
_TOKEN_WORDS = {"token", "tokens", "key", "apikey"}
# words that make a token word a count, a limit or an identifier of tokens, not a secret
_NOT_A_SECRET_WORDS = {
    "max",
    "min",
    "num",
    "n",
    "new",
    "count",
    "length",
    "len",
    "limit",
    "budget",
    "size",
    "per",
    "id",
    "ids",
    "idx",
    "index",
    "type",
    "types",
}
# `key=value` inside a string (a command-line override, Hydra's override_dirname "a=1,b=2")
_ASSIGNMENT = re.compile(r"(?P<key>[\w.+~@/-]+)=(?P<value>[^,\s]+)")


def key_words(key: str) -> list[str]:
    """The lower-case words of a key's last dotted part (`+a.WANDB_API_KEY` -> wandb, api, key)."""
    last = str(key).lstrip("+~").rsplit(".", 1)[-1]
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", last).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    return re.sub(r"\bapi (keys?)\b", "apikey", " ".join(words)).split()


def is_secret_key(key: str) -> bool:
    """Whether a config key or override key (`+hf_token`, `a.b.WANDB_API_KEY`) holds a secret, by
    the rule in this module's docstring."""
    words = key_words(key)
    if any(part in w for w in words for part in _ALWAYS_SECRET_PARTS):
        return True
    if _ALWAYS_SECRET_WORDS.intersection(words):
        return True
    return bool(_TOKEN_WORDS.intersection(words)) and not _NOT_A_SECRET_WORDS.intersection(words)


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
