"""PaliGemma 1 and 2 in one file: preprocessing, SigLIP vision tower, linear projector, Gemma / Gemma2
decoder with a prefix-LM mask, generation, detection boxes.

What is special about this model:
- One fixed square input: the image is resized to 224, 448 or 896 px without keeping its aspect ratio, cut
  into 14x14 patches, and every patch becomes one language-model token (256, 1024 or 4096): no merging.
- SigLIP-So400m vision tower: learned absolute position embeddings, no class token, tanh-GELU, features taken
  after the final LayerNorm; a single Linear projects them to the decoder width.
- Prefix-LM attention: the image tokens, <bos>, the task prefix and its "\\n" all see each other (both
  directions); only the answer (the suffix, and every generated token) is causal. See `prefix_lm_mask`.
- Gemma decoder: (1 + w) RMSNorm computed in float32, text embeddings scaled by sqrt(D) (image features are
  not), GeGLU MLP, positions that start at 1, multi-query attention.
- PaliGemma 2 swaps Gemma for Gemma2: norms before and after attention and MLP, attention scale from
  `query_pre_attn_scalar`, tanh soft-caps on attention scores and on the final logits, and a sliding window
  on every other layer. Each difference is one labelled branch (`cfg.is_gemma2`), not a second decoder.
- No chat template: prompts are task prefixes ("caption en", "answer en <question>", "detect cat", "ocr").
  Detection answers are <locYYYY> tokens: `parse_boxes` turns them into pixel boxes.

Shape legend: B batch, T tokens in this call, S key length (cache + T), D model width, H query heads, Hkv kv
heads, Dh head dim, N vision patches, Dv vision width, V vocabulary.

Worked example (paligemma-3b-mix-224): a 480x640 photo -> resized to 224x224 -> (1, 3, 224, 224) -> 16x16 =
256 patches of width 1152 -> 27 SigLIP layers -> Linear -> (1, 256, 2048), written over the 256 <image> tokens
of "<image>" * 256 + "<bos>caption en\\n". Positions run 1..260; the answer starts at position 261.

Where things are (section: what to read first):
  1 config: PaliGemmaConfig                  2 pixel maths: resize_and_normalize (a square, no tiles)
  3 vision tower: SiglipVisionTower          4 projector: Projector
  5 decoder: rope_cos_sin, attend (soft-cap), Attention, DecoderLayer (Gemma / Gemma2 branches)
  6 the VLM: prefix_lm_mask, PaliGemma.embed / forward (loss) / prefill / decode_step / generate
  7 the processor: build_prompt, Processor, parse_boxes    8 weights: config_from_hf, rename, load
  9 command line: STAGES (for --explain), main (cli.py)

Papers: "PaliGemma: A versatile 3B VLM for transfer" (arXiv 2407.07726), "PaliGemma 2" (arXiv 2412.03555).
Matches transformers 5.23 `models/paligemma/` with `siglip/`, `gemma/` and `gemma2/`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ==========================================================================================================
# 1. Config
# ==========================================================================================================

DEFAULT = "google/paligemma-3b-mix-224"
PRESETS = {
    f"{gen}-{kind}-{px}": f"google/{gen}-{kind}-{px}"
    for gen, kinds, sizes in (
        ("paligemma-3b", ("pt", "mix"), (224, 448, 896)),
        ("paligemma2-3b", ("pt", "mix"), (224, 448, 896)),
        ("paligemma2-10b", ("pt", "mix"), (224, 448, 896)),
        ("paligemma2-28b", ("pt", "mix"), (224, 448, 896)),
    )
    for kind in kinds
    for px in sizes
    if not (kind == "mix" and px == 896)  # the mix checkpoints come at 224 and 448 only
}


@dataclass(frozen=True)
class VisionConfig:  # SigLIP-So400m/14
    hidden_size: int = 1152  # Dv
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6


@dataclass(frozen=True)
class TextConfig:  # Gemma 2B (PaliGemma 1); PaliGemma 2 fills in the Gemma2 fields
    model_type: str = "gemma"  # "gemma2" turns on the Gemma2 branches
    vocab_size: int = 257216
    hidden_size: int = 2048  # D
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8  # H
    num_key_value_heads: int = 1  # Hkv
    head_dim: int = 256  # Dh (not D / H in general)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    # Gemma2 only (None or empty for Gemma):
    query_pre_attn_scalar: float | None = None  # attention scale = its -1/2 power (Gemma: head_dim ** -0.5)
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap), before the mask
    final_logit_softcapping: float | None = None  # the same on the output logits
    sliding_window: int | None = None  # a token sees itself and the window - 1 tokens before it
    layer_types: tuple[str, ...] = ()  # "sliding_attention" or "full_attention" per layer

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @property
    def window(self) -> int | None:
        """The sliding window when some layer slides (Gemma2's even layers), else None."""
        return self.sliding_window if "sliding_attention" in self.layer_types else None


@dataclass(frozen=True)
class PaliGemmaConfig:
    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 257152  # <image>


# ==========================================================================================================
# 2. Pixel maths: one square image
# ==========================================================================================================

RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's numbers, as preprocessor_config.json stores them


@dataclass(frozen=True)
class ImageInputConfig:
    image_size: int = 224
    image_seq_length: int = 256  # <image> tokens per image = (image_size / 14) ** 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: str = "bicubic"

    @staticmethod
    def from_hf(d: dict) -> ImageInputConfig:
        size = d.get("size") or {}
        if d.get("resample", 3) not in RESAMPLE:
            raise ValueError(f"resample={d['resample']} in the processor config: only 2 and 3 are supported")
        return ImageInputConfig(
            image_size=size.get("height", 224),
            image_seq_length=d.get("image_seq_length", (size.get("height", 224) // 14) ** 2),
            image_mean=tuple(d.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(d.get("image_std", (0.5, 0.5, 0.5))),
            resample=RESAMPLE[d.get("resample", 3)],
        )


def resize_and_normalize(image, cfg: ImageInputConfig) -> torch.Tensor:
    """An image -> (3, S, S) float32 in [-1, 1]. The aspect ratio is NOT kept (nor is anything cropped).
    NOTE: the reference resizes the uint8 tensor with torchvision (antialiased, rounded back to uint8), which
    is torch's own uint8 interpolate below; then (x - 255 mean) / (255 std) in float32."""
    x = common.image_to_uint8(image)[None]  # (1, 3, H, W) uint8
    S = cfg.image_size
    x = F.interpolate(x, size=(S, S), mode=cfg.resample, antialias=True, align_corners=False)  # (1, 3, S, S)
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1) * 255.0  # (3, 1, 1)
    std = torch.tensor(cfg.image_std).view(3, 1, 1) * 255.0  # (3, 1, 1)
    return (x[0].float() - mean) / std  # (3, S, S) float32


# ==========================================================================================================
# 3. Vision tower (SigLIP)
# ==========================================================================================================


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        P, G = cfg.patch_size, cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=P, stride=P)
        # Learned positions, one per patch (no class slot).
        self.position_embedding = nn.Embedding(G * G, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, N, Dv)
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, Dv), patches row by row
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        Dv = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(Dv, Dv), nn.Linear(Dv, Dv), nn.Linear(Dv, Dv)
        self.out_proj = nn.Linear(Dv, Dv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, Dv = x.shape
        H = self.n_head
        q = self.q_proj(x).view(B, N, H, -1).transpose(1, 2)  # (B, H, N, Dh)
        k = self.k_proj(x).view(B, N, H, -1).transpose(1, 2)  # (B, H, N, Dh)
        v = self.v_proj(x).view(B, N, H, -1).transpose(1, 2)  # (B, H, N, Dh)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh): every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, N, Dv))  # (B, N, Dv)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        # `encoder.layers.{i}` as in the checkpoint (the encoder holds nothing but its layers)
        layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.encoder = nn.ModuleDict({"layers": layers})
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.image_size = cfg.image_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (n, 3, S, S) -> (n, N, Dv)
        S = self.image_size
        assert pixels.shape[-2:] == (S, S), f"pixel_values must be {S}x{S} (the processor resizes to it)"
        x = self.embeddings(pixels)
        for layer in self.encoder["layers"]:
            x = layer(x)
        return self.post_layernorm(x)  # NOTE: features after the final LayerNorm (LLaVA-OneVision differs)


# ==========================================================================================================
# 4. Projector
# ==========================================================================================================


class Projector(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.vision_config.hidden_size, cfg.text_config.hidden_size)  # no activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, Dv) -> (B, N, D)
        return self.linear(x)


# ==========================================================================================================
# 5. Language decoder (Gemma; Gemma2 branches for PaliGemma 2)
# ==========================================================================================================


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: scale by (1 + w), everything in float32, cast at the end.
    NOTE: the opposite order to Llama/Qwen (cast first, then multiply by w); the weights are stored near 0."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # each (..., Dh/2)
    return torch.cat((-x2, x1), dim=-1)  # (..., Dh)


def rope_cos_sin(pos: torch.Tensor, cfg: TextConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (B, T) -> cos, sin (B, T, Dh): angles in float32, then cast to the model dtype."""
    Dh = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.float, device=pos.device) / Dh)
    angles = pos[..., None].float() * inv_freq  # (B, T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, Dh)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def attend(q, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """Grouped-query attention without copying the cache. q (B, H, T, Dh), k/v (B, Hkv, S, Dh), mask (B, 1, T,
    S) bool, or additive (0 / -inf) as a decode step makes it. Query heads h = j*G .. j*G+G-1 share kv head j,
    so the G heads of a group are folded into the query length:

        q (B, H, T, Dh) -> (B, Hkv, G*T, Dh)      rows g*T + t  <->  head j*G + g, token t
        mask (B, 1, T, S) -> (B, 1, G*T, S)       the same T rows repeated G times (T = 1: broadcast)

    Gemma: one fused SDPA call. Gemma2 soft-caps the scores (cap * tanh(s / cap)) BEFORE the mask, which no
    SDPA kernel can do, so only then the same maths is written out (softmax in float32, as the reference).
    mask=None means every query sees every key (an unpadded prompt that is all prefix, or a decode step that
    sees every filled slot): Gemma then runs SDPA with no mask at all, which shares the kv heads itself."""
    B, H, T, Dh = q.shape
    if mask is None and softcap is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    G = H // k.shape[1]
    q = q.reshape(B, -1, G * T, Dh)  # (B, Hkv, G*T, Dh): the G query heads of a kv head, one after another
    mask = mask if mask is None or T == 1 else mask.repeat(1, 1, G, 1)  # (B, 1, G*T, S); T = 1: broadcast
    if softcap is None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        scores = (q @ k.transpose(-1, -2)) * scale  # (B, Hkv, G*T, S)
        scores = softcap * torch.tanh(scores / softcap)
        if mask is not None:  # bool, or additive (0 / -inf) as a decode step makes it
            scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
        y = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
    return y.view(B, H, T, Dh)  # (B, H, T, Dh): the groups unfolded back into heads


class KVCache(nn.Module):
    """Static cache of one layer: (B, Hkv, S_max, Dh) buffers written in place at the given slot.
    Sliding-window layers keep every slot too; their mask hides what lies outside the window."""

    def __init__(self, B: int, Hkv: int, S_max: int, Dh: int, device, dtype):
        super().__init__()
        self.k = torch.zeros(B, Hkv, S_max, Dh, device=device, dtype=dtype)
        self.v = torch.zeros(B, Hkv, S_max, Dh, device=device, dtype=dtype)

    def update(self, slot, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill: `slot` is an int and the T new keys fill slots slot .. slot+T-1; only the filled slots
        are returned. Decode: `slot` is a (1,) tensor, one key is written there and the whole buffer is
        returned, so every step has the same shapes (the mask hides the slots not filled yet)."""
        if isinstance(slot, int):
            T = k.shape[2]
            self.k[:, :, slot : slot + T] = k
            self.v[:, :, slot : slot + T] = v
            return self.k[:, :, : slot + T], self.v[:, :, : slot + T]
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        return self.k, self.v  # (B, Hkv, S_max, Dh)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.Hkv, self.Dh = H, Hkv, Dh
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        self.scale = (cfg.query_pre_attn_scalar or Dh) ** -0.5  # Gemma2: query_pre_attn_scalar, not Dh
        self.softcap = cfg.attn_logit_softcapping  # Gemma2 only
        self.slides = bool(cfg.layer_types) and cfg.layer_types[layer_idx] == "sliding_attention"

    def forward(self, x, cos, sin, mask, window_mask, cache: KVCache | None = None, slot=0):
        """mask (B, 1, T, S); window_mask: the same within the sliding window, used if this layer slides."""
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.Hkv, self.Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.Hkv, self.Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, Dh): the same angle for every head
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(slot, k, v)  # (B, Hkv, S, Dh)
        y = attend(q, k, v, window_mask if self.slides else mask, self.scale, self.softcap)  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.Dh))  # (B, T, H*Dh) -> (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # GeGLU with the tanh GELU
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.mlp = MLP(cfg)
        self.gemma2 = cfg.is_gemma2
        if self.gemma2:  # Gemma2: "sandwich" norms, a second pair around the MLP
            self.pre_feedforward_layernorm = RMSNorm(D, eps)
            self.post_feedforward_layernorm = RMSNorm(D, eps)

    def forward(self, x, cos, sin, mask, window_mask, cache=None, slot=0):
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, window_mask, cache, slot)
        if self.gemma2:  # norm the attention output, then add; the same around the MLP
            x = x + self.post_attention_layernorm(a)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + a  # Gemma: plain pre-norm; here post_attention_layernorm is the norm before the MLP
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # NOTE: Gemma scales text embeddings by sqrt(D), rounded to the weight dtype (bf16: 45.25 for 2048).
        w = self.embed_tokens.weight
        return self.embed_tokens(ids) * torch.tensor(
            self.cfg.hidden_size**0.5, dtype=w.dtype, device=w.device
        )

    def new_caches(self, B: int, S_max: int, like: torch.Tensor) -> list[KVCache]:
        """One empty static cache per layer, (B, Hkv, S_max, Dh), on the device and in the dtype of `like`."""
        Hkv, Dh = self.cfg.num_key_value_heads, self.cfg.head_dim
        return [KVCache(B, Hkv, S_max, Dh, like.device, like.dtype) for _ in self.layers]

    def forward(self, x, pos, masks, caches: list[KVCache] | None = None, slot=0) -> torch.Tensor:
        """x (B, T, D) embeddings, pos (B, T), masks (mask, window_mask) of (B, 1, T, S) -> (B, T, D)"""
        cos, sin = rope_cos_sin(pos.to(x.device), self.cfg, x.dtype)  # once for all layers, on x's device
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, *masks, None if caches is None else caches[i], slot)
        return self.norm(x)


# ==========================================================================================================
# 6. The VLM: merge image features, positions, the prefix-LM mask, forward, generate
# ==========================================================================================================


def in_window(t: torch.Tensor, s: torch.Tensor, window: int) -> torch.Tensor:
    """Gemma2's sliding window: key slot s is one of the last `window` slots up to query slot t (its own
    included). t (T, 1) or (1,), s (S,) -> bool, broadcast."""
    return s > t - window


def prefix_lm_mask(keep, prefix, T: int, offset: int = 0, window: int | None = None) -> torch.Tensor:
    """keep (B, S) bool real (non-padding) keys, prefix (B, S) bool tokens of the prefix block -> (B, 1, T, S)
    bool, query t at slot offset + t. Causal, OR both tokens in the prefix; padding keys are never seen.

        keys:    p  I  I  B  c  \\n a  b      (p pad, I image, B <bos>, c task prefix, a b the answer)
        query I  .  x  x  x  x  x  .  .      x = may attend
        query c  .  x  x  x  x  x  .  .      the prefix block sees itself in both directions,
        query a  .  x  x  x  x  x  x  .      the answer is causal and sees the whole prefix
        query b  .  x  x  x  x  x  x  x

    With a sliding window (Gemma2's even layers), the causal part keeps only the last `window` keys (the
    query's own included), so there the answer sees only the end of the prefix; the prefix block itself stays
    bidirectional whatever the distance, as in the reference.
    A padding query always sees at least itself, so no row is empty (SDPA would return NaN); its output is
    unused."""
    S = keep.shape[1]
    s = torch.arange(S, device=keep.device)
    t = torch.arange(offset, offset + T, device=keep.device)[:, None]  # (T, 1): each query's own slot
    causal = s <= t  # (T, S)
    if window is not None:
        causal = causal & in_window(t, s, window)
    both_prefix = prefix[:, offset : offset + T, None] & prefix[:, None, :]  # (B, T, S)
    return (((causal | both_prefix) & keep[:, None, :]) | (s == t))[:, None]  # (B, 1, T, S)


class PaliGemma(nn.Module):
    quantized_parts = ("language_model", "lm_head")  # what quant.quantize may store in 8 or 4 bits

    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SiglipVisionTower(cfg.vision_config)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = GemmaModel(cfg.text_config)
        tc = cfg.text_config
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        self.lm_head.weight = self.language_model.embed_tokens.weight  # always tied in PaliGemma
        self.eos_token_ids: list[int] = []  # set by load() from generation_config.json
        self.pad_token_id = 0
        self.tokenizer: common.Tokenizer | None = None

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (n, 3, S, S) -> (n, N, D)
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, input_ids, pixel_values=None, image_features=None) -> torch.Tensor:
        """Scaled text embeddings with the (unscaled) image features written over the <image> tokens; the
        features of `pixel_values`, or the `image_features` kept from an earlier call (see Chat)."""
        is_image = input_ids == self.cfg.image_token_id
        x = self.language_model.embed(input_ids.masked_fill(is_image, 0))  # (B, T, D)
        vc, feats = self.cfg.vision_config, image_features
        n = 0 if pixel_values is None else pixel_values.shape[0] * (vc.image_size // vc.patch_size) ** 2
        common.check_feature_count(
            "image", "<image>", is_image, n if feats is None else feats.shape[:2].numel()
        )
        if feats is None and pixel_values is not None:
            feats = self.image_features(pixel_values.to(x.dtype))  # (n_img, N, D)
        if feats is not None:  # NOTE: no sqrt(D) on image features
            x = x.masked_scatter(is_image[..., None], feats.to(x.dtype))
        return x

    def masks(self, keep, prefix, T: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A prompt's (mask, window_mask), (B, 1, T, S) each: the prefix-LM mask, and the same within the
        sliding window for the layers that slide (None when none does). Both None when every token sees every
        other (no padding, no suffix): attention then runs without a mask."""
        if bool(keep.all()) and bool(prefix.all()):
            return None, None
        w = self.cfg.text_config.window
        window_mask = None if w is None else prefix_lm_mask(keep, prefix, T, window=w)
        return prefix_lm_mask(keep, prefix, T), window_mask

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        cap = self.cfg.text_config.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)  # Gemma2: final soft-cap

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, pixel_values=None, labels=None):
        """The full forward pass without a cache: logits (B, T, V); with `labels`, (loss, logits) where the
        loss is the mean next-token cross-entropy over the labels that are not -100. Differentiable.
        NOTE: positions count real tokens from 1 (padding-aware, as transformers' generate does; its
        cache-less forward instead numbers padded rows from the first column). Without token_type_ids the
        whole prompt is the prefix block.
        Inputs, as the processor returns them: input_ids, attention_mask, token_type_ids, labels (B, T);
        pixel_values (n_images, 3, S, S), S = 224, 448 or 896."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        keep = attention_mask.bool()
        x = self.embed(input_ids, pixel_values)
        pos = attention_mask.long().cumsum(-1)  # NOTE: 1-based: the first real token is at position 1
        h = self.language_model(x, pos, self.masks(keep, token_type_ids == 0, input_ids.shape[1]))
        logits = self.logits(h)
        if labels is None:
            return logits
        V = logits.shape[-1]
        # Position t predicts token t + 1: logits (B, T-1, V) against labels (B, T-1), both flattened.
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        return loss, logits

    def prefill(self, x, pos, masks, caches: list[KVCache]) -> torch.Tensor:
        """The whole prompt at once: embeddings x (B, T, D) with their positions and mask, written into the
        empty caches (slots 0 .. T-1) -> the logits of each row's last token (B, V); left padding puts every
        row's last token at T-1."""
        h = self.language_model(x, pos, masks, caches, 0)
        return self.logits(h[:, -1])  # (B, V)

    def decode_step(self, token, pos, slot, keep, caches: list[KVCache]) -> torch.Tensor:
        """One new token per row, with the same shapes at every step: token (B, 1), its position `pos`, the
        cache slot it is written to (a (1,) tensor), keep (B, S_max) the non-padding slots -> logits (B, V).
        It attends over the whole cache: additive masks (0 / -inf), made here once for every layer, hide the
        padding and the slots after `slot`. Nothing in it waits for the host: generate(compile=True) compiles
        it with the sampling (common.next_token)."""
        slots, w = torch.arange(keep.shape[1], device=keep.device), self.cfg.text_config.window
        x = self.language_model.embed(token)  # (B, 1, D)
        # A generated token is causal (outside the prefix block) and never sees padding.
        visible = keep & (slots <= slot)  # (B, S_max)
        window = None if w is None else visible & in_window(slot, slots, w)  # (B, S_max)
        mask, window_mask = (
            None if m is None else torch.where(m, 0.0, float("-inf")).to(x.dtype)[:, None, None]
            for m in (visible, window)
        )  # (B, 1, 1, S_max)
        h = self.language_model(x, pos, (mask, window_mask), caches, slot)
        return self.logits(h[:, -1])  # (B, V)

    @torch.inference_mode()
    def generate(
        self, input_ids, attention_mask=None, token_type_ids=None, pixel_values=None, labels=None, *,
        max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        repetition_penalty: float = 1.0, seed: int | None = None,
        eos_token_ids: list[int] | int | None = None, streamer=None, compile: bool = False,
        image_features=None,
    ) -> torch.Tensor:  # fmt: skip
        """New tokens (B, N). Prefill once (image + prompt, prefix-LM mask) into a static cache, then one
        causal token per step. `labels` is accepted (and ignored) so the processor's output can be passed as
        is. `streamer(text)` gets the answer as it is made (one row); eos_token_ids=None: the checkpoint's;
        image_features: the images' tower output from an earlier call, used instead of pixel_values."""
        # 1. settings and checks
        eos = self.eos_token_ids if eos_token_ids is None else eos_token_ids
        settings = common.GenerationSettings(
            max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, eos
        )
        limit = self.cfg.text_config.max_position_embeddings
        attention_mask = common.check_generate_inputs(input_ids, attention_mask, settings, streamer, limit)
        # 2. vision features, written over the placeholders
        x = self.embed(input_ids, pixel_values, image_features)
        # 3. prefill: the whole prompt into a static cache, the prefix block (token type 0) seeing itself
        # (the last call's caches, when the shapes match)
        (B, T), S_max = input_ids.shape, common.cache_length(input_ids.shape[1], max_new_tokens)
        d = common.kept_decoding(self, B, S_max, x, lambda: self.language_model.new_caches(B, S_max, x))
        pos = attention_mask.long().cumsum(-1)  # (B, T). NOTE: 1-based, the first real token at 1
        d.begin(T - 1, pos[:, -1], attention_mask.bool())  # the last prompt token
        keep = d.keep[:, :T]  # (B, T): real tokens
        prefix = torch.ones_like(keep) if token_type_ids is None else token_type_ids == 0  # (B, T)
        first = self.prefill(x, pos, self.masks(keep, prefix, T), d.caches)  # (B, V)
        # 4. decode: causal tokens after the prefix; position and slot are tensors, so no recompiles
        return common.decode_loop(self, first, d, settings, input_ids, attention_mask, streamer, compile)


class Chat:
    """Several prompts about one image with the vision tower run once: common.Chat's API (ask, reset,
    messages, input_ids). PaliGemma is no chat model: each prompt is one task prefix ("caption en", "detect
    cat") with nothing before it, so nothing of an earlier prompt is kept but the image's features.
    NOTE: why not the KV cache, as common.Chat keeps it: the prefix-LM mask lets the image positions attend
    to the whole prefix, the task text included, so from the second decoder layer on the image positions'
    keys and values depend on the text. A new prefix changes them all. The SigLIP tower and projector output
    does not see the text: it is kept per image and written over the <image> tokens of each new prompt."""

    def __init__(self, model: PaliGemma, processor: Processor, system: str | None = None):
        if system is not None:
            raise ValueError("PaliGemma has no system prompt: its prompts are task prefixes")
        self.model, self.processor = model, processor
        self.reset()

    def reset(self) -> None:
        self.messages, self.images, self.features = [], [], None
        self.input_ids = torch.zeros(1, 0, dtype=torch.long)  # the last prompt and its answer (no history)

    @torch.inference_mode()
    def ask(self, text: str, images=(), videos=(), **settings) -> str:
        """The answer to the task prefix `text` about the new `images` (then kept) or the last ones."""
        if videos:
            raise ValueError("PaliGemma reads images, not videos")
        pictures, features = (common.as_list(images), None) if images else (self.images, self.features)
        if not pictures:
            raise ValueError("PaliGemma needs an image: give one with the first question")
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in self.processor(text, images=[pictures]).items()}
        pixels = inputs.pop("pixel_values").to(self.model.vision_tower.post_layernorm.weight.dtype)
        features = self.model.image_features(pixels) if features is None else features
        out = self.model.generate(**inputs, image_features=features, **settings)[0]
        self.images, self.features = pictures, features  # kept once answered: the next prompts' image
        self.input_ids = torch.cat([inputs["input_ids"], out[None]], 1).cpu()
        items = [{"type": "image", "image": im} for im in (images or [])]
        answer = self.processor.decode(out)
        user = {"role": "user", "content": items + [{"type": "text", "text": text}]}
        self.messages += [user, {"role": "assistant", "content": answer}]
        return answer


# ==========================================================================================================
# 7. The processor: the prompt format, media -> tensors, detection boxes
# ==========================================================================================================


IMAGE_TOKEN = "<image>"
# The first word of the task prefixes the mix checkpoints were trained on ("caption en", "answer en ...").
TASK_WORDS = ("caption", "cap", "describe", "ocr", "answer", "question", "detect", "segment")


def build_prompt(prefix: str, n_images: int = 1, bos: str = "<bos>") -> str:
    """The PaliGemma input format: <image> x n, then <bos>, the task prefix and a newline (nothing between
    the image tokens and <bos>). Example: "<image><bos>caption en\\n"; each <image> is later expanded to
    image_seq_length copies. The answer follows the newline."""
    return IMAGE_TOKEN * n_images + bos + prefix + "\n"


class Processor:
    """Text + images (+ a suffix for fine-tuning) -> the model's inputs, with the same keys and layouts as
    transformers' PaliGemmaProcessor: input_ids, attention_mask, token_type_ids (0 prefix, 1 suffix),
    pixel_values, and labels when a suffix is given."""

    def __init__(self, tokenizer: common.Tokenizer, image: ImageInputConfig):
        self.tokenizer, self.image = tokenizer, image
        self.decode, self.batch_decode = tokenizer.decode, tokenizer.batch_decode  # ids -> text
        self.image_token_id = tokenizer.token_id(IMAGE_TOKEN)
        self.bos_token_id = tokenizer.token_id("<bos>")
        self.eos_token_id = tokenizer.token_id("<eos>")
        self.pad_token_id = tokenizer.token_id("<pad>")

    @staticmethod
    def from_dir(ckpt: Path) -> Processor:
        """Settings from preprocessor_config.json (published) or processor_config.json (transformers 5)."""
        image_d = common.read_processor_configs(ckpt)[1]
        return Processor(common.Tokenizer(ckpt / "tokenizer.json"), ImageInputConfig.from_hf(image_d))

    def preprocess_images(self, images: list) -> dict[str, torch.Tensor]:
        x = torch.stack([resize_and_normalize(im, self.image) for im in images])  # (images, 3, 224, 224)
        return {"pixel_values": x}

    def __call__(self, text=None, images=None, suffix=None, padding_side: str = "left"):
        """`text`: one prompt or one per row. Without <image> in it, each row gets the format of
        `build_prompt` with its images (`images` then holds one image, or one list of images, per row). With
        <image> placeholders, <bos> goes right after the last one and "\\n" at the end, as transformers does.
        `suffix`: the expected answer for fine-tuning; it is appended with <eos> and becomes `labels`."""
        if images is None:
            raise ValueError("PaliGemma needs an image with every prompt (pass images=...)")
        texts = [""] if text is None else common.as_list(text)
        if not texts:
            raise ValueError("no prompts: give text= a string or a non-empty list of strings")
        rows, images = self.prompts(texts, common.as_list(images))
        expand = IMAGE_TOKEN * self.image.image_seq_length
        ids = [self.tokenizer.encode(r.replace(IMAGE_TOKEN, expand)) for r in rows]
        types = [[0] * len(x) for x in ids]
        if suffix is not None:
            suffixes = common.as_list(suffix)
            if len(suffixes) != len(ids) or not all(isinstance(x, str) for x in suffixes):
                raise ValueError(f"suffix: one answer string per prompt ({len(ids)}), not {suffix!r:.50}")
            for b, answer in enumerate(suffixes):
                answer_ids = self.tokenizer.encode(answer) + [self.eos_token_id]
                ids[b], types[b] = ids[b] + answer_ids, types[b] + [1] * len(answer_ids)
        input_ids, attention_mask = common.pad_batch(ids, self.pad_token_id, padding_side)
        token_type_ids, _ = common.pad_batch(types, 0, padding_side)
        out = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
        out.update(self.preprocess_images(images))
        if suffix is not None:
            out["labels"] = input_ids.masked_fill(token_type_ids == 0, -100)  # loss on the answer only
        return out

    def prompts(self, texts: list[str], images: list) -> tuple[list[str], list]:
        """The rows' prompt strings (before <image> is expanded) and their images, flat, in order."""
        rows = []
        if not any(IMAGE_TOKEN in t for t in texts):
            per_row = [common.as_list(im) for im in images]
            if len(per_row) != len(texts):
                raise ValueError(
                    f"{len(images)} images for {len(texts)} prompts: give one image (or one list "
                    "of images) per prompt, or put <image> placeholders in the prompts"
                )
            if not all(per_row):
                raise ValueError("PaliGemma needs an image with every prompt: a prompt's image is None or []")
            for t in texts:
                if t.split(" ", 1)[0] not in TASK_WORDS:
                    warnings.warn(
                        f"prompt {t!r} has no task prefix: the mix checkpoints expect one such as "
                        "'caption en', 'answer en <question>', 'detect <object>' or 'ocr'",
                        stacklevel=3,
                    )
            rows = [build_prompt(t, len(ims)) for t, ims in zip(texts, per_row, strict=True)]
            images = [im for ims in per_row for im in ims]
        else:
            images = [im for item in images for im in common.as_list(item)]  # flat, or one list per row
            common.check_placeholders(texts, {IMAGE_TOKEN: images}, "or none: build_prompt adds them")
            for t in texts:
                end = t.rfind(IMAGE_TOKEN) + len(IMAGE_TOKEN)
                rows.append(t[:end] + "<bos>" + t[end:] + "\n")
        return rows, images


LOC_BOX = re.compile(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>\s*([^;<]*)")


def parse_boxes(text: str, width: int, height: int) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Detection output -> [(label, (x0, y0, x1, y1)) in pixels of the original image].
    The model answers "detect cat ; dog" with "<loc0212><loc0096><loc0870><loc0540> cat ; <loc...>... dog":
    four tokens per box in the order y0, x0, y1, x1, each a coordinate on a 0-1023 grid over the (squashed)
    image, so a value v maps back to v / 1024 of the image's side. Segmentation answers add 16 <segDDD> codes
    per mask, which need a VQ-VAE decoder that the checkpoints do not include: out of scope here."""
    boxes = []
    for y0, x0, y1, x1, label in LOC_BOX.findall(text):
        y0, y1 = sorted((int(y0) / 1024 * height, int(y1) / 1024 * height))  # corners in order, whatever
        x0, x1 = sorted((int(x0) / 1024 * width, int(x1) / 1024 * width))  # order the model wrote them in
        boxes.append((label.strip(), (x0, y0, x1, y1)))
    return boxes


# ==========================================================================================================
# 8. Weights
# ==========================================================================================================


def config_from_hf(d: dict) -> PaliGemmaConfig:
    """Reads the published config.json (fields the repos leave out take transformers' class defaults for
    gemma / gemma2) and the transformers-5 format (`rope_parameters`, `layer_types`)."""
    t, v = d.get("text_config") or {}, d.get("vision_config") or {}
    gemma2 = t.get("model_type", "gemma") == "gemma2"
    if t.get("model_type", "gemma") not in ("gemma", "gemma2"):
        raise ValueError(f"text_config.model_type={t.get('model_type')!r}: PaliGemma uses gemma or gemma2")
    for what, c, key in (("text", t, "hidden_activation"), ("vision", v, "hidden_act")):
        act = c.get(key) or c.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu"):  # NOTE: a legacy "gelu" here means the tanh GELU
            raise ValueError(f"{what} activation {act!r}: paligemma.py implements gelu_pytorch_tanh only")
    n_layers = t.get("num_hidden_layers", 26 if gemma2 else 18)
    text = TextConfig(
        model_type="gemma2" if gemma2 else "gemma",
        vocab_size=t.get("vocab_size", d.get("vocab_size", 257216)),  # NOTE: the root value can be stale
        hidden_size=t.get("hidden_size", 2304 if gemma2 else 2048),
        intermediate_size=t.get("intermediate_size", 9216 if gemma2 else 16384),
        num_hidden_layers=n_layers,
        num_attention_heads=t.get("num_attention_heads", 8 if gemma2 else 16),
        num_key_value_heads=t.get("num_key_value_heads", 4 if gemma2 else 16),
        head_dim=t.get("head_dim", 256),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=(t.get("rope_parameters") or {}).get("rope_theta", t.get("rope_theta", 10000.0)),
        max_position_embeddings=t.get("max_position_embeddings", 8192),
    )
    if gemma2:
        default_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        text = replace(
            text,
            query_pre_attn_scalar=t.get("query_pre_attn_scalar", 256),
            attn_logit_softcapping=t.get("attn_logit_softcapping", 50.0),
            final_logit_softcapping=t.get("final_logit_softcapping", 30.0),
            sliding_window=t.get("sliding_window", 4096),
            layer_types=tuple(t.get("layer_types") or default_types),
        )
    vision = VisionConfig(
        hidden_size=v.get("hidden_size", 1152),
        intermediate_size=v.get("intermediate_size", 4304),
        num_hidden_layers=v.get("num_hidden_layers", 27),
        num_attention_heads=v.get("num_attention_heads", 16),
        num_channels=v.get("num_channels", 3),
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 14),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
    )
    assert d.get("projection_dim", text.hidden_size) == text.hidden_size, "projector must output D"
    image_token_id = d.get("image_token_index", d.get("image_token_id", 257152))
    return PaliGemmaConfig(text_config=text, vision_config=vision, image_token_id=image_token_id)


def rename(key: str) -> str | None:
    """Checkpoint key -> our name. Ours are transformers 5's names without the leading `model.`. The published
    repos nest two levels more (`vision_tower.vision_model.*`, `language_model.model.*`, and
    `language_model.lm_head` when it is stored at all); transformers 5 writes `model.*` in memory and a mix of
    both layouts when it saves."""
    key = re.sub(r"^model\.(?=vision_tower|multi_modal_projector|language_model)", "", key)
    key = re.sub(r"^vision_tower\.vision_model\.", "vision_tower.", key)
    key = re.sub(r"^language_model\.lm_head\.", "lm_head.", key)
    return re.sub(r"^language_model\.model\.", "language_model.", key)


def load(name_or_path=DEFAULT, device=None, dtype=None, quantize=None) -> tuple[PaliGemma, Processor]:
    """A Hub id (or a PRESETS key) or a local directory -> (model in eval mode, processor). `quantize`
    ("int8" or "int4") stores the decoder's linear layers in 8 or 4 bits as they load (quant.py)."""
    ckpt = common.checkpoint_dir(PRESETS.get(name_or_path, name_or_path))
    raw, cfg = common.read_config(ckpt, "paligemma", config_from_hf)
    device = common.pick_device(device)
    dtype = common.pick_dtype(dtype, device, quantize)
    with torch.device("meta"):
        model = PaliGemma(cfg)
    if quantize:
        import quant  # the int8/int4 layers: only when asked for

        quant.quantize(model, quantize, device=device, dtype=dtype)
    common.load_weights(
        model, ckpt, rename, device, dtype, {"lm_head.weight": "language_model.embed_tokens.weight"}
    )
    processor = Processor.from_dir(ckpt)
    vc = cfg.vision_config
    if (
        processor.image.image_size != vc.image_size
        or processor.image.image_seq_length != (vc.image_size // vc.patch_size) ** 2
    ):
        raise ValueError(
            f"the processor config says {processor.image.image_size} px / {processor.image.image_seq_length} "
            f"tokens but the model takes {vc.image_size} px: the checkpoint's files do not match"
        )
    model.eos_token_ids = common.read_eos_ids(ckpt, raw)
    model.pad_token_id = processor.pad_token_id
    model.tokenizer = processor.tokenizer
    return model.eval(), processor


# ==========================================================================================================
# 9. Command line
# ==========================================================================================================

# The data's path through the model, for --explain and the notebooks (cli.record_shapes hooks each stage):
# (submodule, what it does, its output shape in the legend). Not part of the architecture.
STAGES = [
    ("vision_tower.embeddings", "SigLIP patch embedding + learned positions", "(n, N, Dv)"),
    ("vision_tower.encoder.layers.0", "SigLIP layer 1 (bidirectional)", "(n, N, Dv)"),
    ("vision_tower.post_layernorm", "final LayerNorm of the tower", "(n, N, Dv)"),
    ("multi_modal_projector", "linear projector -> decoder width", "(n, N, D)"),
    ("language_model.embed_tokens", "token embeddings (before the sqrt(D) scale)", "(B, T, D)"),
    ("language_model", "decoder stack <- embeddings, positions (B, T), prefix-LM masks", "(B, T, D)"),
    ("language_model.layers.0.self_attn.q_proj", "decoder layer 1: queries, H heads", "(B, T, H*Dh)"),
    ("language_model.layers.0.self_attn.k_proj", "decoder layer 1: keys, Hkv heads", "(B, T, Hkv*Dh)"),
    ("language_model.layers.0", "decoder layer 1 (prefix-LM attention + GeGLU)", "(B, T, D)"),
    ("language_model.norm", "final RMSNorm", "(B, T, D)"),
    ("lm_head", "logits", "(B, T, V)"),
]


def main(argv: list[str] | None = None) -> None:
    import cli  # the program's helpers: loaded when the file runs as a program, never on import

    ap = cli.parser(
        PRESETS,
        DEFAULT,
        "Ask PaliGemma about an image. The prompt is a task prefix: 'caption en', 'answer en <question>', "
        "'detect cat ; dog', 'ocr'. PaliGemma has no chat template, so no --system.",
        "python paligemma.py --image examples/grace_hopper.jpg --prompt 'caption en'",
        frames=None,
        system=None,
        boxes="<loc> (a detect answer's)",
    )
    a = cli.check(ap.parse_args(argv))
    if not a.image and not (a.chat or a.batch_input):
        raise ValueError("PaliGemma needs an image: pass --image PATH")

    model, processor = cli.load(load, PRESETS, a)  # one stderr line, and load_s for the summary
    if a.chat:  # one load, many task prefixes on the image features it keeps
        return cli.chat(a, Chat(model, processor), processor)
    if a.batch_input:  # one prompt over many images, in batches
        return cli.batch(a, model, processor, lambda text: text)
    images, _ = cli.load_media(a, processor)
    inputs = processor(text=a.prompt, images=[images])
    S, n = processor.image.image_size, processor.image.image_seq_length
    for i, im in enumerate(images):
        cli.say(
            f"image {i + 1}: {im.width}x{im.height} -> {S}x{S} -> {S // 14}x{S // 14} patches -> {n} tokens"
        )
    if a.show_prompt:
        cli.say(processor.decode(inputs["input_ids"][0], skip_special_tokens=False))
    out = cli.generate_and_report(model, inputs, a, cli.visual_tokens(inputs, processor), STAGES)
    if a.draw_boxes:
        cli.report_boxes(a, out, processor, images[0], parse_boxes)


if __name__ == "__main__":
    import cli

    cli.run_main(main)
