"""LLaVA-OneVision in one file: anyres tiling, SigLIP vision tower, two-layer projector with image_newline,
Qwen2 decoder, generation, for single images, several images and videos.

What is special about this model:
- "anyres_max_9" for a single image: the image is fitted (aspect kept) into the best of 36 resolutions from
  384x384 to 2304x2304, padded with black, cut into 384x384 tiles; the whole image squashed to 384x384 comes
  first as the "base" tile. Every tile gives 27x27 = 729 SigLIP features.
- The tile features are stitched back into one feature map, the black padding is cut away ("unpad"), the
  map is shrunk with bilinear interpolation when it holds more than 9 tiles' worth of features, and a learned
  `image_newline` vector ends every row. The base tile's 729 features go first, without newlines.
- Several images in one prompt: each is padded to a square (grey), squashed to 384x384: 729 features + one
  newline. A video: every frame's 27x27 features are shrunk to 14x14 (bilinear), all frames are
  concatenated and one newline ends the video.
- SigLIP-So400m with 26 layers; the features are taken before the final LayerNorm (which the checkpoint
  still stores but which is never used), then Linear-GELU-Linear into the Qwen2 decoder (1-D positions).
- Chat format: Qwen's <|im_start|>/<|im_end|> with no default system turn, the images and videos of a turn
  right after its role, each text item after a newline.

Shape legend: B batch, T tokens in this call, S key length (cache + T), D model width, H query heads, Hkv kv
heads, Dh head dim, N vision patches, Dv vision width, F video frames, V vocabulary.

Worked example (0.5b-ov): a 480x640 photo -> best resolution 768x768 -> fitted to 576x768, padded to 768x768
-> 4 tiles + the base = 5 x (3, 384, 384) -> 5 x 729 features -> a 54x54 map, unpadded to 40x54 rows x columns
(the padding was 7 feature rows top and bottom), 2160 features <= 9 x 729 so no shrink -> 40 rows x (54 + 1
newline) = 2200, plus the base 729 = 2929 tokens of width 896.

Where things are (section: what to read first):
  1 config: LlavaOnevisionConfig             2 pixel maths: select_best_resolution, anyres_layout,
    anyres_tiles, square_tile                3 vision tower: SiglipVisionTower    4 projector: Projector
  5 decoder: rope_cos_sin, attend (GQA), KVCache, Attention
  6 the VLM: pack_anyres, pack_video, LlavaOnevision.image_features / embed / prefill / decode_step
  7 the processor: Processor (chat template, tiles, placeholders)   8 weights: config_from_hf, rename, load
  9 command line: STAGES (for --explain), main (cli.py)

Paper: "LLaVA-OneVision: Easy Visual Task Transfer" (arXiv 2408.03326). Matches transformers 5.23
`models/llava_onevision/` (modeling, image/video processing, processing) with `siglip/` and `qwen2/`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ==========================================================================================================
# 1. Config
# ==========================================================================================================

DEFAULT = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
PRESETS = {
    f"{s}-{k}": f"llava-hf/llava-onevision-qwen2-{s}-{k}-hf" for s in ("0.5b", "7b") for k in ("si", "ov")
}
SIDES = (384, 768, 1152, 1536, 1920, 2304)
PINPOINTS = tuple((h, w) for h in SIDES for w in SIDES)  # the 36 (height, width) resolutions to choose from


@dataclass(frozen=True)
class VisionConfig:  # SigLIP-So400m/14 at 384 px, its 27th layer removed
    hidden_size: int = 1152  # Dv
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6


@dataclass(frozen=True)
class TextConfig:  # Qwen2-0.5B
    vocab_size: int = 152000
    hidden_size: int = 896  # D
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14  # H
    num_key_value_heads: int = 2  # Hkv
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768


@dataclass(frozen=True)
class LlavaOnevisionConfig:
    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151646  # <image>
    video_token_id: int = 151647  # <video>
    image_grid_pinpoints: tuple[tuple[int, int], ...] = PINPOINTS
    max_tiles: int = 9  # "anyres_max_9": the feature map is shrunk above 9 tiles' worth
    vision_feature_layer: int = -1  # which hidden state of the tower (-1: after its last layer)
    tie_word_embeddings: bool = True  # 0.5b: true, 7b: false


# ==========================================================================================================
# 2. Pixel maths: anyres tiles and their token counts
# ==========================================================================================================

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionInputConfig:
    """Tile size, normalisation and resolutions, for images or for video frames."""

    size: int = 384  # tile side = the vision tower's image_size
    image_mean: tuple[float, ...] = CLIP_MEAN  # NOTE: the class default; the released checkpoints use 0.5
    image_std: tuple[float, ...] = CLIP_STD
    pinpoints: tuple[tuple[int, int], ...] = PINPOINTS
    grid: int = 27  # features per tile side (num_image_tokens = 729 = 27 x 27)
    max_tiles: int = 9

    def layout(self, H: int, W: int) -> AnyresLayout:
        return anyres_layout(H, W, self.pinpoints, self.size, self.grid, self.max_tiles)

    @staticmethod
    def from_hf(d: dict, num_image_tokens: int = 729, aspect: str = "anyres_max_9") -> VisionInputConfig:
        size = d.get("size") or {}
        if d.get("resample", 3) != 3:
            raise ValueError(f"resample={d['resample']} in the processor config: only bicubic (3) is known")
        return VisionInputConfig(
            size=size.get("height", size.get("shortest_edge", 384)),
            image_mean=tuple(d.get("image_mean", CLIP_MEAN)),
            image_std=tuple(d.get("image_std", CLIP_STD)),
            pinpoints=tuple(tuple(p) for p in d.get("image_grid_pinpoints") or PINPOINTS),
            grid=math.isqrt(num_image_tokens),
            max_tiles=int(aspect.removeprefix("anyres_max_")),
        )


def select_best_resolution(H: int, W: int, pinpoints) -> tuple[int, int]:
    """The (height, width) that keeps the most of the image's pixels when it is fitted inside (aspect kept,
    never enlarged beyond its own area), and on a tie wastes the fewest. The first wins a full tie."""
    best, best_kept, best_waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / W, h / H)
        kept = min(int(W * scale) * int(H * scale), W * H)
        waste = h * w - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (h, w), kept, waste
    return best


def fit_inside(H: int, W: int, h: int, w: int) -> tuple[int, int]:
    """The size an H x W image is resized to so it fits h x w with its aspect ratio (rounded up)."""
    if w / W < h / H:
        return min(math.ceil(H * w / W), h), w
    return h, min(math.ceil(W * h / H), w)


class AnyresLayout(NamedTuple):
    """Everything about one image's anyres features, from its size alone."""

    tiles: tuple[int, int]  # (rows, cols) of tiles the best resolution holds
    crop_rows: int  # feature rows cut from the top and from the bottom: the letterbox padding
    crop_cols: int  # the same for columns (one of the two is 0)
    cropped: tuple[int, int]  # the feature map after the crop
    size: tuple[int, int]  # ... and after the shrink to about max_tiles tiles' worth
    tokens: int  # grid**2 (base tile) + rows' * (cols' + 1 newline)


def anyres_layout(
    H: int, W: int, pinpoints, tile: int = 384, grid: int = 27, max_tiles: int = 9
) -> AnyresLayout:
    """The layout of an H x W image's features (the processor counts tokens with it, the model packs features
    with it, so the two always agree): the image fitted into the best resolution as rows x cols tiles, each
    tile `grid` x `grid` features, stitched into one map of rows*27 x cols*27, the padding cut away, and the
    map shrunk when it holds more than `max_tiles` tiles' worth."""
    bh, bw = select_best_resolution(H, W, pinpoints)
    h, w = bh // tile * grid, bw // tile * grid  # the stitched feature map
    crop_rows = crop_cols = 0
    # NOTE: compare aspect ratios, then round the scaled side to 7 decimals before int(), as the reference.
    if W / H > w / h:
        crop_rows = (h - int(round(H * (w / W), 7))) // 2
    else:
        crop_cols = (w - int(round(W * (h / H), 7))) // 2
    ch, cw = h - 2 * crop_rows, w - 2 * crop_cols
    ratio = math.sqrt(ch * cw / (max_tiles * grid * grid))
    rh, rw = (int(ch // ratio), int(cw // ratio)) if ratio > 1.1 else (ch, cw)
    return AnyresLayout(
        (bh // tile, bw // tile), crop_rows, crop_cols, (ch, cw), (rh, rw), grid**2 + rh * (rw + 1)
    )


def resize_uint8(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, 3, H, W) uint8 -> (n, 3, h, w) uint8. NOTE: the reference resizes the uint8 tensor with torchvision
    (antialiased bicubic, rounded back to uint8), which is exactly torch's own uint8 interpolate."""
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)


def normalize(x: torch.Tensor, cfg: VisionInputConfig) -> torch.Tensor:  # uint8 -> float32, (x - 255m) / 255s
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1) * 255.0  # (3, 1, 1)
    return (x.float() - mean) / (torch.tensor(cfg.image_std).view(3, 1, 1) * 255.0)  # x's shape, float32


def anyres_tiles(image: torch.Tensor, cfg: VisionInputConfig) -> torch.Tensor:
    """(3, H, W) uint8 -> (1 + rows*cols, 3, 384, 384) float32: the base image squashed to 384x384, then the
    tiles of the image fitted into the best resolution and padded with black (0) around it, row by row."""
    H, W = image.shape[-2:]
    S = cfg.size
    bh, bw = select_best_resolution(H, W, cfg.pinpoints)
    nh, nw = fit_inside(H, W, bh, bw)
    top, left = (bh - nh) // 2, (bw - nw) // 2  # the odd pixel of padding goes to the bottom / right
    canvas = torch.zeros(3, bh, bw, dtype=torch.uint8)
    canvas[:, top : top + nh, left : left + nw] = resize_uint8(image[None], nh, nw)[0]  # (3, nh, nw) inside
    tiles = canvas.view(3, bh // S, S, bw // S, S).permute(1, 3, 0, 2, 4)  # (rows, cols, 3, S, S)
    tiles = tiles.reshape(-1, 3, S, S)  # (rows*cols, 3, S, S), row by row
    return normalize(torch.cat([resize_uint8(image[None], S, S), tiles]), cfg)  # (1 + n, 3, S, S)


def square_tile(image: torch.Tensor, cfg: VisionInputConfig) -> torch.Tensor:
    """(3, H, W) uint8 -> (1, 3, 384, 384): padded to a square with the colour int(255 mean), squashed."""
    H, W = image.shape[-2:]
    L = max(H, W)
    fill = torch.tensor([int(m * 255) for m in cfg.image_mean], dtype=torch.uint8).view(3, 1, 1)  # (3, 1, 1)
    canvas = fill.expand(3, L, L).clone()  # (3, L, L)
    top, left = (L - H) // 2, (L - W) // 2
    canvas[:, top : top + H, left : left + W] = image
    return normalize(resize_uint8(canvas[None], cfg.size, cfg.size), cfg)  # (1, 3, S, S)


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
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh): every patch sees every patch of its tile
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
    def __init__(self, cfg: VisionConfig, feature_layer: int = -1):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        # `encoder.layers.{i}` as in the checkpoint (the encoder holds nothing but its layers)
        layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.encoder = nn.ModuleDict({"layers": layers})
        self.n_used = cfg.num_hidden_layers + 1 + feature_layer  # hidden state -1 = after the last layer
        # NOTE: no post_layernorm: the checkpoint stores one, but the features are taken before it

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (n, 3, S, S) -> (n, N, Dv)
        x = self.embeddings(pixels)
        for layer in self.encoder["layers"][: self.n_used]:
            x = layer(x)
        return x


# ==========================================================================================================
# 4. Projector
# ==========================================================================================================


class Projector(nn.Module):
    def __init__(self, cfg: LlavaOnevisionConfig):
        super().__init__()
        D = cfg.text_config.hidden_size
        self.linear_1 = nn.Linear(cfg.vision_config.hidden_size, D)
        self.linear_2 = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, N, Dv) -> (n, N, D)
        return self.linear_2(F.gelu(self.linear_1(x)))  # NOTE: the exact (erf) GELU here, tanh in SigLIP


# ==========================================================================================================
# 5. Language decoder (Qwen2)
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


def rope_cos_sin(pos: torch.Tensor, cfg: TextConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (B, T) -> cos, sin (B, T, Dh): angles in float32, then cast to the model dtype."""
    Dh = cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.float, device=pos.device) / Dh)
    angles = pos[..., None].float() * inv_freq  # (B, T, Dh/2)
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

    def forward(self, x, pos, mask, caches: list[KVCache] | None = None, slot=0) -> torch.Tensor:
        """x (B, T, D) embeddings, pos (B, T) positions, mask (B, 1, T, S) -> (B, T, D)."""
        cos, sin = rope_cos_sin(pos.to(x.device), self.cfg, x.dtype)  # once for all layers, on x's device
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if caches is None else caches[i], slot)
        return self.norm(x)


# ==========================================================================================================
# 6. The VLM: pack image and video features, merge them, masks, forward, generate
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


def pack_anyres(f: torch.Tensor, lay: AnyresLayout, newline: torch.Tensor) -> torch.Tensor:
    """An image alone in its row: f (1 + rows*cols, G*G, D) projected tile features -> (tokens, D): the base
    tile, then the stitched, unpadded, maybe shrunk map row by row, a learned newline after each row."""
    (rows, cols), G, D = lay.tiles, math.isqrt(f.shape[1]), f.shape[-1]
    m = f[1:].view(rows, cols, G, G, D).permute(4, 0, 2, 1, 3).reshape(D, rows * G, cols * G)  # (D, h, w)
    r, c = lay.crop_rows, lay.crop_cols
    m = m[:, r : m.shape[1] - r, c : m.shape[2] - c]  # unpad: (D, ch, cw)
    if lay.size != lay.cropped:  # more than max_tiles' worth: shrink (bilinear, no antialias)
        m = F.interpolate(m[None], size=lay.size, mode="bilinear", align_corners=False)[0]  # (D, rh, rw)
    newlines = newline.to(m.dtype)[:, None, None].expand(D, m.shape[1], 1)  # (D, rh, 1)
    m = torch.cat([m, newlines], dim=2)  # (D, rh, rw + 1)
    return torch.cat([f[0], m.flatten(1).T])  # (G*G + rh * (rw + 1), D)


def pack_video(x: torch.Tensor, V: int, newline: torch.Tensor) -> torch.Tensor:
    """(V*F, G*G, D) projected frame features -> (V, F * g * g + 1, D): each frame's G x G map shrunk to
    g x g, g = ceil(G / 2) = 14 (bilinear), the frames one after another, one newline at the very end."""
    n, G, D = x.shape[0], math.isqrt(x.shape[1]), x.shape[-1]
    x = x.view(n, G, G, D).permute(0, 3, 1, 2)  # (V*F, D, G, G)
    g = math.ceil(G / 2)  # 14
    x = F.interpolate(x, size=(g, g), mode="bilinear", align_corners=False)  # (V*F, D, 14, 14)
    x = x.permute(0, 2, 3, 1).reshape(V, -1, D)  # (V, F * 14 * 14, D)
    return torch.cat([x, newline.to(x.dtype).expand(V, 1, D)], dim=1)  # (V, F * 196 + 1, D)


def image_layouts(cfg: LlavaOnevisionConfig, image_sizes, batch_num_images=None) -> list[AnyresLayout | None]:
    """Per image: its anyres layout (the processor's rule, from the model's config) when it is alone in its
    row, None when it is one of several (then it is one square tile). NOTE: index metadata, read on the
    host: the tiles are laid out in Python."""
    S = cfg.vision_config.image_size
    grid, counts = S // cfg.vision_config.patch_size, [1] * len(image_sizes)
    counts = counts if batch_num_images is None else batch_num_images.tolist()
    alone = [n == 1 for n in counts for _ in range(n)]
    return [
        anyres_layout(H, W, cfg.image_grid_pinpoints, S, grid, cfg.max_tiles) if a else None
        for a, (H, W) in zip(alone, image_sizes.tolist(), strict=True)
    ]


def video_tokens(grid: int, n_frames: int) -> int:
    """A video's placeholder count: 14 x 14 per frame (27 x 27 features shrunk) and one newline at the end."""
    return n_frames * math.ceil(grid / 2) ** 2 + 1


class LlavaOnevision(nn.Module):
    quantized_parts = ("language_model", "lm_head")  # what quant.quantize may store in 8 or 4 bits

    def __init__(self, cfg: LlavaOnevisionConfig):
        super().__init__()
        self.cfg = cfg
        tc, vc = cfg.text_config, cfg.vision_config
        self.vision_tower = SiglipVisionTower(vc, cfg.vision_feature_layer)
        self.multi_modal_projector = Projector(cfg)
        # A learned vector that ends every row of an image's features (and every video).
        self.image_newline = nn.Parameter(torch.zeros(tc.hidden_size))
        self.language_model = Qwen2Model(tc)
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        if cfg.tie_word_embeddings:  # 0.5b: the output projection is the embedding matrix
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.grid = vc.image_size // vc.patch_size  # 27 features per tile side
        self.eos_token_ids: list[int] = []  # set by load() from generation_config.json
        self.pad_token_id = 0
        self.tokenizer: common.Tokenizer | None = None

    def image_features(self, pixel_values, image_sizes, batch_num_images=None) -> list[torch.Tensor]:
        """Per image (tokens, D): anyres packing for an image alone in its row, else its one square tile
        (729 features) and a newline. All tiles of all images go through the tower in one batch."""
        layouts = image_layouts(self.cfg, image_sizes, batch_num_images)
        n_tiles = [1 if lay is None else math.prod(lay.tiles) + 1 for lay in layouts]
        tiles = torch.cat([px[:n] for px, n in zip(pixel_values, n_tiles, strict=True)])  # (sum n, 3, S, S)
        feats = self.multi_modal_projector(self.vision_tower(tiles)).split(n_tiles)  # (n, 729, D) each
        newline = self.image_newline[None].to(feats[0].dtype)  # (1, D): after a square tile's 729 features
        return [  # each (tokens, D)
            torch.cat([f[0], newline]) if lay is None else pack_anyres(f, lay, self.image_newline)
            for f, lay in zip(feats, layouts, strict=True)
        ]

    def video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """(videos, F, 3, S, S) -> (videos, F * 14 * 14 + 1, D): each frame's 27x27 features shrunk to 14x14
        (bilinear, after the projector), the frames one after another, one newline at the very end."""
        x = self.multi_modal_projector(self.vision_tower(pixel_values_videos.flatten(0, 1)))  # (V*F, G*G, D)
        return pack_video(x, pixel_values_videos.shape[0], self.image_newline)  # (V, F * 196 + 1, D)

    def embed(
        self, input_ids, pixel_values=None, image_sizes=None, batch_num_images=None, pixel_values_videos=None
    ):
        """Token embeddings with the image and video features written over their placeholders, in order.
        The placeholder counts are checked against the images' sizes before the vision tower runs."""
        x = self.language_model.embed_tokens(input_ids)  # (B, T, D)
        is_image, is_video = input_ids == self.cfg.image_token_id, input_ids == self.cfg.video_token_id
        layouts = [] if pixel_values is None else image_layouts(self.cfg, image_sizes, batch_num_images)
        per_image = [self.grid**2 + 1 if lay is None else lay.tokens for lay in layouts]
        sizes = f"{per_image} for the image sizes {image_sizes.tolist()}" if per_image else ""
        common.check_feature_count("image", "<image>", is_image, sum(per_image), sizes)
        V, Fr = (0, 0) if pixel_values_videos is None else pixel_values_videos.shape[:2]  # one F for all
        common.check_feature_count("video", "<video>", is_video, V * video_tokens(self.grid, Fr))
        if pixel_values is not None:
            feats = self.image_features(pixel_values.to(x.dtype), image_sizes, batch_num_images)
            x = x.masked_scatter(is_image[..., None], torch.cat(feats).to(x.dtype))  # (B, T, D)
        if pixel_values_videos is not None:
            feats = self.video_features(pixel_values_videos.to(x.dtype)).flatten(0, 1)  # (videos * tokens, D)
            x = x.masked_scatter(is_video[..., None], feats.to(x.dtype))  # (B, T, D)
        return x

    def forward(
        self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
        pixel_values_videos=None,
    ) -> torch.Tensor:  # fmt: skip
        """The full forward pass without a cache: logits (B, T, V). Differentiable.
        Inputs, as the processor returns them: input_ids, attention_mask (B, T); pixel_values (n_images,
        max tiles, 3, 384, 384), image_sizes (n_images, 2) as (H, W), batch_num_images (rows with images,);
        pixel_values_videos (n_videos, F, 3, 384, 384).
        NOTE: positions count real tokens from 0 in every row (padding-aware, as transformers' generate does;
        its cache-less forward numbers left-padded rows from the first column instead)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embed(input_ids, pixel_values, image_sizes, batch_num_images, pixel_values_videos)
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
        """A conversation's next tokens (common.Chat), one row, prefilled at slot past.length on the caches
        the earlier turns filled; `media`: the new media's processor tensors; a token's position is its slot.
        -> (the last token's logits (1, V), the Decoding for common.decode_loop)."""
        T, start = input_ids.shape[1], past.length
        common.check_context(start + T, max_new_tokens, self.cfg.text_config.max_position_embeddings)
        x = self.embed(input_ids, **media)
        d = past.room(start + T + max_new_tokens, lambda S: self.language_model.new_caches(1, S, x))
        d.begin(start + T - 1, torch.tensor([start + T - 1], device=x.device))  # no padding
        pos = torch.arange(start, start + T, device=x.device)[None]  # (1, T)
        return self.prefill(x, pos, causal_padding_mask(d.keep[:, : start + T], T, start), d.caches, start), d

    @torch.inference_mode()
    def generate(
        self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
        pixel_values_videos=None, *,
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
        x = self.embed(input_ids, pixel_values, image_sizes, batch_num_images, pixel_values_videos)
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


IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"


class Processor:
    """Text + images + videos -> the model's inputs, with the same keys and layouts as transformers'
    LlavaOnevisionProcessor: input_ids, attention_mask, pixel_values (images, max tiles, 3, 384, 384),
    image_sizes (images, 2) as (H, W), batch_num_images, pixel_values_videos (videos, F, 3, 384, 384)."""

    def __init__(self, tokenizer: common.Tokenizer, image: VisionInputConfig, video: VisionInputConfig):
        self.tokenizer, self.image, self.video = tokenizer, image, video
        self.decode, self.batch_decode = tokenizer.decode, tokenizer.batch_decode  # ids -> text
        self.image_token_id = tokenizer.token_id(IMAGE_TOKEN)
        self.video_token_id = tokenizer.token_id(VIDEO_TOKEN)
        self.pad_token_id = tokenizer.token_id("<|endoftext|>")

    @staticmethod
    def from_dir(ckpt: Path) -> Processor:
        """Settings from preprocessor_config.json + processor_config.json (published repos) or the nested
        processor_config.json (transformers 5). Without a video config the image values are used."""
        p, image_d, video_d = common.read_processor_configs(ckpt)
        extra = (p.get("num_image_tokens", 729), p.get("vision_aspect_ratio", "anyres_max_9"))
        video_d = image_d if video_d is None else video_d
        image, video = (VisionInputConfig.from_hf(d, *extra) for d in (image_d, video_d))
        return Processor(common.Tokenizer(ckpt / "tokenizer.json"), image, video)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """What the llava-hf chat template renders, a string `content` read as one text item (the template
        renders nothing for it). Per message: "<|im_start|>" + role + " ", every image item as <image> and
        every video item as <video> (wherever they are among the text items), each text item after a "\\n",
        "<|im_end|>". Example: <|im_start|>user <image>\\nWhat is shown?<|im_end|><|im_start|>assistant\\n"""
        out = []
        for m in messages:
            content = m["content"]
            items = [{"type": "text", "text": content}] if isinstance(content, str) else content
            out.append(f"<|im_start|>{m['role']} ")
            out += [IMAGE_TOKEN for it in items if it.get("type") == "image"]
            out += [VIDEO_TOKEN for it in items if it.get("type") == "video"]
            out += ["\n" + it["text"] for it in items if it.get("type") == "text"]
            out.append("<|im_end|>")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    def load_video(self, path: str, num_frames: int | None = None, fps: float | None = None):
        """A video file -> media.Video: `num_frames` frames sampled uniformly (default 8, as the model card),
        or `fps` per second; never every frame by accident."""
        import media  # PyAV decoding: only for video files

        return media.load_video(path, num_frames=num_frames or (None if fps else 8), fps=fps)

    def preprocess_videos(self, videos: list) -> dict[str, torch.Tensor]:
        out = []
        for video in videos:
            frames = self.load_video(video).frames if isinstance(video, (str, Path)) else video
            S = self.video.size
            x = resize_uint8(common.frames_to_uint8(frames), S, S)  # (F, 3, 384, 384)
            out.append(normalize(x, self.video))
        if len({v.shape[0] for v in out}) > 1:
            raise ValueError(
                f"videos in one call must have the same number of frames: {[len(v) for v in out]}"
            )
        return {"pixel_values_videos": torch.stack(out)}  # (videos, F, 3, 384, 384)

    def __call__(self, text: str | list[str], images=None, videos=None, padding_side: str = "left"):
        """`images`: in the order of the <image> placeholders, flat or one list per row. A row with one image
        gets the anyres tiles; a row with several gets one square tile per image (the released model's
        rule; transformers decides from how the list is nested)."""
        texts, videos = common.as_list(text), common.as_list(videos)
        images = [im for row in common.as_list(images) for im in common.as_list(row)]  # flat
        common.check_placeholders(texts, {IMAGE_TOKEN: images, VIDEO_TOKEN: videos})
        per_row = [t.count(IMAGE_TOKEN) for t in texts]
        out, per_image, per_video = {}, [], []
        if images:
            several = [n > 1 for n in per_row for _ in range(n)]  # is the image one of several in its row?
            pixels, sizes = [], []
            for image, many in zip(images, several, strict=True):
                x = common.image_to_uint8(image)  # (3, H, W)
                sizes.append(list(x.shape[-2:]))
                pixels.append(square_tile(x, self.image) if many else anyres_tiles(x, self.image))
                per_image.append(self.image.grid**2 + 1 if many else self.image.layout(*sizes[-1]).tokens)
            n_max = max(len(p) for p in pixels)  # pad with zero tiles to the longest image, as transformers
            pixels = [F.pad(p, (0, 0, 0, 0, 0, 0, 0, n_max - len(p))) for p in pixels]
            out["pixel_values"] = torch.stack(pixels)  # (images, max tiles, 3, 384, 384)
            out["image_sizes"] = torch.tensor(sizes, dtype=torch.long)  # (images, 2) as (H, W)
            out["batch_num_images"] = torch.tensor([n for n in per_row if n], dtype=torch.long)
        if videos:
            out.update(self.preprocess_videos(videos))
            n_frames = out["pixel_values_videos"].shape[1]
            per_video = [video_tokens(self.video.grid, n_frames)] * len(videos)
        tokens = {IMAGE_TOKEN: per_image, VIDEO_TOKEN: per_video}
        ids = [self.tokenizer.encode(t) for t in common.expand_placeholders(texts, tokens)]
        input_ids, attention_mask = common.pad_batch(ids, self.pad_token_id, padding_side)
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}


# ==========================================================================================================
# 8. Weights
# ==========================================================================================================


def config_from_hf(d: dict) -> LlavaOnevisionConfig:
    """Reads config.json (published and transformers-5 formats: both nest text_config/vision_config;
    fields a file leaves out take transformers' class defaults, e.g. Qwen2's rope_theta of 10000)."""
    t, v = d.get("text_config") or {}, d.get("vision_config") or {}
    if d.get("vision_feature_select_strategy", "full") != "full":
        raise ValueError("vision_feature_select_strategy must be 'full' (SigLIP has no class token to drop)")
    if not isinstance(d.get("vision_feature_layer", -1), int) or d.get("vision_feature_layer", -1) >= 0:
        raise ValueError("vision_feature_layer must be one negative layer index (the released -1)")
    aspect = d.get("vision_aspect_ratio", "anyres_max_9")
    if not re.fullmatch(r"anyres_max_\d+", aspect):
        raise ValueError(f"vision_aspect_ratio={aspect!r}: llava_onevision.py implements anyres_max_N only")
    act, bias = d.get("projector_hidden_act", "gelu"), d.get("multimodal_projector_bias", True)
    if act != "gelu" or bias is not True:
        raise ValueError("the projector must be Linear-GELU-Linear with biases, as released")
    rope = t.get("rope_parameters") or {}
    text = TextConfig(
        vocab_size=t.get("vocab_size", 151936),
        hidden_size=t.get("hidden_size", 4096),
        intermediate_size=t.get("intermediate_size", 22016),
        num_hidden_layers=t.get("num_hidden_layers", 32),
        num_attention_heads=t.get("num_attention_heads", 32),
        num_key_value_heads=t.get("num_key_value_heads", t.get("num_attention_heads", 32)),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", t.get("rope_theta", 10000.0)),
        max_position_embeddings=t.get("max_position_embeddings", 32768),
    )
    vision = VisionConfig(
        hidden_size=v.get("hidden_size", 1152),
        intermediate_size=v.get("intermediate_size", 4304),
        num_hidden_layers=v.get("num_hidden_layers", 26),
        num_attention_heads=v.get("num_attention_heads", 16),
        num_channels=v.get("num_channels", 3),
        image_size=v.get("image_size", 384),
        patch_size=v.get("patch_size", 14),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
    )
    return LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=d.get("image_token_index", d.get("image_token_id", 151646)),
        video_token_id=d.get("video_token_index", d.get("video_token_id", 151647)),
        image_grid_pinpoints=tuple(tuple(p) for p in d.get("image_grid_pinpoints") or PINPOINTS),
        max_tiles=int(aspect.removeprefix("anyres_max_")),
        vision_feature_layer=d.get("vision_feature_layer", -1),
        tie_word_embeddings=d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)),
    )


def rename(key: str) -> str | None:
    """Checkpoint key -> our name. Ours are transformers 5's names without the leading `model.`. The published
    llava-hf repos nest deeper (`vision_tower.vision_model.*`, `language_model.model.*`,
    `language_model.lm_head`); transformers 5 writes `model.*` in memory and a mix when it saves."""
    key = re.sub(r"^model\.(?=vision_tower|multi_modal_projector|language_model|image_newline)", "", key)
    key = re.sub(r"^vision_tower\.vision_model\.", "vision_tower.", key)
    if key.startswith("vision_tower.post_layernorm."):
        return None  # stored, never used: the features are taken before it
    key = re.sub(r"^language_model\.lm_head\.", "lm_head.", key)
    return re.sub(r"^language_model\.model\.", "language_model.", key)


def load(name_or_path=DEFAULT, device=None, dtype=None, quantize=None) -> tuple[LlavaOnevision, Processor]:
    """A Hub id (or a PRESETS key) or a local directory -> (model in eval mode, processor). `quantize`
    ("int8" or "int4") stores the decoder's linear layers in 8 or 4 bits as they load (quant.py)."""
    ckpt = common.checkpoint_dir(PRESETS.get(name_or_path, name_or_path))
    raw, cfg = common.read_config(ckpt, "llava_onevision", config_from_hf)
    device = common.pick_device(device)
    dtype = common.pick_dtype(dtype, device, quantize)
    with torch.device("meta"):
        model = LlavaOnevision(cfg)
    if quantize:
        import quant  # the int8/int4 layers: only when asked for

        quant.quantize(model, quantize, device=device, dtype=dtype)
    tied = {"lm_head.weight": "language_model.embed_tokens.weight"} if cfg.tie_word_embeddings else None
    common.load_weights(model, ckpt, rename, device, dtype, tied)
    processor = Processor.from_dir(ckpt)
    if (processor.image.size, processor.image.grid) != (cfg.vision_config.image_size, model.grid):
        raise ValueError("the processor config's tile size does not match the vision tower's image_size")
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
    ("vision_tower.embeddings", "SigLIP patch embedding of every tile", "(n, N, Dv)"),
    ("vision_tower.encoder.layers.0", "SigLIP layer 1 (within each tile)", "(n, N, Dv)"),
    ("multi_modal_projector", "2-layer MLP projector -> decoder width", "(n, N, D)"),
    ("language_model.embed_tokens", "token embeddings (packed features written over <image>)", "(B, T, D)"),
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
        "Chat with LLaVA-OneVision about images and videos (one image: anyres tiles; several: a tile each).",
        "python llava_onevision.py --image examples/grace_hopper.jpg --prompt 'What is shown in this image?'",
        frames="8",
        system="none",
    )
    a = cli.check(ap.parse_args(argv))

    model, processor = cli.load(load, PRESETS, a)  # one stderr line, and load_s for the summary
    if a.chat:  # one load, a conversation on the cache its turns leave
        return cli.chat(a, common.Chat(model, processor, a.system), processor)
    if a.batch_input:  # one prompt over many images, in batches
        return cli.batch(
            a, model, processor, lambda t: processor.apply_chat_template(cli.messages(a, 1, 0, t))
        )
    images, videos = cli.load_media(a, processor)
    prompt = processor.apply_chat_template(cli.messages(a, len(images), len(videos)))
    inputs = processor(text=prompt, images=images or None, videos=[v.frames for v in videos] or None)
    S = processor.image.size
    for i, im in enumerate(images):
        if len(images) == 1:
            lay = processor.image.layout(im.height, im.width)
            (r, c), n = lay.tiles, lay.tokens
            cli.say(f"image 1: {im.width}x{im.height} -> base {S}x{S} + {r}x{c} tiles of {S} -> {n} tokens")
        else:
            n = processor.image.grid**2 + 1
            cli.say(f"image {i + 1}: {im.width}x{im.height} -> one {S}x{S} tile -> {n} tokens")
    for i, v in enumerate(videos):
        n = len(v.indices) * math.ceil(processor.video.grid / 2) ** 2 + 1
        cli.say(f"video {i + 1}: {cli.describe(v)} -> {len(v.indices)} tiles of {S} -> {n} tokens")
    if a.show_prompt:
        cli.say(prompt)
    cli.generate_and_report(model, inputs, a, cli.visual_tokens(inputs, processor), STAGES)


if __name__ == "__main__":
    import cli

    cli.run_main(main)
