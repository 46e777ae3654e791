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


def generation_runs(a, device, dtype, ours, ref, proc, hproc, text, media, vision):
    """The timed calls of one model on one prompt: `media` is the processor keyword and its one item (e.g.
    {"images": img}), `vision` the (ours, transformers) vision encoders as functions of the inputs.
    NOTE: every run makes exactly n tokens: ours with no EOS ids; transformers with min_new_tokens = n, since
    an eos_token_id of None in a GenerationConfig is filled in from the checkpoint's generation_config."""
    from transformers import GenerationConfig

    one = {k: [v] for k, v in media.items()}
    inputs = {k: v.to(device) for k, v in proc(text=text, **one).items()}
    batch = proc(text=[text] * a.batch, **{k: [v] * a.batch for k, v in media.items()})
    batch = {k: v.to(device) for k, v in batch.items()}

    def hf(data, n):
        cfg = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        return ref.generate(**data, generation_config=cfg)

    def mine(data, n):
        return ours.generate(**data, max_new_tokens=n, eos_token_ids=[])

    def calls(generate):
        return {
            "ttft_s": lambda: generate(inputs, 1),
            "ttftB": lambda: generate(batch, 1),
            "gen1": lambda: generate(inputs, a.new_tokens),
            "genB": lambda: generate(batch, a.new_tokens),
        }

    ids = inputs["input_ids"]
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

    dirs = tiny.build_qwen2_vl(Path(tempfile.mkdtemp()), a.size)
    ours, proc, ref, hproc = load_pair(qwen2_vl, Qwen2VLForConditionalGeneration, dirs["hf5"], device, dtype)
    img = Image.fromarray(tiny.synthetic_image(224, 224))
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
    dirs = tiny.build_paligemma(Path(tempfile.mkdtemp()), version, a.size)
    # NOTE: Gemma2 has no SDPA path in transformers (soft-capping): its reference runs eager attention
    impl = "eager" if version == 2 else "sdpa"
    ours, proc, ref, hproc = load_pair(
        paligemma, PaliGemmaForConditionalGeneration, dirs["hf5"], device, dtype, impl
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

    dirs = tiny.build_llava_onevision(Path(tempfile.mkdtemp()), a.size)
    ours, proc, ref, hproc = load_pair(
        llava_onevision, LlavaOnevisionForConditionalGeneration, dirs["hf5"], device, dtype
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

    dirs = tiny.build_video_llava(Path(tempfile.mkdtemp()), a.size)
    ours, proc, ref, hproc = load_pair(
        video_llava, VideoLlavaForConditionalGeneration, dirs["hf5"], device, dtype
    )
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

    dirs = tiny.build_perception_lm(Path(tempfile.mkdtemp()), a.size)
    ours, proc, ref, hproc = load_pair(
        perception_lm, PerceptionLMForConditionalGeneration, dirs["hf5"], device, dtype
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
