"""Qwen2-VL in one file: preprocessing, vision tower, patch merger, Qwen2 decoder with M-RoPE, generation.

What is special about this model:
- Dynamic resolution: an image is resized (never cropped) so both sides are multiples of 28 and its area
  lies in [min_pixels, max_pixels], then cut into 14x14 patches: different images give different token counts.
- Images and videos share one vision tower: a patch is 2 frames x 14 x 14 (a still image is its frame twice).
- 2-D rotary positions inside the vision transformer (row and column of each patch), and attention that never
  crosses from one image, or one pair of video frames, into another.
- A 2x2 patch merge: every 4 neighbouring patches become one token for the language model.
- M-RoPE in the decoder: every token has 3 positions (time, height, width); text has all three equal, a vision
  token has its (frame, row, column) offset from where its block starts. The rotary frequencies are split into
  sections [16, 24, 24] that read the t, h and w positions respectively.
- Because a vision block advances the position counter by less than its token count, decoding continues from
  `position = token index + rope_delta` (rope_delta <= 0).

Shape legend: B batch, T tokens in this call, S key length (cache + T), D model width, H query heads, Hkv kv
heads, Dh head dim, N vision patches, Dv vision width, F video frames, V vocabulary.

Worked example (Qwen2-VL-2B): a 480x640 photo -> smart_resize -> 476x644 -> grid (t=1, h=34, w=46) -> 1564
patches of 3*2*14*14 = 1176 values -> vision tower (1564, 1280) -> 2x2 merge -> 391 tokens of width 1536,
written over the 391 <|image_pad|> placeholders of the prompt. Text after the image continues at position
start + max(17, 23) = +23.

Where things are (section: what to read first):
  1 config: Qwen2VLConfig                    2 pixel maths: smart_resize, resize_and_normalize, patchify
  3 vision tower: vision_rope_angles, VisionAttention (block-diagonal), VisionBlock
  4 projector: PatchMerger (2x2), VisionTransformer (tower + merger)   5 decoder: mrope_cos_sin, KVCache
  6 the VLM: get_rope_index, Qwen2VL.embed / forward / prefill / decode_step / generate
  7 the processor: Processor (chat template, placeholders), parse_boxes   8 weights: config_from_hf, load
  9 command line: STAGES (for --explain), main (cli.py)

Paper: "Qwen2-VL: Enhancing Vision-Language Model's Perception of the World at Any Resolution" (arXiv
2409.12191). Matches transformers 5.23 `models/qwen2_vl/` (modeling, image/video processing, processing),
except where noted (positions after a video: we follow the released model, see `get_rope_index`).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ==========================================================================================================
# 1. Config
# ==========================================================================================================

DEFAULT = "Qwen/Qwen2-VL-2B-Instruct"
PRESETS = {"2b": "Qwen/Qwen2-VL-2B-Instruct", "7b": "Qwen/Qwen2-VL-7B-Instruct"}


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280  # Dv
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_size: int = 1536  # the merger's output width = the decoder's D
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 1536  # D
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12  # H
    num_key_value_heads: int = 2  # Hkv
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # rotary frequency slots read from t, h, w positions
    max_position_embeddings: int = 32768


@dataclass(frozen=True)
class Qwen2VLConfig:
    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    tie_word_embeddings: bool = True  # 2B: true, 7B: false
    image_token_id: int = 151655  # <|image_pad|>
    video_token_id: int = 151656  # <|video_pad|>


# ==========================================================================================================
# 2. Pixel maths: resize, patches, token counts
# ==========================================================================================================

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionInputConfig:
    """Resize bounds and normalisation for images or for videos (they are configured separately)."""

    min_pixels: int
    max_pixels: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    min_frames: int = 4  # videos only: bounds for frame sampling by fps
    max_frames: int = 768
    fps: float = 2.0  # videos read from a file are sampled at this rate unless told otherwise

    def __post_init__(self):
        low = (self.patch_size * self.merge_size) ** 2  # one merged token
        if not low <= self.min_pixels <= self.max_pixels:
            bounds = f"min_pixels={self.min_pixels}, max_pixels={self.max_pixels}"
            raise ValueError(f"{bounds}: need {low} <= min <= max")

    @staticmethod
    def from_hf(d: dict, min_pixels: int, max_pixels: int) -> VisionInputConfig:
        """`min_pixels`/`max_pixels` (the published files) win over `size` (transformers 5), as there."""
        size = d.get("size") or {}
        return VisionInputConfig(
            min_pixels=d.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", min_pixels))),
            max_pixels=d.get("max_pixels", size.get("longest_edge", size.get("max_pixels", max_pixels))),
            patch_size=d.get("patch_size", 14),
            temporal_patch_size=d.get("temporal_patch_size", 2),
            merge_size=d.get("merge_size", 2),
            image_mean=tuple(d.get("image_mean", CLIP_MEAN)),
            image_std=tuple(d.get("image_std", CLIP_STD)),
            min_frames=d.get("min_frames", 4),
            max_frames=d.get("max_frames", 768),
        )


def smart_resize(height: int, width: int, factor=28, min_pixels=3136, max_pixels=1003520) -> tuple[int, int]:
    """The (height, width) an image is resized to: both multiples of `factor`, area within [min, max] pixels,
    aspect ratio kept as well as that allows. Example: 480x640 -> 476x644."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {width}x{height}: the aspect ratio must be below 200:1; crop or pad it")
    # NOTE: Python's round() is round-half-to-even (round(2.5) == 2); the reference relies on it.
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    if h < factor or w < factor:
        raise ValueError(
            f"image of {width}x{height} is too small for {factor}-pixel patches with min_pixels="
            f"{min_pixels}; raise min_pixels (at least {factor * factor}) so it is upscaled"
        )
    return h, w


def resize_and_normalize(frames: torch.Tensor, cfg: VisionInputConfig) -> torch.Tensor:
    """(F, 3, H, W) uint8 -> (F, 3, h, w) float32, h and w from smart_resize.
    NOTE: the reference resizes the uint8 tensor with torchvision (antialiased bicubic, rounded back to
    uint8), which is exactly torch's own uint8 interpolate below; then (x - 255 mean) / (255 std) in
    float32."""
    factor = cfg.patch_size * cfg.merge_size
    h, w = smart_resize(frames.shape[-2], frames.shape[-1], factor, cfg.min_pixels, cfg.max_pixels)
    x = F.interpolate(frames, size=(h, w), mode="bicubic", antialias=True, align_corners=False)  # uint8
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1) * 255.0  # (3, 1, 1)
    return (x.float() - mean) / (torch.tensor(cfg.image_std).view(3, 1, 1) * 255.0)  # (F, 3, h, w) float32


def patchify(x: torch.Tensor, cfg: VisionInputConfig) -> tuple[torch.Tensor, list[int]]:
    """(F, 3, h, w) frames -> (t*gh*gw, 3*2*14*14) patch rows and the grid [t, gh, gw].
    Rows are ordered merge window by merge window (2x2 neighbours adjacent, so the merger can simply group 4
    consecutive rows), each row flattened as (C, T, 14, 14). An odd frame count repeats the last frame."""
    P, M, Tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if x.shape[0] % Tp:
        x = torch.cat([x, x[-1:].expand(Tp - x.shape[0] % Tp, -1, -1, -1)])  # (F rounded up to even, 3, h, w)
    Fr, C, h, w = x.shape
    t, gh, gw = Fr // Tp, h // P, w // P
    x = x.view(t, Tp, C, gh // M, M, P, gw // M, M, P)  # (t, Tp, C, gh/M, M, P, gw/M, M, P)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, gh/M, gw/M, M, M, C, Tp, P, P)
    return x.reshape(t * gh * gw, C * Tp * P * P), [t, gh, gw]  # (N, C*Tp*P*P) = (N, 1176)


# ==========================================================================================================
# 3. Vision tower
# ==========================================================================================================


def rotate_half(x: torch.Tensor) -> torch.Tensor:  # used by the vision tower and the decoder (section 5)
    x1, x2 = x.chunk(2, dim=-1)  # each (..., Dh/2)
    return torch.cat((-x2, x1), dim=-1)  # (..., Dh)


def vision_rope_angles(grids: list[list[int]], head_dim: int, theta: float, merge: int) -> torch.Tensor:
    """(N, Dh) rotary angles of every patch: [row * inv_freq, column * inv_freq] (Dh/4 frequencies each),
    written twice for the half-split rotation. Rows/columns are listed in the processor's merge-window order
    and repeated for each temporal pair of a video."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2))
    pos, m = [], merge
    for t, h, w in grids:
        hh = torch.arange(h).view(h // m, m, 1, 1).expand(-1, -1, w // m, m)  # (h/m, m, w/m, m): row
        ww = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, -1, -1)  # (h/m, m, w/m, m): column
        hw = torch.stack([hh.transpose(1, 2).flatten(), ww.transpose(1, 2).flatten()], dim=-1)  # (h*w, 2)
        pos.append(hw.repeat(t, 1))  # (t*h*w, 2)
    angles = (torch.cat(pos)[..., None].float() * inv_freq).flatten(1)  # (N, 2 * Dh/4) as [h freqs, w freqs]
    return torch.cat([angles, angles], dim=-1)  # (N, Dh)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_head = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x, cos, sin, runs: list[tuple[int, int, int]]):
        (N, Dv), H = x.shape, self.n_head
        q, k, v = self.qkv(x).view(N, 3, H, Dv // H).unbind(1)  # each (N, H, Dh)
        # NOTE: the rotation is applied in float32 even for bf16 weights (as the reference does).
        cos, sin = cos[:, None], sin[:, None]  # (N, 1, Dh): the same angle for every head
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        y = torch.empty_like(q)
        # Block-diagonal attention: each run is n equally long segments (an image = 1 segment, a video = one
        # per temporal pair) attending only within themselves, so each run is one batched, unmasked SDPA call.
        for start, n, L in runs:
            sl = slice(start, start + n * L)
            qs, ks, vs = (z[sl].view(n, L, H, -1).transpose(1, 2) for z in (q, k, v))  # (n, H, L, Dh)
            o = F.scaled_dot_product_attention(qs, ks, vs)  # (n, H, L, Dh)
            y[sl] = o.transpose(1, 2).reshape(n * L, H, -1)  # (n*L, H, Dh)
        return self.proj(y.reshape(N, Dv))  # (N, Dv)


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))
        self.fc2 = nn.Linear(int(cfg.embed_dim * cfg.mlp_ratio), cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick_gelu


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = VisionMlp(cfg)

    def forward(self, x, cos, sin, runs):
        x = x + self.attn(self.norm1(x), cos, sin, runs)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=k, stride=k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C*Tp*P*P) -> (N, Dv)
        # A Conv3d whose kernel equals its stride, on exactly one kernel-sized input, is a matrix product.
        return F.linear(x, self.proj.weight.flatten(1))  # weight (Dv, C, Tp, P, P) -> (Dv, C*Tp*P*P)


# ==========================================================================================================
# 4. Projector: the 2x2 patch merger, and the tower that holds it (as `visual.merger`)
# ==========================================================================================================


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        width = cfg.embed_dim * cfg.spatial_merge_size**2
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, Dv) -> (N/4, D)
        x = self.ln_q(x).view(-1, self.mlp[0].in_features)  # (N/4, 4*Dv): 4 consecutive rows = one 2x2 window
        return self.mlp(x)  # (N/4, D)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(N, 1176) patch rows + (n_media, 3) grids -> (N / 4, D) merged tokens, media after media."""
        grids = grid_thw.tolist()  # NOTE: index metadata, read on the host: the layout is built in Python
        assert pixels.shape[0] == sum(t * h * w for t, h, w in grids), "one row of pixel_values per patch"
        starts = itertools.accumulate((t * h * w for t, h, w in grids), initial=0)
        runs = [(start, t, h * w) for start, (t, h, w) in zip(starts, grids)]  # (first row, segments, length)
        vc = self.cfg
        angles = vision_rope_angles(grids, vc.embed_dim // vc.num_heads, vc.rope_theta, vc.spatial_merge_size)
        angles = angles.to(pixels.device)
        cos, sin = angles.cos(), angles.sin()  # (N, Dh) float32
        x = self.patch_embed(pixels)  # (N, Dv)
        for block in self.blocks:
            x = block(x, cos, sin, runs)
        return self.merger(x)


# ==========================================================================================================
# 5. Language decoder (Qwen2 with M-RoPE)
# ==========================================================================================================


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32, cast back, then scale (the Llama/Qwen order).
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


# rotate_half is in section 3: the vision tower's 2-D RoPE uses it first.


def mrope_cos_sin(
    pos: torch.Tensor, cfg: TextConfig, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (3, B, T) t/h/w positions -> cos, sin (B, T, Dh). Frequency slot i takes its angle from the t, h
    or w position according to `mrope_section` ([16, 24, 24]: slots 0-15 from t, 16-39 from h, 40-63 from
    w)."""
    Dh = cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.float, device=pos.device) / Dh)
    angles = pos[..., None].float() * inv_freq  # (3, B, T, Dh/2), computed in float32
    parts = angles.split(list(cfg.mrope_section), dim=-1)  # 3 chunks of (3, B, T, 16 | 24 | 24)
    angles = torch.cat([p[i % 3] for i, p in enumerate(parts)], dim=-1)  # (B, T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, Dh)
    return angles.cos().to(dtype), angles.sin().to(dtype)  # NOTE: cast to the model dtype before use


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention without copying the cache. q (B, H, T, Dh), k/v (B, Hkv, S, Dh), mask (B, 1,
    T, S), bool or additive (0 / -inf). Query heads h = j*G .. j*G+G-1 share kv head j, so the G heads of a
    group are folded into the query length:

        q (B, H, T, Dh) -> (B, Hkv, G*T, Dh)      rows g*T + t  <->  head j*G + g, token t
        mask (B, 1, T, S) -> (B, 1, G*T, S)       the same T rows repeated G times (T = 1: broadcast)
    """
    if mask is None:  # no padding: SDPA's fused kernels, which share the kv heads themselves. A prefill from
        # slot 0 is causal; one decoded token sees every filled slot (is_causal would align it top-left)
        assert q.shape[2] in (1, k.shape[2]), "mask=None is for a prefill from slot 0 or one decode step"
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)
    B, H, T, Dh = q.shape
    G = H // k.shape[1]
    q = q.reshape(B, -1, G * T, Dh)  # (B, Hkv, G*T, Dh): the G query heads of a kv head, one after another
    mask = mask if T == 1 else mask.repeat(1, 1, G, 1)  # (B, 1, G*T, S); one query's row broadcasts
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hkv, G*T, Dh)
    return y.view(B, H, T, Dh)  # (B, H, T, Dh): the groups unfolded back into heads


class KVCache(nn.Module):
    """Static cache of one layer: (B, Hkv, S_max, Dh) buffers written in place at the given slot."""

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
    def __init__(self, cfg: TextConfig):
        super().__init__()
        D, H, Hkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.H, self.Hkv, self.Dh = H, Hkv, D // H
        self.q_proj = nn.Linear(D, H * self.Dh, bias=True)  # NOTE: Qwen2 has q/k/v biases, no o_proj bias
        self.k_proj = nn.Linear(D, Hkv * self.Dh, bias=True)
        self.v_proj = nn.Linear(D, Hkv * self.Dh, bias=True)
        self.o_proj = nn.Linear(H * self.Dh, D, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, slot=0):
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.Hkv, self.Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.Hkv, self.Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, Dh): the same angle for every head
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(slot, k, v)  # (B, Hkv, S, Dh)
        y = attend(q, k, v, mask)  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))  # heads side by side: (B, T, H*Dh = D)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, slot=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slot)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def new_caches(self, B: int, S_max: int, like: torch.Tensor) -> list[KVCache]:
        """One empty static cache per layer, (B, Hkv, S_max, Dh), on the device and in the dtype of `like`."""
        Hkv, Dh = self.cfg.num_key_value_heads, self.cfg.hidden_size // self.cfg.num_attention_heads
        return [KVCache(B, Hkv, S_max, Dh, like.device, like.dtype) for _ in self.layers]

    def forward(self, x, pos3, mask, caches: list[KVCache] | None = None, slot=0) -> torch.Tensor:
        """x (B, T, D) embeddings, pos3 (3, B, T) M-RoPE positions, mask (B, 1, T, S) -> (B, T, D)."""
        cos, sin = mrope_cos_sin(pos3.to(x.device), self.cfg, x.dtype)  # once for all layers, on x's device
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if caches is None else caches[i], slot)
        return self.norm(x)


# ==========================================================================================================
# 6. The VLM: merge vision features, positions, masks, forward, generate
# ==========================================================================================================


def get_rope_index(
    mm_types: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw, video_grid_thw, merge: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D positions (3, B, T) and rope_delta (B,), computed on the host from the token types (B, T: 0 text,
    1 image, 2 video) and the grids.

    Walking over the non-padding tokens of a row with a counter `cur` starting at 0:
      text run of L tokens        -> t = h = w = cur .. cur+L-1;                     cur += L
      vision block of grid t,h,w  -> (cur + frame, cur + row, cur + column) for each merged token
                                     (gh = h/2, gw = w/2 after the 2x2 merge);     cur += max(t, gh, gw)
    Example: 2 text tokens, an image of grid (1, 4, 6) (6 tokens), 1 text token:
      t: 0 1 | 2 2 2 2 2 2 | 5        h: 0 1 | 2 2 2 3 3 3 | 5        w: 0 1 | 2 3 4 2 3 4 | 5
    rope_delta = (last position + 1) - (number of tokens) = 6 - 9 = -3: decoding continues at index + delta.
    Padding positions stay 0 (they are masked out).

    NOTE: after a video we follow the released model (and transformers 4.x): cur += max(t, gh, gw).
    transformers 5.23 advances by max(gh, gw) only, which differs when a video has more temporal pairs than
    max(gh, gw).
    """
    B, T = mm_types.shape
    # NOTE: laid out on the host, once per prompt (on a GPU: two copies at the prefill, none per decode step)
    types, keep = mm_types.cpu(), attention_mask.cpu().bool()
    grids = {k: iter([] if g is None else g.tolist()) for k, g in ((1, image_grid_thw), (2, video_grid_thw))}
    pos, delta = torch.zeros(3, B, T, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    for b in range(B):
        row = types[b][keep[b]].tolist()
        out, cur, i = [], 0, 0
        while i < len(row):
            if row[i] == 0:  # a text run of L tokens
                L = next((j for j in range(i, len(row)) if row[j]), len(row)) - i
                out.append(torch.arange(cur, cur + L).expand(3, -1))  # (3, L): the same on all 3 axes
                cur, i = cur + L, i + L
                continue
            t, h, w = next(grids[row[i]])
            gh, gw = h // merge, w // merge
            n = t * gh * gw
            assert row[i : i + n] == [row[i]] * n, "one placeholder per merged token in every vision block"
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            out.append(cur + torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]))  # (3, t*gh*gw)
            cur, i = cur + max(t, gh, gw), i + n
        p = torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)  # (3, real tokens of row b)
        pos[:, b, keep[b]] = p
        delta[b] = (int(p.max()) + 1 if len(row) else 0) - len(row)
    return pos, delta


def causal_padding_mask(keep: torch.Tensor, T: int, offset: int = 0) -> torch.Tensor | None:
    """(B, S) bool of real (non-padding) keys -> (B, 1, T, S) bool, query t at slot offset + t.

        keys:    p  p  a  b  c        (p = left padding, x = may attend)
        query a  .  .  x  .  .
        query b  .  .  x  x  .
        query c  .  .  x  x  x
    A padding query sees only itself, so no row is empty (SDPA would return NaN); its output is unused.
    None when a prefill from slot 0 has no padding: plain causal attention needs no mask in memory.
    """
    S = keep.shape[1]
    if offset == 0 and T == S and bool(keep.all()):
        return None
    s = torch.arange(S, device=keep.device)
    t = torch.arange(offset, offset + T, device=keep.device)[:, None]  # (T, 1): each query's own slot
    return (((s <= t) & keep[:, None, :]) | (s == t))[:, None]  # (B, 1, T, S)


class Qwen2VL(nn.Module):
    quantized_parts = ("model", "lm_head")  # what quant.quantize may store in 8 or 4 bits: the decoder

    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision_config)
        self.model = Qwen2Model(cfg.text_config)
        self.lm_head = nn.Linear(cfg.text_config.hidden_size, cfg.text_config.vocab_size, bias=False)
        if cfg.tie_word_embeddings:  # 2B: the output projection is the embedding matrix
            self.lm_head.weight = self.model.embed_tokens.weight
        self.eos_token_ids: list[int] = []  # set by load() from generation_config.json
        self.pad_token_id = 0
        self.tokenizer: common.Tokenizer | None = None

    def embed(
        self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None
    ) -> torch.Tensor:
        """Token embeddings with the vision features written over the placeholder tokens, in order."""
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        merge = self.cfg.vision_config.spatial_merge_size
        for what, pixels, grid, token_id in (
            ("image", pixel_values, image_grid_thw, self.cfg.image_token_id),
            ("video", pixel_values_videos, video_grid_thw, self.cfg.video_token_id),
        ):
            is_pad = input_ids == token_id
            if (pixels is None) != (grid is None):
                raise ValueError(f"{what} pixels and grid_thw come together: pass the processor's output")
            need = 0 if grid is None else int(grid.prod(-1).sum()) // merge**2
            common.check_feature_count(what, f"<|{what}_pad|>", is_pad, need, "one per 2x2 merged patch")
            if need:
                feats = self.visual(pixels.to(x.dtype), grid.cpu())  # (need, D)
                x = x.masked_scatter(is_pad[..., None], feats.to(x.dtype))  # (B, T, D)
        return x

    def positions(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw, video_grid_thw):
        if mm_token_type_ids is None:  # 1 on image pads, 2 on video pads, 0 on text
            is_image, is_video = input_ids == self.cfg.image_token_id, input_ids == self.cfg.video_token_id
            mm_token_type_ids = is_image.long() + 2 * is_video.long()
        merge = self.cfg.vision_config.spatial_merge_size
        pos, delta = get_rope_index(mm_token_type_ids, attention_mask, image_grid_thw, video_grid_thw, merge)
        return pos.to(input_ids.device), delta.to(input_ids.device)

    def forward(
        self, input_ids, attention_mask=None, mm_token_type_ids=None, pixel_values=None, image_grid_thw=None,
        pixel_values_videos=None, video_grid_thw=None,
    ) -> torch.Tensor:  # fmt: skip
        """The full forward pass without a cache: logits (B, T, V). Differentiable.
        Inputs, as the processor returns them: input_ids, attention_mask, mm_token_type_ids (B, T);
        pixel_values (N, 1176) the patch rows of all images, image_grid_thw (n_images, 3) as (t, h, w);
        pixel_values_videos (N_video, 1176), video_grid_thw (n_videos, 3)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        pos3, _ = self.positions(input_ids, attention_mask, mm_token_type_ids, image_grid_thw, video_grid_thw)
        mask = causal_padding_mask(attention_mask.bool(), input_ids.shape[1])
        return self.lm_head(self.model(x, pos3, mask))

    def prefill(self, x, pos3, mask, caches: list[KVCache], slot: int = 0) -> torch.Tensor:
        """The whole prompt at once: embeddings x (B, T, D) with their positions and mask, written into the
        caches at slots slot .. slot+T-1 -> the logits of each row's last token (B, V); left padding puts
        every row's last token at T-1."""
        h = self.model(x, pos3, mask, caches, slot)
        return self.lm_head(h[:, -1])  # (B, V)

    def decode_step(self, token, pos, slot, keep, caches: list[KVCache]) -> torch.Tensor:
        """One new token per row, with the same shapes at every step: token (B, 1) at position pos (B, 1) on
        all three M-RoPE axes, written to the cache slot `slot` (a (1,) tensor); keep (B, S_max) the
        non-padding slots -> logits (B, V). It attends over the whole cache: one additive mask, made here for
        every layer, hides the padding and the slots after `slot`. Nothing in it waits for the host:
        generate(compile=True) compiles it with the sampling (common.next_token)."""
        x = self.model.embed_tokens(token)  # (B, 1, D)
        visible = keep & (torch.arange(keep.shape[1], device=keep.device) <= slot)  # (B, S_max)
        mask = torch.where(visible, 0.0, float("-inf")).to(x.dtype)[:, None, None]  # (B, 1, 1, S_max)
        h = self.model(x, pos.expand(3, -1, -1), mask, caches, slot)  # pos: (B, 1) -> (3, B, 1)
        return self.lm_head(h[:, -1])  # (B, V)

    def extend(self, input_ids, media: dict, past: common.Past, max_new_tokens: int):
        """A conversation's next tokens (common.Chat), one row without padding, prefilled at slot past.length
        on top of what the earlier turns left in the caches; `media`: the new images' and videos' processor
        tensors. -> (the last token's logits (1, V), the Decoding for common.decode_loop). NOTE: the
        M-RoPE positions go on from the last one: the chunk's own, from 0, plus slot + past.delta, so an
        image in a later turn gets its 3-D block where the text left off."""
        T, start = input_ids.shape[1], past.length
        grids = media.get("image_grid_thw"), media.get("video_grid_thw")
        pos3, delta = self.positions(input_ids, torch.ones_like(input_ids), None, *grids)  # (3, 1, T), (1,)
        pos3 = pos3 + start + past.delta
        common.check_context(
            int(pos3.max()) + 1, max_new_tokens, self.cfg.text_config.max_position_embeddings
        )
        x = self.embed(input_ids, **media)
        d = past.room(start + T + max_new_tokens, lambda S: self.model.new_caches(1, S, x))
        d.begin(start + T - 1, torch.tensor([start + T - 1 + past.delta + int(delta)], device=x.device))
        first = self.prefill(x, pos3, causal_padding_mask(d.keep[:, : start + T], T, start), d.caches, start)
        past.delta += int(delta)
        return first, d

    @torch.inference_mode()
    def generate(
        self, input_ids, attention_mask=None, mm_token_type_ids=None, pixel_values=None, image_grid_thw=None,
        pixel_values_videos=None, video_grid_thw=None, *, max_new_tokens: int = 128, temperature: float = 0.0,
        top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
        eos_token_ids: list[int] | int | None = None, streamer=None, compile: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        """New tokens (B, N). Prefill once (vision + prompt) into a static cache, then one token per step.
        `streamer(text)` gets the answer as it is made (one row); eos_token_ids=None: the checkpoint's."""
        # 1. settings and checks
        eos = self.eos_token_ids if eos_token_ids is None else eos_token_ids
        settings = common.GenerationSettings(
            max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, eos
        )
        attention_mask = common.check_generate_inputs(input_ids, attention_mask, settings, streamer)
        pos3, delta = self.positions(
            input_ids, attention_mask, mm_token_type_ids, image_grid_thw, video_grid_thw
        )
        n_pos = int((attention_mask.sum(1) + delta).max())  # NOTE: M-RoPE positions grow slower than tokens
        common.check_context(n_pos, max_new_tokens, self.cfg.text_config.max_position_embeddings)
        # 2. vision features, written over the placeholders
        x = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        # 3. prefill: the whole prompt into the static caches (the last call's, when the shapes match)
        (B, T), S_max = input_ids.shape, common.cache_length(input_ids.shape[1], max_new_tokens)
        d = common.kept_decoding(self, B, S_max, x, lambda: self.model.new_caches(B, S_max, x))
        d.begin(T - 1, attention_mask.sum(1) + delta - 1, attention_mask.bool())  # the last prompt token
        first = self.prefill(x, pos3, causal_padding_mask(d.keep[:, :T], T), d.caches)  # (B, V)
        # 4. decode. NOTE: a new token's position is its index + rope_delta on all 3 axes; position and slot
        # are tensors that each step moves on, so a compiled step never recompiles
        return common.decode_loop(self, first, d, settings, input_ids, attention_mask, streamer, compile)


# ==========================================================================================================
# 7. The processor: chat template, media -> tensors, placeholders
# ==========================================================================================================


IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
DEFAULT_SYSTEM = "You are a helpful assistant."


class Processor:
    """Text + media -> the model's input tensors, with the same keys and layouts as transformers'
    Qwen2VLProcessor: input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
    video_grid_thw, mm_token_type_ids."""

    def __init__(
        self, tokenizer, image: VisionInputConfig, video: VisionInputConfig, pad_token="<|endoftext|>"
    ):
        self.tokenizer, self.image, self.video = tokenizer, image, video
        self.decode, self.batch_decode = tokenizer.decode, tokenizer.batch_decode  # ids -> text
        self.pad_token_id = tokenizer.token_id(pad_token)
        self.image_token_id = tokenizer.token_id(IMAGE_PAD)
        self.video_token_id = tokenizer.token_id(VIDEO_PAD)

    @staticmethod
    def from_dir(ckpt: Path) -> Processor:
        """Settings from processor_config.json (transformers 5) or preprocessor_config.json and, if present,
        video_preprocessor_config.json (published repos). Without a video file, videos use the image file's
        values over the video defaults, as transformers 5.23 does."""
        p, image_d, video_d = common.read_processor_configs(ckpt)
        tok_cfg = common.read_json_if_present(ckpt / "tokenizer_config.json") or {}
        pad = tok_cfg.get("pad_token") or "<|endoftext|>"
        return Processor(
            common.Tokenizer(ckpt / "tokenizer.json"),
            VisionInputConfig.from_hf(image_d, min_pixels=56 * 56, max_pixels=28 * 28 * 1280),
            VisionInputConfig.from_hf(image_d if video_d is None else video_d, 128 * 28 * 28, 768 * 28 * 28),
            pad if isinstance(pad, str) else pad["content"],
        )

    def apply_chat_template(self, messages: list, add_generation_prompt=True, add_vision_id=False) -> str:
        """ChatML, exactly as the checkpoint's Jinja template renders it:
        <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n   (added when the first turn is not
        system) <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\\n
        <|im_start|>assistant\\n"""
        out, n_images, n_videos = [], 0, 0
        for i, m in enumerate(messages):
            if i == 0 and m["role"] != "system":
                out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
            out.append(f"<|im_start|>{m['role']}\n")
            content = m["content"]
            items = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for item in items:
                kind = item.get("type")
                if kind == "image" or "image" in item or "image_url" in item:
                    n_images += 1
                    label = f"Picture {n_images}: " if add_vision_id else ""
                    out.append(f"{label}<|vision_start|>{IMAGE_PAD}<|vision_end|>")
                elif kind == "video" or "video" in item:
                    n_videos += 1
                    label = f"Video {n_videos}: " if add_vision_id else ""
                    out.append(f"{label}<|vision_start|>{VIDEO_PAD}<|vision_end|>")
                elif "text" in item:
                    out.append(item["text"])
            out.append("<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    @staticmethod
    def patches(media: list[torch.Tensor], cfg: VisionInputConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames (F, 3, H, W), one stack per image (F = 1, repeated to a temporal pair by patchify) or
        video -> the patch rows of all of them, one after another, and their grids (t, h, w) in patches."""
        rows, grids = zip(*(patchify(resize_and_normalize(frames, cfg), cfg) for frames in media))
        return torch.cat(rows), torch.tensor(grids, dtype=torch.long)  # (N, 1176), (n, 3)

    def preprocess_images(self, images: list) -> dict[str, torch.Tensor]:
        frames = [common.image_to_uint8(im)[None] for im in images]  # each (1, 3, H, W): one frame
        pixels, grids = self.patches(frames, self.image)  # (N, 1176), (n, 3)
        return {"pixel_values": pixels, "image_grid_thw": grids}

    def load_video(self, path: str, num_frames: int | None = None, fps: float | None = None):
        """A video file -> media.Video, its frames sampled explicitly (never all by accident): `num_frames`
        rounded to even, or `fps` per second (default 2) clamped to [min_frames, max_frames] and even."""
        import media  # PyAV decoding: only for video files

        media.check_frames(num_frames, fps)
        Tp = self.video.temporal_patch_size
        if num_frames is not None:
            return media.load_video(path, num_frames=max(Tp, round(num_frames / Tp) * Tp))
        probe = media.load_video(path, num_frames=1)
        n = probe.total_frames / probe.fps * (fps or self.video.fps)
        n = min(max(n, self.video.min_frames), self.video.max_frames, probe.total_frames)
        return media.load_video(path, num_frames=max(1, math.floor(n / Tp) * Tp))

    def preprocess_videos(self, videos: list) -> dict[str, torch.Tensor]:
        frames = [self.load_video(v).frames if isinstance(v, (str, Path)) else v for v in videos]
        frames = [common.frames_to_uint8(f) for f in frames]  # each (F, 3, H, W)
        pixels, grids = self.patches(frames, self.video)  # (N, 1176), (n, 3)
        return {"pixel_values_videos": pixels, "video_grid_thw": grids}

    def __call__(self, text: str | list[str], images=None, videos=None, padding_side: str = "left"):
        texts, images, videos = common.as_list(text), common.as_list(images), common.as_list(videos)
        common.check_placeholders(texts, {IMAGE_PAD: images, VIDEO_PAD: videos})
        out: dict[str, torch.Tensor] = {}
        tokens = {IMAGE_PAD: [], VIDEO_PAD: []}  # per image / per video: one token per merged patch
        if images:
            out.update(self.preprocess_images(images))
            tokens[IMAGE_PAD] = (out["image_grid_thw"].prod(-1) // self.image.merge_size**2).tolist()
        if videos:
            out.update(self.preprocess_videos(videos))
            tokens[VIDEO_PAD] = (out["video_grid_thw"].prod(-1) // self.video.merge_size**2).tolist()
        ids = [self.tokenizer.encode(t) for t in common.expand_placeholders(texts, tokens)]
        input_ids, attention_mask = common.pad_batch(ids, self.pad_token_id, padding_side)
        mm = (input_ids == self.image_token_id).long() + 2 * (input_ids == self.video_token_id).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out, "mm_token_type_ids": mm}


GROUNDED = re.compile(
    r"(?:<\|object_ref_start\|>(.*?)<\|object_ref_end\|>)?\s*"
    r"<\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|>"
)


def parse_boxes(text: str, width: int, height: int) -> list[tuple[str, tuple[float, float, float, float]]]:
    """A grounding answer (decoded with its special tokens) -> [(label, (x0, y0, x1, y1)) in pixels]. Qwen2-VL
    writes "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(120,340),(560,880)<|box_end|>": the
    corners (x, y) on a 0-1000 scale of the image's width and height, whatever size it was resized to."""
    boxes = []
    for label, x0, y0, x1, y1 in GROUNDED.findall(text):
        x0, x1 = sorted((int(x0) / 1000 * width, int(x1) / 1000 * width))
        y0, y1 = sorted((int(y0) / 1000 * height, int(y1) / 1000 * height))
        boxes.append((label.strip(), (x0, y0, x1, y1)))
    return boxes


# ==========================================================================================================
# 8. Weights
# ==========================================================================================================


def config_from_hf(d: dict) -> Qwen2VLConfig:
    """Reads the published flat config.json (text fields at the root, `rope_scaling`) and the
    transformers-5 format (`text_config`, `rope_parameters`)."""
    t = d.get("text_config") or d  # flat: the text fields are at the root
    rope = t.get("rope_parameters") or {}
    scaling = t.get("rope_scaling") or d.get("rope_scaling") or {}
    if t.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true: no released Qwen2-VL uses it, nor does qwen2_vl.py")
    text = TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", t.get("rope_theta", 1e6)),
        mrope_section=tuple(rope.get("mrope_section", scaling.get("mrope_section", (16, 24, 24)))),
        max_position_embeddings=t.get("max_position_embeddings", 32768),
    )
    v = d["vision_config"]
    vision = VisionConfig(
        depth=v["depth"],
        embed_dim=v["embed_dim"],
        num_heads=v["num_heads"],
        mlp_ratio=v.get("mlp_ratio", 4.0),
        hidden_size=v.get("hidden_size", text.hidden_size),
        in_channels=v.get("in_channels", v.get("in_chans", 3)),
        patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        rope_theta=(v.get("rope_parameters") or {}).get("rope_theta", 10000.0),
    )
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.mrope_section) * 2 == head_dim, "mrope_section must cover head_dim / 2 frequencies"
    assert vision.hidden_size == text.hidden_size, "the merger must output the decoder's width"
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)),
        image_token_id=d.get("image_token_id", 151655),
        video_token_id=d.get("video_token_id", 151656),
    )


def rename(key: str) -> str | None:
    """Checkpoint key -> our name. Ours are the published layout (`visual.*`, `model.*`, `lm_head.*`, also
    what transformers 5.23 writes); fine-tunes saved by transformers 4.52-4.57 use `model.visual.*` and
    `model.language_model.*`, and 5.10-5.23 had a doubled `model.language_model.model.*` prefix."""
    if key.endswith("rotary_emb.inv_freq"):
        return None  # old checkpoints carry the rotary table; we compute it
    key = re.sub(r"^model\.visual\.", "visual.", key)
    return re.sub(r"^(model\.)?language_model\.(model\.)?", "model.", key)


def load(name_or_path=DEFAULT, device=None, dtype=None, quantize=None) -> tuple[Qwen2VL, Processor]:
    """A Hub id (or a PRESETS key) or a local directory -> (model in eval mode, processor). `quantize`
    ("int8" or "int4") stores the decoder's linear layers in 8 or 4 bits as they load (quant.py)."""
    ckpt = common.checkpoint_dir(PRESETS.get(name_or_path, name_or_path))
    raw, cfg = common.read_config(ckpt, "qwen2_vl", config_from_hf)
    device = common.pick_device(device)
    dtype = common.pick_dtype(dtype, device, quantize)
    with torch.device("meta"):
        model = Qwen2VL(cfg)
    if quantize:
        import quant  # the int8/int4 layers: only when asked for

        quant.quantize(model, quantize, device=device, dtype=dtype)
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else None
    common.load_weights(model, ckpt, rename, device, dtype, tied)
    processor = Processor.from_dir(ckpt)
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
    ("visual.patch_embed", "patch embedding: 3*2*14*14 values -> Dv", "(N, Dv)"),
    ("visual.blocks.0", "vision block 1 (2-D RoPE, attention within each image)", "(N, Dv)"),
    ("visual.merger", "2x2 merge + MLP -> decoder width", "(N/4, D)"),
    ("model.embed_tokens", "token embeddings (vision features written over the pads)", "(B, T, D)"),
    ("model", "decoder stack <- embeddings, M-RoPE positions (3, B, T)", "(B, T, D)"),
    ("model.layers.0.self_attn.q_proj", "decoder layer 1: queries, H heads", "(B, T, H*Dh)"),
    ("model.layers.0.self_attn.k_proj", "decoder layer 1: keys, Hkv heads (GQA)", "(B, T, Hkv*Dh)"),
    ("model.layers.0", "decoder layer 1 (M-RoPE attention + SwiGLU)", "(B, T, D)"),
    ("model.norm", "final RMSNorm", "(B, T, D)"),
    ("lm_head", "logits", "(B, T, V)"),
]


def main(argv: list[str] | None = None) -> None:
    import cli  # the program's helpers: loaded when the file runs as a program, never on import

    ap = cli.parser(
        PRESETS,
        DEFAULT,
        "Chat with Qwen2-VL about images and videos.",
        "python qwen2_vl.py --image examples/grace_hopper.jpg --prompt 'Describe this image.'",
        frames="2 per second, at least 4, an even count",
        system=repr(DEFAULT_SYSTEM),
        boxes="<|box_start|> (grounding)",
    )
    ap.add_argument("--min-pixels", type=int, help="lower bound on each image's resized area (default: 3136)")
    ap.add_argument(
        "--max-pixels", type=int, help="upper bound; tokens = pixels / 784 (default: the checkpoint's)"
    )
    a = cli.check(ap.parse_args(argv))

    model, processor = cli.load(load, PRESETS, a)  # one stderr line, and load_s for the summary
    bounds = {k: getattr(a, k) for k in ("min_pixels", "max_pixels") if getattr(a, k) is not None}
    processor.image, processor.video = replace(processor.image, **bounds), replace(processor.video, **bounds)
    if a.chat:  # one load, a conversation on the cache its turns leave
        return cli.chat(a, common.Chat(model, processor, a.system), processor)
    if a.batch_input:  # one prompt over many images, in batches
        return cli.batch(
            a, model, processor, lambda t: processor.apply_chat_template(cli.messages(a, 1, 0, t))
        )
    images, videos = cli.load_media(a, processor)
    prompt = processor.apply_chat_template(cli.messages(a, len(images), len(videos)))
    inputs = processor(text=prompt, images=images or None, videos=[v.frames for v in videos] or None)
    P, M = processor.image.patch_size, processor.image.merge_size
    grids = inputs.get("image_grid_thw", torch.zeros(0, 3)).tolist()
    for i, (im, (_, h, w)) in enumerate(zip(images, grids)):
        size = f"{im.width}x{im.height} -> {w * P}x{h * P}"
        cli.say(f"image {i + 1}: {size} -> {h}x{w} patches -> {h * w // M**2} tokens")
    P, M = processor.video.patch_size, processor.video.merge_size
    grids = inputs.get("video_grid_thw", torch.zeros(0, 3)).tolist()
    for i, (v, (t, h, w)) in enumerate(zip(videos, grids)):
        size = f"{cli.describe(v)} -> {w * P}x{h * P}"
        cli.say(f"video {i + 1}: {size} -> grid {t}x{h}x{w} -> {t * h * w // M**2} tokens")
    if a.show_prompt:
        cli.say(prompt)
    out = cli.generate_and_report(model, inputs, a, cli.visual_tokens(inputs, processor), STAGES)
    if a.draw_boxes:
        cli.report_boxes(a, out, processor, images[0], parse_boxes)


if __name__ == "__main__":
    import cli

    cli.run_main(main)
