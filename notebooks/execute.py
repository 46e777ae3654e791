"""Runs the teaching notebooks top to bottom and saves them with their outputs (what gets committed), and
the pictures the README shows (code cells tagged `figure:NAME` -> notebooks/figures/NAME.png).

    python notebooks/execute.py                 # all of them, in place
    python notebooks/execute.py qwen2_vl        # one

Without HF_HUB_OFFLINE=1 each notebook tries to download its official checkpoint first (see teach.py).
The tests run the same `execute` on copies (tests/test_notebooks.py).
"""

from __future__ import annotations

import base64
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(HERE.glob("*.ipynb"))


def execute(path: Path, out: Path | None = None, timeout: int = 600) -> tuple[object, float]:
    """Executes the notebook at `path` with its folder as the working directory; writes it to `out` (default:
    in place). Returns (notebook, seconds). A failing cell raises nbclient's CellExecutionError."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # The kernel is this interpreter's ipykernel; its kernelspec says plain "python", so put ours first.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    t0 = time.perf_counter()
    resources = {"metadata": {"path": str(HERE)}}  # the working directory
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources).execute()
    seconds = time.perf_counter() - t0
    for cell in nb.cells:  # no per-run noise in the saved file; a streamed answer as one block of text
        cell.get("metadata", {}).pop("execution", None)
        merged = []
        for o in cell.get("outputs", []):
            if merged and o.output_type == merged[-1].output_type == "stream" and o.name == merged[-1].name:
                merged[-1].text += o.text
            else:
                merged.append(o)
        if cell.cell_type == "code":
            cell.outputs = merged
    nbformat.write(nb, out or path)
    if out is None:
        save_figures(nb)
    return nb, seconds


def save_figures(nb) -> None:
    """The first picture of every cell tagged `figure:NAME`, as notebooks/figures/NAME.png."""
    for cell in nb.cells:
        for tag in cell.get("metadata", {}).get("tags", []):
            if tag.startswith("figure:"):
                png = next(o.data["image/png"] for o in cell.outputs if "image/png" in o.get("data", {}))
                (HERE / "figures").mkdir(exist_ok=True)
                (HERE / "figures" / f"{tag[7:]}.png").write_bytes(base64.b64decode(png))


if __name__ == "__main__":
    names = sys.argv[1:]
    for p in NOTEBOOKS:
        if not names or p.stem in names:
            _, s = execute(p)
            print(f"{p.name}: {s:.1f} s")
