"""Long pages open with a table of contents that matches their headings, and docs/index.md links
every page. The contents are generated (``python tests/test_contents.py`` rewrites them) and this
test regenerates and compares, so a renamed or added section cannot leave a stale link."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
LONG = 300  # lines: a page longer than this gets contents
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
BLOCK = re.compile(r"<!-- contents:begin -->\n(.*?)<!-- contents:end -->\n", re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(text: str) -> list[tuple[int, str]]:
    """The ``##`` and ``###`` headings outside code blocks, with their level."""
    text = FENCE.sub("", text)
    return [(len(m[1]), m[2]) for m in re.finditer(r"^(#{2,3}) (.+)$", text, re.M)]


def contents(text: str) -> str:
    """The contents list: every ``##`` heading, its ``###`` headings indented under it."""
    lines, seen = [], {}
    for level, title in headings(BLOCK.sub("", text)):
        anchor = slug(title)
        n = seen.get(anchor, 0)
        seen[anchor] = n + 1
        label = title.replace("`", "").replace("*", "\\*")  # no code spans or emphasis inside a link
        lines.append(f"{'  ' * (level - 2)}- [{label}](#{anchor}{f'-{n}' if n else ''})")
    return "**Contents**\n\n" + "\n".join(lines) + "\n"


def rewrite(path: Path) -> None:
    text = path.read_text()
    path.write_text(BLOCK.sub(lambda _: "<!-- contents:begin -->\n" + contents(text) + "<!-- contents:end -->\n", text))


@pytest.mark.parametrize("path", [p for p in PAGES if p.read_text().count("\n") > LONG], ids=lambda p: p.name)
def test_long_pages_have_current_contents(path: Path) -> None:
    text = path.read_text()
    found = BLOCK.findall(text)
    assert len(found) == 1, f"{path.relative_to(ROOT)} is over {LONG} lines and has no contents block"
    assert found[0] == contents(text), f"stale contents in {path.relative_to(ROOT)}: run python tests/test_contents.py"


def test_every_anchor_in_contents_is_a_heading() -> None:
    # Independent of contents(): each link's anchor must be the slug of a heading of its page.
    for path in PAGES:
        for block in BLOCK.findall(path.read_text()):
            slugs = {slug(t) for _, t in headings(path.read_text())}
            for anchor in re.findall(r"\]\(#([^)]+)\)", block):
                assert re.sub(r"-\d+$", "", anchor) in slugs or anchor in slugs, (path.name, anchor)


def test_index_links_every_page() -> None:
    index = (ROOT / "docs" / "index.md").read_text()
    pages = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "index.md"]
    missing = [p for p in pages if f"]({p})" not in index]
    assert not missing, f"docs/index.md does not link {missing}"
    assert "](../examples/README.md)" in index


if __name__ == "__main__":
    for page in PAGES:
        if BLOCK.search(page.read_text()):
            rewrite(page)
    sys.exit(0)
