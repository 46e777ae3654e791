"""The README's table of files states true line counts."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    """The README's parameter memory table is what `python bench.py --memory` prints."""
    import bench

    assert bench.memory_table() in (ROOT / "README.md").read_text()
