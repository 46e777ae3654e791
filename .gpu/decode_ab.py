#!/usr/bin/env python
"""The compiled decode step of qwen2_vl.py, A/B, in one call on one GPU (not part of the tests).

Qwen2-VL-2B's published configuration (tests/data) with random weights, bf16 on CUDA, a text prompt of
--prompt tokens; ms per token at batch 1 and --batch for:
  new          the step as it is: caches kept, sampling in the compiled token, symbolic batch and length,
               one additive mask per step (common.next_token, compiled whole)
  old          the step before this rework (commit OLD_REV, its files under .gpu/old: see below), in rounds
               of generate() that alternate with the new step (a pair sees the machine in one state); then
               the steps alone, old, new and new with static shapes, in turns of 8 steps (--steps each)
  -caches      new, but a fresh Decoding (caches and state) in every generate(): new addresses each call
  -sampling    new, but only the decode step compiled; sampling and bookkeeping run eagerly after it
  -dynamic     new, but no dimension marked dynamic: every batch size and cache length compiles again
  -mask        new, but each layer repeats a bool mask over the query groups (as before this rework)
  gqa          new, with the decode attention as SDPA(enable_gqa=True) over the heads, no group fold
  coordinate   new, with inductor's coordinate_descent_tuning
Each "-" variant is the new step less one change (leave-one-out), so its distance to "new" is what that
change is worth with the others in place. Figures per variant and batch: ms per token from generate() (the
difference of an N-token and a 2-token call, over N - 2), ms per step in steady state (the compiled token
replayed N - 1 times on the kept tensors, one sync: bench.step_ms), each the fastest of --repeats runs (and
their median), the first call's seconds (the compile; with --cold, no cache of an earlier compile helps it),
graphs compiled.
Sections in this order, each skipped when --deadline leaves too little: old against new, the variants, a
kernel profile of the new step (kernels per step by kind, the top kernels), the CUDA-graph floor.

On the GPU machine (torch only; no transformers, no checkpoint, no network), from the project's root:
    python .gpu/decode_ab.py --out "$OUT"                      # about 6-8 min on an H200, stops at --deadline
Before it, here (the machine has no git history): python .gpu/decode_ab.py --prepare, then carry .gpu/old.
On the CPU, a tiny model, every section (CUDA paths are marked as not run); or bench.py's "small" decoder:
    python .gpu/decode_ab.py --device cpu --tiny --out /tmp/ab
    python .gpu/decode_ab.py --device cpu --size small --prompt 176 --batch 8 --deadline 100000 --cold \
        --repeats 5 --variants new,-dynamic,gqa,-mask,-sampling --out /tmp/ab     # about 30 min on 2 cores
    python .gpu/decode_ab.py --device cpu --size small --prompt 176 --batch 8 --deadline 100000 \
        --repeats 9 --steps 1024 --variants "" --out /tmp/ab      # old against new alone: about 15 min
Results: OUT/results.json (after every section, so a run cut short keeps what it finished) and OUT/log.txt.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OLD_REV = "5b5ee37"  # the last commit with the decode step before the rework
OLD_FILES = ["common", "qwen2_vl", "paligemma", "llava_onevision", "video_llava", "perception_lm"]  # .gpu/old
CONFIG = ROOT / "tests/data/qwen2_vl/Qwen2-VL-2B-Instruct.config.json"
VARIANTS = ["new", "-sampling", "-mask", "gqa", "-caches", "-dynamic", "coordinate"]
SIZES = {  # text width, layers, heads, kv heads, FFN, vocabulary (the vision tower, unused, at its smallest)
    "tiny": (64, 2, 4, 2, 128, 4096),
    "small": (640, 10, 10, 2, 2048, 32000),  # bench.py's "small" decoder, a smaller vocabulary
}
T0 = time.perf_counter()
RESULTS: dict = {}
A = argparse.Namespace()


def log(*parts) -> None:
    line = f"[{time.perf_counter() - T0:6.1f}s] " + " ".join(str(p) for p in parts)
    print(line, flush=True)
    with open(Path(A.out) / "log.txt", "a") as f:
        f.write(line + "\n")


def save() -> None:
    (Path(A.out) / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def sync() -> None:
    if A.device == "cuda":
        torch.cuda.synchronize()


def now() -> float:
    sync()
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------------------
# The model: the published configuration, random weights


def build(qwen2_vl):
    d = json.loads(CONFIG.read_text())
    if A.size != "real":
        D, layers, H, Hkv, ffn, vocab = SIZES[A.size]
        d.update(hidden_size=D, num_hidden_layers=layers, num_attention_heads=H, num_key_value_heads=Hkv)
        d.update(intermediate_size=ffn, vocab_size=vocab)
        d["vision_config"] = {
            **d["vision_config"],
            "depth": 1,
            "embed_dim": 32,
            "num_heads": 2,
            "hidden_size": D,
        }
        q = D // H // 16  # the published [16, 24, 24] split of head_dim / 2, scaled
        d["rope_scaling"] = {"type": "mrope", "mrope_section": [2 * q, 3 * q, 3 * q]}
    cfg = qwen2_vl.config_from_hf(d)
    torch.manual_seed(0)
    with torch.device(A.device):
        model = qwen2_vl.Qwen2VL(cfg)
    for p in model.parameters():  # small weights: finite logits in bf16
        torch.nn.init.normal_(p, std=0.02)
    return model.to(dtype=torch.bfloat16 if A.device == "cuda" else torch.float32).eval(), cfg


def prompt(cfg, B: int) -> dict:
    g = torch.Generator().manual_seed(B)
    ids = torch.randint(0, min(cfg.text_config.vocab_size, 150000), (B, A.prompt), generator=g)
    return dict(input_ids=ids.to(A.device), attention_mask=torch.ones_like(ids).to(A.device))


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def cudagraph_skips() -> int:
    """Compiled graphs that CUDA graphs refused (inductor then runs them without: each kernel launched)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def ms_per_token(long_s: float, short_s: float) -> float:
    """ms per token from the seconds of an N-token and a 2-token call: what both pay (the prefill, a call's
    set-up) cancels."""
    return (long_s - short_s) / (A.new_tokens - 2) * 1e3


def measure(model, cfg, B: int, steady: bool = True) -> dict:
    """One variant at batch B: the first call (compiles), ms/token from generate(), ms/step replayed, the
    whole N-token call; the fastest of --repeats runs (other work on the machine only ever adds time) and
    their median. NOTE: the N- and the 2-token call have caches of different lengths, so what a call pays
    once (a new Decoding, a CUDA graph recorded) cancels in ms/token: it shows in call_s (`-caches`)."""
    data, N = prompt(cfg, B), A.new_tokens
    run = lambda n: model.generate(**data, max_new_tokens=n, eos_token_ids=[], compile=True)  # noqa: E731
    before, skips, t = graphs(), cudagraph_skips(), now()
    tokens = run(N)
    first_s = now() - t
    run(2)  # its own cache length (a static variant compiles it here, untimed)

    def seconds(n):
        times = []
        for _ in range(A.repeats):
            t = now()
            run(n)
            times.append(now() - t)
        return times

    out = dict(first_call_s=round(first_s, 2), graphs_compiled=graphs() - before, tokens=tokens[0].tolist())
    out["cudagraph_skips"] = cudagraph_skips() - skips if A.device == "cuda" else "not run (CPU)"
    long, short = seconds(N), seconds(2)
    out["generate_ms_per_token"] = round(ms_per_token(min(long), min(short)), 4)
    per_token = ms_per_token(statistics.median(long), statistics.median(short))
    out["generate_ms_per_token_median"] = round(per_token, 4)
    out["call_s"] = round(min(long), 4)
    if steady:  # the compiled token replayed on the kept tensors: bench.py's step_ms
        import bench

        generate = lambda data, n: run(n)  # noqa: E731
        times = [bench.step_ms(model, generate, data, N, compile=True) for _ in range(A.repeats)]
        out["steady_ms_per_step"] = round(min(times), 4)
        out["steady_ms_per_step_median"] = round(statistics.median(times), 4)
    return out


def warm_up() -> None:
    """Pay before timing what the first compile of a process costs whatever it compiles (imports, workers)."""
    torch.compile(lambda x: x + 1)(torch.ones(2, device=A.device))


def fresh(model) -> None:
    """Forget compiled code and kept tensors: the next call compiles from scratch."""
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_next_token", None)
    model.__dict__.pop("_decoding", None)


# ----------------------------------------------------------------------------------------------------------
# Variants: the new step less one change, or with one setting


@contextlib.contextmanager
def patched(obj, name, value):
    real = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, real)


@contextlib.contextmanager
def static_shapes(common):
    """New Decodings get static addresses only, and no dimension is made dynamic after a recompile: every
    batch size and cache length compiles its own graph."""

    def static_only(d):
        for t in [t for c in d.caches for t in (c.k, c.v)]:
            torch._dynamo.mark_static_address(t)
        for t in (d.keep, d.tokens, d.token, d.pos, d.slot, d.finished, d.key):
            torch._dynamo.mark_static_address(t)

    with patched(torch._dynamo.config, "automatic_dynamic_shapes", False):
        with patched(common, "mark_for_compile", static_only):
            yield


def variant(name, common, qwen2_vl, model):
    """A context in which `model` runs the named variant."""
    stack = contextlib.ExitStack()
    if name == "-caches":  # a fresh Decoding in every generate()
        real = common.kept_decoding

        def new_each_time(m, *args):
            m.__dict__.pop("_decoding", None)
            return real(m, *args)

        stack.enter_context(patched(common, "kept_decoding", new_each_time))
    elif name == "-sampling":  # the decode step compiled alone, the sampling eager
        mode = "reduce-overhead" if A.device == "cuda" else None
        step = torch.compile(model.decode_step, mode=mode, fullgraph=True)

        def split(m):
            def token(decode_step, d, s, pad_id, eos):
                common.choose(d, step(d.token, d.pos, d.slot, d.keep, d.caches), s, pad_id, eos)

            return token

        stack.enter_context(patched(common, "compiled_next_token", split))
    elif name == "-dynamic":
        stack.enter_context(static_shapes(common))
    elif name == "-mask":  # bool mask, repeated over the groups in every layer
        real_attend = qwen2_vl.attend

        def bool_mask_step(self, token, pos, slot, keep, caches):
            seen = keep & (torch.arange(keep.shape[1], device=keep.device) <= slot)
            x = self.model.embed_tokens(token)
            h = self.model(x, pos.expand(3, -1, -1), seen[:, None, None], caches, slot)
            return self.lm_head(h[:, -1])

        def repeating_attend(q, k, v, mask):
            if mask is None:
                return real_attend(q, k, v, mask)
            B, H, T, Dh = q.shape
            G = H // k.shape[1]
            y = F.scaled_dot_product_attention(
                q.reshape(B, -1, G * T, Dh), k, v, attn_mask=mask.repeat(1, 1, G, 1)
            )
            return y.view(B, H, T, Dh)

        stack.enter_context(patched(qwen2_vl.Qwen2VL, "decode_step", bool_mask_step))
        stack.enter_context(patched(qwen2_vl, "attend", repeating_attend))
    elif name == "gqa":  # one query per head, SDPA shares the kv heads
        real_attend = qwen2_vl.attend

        def gqa_attend(q, k, v, mask):
            if q.shape[2] != 1 or mask is None:
                return real_attend(q, k, v, mask)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        stack.enter_context(patched(qwen2_vl, "attend", gqa_attend))
    elif name == "coordinate":
        import torch._inductor.config as inductor_config

        stack.enter_context(patched(inductor_config, "coordinate_descent_tuning", True))
    return stack


# ----------------------------------------------------------------------------------------------------------
# Sections


def section(name: str, need_s: float):
    def wrap(fn):
        def run(*args):
            left = A.deadline - (time.perf_counter() - T0)
            if left < need_s and not A.tiny:
                log(f"skip {name}: {left:.0f} s left, needs about {need_s:.0f}")
                RESULTS[name] = {"skipped": f"{left:.0f} s left"}
                return save()
            log(f"== {name}")
            try:
                RESULTS[name] = fn(*args)
            except Exception as e:  # one failure must not cost the other sections
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
                log(f"{name} failed: {type(e).__name__}: {e}")
            log(json.dumps(RESULTS[name], default=str)[:1500])
            save()

        return run

    return wrap


def env() -> dict:
    out = dict(
        torch=torch.__version__, device=A.device, size=A.size, prompt=A.prompt, new_tokens=A.new_tokens
    )
    if A.device == "cuda":
        out.update(
            gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version()
        )
    else:
        out["cuda"] = "not run (CPU)"
    return out


def variants(common, qwen2_vl, model, cfg) -> dict:
    out = {}
    warm_up()
    for name in [n for n in A.variants.split(",") if n]:  # --variants "": none
        left = A.deadline - (time.perf_counter() - T0)
        if left < 60 and not A.tiny:
            out[name] = {"skipped": f"{left:.0f} s left"}
            continue
        fresh(model)
        with variant(name, common, qwen2_vl, model), torch.inference_mode():
            out[name] = {f"b{B}": measure(model, cfg, B) for B in (1, A.batch)}
            if name in ("new", "-dynamic"):  # another cache length (a longer prompt), then batch 1 again
                before = graphs()
                A.prompt += 40
                measure(model, cfg, 1, steady=False)
                A.prompt -= 40
                out[name]["graphs_for_another_length"] = graphs() - before
        if "new" in out and "b1" in out[name]:  # greedy tokens as the new step's (a tie may break either way)
            out[name]["same_tokens_as_new"] = out[name]["b1"]["tokens"] == out["new"]["b1"]["tokens"]
        log(name, json.dumps(out[name]))
        RESULTS["variants"] = out
        save()
    fresh(model)
    return out


def load_old(name: str = "qwen2_vl"):
    """A model file of OLD_REV from .gpu/old, as the module old_NAME beside the new one; its `common` is the
    old common.py (old_common, loaded once)."""
    import importlib.util

    new_common = sys.modules["common"]
    for module in ("common", name):
        if f"old_{module}" in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(f"old_{module}", HERE / "old" / f"{module}.py")
        sys.modules[f"old_{module}"] = importlib.util.module_from_spec(spec)
        sys.modules["common"] = sys.modules["old_common"]  # what the old model file's `import common` finds
        try:
            spec.loader.exec_module(sys.modules[f"old_{module}"])
        finally:
            sys.modules["common"] = new_common
    return sys.modules[f"old_{name}"]


def static_token(*args):
    """common.next_token under a code object of its own: the graphs torch compiles belong to the code object,
    so this one's static-shape graphs stay apart from the new step's."""
    return sys.modules["common"].next_token(*args)


def old_stepper(old_model, data):
    """The old step, one decode step per call, as the old decode loop ran it with no EOS ids: the compiled
    decode step, the eager greedy sampling and bookkeeping, and the all-finished read every 8 steps. Its
    generate() runs up to the loop, which is caught: the step closure and the prefill's logits. NOTE: the
    logits are sampled in the call that made them, so no output of a CUDA graph is held across calls."""
    old_common, got = sys.modules["old_common"], {}

    def caught(first_logits, step, *args):
        got.update(token=old_common.sample(first_logits), step=step)  # the first new token, from the prefill
        return torch.zeros(1, 1, dtype=torch.long)

    with patched(old_common, "decode_loop", caught):
        old_model.generate(**data, max_new_tokens=A.new_tokens, eos_token_ids=[], compile=True)
    B, eos = got["token"].shape[0], torch.tensor([], dtype=torch.long, device=A.device)
    out = torch.zeros(B, A.new_tokens, dtype=torch.long, device=A.device)
    finished = torch.zeros(B, dtype=torch.bool, device=A.device)

    def one(i):  # step i = 0 .. N - 2
        logits = got["step"](got["token"][:, None], i)
        token = torch.where(finished, old_model.pad_token_id, old_common.sample(logits))
        out[:, i + 1] = token
        finished.logical_or_(torch.isin(token, eos))
        got["token"] = token
        if i % 8 == 7:
            bool(finished.all())

    return one


def interleaved(steps: dict) -> dict:
    """The arms' steps (each a function one(i) that runs step i = 0 .. N - 2: old_stepper, bench.replay) in
    turns of 8, --steps in all per arm, the order rotated every turn (each arm runs first, in the middle and
    last equally often): each turn sees the machine in about the state the others' turns saw. A first turn
    each runs untimed. ms per step: the median of the turns, the total against the old step's total, and the
    median of the turns' ratios to the old step's turn; graphs compiled meanwhile (0: every arm ran the graph
    it had)."""
    names, k, N, before = list(steps), 8, A.new_tokens, graphs()
    for one in steps.values():
        for j in range(k):
            one(j % (N - 1))
    times = {name: [] for name in names}
    for turn in range(max(A.steps // k, 1)):
        r = turn % len(names)
        for name in names[r:] + names[:r]:
            t = now()
            for j in range(k):
                steps[name]((turn * k + j) % (N - 1))
            times[name].append((now() - t) / k * 1e3)
    out = {
        name: dict(
            ms_per_step_median=round(statistics.median(ms), 4),
            over_old=round(sum(ms) / sum(times["old"]), 4),
            over_old_median=round(statistics.median(a / b for a, b in zip(ms, times["old"])), 4),
        )
        for name, ms in times.items()
    }
    return {**out, "graphs_compiled": graphs() - before}


def old(common, model, cfg) -> dict:
    """The step before the rework (OLD_REV) against the new one, both in this process on the same weights.
    In generate(): each one's first call (the compile), then --repeats rounds that run old and new one after
    the other (old first in even rounds, new first in odd ones), so that each pair sees the machine in the
    same state; ms per token as in `measure` (an N- less a 2-token call, so what a call pays once cancels):
    the fastest, the median, and the median of the rounds' new / old. Then the steps alone, interleaved in
    turns of 8 (`interleaved`), with a third arm: the new step with static shapes (`static_shapes`)."""
    if not (HERE / "old" / "qwen2_vl.py").is_file():
        return {"skipped": "no .gpu/old: run --prepare where git is, and carry .gpu/old"}
    import bench

    old_model, _ = build(load_old())
    static_model, _ = build(sys.modules["qwen2_vl"])
    fresh(model)
    mode = "reduce-overhead" if A.device == "cuda" else None
    static_step = torch.compile(static_token, mode=mode, fullgraph=True)
    static_model.__dict__["_compiled_next_token"] = static_step
    out, N = {}, A.new_tokens
    with torch.inference_mode():
        for B in (1, A.batch):
            data = prompt(cfg, B)
            runs = {"old": old_model, "new": model}
            first, tokens, ms = {}, {}, {name: [] for name in runs}
            for name, m in runs.items():
                before, t = graphs(), now()
                tokens[name] = m.generate(**data, max_new_tokens=N, eos_token_ids=[], compile=True)
                first[name] = dict(first_call_s=round(now() - t, 2), graphs_compiled=graphs() - before)
                m.generate(**data, max_new_tokens=2, eos_token_ids=[], compile=True)  # old: another bucket
            for r in range(A.repeats):
                for name, m in list(runs.items())[:: 1 if r % 2 == 0 else -1]:
                    t = [now()]
                    for n in (N, 2):
                        m.generate(**data, max_new_tokens=n, eos_token_ids=[], compile=True)
                        t.append(now())
                    ms[name].append(ms_per_token(t[1] - t[0], t[2] - t[1]))
            ratios = [n / o for n, o in zip(ms["new"], ms["old"])]
            out[f"b{B}"] = {
                **{f"{name}_{k}": v for name, first_call in first.items() for k, v in first_call.items()},
                **{f"{name}_ms_per_token": round(min(ms[name]), 4) for name in runs},
                **{f"{name}_ms_per_token_median": round(statistics.median(ms[name]), 4) for name in runs},
                "new_over_old_median": round(statistics.median(ratios), 4),
                "same_tokens": torch.equal(tokens["old"], tokens["new"]),
            }
            with static_shapes(common):  # its own Decoding, static
                before, t = graphs(), now()
                static_tokens = static_model.generate(
                    **data, max_new_tokens=N, eos_token_ids=[], compile=True
                )
                out[f"b{B}"].update(static_first_call_s=round(now() - t, 2), static_graphs=graphs() - before)
            model.generate(**data, max_new_tokens=N, eos_token_ids=[], compile=True)  # its Decoding for N
            steps = dict(
                old=old_stepper(old_model, data),
                new=bench.replay(model, common.compiled_next_token(model), N),
                static=bench.replay(static_model, static_step, N),
            )
            try:  # NOTE: three CUDA-graph trees in turns are untried on a GPU; a failure keeps the rounds
                out[f"b{B}"]["steps"] = interleaved(steps)
            except Exception as e:
                out[f"b{B}"]["steps"] = {"error": f"{type(e).__name__}: {e}"}
            out[f"b{B}"]["static_same_tokens"] = torch.equal(static_tokens, tokens["new"])
    del old_model, static_model
    fresh(model)
    return out


def profile(common, qwen2_vl, model, cfg) -> dict:
    """Kernels (CUDA) or aten operations (CPU) per steady step of the new compiled token, by kind."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fresh(model)
    with torch.inference_mode():
        measure(model, cfg, 1, steady=False)  # compiles, leaves the Decoding
        d, N = model._decoding, 11
        step = common.compiled_next_token(model)
        s = common.GenerationSettings(max_new_tokens=N, eos_token_ids=[])
        eos = torch.tensor([], dtype=torch.long, device=A.device)
        d.slot.sub_(N - 1), d.pos.sub_(N - 1)
        cuda = A.device == "cuda"
        activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with torch_profile(activities=activities) as prof:
            for _ in range(N - 1):
                step(model.decode_step, d, s, model.pad_token_id, eos)
            sync()
    events = [e for e in prof.events() if (e.device_type.name == "CUDA") == cuda]
    kinds: dict[str, int] = {}
    for e in events:
        n = e.name.lower()
        kind = next(
            (k for k in ("gemv", "gemm", "attention", "triton", "memcpy", "memset") if k in n), "other"
        )
        kind = "attention" if ("flash" in n or "sdpa" in n or "fmha" in n) else kind
        kinds[kind] = kinds.get(kind, 0) + 1
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total")
    (Path(A.out) / "profile.txt").write_text(table)
    return dict(
        what="CUDA kernels" if cuda else "CPU events (CUDA not run)",
        per_step=round(len(events) / (N - 1), 1),
        by_kind_per_step={k: round(v / (N - 1), 1) for k, v in sorted(kinds.items())},
    )


def floor(model, cfg) -> dict:
    """The decoder's weight products and one query's attention per layer run bare (bench.decode_floor: in a
    CUDA graph on CUDA)."""
    sys.path.insert(0, str(ROOT))
    import bench

    seconds = bench.decode_floor(model, A.prompt, A.new_tokens, torch.device(A.device))
    return dict(ms=round(seconds * 1e3, 4), cuda_graph=A.device == "cuda" or "not run (CPU)")


def main(argv=None) -> None:
    global A
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="decode-ab-out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="real", choices=["real", *SIZES], help="real: Qwen2-VL-2B's shapes")
    ap.add_argument(
        "--tiny", action="store_true", help="--size tiny, 8 tokens, batch 2, one repeat (CPU check)"
    )
    ap.add_argument("--prompt", type=int, default=368, help="prompt tokens (368: the measured photo prompt)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=512, help="steps per arm in the old section's interleaving")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="a comma-separated subset, in order")
    ap.add_argument("--deadline", type=float, default=450, help="seconds after which sections are skipped")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="inductor's caches off: every first call compiles cold (torch leaves its temporary folders)",
    )
    ap.add_argument("--prepare", action="store_true", help="write .gpu/old from git (here, before a run)")
    A = ap.parse_args(argv)
    if A.prepare:
        (HERE / "old").mkdir(exist_ok=True)
        for f in OLD_FILES:
            text = subprocess.run(
                ["git", "show", f"{OLD_REV}:{f}.py"], cwd=ROOT, capture_output=True, check=True
            )
            (HERE / "old" / f"{f}.py").write_bytes(text.stdout)
        return print(f"wrote {HERE / 'old'} from {OLD_REV}: carry .gpu/old")
    Path(A.out).mkdir(parents=True, exist_ok=True)
    if A.tiny:
        A.size, A.prompt, A.new_tokens, A.batch, A.repeats = (
            "tiny",
            min(A.prompt, 24),
            min(A.new_tokens, 8),
            2,
            1,
        )
        A.steps = min(A.steps, 16)
    if A.cold:  # no compiled graph or kernel reused from an earlier variant or run: comparable compile times
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    import common
    import qwen2_vl

    model, cfg = build(qwen2_vl)
    section("env", 0)(env)()
    section("old", 120)(old)(common, model, cfg)  # first: the comparison that matters most
    section("variants", 120)(variants)(common, qwen2_vl, model, cfg)
    section("profile", 45)(profile)(common, qwen2_vl, model, cfg)
    section("floor", 10)(floor)(model, cfg)
    log("done")


if __name__ == "__main__":
    main()
