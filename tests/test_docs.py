"""The README is a landing page and the depth lives in docs/: every relative link and picture
in README.md and docs/*.md must point at a file that exists (and at a heading that exists,
where it names one), the README must stay short, and docs/ must carry every row of the
tables `make bench-quality` generates (bench/QUALITY.md). Plain text checks: nothing here
needs ComfyUI or torch beyond what the suite's conftest sets up."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target) and ![alt](target)
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.I)
EXTERNAL = ("http://", "https://", "mailto:")


def targets(text: str) -> list[str]:
    """The link and image targets of a markdown page, code blocks and code spans left out."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return LINK.findall(prose) + HTML_SRC.findall(prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a markdown page, repeated headings numbered as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return found


def shown(file: Path) -> str:
    return str(file.relative_to(REPO)) if file.is_relative_to(REPO) else str(file)


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in targets(page.read_text()):
        if target.startswith(EXTERNAL):
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: {shown(file)} does not exist")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            problems.append(f"{target}: no heading '#{fragment}' in {shown(file)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_and_pictures_resolve(page):
    problems = broken_links(page)
    assert not problems, f"{page.relative_to(REPO)}: fix or remove these links:\n" + "\n".join(problems)


def test_readme_is_a_landing_page():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, at most {README_MAX_LINES}: move the depth into a page in docs/ and link it")


def test_docs_carry_the_generated_quality_tables():
    """bench/QUALITY.md is what scripts/bench_quality.py writes from bench/quality.json; the
    docs copy its tables with the reading of each, so a re-measured report must be copied too."""
    generated = (REPO / "bench" / "QUALITY.md").read_text().splitlines()
    docs = {line.rstrip() for page in (REPO / "docs").glob("*.md") for line in page.read_text().splitlines()}
    rows = [line.rstrip() for line in generated if line.startswith("|") and not re.fullmatch(r"[|\-: ]+", line.strip())]
    missing = [row for row in rows if row not in docs]
    assert rows, "bench/QUALITY.md holds no table rows"
    assert not missing, (f"{len(missing)} of bench/QUALITY.md's {len(rows)} table rows are not in docs/ "
                         "(quality.md; the M-Score table in mscore.md): copy the regenerated tables, e.g.\n"
                         + "\n".join(missing[:5]))


def test_the_link_check_sees_broken_links(tmp_path):
    """The checker itself: a missing file, a missing heading and a missing picture are found,
    code and external links are not read as links."""
    (tmp_path / "other.md").write_text("# A heading: with `code`\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading-with-code) [ok](other.md#twice-1) [ok](#local)\n"
                    "# Local\n![pic](missing.png) [gone](nowhere.md) [bad](other.md#nope)\n"
                    "`[not](a-link.md)` [web](https://example.com/x.md)\n```\n[code](block.md)\n```\n")
    problems = broken_links(page)
    assert [p.split(":")[0] for p in problems] == ["missing.png", "nowhere.md", "other.md#nope"], problems
