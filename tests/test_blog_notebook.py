"""The blog notebook's protocol, piece by piece: prompt text, answer regex, the 13412 leak."""

from __future__ import annotations

import pytest

from breakhis_ft.config import PromptConfig, SplitConfig
from breakhis_ft.data.breakhis import FoldsTable, data_stats, scan_breakhis
from breakhis_ft.data.records import class_names
from breakhis_ft.data.splits import assign_splits, duplicate_leaks
from breakhis_ft.models.prompts import make_prompt
from breakhis_ft.models.tiny import _corpus_words, build_tiny_tokenizer

# the notebook's prompt, character for character (docs/references.md)
NOTEBOOK_PROMPT = """Analyze this breast tissue histopathology image and classify it.

Classes (0-7):
0: benign_adenosis
1: benign_fibroadenoma
2: benign_phyllodes_tumor
3: benign_tubular_adenoma
4: malignant_ductal_carcinoma
5: malignant_lobular_carcinoma
6: malignant_mucinous_carcinoma
7: malignant_papillary_carcinoma

Answer with only the number (0-7):"""

BLOG = PromptConfig(style="numbered", class_names="blog", parse="blog_regex")


def test_blog_wording_is_the_notebooks_prompt() -> None:
    prompt = make_prompt(BLOG, class_names("subtype8"))
    assert prompt.user_text() == NOTEBOOK_PROMPT
    assert prompt.answers == tuple(str(i) for i in range(8))
    binary = make_prompt(PromptConfig(class_names="blog"), class_names("binary"))
    assert "0: benign\n1: malignant" in binary.user_text()


def test_tiny_tokenizer_spells_the_blog_prompt_in_known_words() -> None:
    tok = build_tiny_tokenizer(_corpus_words())
    ids = tok(NOTEBOOK_PROMPT, add_special_tokens=False)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert "<unk>" not in tokens and not any(t.startswith("<0x") for t in tokens)
    for word in ("▁malignant", "papillary", "▁benign", "tubular", "adenoma"):
        assert word in tokens, word
    assert tok.decode(ids) == NOTEBOOK_PROMPT


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4", 4),
        (" 7 ", 7),
        ("The answer is 5.", 5),
        ("Class: 3 (benign_tubular_adenoma)", 3),
        ("12", -1),  # the notebook's \b([0-7])\b: no lone digit
        ("8", -1),
        ("malignant_ductal_carcinoma", -1),  # no fallback to the class name
        ("", -1),
    ],
)
def test_blog_regex_parses_as_the_notebook(text: str, expected: int) -> None:
    assert make_prompt(BLOG, class_names("subtype8")).parse(text) == expected


def test_blog_regex_needs_numbers() -> None:
    with pytest.raises(ValueError, match="model.prompt.parse"):
        make_prompt(PromptConfig(style="letters", parse="blog_regex"), class_names("binary"))
    with pytest.raises(ValueError, match="model.prompt.class_names"):
        make_prompt(PromptConfig(class_names="folders"), class_names("binary"))


def _leaky_folds(scan) -> FoldsTable:
    """The replica's Folds.csv with fold 1 as the official files have it for slide 13412:
    the ductal copy in train, the lobular copy in test."""
    rows = []
    for fold, mag, grp, name in scan.folds.rows:
        if fold == 1 and "-13412-" in name:
            grp = "train" if "_DC-" in name else "test"
        rows.append((fold, mag, grp, name))
    return FoldsTable(scan.folds.source, rows)


def test_both_copies_of_13412_leak_into_test_and_are_counted(replica_root) -> None:
    scan = scan_breakhis(replica_root, duplicate_keep="both")
    assert {r.subtype for r in scan.records if r.patient == "13412"} == {
        "ductal_carcinoma",
        "lobular_carcinoma",
    }
    assert data_stats(scan)["duplicate_kept"] == {"13412": "both"}
    assert not scan.duplicates_dropped
    cfg = SplitConfig(kind="official_fold", group_by="patient", fold=1, val_fraction=0.0)
    splits = assign_splits(scan.records, cfg, "subtype8", [100], _leaky_folds(scan))
    lobular = [r for r in splits["test"] if r.patient == "13412"]
    ductal = {(r.magnification, r.seq) for r in splits["train"] if r.patient == "13412"}
    assert lobular and {r.subtype for r in lobular} == {"lobular_carcinoma"}
    expected = sum((r.magnification, r.seq) in ductal for r in lobular)
    assert expected > 0
    assert duplicate_leaks(splits) == {"val": 0, "test": expected}
    # one copy kept (the default): the same fold has no duplicate left to leak
    kept = scan_breakhis(replica_root)
    clean = assign_splits(kept.records, cfg, "subtype8", [100], _leaky_folds(kept))
    assert duplicate_leaks(clean) == {"val": 0, "test": 0}
    assert not [r for r in clean["test"] if r.patient == "13412"]
