"""The README states true line counts, links only to what exists, and stays short; SPEED.md's memory table is
what bench.py computes."""

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "SPEED.md")


def test_line_counts_are_true():
    rows = re.findall(r"^\| \[(\w+\.py)\]\(\1\) \| ([\d-]+) \|", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) == 9
    for name, count in rows:
        path = ROOT / name
        if count == "-":
            assert not path.exists(), f"{name} exists: give its line count in the README"
        else:
            assert len(path.read_text().splitlines()) == int(count), f"README says {name} has {count} lines"


def test_memory_table_is_computed():
    """SPEED.md's parameter memory table is what `python bench.py --memory` prints."""
    import bench

    assert bench.memory_table() in (ROOT / "SPEED.md").read_text()


def test_readme_is_short():
    """A newcomer reads the README top to bottom: the long tables live in SPEED.md."""
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 320, f"README.md has {n} lines: move detail to SPEED.md or the files' --help"


def anchors(text: str) -> Iterator[str]:
    """The ids a code host gives the headings of a Markdown file: lower case, punctuation dropped, spaces as
    hyphens, a repeated heading numbered from -1."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+ (.+)$", without_code(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def without_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def test_relative_links_point_to_files_that_exist():
    """Every relative link (and image) in README.md and SPEED.md names a file or folder of the repository, and
    a #fragment names a heading of the Markdown file it points into."""
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        links = re.findall(r"\]\(([^)\s]+)\)", without_code(text))
        assert links, f"{doc} has no links"
        for link in links:
            if re.match(r"[a-z]+:", link):  # https:, mailto:
                continue
            target, _, fragment = link.partition("#")
            path = ROOT / (target or doc)
            assert path.exists(), f"{doc} links to {link}, which does not exist"
            if fragment and path.suffix == ".md":
                assert fragment in set(anchors(path.read_text())), f"{doc} links to {link}: no such heading"
