"""Classification prompts for MedGemma: the question, the answer of each class, and answer parsing.

Two styles, chosen by `model.prompt.style`:
- `numbered` (the BreakHis blog): classes listed `0: adenosis` ..., then "Answer with only the
  number (0-7):"; the target is the digit.
- `letters` (Google's MedGemma notebook): options `A: adenosis` ..., the target is the whole option.
Both give answers whose first tokens differ (a digit or a letter), which label scoring relies on.
The options name the classes in words (`plain`: `ductal carcinoma`) or as the blog notebook did
(`blog`: `malignant_ductal_carcinoma`, its folder-derived names); `model.prompt.parse` maps a
generated answer back to a class (`key_or_name`, or the notebook's `blog_regex`).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

from breakhis_ft.config import PromptConfig
from breakhis_ft.data.records import SUBTYPES

STYLES = ("numbered", "letters")
WORDINGS = ("plain", "blog")
PARSERS = ("key_or_name", "blog_regex")


def display_name(class_name: str) -> str:
    """A class name as words in a prompt: `ductal_carcinoma` -> `ductal carcinoma`."""
    return class_name.replace("_", " ")


def blog_name(class_name: str) -> str:
    """The blog notebook's option text: `ductal_carcinoma` -> `malignant_ductal_carcinoma`."""
    if class_name in SUBTYPES:
        return f"{SUBTYPES[class_name][1]}_{class_name}"
    return class_name  # benign / malignant: already the notebook's words


@dataclass(frozen=True)
class ClassPrompt:
    """The prompt of one task: user text, per-class answers, chat messages and answer parsing."""

    style: str
    instruction: str
    class_names: tuple[str, ...]
    system: str | None = None
    wording: str = "plain"  # model.prompt.class_names
    parser: str = "key_or_name"  # model.prompt.parse

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("style", self.style, STYLES),
            ("class_names", self.wording, WORDINGS),
            ("parse", self.parser, PARSERS),
        ):
            if value not in allowed:
                raise ValueError(
                    f"model.prompt.{key}: got {value!r}, allowed: {', '.join(allowed)}"
                )
        if self.parser == "blog_regex" and self.style != "numbered":
            raise ValueError(
                "model.prompt.parse: blog_regex reads a digit, it needs model.prompt.style=numbered"
            )
        limit = 10 if self.style == "numbered" else 26
        if not 2 <= len(self.class_names) <= limit:
            raise ValueError(
                f"model.prompt.style={self.style} handles 2-{limit} classes, "
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

    def option_name(self, class_name: str) -> str:
        """How the options (and letter answers) name a class under `wording`."""
        return blog_name(class_name) if self.wording == "blog" else display_name(class_name)

    def _options(self) -> list[tuple[str, str]]:
        return list(zip(self.keys, map(self.option_name, self.class_names), strict=True))

    @property
    def answers(self) -> tuple[str, ...]:
        """The target answer string of each class, in class order."""
        if self.style == "numbered":
            return self.keys
        return tuple(f"{k}: {name}" for k, name in self._options())

    def user_text(self) -> str:
        """The text of the user turn (the image comes before it)."""
        options = "\n".join(f"{k}: {name}" for k, name in self._options())
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
        if self.parser == "blog_regex":  # the notebook: a lone digit 0-(n-1), else unparseable
            match = re.search(rf"\b([0-{len(self.class_names) - 1}])\b", text)
            return int(match.group(1)) if match else -1
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
        named = [i for i, c in enumerate(self.class_names) if self.option_name(c) in lowered]
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
        wording=str(cfg.class_names),
        parser=str(cfg.parse),
    )
