"""Classification prompts for MedGemma: the question, the answer of each class, and answer parsing.

Two styles, chosen by `model.prompt.style`:
- `numbered` (the BreakHis blog): classes listed `0: adenosis` ..., then "Answer with only the
  number (0-7):"; the target is the digit.
- `letters` (Google's MedGemma notebook): options `A: adenosis` ..., the target is the whole option.
Both give answers whose first tokens differ (a digit or a letter), which label scoring relies on.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

from breakhis_ft.config import PromptConfig
from breakhis_ft.errors import ConfigError

STYLES = ("numbered", "letters")


def display_name(class_name: str) -> str:
    """A class name as words in a prompt: `ductal_carcinoma` -> `ductal carcinoma`."""
    return class_name.replace("_", " ")


@dataclass(frozen=True)
class ClassPrompt:
    """The prompt of one task: user text, per-class answers, chat messages and answer parsing."""

    style: str
    instruction: str
    class_names: tuple[str, ...]
    system: str | None = None

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ConfigError(
                f"config error: model.prompt.style: got {self.style!r}, "
                f"allowed: {', '.join(STYLES)}"
            )
        limit = 10 if self.style == "numbered" else 26
        if not 2 <= len(self.class_names) <= limit:
            raise ConfigError(
                f"config error: model.prompt.style={self.style} handles 2-{limit} classes, "
                f"got {len(self.class_names)}"
            )

    @property
    def keys(self) -> tuple[str, ...]:
        """The option key of each class: digits 0.. or letters A.."""
        n = len(self.class_names)
        return (
            tuple(str(i) for i in range(n))
            if self.style == "numbered"
            else tuple(string.ascii_uppercase[:n])
        )

    def _options(self) -> list[tuple[str, str]]:
        return list(zip(self.keys, self.class_names, strict=True))

    @property
    def answers(self) -> tuple[str, ...]:
        """The target answer string of each class, in class order."""
        if self.style == "numbered":
            return self.keys
        return tuple(f"{k}: {display_name(c)}" for k, c in self._options())

    def user_text(self) -> str:
        """The text of the user turn (the image comes before it)."""
        options = "\n".join(f"{k}: {display_name(c)}" for k, c in self._options())
        if self.style == "numbered":
            last = len(self.class_names) - 1
            return (
                f"{self.instruction}\n\nClasses (0-{last}):\n{options}\n\n"
                f"Answer with only the number (0-{last}):"
            )
        return f"{self.instruction}\n{options}"

    def messages(self, answer: str | None = None) -> list[dict[str, Any]]:
        """Chat messages (system, user with image and text, and the assistant answer if given)."""
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        messages.append(
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": self.user_text()}],
            }
        )
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return messages

    def parse(self, text: str) -> int:
        """The class index a generated answer names, or -1 when it names none (never guessed)."""
        text = text.strip()
        if self.style == "numbered":
            match = re.search(r"\d+", text)
            if match and int(match.group()) < len(self.class_names):
                return int(match.group())
        else:
            match = re.match(r"\(?([A-Z])\)?(?=[:.)\s]|$)", text)
            if match and match.group(1) in self.keys:
                return self.keys.index(match.group(1))
        # The answer may name the class in words instead; accept it only when exactly one matches.
        lowered = text.lower()
        named = [i for i, c in enumerate(self.class_names) if display_name(c) in lowered]
        return named[0] if len(named) == 1 else -1

    def corpus(self) -> str:
        """All text this prompt can produce (used to give the tiny tokenizer its words)."""
        parts = [self.user_text(), *self.answers, self.system or ""]
        return "\n".join(parts)


def make_prompt(cfg: PromptConfig | Any, class_names: tuple[str, ...] | list[str]) -> ClassPrompt:
    """Build the ClassPrompt of a task from `model.prompt` and the task's class names."""
    return ClassPrompt(
        style=str(cfg.style),
        instruction=str(cfg.instruction),
        class_names=tuple(class_names),
        system=None if cfg.system in (None, "") else str(cfg.system),
    )
