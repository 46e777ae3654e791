"""bench.py --all, the command a GPU run uses, run here on the CPU at the tiny size so that it cannot rot."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_all_on_the_cpu(tmp_path):
    """Every model in every setting gives a row of figures, in the format SPEED.md shows."""
    out = tmp_path / "all.md"
    command = ["bench.py", "--all", "--device", "cpu", "--size", "tiny", "--out", str(out)]
    command += ["--new-tokens", "3", "--repeats", "1", "--batch", "2"]  # the fewest that still time decoding
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert table.strip() in done.stdout
    lines = table.splitlines()
    head = bench.table_head(2)
    start = lines.index(head[0])
    assert lines[start + 1] == head[1]
    assert "failed" not in table, [line for line in lines if "failed" in line]
    rows = [line.split(" | ") for line in lines[start + 2 :]]
    assert [(r[0].strip("| "), r[1]) for r in rows] == [(m, s) for m in bench.BENCHES for s in bench.SETTINGS]
    number = r"[\d.]+"
    for r in rows:  # ours / transformers (ratio), or ours alone where transformers cannot run (PaliGemma 2,
        # compiled: a transformers 5.23 bug, see SPEED.md)
        assert re.fullmatch(rf"{number}( / {number} \({number}x\))?", r[3]), r  # tok/s, batch 1
        assert re.fullmatch(rf"{number}( / {number})? ms( \({number}\))?", r[5]), r  # time to first token
        assert (r[8].strip(" |") == "-") == (r[1] in ("eager", "compiled")), r  # quantized: vs ours bf16
        assert re.fullmatch(rf"{number} / {number}", r[9]), r  # ours' step in steady state, ms
        assert (r[10].strip(" |") == "-") == (r[1] == "eager"), r  # compile seconds when compiled
    assert all(" / " in r[3] for r in rows if r[0] != "| paligemma2"), "transformers ran for the others"


def test_speed_md_shows_the_bench_all_table_format():
    speed = (ROOT / "SPEED.md").read_text()
    assert "\n".join(bench.table_head(8)) in speed
    assert "python bench.py --all --device cuda" in speed


def test_gpu_decode_script_runs_on_the_cpu(tmp_path):
    """.gpu/decode_ab.py, the prepared GPU measurement, end to end with a tiny model on the CPU: every section
    gives figures (the CUDA-only ones say they did not run)."""
    import json

    script = ROOT / ".gpu" / "decode_ab.py"
    prepared = subprocess.run([sys.executable, str(script), "--prepare"], cwd=ROOT, capture_output=True)
    command = [sys.executable, str(script), "--device", "cpu", "--tiny", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["env"]["cuda"] == "not run (CPU)" and results["floor"]["cuda_graph"] == "not run (CPU)"
    variants = results["variants"]
    assert set(variants) == {"new", "-sampling", "-mask", "gqa", "-caches", "-dynamic", "coordinate"}
    for name, figures in variants.items():
        assert figures["b1"]["steady_ms_per_step"] > 0 and figures["b2"]["generate_ms_per_token"] > 0, name
        assert figures["b1"]["call_s"] * 1e3 > figures["b1"]["generate_ms_per_token"], name
    assert variants["new"]["graphs_for_another_length"] == 0  # symbolic cache length: no new graph
    assert variants["-dynamic"]["graphs_for_another_length"] == 1
    assert results["profile"]["per_step"] > 0
    if prepared.returncode == 0:  # git history here: the step before the rework was measured too
        old = results["old"]["b2"]
        assert old["old_ms_per_token"] > 0 and old["new_ms_per_token"] > 0 and old["new_over_old_median"] > 0
        assert old["same_tokens"]  # the same weights and greedy maths, before and after
        steps = old["steps"]  # the steps alone, interleaved: old, new, and new with static shapes
        arms = {name: f for name, f in steps.items() if name != "graphs_compiled"}
        assert set(arms) == {"old", "new", "static"} and steps["graphs_compiled"] == 0, steps
        assert all(f["ms_per_step_median"] > 0 and f["over_old"] > 0 for f in arms.values()), steps
        assert old["static_same_tokens"] and old["static_graphs"] == 1  # batch 2: a graph of its own


def test_before_after_script_runs_on_the_cpu(tmp_path):
    """.gpu/before_after.py, every model's step before the compiled-token rework and after it, on tiny
    checkpoints of two models: the old and the new file give the same greedy tokens, and the paired steps
    their figures."""
    import json

    prepared = subprocess.run([sys.executable, str(ROOT / ".gpu" / "decode_ab.py"), "--prepare"], cwd=ROOT)
    if prepared.returncode != 0:
        pytest.skip("no git history here: .gpu/old (the files before the rework) cannot be written")
    command = [sys.executable, str(ROOT / ".gpu" / "before_after.py"), "--size", "tiny", "--steps", "16"]
    command += ["--models", "paligemma2,llava_onevision", "--new-tokens", "8", "--batch", "2"]
    done = subprocess.run([*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["paligemma2", "llava_onevision"]
    for name, r in results.items():
        for b in (r["b1"], r["bB"]):
            assert b["same_tokens"], name  # the same weights and greedy maths, before and after
            assert b["old"]["ms_per_step_median"] > 0 and b["new"]["ms_per_step_median"] > 0, name
            assert b["new"]["over_old"] > 0 and b["graphs_compiled"] == 0, name  # each ran the graph it had
    assert "| paligemma2 | 24 |" in done.stdout and "| llava_onevision | 24 |" in done.stdout
