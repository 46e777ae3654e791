"""Side-by-side speed of our model and transformers on the same random weights.

    python bench.py --model qwen2_vl --size small --device cpu
    python bench.py --model paligemma2 --size tiny --device cuda --dtype bfloat16
    python bench.py --model qwen2_vl --size real-config --device cuda      # Qwen2-VL-2B's shapes, bf16
    python bench.py --model qwen2_vl --size real-config --device cuda --compile

--model: qwen2_vl, paligemma (PaliGemma 1), paligemma2, llava_onevision, video_llava or perception_lm.

One checkpoint is built with random weights (tests/tiny.py, the same builder as the tests) and loaded by
both implementations. --size real-config times the smallest published configuration of the model
(REAL_CONFIGS, from tests/data) with transformers' own random initialisation built on the device, and the
tiny checkpoint's tokenizer and processor files set to the published image sizes.
Printed per implementation: preprocessing, vision encoder, time to first token (vision + prompt + one
token), decode tokens/s at batch 1 and at --batch rows (default 8; EOS disabled: every run makes N tokens)
and the working memory of a batch-1 generation (its peak minus what was in use before it: CUDA allocator
statistics, or the process's peak resident set on Linux CPUs); then ours/transformers (above 1 is better
for tokens/s, below 1 for times and memory).
Median of --repeats runs after one warm-up, the two implementations interleaved. --compile compares ours with
generate(compile=True) against transformers with its static cache and compiled forward; the warm-up (which
compiles) is timed and printed separately. Last, the decode roofline: the bytes a batch-1 step reads (decoder
weights and KV cache) over the bandwidth a GEMV of that size reaches on this device, and the share of it each
implementation's tokens/s reaches; then the floor: the same reads done bare (one GEMV per weight matrix of the
decoder, one query's attention over each layer's cache), and the share of that each implementation reaches.
Protocol: ../shared/reference/benchmark-protocol.md. Needs requirements-dev.txt (transformers).
"""

import argparse
import ctypes
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
import unittest.mock
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests"))
import tiny  # noqa: E402

tiny.torchvision_for_reference()  # the stand-in when the real torchvision cannot load

import common  # noqa: E402


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def median_time(fn, device, repeats):
    return statistics.median(timed(fn, device)[0] for _ in range(repeats))


def resident_kb(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def working_memory_mb(fn, device, repeats) -> float:
    """Peak memory during `fn` minus the memory in use just before it (weights, the other model), in MiB.
    CPU: the peak resident set, reset through /proc/self/clear_refs; main() makes glibc return every freed
    block of 64 KiB or more to the system, so that memory freed by an earlier phase cannot hide this one's."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = resident_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    for _ in range(repeats):
        fn()
    return (resident_kb("VmHWM") - before) / 1024


def merge(into: dict, patch: dict) -> dict:
    """`patch` written into `into`, nested dicts key by key."""
    for k, v in patch.items():
        into[k] = merge(into.get(k, {}), v) if isinstance(v, dict) else v
    return into


# The published configuration each model is timed at with --size real-config, and the processor settings that
# go with it (as the published repos set them), as a function of that config.
REAL_CONFIGS = {
    "qwen2_vl": (
        "qwen2_vl/Qwen2-VL-2B-Instruct",
        lambda c: {"image_processor": {"size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}}},
    ),
    "paligemma": (
        "paligemma/paligemma-3b-mix-224",
        lambda c: {"image_processor": {"size": {"height": 224, "width": 224}, "image_seq_length": 256}},
    ),
    "paligemma2": (
        "paligemma/paligemma2-3b-mix-224",
        lambda c: {"image_processor": {"size": {"height": 224, "width": 224}, "image_seq_length": 256}},
    ),
    "llava_onevision": (
        "llava_onevision/llava-onevision-qwen2-0.5b-ov-hf",
        lambda c: {
            "image_processor": {
                "size": {"height": 384, "width": 384},
                "image_grid_pinpoints": c["image_grid_pinpoints"],
            },
            "video_processor": {"size": {"height": 384, "width": 384}},
            "num_image_tokens": 729,
        },
    ),
    "video_llava": (
        "video_llava/Video-LLaVA-7B-hf",
        lambda c: {
            p: {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
            for p in ("image_processor", "video_processor")
        },
    ),
    "perception_lm": (
        "perception_lm/Perception-LM-1B",
        lambda c: {
            "image_processor": {"size": {"height": 448, "width": 448}, "tile_size": 448},
            "video_processor": {"size": {"height": 448, "width": 448}},
        },
    ),
}


def real_config_checkpoint(model: str, tiny_dir: Path, hf_class, device, dtype) -> Path:
    """A checkpoint in the published configuration with random weights: the published config.json with the
    tiny tokenizer's special-token ids, transformers' own initialisation (built on `device` in `dtype`), and
    the tiny checkpoint's tokenizer, chat template and processor files with the published image sizes."""
    name, processor_patch = REAL_CONFIGS[model]
    out = tiny_dir.with_name(tiny_dir.name + "_real")
    out.mkdir()
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((ROOT / "tests" / "data" / f"{name}.config.json").read_text())
    tiny_cfg = json.loads((tiny_dir / "config.json").read_text())
    tiny_ids = {}  # every special-token id as the tiny tokenizer numbers it; `_index` is an older `_id`
    for d in (tiny_cfg.get("text_config", {}), tiny_cfg):
        tiny_ids |= {
            re.sub("_index$", "_id", k): v for k, v in d.items() if re.search("token_(id|index)$", k)
        }
    for d in (cfg, cfg.get("text_config", {})):
        for k in [k for k in d if re.search("token_(id|index)$", k)]:
            d[k] = tiny_ids.get(re.sub("_index$", "_id", k), d[k])
    (out / "config.json").write_text(json.dumps(cfg))
    processor = json.loads((out / "processor_config.json").read_text())
    (out / "processor_config.json").write_text(json.dumps(merge(processor, processor_patch(cfg))))
    with torch.device(device):
        ref = hf_class._from_config(hf_class.config_class.from_pretrained(out), dtype=dtype)
    ref.save_pretrained(out)
    del ref
    return out


def checkpoint(a, build, hf_class, device, dtype) -> Path:
    """The directory both implementations load: a tests/tiny.py build at --size, or a real-config one."""
    size = "tiny" if a.size == "real-config" else a.size
    ckpt = build(Path(tempfile.mkdtemp()), size)["hf5"]
    return real_config_checkpoint(a.model, ckpt, hf_class, device, dtype) if a.size == "real-config" else ckpt


def load_pair(module, hf_class, ckpt, device, dtype, impl="sdpa"):
    """Our model and processor, and transformers' model and processor, from one checkpoint directory."""
    from transformers import AutoProcessor

    ours, proc = module.load(ckpt, device=device, dtype=dtype)
    ref = hf_class.from_pretrained(ckpt, dtype=dtype, attn_implementation=impl).to(device).eval()
    return ours, proc, ref, AutoProcessor.from_pretrained(ckpt)


BENCHED = {}  # the model and prompt length the runs time, for the roofline


def generation_runs(a, device, dtype, ours, ref, proc, hproc, text, media, vision):
    """The timed calls of one model on one prompt: `media` is the processor keyword and its one item (e.g.
    {"images": img}), `vision` the (ours, transformers) vision encoders as functions of the inputs.
    NOTE: every run makes exactly n tokens: ours with no EOS ids; transformers with min_new_tokens = n, since
    an eos_token_id of None in a GenerationConfig is filled in from the checkpoint's generation_config.
    Decode time is measured inside each run, from the moment the first new token is chosen (the prefill's
    end) to the end, not as the difference of two separately timed runs, which a long prefill's noise
    swamps."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    one = {k: [v] for k, v in media.items()}
    inputs = {k: v.to(device) for k, v in proc(text=text, **one).items()}
    batch = proc(text=[text] * a.batch, **{k: [v] * a.batch for k, v in media.items()})
    batch = {k: v.to(device) for k, v in batch.items()}
    marks: list[float] = []  # the time the first new token was chosen, in the run being timed

    def mark_first() -> None:
        if not marks:
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    class MarkFirst(LogitsProcessor):  # transformers calls it on each step's logits, before choosing
        def __call__(self, input_ids, scores):
            mark_first()
            return scores

    # ours: common.generate_loop calls common.sample once per new token; main() patches this in while timing
    real_sample = common.sample
    BENCHED["sample"] = lambda *args, **kw: mark_first() or real_sample(*args, **kw)

    def hf(data, n):
        extra = {}
        if a.compile:  # transformers' fast path: a static cache and its compiled forward (on any device)
            from transformers.generation.configuration_utils import CompileConfig

            compile_config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
            compile_config._compile_all_devices = True
            extra = dict(cache_implementation="static", compile_config=compile_config)
        cfg = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **extra)
        return ref.generate(
            **data, generation_config=cfg, logits_processor=LogitsProcessorList([MarkFirst()])
        )

    def mine(data, n):
        return ours.generate(**data, max_new_tokens=n, eos_token_ids=[], compile=a.compile)

    def decode_s(generate, data):
        def run() -> float:
            marks.clear()
            generate(data, a.new_tokens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - marks[0]

        return run

    def calls(generate):
        return {
            "ttft_s": lambda: generate(inputs, 1),
            "decode1": decode_s(generate, inputs),
            "decodeB": decode_s(generate, batch),
        }

    ids = inputs["input_ids"]
    BENCHED.update(model=ours, prompt_tokens=ids.shape[1])
    n_visual = sum(int((ids == getattr(proc, f"{m}_token_id", -1)).sum()) for m in ("image", "video"))
    print(
        f"{a.model} {a.size}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, {device}, "
        f"{dtype}, prompt {ids.shape[1]} tokens ({n_visual} visual), {a.new_tokens} new"
    )
    return {
        "ours": {
            "preprocess_s": lambda: proc(text=text, **one),
            "vision_s": lambda: vision[0](inputs),
            **calls(mine),
        },
        "transformers": {
            "preprocess_s": lambda: hproc(text=[text], **one, return_tensors="pt"),
            "vision_s": lambda: vision[1](inputs),
            **calls(hf),
        },
    }


def chat(proc, kind: str, question: str) -> str:
    return proc.apply_chat_template(
        [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    )


def bench_qwen2_vl(a, device, dtype):
    from transformers import Qwen2VLForConditionalGeneration

    import qwen2_vl

    ckpt = checkpoint(a, tiny.build_qwen2_vl, Qwen2VLForConditionalGeneration, device, dtype)
    ours, proc, ref, hproc = load_pair(qwen2_vl, Qwen2VLForConditionalGeneration, ckpt, device, dtype)
    side = 448 if a.size == "real-config" else 224  # real-config: 256 image tokens
    img = Image.fromarray(tiny.synthetic_image(side, side))
    vision = (
        lambda x: ours.visual(x["pixel_values"].to(dtype), x["image_grid_thw"].cpu()),
        lambda x: ref.model.visual(x["pixel_values"].to(dtype), grid_thw=x["image_grid_thw"]),
    )
    text = chat(proc, "image", "Describe this image. " * 4)
    return generation_runs(a, device, dtype, ours, ref, proc, hproc, text, {"images": img}, vision)


def bench_paligemma(a, device, dtype):
    from transformers import PaliGemmaForConditionalGeneration

    import paligemma

    version = 2 if a.model == "paligemma2" else 1
    build = lambda root, size: tiny.build_paligemma(root, version, size)  # noqa: E731
    ckpt = checkpoint(a, build, PaliGemmaForConditionalGeneration, device, dtype)
    # NOTE: Gemma2 has no SDPA path in transformers (soft-capping): its reference runs eager attention
    impl = "eager" if version == 2 else "sdpa"
    ours, proc, ref, hproc = load_pair(
        paligemma, PaliGemmaForConditionalGeneration, ckpt, device, dtype, impl
    )
    print(f"transformers attention: {impl}")
    img = Image.fromarray(tiny.synthetic_image(240, 320))
    vision = (
        lambda x: ours.multi_modal_projector(ours.vision_tower(x["pixel_values"].to(dtype))),
        lambda x: ref.model.get_image_features(x["pixel_values"].to(dtype)),
    )
    text = "answer en " + "what is in this picture and where is it? " * 3
    return generation_runs(a, device, dtype, ours, ref, proc, hproc, text, {"images": img}, vision)


def bench_llava_onevision(a, device, dtype):
    from transformers import LlavaOnevisionForConditionalGeneration

    import llava_onevision

    ckpt = checkpoint(a, tiny.build_llava_onevision, LlavaOnevisionForConditionalGeneration, device, dtype)
    ours, proc, ref, hproc = load_pair(
        llava_onevision, LlavaOnevisionForConditionalGeneration, ckpt, device, dtype
    )
    tile = ours.cfg.vision_config.image_size
    # tiny: a 2 x 2 tile grid plus the base; small: 1 tile plus the base (1485 tokens), to keep CPU runs short
    img = Image.fromarray(
        tiny.synthetic_image(*((tile * 3 // 2, tile * 2) if a.size == "tiny" else (tile, tile)))
    )
    vision = (
        lambda x: ours.image_features(x["pixel_values"].to(dtype), x["image_sizes"], x["batch_num_images"]),
        lambda x: ref.model.get_image_features(
            x["pixel_values"].to(dtype), x["image_sizes"], batch_num_images=x["batch_num_images"]
        ),
    )
    text = chat(proc, "image", "Describe this image. " * 4)
    return generation_runs(a, device, dtype, ours, ref, proc, hproc, text, {"images": img}, vision)


def bench_video_llava(a, device, dtype):
    from transformers import VideoLlavaForConditionalGeneration

    import video_llava

    ckpt = checkpoint(a, tiny.build_video_llava, VideoLlavaForConditionalGeneration, device, dtype)
    ours, proc, ref, hproc = load_pair(video_llava, VideoLlavaForConditionalGeneration, ckpt, device, dtype)
    px = ours.cfg.vision_config.image_size
    video = tiny.synthetic_video(8, px, px * 4 // 3)  # the trained 8 frames
    vision = (
        lambda x: ours.video_features(x["pixel_values_videos"].to(dtype)),
        lambda x: ref.model.get_video_features(x["pixel_values_videos"].to(dtype)),
    )
    text = chat(proc, "video", "Why is this video funny? " * 4)
    return generation_runs(a, device, dtype, ours, ref, proc, hproc, text, {"videos": video}, vision)


def bench_perception_lm(a, device, dtype):
    from transformers import PerceptionLMForConditionalGeneration

    import perception_lm

    ckpt = checkpoint(a, tiny.build_perception_lm, PerceptionLMForConditionalGeneration, device, dtype)
    ours, proc, ref, hproc = load_pair(
        perception_lm, PerceptionLMForConditionalGeneration, ckpt, device, dtype
    )
    tile = ours.cfg.vision_config.image_size
    img = Image.fromarray(tiny.synthetic_image(tile * 3 // 2, tile * 2))
    vision = (
        lambda x: ours.media_features(x["pixel_values"].to(dtype)),
        lambda x: ref.model.get_image_features(x["pixel_values"].to(dtype)),
    )
    text = chat(proc, "image", "Describe this image. " * 4)
    return generation_runs(a, device, dtype, ours, ref, proc, hproc, text, {"images": img}, vision)


BENCHES = {
    "qwen2_vl": bench_qwen2_vl,
    "llava_onevision": bench_llava_onevision,
    "video_llava": bench_video_llava,
    "perception_lm": bench_perception_lm,
    "paligemma": bench_paligemma,
    "paligemma2": bench_paligemma,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2_vl", choices=sorted(BENCHES))
    ap.add_argument("--size", default="small", choices=["tiny", "small", "real-config"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="rows of the batched decode measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--compile", action="store_true", help="ours compiled vs transformers static + compile")
    a = ap.parse_args()
    if a.batch < 2 or a.new_tokens < 2:
        ap.error("--batch and --new-tokens must be at least 2 (batch 1 is always measured)")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = common.pick_device(a.device)
    measure_memory = device.type == "cuda" or Path("/proc/self/clear_refs").exists()
    if device.type == "cpu" and measure_memory:
        M_MMAP_THRESHOLD = -3  # a fixed threshold: blocks above it are unmapped as soon as they are freed
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    dtype = common.pick_dtype(a.dtype, device)
    runs = BENCHES[a.model](a, device, dtype)
    results = {name: {} for name in runs}
    warmup = {}
    with torch.inference_mode(), unittest.mock.patch.object(common, "sample", BENCHED["sample"]):
        for name in list(runs):  # warm-up (with --compile: the compiles)
            try:
                warmup[name] = sum(timed(fn, device)[0] for fn in runs[name].values())
            except Exception as e:
                if name == "ours":
                    raise
                # NOTE: transformers 5.23 fails PaliGemma 2 with a static cache (its precomputed mask dict
                # goes back into create_causal_mask); time ours alone rather than nothing.
                print(f"{name} failed, timed ours alone: {type(e).__name__}: {e}")
                del runs[name], results[name]
        for key in runs["ours"]:  # interleaved: ours, transformers, ours, ...
            for name in runs:
                fn = runs[name][key]
                if key.startswith("decode"):  # these runs measure their own decode time
                    results[name][key] = statistics.median(fn() for _ in range(a.repeats))
                else:
                    results[name][key] = median_time(fn, device, a.repeats)
        if measure_memory:
            for name in runs:
                results[name]["work_mem_mb"] = working_memory_mb(runs[name]["decode1"], device, 1)
    for r in results.values():
        N = a.new_tokens
        r["decode_tok_s_b1"] = (N - 1) / r.pop("decode1")
        r[f"decode_tok_s_b{a.batch}"] = a.batch * (N - 1) / r.pop("decodeB")
    keys = list(results["ours"])
    print(f"{'':18}" + "".join(f"{k:>18}" for k in keys))
    for name, r in results.items():
        print(f"{name:18}" + "".join(f"{r[k]:18.4f}" for k in keys))
    if "transformers" in results:
        theirs = results["transformers"]
        ratio = {k: results["ours"][k] / theirs[k] if theirs[k] else float("nan") for k in keys}
        print(f"{'ours/transformers':18}" + "".join(f"{ratio[k]:18.2f}" for k in keys))
    print(
        "warm-up s"
        + (" (compiles)" if a.compile else "")
        + ": "
        + ", ".join(f"{n} {t:.1f}" for n, t in warmup.items())
    )
    roofline(BENCHED["model"], BENCHED["prompt_tokens"], results, a, device)


VISION_PARTS = ("visual.", "vision_tower.", "image_tower.", "video_tower.", "multi_modal_projector.")


def cache_shape(model, prompt_tokens: int, new_tokens: int) -> tuple[int, int, int, int]:
    """(layers, Hkv, S, Dh) of the KV cache a batch-1 decode step reads, half way through the new tokens."""
    tc = model.cfg.text_config
    Dh = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return tc.num_hidden_layers, tc.num_key_value_heads, prompt_tokens + new_tokens // 2, Dh


def decoder_weights(model) -> list[torch.Tensor]:
    """The weight of every linear layer of the decoder, the output projection included."""
    return [
        m.weight
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.startswith(VISION_PARTS)
    ]


def decode_bytes(model, prompt_tokens: int, new_tokens: int) -> int:
    """Bytes one batch-1 decode step reads: the decoder's weights (the vision tower and projector are not
    used; the input embedding table only when it is tied to the output one) and the KV cache, half full."""
    skip = VISION_PARTS + ("image_newline",)
    tied = model.lm_head.weight is next(
        m.weight for n, m in model.named_modules() if n.endswith("embed_tokens")
    )
    weights = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if not n.startswith(skip) and (tied or not n.endswith("embed_tokens.weight"))
    )
    layers, Hkv, S, Dh = cache_shape(model, prompt_tokens, new_tokens)
    return weights + 2 * layers * Hkv * S * Dh * next(model.parameters()).element_size()


def gemv_bandwidth(n_bytes: int, device, dtype) -> float:
    """Bytes/s of a matrix-vector product over a matrix of n_bytes (at most 2 GiB): the decode roofline."""
    n_bytes = min(n_bytes, 2 << 30)
    cols = 4096
    rows = max(1, n_bytes // (cols * torch.tensor([], dtype=dtype).element_size()))
    W = torch.randn(rows, cols, device=device, dtype=dtype)
    x = torch.randn(cols, device=device, dtype=dtype)
    best = min(timed(lambda: W @ x, device)[0] for _ in range(10))
    return W.numel() * W.element_size() / best


def decode_floor(model, prompt_tokens: int, new_tokens: int, device) -> float:
    """Seconds the reading part of one batch-1 decode step takes run bare: one matrix-vector product with each
    of the decoder's weight matrices (the model's own tensors), then one query's attention over each layer's
    half-full cache. No implementation can skip this work; small matrices reach less of the bandwidth than one
    large GEMV, so the floor sits below the roofline."""
    weights = decoder_weights(model)
    xs = [torch.randn(1, w.shape[1], device=device, dtype=w.dtype) for w in weights]
    layers, Hkv, S, Dh = cache_shape(model, prompt_tokens, new_tokens)
    dtype = weights[0].dtype
    q = torch.randn(1, model.cfg.text_config.num_attention_heads, 1, Dh, device=device, dtype=dtype)
    caches = [torch.randn(2, 1, Hkv, S, Dh, device=device, dtype=dtype) for _ in range(layers)]

    def step():
        for x, w in zip(xs, weights):
            torch.nn.functional.linear(x, w)
        for k, v in caches:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return min(timed(step, device)[0] for _ in range(10))


def roofline(model, prompt_tokens: int, results, a, device) -> None:
    n = decode_bytes(model, prompt_tokens, a.new_tokens)
    bw = gemv_bandwidth(n, device, next(model.parameters()).dtype)
    floor = decode_floor(model, prompt_tokens, a.new_tokens, device)
    shares = {k: r["decode_tok_s_b1"] * n / bw for k, r in results.items()}
    print(
        f"decode roofline, batch 1: {n / 1e6:.1f} MB read per token, GEMV bandwidth {bw / 1e9:.1f} GB/s -> "
        + ", ".join(f"{k} {s:.0%}" for k, s in shares.items())
    )
    print(
        f"the step's weight products and cache attention run bare: {floor * 1e3:.2f} ms "
        f"({n / floor / 1e9:.1f} GB/s) -> "
        + ", ".join(f"{k} {r['decode_tok_s_b1'] * floor:.0%}" for k, r in results.items())
        + " of that floor"
    )


if __name__ == "__main__":
    main()
