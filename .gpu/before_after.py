#!/usr/bin/env python
"""Every model's compiled decode step before the rework of the compiled token and after it, paired, on one
machine (tests/test_bench.py runs it at the tiny size).

For each model: bench.py's "small" checkpoint (tests/tiny.py, random weights, so transformers must be
installed), loaded by the model file as it is and by the same file at decode_ab.OLD_REV (from .gpu/old:
`python .gpu/decode_ab.py --prepare` first). A text prompt as long as bench.py --all's prompt for that model
(so the caches have its lengths), fp32 on the CPU (bf16 on CUDA), at batch 1 and --batch (Video-LLaVA: 2).
Each one's first generate() compiles; then the two steps alone run in turns of 8 (decode_ab.interleaved: each
first in turn), --steps each: ms per step, the median of the turns, and new / old (of the totals, and the
median of the turns' ratios). Greedy tokens of the two generate() calls compared.

    python .gpu/decode_ab.py --prepare
    python .gpu/before_after.py --out /tmp/before-after      # about 25 min on 2 CPU cores
    python .gpu/before_after.py --size tiny --models paligemma2 --steps 16 --new-tokens 8   # a check
Results: OUT/results.json after every model, and a Markdown table on stdout.
"""

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]

import decode_ab  # noqa: E402
import tiny  # noqa: E402

import bench  # noqa: E402
import common  # noqa: E402

tiny.torchvision_for_reference()  # the stand-in when the real torchvision cannot load (tests/tiny.py)

PROMPTS = {  # bench.py --all's prompt lengths on the CPU at --size small (SPEED.md)
    "qwen2_vl": 176,
    "paligemma": 323,
    "paligemma2": 323,
    "llava_onevision": 1561,
    "video_llava": 2132,
    "perception_lm": 1510,
}


def checkpoint(name: str, root: Path, size: str) -> Path:
    if name.startswith("paligemma"):
        return tiny.build_paligemma(root, version=2 if name == "paligemma2" else 1, size=size)["hf5"]
    return getattr(tiny, f"build_{name}")(root, size=size)["hf5"]


def text_prompt(model, T: int, B: int, device) -> dict:
    """B rows of T ordinary tokens (the tiny tokenizer's words, repeated): no placeholder, no padding."""
    ids = model.tokenizer.encode(" ".join(tiny.CORPUS))
    ids = torch.tensor((ids * (T // len(ids) + 1))[:T], device=device).expand(B, T)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def pair(name: str, root: Path, a) -> dict:
    """One model: its first generate() old and new (the compiles, and their greedy tokens compared), then the
    two steps interleaved (decode_ab.interleaved), at batch 1 and B."""
    module = importlib.import_module("paligemma" if name == "paligemma2" else name)
    old_module = decode_ab.load_old(module.__name__)
    ckpt = checkpoint(name, root, a.size)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    new, _ = module.load(ckpt, device=a.device, dtype=dtype)
    old, _ = old_module.load(ckpt, device=a.device, dtype=dtype)
    batch = 2 if name == "video_llava" else a.batch
    T = PROMPTS[name] if a.size == "small" else 24
    out = {"prompt": T, "batch": batch}
    with torch.inference_mode():
        for key, B in (("b1", 1), ("bB", batch)):
            data, first, out[key] = text_prompt(new, T, B, a.device), {}, {}
            for arm, m in (("old", old), ("new", new)):
                t = decode_ab.now()
                first[arm] = m.generate(**data, max_new_tokens=a.new_tokens, eos_token_ids=[], compile=True)
                out[key][f"{arm}_first_call_s"] = round(decode_ab.now() - t, 2)
            out[key]["same_tokens"] = torch.equal(first["old"], first["new"])
            steps = {  # the new model's Decoding is the one its N-token call above left
                "old": decode_ab.old_stepper(old, data),
                "new": bench.replay(new, common.compiled_next_token(new), a.new_tokens),
            }
            out[key].update(decode_ab.interleaved(steps))
            print(name, B, json.dumps(out[key]), flush=True)
    del new, old
    torch._dynamo.reset()
    return out


def table(results: dict) -> str:
    lines = [
        "| model | prompt | batch 1: old / new, ms per step | new / old | batch B: old / new | new / old | B "
        "| same greedy tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        cells = [name, str(r["prompt"])]
        for b in (r["b1"], r["bB"]):
            cells.append(f"{b['old']['ms_per_step_median']:.2f} / {b['new']['ms_per_step_median']:.2f}")
            cells.append(f"{b['new']['over_old']:.3f} ({b['new']['over_old_median']:.3f})")
        cells += [str(r["batch"]), "yes" if r["b1"]["same_tokens"] and r["bB"]["same_tokens"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="before-after-out")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--size", default="small", choices=["small", "tiny"], help="tiny: a 24-token prompt (a check)"
    )
    ap.add_argument("--models", default=",".join(PROMPTS), help="a comma-separated subset, in order")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=512, help="steps per arm, in turns of 8")
    a = ap.parse_args(argv)
    if not (HERE / "old" / "common.py").is_file():
        sys.exit("error: no .gpu/old: run python .gpu/decode_ab.py --prepare first")
    decode_ab.A = a  # decode_ab's step functions read device, new_tokens and steps from it
    Path(a.out).mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        decode_ab.warm_up()
        for name in a.models.split(","):
            results[name] = pair(name, Path(tmp) / name, a)
            (Path(a.out) / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
