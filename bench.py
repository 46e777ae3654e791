"""Side-by-side speed of our model and transformers on the same random weights.

    python bench.py --model qwen2_vl --size small --device cpu
    python bench.py --model paligemma2 --size tiny --device cuda --dtype bfloat16
    python bench.py --model qwen2_vl --size real-config --device cuda      # Qwen2-VL-2B's shapes, bf16
    python bench.py --model qwen2_vl --size real-config --device cuda --compile
    python bench.py --all --device cuda     # all six, eager / compiled / int8 / int4: one Markdown table

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
import gc
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
import quant  # noqa: E402


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


CHECKPOINTS: dict[tuple, Path] = {}  # one per model, size, device and dtype: bench_all's runs share them


def checkpoint(a, build, hf_class, device, dtype) -> Path:
    """The directory both implementations load: a tests/tiny.py build at --size, or a real-config one."""
    key = (a.model, a.size, str(device), dtype)
    if key not in CHECKPOINTS:
        size = "tiny" if a.size == "real-config" else a.size
        ckpt = build(Path(tempfile.mkdtemp()), size)["hf5"]
        if a.size == "real-config":
            ckpt = real_config_checkpoint(a.model, ckpt, hf_class, device, dtype)
        CHECKPOINTS[key] = ckpt
    return CHECKPOINTS[key]


def load_pair(a, module, hf_class, ckpt, device, dtype, impl="sdpa"):
    """Our model and processor, and transformers' model and processor, from one checkpoint directory.
    With --quantize: ours quantized, ours unquantized kept for the side-by-side (BENCHED["unquantized"]),
    and transformers with torchao's int8 weight-only quantization of the same layers (the decoder's linear
    layers and the output layer), when torchao is installed. With a.ours_alone: ours only (None, None)."""
    from transformers import AutoProcessor

    ours, proc = module.load(ckpt, device=device, dtype=dtype, quantize=a.quantize)
    if a.ours_alone:  # bench_all's quantized runs: ours bf16 and transformers are timed in its other runs
        return ours, proc, None, None
    extra = {}
    if a.quantize:
        BENCHED["unquantized"] = module.load(ckpt, device=device, dtype=dtype)[0]
        extra = torchao_int8(ours)
    ref = hf_class.from_pretrained(ckpt, dtype=dtype, attn_implementation=impl, **extra).to(device).eval()
    return ours, proc, ref, AutoProcessor.from_pretrained(ckpt)


def torchao_int8(ours) -> dict:
    """from_pretrained's arguments for transformers + torchao int8 weight-only on the layers ours quantizes
    (so the vision side stays unquantized in both), or {} when torchao is not installed."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig
    except ImportError:
        print("torchao is not installed: transformers runs unquantized")
        return {}
    BENCHED["peer"] = "transformers + torchao int8"
    keep = [n for n, _ in ours.named_children() if n not in ours.quantized_parts]
    keep += [f"model.{n}" for n in keep]  # the names as saved and as transformers 5 nests them
    return {"quantization_config": TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=keep)}


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

    if a.chat:
        return chat_runs(a, device, ours, ref, proc, hproc, media)
    if a.folder:
        return folder_runs(a, ours, proc)
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

    # ours: common.decode_loop checks the prefill's logits (a host read) just before it chooses the first
    # token; run() patches this in while timing
    real_check = common.check_finite
    BENCHED["check_finite"] = lambda logits: real_check(logits) or mark_first()

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

    def mine(data, n, model=ours):
        return model.generate(**data, max_new_tokens=n, eos_token_ids=[], compile=a.compile)

    def decode_s(generate, data):
        def run() -> float:
            marks.clear()
            generate(data, a.new_tokens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - marks[0]

        return run

    def calls(generate, model=None):
        timed_calls = {
            "ttft_s": lambda: generate(inputs, 1),
            "decode1": decode_s(generate, inputs),
            "decodeB": decode_s(generate, batch),
        }
        if model is not None:  # ours: the step alone, replayed
            timed_calls["decode_step1"] = lambda: step_ms(model, generate, inputs, a.new_tokens, a.compile)
            timed_calls["decode_stepB"] = lambda: step_ms(model, generate, batch, a.new_tokens, a.compile)
        return timed_calls

    ids = inputs["input_ids"]
    n_visual = sum(int((ids == getattr(proc, f"{m}_token_id", -1)).sum()) for m in ("image", "video"))
    BENCHED.update(model=ours, prompt_tokens=ids.shape[1], prompt=f"{ids.shape[1]} ({n_visual})")
    n_parameters = sum(p.numel() for p in BENCHED.get("unquantized", ours).parameters())
    print(
        f"{a.model} {a.size}: {n_parameters / 1e6:.1f}M parameters, {device}, "
        f"{dtype}, prompt {ids.shape[1]} tokens ({n_visual} visual), {a.new_tokens} new"
    )
    runs = {
        "ours": {
            "preprocess_s": lambda: proc(text=text, **one),
            "vision_s": lambda: vision[0](inputs),
            **calls(mine, ours),
        },
        "transformers": {
            "preprocess_s": lambda: hproc(text=[text], **one, return_tensors="pt"),
            "vision_s": lambda: vision[1](inputs),
            **calls(hf),
        },
    }
    if ref is None:
        del runs["transformers"]
    if "unquantized" in BENCHED:  # the same model unquantized: the vision side is shared: generation only
        plain = BENCHED["unquantized"]
        runs["ours unquantized"] = calls(lambda data, n: mine(data, n, plain), plain)
    return runs


def step_ms(model, generate, data, n: int, compile: bool) -> float:
    """Milliseconds per decode step in steady state: one generate() of n tokens leaves its Decoding on the
    model; its last n - 1 steps are run again on the same tensors (`replay`), with one sync at the end. With
    --compile: replays of the compiled token (a CUDA graph on CUDA); nothing else runs between them, neither
    the loop's checks nor a host read."""
    generate(data, n)
    one = replay(model, common.compiled_next_token(model) if compile else common.next_token, n)

    def steps():
        for i in range(n - 1):
            one(i)

    return timed(steps, model._decoding.tokens.device)[0] / (n - 1) * 1e3


def replay(model, step, n: int):
    """Decode step i = 0 .. n - 2 of the generate() of n tokens whose Decoding `model` keeps, run again by
    the token function `step` (common.next_token, or a compiled one) at each call one(i); one(0) moves slot
    and position back to where that call's first step began (the cache as it was)."""
    d = model._decoding
    settings = common.GenerationSettings(max_new_tokens=n, eos_token_ids=[])  # generate()'s for the bench
    eos = torch.tensor([], dtype=torch.long, device=d.tokens.device)
    slot, pos = d.slot - (n - 1), d.pos - (n - 1)

    def one(i: int) -> None:
        if i == 0:
            d.slot.copy_(slot), d.pos.copy_(pos)
        step(model.decode_step, d, settings, model.pad_token_id, eos)

    return one


def chat_runs(a, device, ours, ref, proc, hproc, media: dict) -> dict:
    """--chat: the time to the first token of a short second turn after an image (or video) turn: ours on the
    cache the first turn left (PaliGemma: a second task prefix on the kept vision features), against ours and
    transformers running the whole conversation again as one prompt (what generate() does without a kept
    cache). The first answer is a.new_tokens long."""
    from transformers import GenerationConfig

    import paligemma

    (kind, item), plain = next(iter(media.items())), not hasattr(proc, "apply_chat_template")
    if kind == "images":  # a photo's size, downscaled
        item = Image.fromarray(tiny.synthetic_image(480, 640))
    if a.model == "qwen2_vl":  # the tiny builds cap an image at 64 tokens; the published files give it 391
        from dataclasses import replace

        proc.image = replace(proc.image, max_pixels=1003520)
        hproc.image_processor.size["longest_edge"] = 1003520
    first, second = ("caption en", "detect square") if plain else ("Describe this. " * 4, "And its colour?")
    conversation = (paligemma.Chat if plain else common.Chat)(ours, proc)
    conversation.ask(first, **{kind: [item]}, max_new_tokens=a.new_tokens, eos_token_ids=[])
    past = getattr(conversation, "past", None)
    state = (conversation.input_ids, list(conversation.messages), past and (past.length, past.delta))

    def kept():  # the second turn on the kept state, restored before each run
        conversation.input_ids, conversation.messages = state[0], list(state[1])
        if past is not None:
            past.length, past.delta = state[2]
        conversation.ask(second, max_new_tokens=1, eos_token_ids=[])

    user = {"role": "user", "content": [{"type": "text", "text": second}]}
    text = second if plain else proc.apply_chat_template(list(state[1]) + [user])
    inputs = {k: v.to(device) for k, v in proc(text=text, **{kind: [item]}).items()}
    hinputs = hproc(text=[text], **{kind: [item]}, return_tensors="pt").to(device)
    config = GenerationConfig(do_sample=False, max_new_tokens=1, pad_token_id=0)
    ids = inputs["input_ids"]
    assert hinputs["input_ids"].shape == ids.shape, "both implementations read the same conversation"
    BENCHED.update(model=ours, prompt_tokens=ids.shape[1], prompt=f"{ids.shape[1]}")
    print(
        f"{a.model} {a.size} --chat: turn 2 after a turn with one of {kind}; the whole conversation "
        f"is {ids.shape[1]} tokens"
    )
    return {
        "ours, kept cache": {"ttft_turn2_s": kept},
        "ours, re-run": {"ttft_turn2_s": lambda: ours.generate(**inputs, max_new_tokens=1, eos_token_ids=[])},
        "transformers, re-run": {"ttft_turn2_s": lambda: ref.generate(**hinputs, generation_config=config)},
    }


def folder_runs(a, ours, proc) -> dict:
    """--folder: --batch images of a few sizes answered by the command line's batch code (cli.answer_rows,
    image files read and all), in one generate() call against one call per image; images per second."""
    import argparse as _argparse

    import cli

    folder = Path(tempfile.mkdtemp())
    sizes = [(224, 224), (200, 260), (260, 200), (240, 240)]
    for i in range(a.batch):
        Image.fromarray(tiny.synthetic_image(*sizes[i % len(sizes)], seed=i)).save(folder / f"{i:02d}.png")
    rows = [{"image": str(f), "prompt": "Describe this image."} for f in sorted(folder.iterdir())]
    flags = _argparse.Namespace(max_image_pixels=10**8, max_new_tokens=a.new_tokens, temperature=0.0, top_k=0)
    flags.__dict__.update(top_p=1.0, repetition_penalty=1.0, seed=None)
    plain = not hasattr(proc, "apply_chat_template")
    prompt_of = (lambda t: t) if plain else (lambda t: chat(proc, "image", t))
    answer = lambda group: cli.answer_rows(group, flags, ours, proc, prompt_of)
    BENCHED.update(model=ours, prompt="")
    print(f"{a.model} {a.size} --folder: {a.batch} images, {a.new_tokens} new tokens each")
    return {
        f"ours, batch {a.batch}": {"seconds": lambda: answer(rows)},
        "ours, one by one": {"seconds": lambda: [answer([r]) for r in rows]},
    }


def session_table(a, runs: dict, device) -> dict:
    """--chat and --folder: each run's median time after one warm-up, interleaved, and the speed-ups."""
    for fns in runs.values():  # warm-up
        for fn in fns.values():
            fn()
    results = {name: {} for name in runs}
    for key in next(iter(runs.values())):
        for name in runs:
            results[name][key] = median_time(runs[name][key], device, a.repeats)
    base = next(iter(results))
    for name, r in results.items():
        key, t = next(iter(r.items()))
        extra = f"  {a.batch / t:8.2f} images/s" if a.folder else ""
        ratio = "" if name == base else f"  {t / results[base][key]:7.1f}x the time of {base}"
        print(f"{name:24} {key} {t:9.4f}{extra}{ratio}")
    return {"results": results}


def chat(proc, kind: str, question: str) -> str:
    return proc.apply_chat_template(
        [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    )


def bench_qwen2_vl(a, device, dtype):
    from transformers import Qwen2VLForConditionalGeneration

    import qwen2_vl

    ckpt = checkpoint(a, tiny.build_qwen2_vl, Qwen2VLForConditionalGeneration, device, dtype)
    ours, proc, ref, hproc = load_pair(a, qwen2_vl, Qwen2VLForConditionalGeneration, ckpt, device, dtype)
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
        a, paligemma, PaliGemmaForConditionalGeneration, ckpt, device, dtype, impl
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
        a, llava_onevision, LlavaOnevisionForConditionalGeneration, ckpt, device, dtype
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
    ours, proc, ref, hproc = load_pair(
        a, video_llava, VideoLlavaForConditionalGeneration, ckpt, device, dtype
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

    ckpt = checkpoint(a, tiny.build_perception_lm, PerceptionLMForConditionalGeneration, device, dtype)
    ours, proc, ref, hproc = load_pair(
        a, perception_lm, PerceptionLMForConditionalGeneration, ckpt, device, dtype
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
    "paligemma": bench_paligemma,
    "paligemma2": bench_paligemma,
    "llava_onevision": bench_llava_onevision,
    "video_llava": bench_video_llava,
    "perception_lm": bench_perception_lm,
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2_vl", choices=sorted(BENCHES))
    ap.add_argument(
        "--size", choices=["tiny", "small", "real-config"], help="default small; real-config with --all"
    )
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, help="timed runs, median taken (default 5; 3 with --all)")
    ap.add_argument("--batch", type=int, default=8, help="rows of the batched decode measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--compile", action="store_true", help="ours compiled vs transformers static + compile")
    ap.add_argument(
        "--quantize",
        choices=quant.MODES,
        help="ours quantized, against ours unquantized and transformers + torchao int8 (default dtype: bf16)",
    )
    ap.add_argument(
        "--chat",
        action="store_true",
        help="time to first token of a second chat turn: kept cache against re-running the conversation",
    )
    ap.add_argument(
        "--folder", action="store_true", help="images/s of --batch images in one call against one by one"
    )
    ap.add_argument("--memory", action="store_true", help="print the parameter memory table and stop")
    ap.add_argument(
        "--all",
        action="store_true",
        help="every model: eager, compiled, int8 and int4 in bf16, one Markdown table (see bench_all)",
    )
    ap.add_argument("--models", help="with --all: a comma-separated subset of the models")
    ap.add_argument("--settings", help="with --all: a comma-separated subset of eager,compiled,int8,int4")
    ap.add_argument("--out", help="with --all: the table's file (default bench-all-DEVICE.md)")
    a = ap.parse_args(argv)
    if a.chat and a.folder:
        ap.error("--chat and --folder are two measurements: give one")
    if a.batch < 2 or a.new_tokens < 2:
        ap.error("--batch and --new-tokens must be at least 2 (batch 1 is always measured)")
    for flag, value, known in (("--models", a.models, BENCHES), ("--settings", a.settings, SETTINGS)):
        unknown = set((value or "").split(",")) - set(known) - {""}
        if unknown:
            ap.error(f"{flag}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    a.size = a.size or ("real-config" if a.all else "small")
    a.repeats, a.ours_alone = a.repeats or (3 if a.all else 5), False
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory:
        print(memory_table())
    elif a.all:
        bench_all(a)
    else:
        run(a)


def run(a: argparse.Namespace) -> dict:
    """One model, one setting: prints the side-by-side table and the roofline, and returns
    {"results": {run name: {figure: value}}, "roofline": {run name: share of the GEMV roofline},
    "prompt": "tokens (visual tokens)"}."""
    BENCHED.clear()
    device = common.pick_device(a.device)
    measure_memory = device.type == "cuda" or Path("/proc/self/clear_refs").exists()
    if device.type == "cpu" and measure_memory:
        M_MMAP_THRESHOLD = -3  # a fixed threshold: blocks above it are unmapped as soon as they are freed
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    dtype = common.pick_dtype(a.dtype, device, a.quantize)
    runs = BENCHES[a.model](a, device, dtype)
    if a.chat or a.folder:
        with torch.inference_mode():
            return session_table(a, runs, device)
    results = {name: {} for name in runs}
    warmup = {}
    with torch.inference_mode(), unittest.mock.patch.object(common, "check_finite", BENCHED["check_finite"]):
        for name in list(runs):  # warm-up (with --compile: the compiles)
            try:
                warmup[name] = {key: timed(fn, device)[0] for key, fn in runs[name].items()}
            except Exception as e:
                if name == "ours":
                    raise
                # NOTE: transformers 5.23 fails PaliGemma 2 with a static cache (its precomputed mask dict
                # goes back into create_causal_mask); time ours alone rather than nothing.
                print(f"{name} failed, timed ours alone: {type(e).__name__}: {e}")
                del runs[name], results[name]
        for key in runs["ours"]:  # interleaved: ours, transformers, ours, ...
            for name in [n for n in runs if key in runs[n]]:
                fn = runs[name][key]
                if key.startswith("decode"):  # these runs measure their own decode time
                    results[name][key] = statistics.median(fn() for _ in range(a.repeats))
                else:
                    results[name][key] = median_time(fn, device, a.repeats)
        if measure_memory:
            for name in runs:
                results[name]["work_mem_mb"] = working_memory_mb(runs[name]["decode1"], device, 1)
        compile_s = {  # with --compile: the first generate() of each batch size, less the same call again
            name: sum(warmup[name][k] - timed(runs[name][k], device)[0] for k in ("decode1", "decodeB"))
            for name in runs
            if a.compile
        }
    for r in results.values():
        N = a.new_tokens
        r["decode_tok_s_b1"] = (N - 1) / r.pop("decode1")
        r[f"decode_tok_s_b{a.batch}"] = a.batch * (N - 1) / r.pop("decodeB")
        if "decode_step1" in r:
            r["step_ms_b1"], r[f"step_ms_b{a.batch}"] = r.pop("decode_step1"), r.pop("decode_stepB")
    keys = list(results["ours"])
    label = {"ours": f"ours {a.quantize}" if a.quantize else "ours", "transformers": BENCHED.get("peer")}
    label["ours unquantized"] = f"ours {str(dtype).removeprefix('torch.')}"
    width = max(18, *(len(label.get(n) or n) + 2 for n in results))
    print(f"{'':{width}}" + "".join(f"{k:>18}" for k in keys))
    for name, r in results.items():
        print(
            f"{label.get(name) or name:{width}}"
            + "".join(f"{r[k]:18.4f}" if k in r else f"{'':18}" for k in keys)
        )
    for other in ("transformers", "ours unquantized"):
        if other in results:
            theirs = results[other]
            ratio = {k: results["ours"][k] / theirs[k] if theirs.get(k) else None for k in keys}
            print(
                f"{'ours/' + other.removeprefix('ours '):{width}}"
                + "".join(f"{ratio[k]:18.2f}" if ratio[k] is not None else f"{'':18}" for k in keys)
            )
    print("warm-up s: " + ", ".join(f"{n} {sum(t.values()):.1f}" for n, t in warmup.items()))
    if a.compile:
        print(
            f"compile s (the first batch-1 and batch-{a.batch} runs less the same runs again): "
            + ", ".join(f"{n} {t:.1f}" for n, t in compile_s.items())
        )
        for r, t in zip(results.values(), compile_s.values()):
            r["compile_s"] = t
    shares = roofline(BENCHED["prompt_tokens"], results, a, device)
    return {"results": results, "roofline": shares, "prompt": BENCHED["prompt"]}


# ----------------------------------------------------------------------------------------------------------
# Every model in every setting (python bench.py --all): one table


SETTINGS = {  # name -> (compile, quantize)
    "eager": (False, None),
    "compiled": (True, None),
    "int8": (True, "int8"),
    "int4": (True, "int4"),
}


def bench_all(a: argparse.Namespace) -> str:
    """Each model (or --models) at --size (default real-config) in bf16 (or --dtype), in the four SETTINGS
    (or --settings): eager and compiled against transformers eager and transformers static cache + compiled
    forward; int8 and int4 (compiled) as ours alone, against ours compiled bf16 and transformers compiled from
    the "compiled" run. One row per model and setting; a run that fails gets its error in its row, and the
    rest go on. The table is written to --out after every row (so a run cut short leaves the rows it
    finished) and printed at the end. --repeats defaults to 3 here (5 for one run)."""
    device = common.pick_device(a.device)
    out = Path(a.out or f"bench-all-{device.type}.md")
    models = a.models.split(",") if a.models else list(BENCHES)
    settings = a.settings.split(",") if a.settings else list(SETTINGS)
    head = [
        f"`python bench.py {' '.join(sys.argv[1:])}`: {device_name(device)}, torch {torch.__version__}, "
        f"transformers {transformers_version()}, {a.dtype or 'bfloat16'}, --size {a.size}, "
        f"{a.new_tokens} new tokens, median of {a.repeats}, batch {a.batch} for the batched column. "
        "Cells: ours / transformers (ours/transformers); int8 and int4 rows: ours quantized / transformers "
        "compiled bf16, and their last column ours quantized / ours compiled bf16.",
        "",
        *table_head(a.batch),
    ]
    rows: list[str] = []
    for model in models:
        done: dict[str, dict] = {}
        for setting in settings:
            compile, quantize = SETTINGS[setting]
            b = argparse.Namespace(**{**vars(a), "model": model, "compile": compile, "quantize": quantize})
            b.dtype, b.ours_alone = a.dtype or "bfloat16", quantize is not None
            t0 = time.perf_counter()
            try:
                done[setting] = run(b)
                rows.append(table_row(model, setting, done, a.batch))
            except Exception as e:  # one failure must not cost the other runs' figures
                print(f"{model} {setting} failed: {type(e).__name__}: {e}")
                message = re.sub(r"\s+", " ", f"{type(e).__name__}: {e}")[:120].replace("|", "/")
                rows.append(f"| {model} | {setting} | failed: {message} |||||||")
            print(f"{model} {setting}: {time.perf_counter() - t0:.0f} s")
            release(device)
            out.write_text("\n".join(head + rows) + "\n")
        for path in [p for k, p in CHECKPOINTS.items() if k[0] == model]:
            shutil.rmtree(path.parent, ignore_errors=True)
    table = "\n".join(head + rows)
    print(table)
    print(f"written to {out}")
    return table


def table_head(batch: int) -> list[str]:
    """The column names and the separator line of bench_all's table (SPEED.md shows the same)."""
    return [
        f"| model | setting | prompt (visual) | decode tok/s, batch 1 | decode tok/s, batch {batch} "
        "| time to first token | working memory | share of GEMV roofline, batch 1 | vs ours bf16 "
        f"| ours step ms, batch 1 / {batch} | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def release(device) -> None:
    """Frees what a run left: its models, compiled graphs (and their CUDA graph memory), cached blocks."""
    BENCHED.clear()
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table_row(model: str, setting: str, done: dict, batch: int) -> str:
    """One Markdown row of bench_all's table, from run()'s figures (done[setting]); the int8/int4 rows take
    transformers' figures from the compiled run and compare with ours compiled bf16 too."""
    r, quantized = done[setting], SETTINGS[setting][1] is not None
    peer = done.get("compiled", {}) if quantized else r  # the run transformers' figures come from
    ours, theirs = r["results"]["ours"], peer.get("results", {}).get("transformers", {})

    def cell(key: str, scale: float = 1.0, unit: str = "", digits: int = 1, faster_is_higher=True) -> str:
        mine, other = ours[key] * scale, theirs.get(key)
        if other is None:
            return f"{mine:.{digits}f}{unit}"
        other *= scale
        ratio = "-" if other == 0 else f"{mine / other:.2f}" + ("x" if faster_is_higher else "")
        return f"{mine:.{digits}f} / {other:.{digits}f}{unit} ({ratio})"

    shares = [r["roofline"]["ours"]] + ([] if quantized else [r["roofline"].get("transformers")])
    roof = " / ".join(f"{v:.0%}" for v in shares if v is not None)
    versus = "-"
    if quantized and "compiled" in done:
        plain = done["compiled"]["results"]["ours"]
        versus = f"{ours['decode_tok_s_b1'] / plain['decode_tok_s_b1']:.2f}x"
    memory = "-"
    if "work_mem_mb" in ours:
        memory = cell("work_mem_mb", unit=" MiB", digits=1, faster_is_higher=False)
    step = f"{ours['step_ms_b1']:.2f} / {ours[f'step_ms_b{batch}']:.2f}"
    compiled = "-" if "compile_s" not in ours else cell("compile_s", faster_is_higher=False)
    return (
        f"| {model} | {setting} | {r['prompt']} | {cell('decode_tok_s_b1')} | "
        f"{cell(f'decode_tok_s_b{batch}', digits=0)} | "
        f"{cell('ttft_s', 1e3, ' ms', 0, False)} | {memory} | {roof} | {versus} | {step} | {compiled} |"
    )


VISION_PARTS = ("visual.", "vision_tower.", "image_tower.", "video_tower.", "multi_modal_projector.")


def cache_shape(model, prompt_tokens: int, new_tokens: int) -> tuple[int, int, int, int]:
    """(layers, Hkv, S, Dh) of the KV cache a batch-1 decode step reads, half way through the new tokens."""
    tc = model.cfg.text_config
    Dh = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return tc.num_hidden_layers, tc.num_key_value_heads, prompt_tokens + new_tokens // 2, Dh


def decoder_layers(model) -> list[torch.nn.Module]:
    """Every linear layer of the decoder, plain or quantized, the output layer included."""
    kinds = (torch.nn.Linear, quant.Int8Linear, quant.Int4Linear)
    return [m for n, m in model.named_modules() if isinstance(m, kinds) and not n.startswith(VISION_PARTS)]


def embedding(model) -> torch.nn.Embedding:
    """The decoder's input embedding table (its dtype is the model's load dtype)."""
    return next(m for n, m in model.named_modules() if n.endswith("embed_tokens"))


def decode_bytes(model, prompt_tokens: int, new_tokens: int) -> int:
    """Bytes one batch-1 decode step reads: the decoder's weights, as stored (quantized layers keep theirs in
    buffers; the vision tower and projector are not used; the input embedding table only when it is tied to
    the output layer) and the KV cache, half full."""
    skip = VISION_PARTS + ("image_newline",)
    embed = embedding(model)
    tied = model.lm_head.weight is embed.weight
    weights = sum(
        t.numel() * t.element_size()
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if not n.startswith(skip) and (tied or not n.endswith("embed_tokens.weight"))
    )
    layers, Hkv, S, Dh = cache_shape(model, prompt_tokens, new_tokens)
    return weights + 2 * layers * Hkv * S * Dh * embed.weight.element_size()


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
    """Seconds the reading part of one batch-1 decode step takes run bare: each of the decoder's linear
    layers (the model's own, quantized ones included) on one row, then one query's attention over each
    layer's half-full cache; on CUDA captured in one CUDA graph, so that launch overhead is not measured. No
    implementation can skip this work; small matrices reach less of the bandwidth than one large GEMV, so the
    floor sits below the roofline."""
    layers = decoder_layers(model)
    dtype = embedding(model).weight.dtype
    xs = [torch.randn(1, m.in_features, device=device, dtype=dtype) for m in layers]
    n_layers, Hkv, S, Dh = cache_shape(model, prompt_tokens, new_tokens)
    q = torch.randn(1, model.cfg.text_config.num_attention_heads, 1, Dh, device=device, dtype=dtype)
    caches = [torch.randn(2, 1, Hkv, S, Dh, device=device, dtype=dtype) for _ in range(n_layers)]

    def step():
        for x, m in zip(xs, layers):
            m(x)
        for k, v in caches:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    run = step
    if device.type == "cuda":  # in one CUDA graph: the kernels back to back, no launch gaps between them
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS workspaces, kernel choices)
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    return min(timed(run, device)[0] for _ in range(10))


def roofline(prompt_tokens: int, results, a, device) -> dict[str, float]:
    """Each run's batch-1 decode rate against the bytes its step reads: as a share of the GEMV bandwidth
    (returned, by run name), and of the floor (the same reads run bare)."""
    ours = BENCHED["model"]
    models = {"ours": ours, "ours unquantized": BENCHED.get("unquantized")}
    # transformers reads what ours reads; with --quantize, what ours int8 reads (torchao int8) or, without
    # torchao, what ours unquantized reads
    models["transformers"] = (BENCHED.get("unquantized") or ours) if "peer" not in BENCHED else None
    if "peer" in BENCHED and a.quantize == "int8":
        models["transformers"] = ours
    n = {
        k: decode_bytes(m, prompt_tokens, a.new_tokens)
        for k, m in models.items()
        if m is not None and k in results
    }
    bw = gemv_bandwidth(max(n.values()), device, embedding(ours).weight.dtype)
    shares = {k: results[k]["decode_tok_s_b1"] * n[k] / bw for k in n}
    print(
        f"decode roofline, batch 1: GEMV bandwidth {bw / 1e9:.1f} GB/s; bytes read per token -> share of it: "
        + ", ".join(f"{k} {n[k] / 1e6:.1f} MB -> {shares[k]:.0%}" for k in n)
    )
    for k in ("ours", "ours unquantized"):
        if models[k] is not None:
            floor = decode_floor(models[k], prompt_tokens, a.new_tokens, device)
            rate = results[k]["decode_tok_s_b1"]
            print(
                f"{k}: the step's weight products and cache attention run bare: {floor * 1e3:.2f} ms "
                f"({n[k] / floor / 1e9:.1f} GB/s) -> {rate * floor:.0%} of that floor"
                + (
                    f"; transformers {results['transformers']['decode_tok_s_b1'] * floor:.0%}"
                    if k == "ours" and models["transformers"] is ours and "transformers" in results
                    else ""
                )
            )
    return shares


# ----------------------------------------------------------------------------------------------------------
# Parameter memory of every published checkpoint (python bench.py --memory): no weights, only the configs


# PaliGemma 2 10B and 28B: the Gemma 2 9B and 27B decoders (models-spec.md, section 2); the rest of their
# config.json is the 3B one's.
TEXT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
TEXT_FIELDS += ("intermediate_size", "query_pre_attn_scalar")
PALIGEMMA2_TEXT = {"10b": (3584, 42, 16, 8, 256, 14336, 256), "28b": (4608, 46, 32, 16, 128, 36864, 144)}


def published_config(file: str, preset: str) -> dict:
    """The config.json of a preset, from tests/data. Checkpoints that differ from a stored one only in
    training (PaliGemma pt/mix, LLaVA-OneVision si/ov) share its file; PaliGemma at 896 px is the 448 one
    with 4096 positions; PaliGemma 2 10B/28B is the 3B one with PALIGEMMA2_TEXT."""
    data = ROOT / "tests" / "data" / file
    if file == "paligemma":
        gen, size, _, px = re.fullmatch(r"(paligemma2?)-(\d+b)-(pt|mix)-(\d+)", preset).groups()
        d = json.loads((data / f"{gen}-3b-mix-{min(int(px), 448)}.config.json").read_text())
        d["vision_config"]["image_size"] = int(px)
        if size in PALIGEMMA2_TEXT:
            d["text_config"].update(zip(TEXT_FIELDS, PALIGEMMA2_TEXT[size]))
            d["projection_dim"] = d["vision_config"]["projection_dim"] = d["text_config"]["hidden_size"]
        return d
    name = {
        "qwen2_vl": lambda p: f"Qwen2-VL-{p.upper()}-Instruct",
        "llava_onevision": lambda p: f"llava-onevision-qwen2-{p.split('-')[0]}-ov-hf",
        "video_llava": lambda p: "Video-LLaVA-7B-hf",
        "perception_lm": lambda p: f"Perception-LM-{p.upper()}",
    }[file](preset)
    return json.loads((data / f"{name}.config.json").read_text())


def parameter_bytes(model) -> int:
    """Bytes of every parameter and buffer, floating tensors counted in bfloat16 (a meta model's are
    float32)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in tensors)


MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VL",
    "paligemma": "PaliGemma",
    "llava_onevision": "LlavaOnevision",
    "video_llava": "VideoLlava",
    "perception_lm": "PerceptionLM",
}


def memory_table() -> str:
    """A Markdown table: parameters and their memory in bf16, int8 and int4 for every preset of every file,
    built on the meta device from the published configs (presets with the same figures share a row)."""
    import importlib

    rows: dict[tuple, list[str]] = {}
    for file, class_name in MODEL_CLASSES.items():
        m = importlib.import_module(file)
        done: dict[str, tuple] = {}  # config.json -> its row's key: presets that share a file share a row
        for preset, repo in m.PRESETS.items():
            d = json.dumps(published_config(file, preset))
            if d in done:
                rows[done[d]].append(repo)
                continue
            cfg = m.config_from_hf(json.loads(d))
            sizes = []
            for mode in (None, *quant.MODES):
                with torch.device("meta"):
                    model = getattr(m, class_name)(cfg)
                if mode is None:
                    n = sum(p.numel() for p in model.parameters())
                else:
                    quant.quantize(model, mode, device="cpu", dtype=torch.bfloat16)
                sizes.append(parameter_bytes(model))
            done[d] = (file, n, *sizes)
            rows[done[d]] = [repo]
    lines = ["| checkpoint | parameters | bf16 | int8 | int4 | int4 / bf16 |", "|---|---|---|---|---|---|"]
    for (_, n, *sizes), repos in rows.items():
        others = ", ".join(r.split("/")[-1] for r in repos[1:])
        name = f"{repos[0]} (and {others})" if others else repos[0]
        gb = " | ".join(f"{b / 1e9:.2f} GB" for b in sizes)
        lines.append(f"| {name} | {n / 1e9:.2f} B | {gb} | {sizes[2] / sizes[0]:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
