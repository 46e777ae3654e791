"""Side-by-side speed of our model and transformers on the same random weights.

    python bench.py --model qwen2_vl --size small --device cpu
    python bench.py --model paligemma2 --size tiny --device cuda --dtype bfloat16

--model: qwen2_vl, paligemma (PaliGemma 1), paligemma2, llava_onevision, video_llava or perception_lm.

One checkpoint is built with random weights (tests/tiny.py, the same builder as the tests) and loaded
by both implementations. Printed per implementation: preprocessing, vision encoder, time to first token
(vision + prompt + one token), decode tokens/s at batch 1 and at --batch rows (default 8; EOS disabled: every
run makes N tokens) and, on CUDA, peak memory; then ours/transformers (above 1 is better for tokens/s,
below 1 for times).
Median of --repeats runs after one warm-up, the two implementations interleaved.
Protocol: ../shared/reference/benchmark-protocol.md. Needs requirements-dev.txt (transformers).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests"))
import conftest  # noqa: E402,F401  (the torchvision stand-in when the real one cannot load)
import tiny  # noqa: E402

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


def load_pair(module, hf_class, ckpt, device, dtype, impl="sdpa"):
    """Our model and processor, and transformers' model and processor, from one checkpoint directory."""
    from transformers import AutoProcessor

    ours, proc = module.load(ckpt, device=device, dtype=dtype)
    ref = hf_class.from_pretrained(ckpt, dtype=dtype, attn_implementation=impl).to(device).eval()
    return ours, proc, ref, AutoProcessor.from_pretrained(ckpt)


def generation_runs(ours, ref, inputs, batch, N, preprocess, vision):
    """The timed calls of one model: `preprocess` and `vision` are (ours, transformers) pairs of callables.
    NOTE: every run makes exactly n tokens: ours with no EOS ids; transformers with min_new_tokens = n, since
    an eos_token_id of None in a GenerationConfig is filled in from the checkpoint's generation_config."""
    from transformers import GenerationConfig

    def hf(data, n):
        cfg = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        return ref.generate(**data, generation_config=cfg)

    def mine(data, n):
        return ours.generate(**data, max_new_tokens=n, eos_token_ids=[])

    def calls(generate):
        return {
            "ttft_s": lambda: generate(inputs, 1),
            "ttftB": lambda: generate(batch, 1),
            "gen1": lambda: generate(inputs, N),
            "genB": lambda: generate(batch, N),
        }

    return {
        "ours": {"preprocess_s": preprocess[0], "vision_s": vision[0], **calls(mine)},
        "transformers": {"preprocess_s": preprocess[1], "vision_s": vision[1], **calls(hf)},
    }


def bench_qwen2_vl(a, device, dtype):
    from transformers import Qwen2VLForConditionalGeneration

    import qwen2_vl

    dirs = tiny.build_qwen2_vl(Path(tempfile.mkdtemp()), a.size)
    ours, proc, ref, hproc = load_pair(qwen2_vl, Qwen2VLForConditionalGeneration, dirs["hf5"], device, dtype)
    img = Image.fromarray(tiny.synthetic_image(224, 224))
    content = [{"type": "image"}, {"type": "text", "text": "Describe this image. " * 4}]
    text = proc.apply_chat_template([{"role": "user", "content": content}])
    inputs = {k: v.to(device) for k, v in proc(text=text, images=[img]).items()}
    batch = {k: v.to(device) for k, v in proc(text=[text] * a.batch, images=[img] * a.batch).items()}
    pixels, grid = inputs["pixel_values"].to(dtype), inputs["image_grid_thw"]
    runs = generation_runs(
        ours,
        ref,
        inputs,
        batch,
        a.new_tokens,
        (lambda: proc(text=text, images=[img]), lambda: hproc(text=text, images=[img], return_tensors="pt")),
        (lambda: ours.visual(pixels, grid.cpu()), lambda: ref.model.visual(pixels, grid_thw=grid)),
    )
    print(
        f"qwen2_vl {a.size}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, {device}, "
        f"{dtype}, prompt {inputs['input_ids'].shape[1]} tokens ({int(grid.prod()) // 4} visual), "
        f"{a.new_tokens} new"
    )
    return runs


def bench_paligemma(a, device, dtype):
    from transformers import PaliGemmaForConditionalGeneration

    import paligemma

    version = 2 if a.model == "paligemma2" else 1
    dirs = tiny.build_paligemma(Path(tempfile.mkdtemp()), version, a.size)
    # NOTE: Gemma2 has no SDPA path in transformers (soft-capping): its reference runs eager attention
    impl = "eager" if version == 2 else "sdpa"
    ours, proc, ref, hproc = load_pair(
        paligemma, PaliGemmaForConditionalGeneration, dirs["hf5"], device, dtype, impl
    )
    img = Image.fromarray(tiny.synthetic_image(240, 320))
    text = "answer en " + "what is in this picture and where is it? " * 3
    inputs = {k: v.to(device) for k, v in proc(text=text, images=[img]).items()}
    batch = {k: v.to(device) for k, v in proc(text=[text] * a.batch, images=[img] * a.batch).items()}
    pixels = inputs["pixel_values"].to(dtype)
    runs = generation_runs(
        ours,
        ref,
        inputs,
        batch,
        a.new_tokens,
        (lambda: proc(text=text, images=[img]), lambda: hproc(text=text, images=[img], return_tensors="pt")),
        (
            lambda: ours.multi_modal_projector(ours.vision_tower(pixels)),
            lambda: ref.model.get_image_features(pixels),
        ),
    )
    n_img = int((inputs["input_ids"] == proc.image_token_id).sum())
    print(
        f"{a.model} {a.size}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, {device}, "
        f"{dtype}, HF attention {impl}, prompt {inputs['input_ids'].shape[1]} tokens ({n_img} image), "
        f"{a.new_tokens} new"
    )
    return runs


def bench_llava_onevision(a, device, dtype):
    from transformers import LlavaOnevisionForConditionalGeneration

    import llava_onevision

    dirs = tiny.build_llava_onevision(Path(tempfile.mkdtemp()), a.size)
    ours, proc, ref, hproc = load_pair(
        llava_onevision, LlavaOnevisionForConditionalGeneration, dirs["hf5"], device, dtype
    )
    tile = ours.cfg.vision_config.image_size
    # tiny: a 2 x 2 tile grid plus the base; small: 1 tile plus the base (1485 tokens), to keep CPU runs short
    img = Image.fromarray(
        tiny.synthetic_image(*((tile * 3 // 2, tile * 2) if a.size == "tiny" else (tile, tile)))
    )
    content = [{"type": "image"}, {"type": "text", "text": "Describe this image. " * 4}]
    text = proc.apply_chat_template([{"role": "user", "content": content}])
    inputs = {k: v.to(device) for k, v in proc(text=text, images=[img]).items()}
    batch = {k: v.to(device) for k, v in proc(text=[text] * a.batch, images=[img] * a.batch).items()}
    px, sizes, n = inputs["pixel_values"].to(dtype), inputs["image_sizes"], inputs["batch_num_images"]
    runs = generation_runs(
        ours,
        ref,
        inputs,
        batch,
        a.new_tokens,
        (
            lambda: proc(text=text, images=[img]),
            lambda: hproc(text=[text], images=[img], return_tensors="pt"),
        ),
        (
            lambda: ours.image_features(px, sizes, n),
            lambda: ref.model.get_image_features(px, sizes, batch_num_images=n),
        ),
    )
    n_img = int((inputs["input_ids"] == proc.image_token_id).sum())
    print(
        f"llava_onevision {a.size}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, "
        f"{device}, {dtype}, prompt {inputs['input_ids'].shape[1]} tokens ({n_img} image), {a.new_tokens} new"
    )
    return runs


def bench_video_llava(a, device, dtype):
    from transformers import VideoLlavaForConditionalGeneration

    import video_llava

    dirs = tiny.build_video_llava(Path(tempfile.mkdtemp()), a.size)
    ours, proc, ref, hproc = load_pair(
        video_llava, VideoLlavaForConditionalGeneration, dirs["hf5"], device, dtype
    )
    px = ours.cfg.vision_config.image_size
    video = tiny.synthetic_video(8, px, px * 4 // 3)  # the trained 8 frames
    content = [{"type": "video"}, {"type": "text", "text": "Why is this video funny? " * 4}]
    text = proc.apply_chat_template([{"role": "user", "content": content}])
    inputs = {k: v.to(device) for k, v in proc(text=text, videos=[video]).items()}
    batch = {k: v.to(device) for k, v in proc(text=[text] * a.batch, videos=[video] * a.batch).items()}
    frames = inputs["pixel_values_videos"].to(dtype)
    runs = generation_runs(
        ours,
        ref,
        inputs,
        batch,
        a.new_tokens,
        (
            lambda: proc(text=text, videos=[video]),
            lambda: hproc(text=[text], videos=[video], return_tensors="pt"),
        ),
        (lambda: ours.video_features(frames), lambda: ref.model.get_video_features(frames)),
    )
    n_vid = int((inputs["input_ids"] == proc.video_token_id).sum())
    print(
        f"video_llava {a.size}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, {device}, "
        f"{dtype}, prompt {inputs['input_ids'].shape[1]} tokens ({n_vid} video), {a.new_tokens} new"
    )
    return runs


def bench_perception_lm(a, device, dtype):
    from transformers import PerceptionLMForConditionalGeneration

    import perception_lm

    dirs = tiny.build_perception_lm(Path(tempfile.mkdtemp()), a.size)
    ours, proc, ref, hproc = load_pair(
        perception_lm, PerceptionLMForConditionalGeneration, dirs["hf5"], device, dtype
    )
    tile = ours.cfg.vision_config.image_size
    img = Image.fromarray(tiny.synthetic_image(tile * 3 // 2, tile * 2))
    content = [{"type": "image"}, {"type": "text", "text": "Describe this image. " * 4}]
    text = proc.apply_chat_template([{"role": "user", "content": content}])
    inputs = {k: v.to(device) for k, v in proc(text=text, images=[img]).items()}
    batch = {k: v.to(device) for k, v in proc(text=[text] * a.batch, images=[img] * a.batch).items()}
    px = inputs["pixel_values"].to(dtype)
    runs = generation_runs(
        ours,
        ref,
        inputs,
        batch,
        a.new_tokens,
        (
            lambda: proc(text=text, images=[img]),
            lambda: hproc(text=[text], images=[img], return_tensors="pt"),
        ),
        (lambda: ours.media_features(px), lambda: ref.model.get_image_features(px)),
    )
    n_img = int((inputs["input_ids"] == proc.image_token_id).sum())
    print(
        f"perception_lm {a.size}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, "
        f"{device}, {dtype}, {px.shape[1]} tiles, prompt {inputs['input_ids'].shape[1]} tokens "
        f"({n_img} image), {a.new_tokens} new"
    )
    return runs


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
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="rows of the batched decode measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = common.pick_device(a.device)
    dtype = common.pick_dtype(a.dtype, device)
    runs = BENCHES[a.model](a, device, dtype)
    results = {name: {} for name in runs}
    with torch.inference_mode():
        for name in runs:  # warm-up
            for fn in runs[name].values():
                fn()
        for key in runs["ours"]:  # interleaved: ours, transformers, ours, ...
            for name in runs:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                results[name][key] = median_time(runs[name][key], device, a.repeats)
                if device.type == "cuda" and key == "gen1":
                    results[name]["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    for r in results.values():
        N = a.new_tokens
        r["decode_tok_s_b1"] = (N - 1) / max(r["gen1"] - r["ttft_s"], 1e-9)
        r[f"decode_tok_s_b{a.batch}"] = a.batch * (N - 1) / max(r.pop("genB") - r.pop("ttftB"), 1e-9)
        r.pop("gen1")
    keys = list(results["ours"])
    print(f"{'':18}" + "".join(f"{k:>18}" for k in keys))
    for name, r in results.items():
        print(f"{name:18}" + "".join(f"{r[k]:18.4f}" for k in keys))
    ratio = {k: results["ours"][k] / results["transformers"][k] for k in keys}
    print(f"{'ours/transformers':18}" + "".join(f"{ratio[k]:18.2f}" for k in keys))


if __name__ == "__main__":
    main()
