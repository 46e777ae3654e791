"""What the five model files share that is not architecture (the command line is in cli.py).

- tokenization and prompts: `Tokenizer` over a checkpoint's `tokenizer.json` (the `tokenizers` library),
  UTF-8-safe streaming, `check_placeholders` / `expand_placeholders`, `pad_batch`
- weights and settings: `checkpoint_dir` (Hub download of only the needed files, or a local directory),
  `read_config` (with `check_model_type`), `read_processor_configs`, `load_weights` (safetensors shards,
  per-model `rename`, strict, meta device + assign), `read_eos_ids`
- weight-only quantization: `quantize` (the decoder's linear layers -> `QuantLinear`, int8 or int4), the
  readable maths (`quantize_int8`/`dequantize_int8`, `quantize_int4`/`dequantize_int4`) and torch's kernels
- generation: `sample` (greedy, temperature, top-k, top-p, repetition penalty), `generate_loop` (per-row EOS,
  finished rows padded, streamer callback; returns a `Generation`) and the checks and sizes around it
  (`left_padded_mask`, `cache_length`, `check_finite`, `check_context`, `compiled_decode_step`)
- media: `load_image` (path, URL, data URI, PIL, numpy; a pixel limit), `load_video` (PyAV, uniform by count
  or fps), `image_to_uint8` / `frames_to_uint8`, `as_list`
- `pick_device`, `pick_dtype`
- `record_shapes`: forward hooks that record each named stage's output shape (notebooks, `--explain`)
Layers never live here: every model file defines its own, so it can be read alone. Nothing here keeps state
between calls: settings arrive as arguments and results leave as return values.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import numbers
import os
import re
import sys
import time
import types
import typing
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# ----------------------------------------------------------------------------------------------------------
# Device and dtype


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`None` picks cuda, then mps, then cpu. An explicit device must exist on this machine."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for but torch sees no CUDA GPU; use the CPU")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ValueError(f"device {device}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError("device mps was asked for but torch sees no Apple GPU; use the CPU")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device {device.type!r} is not supported: use cpu, cuda or mps")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES.update(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)


def pick_dtype(
    dtype: str | torch.dtype | None, device: torch.device, quantize: str | None = None
) -> torch.dtype:
    """`None` picks bfloat16 on CUDA and float32 elsewhere; with quantized weights bfloat16 everywhere (the
    CPU's int8/int4 kernels are fast with bfloat16 activations and slow with float32 ones)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" or quantize else torch.float32
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")
    if dtype == torch.float16:
        print(
            "warning: float16 overflows in these models' activations (NaN logits); prefer bfloat16",
            file=sys.stderr,
        )
    if quantize and dtype == torch.float32 and device.type == "cpu":
        print(
            f"warning: {quantize} weights with float32 activations run slowly on the CPU; prefer bfloat16",
            file=sys.stderr,
        )
    return dtype


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """`tokenizer.json` through the `tokenizers` library. Nothing is added implicitly: the prompt formats in
    the model files write their special tokens (BOS, <|im_start|>, ...) themselves."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the checkpoint directory must contain tokenizer.json")
        try:
            self.tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on a broken file
            raise ValueError(f"{path} is not a readable tokenizer file ({e}): download it again") from e
        self.vocab = self.tok.get_vocab(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        if token not in self.vocab:
            raise ValueError(f"token {token!r} is not in this tokenizer.json: is it the right checkpoint?")
        return self.vocab[token]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    def stream(self, skip_special_tokens: bool = True) -> Callable[[int], str]:
        """Returns `push(token_id) -> text`, which holds back bytes until they form whole UTF-8 characters."""
        from tokenizers.decoders import DecodeStream

        state = DecodeStream(skip_special_tokens=skip_special_tokens)
        return lambda token_id: state.step(self.tok, int(token_id)) or ""


def check_placeholders(
    texts: list[str], media: dict[str, list], hint: str = "use apply_chat_template"
) -> None:
    """One placeholder string in the prompts per item given; `media` maps each placeholder to its items."""
    for placeholder, items in media.items():
        n = sum(t.count(placeholder) for t in texts)
        if n != len(items):
            raise ValueError(
                f"the prompt has {n} {placeholder} placeholder(s) but {len(items)} were given: one "
                f"placeholder per item ({hint})"
            )


def expand_placeholders(texts: list[str], tokens: dict[str, list[int]]) -> list[str]:
    """Each placeholder in `texts` repeated as many times as its item has tokens. `tokens` maps a placeholder
    to the token count of each of its items, in their order across the batch."""
    left = {p: iter(counts) for p, counts in tokens.items()}
    pattern = re.compile("|".join(re.escape(p) for p in tokens))
    return [pattern.sub(lambda m: m.group(0) * next(left[m.group(0)]), t) for t in texts]


def pad_batch(rows: list[list[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> input_ids (B, T) padded with `pad_id` and attention_mask (B, T), 1 on real tokens.
    Generation needs side="left", so that every row's last prompt token is in the last column."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {side!r}")
    if not rows:
        raise ValueError("no prompts: give text= a string or a non-empty list of strings")
    for b, r in enumerate(rows):
        if not r:
            raise ValueError(
                f"prompt {b} is empty: it has no tokens to continue (write it with the chat template)"
            )
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        input_ids[b, cols], attention_mask[b, cols] = torch.tensor(r, dtype=torch.long), 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and weights

# Only these files are downloaded; never the `original/` folders some repos also ship.
CHECKPOINT_FILES = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json"]
CHECKPOINT_FILES += ["preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"]
CHECKPOINT_FILES += ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
CHECKPOINT_FILES += ["chat_template.json", "chat_template.jinja"]

# Which file of this repository runs which `model_type`, for the "wrong file" error.
MODEL_FILES = {
    t: f"{t}.py" for t in ("qwen2_vl", "paligemma", "llava_onevision", "video_llava", "perception_lm")
}


def checkpoint_dir(name_or_path: str | Path) -> Path:
    """A local directory in the Hub layout, or a Hub repo id downloaded (only the needed files) to the
    cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name}: no such checkpoint directory (nor a Hub repo id like 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=CHECKPOINT_FILES, ignore_patterns=["*/*"]))
    except GatedRepoError as e:
        raise ValueError(
            f"{name} is gated: accept its licence on the Hub, then set HF_TOKEN=<your token>"
        ) from e
    except RepositoryNotFoundError as e:
        raise ValueError(f"{name} is not a Hub repository (or it is private: set HF_TOKEN)") from e
    except Exception as e:  # offline, DNS, proxy, timeout: all end the same way for the user
        raise ValueError(
            f"could not download {name} ({type(e).__name__}). Without internet, copy the checkpoint to a "
            f"directory and pass it with --model DIR (load('DIR') in Python)."
        ) from e


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint file; anything else (a cut download, an HTML error page saved under
    the name, a list) is one ValueError that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): download it again") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a JSON {type(d).__name__}, not an object: download it again")
    return d


def read_json_if_present(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def read_processor_configs(ckpt: Path) -> tuple[dict, dict, dict | None]:
    """(processor_config.json, image settings, video settings or None). The published repos ship
    preprocessor_config.json (and video_preprocessor_config.json); transformers 5 nests both in
    processor_config.json. The separate files win where both exist."""
    p = read_json_if_present(ckpt / "processor_config.json") or {}
    image = read_json_if_present(ckpt / "preprocessor_config.json") or p.get("image_processor", {})
    video = read_json_if_present(ckpt / "video_preprocessor_config.json") or p.get("video_processor")
    return p, image, video


def check_model_type(config: dict, expected: str, this_file: str) -> None:
    got = config.get("model_type")
    if got == expected:
        return
    hint = f"; use {MODEL_FILES[got]} for it" if got in MODEL_FILES else ""
    raise ValueError(f"this checkpoint is model_type={got!r}, but {this_file} runs {expected!r}{hint}")


def read_config(ckpt: Path, expected: str, this_file: str) -> dict:
    """The checkpoint's config.json, which must be of model_type `expected`."""
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt} has no config.json: is it a checkpoint directory?")
    config = read_json(ckpt / "config.json")
    check_model_type(config, expected, this_file)
    return config


def checked_config(config_from_hf: Callable[[dict], object], raw: dict, path: Path):
    """A model file's `config_from_hf(raw)`, checked where config.json enters: a missing field without a
    default, or one whose type breaks the translation, is one ValueError naming the file, as are widths that
    do not divide into their heads; then every field of the typed config against its annotation."""
    for where, d in [("", raw)] + [(f"{k}.", v) for k, v in raw.items() if isinstance(v, dict)]:
        # NOTE: Qwen2-VL's vision_config has both widths: embed_dim is its attention's, hidden_size the
        # merger's output (the decoder's width), which need not divide by the vision heads.
        w = "embed_dim" if "embed_dim" in d else "hidden_size"
        h = "num_heads" if "num_heads" in d else "num_attention_heads"
        width, heads, kv = d.get(w), d.get(h), d.get("num_key_value_heads")
        if not all(isinstance(n, int) and n >= 1 for n in (width, heads)):
            continue  # missing or mistyped: the translation or check_config names it
        if "head_dim" not in d and width % heads:
            raise ValueError(f"{path}: {where}{w} = {width} does not divide by {h} = {heads}")
        if isinstance(kv, int) and kv >= 1 and heads % kv:
            raise ValueError(f"{path}: {where}num_attention_heads {heads} is not a multiple of {kv} kv heads")
    try:
        cfg = config_from_hf(raw)
    except KeyError as e:
        raise ValueError(f"{path}: the field {e.args[0]!r} is missing (it has no default)") from e
    except (TypeError, AttributeError, AssertionError, ZeroDivisionError) as e:
        bad = next(suspect_sizes(raw), None)  # the likely cause: a size that is not a whole number >= 1
        what = f"{bad[0]} = {bad[1]!r}, expected a whole number >= 1" if bad else "a field of the wrong type"
        raise ValueError(f"{path}: {what} ({e})") from e
    check_config(cfg, path)
    return cfg


def suspect_sizes(d: dict, where: str = "") -> Iterator[tuple[str, object]]:
    """(name, value) of every size or count in a config.json (nested too) that is not a whole number >= 1."""
    for k, v in d.items() if isinstance(d, dict) else ():
        if isinstance(v, dict):
            yield from suspect_sizes(v, f"{where}{k}.")
        elif re.search(r"(size|layers|heads|embeddings|dim|depth)$", k) and not isinstance(v, bool):
            if not isinstance(v, int) or v < 1:
                yield f"{where}{k}", v


def all_finite(x) -> bool:
    """Every number in a nested list or tuple is finite (strings pass)."""
    if isinstance(x, (tuple, list)):
        return all(all_finite(y) for y in x)
    return isinstance(x, str) or (isinstance(x, (int, float)) and math.isfinite(x))


def check_config(cfg, path: Path, where: str = "") -> None:
    """Every field of a typed config (nested dataclasses too) against its annotation: whole numbers >= 1 for
    sizes and counts (token ids >= 0; a feature layer may count from the end), finite positive numbers for
    epsilons, thetas and ratios, booleans, strings; None only where the annotation allows it."""
    hints = typing.get_type_hints(type(cfg), vars(sys.modules[type(cfg).__module__]))
    for f in dataclasses.fields(cfg):
        value, name, kind = getattr(cfg, f.name), where + f.name, hints[f.name]
        if dataclasses.is_dataclass(value):
            check_config(value, path, name + ".")
            continue
        union = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else ()
        if value is None and type(None) in union:
            continue
        base = next((t for t in (bool, int, float, str) if kind is t or t in union), None)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if base is bool:
            ok, expected = isinstance(value, bool), "true or false"
        elif base is int:
            whole = isinstance(value, int) and not isinstance(value, bool)
            if name.endswith("_id"):
                ok, expected = whole and value >= 0, "a token id (a whole number >= 0)"
            elif name.endswith("feature_layer"):
                ok, expected = whole, "a layer index (a whole number)"
            else:
                ok, expected = whole and value >= 1, "a whole number >= 1"
        elif base is float:
            ok, expected = number and math.isfinite(value) and value > 0, "a finite number > 0"
        elif base is str:
            ok, expected = isinstance(value, str), "a string"
        else:  # tuples (image sizes, pinpoints, rope sections, layer types)
            ok, expected = isinstance(value, (tuple, list)) and all_finite(value), "a list of numbers"
        if not ok:
            raise ValueError(f"{path}: {name} = {value!r}, expected {expected}")


def read_safetensors_names(ckpt: Path) -> dict[str, Path]:
    """Tensor name -> file, for one `model.safetensors` or shards listed in `model.safetensors.index.json`."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index} has no weight_map of tensor names to shard files: download it again")
        missing = sorted({f for f in weight_map.values() if not (ckpt / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names {', '.join(missing)}, not in {ckpt}: download it again")
        return {k: ckpt / f for k, f in weight_map.items()}
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {ckpt} (weights are only loaded from safetensors)")
    names = {}
    for f in files:
        with open_safetensors(f) as sf:
            names.update({k: f for k in sf.keys()})
    return names


def open_safetensors(f: Path):
    """safe_open on the CPU; a file that is not safetensors (a cut download, a renamed pickle) is an error."""
    from safetensors import safe_open

    try:
        return safe_open(f, "pt", device="cpu")
    except Exception as e:
        raise ValueError(f"{f} is not a readable safetensors file ({e}): download it again") from e


def load_weights(
    model: torch.nn.Module,
    ckpt: Path,
    rename: Callable[[str], str | None],
    device: torch.device,
    dtype: torch.dtype,
    tied: dict[str, str] | None = None,
) -> None:
    """Fill a model built on the meta device: read every tensor (mmap), `rename` it (None drops it), check the
    names and shapes strictly, cast floating tensors to `dtype` once, and `load_state_dict(assign=True)`.
    `tied` maps a parameter to the one it shares storage with (e.g. lm_head -> embed_tokens).
    Layers already replaced by QuantLinear (`quantize` on the meta model) are quantized as their weight is
    read, so the float weights never exist all at once: peak memory stays near the quantized size."""
    tied = tied or {}
    quantized = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    floating = {k for k, v in model.state_dict().items() if v.is_floating_point()} | set(quantized)
    for k, m in quantized.items():  # the checkpoint holds the float weight that the layer's buffers come from
        for buffer in ("weight", "scale", "scales_and_zeros"):
            expected.pop(k[: -len("weight")] + buffer, None)
        expected[k] = torch.Size((m.out_features, m.in_features))
    by_file: dict[Path, list[str]] = {}
    for name, f in read_safetensors_names(ckpt).items():
        by_file.setdefault(f, []).append(name)
    state, shapes, unexpected = {}, {}, []

    def put(name: str, t: torch.Tensor) -> None:
        shapes[name] = t.shape
        if name in quantized and t.shape == expected[name]:
            prefix = name[: -len("weight")]
            state.update({prefix + k: v for k, v in quantized[name].quantized_state(t).items()})
        else:
            state[name] = t

    for f, names in by_file.items():
        with open_safetensors(f) as sf:
            for name in names:
                new = rename(name)
                if new is None:
                    continue
                if new not in expected:
                    unexpected.append(name if new == name else f"{name} (as {new})")
                    continue
                try:
                    t = sf.get_tensor(name)
                except Exception as e:  # e.g. an index that names the wrong shard, or a cut shard
                    raise ValueError(
                        f"tensor {name} cannot be read from {f} ({e}): download the checkpoint again"
                    ) from e
                if new in floating and not t.is_floating_point():
                    raise ValueError(
                        f"tensor {name} in {f} is {str(t.dtype).removeprefix('torch.')}, where the model "
                        "takes float weights: is it a quantized export? Load the original checkpoint (and "
                        "quantize it with --quantize / load(..., quantize=...))"
                    )
                put(new, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
    for dst, src in tied.items():
        if dst not in shapes and src in state:
            put(dst, state[src])
    missing = sorted(set(expected) - set(shapes))
    bad = [
        f"{k}: checkpoint {tuple(v)} vs model {tuple(expected[k])}"
        for k, v in shapes.items()
        if k in expected and v != expected[k]
    ]
    if missing or unexpected or bad:
        lines = [f"weights in {ckpt} do not fit the model built from its config.json:"]
        for title, items in (("missing", missing), ("unexpected", sorted(unexpected)), ("wrong shape", bad)):
            if items:
                lines.append(f"  {len(items)} {title}: {', '.join(items[:12])}{' ...' * (len(items) > 12)}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True, assign=True)
    for dst, src in tied.items():  # share one Parameter, so fine-tuning keeps them tied
        if dst not in quantized:  # a quantized output layer keeps its own int8/int4 copy
            *parent, leaf = dst.split(".")
            model.get_submodule(".".join(parent)).register_parameter(leaf, model.get_parameter(src))


def read_eos_ids(ckpt: Path, config: dict) -> list[int]:
    """EOS ids from generation_config.json when present, else from config.json (flat or text_config)."""
    gen = read_json_if_present(ckpt / "generation_config.json") or {}
    eos = gen.get(
        "eos_token_id", config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id"))
    )
    return as_list(eos)


# ----------------------------------------------------------------------------------------------------------
# Weight-only quantization of the decoder
#
# A decode step at batch 1 reads every decoder weight once to make one token, so its speed is set by the
# bytes it reads. Weights stored in 8 or 4 bits, multiplied by kernels that read them as stored, cut those
# bytes by 2x or about 3.5x. Only the decoder's linear layers are quantized (each model names them in
# `quantized_parts`): the vision tower, the projector and the embeddings stay in the load dtype; they are a
# small share of the bytes a step reads, and a quantized vision side is where quantized VLMs lose the image.
# The maths is `quantize_int8`/`dequantize_int8` and `quantize_int4`/`dequantize_int4`, and a quantized layer
# computes x @ dequantize(W).T + bias; the tests check torch's kernels against exactly that.

QUANTIZE_MODES = ("int8", "int4")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric, one scale per output row: w (N, K) ~ q * scale[:, None] with q in [-127, 127]."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]  # (N, K)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric groups of `group` inputs: in each group the 16 codes 0..15 span [min, max] evenly.
    Returns q (N, K) uint8 in 0..15, and scale, zero (N, K/G) with w ~ (q - 8) * scale + zero.
    NOTE: `zero` is the value of the middle code 8, not of code 0: the convention of torch's int4 kernels."""
    N, K = w.shape
    w = w.float().reshape(N, K // group, group)  # (N, K/G, G)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, K/G)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)  # (N, K/G, G)
    return q.reshape(N, K), scale, lo + 8 * scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    G = K // scale.shape[1]
    w = (q.float().reshape(N, K // G, G) - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(N, K)  # (N, K)


def int4_group_size(K: int, group_size: int = 128) -> int | None:
    """`group_size` if it divides the input width K, else the largest of 64 and 32 below it that does (the
    tiny test models are 64 wide), else None."""
    return next((g for g in (group_size, 64, 32) if g <= group_size and K % g == 0), None)


class QuantLinear(torch.nn.Module):
    """A linear layer with its weight stored quantized: y = x @ dequantize(W).T + bias.
    int8: `weight` (N, K) int8 and `scale` (N,). int4: `weight` holds the codes packed as torch's int4 kernel
    for the device reads them (CPU: uint8 (N', K/2); CUDA: int32 tiles), `scales_and_zeros` (K/G, N', 2);
    N' is N padded to the kernels' tile of 16 rows, and the padding is cut from the output.
    Built on the meta device; `quantize` and `load_weights` fill it with `quantized_state(w)`.
    NOTE: the int4 layout depends on the device, so a layer runs on the device type it was packed for."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        mode: str,
        group_size: int = 128,
        dtype: torch.dtype = torch.bfloat16,
        packed_for: str = "cpu",  # the device type it will run on
        name: str = "",  # for errors
    ):
        super().__init__()
        if mode not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, not {mode!r}")
        K, N = in_features, out_features
        self.in_features, self.out_features, self.mode, self.packed_for = K, N, mode, packed_for
        meta = dict(device="meta")
        if mode == "int8":
            self.register_buffer("weight", torch.empty(N, K, dtype=torch.int8, **meta))
            self.register_buffer("scale", torch.empty(N, dtype=dtype, **meta))
        else:
            self.group_size = int4_group_size(K, group_size)
            if self.group_size is None or (packed_for == "cuda" and K % 32):
                raise ValueError(
                    f"int4 cannot take layer {name}: its {K} inputs do not divide into groups of "
                    f"{group_size}, 64 or 32 (on CUDA K must also be a multiple of 32); use int8 for it"
                )
            self.rows = -(-N // 16) * 16  # N', padded to the kernels' tile
            packed = self.pack_int4(torch.zeros(self.rows, K, dtype=torch.uint8, **meta))
            self.register_buffer("weight", torch.empty_like(packed))
            self.register_buffer(
                "scales_and_zeros", torch.empty(K // self.group_size, self.rows, 2, dtype=dtype, **meta)
            )
        self.bias = torch.nn.Parameter(torch.empty(N, dtype=dtype, **meta)) if bias else None

    def pack_int4(self, q: torch.Tensor) -> torch.Tensor:
        """Codes q (N', K) in 0..15 -> the layout the device's int4 kernel reads."""
        if self.packed_for == "cuda":
            tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)  # K tiling: K % 16t == 0
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (N', K/2): the even code in the high half
            return torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)  # (N', K/2) uint8

    @property
    def dtype(self) -> torch.dtype:  # of the activations, scales and bias
        return (self.scale if self.mode == "int8" else self.scales_and_zeros).dtype

    @torch.no_grad()
    def quantized_state(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """A float weight (N, K) -> this layer's buffers, on w's device. Computed in float32 a block of rows
        at a time, so that a large matrix (an output layer) never exists in float32 whole."""
        blocks = [
            quantize_int8(b) if self.mode == "int8" else quantize_int4(b, self.group_size)
            for b in w.split(4096)
        ]
        if self.mode == "int8":
            q, scale = (torch.cat(t) for t in zip(*blocks))
            return {"weight": q, "scale": scale.to(self.dtype)}
        q, scale, zero = (torch.cat(t) for t in zip(*blocks))
        pad = self.rows - self.out_features  # padded rows: code 8 with scale 0 and zero 0, a weight of 0
        q = torch.nn.functional.pad(q, (0, 0, 0, pad), value=8)  # (N', K)
        sz = torch.nn.functional.pad(torch.stack([scale, zero], dim=-1), (0, 0, 0, 0, 0, pad))  # (N', K/G, 2)
        return {
            "weight": self.pack_int4(q),
            "scales_and_zeros": sz.transpose(0, 1).contiguous().to(self.dtype),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        if x.device.type != self.packed_for:
            raise ValueError(
                f"{self.mode} weights packed for {self.packed_for} cannot run on {x.device}: load on it"
            )
        lead, K = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, K).to(self.dtype).contiguous()  # (M, K): the kernels take 2-D rows in their dtype
        if self.mode == "int8" and (self.packed_for == "cuda" or x.shape[0] > 32):
            # x @ (q * s).T == (x @ q.T) * s. On CUDA, compiled, the cast of q fuses into the product's reads;
            # on the CPU this beats the int8 kernel from about 32 rows on (a prefill: 27 against 80 ms for
            # 368 rows of a 8960 x 1536 layer), where the product, not reading the weight, sets the time
            y = torch.nn.functional.linear(x, self.weight.to(x.dtype)) * self.scale  # (M, N)
        elif self.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)  # (M, N)
        elif self.packed_for == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.weight, self.group_size, self.scales_and_zeros
            )
        y = y[:, : self.out_features]  # (M, N): int4's padded rows cut
        if self.bias is not None:
            y = y + self.bias  # NOTE: the kernels take no bias; Qwen2's q/k/v biases are added here
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"{self.in_features}, {self.out_features}, {self.mode}{group}, bias={self.bias is not None}"


def quantize(
    model: torch.nn.Module,
    mode: str,
    group_size: int = 128,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Replace every linear layer under `model.quantized_parts` (the decoder and its output layer) with a
    QuantLinear, in place, one layer at a time. A model on the meta device gets empty layers for
    `load_weights` to fill: `device` and `dtype` then say where and in which dtype it will run (the int4
    packing depends on the device). Returns the model."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, not {mode!r}")
    if device is not None and torch.device(device).type not in ("cpu", "cuda"):
        raise ValueError(f"quantized weights run on cpu or cuda (torch's kernels), not {device}")
    parts = tuple(model.quantized_parts)
    for name, m in list(model.named_modules()):
        if not isinstance(m, torch.nn.Linear) or not any(
            name == p or name.startswith(p + ".") for p in parts
        ):
            continue
        where = torch.device(device) if device is not None else m.weight.device
        q = QuantLinear(
            m.in_features,
            m.out_features,
            m.bias is not None,
            mode,
            group_size,
            dtype or m.weight.dtype,
            packed_for="cuda" if where.type == "cuda" else "cpu",
            name=name,
        )
        if m.weight.device.type != "meta":
            state = q.quantized_state(m.weight.to(where))
            if m.bias is not None:
                state["bias"] = m.bias.detach().to(where, q.dtype)
            q.load_state_dict(state, assign=True)
        *parent, leaf = name.split(".")
        setattr(model.get_submodule(".".join(parent)), leaf, q)
    return model


# ----------------------------------------------------------------------------------------------------------
# Sampling and the generation loop


def sample(
    logits: torch.Tensor,  # (B, V) float
    seen: torch.Tensor | None = None,  # (B, V) bool: tokens already in the row, for the repetition penalty
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B,) long
    """Repetition penalty, then temperature, top-k and top-p, in that order. Greedy when temperature == 0."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        # NOTE: a seen token's logit is divided by the penalty when positive, multiplied when negative.
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        drop[:, 0] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B, 1) -> (B,)


@dataclass
class GenerationSettings:
    """Sampling settings, checked when made: a value out of range is an error, never a silently odd answer."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty"):
            value, count = getattr(self, name), name in ("max_new_tokens", "top_k")
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if count else numbers.Real):
                raise ValueError(f"{name} must be {'an integer' if count else 'a number'}, got {value!r}")
        checks = [
            ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature, self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 = off)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            ("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0 (1 = off)"),
        ]
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be a whole number in [0, 2**63), got {self.seed}")
        for name, value, ok, allowed in checks:
            finite = math.isfinite(value)
            if not (ok and finite):
                raise ValueError(f"{name} must be {allowed}, got {value}")


def left_padded_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The attention mask (all ones when None), which generation needs left-padded: every row's last token
    real, so that the new tokens of all rows go to the same cache slot."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}: [None] adds the batch")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens: the prompt is empty")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        shapes = f"{tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        raise ValueError(f"attention_mask {shapes}: pass the processor's output unchanged")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generate() needs left padding: call the processor with padding_side='left'")
    return attention_mask


def cache_length(T: int, max_new_tokens: int) -> int:
    """Slots a static KV cache needs: the prompt and the new tokens, rounded up to a multiple of 16 (so that
    nearby prompt lengths share one compiled decode step)."""
    return -(-(T + max_new_tokens) // 16) * 16


def check_finite(first_logits: torch.Tensor, dtype: torch.dtype) -> None:
    """NaN/inf logits after the prefill: float16 overflows in these models; in another dtype the weights or
    the inputs hold NaN/inf."""
    if not bool(torch.isfinite(first_logits).all()):
        if dtype == torch.float16:
            raise ValueError("the prefill produced NaN/inf logits in float16 (it overflows): use bfloat16")
        name = str(dtype).removeprefix("torch.")
        raise ValueError(
            f"the prefill produced NaN/inf logits in {name}: the checkpoint's weights hold NaN/inf"
        )


def check_context(n_positions: int, max_new_tokens: int, limit: int) -> None:
    """A prompt that reaches position `n_positions`, plus the new tokens, must fit the checkpoint's
    max_position_embeddings (none of the five decoders was trained to go further)."""
    if n_positions + max_new_tokens > limit:
        raise ValueError(
            f"the prompt takes {n_positions} positions and max_new_tokens is {max_new_tokens}: together "
            f"more than this checkpoint's max_position_embeddings ({limit}); use fewer or smaller images or "
            "frames, a shorter prompt or fewer new tokens"
        )


@dataclass
class Generation:
    """What generate_loop returns (and generate(..., details=True)): the new tokens and how the loop went."""

    tokens: torch.Tensor  # (B, N) long, rows that finished early padded with the pad id
    stopped: str  # "eos": every row reached an EOS id; "max_new_tokens": the limit came first
    first_step_s: float | None  # seconds the first decode step took (with compile=True: the compile)


def generate_loop(
    first_logits: torch.Tensor,
    step: Callable[[torch.Tensor, int], torch.Tensor],
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: GenerationSettings,
    eos_token_ids: list[int],
    pad_token_id: int,
    streamer: Callable[[str], None] | None = None,
    tokenizer: Tokenizer | None = None,
) -> Generation:
    """The decode loop shared by every model: sample, record, stop rows at EOS, feed the token back.
    first_logits (B, V) are the prefill's logits at each row's last prompt token; `step(tokens (B, 1), i)`
    runs decode step i and returns the next logits (B, V); prompt_ids/prompt_mask (B, T) feed the repetition
    penalty. Returns the new tokens (B, N), rows that finished early padded with pad_token_id, the stop
    reason and the first decode step's time.
    The only host-device syncs are the streamer's read of each token and, without a streamer, an
    all-finished check every 8 steps."""
    B, V = first_logits.shape
    device, s = first_logits.device, settings
    if streamer is not None and (B != 1 or tokenizer is None):
        raise ValueError("streaming needs a single prompt (batch of 1)")
    generator = None if s.seed is None else torch.Generator(device=device).manual_seed(s.seed)
    seen = None
    if s.repetition_penalty != 1.0:
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        seen.scatter_(1, prompt_ids.to(device).clamp(0, V - 1), prompt_mask.to(device).bool())
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    out = torch.full((B, s.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    push = tokenizer.stream() if streamer is not None else None
    streamed, printed = [], []  # tokens pushed to the streamer, and the text it received
    logits, n, first_step_s = first_logits, 0, None
    for i in range(s.max_new_tokens):
        token = sample(logits, seen, s.temperature, s.top_k, s.top_p, s.repetition_penalty, generator)
        token = torch.where(finished, pad_token_id, token)  # (B,)
        out[:, i] = token
        n = i + 1
        finished |= torch.isin(token, eos)
        if seen is not None:
            seen.scatter_(1, token[:, None], True)  # (B, V)
        if push is not None:  # the one read per step: the streamer needs the token (one row)
            t = int(token[0])
            if t in eos_token_ids:
                break
            streamed.append(t)
            printed.append(push(t))
            streamer(printed[-1])
        elif i % 8 == 7 and bool(finished.all()):
            break
        if i + 1 < s.max_new_tokens:
            t0 = time.perf_counter() if i == 0 else 0.0  # only step 0 is timed (with compile: the compile)
            logits = step(token[:, None], i)  # (B, 1) -> (B, V)
            if i == 0:
                first_step_s = time.perf_counter() - t0
    if push is not None:  # bytes held back for an unfinished UTF-8 character: flush them as decode() would
        full, shown = tokenizer.decode(streamed), "".join(printed)
        if full.startswith(shown) and len(full) > len(shown):
            streamer(full[len(shown) :])
    out = out[:, :n]
    # Trim the columns produced after every row had already finished (the all-finished check is lazy).
    done_at = torch.where(torch.isin(out, eos), torch.arange(n, device=device), n).min(dim=1).values
    if len(eos_token_ids) and bool((done_at < n).all()):
        return Generation(out[:, : int(done_at.max()) + 1], "eos", first_step_s)
    return Generation(out, "max_new_tokens", first_step_s)


def compiled_decode_step(model: torch.nn.Module, caches: list[torch.nn.Module]):
    """`torch.compile` of `model.decode_step`, made once per model: with CUDA graphs on CUDA
    ("reduce-overhead"), plain inductor on the CPU. The eager decode_step stays the code a reader reads.
    NOTE: the caches' buffers are written in place by every step; marking their addresses static lets a
    CUDA graph use them where they are (an input it would otherwise copy, or refuse to capture)."""
    for cache in caches:
        torch._dynamo.mark_static_address(cache.k)
        torch._dynamo.mark_static_address(cache.v)
    if "_compiled_decode_step" not in model.__dict__:
        mode = "reduce-overhead" if next(model.parameters()).device.type == "cuda" else None
        model.__dict__["_compiled_decode_step"] = torch.compile(model.decode_step, mode=mode)
    return model.__dict__["_compiled_decode_step"]


# ----------------------------------------------------------------------------------------------------------
# Media

MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
URL_TIMEOUT_S = 20  # for each read
URL_DEADLINE_S = 60  # for a whole download
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # larger images are refused (decompression bombs)


def _read_url(url: str) -> bytes:
    deadline, chunks, size = time.monotonic() + URL_DEADLINE_S, [], 0
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as r:
            while chunk := r.read1(1 << 16):  # what has arrived: a slow server cannot stall us
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES or time.monotonic() > deadline:
                    break
    except Exception as e:
        raise ValueError(f"could not fetch {url}: {e}") from e
    if size > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"{url} is larger than {MAX_DOWNLOAD_BYTES >> 20} MiB: download and resize it first")
    if time.monotonic() > deadline:
        raise ValueError(f"{url} took more than {URL_DEADLINE_S} s to download: download it, pass the file")
    return b"".join(chunks)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; anything with transparency is composited onto white (as the reference processors do). 16-bit and
    32-bit grey images are scaled to 8 bits (PIL's own convert would clip them to nearly white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        x = np.asarray(image, dtype=np.float64)
        if image.mode == "F":  # floats: 0..1, or already 0..255
            x = x * 255.0 if x.max(initial=0) <= 1.0 else x
        elif image.mode.startswith("I;16") or x.max(initial=0) > 255:  # 16-bit values ("I" holds them too)
            x = x / 257.0
        image = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = Image.alpha_composite(
            Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA")
        )
    return image.convert("RGB")


def load_image(
    src: str | Path | Image.Image | np.ndarray | torch.Tensor, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """A PIL RGB image from a PIL image, a uint8 array or tensor ((H, W), (H, W, C) as PIL and NumPy lay it
    out, or (C, H, W) as torchvision does; C = 1 to 4), a path, an http(s) URL or a data URI.
    Images read from bytes get their EXIF orientation applied; one of more than `max_pixels` is refused."""
    if isinstance(src, Image.Image):
        return to_rgb(src)
    if isinstance(src, torch.Tensor):
        src = src.detach().cpu().numpy()
    if isinstance(src, np.ndarray):
        x, channels = src, (1, 2, 3, 4)
        if x.ndim == 3 and x.shape[-1] not in channels and x.shape[0] in channels:
            x = x.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if x.dtype != np.uint8 or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in channels):
            raise ValueError(
                f"an image array or tensor must be uint8 (0-255), laid out (H, W), (H, W, C) or (C, H, W) "
                f"with C = 1 to 4; got {x.dtype} {tuple(src.shape)}"
            )
        return to_rgb(Image.fromarray(np.ascontiguousarray(x[..., 0] if x.shape[-1:] == (1,) else x)))
    if not isinstance(src, (str, Path)):
        raise ValueError(
            f"an image is a PIL image, a uint8 array or tensor, a path, an http(s) URL or a data URI, not "
            f"{type(src).__name__}"
        )
    src = str(src)
    if src.startswith("data:"):
        head, _, payload = src.partition(",")
        if ";base64" not in head:
            raise ValueError("only base64 data URIs are supported (data:image/png;base64,...)")
        try:
            data, name = base64.b64decode(payload, validate=True), "the data URI"
        except ValueError as e:
            raise ValueError(f"the data URI's base64 payload does not decode ({e})") from e
    elif src.startswith(("http://", "https://")):
        data, name = _read_url(src), src
    else:
        if not os.path.isfile(src):
            raise FileNotFoundError(f"image file not found: {src}")
        data, name = Path(src).read_bytes(), src
    try:
        with warnings.catch_warnings():  # our own limit below replaces PIL's
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit
            if image.width * image.height > max_pixels:
                raise ValueError(
                    f"{name} is {image.width}x{image.height} = {image.width * image.height} pixels, more "
                    f"than the limit of {max_pixels} (a guard against decompression bombs): downscale "
                    "it, or raise the limit with --max-image-pixels N (load_image(src, max_pixels=N))"
                )
            image.load()
    except UnidentifiedImageError as e:
        raise ValueError(f"{name} is not a readable image (not a format Pillow knows, or damaged)") from e
    except OSError as e:
        raise ValueError(f"{name} is not a readable image ({e})") from e
    return to_rgb(ImageOps.exif_transpose(image))


def image_to_uint8(src) -> torch.Tensor:
    """An image (anything `load_image` takes) -> (3, H, W) uint8, the layout the resize functions take.
    NOTE: contiguous, because torch's uint8 resize may round differently on a channels-last view."""
    return torch.from_numpy(np.array(load_image(src))).permute(2, 0, 1).contiguous()  # (3, H, W)


def frames_to_uint8(frames) -> torch.Tensor:
    """A video's frames -> (F, 3, H, W) uint8: an (F, H, W, 3) uint8 array (PyAV's layout), or anything whose
    items `load_image` takes (a list of images; an (F, C, H, W) or (F, H, W, C) uint8 array or tensor)."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if (
        isinstance(frames, np.ndarray)
        and frames.ndim == 4
        and frames.dtype == np.uint8
        and frames.shape[-1] == 3
    ):
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()  # (F, 3, H, W)
    else:
        x = torch.stack([image_to_uint8(f) for f in frames]) if len(frames) else torch.zeros(0, 3, 1, 1)
    if x.shape[0] == 0:
        raise ValueError("a video with zero frames was given")
    return x


def as_list(x) -> list:
    """None -> [], a list or tuple -> a list, anything else (one prompt, image or video) -> [x]."""
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


@dataclass
class Video:
    frames: np.ndarray  # (F, H, W, 3) uint8
    indices: list[int]  # which frames of the file were taken
    timestamps: list[float]  # their times in seconds
    fps: float  # the file's frame rate
    total_frames: int


def sample_frame_indices(
    total: int,
    num_frames: int | None = None,
    fps: float | None = None,
    video_fps: float | None = None,
    repeat: bool = False,
) -> list[int]:
    """Uniform indices: `num_frames` of them, or `fps` per second of video. A count above what the video
    has takes all its frames, or with `repeat` each frame in turn (3 for 8: 0 0 0 1 1 1 2 2).
    An fps never repeats frames."""
    check_frames(num_frames, fps)
    asked = num_frames
    if fps is not None:
        video_fps = video_fps or 24.0
        num_frames, repeat, asked = max(1, int(total / video_fps * fps)), False, f"{fps:g} per second"
    if num_frames is None or num_frames == total:
        return list(range(total))
    if num_frames > total:
        has = f"{total} frame{'s' * (total != 1)}" + (f" at {video_fps:g} per second" if fps else "")
        them = "it" if total == 1 else "them"
        how = f"repeating {them} to make" if repeat else f"using {them} instead of"
        print(f"note: the video has {has}; {how} {asked}", file=sys.stderr)
        return [i * total // num_frames for i in range(num_frames)] if repeat else list(range(total))
    return torch.arange(0, total, total / num_frames).int().tolist()[:num_frames]


def check_frames(num_frames: int | None, fps: float | None) -> None:
    """How many frames to sample: `num_frames` (>= 1) or `fps` (> 0), not both."""
    if num_frames is not None and fps is not None:
        raise ValueError("give --num-frames or --fps, not both")
    if num_frames is not None and (num_frames != int(num_frames) or num_frames < 1):
        raise ValueError(f"the number of frames must be a whole number >= 1, got {num_frames}")
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be > 0, got {fps}")


def load_video(
    src: str | Path, num_frames: int | None = None, fps: float | None = None, repeat: bool = False
) -> Video:
    """Decode frames with PyAV, sampled uniformly by count or rate (`sample_frame_indices`; `repeat`: a short
    video's frames repeated up to the count). When few frames are wanted it seeks to each one instead of
    decoding the whole file."""
    import av

    check_frames(num_frames, fps)
    src = str(src)
    if not src.startswith(("http://", "https://")) and not os.path.isfile(src):
        raise FileNotFoundError(f"video file not found: {src}")
    try:
        container = av.open(src, timeout=URL_TIMEOUT_S)
    except Exception as e:
        raise ValueError(f"{src} is not a readable video ({e})") from e
    with container:
        if not container.streams.video:
            raise ValueError(f"{src} contains no video frames (no video stream)")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 24.0)
        total = stream.frames  # from the header; 0 when the container does not say
        if not total and stream.duration:
            total = int(float(stream.duration * stream.time_base) * rate)
        frames: dict[int, np.ndarray] = {}
        wanted = sample_frame_indices(total, num_frames, fps, rate, repeat) if total else []
        if total:
            if len(wanted) * 4 < total:  # sparse: seek to each frame's timestamp
                start = stream.start_time or 0
                for idx in wanted:
                    container.seek(start + int(idx / rate / stream.time_base), stream=stream, backward=True)
                    for frame in container.decode(stream):
                        if frame.pts is None or round((frame.pts - start) * stream.time_base * rate) >= idx:
                            frames[idx] = frame.to_ndarray(format="rgb24")
                            break
        if not wanted or len(frames) < len(wanted):  # dense, or the header's frame count was off
            container.seek(0)
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            if total == 0 or len(decoded) < total:
                if total and decoded:
                    print(
                        f"note: {src}: its header says {total} frames but only {len(decoded)} decode; "
                        "sampling from those",
                        file=sys.stderr,
                    )
                total = len(decoded)
                wanted = sample_frame_indices(total, num_frames, fps, rate, repeat) if total else []
            frames = {i: decoded[i] for i in wanted}
    if not frames:
        raise ValueError(f"{src} contains no decodable video frames")
    return Video(np.stack([frames[i] for i in wanted]), wanted, [i / rate for i in wanted], rate, total)


# ----------------------------------------------------------------------------------------------------------
# Shapes through a model


@contextmanager
def record_shapes(model: torch.nn.Module, stages: list[tuple[str, str, str]]) -> Iterator[list[dict]]:
    """Records the output shape of every named stage while the block runs. `stages` is a model file's
    STAGES: (submodule path, what it does, its shape in the legend). Yields a list that receives one
    {"stage", "module", "legend", "shape", "inputs"} per call (`inputs`: the shapes of its tensor
    arguments), in call order (a prefill and each decode step all add
    rows). The hooks are removed when the block ends; the model itself is not changed."""
    rows: list[dict] = []

    def hook(path: str, what: str, legend: str):
        def record(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            ins = [tuple(x.shape) for x in args if torch.is_tensor(x)]
            rows.append(dict(stage=what, module=path, legend=legend, shape=tuple(out.shape), inputs=ins))

        return record

    handles = [model.get_submodule(p).register_forward_hook(hook(p, w, leg)) for p, w, leg in stages]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()
