"""PerceptionLM in one file: thumbnail + tile preprocessing, the Perception Encoder (PE) written out,
projector with 2x2 average pooling, the Llama-3 decoder with llama3 rotary scaling, generation.

What is special about this model:
- Thumb + tiles: the image squashed to 448x448 (the thumbnail) comes first, then the image resized (again
  squashed) onto a grid of up to 36 tiles of 448x448 chosen from its aspect ratio; small images are scaled
  up to the largest grid that fits. Video frames are each squashed to one 448x448 tile.
- The Perception Encoder is a ViT with both a learned absolute position embedding (with a class slot) and
  2-D rotary positions, interleaved pairs, x (column) frequencies before y (row), counted from 1 so that 0
  is the class token's, which is not rotated. LayerScale on both residual branches, no bias on the patch
  convolution, a LayerNorm before the blocks and none after. PLM-8B's tower has no class token (0-based).
- Projector: Linear-GELU-Linear per token, then 2x2 average pooling: 32x32 -> 16x16 = 256 tokens per tile.
- Decoder: Llama 3.2 1B/3B or 3.1 8B with RoPE theta 500000 and the llama3 frequency scaling.
- Chat format: Llama 3 headers, a default system message, the images and videos of a turn right after its
  header, the trimmed texts, <|eot_id|>.

Shape legend: B batch, T tokens in this call, S key length (cache + T), D model width, H query heads, Hkv kv
heads, Dh head dim, N vision patches, Dv vision width, F video frames, V vocabulary.

Worked example (PLM-1B): a 640x480 photo -> tile grid 7x5 (35 tiles, the largest canvas the image fits
unscaled-down) + the thumbnail = 36 x (3, 448, 448) -> PE (36, 1 + 1024, 1024) -> drop CLS -> projector ->
(36, 1024, 2048) -> 2x2 pool -> 36 x 256 = 9216 tokens of width 2048.

Where things are (section: what to read first):
  1 config: PerceptionLMConfig               2 pixel maths: choose_tile_grid, thumb_and_tiles
  3 vision tower: pe_rope_angles, PEAttention, PerceptionEncoder
  4 projector: Projector (MLP, then 2x2 pooling)
  5 decoder: llama3_inv_freq, rope_cos_sin, attend (GQA), KVCache, Attention
  6 the VLM: PerceptionLM.media_features, embed / prefill / decode_step / generate
  7 the processor: Processor (chat template, placeholders)   8 weights: config_from_hf, rename, load
  9 command line: STAGES (for --explain), main (cli.py)

Paper: "PerceptionLM: Open-Access Data and Models for Detailed Visual Understanding" (arXiv 2504.13180); the
encoder: "Perception Encoder" (arXiv 2504.13181). Matches transformers 5.23 `models/perception_lm/` with its
vision tower from timm 1.0.31 `models/eva.py` (the `vit_pe_core_*` entries).
"""

from __future__ import annotations

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

DEFAULT = "facebook/Perception-LM-1B"
PRESETS = {
    "1b": "facebook/Perception-LM-1B",
    "3b": "facebook/Perception-LM-3B",
    "8b": "facebook/Perception-LM-8B",
}
# The timm entries the checkpoints name, with the defaults each entry sets (model_args override them).
PE_ARCHITECTURES = {
    "vit_pe_core_large_patch14_336": dict(
        embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, class_token=True
    ),
    "vit_pe_core_gigantic_patch14_448": dict(
        embed_dim=1536, depth=50, num_heads=16, mlp_ratio=8960 / 1536, class_token=False
    ),
}


@dataclass(frozen=True)
class VisionConfig:  # Perception Encoder L/14 as PLM-1B/3B use it
    embed_dim: int = 1024  # Dv
    depth: int = 23
    num_heads: int = 16
    mlp_hidden: int = 4096
    image_size: int = 448
    patch_size: int = 14
    class_token: bool = True  # PLM-8B's gigantic tower has none
    ref_feat_shape: tuple[int, int] = (32, 32)  # the grid the rotary coordinates are scaled to
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TextConfig:  # Llama 3.2 1B
    vocab_size: int = 128256
    hidden_size: int = 2048  # D
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 32  # H
    num_key_value_heads: int = 8  # Hkv
    head_dim: int = 64  # Dh
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # llama3 scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_scaling: tuple[float, float, float, int] | None = (32.0, 1.0, 4.0, 8192)
    max_position_embeddings: int = 11520


@dataclass(frozen=True)
class PerceptionLMConfig:
    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 128002  # <|image|>
    video_token_id: int = 128003  # <|video|>
    vision_use_cls_token: bool = True  # drop the class token's feature before the projector
    projector_pooling_ratio: int = 2
    tie_word_embeddings: bool = True  # 1B/3B: true, 8B: false


# ==========================================================================================================
# 2. Pixel maths: a thumbnail and a grid of tiles
# ==========================================================================================================


@dataclass(frozen=True)
class VisionInputConfig:
    tile_size: int = 448
    max_num_tiles: int = 36
    thumb_and_tiles: bool = True  # "thumb+tile"; otherwise one squashed 448x448 tile per image
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if self.max_num_tiles < 1:
            raise ValueError(f"max_num_tiles must be >= 1, got {self.max_num_tiles}")

    @staticmethod
    def from_hf(d: dict) -> VisionInputConfig:
        if d.get("resample", 3) != 3:
            raise ValueError(f"resample={d['resample']} in the processor config: only bicubic (3) is known")
        return VisionInputConfig(
            tile_size=d.get("tile_size", (d.get("size") or {}).get("height", 448)),
            max_num_tiles=d.get("max_num_tiles", 36),
            thumb_and_tiles=d.get("vision_input_type", "thumb+tile") == "thumb+tile",
            image_mean=tuple(d.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(d.get("image_std", (0.5, 0.5, 0.5))),
        )


def tile_arrangements(max_num_tiles: int) -> list[tuple[int, int]]:
    """Every (columns, rows) grid of at most max_num_tiles tiles, in the reference's order: grouped by aspect
    ratio in the order each ratio first appears going from max_num_tiles tiles down to 1, then by tile count.
    The order decides ties in `choose_tile_grid` (the later candidate wins)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_num_tiles, 0, -1):
        for cols in sorted({f for i in range(1, math.isqrt(n) + 1) if n % i == 0 for f in (i, n // i)}):
            by_ratio.setdefault(cols / (n // cols), []).append((cols, n // cols))
    return [grid for grids in by_ratio.values() for grid in grids]


def choose_tile_grid(W: int, H: int, tile: int, max_num_tiles: int) -> tuple[int, int]:
    """(columns, rows) for a W x H image. Among the canvases the image fits without shrinking, the one where
    the aspect-kept resize would be largest (for a landscape image its height, for a portrait its width;
    small images therefore go up to the largest canvas). If none fits, the grid with the closest aspect
    ratio (not wider than the image for a landscape, not taller for a portrait), the most columns (rows)."""
    scale = W / H
    best, best_size = None, None
    for cols, rows in tile_arrangements(max_num_tiles):
        if cols * tile < W or rows * tile < H:
            continue
        f = min(cols * tile / W, rows * tile / H)
        size = (f * W, math.floor(f * W / scale)) if scale > 1.0 else (math.floor(f * H * scale), f * H)
        if best is None or (size[0] >= best_size[0] if scale < 1.0 else size[1] >= best_size[1]):
            best, best_size = (cols, rows), size
    if best is not None:
        return best
    ratios: dict[float, list[tuple[int, int]]] = {}
    for grid in tile_arrangements(max_num_tiles):
        ratios.setdefault(grid[0] / grid[1], []).append(grid)
    if scale >= 1:
        k = min((k for k in ratios if k <= scale), key=lambda k: abs(k - scale))
        return max(ratios[k], key=lambda g: g[0])
    k = min((k for k in ratios if k > scale), key=lambda k: abs(1 / k - 1 / scale))
    return max(ratios[k], key=lambda g: g[1])


def resize_uint8(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, 3, H, W) uint8 -> (n, 3, h, w) uint8. NOTE: the reference resizes the uint8 tensor with torchvision
    (antialiased bicubic, rounded back to uint8), which is exactly torch's own uint8 interpolate."""
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)


def normalize(x: torch.Tensor, cfg: VisionInputConfig) -> torch.Tensor:  # uint8 -> float32, (x - 255m) / 255s
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1) * 255.0  # (3, 1, 1)
    return (x.float() - mean) / (torch.tensor(cfg.image_std).view(3, 1, 1) * 255.0)  # x's shape, float32


def thumb_and_tiles(image, cfg: VisionInputConfig) -> torch.Tensor:
    """An image -> (1 + cols*rows, 3, 448, 448): the thumbnail, then the tiles row by row."""
    x = common.image_to_uint8(image)[None]  # (1, 3, H, W)
    S = cfg.tile_size
    thumb = resize_uint8(x, S, S)
    if not cfg.thumb_and_tiles:
        return normalize(thumb, cfg)
    cols, rows = choose_tile_grid(x.shape[-1], x.shape[-2], S, cfg.max_num_tiles)
    big = resize_uint8(x, rows * S, cols * S)[0]  # squashed onto the grid, aspect ratio not kept
    tiles = big.view(3, rows, S, cols, S).permute(1, 3, 0, 2, 4)  # (rows, cols, 3, S, S)
    tiles = tiles.reshape(rows * cols, 3, S, S)  # (rows*cols, 3, S, S), row by row
    return normalize(torch.cat([thumb, tiles]), cfg)  # (1 + rows*cols, 3, S, S)


# ==========================================================================================================
# 3. Vision tower (the Perception Encoder)
# ==========================================================================================================


def pe_rope_angles(cfg: VisionConfig) -> torch.Tensor:
    """(G*G, Dh) rotary angles of the patches, row by row. With d = Dh/4 bands b_i = theta^(-i/d), a patch in
    row r, column c gets [x b_0 .. x b_(d-1), y b_0 .. y b_(d-1)] where x = (c + o) * ref_w / G and
    y = (r + o) * ref_h / G, o = 1 with a class token (its slot is 0) and 0 without; then every angle is
    written twice, side by side, for the interleaved pair rotation: [a0, a0, a1, a1, ...]."""
    G, Dh = cfg.image_size // cfg.patch_size, cfg.embed_dim // cfg.num_heads
    d = Dh // 4
    bands = 1.0 / cfg.rope_theta ** (torch.arange(d, dtype=torch.float) / d)
    o = 1.0 if cfg.class_token else 0.0
    ys = (torch.arange(G, dtype=torch.float) + o) / G * cfg.ref_feat_shape[0]
    xs = (torch.arange(G, dtype=torch.float) + o) / G * cfg.ref_feat_shape[1]
    y, x = torch.meshgrid(ys, xs, indexing="ij")  # (G, G) each: row r, column c
    angles = torch.cat([x.reshape(-1, 1) * bands, y.reshape(-1, 1) * bands], dim=-1)  # (G*G, Dh/2), x first
    return angles.repeat_interleave(2, dim=-1)  # (G*G, Dh)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Interleaved rotation partner: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)  # (..., Dh/2, 2) -> (..., Dh)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        P = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.embed_dim, kernel_size=P, stride=P, bias=False)  # NOTE: no bias

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (n, 3, S, S) -> (n, N, Dv), row by row
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (n, Dv, G, G) -> (n, G*G, Dv)


class PEAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_head = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)  # biases on q, k and v
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_prefix: int) -> torch.Tensor:
        n, L, Dv = x.shape
        q, k, v = self.qkv(x).view(n, L, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)  # each (n, H, L, Dh)
        p = n_prefix  # 2-D rotary positions on the patches only; the class token (row 0) is not rotated
        q = torch.cat([q[:, :, :p], q[:, :, p:] * cos + rotate_pairs(q[:, :, p:]) * sin], 2)  # (n, H, L, Dh)
        k = torch.cat([k[:, :, :p], k[:, :, p:] * cos + rotate_pairs(k[:, :, p:]) * sin], 2)  # (n, H, L, Dh)
        y = F.scaled_dot_product_attention(q, k, v)  # (n, H, L, Dh): bidirectional within one tile
        return self.proj(y.transpose(1, 2).reshape(n, L, Dv))  # (n, L, Dv)


class PEMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # the exact (erf) GELU


class PEBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        eps = cfg.layer_norm_eps
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=eps)
        self.attn = PEAttention(cfg)
        self.gamma_1 = nn.Parameter(torch.ones(cfg.embed_dim))  # LayerScale: a learned per-channel gain
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=eps)
        self.mlp = PEMlp(cfg)
        self.gamma_2 = nn.Parameter(torch.ones(cfg.embed_dim))

    def forward(self, x, cos, sin, n_prefix):
        x = x + self.gamma_1 * self.attn(self.norm1(x), cos, sin, n_prefix)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class PerceptionEncoder(nn.Module):
    """Names follow timm's Eva (what the checkpoint stores under vision_tower.timm_model.*)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        G, Dv = cfg.image_size // cfg.patch_size, cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.n_prefix = 1 if cfg.class_token else 0
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, Dv))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n_prefix + G * G, Dv))  # learned, class slot first
        self.norm_pre = nn.LayerNorm(Dv, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(PEBlock(cfg) for _ in range(cfg.depth))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (n, 3, S, S) -> (n, [1 +] N, Dv)
        S = self.cfg.image_size
        assert pixels.shape[-2:] == (S, S), f"tiles must be {S}x{S} (the processor makes them)"
        x = self.patch_embed(pixels)  # (n, N, Dv)
        if self.n_prefix:
            x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)  # (n, 1 + N, Dv)
        x = self.norm_pre(x + self.pos_embed.to(x.dtype))
        angles = pe_rope_angles(self.cfg).to(x.device)  # float32
        # NOTE: timm keeps this table in the model dtype (bf16 when loaded in bf16); so do we
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, self.n_prefix)
        return x


class VisionTower(nn.Module):  # the checkpoint nests the encoder one level deeper: vision_tower.timm_model.*
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.timm_model = PerceptionEncoder(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.timm_model(pixels)


# ==========================================================================================================
# 4. Projector
# ==========================================================================================================


class Projector(nn.Module):
    def __init__(self, cfg: PerceptionLMConfig):
        super().__init__()
        D = cfg.text_config.hidden_size
        self.linear_1 = nn.Linear(cfg.vision_config.embed_dim, D)
        self.linear_2 = nn.Linear(D, D)
        self.pool = cfg.projector_pooling_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, N, Dv) -> (n, N / pool^2, D)
        x = self.linear_2(F.gelu(self.linear_1(x)))  # per token, exact GELU
        if self.pool == 1:
            return x
        n, N, D = x.shape
        G = math.isqrt(N)
        assert G * G == N, "the patches of a tile form a square grid"
        x = x.transpose(1, 2).reshape(n, D, G, G)  # (n, D, G, G)
        x = F.avg_pool2d(x, self.pool)  # NOTE: pooled after the projector: 32x32 -> 16x16 means of 2x2
        return x.flatten(2).transpose(1, 2)  # (n, (G/pool)^2, D), row by row


# ==========================================================================================================
# 5. Language decoder (Llama 3)
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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # each (..., Dh/2)
    return torch.cat((-x2, x1), dim=-1)  # (..., Dh)


def llama3_inv_freq(cfg: TextConfig, device=None) -> torch.Tensor:
    """RoPE inverse frequencies with Llama 3's long-context scaling: wavelengths longer than orig/low are
    divided by `factor`, shorter than orig/high kept, and blended linearly in between."""
    Dh = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.float, device=device) / Dh)
    if cfg.rope_scaling is None:
        return inv_freq
    factor, low, high, orig = cfg.rope_scaling
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(pos: torch.Tensor, cfg: TextConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (B, T) -> cos, sin (B, T, Dh): angles in float32, then cast to the model dtype."""
    angles = pos[..., None].float() * llama3_inv_freq(cfg, pos.device)  # (B, T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, Dh)
    return angles.cos().to(dtype), angles.sin().to(dtype)


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
        D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.Hkv, self.Dh = H, Hkv, Dh
        self.q_proj = nn.Linear(D, H * Dh, bias=False)  # Llama: no biases anywhere
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)

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
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.Dh))  # (B, T, H*Dh) -> (B, T, D)


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


class LlamaModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def new_caches(self, B: int, S_max: int, like: torch.Tensor) -> list[KVCache]:
        """One empty static cache per layer, (B, Hkv, S_max, Dh), on the device and in the dtype of `like`."""
        Hkv, Dh = self.cfg.num_key_value_heads, self.cfg.head_dim
        return [KVCache(B, Hkv, S_max, Dh, like.device, like.dtype) for _ in self.layers]

    def forward(self, x, pos, mask, caches: list[KVCache] | None = None, slot=0) -> torch.Tensor:
        """x (B, T, D) embeddings, pos (B, T) positions, mask (B, 1, T, S) -> (B, T, D)."""
        cos, sin = rope_cos_sin(pos.to(x.device), self.cfg, x.dtype)  # once for all layers, on x's device
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if caches is None else caches[i], slot)
        return self.norm(x)


# ==========================================================================================================
# 6. The VLM: encode tiles and frames, merge them, masks, forward, generate
# ==========================================================================================================


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


class PerceptionLM(nn.Module):
    quantized_parts = ("language_model", "lm_head")  # what quant.quantize may store in 8 or 4 bits

    def __init__(self, cfg: PerceptionLMConfig):
        super().__init__()
        self.cfg = cfg
        tc = cfg.text_config
        self.vision_tower = VisionTower(cfg.vision_config)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = LlamaModel(tc)
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        if cfg.tie_word_embeddings:  # 1B/3B: the output projection is the embedding matrix
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.eos_token_ids: list[int] = []  # set by load() from generation_config.json
        self.pad_token_id = 0
        self.tokenizer: common.Tokenizer | None = None

    def media_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(items, tiles or frames, 3, S, S) -> (items * tiles * 256, D), tile after tile, thumbnail first."""
        x = self.vision_tower(pixels.flatten(0, 1))  # (n, [1 +] N, Dv)
        if self.cfg.vision_use_cls_token:
            x = x[:, 1:]  # NOTE: the class token's feature is dropped before the projector
        return self.multi_modal_projector(x).flatten(0, 1)  # (n, 256, D) -> (n * 256, D)

    def tokens_per_tile(self) -> int:
        vc = self.cfg.vision_config
        return (vc.image_size // vc.patch_size // self.cfg.projector_pooling_ratio) ** 2

    def embed(self, input_ids, pixel_values=None, pixel_values_videos=None) -> torch.Tensor:
        """Token embeddings with the image features, then the video features, written over their
        placeholders in order."""
        x = self.language_model.embed_tokens(input_ids)  # (B, T, D)
        for what, pixels, token_id in (
            ("image", pixel_values, self.cfg.image_token_id),
            ("video", pixel_values_videos, self.cfg.video_token_id),
        ):
            is_pad = input_ids == token_id
            per_tile = self.tokens_per_tile()
            need = 0 if pixels is None else pixels.shape[0] * pixels.shape[1] * per_tile
            common.check_feature_count(what, f"<|{what}|>", is_pad, need, f"{per_tile} per tile or frame")
            if pixels is not None:
                feats = self.media_features(pixels.to(x.dtype))  # (need, D)
                x = x.masked_scatter(is_pad[..., None], feats.to(x.dtype))  # (B, T, D)
        return x

    def forward(
        self, input_ids, attention_mask=None, pixel_values=None, pixel_values_videos=None
    ) -> torch.Tensor:
        """The full forward pass without a cache: logits (B, T, V). Differentiable.
        Inputs, as the processor returns them: input_ids, attention_mask (B, T); pixel_values (n_images,
        1 + tiles, 3, 448, 448), the thumbnail first; pixel_values_videos (n_videos, F, 3, 448, 448).
        NOTE: positions count real tokens from 0 in every row (padding-aware, as transformers' generate does;
        its cache-less forward numbers left-padded rows from the first column instead)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embed(input_ids, pixel_values, pixel_values_videos)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        h = self.language_model(x, pos, causal_padding_mask(attention_mask.bool(), input_ids.shape[1]))
        return self.lm_head(h)

    def prefill(self, x, pos, mask, caches: list[KVCache], slot: int = 0) -> torch.Tensor:
        """The whole prompt at once: embeddings x (B, T, D) with their positions and mask, written into the
        caches at slots slot .. slot+T-1 -> the logits of each row's last token (B, V); left padding puts
        every row's last token at T-1."""
        h = self.language_model(x, pos, mask, caches, slot)
        return self.lm_head(h[:, -1])  # (B, V)

    def decode_step(self, token, pos, slot, keep, caches: list[KVCache]) -> torch.Tensor:
        """One new token per row, with the same shapes at every step: token (B, 1), its position `pos`, the
        cache slot it is written to (a (1,) tensor), keep (B, S_max) the non-padding slots -> logits (B, V).
        It attends over the whole cache: one additive mask, made here for every layer, hides the padding and
        the slots after `slot`. Nothing in it waits for the host: generate(compile=True) compiles it with the
        sampling (common.next_token)."""
        x = self.language_model.embed_tokens(token)  # (B, 1, D)
        visible = keep & (torch.arange(keep.shape[1], device=keep.device) <= slot)  # (B, S_max)
        mask = torch.where(visible, 0.0, float("-inf")).to(x.dtype)[:, None, None]  # (B, 1, 1, S_max)
        h = self.language_model(x, pos, mask, caches, slot)
        return self.lm_head(h[:, -1])  # (B, V)

    def extend(self, input_ids, media: dict, past: common.Past, max_new_tokens: int):
        """A conversation's next tokens (common.Chat), one row without padding, prefilled at slot past.length
        on top of what the earlier turns left in the caches; `media`: the new images' and videos' processor
        tensors. -> (the last token's logits (1, V), the Decoding for common.decode_loop). A token's
        position is its slot."""
        T, start = input_ids.shape[1], past.length
        common.check_context(start + T, max_new_tokens, self.cfg.text_config.max_position_embeddings)
        x = self.embed(input_ids, **media)
        d = past.room(start + T + max_new_tokens, lambda S: self.language_model.new_caches(1, S, x))
        d.begin(start + T - 1, torch.tensor([start + T - 1], device=x.device))  # no padding
        pos = torch.arange(start, start + T, device=x.device)[None]  # (1, T)
        return self.prefill(x, pos, causal_padding_mask(d.keep[:, : start + T], T, start), d.caches, start), d

    @torch.inference_mode()
    def generate(
        self, input_ids, attention_mask=None, pixel_values=None, pixel_values_videos=None, *,
        max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        repetition_penalty: float = 1.0, seed: int | None = None,
        eos_token_ids: list[int] | int | None = None, streamer=None, compile: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        """New tokens (B, N). Prefill once (vision + prompt) into a static cache, then one token per step.
        `streamer(text)` gets the answer as it is made (one row); eos_token_ids=None: the checkpoint's."""
        # 1. settings and checks
        eos = self.eos_token_ids if eos_token_ids is None else eos_token_ids
        settings = common.GenerationSettings(
            max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, eos
        )
        limit = self.cfg.text_config.max_position_embeddings
        attention_mask = common.check_generate_inputs(input_ids, attention_mask, settings, streamer, limit)
        # 2. vision features, written over the placeholders
        x = self.embed(input_ids, pixel_values, pixel_values_videos)
        # 3. prefill: the whole prompt into the static caches (the last call's, when the shapes match)
        (B, T), S_max = input_ids.shape, common.cache_length(input_ids.shape[1], max_new_tokens)
        d = common.kept_decoding(self, B, S_max, x, lambda: self.language_model.new_caches(B, S_max, x))
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens count from 0
        d.begin(T - 1, pos[:, -1], attention_mask.bool())  # the last prompt token
        first = self.prefill(x, pos, causal_padding_mask(d.keep[:, :T], T), d.caches)  # (B, V)
        # 4. decode, one token per step; position and slot are tensors, so a compiled step never recompiles
        return common.decode_loop(self, first, d, settings, input_ids, attention_mask, streamer, compile)


# ==========================================================================================================
# 7. The processor: chat template, media -> tensors, placeholders
# ==========================================================================================================


IMAGE_TOKEN, VIDEO_TOKEN = "<|image|>", "<|video|>"
DEFAULT_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)


class Processor:
    """Text + images + videos -> the model's inputs, with the same keys and layouts as transformers'
    PerceptionLMProcessor: input_ids, attention_mask, pixel_values (images, 1 + tiles, 3, 448, 448) and
    pixel_values_videos (videos, F, 3, 448, 448)."""

    def __init__(self, tokenizer, image: VisionInputConfig, video: VisionInputConfig, patch: int, pool: int):
        self.tokenizer, self.image, self.video, self.patch, self.pool = tokenizer, image, video, patch, pool
        self.decode, self.batch_decode = tokenizer.decode, tokenizer.batch_decode  # ids -> text
        self.image_token_id = tokenizer.token_id(IMAGE_TOKEN)
        self.video_token_id = tokenizer.token_id(VIDEO_TOKEN)
        self.pad_token_id = tokenizer.token_id("<|end_of_text|>")

    @staticmethod
    def from_dir(ckpt: Path) -> Processor:
        """Settings from preprocessor_config.json / video_preprocessor_config.json / processor_config.json as
        the PLM repos ship them, or the nested processor_config.json of transformers 5."""
        p, image_d, video_d = common.read_processor_configs(ckpt)
        video = VisionInputConfig.from_hf(dict(video_d or {}, vision_input_type="single", max_num_tiles=1))
        return Processor(
            common.Tokenizer(ckpt / "tokenizer.json"),
            VisionInputConfig.from_hf(image_d),
            video,
            p.get("patch_size") or 14,
            p.get("pooling_ratio", 2),
        )

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """What the PLM chat template renders: <|begin_of_text|>, the system header with the given (or the
        default) system message, then per message "<|start_header_id|>{role}<|end_header_id|>\\n\\n", its
        <|image|> then <|video|> placeholders, its text items trimmed and joined, "<|eot_id|>". A string
        `content` is read as one text item (the template renders nothing for it, and a system list as-is)."""

        def text_of(m):
            content = m["content"]
            items = [{"type": "text", "text": content}] if isinstance(content, str) else content
            return "".join(it["text"].strip() for it in items if it.get("type") == "text"), items

        system = DEFAULT_SYSTEM
        if messages and messages[0]["role"] == "system":
            system, messages = text_of(messages[0])[0], messages[1:]
        out = [f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"]
        for m in messages:
            text, items = text_of(m)
            out.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n")
            out += [IMAGE_TOKEN for it in items if it.get("type") == "image"]
            out += [VIDEO_TOKEN for it in items if it.get("type") == "video"]
            out.append(text + "<|eot_id|>")
        if add_generation_prompt:
            out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(out)

    def load_video(self, path: str, num_frames: int | None = None, fps: float | None = None):
        """A video file -> media.Video: `num_frames` frames sampled uniformly (default 16), or `fps` per
        second; never every frame by accident."""
        import media  # PyAV decoding: only for video files

        return media.load_video(path, num_frames=num_frames or (None if fps else 16), fps=fps)

    def preprocess_videos(self, videos: list) -> dict[str, torch.Tensor]:
        out = []
        for video in videos:
            frames = self.load_video(video).frames if isinstance(video, (str, Path)) else video
            S = self.video.tile_size
            x = resize_uint8(common.frames_to_uint8(frames), S, S)  # (F, 3, 448, 448): every frame squashed
            out.append(normalize(x, self.video))
        if len({v.shape[0] for v in out}) > 1:
            raise ValueError(
                f"videos in one call must have the same number of frames: {[len(v) for v in out]}"
            )
        return {"pixel_values_videos": torch.stack(out)}  # (videos, F, 3, 448, 448)

    def __call__(self, text: str | list[str], images=None, videos=None, padding_side: str = "left"):
        texts, images, videos = common.as_list(text), common.as_list(images), common.as_list(videos)
        common.check_placeholders(texts, {IMAGE_TOKEN: images, VIDEO_TOKEN: videos})
        out, tokens = {}, {IMAGE_TOKEN: [], VIDEO_TOKEN: []}
        per_tile = (self.image.tile_size // self.patch // self.pool) ** 2  # 256: 32x32 patches pooled 2x2
        if images:
            tiles = [thumb_and_tiles(im, self.image) for im in images]
            if len({len(t) for t in tiles}) > 1:
                raise ValueError(
                    f"images in one call must give the same number of tiles, got {[len(t) for t in tiles]}: "
                    "process them in separate calls (the reference batches them the same way)"
                )
            out["pixel_values"] = torch.stack(tiles)  # (images, 1 + tiles, 3, 448, 448)
            tokens[IMAGE_TOKEN] = [out["pixel_values"].shape[1] * per_tile] * len(images)
        if videos:
            out.update(self.preprocess_videos(videos))
            tokens[VIDEO_TOKEN] = [out["pixel_values_videos"].shape[1] * per_tile] * len(videos)
        ids = [self.tokenizer.encode(t) for t in common.expand_placeholders(texts, tokens)]
        input_ids, attention_mask = common.pad_batch(ids, self.pad_token_id, padding_side)
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}


# ==========================================================================================================
# 8. Weights
# ==========================================================================================================


def vision_config_from_timm(v: dict) -> VisionConfig:
    """vision_config names a timm architecture (in PE_ARCHITECTURES) and the model_args that override it."""
    arch = v.get("architecture")
    if arch not in PE_ARCHITECTURES:
        raise ValueError(
            f"vision architecture {arch!r}: perception_lm.py implements {sorted(PE_ARCHITECTURES)}"
        )
    a = dict(PE_ARCHITECTURES[arch], **(v.get("model_args") or {}))
    if a.get("use_post_transformer_norm", True) or a.get("init_values") is None or a.get("global_pool") != "":
        raise ValueError("the PE tower must have LayerScale, no final norm and no pooling head, as released")
    img = a.get("img_size", 448)
    img = img if isinstance(img, int) else img[0]
    return VisionConfig(
        embed_dim=a["embed_dim"],
        depth=a["depth"],
        num_heads=a["num_heads"],
        mlp_hidden=int(a["embed_dim"] * a["mlp_ratio"]),
        image_size=img,
        class_token=a.get("class_token", True),
        ref_feat_shape=tuple(a.get("ref_feat_shape") or (img // 14, img // 14)),
    )


def config_from_hf(d: dict) -> PerceptionLMConfig:
    """Reads config.json (the PLM repos were written by transformers, so both formats nest text_config and
    vision_config; vision_config names a timm architecture plus the model_args that override it)."""
    t, v = d.get("text_config") or {}, d.get("vision_config") or {}
    vision = vision_config_from_timm(v)
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"rope_type {kind!r}: perception_lm.py implements default and llama3 RoPE")
    scaling = None
    if kind == "llama3":
        scaling = (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"])
        scaling += (rope["original_max_position_embeddings"],)
    H = t.get("num_attention_heads", 32)
    text = TextConfig(
        vocab_size=t.get("vocab_size", 32000),
        hidden_size=t.get("hidden_size", 4096),
        intermediate_size=t.get("intermediate_size", 11008),
        num_hidden_layers=t.get("num_hidden_layers", 32),
        num_attention_heads=H,
        num_key_value_heads=t.get("num_key_value_heads", H),
        head_dim=t.get("head_dim") or t.get("hidden_size", 4096) // H,
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", t.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=t.get("max_position_embeddings", 2048),
    )
    return PerceptionLMConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=d.get("image_token_id", 128002),
        video_token_id=d.get("video_token_id", 128003),
        vision_use_cls_token=d.get("vision_use_cls_token", True),
        projector_pooling_ratio=d.get("projector_pooling_ratio", 1),
        tie_word_embeddings=d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)),
    )


def rename(key: str) -> str | None:
    """Checkpoint key -> our name. The PLM repos store transformers' own names (`model.vision_tower.
    timm_model.*`, `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head`); ours drop the
    leading `model.`. Rotary tables some conversions stored are recomputed, so they are skipped."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    key = re.sub(r"^model\.(?=vision_tower|multi_modal_projector|language_model)", "", key)
    return re.sub(r"^vision_tower\.(?!timm_model\.)", "vision_tower.timm_model.", key)


def load(name_or_path=DEFAULT, device=None, dtype=None, quantize=None) -> tuple[PerceptionLM, Processor]:
    """A Hub id (or a PRESETS key) or a local directory -> (model in eval mode, processor). `quantize`
    ("int8" or "int4") stores the decoder's linear layers in 8 or 4 bits as they load (quant.py)."""
    ckpt = common.checkpoint_dir(PRESETS.get(name_or_path, name_or_path))
    raw, cfg = common.read_config(ckpt, "perception_lm", config_from_hf)
    device = common.pick_device(device)
    dtype = common.pick_dtype(dtype, device, quantize)
    with torch.device("meta"):
        model = PerceptionLM(cfg)
    if quantize:
        import quant  # the int8/int4 layers: only when asked for

        quant.quantize(model, quantize, device=device, dtype=dtype)
    tied = {"lm_head.weight": "language_model.embed_tokens.weight"} if cfg.tie_word_embeddings else None
    common.load_weights(model, ckpt, rename, device, dtype, tied)
    processor = Processor.from_dir(ckpt)
    if processor.image.tile_size != cfg.vision_config.image_size:
        raise ValueError("the processor's tile_size does not match the vision tower's image size")
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
    ("vision_tower.timm_model.patch_embed", "Perception Encoder patch embedding per tile", "(n, N, Dv)"),
    ("vision_tower.timm_model.norm_pre", "+ CLS and learned positions, LayerNorm", "(n, 1+N, Dv)"),
    ("vision_tower.timm_model.blocks.0", "PE block 1 (2-D RoPE, within each tile)", "(n, 1+N, Dv)"),
    ("multi_modal_projector", "MLP projector, then 2x2 average pooling", "(n, N/4, D)"),
    ("language_model.embed_tokens", "token embeddings (features written over <|image|>)", "(B, T, D)"),
    ("language_model", "decoder stack <- embeddings, positions (B, T), mask", "(B, T, D)"),
    ("language_model.layers.0.self_attn.q_proj", "decoder layer 1: queries, H heads", "(B, T, H*Dh)"),
    ("language_model.layers.0.self_attn.k_proj", "decoder layer 1: keys, Hkv heads (GQA)", "(B, T, Hkv*Dh)"),
    ("language_model.layers.0", "decoder layer 1 (causal attention + SwiGLU)", "(B, T, D)"),
    ("language_model.norm", "final RMSNorm", "(B, T, D)"),
    ("lm_head", "logits", "(B, T, V)"),
]


def main(argv: list[str] | None = None) -> None:
    import cli  # the program's helpers: loaded when the file runs as a program, never on import

    ap = cli.parser(
        PRESETS,
        DEFAULT,
        "Chat with PerceptionLM about images and videos.",
        "python perception_lm.py --image examples/grace_hopper.jpg --prompt 'Describe it.' --max-num-tiles 9",
        frames="16",
        system="the PLM assistant message",
    )
    ap.add_argument("--max-num-tiles", type=int, help="at most this many tiles per image (default: 36)")
    a = cli.check(ap.parse_args(argv))
    if a.max_num_tiles is not None and a.max_num_tiles < 1:
        raise ValueError(f"--max-num-tiles must be >= 1, got {a.max_num_tiles}")

    model, processor = cli.load(load, PRESETS, a)  # one stderr line, and load_s for the summary
    if a.max_num_tiles is not None:
        processor.image = replace(processor.image, max_num_tiles=a.max_num_tiles)
        per_tile, context = model.tokens_per_tile(), model.cfg.text_config.max_position_embeddings
        if (1 + a.max_num_tiles) * per_tile > context:  # found before tiling a large image for minutes
            most = context // per_tile - 1
            raise ValueError(
                f"--max-num-tiles {a.max_num_tiles}: an image could become (1 + {a.max_num_tiles}) x "
                f"{per_tile} tokens, more than the model's context of {context}: use at most {most}"
            )
    if a.chat:  # one load, a conversation on the cache its turns leave
        return cli.chat(a, common.Chat(model, processor, a.system), processor)
    if a.batch_input:  # one prompt over many images, in batches
        return cli.batch(
            a, model, processor, lambda t: processor.apply_chat_template(cli.messages(a, 1, 0, t))
        )
    images, videos = cli.load_media(a, processor)
    prompt = processor.apply_chat_template(cli.messages(a, len(images), len(videos)))
    inputs = processor(text=prompt, images=images or None, videos=[v.frames for v in videos] or None)
    S, per_tile = processor.image.tile_size, model.tokens_per_tile()
    for i, im in enumerate(images):
        c, r = choose_tile_grid(im.width, im.height, S, processor.image.max_num_tiles)
        n = (1 + c * r) * per_tile if processor.image.thumb_and_tiles else per_tile
        cli.say(f"image {i + 1}: {im.width}x{im.height} -> thumbnail + {c}x{r} tiles of {S} -> {n} tokens")
    for i, v in enumerate(videos):
        n = len(v.indices) * per_tile
        cli.say(f"video {i + 1}: {cli.describe(v)} -> {len(v.indices)} tiles of {S} -> {n} tokens")
    if a.show_prompt:
        cli.say(prompt)
    cli.generate_and_report(model, inputs, a, cli.visual_tokens(inputs, processor), STAGES)


if __name__ == "__main__":
    import cli

    cli.run_main(main)
