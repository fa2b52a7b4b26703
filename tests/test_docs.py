"""The README and the manual point at things that exist: every relative link resolves, every
table the manual quotes from benchmarks/results/ is there, and the README opens with the two
commands the Makefile runs (mkdocs build --strict checks the site itself, in CI)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title")
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def pages() -> list[Path]:
    """README.md, the manual's pages and the results' pages (drafts in docs/_pending/ aside)."""
    docs = [p for p in (REPO / "docs").rglob("*.md") if "_pending" not in p.parts]
    docs = [p for p in docs if "results" not in p.relative_to(REPO / "docs").parts]
    results = (REPO / "benchmarks" / "results").rglob("*.md")
    return [REPO / "README.md", REPO / "benchmarks" / "README.md", *docs, *results]


def broken_links(page: Path) -> list[str]:
    """The relative links of a Markdown page (outside code blocks) whose file does not exist."""
    text = FENCE.sub("", page.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):  # a URL, or on this page
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == [], f"{page.relative_to(REPO)}: broken links"


def test_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("x")
    page.write_text(
        "[a](there.md) [b](there.md#part) [c](missing.md) ![d](gone.png) "
        "[e](https://example.org/x) [f](#top)\n```\n[g](in_code.md)\n```\n"
    )
    assert broken_links(page) == ["missing.md", "gone.png"]


def test_quoted_results_exist() -> None:
    quoted = [
        name for page in (REPO / "docs").glob("*.md") for name in SNIPPET.findall(page.read_text())
    ]
    assert quoted, "the benchmarks page quotes the results' tables"
    for name in quoted:
        assert (REPO / "benchmarks" / "results" / name).is_file(), name


def test_readme_opens_with_the_two_commands_the_makefile_runs() -> None:
    readme = (REPO / "README.md").read_text().splitlines()
    assert readme[0] == "# breakhis-ft" and readme[2] == "```bash" and readme[5] == "```"
    assert readme[3].startswith("make demo ") and readme[4].startswith("make test ")
    for target in ("demo", "test"):
        done = subprocess.run(
            ["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr


def tracked_files() -> list[str]:
    """The repository's files that git tracks or would (untracked, not ignored)."""
    return subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def test_no_file_cites_the_background_notes() -> None:
    notes = ("REFERENCE" + ".md", "research" + ".md")  # cite docs/references.md instead
    citing = []
    for name in tracked_files():
        path = REPO / name
        if path.is_file() and path.suffix in {".py", ".md", ".yaml", ".toml", ".txt", ""}:
            text = path.read_text(errors="ignore")
            citing += [f"{name}: {note}" for note in notes if note in text]
    assert citing == []


def slug(heading: str) -> str:
    """The anchor mkdocs gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def missing_reference_anchors(files: dict[str, str], references: str) -> list[str]:
    """The citations of a section of the references page (its name, `#`, an anchor) among `files`
    (name -> text) that name none of its headings."""
    anchors = {slug(h) for h in re.findall(r"^#+\s+(.+)$", references, re.MULTILINE)}
    return [
        f"{name}: #{anchor}"
        for name, text in files.items()
        for anchor in re.findall(r"references\.md#([\w-]+)", text)
        if anchor not in anchors
    ]


def test_every_citation_of_the_references_page_names_one_of_its_sections() -> None:
    files = {
        name: (REPO / name).read_text(errors="ignore")
        for name in tracked_files()
        if (REPO / name).is_file() and Path(name).suffix in {".py", ".md", ".yaml", ".toml"}
    }
    cited = [name for name, text in files.items() if "references.md" in text]
    assert len(cited) > 10  # code, configs and pages cite it
    assert missing_reference_anchors(files, (REPO / "docs" / "references.md").read_text()) == []
    # the check sees a wrong anchor
    page = "# References\n\n## The blog notebook\n\n## kaiko-ai/eva\n"
    cite = "references" + ".md#"  # split: this file's own text is scanned above
    wrong = {"a.md": f"[x]({cite}the-blog-notebook) [y]({cite}kaiko-aieva)"}
    wrong["b.yaml"] = f"# see docs/{cite}the-blog"
    assert missing_reference_anchors(wrong, page) == ["b.yaml: #the-blog"]
