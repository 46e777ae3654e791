"""Tiny random-weight checkpoints in the real file layouts, for parity tests against transformers.

Reusable by every model: `make_tokenizer` (a byte-level BPE tokenizer.json with the model's special tokens),
`randomize_` (every parameter random: several inits are zero and would hide bugs), `write_safetensors` (one
file or shards with an index, in any key layout) and `synthetic_image` / `synthetic_video` (smooth,
non-constant content). One builder per model family writes the directories its tests use.

NOTE: the tokenizers library renumbers explicit ids of added tokens, so the special tokens keep their real
names but get small ids (right after the base vocabulary); the tiny configs carry those ids. The real-config
shape tests cover the published sizes.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def torchvision_for_reference() -> str:
    """transformers 5.23 runs its default image/video processors through torchvision. The PyPI wheels are CUDA
    builds that cannot load next to a CPU-only torch, so use the stand-in in torchvision_stub/ (see its
    docstring) unless the real package imports. Call it before transformers is imported anywhere."""
    try:
        importlib.import_module("torchvision.transforms.v2.functional")
        return "real"
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.path.insert(0, str(Path(__file__).resolve().parent / "torchvision_stub"))
        return "stand-in"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference, computed in float64."""
    return (a.double() - b.double()).abs().max().item()


def user(*items: str, text: str = "What is this?") -> list[dict]:
    """One user turn: the media items ("image", "video") in order, then the text."""
    return [{"role": "user", "content": [{"type": t} for t in items] + [{"type": "text", "text": text}]}]


def cache_vs_full_forward(
    model, inputs: dict, monkeypatch, new_token_type: dict | None = None
) -> list[float]:
    """Generates 10 tokens with the cache, recording every step's logits, then runs the full no-cache forward
    over prompt + generated tokens; returns, per step, the largest difference between the two. The generated
    tokens extend every (B, T) input: input_ids with themselves, attention_mask with 1, the others with 0
    unless `new_token_type` says otherwise (PaliGemma: token_type_ids 1, the causal answer)."""
    import common

    seen = []
    real_sample = common.sample
    monkeypatch.setattr(
        common, "sample", lambda logits, *a: seen.append(logits.clone()) or real_sample(logits, *a)
    )
    new = model.generate(**inputs, max_new_tokens=10, eos_token_ids=[])
    T = inputs["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**extended(inputs, new, new_token_type))
    return [max_diff(step, logits[:, T - 1 + i]) for i, step in enumerate(seen)]


def extended(inputs: dict, new: torch.Tensor, new_token_type: dict | None = None) -> dict:
    """The processor's (B, T) inputs with generated tokens new (B, N) appended: input_ids with themselves,
    attention_mask with 1, the others with 0 unless `new_token_type` says otherwise (PaliGemma:
    token_type_ids 1, the causal answer)."""
    B, T = inputs["input_ids"].shape
    fill = {"attention_mask": 1, **(new_token_type or {})}
    full = {}
    for k, v in inputs.items():
        if k == "input_ids":
            v = torch.cat([v, new], 1)
        elif v.dim() == 2 and tuple(v.shape) == (B, T):
            v = torch.cat([v, torch.full_like(new, fill.get(k, 0))], 1)
        full[k] = v
    return full


def greedy_shortfall(f32_model, inputs: dict, new: torch.Tensor, new_token_type: dict | None = None) -> float:
    """How far generated tokens new (B, N) fall short of greedy under a float32 model, teacher-forced on
    them: the largest (best logit - chosen token's logit) over all rows and steps, as a share of the largest
    |logit|.
    0 for the float32 greedy answer. A bfloat16 run may take the other token of a near-tie (random tiny
    models have many), which costs little here, where comparing its tokens with float32's would fail."""
    T, N = inputs["input_ids"].shape[1], new.shape[1]
    with torch.no_grad():
        logits = f32_model(**extended(inputs, new, new_token_type))[:, T - 1 : T - 1 + N].float()  # (B, N, V)
    short = logits.max(-1).values - logits.gather(-1, new[..., None]).squeeze(-1)  # (B, N)
    return float(short.max() / logits.abs().max())


def reference_inputs(hproc, **kw) -> dict:
    """transformers' processor on the same prompts and media, left-padded, as a plain dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(hproc(**kw, padding=True, padding_side="left", return_tensors="pt"))


def assert_batch_equals_one_by_one(model, proc, rows: list[tuple], n: int = 12) -> None:
    """rows: (prompt, images, videos) each. Generating all rows as one left-padded batch gives every row the
    tokens it gets alone."""
    images = [im for _, row_images, _ in rows for im in row_images]
    videos = [v for _, _, row_videos in rows for v in row_videos]
    batch = proc(text=[r[0] for r in rows], images=images or None, videos=videos or None)
    out = model.generate(**batch, max_new_tokens=n, eos_token_ids=[])
    for b, (text, row_images, row_videos) in enumerate(rows):
        one = proc(text=text, images=row_images or None, videos=row_videos or None)
        assert out[b].tolist() == model.generate(**one, max_new_tokens=n, eos_token_ids=[])[0].tolist(), b


def assert_sampling_is_seeded(model, inputs: dict) -> None:
    """The same seed samples the same tokens; another seed other tokens."""
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, eos_token_ids=[])
    a = model.generate(**inputs, seed=1, **kw)
    assert torch.equal(a, model.generate(**inputs, seed=1, **kw))
    assert not torch.equal(a, model.generate(**inputs, seed=2, **kw))


def real_config_pair(config: Path, ours, ours_from_hf, theirs, theirs_config):
    """Our model and transformers' built on the meta device from one published config.json."""
    d = json.loads(config.read_text())
    with torch.device("meta"):
        return ours(ours_from_hf(d)), theirs(theirs_config(**d))


def assert_same_parameters(mine, theirs, rename, unused: str | None = None) -> None:
    """After `rename`, the same keys with the same shapes, and as many parameters (less transformers' ones
    whose name contains `unused`, which the model never runs)."""
    want = {rename(k): v.shape for k, v in theirs.state_dict().items() if rename(k)}
    assert {k: v.shape for k, v in mine.state_dict().items()} == want
    extra = sum(p.numel() for k, p in theirs.named_parameters() if unused and unused in k)
    assert sum(p.numel() for p in mine.parameters()) == sum(p.numel() for p in theirs.parameters()) - extra


def run_cli(script: str, *args: str) -> tuple[str, dict]:
    """Runs a model file's command line in a subprocess on the CPU -> (stdout, the JSON summary)."""
    cmd = [sys.executable, str(ROOT / script), *args, "--device", "cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout, json.loads(next(x for x in reversed(run.stderr.splitlines()) if x.startswith("{")))


def read_chat_template(ckpt: Path) -> str | None:
    """A checkpoint's Jinja chat template, from any of the three places repos keep it (the model files write
    their prompt formats in Python; the tests compare them with this template)."""
    if (ckpt / "chat_template.jinja").is_file():
        return (ckpt / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (ckpt / name).is_file() and "chat_template" in (d := json.loads((ckpt / name).read_text())):
            return d["chat_template"]
    return None


CORPUS = [
    "Describe this image. What is in the picture? A cat sits on a red mat near the window.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>",
    "你好，世界。这是一张图片。猫坐在垫子上。 日本語のテキストも少し。 émigré café naïve ✓ 🙂",
    "user assistant system answer caption detect video frame frames left right top bottom",
]


def make_tokenizer(path: Path, specials: list[str], vocab_size: int = 320) -> dict[str, int]:
    """Writes path/tokenizer.json; returns {special token: id}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    return {s: tok.token_to_id(s) for s in specials}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, head_std: float = 0.2) -> None:
    """Every parameter random. Norm weights near 1 (`one_centred` names) or near 0 for (1 + w) norms."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.ndim == 1 and re.search(r"norm|ln_|layernorm", name):
            p.copy_(1.0 + 0.1 * r)
        elif "lm_head" in name:
            p.copy_(head_std * r)
        else:
            p.copy_(0.05 * r)


@torch.no_grad()
def strengthen_decoder_(model: torch.nn.Module, gain: float = 4.0) -> None:
    """Scale the decoder layers' matrices so that a tiny random model's greedy tokens vary instead of copying
    the last input token over and over (which would make generation tests weak)."""
    for name, p in model.named_parameters():
        if ".layers." in name and "language_model" in name and p.ndim == 2:
            p.mul_(gain)


def decoder_config(
    model_type: str, vocab: int, D: int, layers: int, H: int, Hkv: int, ffn: int, **extra
) -> dict:
    """The text_config of a tiny decoder."""
    shape = dict(vocab_size=vocab, hidden_size=D, intermediate_size=ffn, num_hidden_layers=layers)
    return dict(model_type=model_type, num_attention_heads=H, num_key_value_heads=Hkv, **shape, **extra)


def write_safetensors(state: dict[str, torch.Tensor], out: Path, shards: int = 1) -> None:
    state = {k: v.contiguous() for k, v in state.items()}
    if shards == 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_json(path: Path, content) -> None:
    path.write_text(json.dumps(content, indent=2))


def vocab_size(ckpt: Path) -> int:
    """How many tokens the tokenizer.json in `ckpt` has."""
    return len(json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"])


def new_checkpoint(root: Path, name: str, layouts: tuple[str, ...]) -> dict[str, Path]:
    """One directory per layout of the same weights; "hf5" (what transformers saves) is made first."""
    dirs = {k: root / f"{name}_{k}" for k in layouts}
    dirs["hf5"].mkdir(parents=True, exist_ok=True)
    return dirs


def save_reference(model, hf5: Path, generation: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """The randomized transformers model saved by `save_pretrained`, plus generation_config.json; returns what
    was written: (config.json as a dict, the tensors by key)."""
    from safetensors.torch import load_file

    model.save_pretrained(hf5)
    write_json(hf5 / "generation_config.json", generation)
    return json.loads((hf5 / "config.json").read_text()), load_file(str(hf5 / "model.safetensors"))


def other_layout(hf5: Path, out: Path, files: dict[str, dict], copy: tuple[str, ...] = ()) -> None:
    """Another directory of the same checkpoint: hf5's tokenizer and generation files (and `copy`) copied,
    then `files` (file name -> JSON content) written."""
    out.mkdir(exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", *copy):
        shutil.copy(hf5 / f, out / f)
    for name, content in files.items():
        write_json(out / name, content)


def synthetic_image(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Smooth gradients plus a little noise: resizing such content exercises the interpolation filters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for _ in range(channels):
        fx, fy, ph = rng.uniform(0.01, 0.2), rng.uniform(0.01, 0.2), rng.uniform(0, 6.28)
        chans.append(127 + 100 * np.sin(fx * x + fy * y + ph) + rng.normal(0, 12, (h, w)))
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def synthetic_video(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    base = synthetic_image(h, w + 4 * n, seed)
    return np.stack([base[:, 4 * i : 4 * i + w] for i in range(n)])  # a slow pan: (F, H, W, 3)


# ----------------------------------------------------------------------------------------------------------
# Qwen2-VL

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_TEMPLATE = (Path(__file__).parent / "data" / "qwen2_vl" / "chat_template.jinja").read_text()
QWEN_IMAGE_PIXELS = (56 * 56, 28 * 28 * 64)  # min, max: at most 64 tokens per image keeps the tests fast
QWEN_VIDEO_PIXELS = (56 * 56, 28 * 28 * 16)


QWEN_SIZES = {  # text (D, layers, heads, kv heads, FFN), vision (depth, width, heads)
    "tiny": ((64, 2, 4, 2, 128), (2, 32, 4)),
    "small": ((640, 10, 10, 2, 2048), (6, 384, 6)),  # about 64M parameters, for bench.py
}


def mrope_section(head_dim: int) -> list[int]:
    """The published [16, 24, 24] split of head_dim / 2 = 64 frequencies, scaled: 1/4 t, 3/8 h, 3/8 w."""
    q = head_dim // 16
    return [2 * q, 3 * q, 3 * q]


def qwen2_vl_hf_config(ids: dict[str, int], vocab: int, size: str = "tiny"):
    from transformers import Qwen2VLConfig

    (D, n_layers, H, Hkv, ffn), (depth, Dv, Hv) = QWEN_SIZES[size]
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=D,
            intermediate_size=ffn,
            num_hidden_layers=n_layers,
            num_attention_heads=H,
            num_key_value_heads=Hkv,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": mrope_section(D // H),
            },
        ),
        vision_config=dict(
            depth=depth,
            embed_dim=Dv,
            num_heads=Hv,
            hidden_size=D,
            mlp_ratio=2,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    return cfg


def build_qwen2_vl(root: Path, size: str = "tiny") -> dict[str, Path]:
    """Three directories holding the same weights:
    - "hf5": what transformers 5.23 `save_pretrained` writes (nested config, processor_config.json, .jinja);
    - "hub": the published layout (flat config.json with rope_scaling, preprocessor_config.json without a
    video
      file, chat_template.json, two safetensors shards with an index, no lm_head as it is tied);
    - "v4_52": keys as transformers 4.52-4.57 fine-tunes save them (model.visual.*, model.language_model.*,
      lm_head.weight written out)."""
    from transformers import (
        AutoTokenizer,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    dirs = new_checkpoint(root, "qwen2_vl", ("hf5", "hub", "v4_52"))
    hf5 = dirs["hf5"]
    ids = make_tokenizer(hf5, QWEN_SPECIALS)
    tok_cfg = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    write_json(hf5 / "tokenizer_config.json", dict(tok_cfg, unk_token=None, bos_token=None))
    tokenizer = AutoTokenizer.from_pretrained(hf5)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            min_pixels=QWEN_IMAGE_PIXELS[0], max_pixels=QWEN_IMAGE_PIXELS[1]
        ),
        video_processor=Qwen2VLVideoProcessor(
            min_pixels=QWEN_VIDEO_PIXELS[0], max_pixels=QWEN_VIDEO_PIXELS[1]
        ),
        tokenizer=tokenizer,
        chat_template=QWEN_TEMPLATE,
    )
    processor.save_pretrained(hf5)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(qwen2_vl_hf_config(ids, vocab_size(hf5), size)).eval()
    randomize_(model)
    gen = {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "repetition_penalty": 1.0,
        "temperature": 0.01,
        "top_p": 0.001,
        "top_k": 1,
    }  # as the published file (near-greedy)
    saved, state = save_reference(model, hf5, gen)
    # The published flat config.json, written the way the Qwen repos ship it.
    t = saved["text_config"]
    flat = {
        k: t[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "max_position_embeddings",
            "hidden_act",
            "bos_token_id",
            "eos_token_id",
        )
    }
    flat.update(
        architectures=["Qwen2VLForConditionalGeneration"],
        model_type="qwen2_vl",
        rope_theta=1e6,
        rope_scaling={"type": "mrope", "mrope_section": t["rope_parameters"]["mrope_section"]},
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=2,
        torch_dtype="float32",
        image_token_id=saved["image_token_id"],
        video_token_id=saved["video_token_id"],
        vision_start_token_id=saved["vision_start_token_id"],
        vision_end_token_id=saved["vision_end_token_id"],
        vision_token_id=ids["<|vision_pad|>"],
    )
    v = saved["vision_config"]
    flat["vision_config"] = {
        "depth": v["depth"],
        "embed_dim": v["embed_dim"],
        "mlp_ratio": v["mlp_ratio"],
        "num_heads": v["num_heads"],
        "in_chans": 3,
        "hidden_size": v["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    }
    preprocessor = {
        "min_pixels": QWEN_IMAGE_PIXELS[0],
        "max_pixels": QWEN_IMAGE_PIXELS[1],
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }
    common_files = {
        "preprocessor_config.json": preprocessor,
        "chat_template.json": {"chat_template": QWEN_TEMPLATE},
    }
    other_layout(hf5, dirs["hub"], dict(common_files, **{"config.json": flat}))
    write_safetensors(state, dirs["hub"], shards=2)
    other_layout(hf5, dirs["v4_52"], dict(common_files, **{"config.json": saved}))
    v452 = {
        re.sub(r"^visual\.", "model.visual.", re.sub(r"^model\.", "model.language_model.", k)): t
        for k, t in state.items()
    }
    v452["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    write_safetensors(v452, dirs["v4_52"])
    return dirs


# ----------------------------------------------------------------------------------------------------------
# PaliGemma 1 and 2

PALIGEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<image>"]  # pad 0, eos 1, bos 2 as real
LOC_SEG = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
EMBED_STD = 0.02
LAYER_GAIN = 4.0
PALIGEMMA_IMAGE = 56  # px: 4 x 4 = 16 image tokens per image


def make_gemma_tokenizer(path: Path, vocab_size: int = 400) -> dict[str, int]:
    """A tokenizer.json shaped like Gemma's: spaces become "▁", BPE with byte fallback, no pre-tokenizer split
    beyond that; the <locDDDD>/<segDDD> tokens added as ordinary (not special) tokens, as in the real one."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=PALIGEMMA_SPECIALS, initial_alphabet=["\n"], show_progress=False
    )
    tok.train_from_iterator(["\n".join(CORPUS)] * 20, trainer)  # "\n" ends every prompt: it must be a token
    tok.add_tokens(LOC_SEG)
    tok.save(str(path / "tokenizer.json"))
    return {s: tok.token_to_id(s) for s in PALIGEMMA_SPECIALS}


PALIGEMMA_SIZES = {  # text (D, layers, heads, head dim, FFN), vision (layers, width, heads, FFN), image px
    "tiny": ((64, 2, 4, 16, 128), (2, 32, 4, 64), PALIGEMMA_IMAGE),
    "small": ((640, 10, 10, 64, 2048), (6, 384, 6, 1536), 224),  # about 60M parameters, for bench.py
}


def paligemma_hf_config(ids: dict[str, int], vocab: int, version: int, size: str = "tiny"):
    from transformers import PaliGemmaConfig

    (D, n_layers, H, Dh, ffn), (v_layers, Dv, Hv, v_ffn), px = PALIGEMMA_SIZES[size]
    text = dict(
        model_type="gemma",
        vocab_size=vocab,
        hidden_size=D,
        intermediate_size=ffn,
        num_hidden_layers=n_layers,
        num_attention_heads=H,
        num_key_value_heads=1,
        head_dim=Dh,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    if version == 2:  # Gemma2 with every feature switched on hard enough to matter
        text.update(
            model_type="gemma2",
            num_hidden_layers=3 if size == "tiny" else n_layers,
            num_key_value_heads=2,
            query_pre_attn_scalar=24,
            sliding_window=8,  # shorter than the prompts, so the window is exercised
            attn_logit_softcapping=0.5,
            final_logit_softcapping=2.0,
            hidden_activation="gelu_pytorch_tanh",
        )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=Dv,
        intermediate_size=v_ffn,
        num_hidden_layers=v_layers,
        num_attention_heads=Hv,
        patch_size=14,
        image_size=px,
        vision_use_head=False,
    )
    cfg = PaliGemmaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=ids["<image>"],
        projection_dim=D,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    cfg._attn_implementation = "eager"
    return cfg


def build_paligemma(root: Path, version: int = 1, size: str = "tiny") -> dict[str, Path]:
    """Two directories holding the same weights of a tiny PaliGemma `version` (1: Gemma, 2: Gemma2):
    - "hf5": what transformers 5.23 `save_pretrained` writes (processor_config.json, its mixed key layout);
    - "hub": the published layout (vision_tower.vision_model.*, language_model.model.*, two shards, the
      published config.json fields, preprocessor_config.json)."""
    from transformers import (
        AutoTokenizer,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    dirs = new_checkpoint(root, f"paligemma{version}_{size}", ("hf5", "hub"))
    px = PALIGEMMA_SIZES[size][2]
    hf5 = dirs["hf5"]
    ids = make_gemma_tokenizer(hf5)
    tok_cfg = dict(tokenizer_class="GemmaTokenizer", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok_cfg.update(unk_token="<unk>", add_bos_token=False, add_eos_token=False, padding_side="left")
    write_json(hf5 / "tokenizer_config.json", tok_cfg)
    vocab = vocab_size(hf5) + len(LOC_SEG)
    image_processor = SiglipImageProcessor(size={"height": px, "width": px})
    image_processor.image_seq_length = (px // 14) ** 2
    processor = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(hf5)
    )
    processor.save_pretrained(hf5)
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(paligemma_hf_config(ids, vocab, version, size)).eval()
    randomize_(model)
    with torch.no_grad():  # Gemma norms are (1 + w): keep w near 0
        for name, p in model.named_parameters():
            if "language_model" in name and "norm" in name:
                p.mul_(0.0).add_(0.1 * torch.randn_like(p))
            elif name.endswith("embed_tokens.weight"):  # tied to the output head
                p.mul_(EMBED_STD / 0.05)
            elif "language_model.model.layers" in name or "language_model.layers" in name:
                p.mul_(LAYER_GAIN)  # layers strong enough that the next token is not a copy of the last
    saved, state = save_reference(model, hf5, {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0})
    preprocessor = {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_seq_length": (px // 14) ** 2,
        "processor_class": "PaliGemmaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": px, "width": px},
    }
    t, v = saved["text_config"], saved["vision_config"]
    text_keys = ["hidden_size", "intermediate_size", "model_type", "num_attention_heads", "num_hidden_layers"]
    text_keys += ["num_key_value_heads", "vocab_size", "head_dim"]
    if version == 2:
        text_keys += [
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "query_pre_attn_scalar",
            "sliding_window",
        ]
    published = {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": 2,
        "eos_token_id": 1,
        "hidden_size": 2048,  # a stale root value, as in the real files
        "image_token_index": saved["image_token_id"]
        if "image_token_id" in saved
        else saved["image_token_index"],
        "model_type": "paligemma",
        "pad_token_id": 0,
        "projection_dim": saved["projection_dim"],
        "text_config": dict(
            {k: t[k] for k in text_keys},
            num_image_tokens=(px // 14) ** 2,
            hidden_activation="gelu_pytorch_tanh",
        ),
        "vision_config": {
            k: v[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "model_type",
                "num_attention_heads",
                "num_hidden_layers",
            )
        }
        | {
            "image_size": px,
            "patch_size": 14,
            "projection_dim": saved["projection_dim"],
            "vision_use_head": False,
        },
        "vocab_size": 257216,  # stale too: the text_config value is the real one
    }
    hub = dirs["hub"]
    other_layout(hf5, hub, {"preprocessor_config.json": preprocessor, "config.json": published})

    def published_key(k: str) -> str | None:
        k = re.sub(r"^model\.", "", k)
        k = re.sub(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", k)
        k = re.sub(r"^language_model\.(?!model\.)", "language_model.model.", k)
        return None if k == "lm_head.weight" else k

    write_safetensors({published_key(k): t for k, t in state.items() if published_key(k)}, hub, shards=2)
    return dirs


# ----------------------------------------------------------------------------------------------------------
# LLaVA-OneVision

LLAVA_OV_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
LLAVA_OV_TEMPLATE = (Path(__file__).parent / "data" / "llava_onevision" / "chat_template.jinja").read_text()
LLAVA_OV_TILE = 56  # px: 4 x 4 features per tile, 2 x 2 per video frame after pooling
LLAVA_OV_SIDES = (56, 112, 168, 224)  # 16 pinpoints, up to 4 x 4 tiles: enough to trigger the 9-tile shrink
LLAVA_OV_SIZES = {  # text (D, layers, heads, kv heads, FFN), vision (layers, width, heads, FFN), tile, sides
    "tiny": ((64, 2, 4, 2, 128), (2, 32, 4, 64), LLAVA_OV_TILE, LLAVA_OV_SIDES),
    "small": ((640, 10, 10, 2, 2048), (6, 384, 6, 1536), 384, (384, 768, 1152)),  # about 60M parameters
}


def llava_onevision_hf_config(ids: dict[str, int], vocab: int, size: str = "tiny"):
    from transformers import LlavaOnevisionConfig

    (D, n_layers, H, Hkv, ffn), (v_layers, Dv, Hv, v_ffn), tile, sides = LLAVA_OV_SIZES[size]
    cfg = LlavaOnevisionConfig(
        text_config=decoder_config(
            "qwen2",
            vocab,
            D,
            n_layers,
            H,
            Hkv,
            ffn,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=Dv,
            intermediate_size=v_ffn,
            num_hidden_layers=v_layers,
            num_attention_heads=Hv,
            patch_size=14,
            image_size=tile,
            vision_use_head=False,
        ),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=[[h, w] for h in sides for w in sides],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    return cfg


def build_llava_onevision(root: Path, size: str = "tiny") -> dict[str, Path]:
    """Two directories holding the same weights:
    - "hf5": what transformers 5.23 `save_pretrained` writes (nested processor_config.json, .jinja template);
    - "hub": the published llava-hf layout (image_newline, vision_tower.vision_model.*,
      language_model.model.*, two shards, preprocessor_config.json + processor_config.json,
      chat_template.json)."""
    from transformers import (
        AutoTokenizer,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    dirs = new_checkpoint(root, f"llava_onevision_{size}", ("hf5", "hub"))
    hf5 = dirs["hf5"]
    ids = make_tokenizer(hf5, LLAVA_OV_SPECIALS)
    tok_cfg = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    write_json(hf5 / "tokenizer_config.json", dict(tok_cfg, unk_token=None, bos_token=None))
    (_, _, tile, sides), half = LLAVA_OV_SIZES[size], [0.5, 0.5, 0.5]
    pinpoints = [[h, w] for h in sides for w in sides]
    image_kw = dict(size={"height": tile, "width": tile}, image_mean=half, image_std=half)
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(image_grid_pinpoints=pinpoints, **image_kw),
        video_processor=LlavaOnevisionVideoProcessor(**image_kw),
        tokenizer=AutoTokenizer.from_pretrained(hf5),
        num_image_tokens=(tile // 14) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_OV_TEMPLATE,
    )
    processor.save_pretrained(hf5)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(
        llava_onevision_hf_config(ids, vocab_size(hf5), size)
    ).eval()
    randomize_(model)
    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 1.0)
    strengthen_decoder_(model, LAYER_GAIN)
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
    saved, state = save_reference(model, hf5, gen)
    preprocessor = dict(image_kw, do_pad=True, image_grid_pinpoints=pinpoints, resample=3)
    preprocessor.update(
        image_processor_type="LlavaOnevisionImageProcessor", processor_class="LlavaOnevisionProcessor"
    )
    top = {"num_image_tokens": (tile // 14) ** 2, "processor_class": "LlavaOnevisionProcessor"}
    published = {k: v for k, v in saved.items() if k not in ("dtype", "transformers_version")}
    published["text_config"] = {
        k: v for k, v in saved["text_config"].items() if k not in ("rope_parameters", "layer_types", "dtype")
    }
    published["text_config"]["rope_theta"] = 1e6  # the flat rope field of the 2024 files
    hub = dirs["hub"]
    files = {"preprocessor_config.json": preprocessor, "config.json": published}
    files["processor_config.json"] = dict(top, vision_feature_select_strategy="full")
    files["chat_template.json"] = {"chat_template": LLAVA_OV_TEMPLATE}
    other_layout(hf5, hub, files)

    def published_key(k: str) -> str:
        k = re.sub(r"^model\.", "", k)
        k = re.sub(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", k)
        return re.sub(r"^language_model\.(?!model\.|lm_head)", "language_model.model.", k)

    write_safetensors({published_key(k): t for k, t in state.items()}, hub, shards=2)
    return dirs


# ----------------------------------------------------------------------------------------------------------
# Video-LLaVA

VIDEO_LLAVA_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama; <image> <video> <pad> follow
VIDEO_LLAVA_TEMPLATE = (Path(__file__).parent / "data" / "video_llava" / "chat_template.jinja").read_text()
VIDEO_LLAVA_IMAGE = 56  # px: 4 x 4 = 16 patches (+ CLS for video frames)
VIDEO_LLAVA_SIZES = {  # text (D, layers, heads, FFN), vision (layers, width, heads, FFN), image px
    "tiny": ((64, 2, 4, 128), (3, 32, 4, 64), VIDEO_LLAVA_IMAGE),
    "small": ((640, 10, 10, 2048), (6, 384, 6, 1536), 224),  # about 60M parameters + 2 towers
}


def make_llama_tokenizer(path: Path, vocab_size: int = 400) -> dict[str, int]:
    """A tokenizer.json shaped like Llama 2's: Metaspace ("▁", prepended to the first word only), BPE with
    byte fallback, a decoder that strips the prepended space, and a post-processor that puts <s> first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    ascii_chars = ["\n"] + [chr(i) for i in range(32, 127)]  # every ASCII character is a token ("USER:")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=VIDEO_LLAVA_SPECIALS,
        initial_alphabet=ascii_chars,
        show_progress=False,
    )
    tok.train_from_iterator(["\n".join(CORPUS)] * 20, trainer)
    tok.add_special_tokens(["<image>", "<video>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    return {s: tok.token_to_id(s) for s in VIDEO_LLAVA_SPECIALS + ["<image>", "<video>", "<pad>"]}


def video_llava_hf_config(ids: dict[str, int], vocab: int, size: str = "tiny"):
    from transformers import VideoLlavaConfig

    (D, n_layers, H, ffn), (v_layers, Dv, Hv, v_ffn), px = VIDEO_LLAVA_SIZES[size]
    cfg = VideoLlavaConfig(
        text_config=decoder_config(
            "llama",
            vocab,
            D,
            n_layers,
            H,
            H,
            ffn,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            pad_token_id=ids["<pad>"],
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=Dv,
            intermediate_size=v_ffn,
            num_hidden_layers=v_layers,
            num_attention_heads=Hv,
            patch_size=14,
            image_size=px,
            projection_dim=16,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        pad_token_id=ids["<pad>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(px // 14) ** 2,
        video_seq_length=((px // 14) ** 2 + 1) * 8,
    )
    cfg._attn_implementation = "eager"
    return cfg


def build_video_llava(root: Path, size: str = "tiny") -> dict[str, Path]:
    """Two directories holding the same weights:
    - "hf5": what transformers 5.23 `save_pretrained` writes;
    - "hub": the published layout (image_tower.vision_model.*, video_tower.vision_model.*,
      language_model.model.*, language_model.lm_head.*, two shards, preprocessor_config.json,
      chat_template.json)."""
    from transformers import (
        AutoTokenizer,
        VideoLlavaForConditionalGeneration,
        VideoLlavaImageProcessor,
        VideoLlavaProcessor,
        VideoLlavaVideoProcessor,
    )

    dirs = new_checkpoint(root, f"video_llava_{size}", ("hf5", "hub"))
    hf5 = dirs["hf5"]
    ids = make_llama_tokenizer(hf5)
    tok_cfg = dict(tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok_cfg.update(pad_token="<pad>", add_bos_token=True, add_eos_token=False, legacy=False)
    write_json(hf5 / "tokenizer_config.json", tok_cfg)
    vocab = vocab_size(hf5) + 3
    px = VIDEO_LLAVA_SIZES[size][2]
    kw = dict(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
    processor = VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(**kw),
        video_processor=VideoLlavaVideoProcessor(**kw),
        tokenizer=AutoTokenizer.from_pretrained(hf5),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VIDEO_LLAVA_TEMPLATE,
    )
    processor.save_pretrained(hf5)
    torch.manual_seed(0)
    model = VideoLlavaForConditionalGeneration(video_llava_hf_config(ids, vocab, size)).eval()
    randomize_(model)
    strengthen_decoder_(model, LAYER_GAIN)
    saved, state = save_reference(
        model, hf5, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": ids["<pad>"]}
    )
    clip = dict(
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]
    )
    preprocessor = dict(kw, **clip, resample=3, image_processor_type="VideoLlavaImageProcessor")
    published = {k: v for k, v in saved.items() if k not in ("dtype", "transformers_version")}
    published["text_config"] = {
        k: v for k, v in saved["text_config"].items() if k not in ("rope_parameters", "dtype")
    }
    published["text_config"]["rope_theta"] = 10000.0
    hub = dirs["hub"]
    files = {"preprocessor_config.json": preprocessor, "config.json": published}
    other_layout(hf5, hub, dict(files, **{"chat_template.json": {"chat_template": VIDEO_LLAVA_TEMPLATE}}))

    def published_key(k: str) -> str:
        k = re.sub(r"^model\.", "", k)
        k = re.sub(r"^(image|video)_tower\.(?!vision_model\.)", r"\1_tower.vision_model.", k)
        k = re.sub(r"^lm_head\.", "language_model.lm_head.", k)
        return re.sub(r"^language_model\.(?!model\.|lm_head)", "language_model.model.", k)

    write_safetensors({published_key(k): t for k, t in state.items()}, hub, shards=2)
    return dirs


# ----------------------------------------------------------------------------------------------------------
# PerceptionLM

PLM_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|video|>"]
PLM_SPECIALS += ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
PLM_TEMPLATE = (Path(__file__).parent / "data" / "perception_lm" / "chat_template.jinja").read_text()
PLM_TILE = 56  # px: 4 x 4 patches, pooled 2 x 2 -> 4 tokens per tile
PLM_SIZES = {  # text (D, layers, heads, kv heads, FFN), vision (depth, width, heads), tile px, max tiles
    "tiny": ((64, 2, 4, 2, 128), (2, 64, 4), PLM_TILE, 6),
    "small": ((640, 10, 10, 2, 2048), (6, 384, 6), 448, 4),  # about 60M parameters
}


def perception_lm_hf_config(ids: dict[str, int], vocab: int, size: str = "tiny", cls_token: bool = True):
    from transformers import PerceptionLMConfig

    (D, n_layers, H, Hkv, ffn), (depth, Dv, Hv), tile, _ = PLM_SIZES[size]
    G = tile // 14
    arch = "vit_pe_core_large_patch14_336" if cls_token else "vit_pe_core_gigantic_patch14_448"
    model_args = dict(embed_dim=Dv, depth=depth, num_heads=Hv, img_size=[tile, tile], ref_feat_shape=[G, G])
    model_args.update(global_pool="", use_post_transformer_norm=False, init_values=0.1)
    if not cls_token:
        model_args["mlp_ratio"] = 4.0  # the gigantic entry's 8960/1536 would not fit a tiny width
    cfg = PerceptionLMConfig(
        vision_config={
            "model_type": "timm_wrapper",
            "architecture": arch,
            "do_pooling": False,
            "model_args": model_args,
        },
        text_config=dict(
            model_type="llama",
            vocab_size=vocab,
            hidden_size=D,
            intermediate_size=ffn,
            num_hidden_layers=n_layers,
            num_attention_heads=H,
            num_key_value_heads=Hkv,
            rms_norm_eps=1e-5,
            max_position_embeddings=2048,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,  # small, so the scaling bites at tiny positions
            },
            tie_word_embeddings=True,
            bos_token_id=ids["<|begin_of_text|>"],
            eos_token_id=[ids["<|end_of_text|>"], ids["<|eot_id|>"]],
        ),
        vision_use_cls_token=cls_token,
        projector_pooling_ratio=2,
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    return cfg


def build_perception_lm(root: Path, size: str = "tiny", cls_token: bool = True) -> dict[str, Path]:
    """Two directories holding the same weights:
    - "hf5": what transformers 5.23 `save_pretrained` writes (nested processor_config.json, .jinja);
    - "hub": the PLM repos' file set (preprocessor_config.json, video_preprocessor_config.json,
      processor_config.json, chat_template.json, two shards), keys written without `timm_model.` as an
      older conversion would (both spellings load)."""
    from transformers import (
        AutoTokenizer,
        PerceptionLMForConditionalGeneration,
        PerceptionLMImageProcessor,
        PerceptionLMProcessor,
        PerceptionLMVideoProcessor,
    )

    tag = "" if cls_token else "_nocls"
    dirs = new_checkpoint(root, f"perception_lm_{size}{tag}", ("hf5", "hub"))
    hf5 = dirs["hf5"]
    ids = make_tokenizer(hf5, PLM_SPECIALS)
    tok_cfg = dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    tok_cfg.update(
        pad_token="<|end_of_text|>",
        extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
    )
    write_json(hf5 / "tokenizer_config.json", tok_cfg)
    _, _, tile, max_tiles = PLM_SIZES[size]
    processor = PerceptionLMProcessor(
        video_processor=PerceptionLMVideoProcessor(size={"height": tile, "width": tile}),
        image_processor=PerceptionLMImageProcessor(
            tile_size=tile, max_num_tiles=max_tiles, size={"height": tile, "width": tile}
        ),
        tokenizer=AutoTokenizer.from_pretrained(hf5),
        patch_size=14,
        pooling_ratio=2,
        chat_template=PLM_TEMPLATE,
    )
    processor.save_pretrained(hf5)
    torch.manual_seed(0)
    model = PerceptionLMForConditionalGeneration(
        perception_lm_hf_config(ids, vocab_size(hf5), size, cls_token)
    )
    model.eval()
    randomize_(model)
    strengthen_decoder_(model, LAYER_GAIN)
    eos = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    _, state = save_reference(model, hf5, {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": eos})
    p = json.loads((hf5 / "processor_config.json").read_text())
    hub = dirs["hub"]
    files = {
        "preprocessor_config.json": p["image_processor"],
        "video_preprocessor_config.json": p["video_processor"],
    }
    files["processor_config.json"] = {
        k: v for k, v in p.items() if k not in ("image_processor", "video_processor")
    }
    files["chat_template.json"] = {"chat_template": PLM_TEMPLATE}
    other_layout(hf5, hub, files, copy=("config.json",))
    write_safetensors({k.replace(".timm_model.", "."): t for k, t in state.items()}, hub, shards=2)
    return dirs
