"""The reading path: what a copied model file needs, what importing one loads, and the budgets of STYLE.md
(file lengths, where the first layer comes, the length of generate(), of every function and class)."""

import ast
import importlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny
from conftest import ROOT
from PIL import Image

FILES = ["qwen2_vl", "paligemma", "llava_onevision", "video_llava", "perception_lm"]
PROMPT = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>What is it?",
    "paligemma": "caption en",
    "perception_lm": "<|image|>What is it?",
}
LINES = {"common": 945, "quant": 230, "media": 260, "cli": 680} | {f: 955 for f in FILES}


def run(code: str, cwd) -> str:
    """`code` in a fresh interpreter started in `cwd`, with nothing but `cwd` and the installed packages on
    its path (no PYTHONPATH); returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("file", FILES)
def test_importing_a_model_file_loads_neither_cli_quant_nor_media(file):
    """torch itself imports argparse, so the repository's own modules are the ones to look for."""
    loaded = run(f"import sys, {file}; print(sorted({{'cli', 'quant', 'media'}} & set(sys.modules)))", ROOT)
    assert loaded == "[]"


@pytest.mark.parametrize("file", FILES)
def test_a_model_file_and_common_py_run_alone(file, hub_checkpoint, tmp_path):
    """The unit a researcher copies: the model file and common.py in a directory of their own, with no
    media.py, quant.py or cli.py beside them, load a checkpoint, preprocess a PIL image and generate the
    same tokens as in this repository."""
    for name in (file, "common"):
        shutil.copy(ROOT / f"{name}.py", tmp_path / f"{name}.py")
    ckpt = hub_checkpoint(file)
    code = f"""
import importlib.util, sys
import numpy as np
from PIL import Image
import {file} as m
assert importlib.util.find_spec("media") is None, "media.py is reachable"
model, proc = m.load({str(ckpt)!r})
image = Image.fromarray(np.load({str(tmp_path / "image.npy")!r}))
inputs = proc(text={PROMPT.get(file, "<image>What is it?")!r}, images=[image])
print(model.generate(**inputs, max_new_tokens=6, eos_token_ids=[]).tolist())
print(sorted({{'cli', 'quant', 'media'}} & set(sys.modules)))
"""
    image = tiny.synthetic_image(60, 80)
    np.save(tmp_path / "image.npy", image)
    tokens, loaded = run(code, tmp_path).splitlines()
    m = importlib.import_module(file)
    model, proc = m.load(ckpt)
    inputs = proc(text=PROMPT.get(file, "<image>What is it?"), images=[Image.fromarray(image)])
    assert tokens == str(model.generate(**inputs, max_new_tokens=6, eos_token_ids=[]).tolist())
    assert loaded == "[]"


def defs(tree) -> list:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


def body_lines(fn: ast.FunctionDef) -> int:
    """Lines of a function's body after its docstring."""
    body = (
        fn.body[1:]
        if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant)
        else fn.body
    )
    return body[-1].end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("name", list(LINES))
def test_budgets(name):
    """STYLE.md's budgets: file lengths; in the model files, common.py, quant.py and media.py no function over
    50 lines and no class over 150 (cli.parser, a table of flags, may be longer); in the model files the first
    nn.Module within about 250 lines and a generate() body of at most 25."""
    source = (ROOT / f"{name}.py").read_text()
    assert len(source.splitlines()) <= LINES[name]
    tree = ast.parse(source)
    if name != "cli":
        for node in defs(tree):
            most = 150 if isinstance(node, ast.ClassDef) else 50
            assert node.end_lineno - node.lineno + 1 <= most, f"{name}.{node.name}"
    if name in FILES:
        layers = [
            n for n in defs(tree) if isinstance(n, ast.ClassDef) and "nn.Module" in map(ast.unparse, n.bases)
        ]
        assert min(n.lineno for n in layers) <= 250
        (generate,) = [n for n in defs(tree) if isinstance(n, ast.FunctionDef) and n.name == "generate"]
        assert body_lines(generate) <= 25
