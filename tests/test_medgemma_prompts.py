"""Prompts: the blog's numbered prompt, Google's letter options, answers and answer parsing."""

from __future__ import annotations

import pytest

from breakhis_ft.config import PromptConfig
from breakhis_ft.data.records import class_names
from breakhis_ft.models.prompts import make_prompt
from breakhis_ft.models.tiny import _corpus_words, build_tiny_tokenizer


def test_numbered_prompt_is_the_blogs():
    prompt = make_prompt(PromptConfig(style="numbered"), class_names("subtype8"))
    text = prompt.user_text()
    assert text.startswith("Analyze this breast tissue histopathology image and classify it.")
    assert "Classes (0-7):\n0: adenosis\n1: fibroadenoma" in text
    assert "7: papillary carcinoma" in text
    assert text.endswith("Answer with only the number (0-7):")
    assert prompt.answers == tuple(str(i) for i in range(8))


def test_letters_prompt_lists_options_and_answers_the_option():
    prompt = make_prompt(PromptConfig(style="letters"), class_names("binary"))
    assert prompt.user_text().endswith("\nA: benign\nB: malignant")
    assert prompt.answers == ("A: benign", "B: malignant")
    eva = make_prompt(PromptConfig(style="letters"), class_names("eva4"))
    assert eva.answers[3] == "D: ductal carcinoma"


def test_messages_put_the_image_before_the_text_and_the_system_first():
    prompt = make_prompt(PromptConfig(system="You are a pathologist."), class_names("binary"))
    messages = prompt.messages(answer="1")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"][0] == {"type": "image"}
    assert messages[2]["content"][0]["text"] == "1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", 3),
        (" 7<eos>", 7),
        ("The answer is 5.", 5),
        ("9", -1),
        ("", -1),
        ("none", -1),
        ("mucinous carcinoma", 6),
        ("carcinoma", -1),
    ],
)
def test_numbered_parse_never_guesses(text, expected):
    prompt = make_prompt(PromptConfig(style="numbered"), class_names("subtype8"))
    assert prompt.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B: mucinous carcinoma", 1),
        ("B", 1),
        ("D", 3),
        ("(A) tubular adenoma", 0),
        ("Z: x", -1),
        ("fibroadenoma", 2),
        ("Answer", -1),
        ("", -1),
    ],
)
def test_letters_parse(text, expected):
    prompt = make_prompt(PromptConfig(style="letters"), class_names("eva4"))
    assert prompt.parse(text) == expected


def test_bad_style_and_too_many_classes_are_errors():
    with pytest.raises(ValueError, match="model.prompt.style"):
        make_prompt(PromptConfig(style="free"), class_names("binary"))
    with pytest.raises(ValueError, match="2-10 classes"):
        make_prompt(PromptConfig(style="numbered"), tuple(f"c{i}" for i in range(11)))


def test_tiny_tokenizer_knows_every_class_word():
    tokenizer = build_tiny_tokenizer(_corpus_words())
    for names in (class_names(t) for t in ("subtype8", "binary", "eva4")):
        for name in names:
            for word in name.split("_"):
                ids = tokenizer(f"x {word}", add_special_tokens=False)["input_ids"]
                assert tokenizer.convert_ids_to_tokens(ids)[-1] == f"▁{word}"
    # digits and capitals are single tokens, so answers' first tokens are distinct
    for key in "0123456789ABCDEFGH":
        assert len(tokenizer(key, add_special_tokens=False)["input_ids"]) == 1
    eot = tokenizer("<end_of_turn>", add_special_tokens=False)["input_ids"]
    assert eot == [tokenizer.convert_tokens_to_ids("<end_of_turn>")]
