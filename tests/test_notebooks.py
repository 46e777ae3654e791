"""The teaching notebooks: committed with their outputs, and run top to bottom offline (tiny checkpoints)."""

import re
import sys

import nbformat
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "notebooks"))
import execute  # noqa: E402

NOTEBOOKS = execute.NOTEBOOKS
MODELS = ("qwen2_vl", "paligemma", "llava_onevision", "video_llava", "perception_lm")
ENV_DIRS = [f"{m.upper()}_CHECKPOINT" for m in MODELS]  # what each notebook's first cell reads


def without_numbers(texts: list[str]) -> list[str]:
    return [re.sub(r"\d+", "#", t) for t in texts]


def pictures(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def texts(cell) -> list[str]:
    """A cell's printed text and tables (not pictures, whose bytes depend on the matplotlib build)."""
    out = []
    for o in cell.get("outputs", []):
        out.append(o.get("text") or o.get("data", {}).get("text/markdown") or "")
    return out


def test_one_notebook_per_model_and_an_overview():
    names = {p.stem for p in NOTEBOOKS}
    assert names == {"00_overview", *MODELS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_executed_with_prose_before_code(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "not executed: run python notebooks/execute.py"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert pictures(nb) >= 3
    for before, cell in zip(nb.cells, nb.cells[1:]):
        if cell.cell_type == "code":
            assert before.cell_type == "markdown", f"no prose before the code cell {cell.source[:60]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_offline_and_reproduces_its_outputs(path, tmp_path, monkeypatch):
    """Executes a copy with no Hub access (so the tiny checkpoint is built), then compares the text of every
    cell that does not time anything with the committed outputs: they must be what the code produces. A cell
    tagged cpu-dependent (a trained model's held-out score: the CPU's floating-point rounding decides a few
    near misses) must print the same text, its numbers aside."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ENV_DIRS:
        monkeypatch.delenv(name, raising=False)
    nb, seconds = execute.execute(path, tmp_path / path.name)
    assert pictures(nb) >= 3
    committed = nbformat.read(path, as_version=4)
    real = [t for c in committed.cells for t in texts(c) if t.startswith("loaded ")]  # teach.load_checkpoint
    if real:  # outputs of a real checkpoint cannot be reproduced offline; the run above is the check
        return
    for old, new in zip(committed.cells, nb.cells, strict=True):
        assert old.source == new.source
        if new.cell_type == "code" and "stream(" not in new.source:
            same = without_numbers if "cpu-dependent" in tags(new) else list
            hint = f"re-run python notebooks/execute.py: {new.source[:80]!r}"
            assert same(texts(new)) == same(texts(old)), hint


def tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def tagged(nb, tag: str) -> list:
    return [c for c in nb.cells if tag in tags(c)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercises_make_a_student_think(path):
    """Each model notebook has a write-a-function exercise checked against the model file and a
    predict-the-picture exercise; every solution is collapsed; no exercise asks for common.cache_length."""
    nb = nbformat.read(path, as_version=4)
    if path.stem in MODELS:
        functions = tagged(nb, "exercise:function")
        assert functions and all("teach.check_function(" in c.source for c in functions)
        assert tagged(nb, "exercise:picture")
    solutions = tagged(nb, "solution")
    assert solutions, "exercises come with their solutions"
    assert all(c.metadata.get("jupyter", {}).get("source_hidden") for c in solutions), "solutions collapsed"
    assert not [c for c in nb.cells if c.source.strip() == "Solution:"], "an uncollapsed solution"
    exercises = [c for c in nb.cells if any(t.startswith("exercise:") for t in c.metadata.get("tags", []))]
    assert not [c for c in exercises + solutions if "cache_length" in c.source]


def test_no_exercise_repeats_another():
    """The question of every exercise (the markdown cell before an exercise's code cell) is asked once."""
    questions = []
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        for before, cell in zip(cells, cells[1:]):
            if any(t.startswith("exercise:") for t in cell.get("metadata", {}).get("tags", [])):
                questions.append(before.source if cell.cell_type == "code" else cell.source)
    assert len(questions) == len(set(questions))


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem in MODELS], ids=lambda p: p.stem)
def test_trained_demo_reports_a_spread(path):
    """Every model notebook trains a demo and gives its held-out score with a 95 % interval."""
    source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert "backward()" in source and "teach.interval95(" in source
