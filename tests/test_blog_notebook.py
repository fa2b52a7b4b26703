"""The blog notebook's protocol, piece by piece: prompt text, answer regex, the 13412 leak, the
balanced subset."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from breakhis_ft.config import MedGemmaConfig, PeftConfig, PromptConfig, SplitConfig
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
CLASSES = class_names("subtype8")


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


def _notebook_draw(folds_csv: Path, grp: str) -> list[str]:
    """The notebook's balanced subset of fold 1 at 100X, its own pandas code on Folds.csv."""
    pd = pytest.importorskip("pandas")
    folds = pd.read_csv(folds_csv)
    folds_100x = folds[(folds["mag"] == 100) & (folds["fold"] == 1)]
    part = folds_100x[folds_100x["grp"] == grp]
    benign = part[part["filename"].str.contains("benign")]
    malignant = part[part["filename"].str.contains("malignant")]
    n = min(len(benign), len(malignant))
    assert n < max(len(benign), len(malignant))  # the draw decides which images are kept
    drawn = pd.concat([benign.sample(n=n, random_state=42), malignant.sample(n=n, random_state=42)])
    return sorted(name.rsplit("/", 1)[-1] for name in drawn["filename"])


def test_the_notebook_presets_subset_is_the_images_pandas_draws(replica_root: Path) -> None:
    scan = scan_breakhis(replica_root, duplicate_keep="both")
    cfg = SplitConfig(
        kind="official_fold",
        group_by="patient",
        fold=1,
        val_fraction=0.0,
        balance_binary=1.0,
        balance_splits=["train", "test"],
        balance_draw="pandas",
        seed=42,
    )
    splits = assign_splits(scan.records, cfg, "subtype8", [100], scan.folds)
    seeded = assign_splits(
        scan.records, replace(cfg, balance_draw="seeded"), "subtype8", [100], scan.folds
    )
    for grp in ("train", "test"):
        expected = _notebook_draw(replica_root / "Folds.csv", grp)
        assert sorted(r.path.rsplit("/", 1)[-1] for r in splits[grp]) == expected
        assert sorted(r.path.rsplit("/", 1)[-1] for r in seeded[grp]) != expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Gemma 3 (built once per session)."""
    from helpers.medgemma_toy import tiny_path

    return tiny_path(tmp_path_factory)


def _blog_classifier(path: Path, add_special_tokens: bool):
    """The tiny model with the notebook preset's prompt and loss (fp32, LoRA)."""
    from helpers.builders import build

    model_cfg = MedGemmaConfig(
        name_or_path=str(path),
        loss_on="all_text",
        add_special_tokens=add_special_tokens,
        prompt=BLOG,
    )
    return build(model_cfg, PeftConfig(target_modules="all-linear"), "fp32", CLASSES)


def test_the_preset_tokenises_as_the_notebook_double_bos_with_medgemmas_tokenizer(tiny) -> None:
    nb = pytest.importorskip("benchmarks.notebook")  # trl
    from helpers.medgemma_toy import examples

    example = examples(1, seed=0)[0]
    messages = nb.format_messages(nb.BLOG_PROMPT, "0")  # class 0's answer, as example's label
    notebook_example = {"image": example["image"], "messages": messages}
    preset = _blog_classifier(tiny, add_special_tokens=True)  # blog_notebook_100x
    corrected = _blog_classifier(tiny, add_special_tokens=False)  # every other preset
    bos = preset.processor.tokenizer.bos_token_id

    def starts(ids) -> list[int]:
        return ids[0, :3].tolist()

    # the tiny tokenizer adds no <bos> of its own: the notebook's call gives the template's one
    notebook = nb.make_collate_fn(preset.processor)([notebook_example])
    assert starts(notebook["input_ids"]).count(bos) == 1
    # MedGemma's tokenizer adds one (add_bos_token): the notebook's call then gives two, and so
    # does the preset, token for token, labels too; the other presets keep the template's one
    for clf in (preset, corrected):
        clf.processor.tokenizer.add_bos_token = True
    notebook = nb.make_collate_fn(preset.processor)([notebook_example])
    ours = preset.collate([example], train=True)
    assert starts(notebook["input_ids"])[:2] == [bos, bos]
    assert torch.equal(ours["input_ids"], notebook["input_ids"])
    assert torch.equal(ours["labels"], notebook["labels"])
    single = corrected.collate([example], train=True)["input_ids"]
    assert starts(single).count(bos) == 1 and torch.equal(single[0], ours["input_ids"][0, 1:])
    # the prompt-only batches of the evaluation too
    assert starts(preset.collate([example], train=False)["input_ids"])[:2] == [bos, bos]
