"""What the five model files share that is not architecture: device and dtype, prompts (tokenizer,
placeholders, batches, pixels), checkpoints (files, config and its checks, weights, EOS ids) and generation
(the checks at its door, sampling, the decode loop) and a conversation that continues on its kept cache
(Chat). The unit a researcher copies is a model file and this file: cli.py, quant.py and media.py are imported
only for the command line, int8/int4 weights, and files, URLs, videos, 16-bit images or odd array layouts.
Layers never live here. State: a model's last Decoding (its caches, kept for the next call) and compiled token
function, in the model's __dict__; Chat's conversation and cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# ----------------------------------------------------------------------------------------------------------
# Device and dtype


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`None` picks cuda, then mps, then cpu. An explicit device must exist on this machine."""
    if device is None:
        mps = torch.backends.mps.is_available()
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES.update(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device, quantize=None) -> torch.dtype:
    """`None` picks bfloat16 on CUDA and float32 elsewhere; with quantized weights bfloat16 everywhere (the
    CPU's int8/int4 kernels are fast with bfloat16 activations and slow with float32 ones)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" or quantize else torch.float32
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")
    if dtype == torch.float16:
        warnings.warn("float16 overflows in these models (NaN logits); prefer bfloat16", stacklevel=3)
    if quantize and dtype == torch.float32 and device.type == "cpu":
        warnings.warn(
            f"{quantize} with float32 activations is slow on the CPU; prefer bfloat16", stacklevel=3
        )
    return dtype


# ----------------------------------------------------------------------------------------------------------
# Prompts: tokenizer, placeholders, batches, pixels


class Tokenizer:
    """`tokenizer.json` through `tokenizers`. Nothing is added implicitly: each model file writes its special
    tokens (BOS, <|im_start|>, ...) in its prompt format."""

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


def check_placeholders(texts: list[str], media: dict[str, list], hint="use apply_chat_template") -> None:
    """One placeholder string in the prompts per item given; `media` maps each placeholder to its items."""
    for placeholder, items in media.items():
        n = sum(t.count(placeholder) for t in texts)
        if n != len(items):
            raise ValueError(
                f"the prompt has {n} {placeholder} placeholder(s) but {len(items)} were given: one "
                f"placeholder per item ({hint})"
            )


def expand_placeholders(texts: list[str], tokens: dict[str, list[int]]) -> list[str]:
    """Each placeholder repeated as many times as its item has tokens (`tokens`: placeholder -> counts)."""
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
    if not all(rows):
        raise ValueError(f"prompt {rows.index([])} is empty: no tokens to continue (use the chat template)")
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        input_ids[b, cols], attention_mask[b, cols] = torch.tensor(r, dtype=torch.long), 1
    return input_ids, attention_mask


def as_list(x) -> list:
    """None -> [], a list or tuple -> a list, anything else (one prompt, image or video) -> [x]."""
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit PIL image in RGB, transparency composited onto white (as the reference processors do)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255,) * 4), image.convert("RGBA"))
    return image.convert("RGB")


def image_to_uint8(image) -> torch.Tensor:
    """An image -> (3, H, W) uint8, the layout the resize functions take: a PIL image of any 8-bit mode, or a
    uint8 array or tensor laid out (H, W, 3) as PIL and NumPy do or (3, H, W) as torchvision does. Anything
    else (a path, a URL, a data URI, a 16-bit image, another layout) goes through media.py.
    NOTE: contiguous, because torch's uint8 resize may round differently on a channels-last view."""
    x = image
    if isinstance(x, Image.Image) and not x.mode.startswith(("I", "F")):  # 16/32-bit: media.to_rgb scales
        x = np.asarray(to_rgb(x))  # (H, W, 3)
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        x = torch.tensor(x)  # a copy
    if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 3:
        if x.shape[-1] == 3:
            return x.detach().cpu().permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)
        if x.shape[0] == 3 and x.shape[-1] > 4:
            return x.detach().cpu().contiguous()  # (3, H, W)
    import media  # other modes and layouts, files and URLs: with their checks and guards

    return torch.from_numpy(np.array(media.load_image(image))).permute(2, 0, 1).contiguous()  # (3, H, W)


def frames_to_uint8(frames) -> torch.Tensor:
    """A video's frames -> (F, 3, H, W) uint8: an (F, H, W, 3) uint8 array as PyAV gives it, or anything whose
    frames `image_to_uint8` takes (a list of images, an (F, C, H, W) or (F, H, W, C) array or tensor)."""
    if len(frames) == 0:
        raise ValueError("a video with zero frames was given")
    if isinstance(f := frames, np.ndarray) and f.ndim == 4 and f.dtype == np.uint8 and f.shape[-1] == 3:
        return torch.from_numpy(np.ascontiguousarray(f)).permute(0, 3, 1, 2).contiguous()  # (F, 3, H, W)
    return torch.stack([image_to_uint8(f) for f in frames])  # (F, 3, H, W)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: files, config and its checks, weights

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
    """A local directory in the Hub layout, or a Hub repo id downloaded (only the needed files) to a cache."""
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
        raise ValueError(f"{name} is gated: accept its licence on the Hub, then set HF_TOKEN=<token>") from e
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


def read_config(ckpt: Path, expected: str, config_from_hf: Callable[[dict], object]) -> tuple[dict, object]:
    """config.json, of model_type `expected`, and the typed config `config_from_hf` makes of it. A missing
    field, a width its heads do not divide, a field of the wrong type: one ValueError naming the file."""
    path = ckpt / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} has no config.json: is it a checkpoint directory?")
    raw, this = read_json(path), MODEL_FILES[expected]
    if (got := raw.get("model_type")) != expected:
        hint = f"; use {MODEL_FILES[got]} for it" if got in MODEL_FILES else ""
        raise ValueError(f"this checkpoint is model_type={got!r}, but {this} runs {expected!r}{hint}")
    check_heads(raw, path)
    try:
        cfg = config_from_hf(raw)
    except KeyError as e:
        raise ValueError(f"{path}: the field {e.args[0]!r} is missing (it has no default)") from e
    except (TypeError, AttributeError, AssertionError, ZeroDivisionError) as e:
        bad = next(suspect_sizes(raw), None)  # the likely cause: a size that is not a whole number >= 1
        what = f"{bad[0]} = {bad[1]!r}, expected a whole number >= 1" if bad else "a field of the wrong type"
        raise ValueError(f"{path}: {what} ({e})") from e
    check_fields(cfg, path)
    return raw, cfg


def check_heads(raw: dict, path: Path) -> None:
    """Every section's width divides by its heads (unless it names head_dim), its heads by its kv heads."""
    for where, d in [("", raw)] + [(f"{k}.", v) for k, v in raw.items() if isinstance(v, dict)]:
        # NOTE: Qwen2-VL's vision_config has embed_dim for its heads; its hidden_size is the merger's output
        w = "embed_dim" if "embed_dim" in d else "hidden_size"
        h = "num_heads" if "num_heads" in d else "num_attention_heads"
        width, heads, kv = d.get(w), d.get(h), d.get("num_key_value_heads")
        if not all(isinstance(n, int) and n >= 1 for n in (width, heads)):
            continue  # missing or mistyped: the translation or check_fields names it
        if "head_dim" not in d and width % heads:
            raise ValueError(f"{path}: {where}{w} = {width} does not divide by {h} = {heads}")
        if isinstance(kv, int) and kv >= 1 and heads % kv:
            raise ValueError(f"{path}: {where}num_attention_heads {heads} is not a multiple of {kv} kv heads")


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


def check_fields(cfg, path: Path, where: str = "") -> None:
    """Every field of a typed config (nested dataclasses too) against its annotation: whole numbers >= 1 for
    sizes and counts (token ids >= 0; a feature layer may count from the end), finite positive numbers for
    epsilons, thetas and ratios, booleans, strings; None only where the annotation allows it."""
    hints = typing.get_type_hints(type(cfg), vars(sys.modules[type(cfg).__module__]))
    for f in dataclasses.fields(cfg):
        value, name, kind = getattr(cfg, f.name), where + f.name, hints[f.name]
        if dataclasses.is_dataclass(value):
            check_fields(value, path, name + ".")
            continue
        union = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else ()
        if value is None and type(None) in union:
            continue
        base = next((t for t in (bool, int, float, str) if kind is t or t in union), tuple)
        whole = isinstance(value, int) and not isinstance(value, bool)
        if base is int and name.endswith("_id"):
            ok, expected = whole and value >= 0, "a token id (a whole number >= 0)"
        elif base is int and name.endswith("feature_layer"):
            ok, expected = whole, "a layer index (a whole number)"
        else:  # tuple: image sizes, pinpoints, rope sections, layer types
            ok, expected = {
                bool: (isinstance(value, bool), "true or false"),
                int: (whole and value >= 1, "a whole number >= 1"),
                float: ((whole or isinstance(value, float)) and 0 < value < math.inf, "a finite number > 0"),
                str: (isinstance(value, str), "a string"),
                tuple: (isinstance(value, (tuple, list)) and all_finite(value), "a list of numbers"),
            }[base]
        if not ok:
            raise ValueError(f"{path}: {name} = {value!r}, expected {expected}")


def read_eos_ids(ckpt: Path, config: dict) -> list[int]:
    """EOS ids from generation_config.json when present, else from config.json (flat or text_config)."""
    gen = read_json_if_present(ckpt / "generation_config.json") or {}
    text_eos = config.get("text_config", {}).get("eos_token_id")
    return as_list(gen.get("eos_token_id", config.get("eos_token_id", text_eos)))


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


def load_weights(model, ckpt: Path, rename: Callable, device, dtype, tied: dict | None = None) -> None:
    """Fill a model built on the meta device: read every tensor (mmap), `rename` it (None drops it), check the
    names and shapes strictly, cast floats to `dtype` once, `load_state_dict(assign=True)`. `tied`: a name ->
    the one it shares (lm_head -> embed_tokens). quant.py's layers quantize each weight as it is read."""
    tied = tied or {}
    quantized = {f"{n}.weight": m for n, m in model.named_modules() if hasattr(m, "quantized_state")}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    floating = {k for k, v in model.state_dict().items() if v.is_floating_point()} | set(quantized)
    for k, m in quantized.items():  # the checkpoint holds the float weight that the layer's buffers come from
        for buffer, _ in m.named_buffers():
            expected.pop(k.removesuffix("weight") + buffer)
        expected[k] = torch.Size((m.out_features, m.in_features))
    state, shapes, unexpected = {}, {}, []

    def put(name: str, t: torch.Tensor) -> None:
        shapes[name] = t.shape
        if name in quantized and t.shape == expected[name]:
            layer = quantized[name].quantized_state(t)
            state.update({name.removesuffix("weight") + k: v for k, v in layer.items()})
        else:
            state[name] = t

    for name, t in read_tensors(ckpt, rename, expected, floating, unexpected):
        put(name, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
    for dst, src in tied.items():
        if dst not in shapes and src in state:
            put(dst, state[src])
    check_weight_names(ckpt, expected, shapes, unexpected)
    model.load_state_dict(state, strict=True, assign=True)
    for dst, src in tied.items():  # share one Parameter, so fine-tuning keeps them tied
        if dst not in quantized:  # a quantized output layer keeps its own int8/int4 copy
            *parent, leaf = dst.split(".")
            model.get_submodule(".".join(parent)).register_parameter(leaf, model.get_parameter(src))


def read_tensors(ckpt: Path, rename, expected: dict, floating: set, unexpected: list) -> Iterator:
    """(our name, tensor) for every checkpoint tensor `rename` keeps, file by file; names the model does not
    have are added to `unexpected`. Integer tensors where the model takes floats are refused."""
    by_file: dict[Path, list[str]] = {}
    for name, f in read_safetensors_names(ckpt).items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with open_safetensors(f) as sf:
            for name, new in ((name, rename(name)) for name in names):
                if new is not None and new not in expected:
                    unexpected.append(name if new == name else f"{name} (as {new})")
                if new is None or new not in expected:
                    continue
                try:
                    t = sf.get_tensor(name)
                except Exception as e:  # e.g. an index that names the wrong shard, or a cut shard
                    raise ValueError(f"tensor {name} cannot be read from {f} ({e}): download it again") from e
                if new in floating and not t.is_floating_point():  # e.g. a quantized export
                    kind = str(t.dtype).removeprefix("torch.")
                    raise ValueError(
                        f"tensor {name} in {f} is {kind}, where the model takes float weights: "
                        "load the original checkpoint (quantize it with --quantize / quantize=)"
                    )
                yield new, t


def check_weight_names(ckpt: Path, want: dict, shapes: dict, unexpected: list) -> None:
    """Strict loading: missing, unexpected and wrongly shaped tensors are one error that lists them."""
    missing = sorted(set(want) - set(shapes))
    bad = [f"{k}: checkpoint {tuple(v)} vs model {tuple(want[k])}" for k, v in shapes.items() if v != want[k]]
    if missing or unexpected or bad:
        lines = [f"weights in {ckpt} do not fit the model built from its config.json:"]
        for title, items in (("missing", missing), ("unexpected", sorted(unexpected)), ("wrong shape", bad)):
            if items:
                lines.append(f"  {len(items)} {title}: {', '.join(items[:12])}{' ...' * (len(items) > 12)}")
        raise ValueError("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------
# Generation: the checks at generate()'s door, sampling, the decode loop


@dataclass
class GenerationSettings:
    """Sampling settings, checked when made; `eos_token_ids`: one id or a list ([] never stops early)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name, whole, ok, allowed in (
            ("max_new_tokens", True, lambda v: v >= 1, ">= 1"),
            ("temperature", False, lambda v: v >= 0, ">= 0 (0 = greedy)"),
            ("top_k", True, lambda v: v >= 0, ">= 0 (0 = off)"),
            ("top_p", False, lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
            ("repetition_penalty", False, lambda v: v > 0, "> 0 (1 = off)"),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral if whole else numbers.Real):
                raise ValueError(f"{name} must be {'an integer' if whole else 'a number'}, got {v!r}")
            if not (ok(v) and math.isfinite(v)):
                raise ValueError(
                    f"{name} must be {allowed if math.isfinite(v) else 'a finite number'}, got {v}"
                )
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be a whole number in [0, 2**63), got {self.seed}")
        self.eos_token_ids = as_list(self.eos_token_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.eos_token_ids):
            raise ValueError(f"eos_token_ids must be token ids (whole numbers), got {self.eos_token_ids}")


def check_generate_inputs(input_ids, attention_mask, settings, streamer=None, limit: int | None = None):
    """generate()'s door: input_ids (B, T); attention_mask (ones when None) left-padded, so the new tokens of
    all rows go to one cache slot; a streamer for one row only; room for the new tokens below `limit`."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}: [None] adds the batch")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens: the prompt is empty")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if attention_mask.shape != input_ids.shape:
        shapes = f"{tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        raise ValueError(f"attention_mask {shapes}: pass the processor's output unchanged")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generate() needs left padding: call the processor with padding_side='left'")
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("streaming needs a single prompt (batch of 1)")
    if limit is not None:
        check_context(int(attention_mask.sum(1).max()), settings.max_new_tokens, limit)
    return attention_mask


def check_context(n_positions: int, max_new_tokens: int, limit: int) -> None:
    """The prompt's positions and the new tokens within max_position_embeddings (none was trained longer)."""
    if n_positions + max_new_tokens > limit:
        raise ValueError(
            f"the prompt takes {n_positions} positions and max_new_tokens is {max_new_tokens}: together "
            f"more than this checkpoint's max_position_embeddings ({limit}); use fewer or smaller images or "
            "frames, a shorter prompt or fewer new tokens"
        )


def check_feature_count(what: str, placeholder: str, is_pad: torch.Tensor, need: int, how: str = "") -> None:
    """The prompt holds one `placeholder` token per feature its images (or videos) give."""
    if int(is_pad.sum()) != need:
        raise ValueError(
            f"the prompt has {int(is_pad.sum())} {placeholder} tokens but the {what}s give {need} features"
            f"{f' ({how})' if how else ''}: pass the processor's output unchanged"
        )


def cache_length(T: int, max_new_tokens: int) -> int:
    """Slots a static KV cache needs: the prompt and the new tokens, rounded up to a multiple of 16 (so that
    nearby prompt lengths share one cache, kept between calls)."""
    return -(-(T + max_new_tokens) // 16) * 16


# Sampling: one method for the eager and the compiled decode, with no sort and no host read

TOP_P_CANDIDATES = 1024  # top-p chooses among at most this many of the most likely tokens (or top_k)


def sample(logits, seen=None, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, key=None):
    """logits (B, V) -> one token per row (B,). Repetition penalty on the tokens `seen` (B, V) bool, then
    temperature, top-k and top-p, in that order. Greedy when temperature == 0.
    Without a sort over the vocabulary: top-k keeps the logits >= the k-th largest (torch.topk's pivot); top-p
    keeps the most likely tokens until their probability reaches top_p, looking only at the
    min(top_k or TOP_P_CANDIDATES, V) most likely ones. The draw is argmax(p / E), E ~ Exp(1) per token: the
    first of independent exponential clocks to ring, which picks token j with probability p_j (no
    multinomial, so no host read). The noise comes from `key` (B,) int64, one per row (None: a random one), so
    eager and compiled code draw the same noise. Ties at a pivot are all kept."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        # NOTE: a seen token's logit is divided by the penalty when positive, multiplied when negative.
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    k = top_k if top_k > 0 else (TOP_P_CANDIDATES if top_p < 1.0 else 0)  # the candidates to look at
    k = min(k, logits.shape[-1])
    if k:
        top = torch.topk(logits, k, dim=-1).values  # (B, k), largest first
        kth = top[:, -1:]  # (B, 1)
        if top_p < 1.0:  # probabilities after top-k (over the whole vocabulary without it)
            probs = (top - (top if top_k > 0 else logits).logsumexp(-1, keepdim=True)).exp()  # (B, k)
            before = probs.cumsum(-1) - probs  # the mass of the more likely tokens
            kept = (before < top_p).sum(-1, keepdim=True)  # (B, 1), >= 1: the first is always kept
            kth = top.gather(1, kept - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    key = noise_keys(None, logits.shape[0]).to(logits.device) if key is None else key
    return (logits.softmax(-1) / exponential_noise(key, logits.shape[-1])).argmax(-1)  # (B,)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """An integer mix of the low 32 bits of each int64 value: nearby inputs give unrelated outputs."""
    x = x & 0xFFFFFFFF
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF  # < 2**59: no int64 overflow
    return (x >> 16) ^ x


def exponential_noise(key: torch.Tensor, V: int) -> torch.Tensor:
    """(B,) keys -> (B, V) Exp(1) noise, a function of (key, column) only: integer maths, then -log u with
    u in (0, 1) on a grid of 2**23 steps."""
    x = hash32(hash32(key)[:, None] + torch.arange(V, device=key.device))  # (B, V)
    return -torch.log(((x >> 9).float() + 0.5) / 2**23)  # NOTE: 23 bits, so that float32 keeps u below 1


def noise_keys(seed: int | None, B: int) -> torch.Tensor:
    """The rows' first noise keys (B,): from `seed`, or from torch's random generator (torch.manual_seed)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    return hash32(torch.tensor(seed ^ (seed >> 32)) + hash32(torch.arange(B) + 1))  # (B,)


# The decode loop: the state its steps share, one token per step, in one compiled function


@dataclass(eq=False)
class Decoding:
    """The tensors every decode step reads and writes, in place: the static KV caches and the sampling state.
    A model keeps its last Decoding between generate() calls and reuses it when the batch size and cache
    length match (`decoding`), so the tensors keep their storage: a CUDA graph replays on them as they are.

        slot s:      0 .. T-1 the prompt (left-padded)   T, T+1, ... the new tokens, one per step
        keep[b, s]:  the slot holds a real token of row b or will (False on padding)
        tokens[b, s]: the token sampled for slot s (the prompt's slots stay 0)
    """

    caches: list  # one static cache per decoder layer
    keep: torch.Tensor  # (B, S) bool
    tokens: torch.Tensor  # (B, S) long
    token: torch.Tensor  # (B, 1): the last token sampled, the next step's input
    pos: torch.Tensor  # (B, 1): its position
    slot: torch.Tensor  # (1,): its slot
    finished: torch.Tensor  # (B,) bool: the rows that sampled an EOS
    key: torch.Tensor  # (B,) long: each row's noise key, mixed again after every token
    seen: torch.Tensor | None = None  # (B, V) bool, for the repetition penalty: the tokens each row holds
    first: int = 0  # the slot of the first new token

    def begin(self, last_slot: int, last_pos: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """The prompt is in the caches up to `last_slot`; `last_pos` (B,) the position of each row's last
        prompt token; `keep` (B, T) its non-padding tokens (None: no padding)."""
        self.slot.fill_(last_slot)
        self.pos.copy_(last_pos.view(-1, 1))
        self.keep.fill_(True)
        if keep is not None:
            self.keep[:, : keep.shape[1]] = keep
        self.tokens.zero_()
        self.finished.zero_()
        self.first = last_slot + 1


def kept_decoding(model: torch.nn.Module, B: int, S: int, like: torch.Tensor, new_caches: Callable[[], list]):
    """The model's kept Decoding if it has B rows, S slots and caches in the device and dtype of `like` (its
    caches zeroed), else a new one from `new_caches()`, kept (`del model._decoding` frees it).
    NOTE: kept only at the same S, so that a call's numbers never depend on the calls before it."""
    d = model.__dict__.get("_decoding")
    k = None if d is None else d.caches[0].k
    if k is not None and d.keep.shape == (B, S) and (k.device, k.dtype) == (like.device, like.dtype):
        for cache in d.caches:
            cache.k.zero_()
            cache.v.zero_()
        return d
    model.__dict__.pop("_decoding", None)  # its memory goes before the new one is taken
    model.__dict__["_decoding"] = d = new_decoding(new_caches(), B, S)
    return d


def new_decoding(caches: list, B: int, S: int) -> Decoding:
    """A Decoding around static caches of B rows and S slots, its other tensors on the caches' device."""

    def zeros(*size, dtype=torch.long):
        return torch.zeros(*size, dtype=dtype, device=caches[0].k.device)

    flags = dict(dtype=torch.bool)
    d = Decoding(caches, keep=zeros(B, S, **flags), tokens=zeros(B, S), token=zeros(B, 1), pos=zeros(B, 1),
                 slot=zeros(1), finished=zeros(B, **flags), key=zeros(B))  # fmt: skip
    mark_for_compile(d)
    return d


def mark_for_compile(d: Decoding) -> None:
    """Tell torch.compile that the tensors stay where they are (a CUDA graph reads them in place) and that the
    batch and cache-length dimensions vary (one compiled step for all of them)."""
    tensors = [d.keep, d.tokens, d.token, d.pos, d.finished, d.key, d.slot]
    tensors += [t for c in d.caches for t in (c.k, c.v)] + ([] if d.seen is None else [d.seen])
    for t in tensors:
        torch._dynamo.mark_static_address(t)
        if t is not d.slot:
            torch._dynamo.mark_dynamic(t, 0)  # B
    for t in (d.keep, d.tokens):
        torch._dynamo.mark_dynamic(t, 1)  # S: (B, S)
    for t in [t for c in d.caches for t in (c.k, c.v)]:
        torch._dynamo.mark_dynamic(t, 2)  # S: (B, Hkv, S, Dh)


def choose(d: Decoding, logits: torch.Tensor, s: GenerationSettings, pad_id: int, eos: torch.Tensor) -> None:
    """Sample the next token of every row from its logits (B, V) and write it down: in `tokens` at the next
    slot, as the next step's input, in `seen`; a row that has finished gets pad_id; the next noise key."""
    token = sample(logits, d.seen, s.temperature, s.top_k, s.top_p, s.repetition_penalty, d.key)
    token = torch.where(d.finished, pad_id, token)  # (B,)
    d.slot.add_(1)
    d.pos.add_(1)
    d.tokens.index_copy_(1, d.slot, token[:, None])
    d.token.copy_(token[:, None])
    if len(eos):
        d.finished.logical_or_(torch.isin(token, eos))
    if d.seen is not None:
        d.seen.scatter_(1, token[:, None], True)
    d.key.copy_(hash32(d.key + 1))


def next_token(decode_step: Callable, d: Decoding, s: GenerationSettings, pad_id: int, eos: torch.Tensor):
    """One decode step and its sampling: the last token goes through the decoder (into the caches at its
    slot), and the next one is chosen. Everything in place, nothing read on the host: what
    generate(compile=True) compiles whole."""
    choose(d, decode_step(d.token, d.pos, d.slot, d.keep, d.caches), s, pad_id, eos)


def compiled_next_token(model: torch.nn.Module) -> Callable:
    """`torch.compile` of next_token, once per model, as one graph (fullgraph): CUDA graphs on CUDA, inductor
    on the CPU. The batch and cache-length dimensions are symbolic (mark_for_compile), so another prompt
    length or batch size runs compiled code already made (on CUDA, a new shape records a new CUDA graph).
    NOTE: torch compiles a batch of 1 apart (it specializes sizes of 1), so batch sizes 1 -> 2 -> 1 compile
    twice, then never again; a new sampling setting (temperature, top_k, top_p, repetition_penalty) also
    compiles once more."""
    if "_compiled_next_token" not in model.__dict__:
        # NOTE: every model and setting compiles the one code object of next_token (torch keeps 8 by default)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        mode = "reduce-overhead" if next(model.parameters()).device.type == "cuda" else None
        model.__dict__["_compiled_next_token"] = torch.compile(next_token, mode=mode, fullgraph=True)
    return model.__dict__["_compiled_next_token"]


def decode_loop(
    model, first_logits, d: Decoding, settings, prompt_ids, prompt_mask, streamer=None, compile=False
):
    """The decode loop every model shares: sample a token per row, stop rows at EOS, feed the tokens back.
    first_logits (B, V) are the prefill's logits at each row's last prompt token; `d` holds the caches and
    where the prompt ends (Decoding.begin); prompt_ids/prompt_mask (B, T) feed the repetition penalty.
    Returns the new tokens (B, N), rows that finished early padded with model.pad_token_id.
    Host reads: with a streamer, one per token, one step late (the step after it is launched first; the first
    token at once); without one, an all-finished check every 8 steps, and only when there are EOS ids."""
    check_finite(first_logits)
    s, V, device = settings, first_logits.shape[-1], first_logits.device
    eos = torch.tensor(s.eos_token_ids, dtype=torch.long, device=device)
    start_sampling(d, s, prompt_ids, prompt_mask, V)
    pad_id = model.pad_token_id
    choose(d, first_logits, s, pad_id, eos)  # the first new token, from the prefill
    step = compiled_next_token(model) if compile else next_token
    read = None if streamer is None else LateRead(d.tokens)
    stream = None if streamer is None else TextStream(streamer, model.tokenizer)

    def show(token_id: int) -> bool:  # False at EOS
        if token_id in s.eos_token_ids:
            return False
        stream(token_id)
        return True

    # With a streamer: token 0 is shown at once (nothing is queued behind it); then, for n = 2, 3, ..., token
    # n-1 is copied, step n is launched, and token n-1 is shown while step n runs; token N-1 after the loop.
    n, done = 1, False  # tokens sampled; an EOS shown or every row finished
    if read is not None:
        read.ask(d.first)
        done = not show(read.get())
    while n < s.max_new_tokens and not done:
        if read is not None and n > 1:
            read.ask(d.first + n - 1)  # token n-1, copied while step n runs
        step(model.decode_step, d, s, pad_id, eos)
        n += 1
        if read is not None and n > 2:
            done = not show(read.get())
        elif read is None and len(eos) and n % 8 == 0:
            done = bool(d.finished.all())
    if read is not None and not done and n > 1:  # the last token
        read.ask(d.first + n - 1)
        show(read.get())
    if stream is not None:
        stream.flush()
    return trim_finished(d.tokens[:, d.first : d.first + n].clone(), eos)


def start_sampling(d: Decoding, s: GenerationSettings, prompt_ids, prompt_mask, V: int) -> None:
    """The rows' first noise keys, and for the repetition penalty the prompt's tokens in `seen` (kept with the
    rest of the Decoding while its shape fits)."""
    B, device = d.key.shape[0], d.key.device
    d.key.copy_(noise_keys(s.seed, B))
    if s.repetition_penalty == 1.0:
        d.seen = None
        return
    if d.seen is None or d.seen.shape != (B, V):
        d.seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        mark_for_compile(d)
    d.seen.copy_(tokens_seen(prompt_ids.to(device), prompt_mask, V))


class LateRead:
    """A token read one step late: `ask` copies it to the host without waiting (on CUDA: into pinned memory,
    then an event), the next step is launched, and `get` waits only for the copy. So the GPU has the next
    step queued while the host prints the last token."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, cuda = tokens, tokens.device.type == "cuda"
        self.host = torch.zeros(1, dtype=torch.long, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None

    def ask(self, slot: int) -> None:
        self.host.copy_(self.tokens[0, slot : slot + 1], non_blocking=self.event is not None)
        if self.event is not None:
            self.event.record()

    def get(self) -> int:
        if self.event is not None:
            self.event.synchronize()
        return int(self.host[0])


def check_finite(logits: torch.Tensor) -> None:
    """NaN/inf logits after the prefill: float16 overflows in these models; in another dtype the weights hold
    NaN/inf."""
    if not bool(torch.isfinite(logits).all()):
        name = str(logits.dtype).removeprefix("torch.")
        why = (
            " (it overflows): use bfloat16"
            if name == "float16"
            else ": the checkpoint's weights hold NaN/inf"
        )
        raise ValueError(f"the prefill produced NaN/inf logits in {name}{why}")


def tokens_seen(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, V: int) -> torch.Tensor:
    """(B, V) bool: the tokens each row's prompt holds (padding left out), for the repetition penalty."""
    seen = torch.zeros(prompt_ids.shape[0], V, dtype=torch.bool, device=prompt_ids.device)
    return seen.scatter_(1, prompt_ids.clamp(0, V - 1), prompt_mask.to(seen.device).bool())


class TextStream:
    """Token ids -> text for a `streamer` callable in whole UTF-8 characters; `flush` sends what is left."""

    def __init__(self, streamer: Callable[[str], None], tokenizer: Tokenizer):
        from tokenizers.decoders import DecodeStream

        if tokenizer is None:
            raise ValueError(
                "streaming needs the model's tokenizer: load the model with load(), which sets it"
            )
        self.streamer, self.tokenizer, self.ids, self.shown = streamer, tokenizer, [], []
        self.state = DecodeStream(skip_special_tokens=True)

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        self.shown.append(self.state.step(self.tokenizer.tok, token_id) or "")
        self.streamer(self.shown[-1])

    def flush(self) -> None:
        full, shown = self.tokenizer.decode(self.ids), "".join(self.shown)
        if full.startswith(shown) and len(full) > len(shown):
            self.streamer(full[len(shown) :])


def trim_finished(out: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """The new tokens (B, N) without the columns after all rows had finished (the loop looks each 8 steps)."""
    N = out.shape[1]
    done_at = torch.where(torch.isin(out, eos), torch.arange(N, device=out.device), N).min(dim=1).values
    return out[:, : int(done_at.max()) + 1] if len(eos) and bool((done_at < N).all()) else out


# ----------------------------------------------------------------------------------------------------------
# A conversation that continues on the cache its earlier turns left


@dataclass
class Past:
    """What a conversation keeps between turns: one static cache per decoder layer, how many of its slots
    hold the conversation's tokens, and how far positions run behind slots (Qwen2-VL's rope_delta; 0 in the
    models whose position is the slot)."""

    caches: list = field(default_factory=list)
    length: int = 0
    delta: int = 0
    decoding: Decoding | None = None  # the decode state on these caches, kept with them

    def room(self, need: int, new_caches: Callable[[int], list]) -> Decoding:
        """The Decoding on the caches, with at least `need` slots. NOTE: when they are too short, new ones of
        twice the length (at least `need`, rounded up to 256) take over the filled slots: a long chat copies
        O(log n) times."""
        have = self.caches[0].k.shape[2] if self.caches else 0
        if need > have:
            grown = new_caches(max(2 * have, -(-need // 256) * 256))
            for old, new in zip(self.caches, grown):  # (1, Hkv, S, Dh): the filled slots only
                new.k[:, :, : self.length] = old.k[:, :, : self.length]
                new.v[:, :, : self.length] = old.v[:, :, : self.length]
            self.caches, self.decoding = grown, None
        if self.decoding is None:
            self.decoding = new_decoding(self.caches, 1, self.caches[0].k.shape[2])
        return self.decoding


class Chat:
    """A conversation with Qwen2-VL, LLaVA-OneVision, Video-LLaVA or PerceptionLM that never computes a token
    twice. Between turns the static cache holds the keys and values of every token so far: the system prompt,
    each user turn with its image or video features, each answer as it was generated. A turn renders only its
    new text with the chat template (what the template puts after the last answer, the user turn, the
    generation prompt), prefills those tokens at the next free slot (`model.extend`) and decodes; the vision
    tower runs only on the turn's new media. `input_ids` (1, T) is the conversation's tokens; `messages` its
    chat messages, answers as text. (PaliGemma is no chat model: see paligemma.Chat.)"""

    STAND_IN = "\x00answer\x00"  # the last answer, when the template renders what follows it

    def __init__(self, model, processor, system: str | None = None):
        self.model, self.processor, self.system = model, processor, system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; the caches stay allocated for the next one."""
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.input_ids = torch.zeros(1, 0, dtype=torch.long)
        self.past = Past(self.past.caches, decoding=self.past.decoding) if hasattr(self, "past") else Past()

    @torch.inference_mode()
    def ask(self, text: str, images=(), videos=(), streamer=None, **settings) -> str:
        """The answer to `text` about the new `images`/`videos` (added to the conversation). `settings`: the
        sampling arguments of generate() (max_new_tokens, temperature, ..., seed, eos_token_ids)."""
        images, videos = as_list(images), as_list(videos)
        if settings.get("eos_token_ids") is None:  # as in generate(): the checkpoint's
            settings["eos_token_ids"] = self.model.eos_token_ids
        s = GenerationSettings(**settings)
        items = [{"type": "image", "image": x} for x in images]
        items += [{"type": "video", "video": x} for x in videos]
        user = {"role": "user", "content": items + [{"type": "text", "text": text}]}
        inputs = self.processor(self.new_text(user), images=images or None, videos=videos or None)
        new, device = inputs.pop("input_ids"), next(self.model.parameters()).device
        if self.input_ids.shape[1] and int(new[0, 0]) == getattr(self.processor, "bos_token_id", None):
            new = new[:, 1:]  # a processor that starts every prompt with BOS (Video-LLaVA's): not mid-chat
        media = {
            k: v.to(device) for k, v in inputs.items() if k not in ("attention_mask", "mm_token_type_ids")
        }
        prompt = torch.cat([self.input_ids, new], 1)  # (1, T): the conversation, then this turn
        chunk = prompt[:, self.past.length :].to(device)  # what the cache lacks: the last answer's last token
        delta = self.past.delta
        try:
            first, d = self.model.extend(chunk, media, self.past, s.max_new_tokens)
            out = decode_loop(self.model, first, d, s, prompt, torch.ones_like(prompt), streamer)[0].cpu()
        except BaseException:  # refused or interrupted (Ctrl-C): the conversation stays as it was
            self.past.delta = delta
            raise
        fed = int(d.slot) - d.first  # decode steps run: the answer's tokens now in the cache
        if len(out) and int(out[-1]) in s.eos_token_ids:
            out = out[:-1]  # the template's own end of turn comes with the next turn's text
        self.input_ids = torch.cat([prompt, out[None]], 1)
        self.past.length = prompt.shape[1] + min(fed, len(out))
        self.messages += [user, {"role": "assistant", "content": self.processor.decode(out)}]
        return self.messages[-1]["content"]

    def new_text(self, user: dict) -> str:
        """This turn's text: all of it in the first turn; later, what the template writes after the last
        answer (rendered with a stand-in for it, so the answer is never re-tokenized), the user turn and the
        generation prompt."""
        template = self.processor.apply_chat_template
        if not any(m["role"] == "assistant" for m in self.messages):
            return template(self.messages + [user])
        said = self.messages[:-1] + [{"role": "assistant", "content": self.STAND_IN}, user]
        return template(said).split(self.STAND_IN)[1]
