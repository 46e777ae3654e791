"""The example scripts a newcomer runs: tiny checkpoints to try every file offline, and the example video."""

import shlex
import subprocess
import sys

from conftest import ROOT


def test_tiny_checkpoints_print_commands_that_run(tmp_path):
    out = tmp_path / "tiny"
    cmd = [sys.executable, str(ROOT / "examples" / "tiny_checkpoints.py"), str(out)]
    printed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    commands = [line.split() for line in printed.splitlines() if line.startswith("  python ")]
    assert [c[1] for c in commands] == [
        f"{m}.py" for m in ("qwen2_vl", "paligemma", "llava_onevision", "video_llava", "perception_lm")
    ]
    assert "random tokens" in printed
    for line in printed.splitlines()[1:3]:  # two of them run as printed, from the repository root
        args = shlex.split(line.strip())
        done = subprocess.run(
            [sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0 and '"new_tokens": 8' in done.stderr, done.stderr


def test_make_video_help_writes_no_file(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "make_video.py"), "--help"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage:" in done.stdout and not list(tmp_path.iterdir())
