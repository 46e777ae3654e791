"""Video-LLaVA in one file: CLIP preprocessing, two CLIP ViT-L/14 towers (images, videos), a shared projector,
the Llama (Vicuna) decoder, generation.

What is special about this model:
- Two vision towers with the same CLIP ViT-L/14 architecture (written once below, instantiated twice) but
  different weights: LanguageBind's image encoder for images, its video encoder for video frames.
- Features come from the penultimate layer (hidden state -2), after CLIP's `pre_layrnorm` and never through
  `post_layernorm`. Images drop the class token (256 tokens each); video frames keep it (257 per frame).
- A video is 8 frames, sampled uniformly (the model was trained with 8): 8 x 257 = 2056 tokens.
- One projector (Linear-GELU-Linear) serves both towers; the decoder is Vicuna-7B v1.5 (Llama 2): RMSNorm eps
  1e-5, 32 heads without GQA, RoPE theta 10000, 0-based positions.
- Prompt: "USER: <image>\\n{question} ASSISTANT:", BOS first (the Llama tokenizer's own rule).

Shape legend: B batch, T tokens in this call, S key length (cache + T), D model width, H query heads, Hkv kv
heads, Dh head dim, N vision patches, Dv vision width, F video frames, V vocabulary.

Worked example (Video-LLaVA-7B): a 480x640 photo -> shortest edge 224 -> 224x298 -> centre crop 224x224 ->
image tower -> hidden state -2 (1, 257, 1024) -> drop CLS -> 256 x 1024 -> projector -> 256 x 4096. A video
-> 8 frames of 224x224 -> video tower -> (8, 257, 1024) -> projector -> 2056 x 4096, frame after frame.

Where things are (section: what to read first):
  1 config: VideoLlavaConfig                 2 pixel maths: preprocess_image, preprocess_frames
  3 vision towers: ClipVisionTower           4 projector: Projector
  5 decoder: rope_cos_sin, attend, KVCache, Attention
  6 the VLM: VideoLlava.image_features, video_features, embed / prefill / decode_step / generate
  7 the processor: Processor (chat template, 8 frames, placeholders)
  8 weights: config_from_hf, rename, load    9 command line: STAGES (for --explain), main (cli.py)

Paper: "Video-LLaVA: Learning United Visual Representation by Alignment Before Projection" (arXiv
2311.10122). Matches transformers 5.23 `models/video_llava/` with `clip/` and `llama/`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common

# ==========================================================================================================
# 1. Config
# ==========================================================================================================

DEFAULT = "LanguageBind/Video-LLaVA-7B-hf"
PRESETS = {"7b": DEFAULT}
TRAINED_FRAMES = 8


@dataclass(frozen=True)
class VisionConfig:  # CLIP ViT-L/14 at 224 px
    hidden_size: int = 1024  # Dv
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class TextConfig:  # Vicuna-7B v1.5 (Llama 2)
    vocab_size: int = 32064
    hidden_size: int = 4096  # D
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # H
    num_key_value_heads: int = 32  # Hkv
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096


@dataclass(frozen=True)
class VideoLlavaConfig:
    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 32000  # <image>
    video_token_id: int = 32001  # <video>
    vision_feature_layer: int = -2  # the penultimate layer's output
    tie_word_embeddings: bool = False


# ==========================================================================================================
# 2. Pixel maths: shortest edge, centre crop
# ==========================================================================================================

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionInputConfig:
    shortest_edge: int = 224
    crop: int = 224
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @staticmethod
    def from_hf(d: dict) -> VisionInputConfig:
        size, crop = d.get("size") or {}, d.get("crop_size") or {}
        if d.get("resample", 3) != 3:
            raise ValueError(f"resample={d['resample']} in the processor config: only bicubic (3) is known")
        return VisionInputConfig(
            shortest_edge=size.get("shortest_edge", 224),
            crop=crop.get("height", 224),
            image_mean=tuple(d.get("image_mean", CLIP_MEAN)),
            image_std=tuple(d.get("image_std", CLIP_STD)),
        )


def shortest_edge_size(h: int, w: int, short: int) -> tuple[int, int]:
    """The short side becomes `short`, the long side int(short * long / short_side): truncated."""
    return (int(short * h / w), short) if w <= h else (short, int(short * w / h))


def preprocess_image(image, cfg: VisionInputConfig) -> torch.Tensor:
    """An image -> (3, 224, 224) float32. NOTE: Video-LLaVA's image processor is the PIL one: PIL's bicubic
    resize (not torch's), centre crop at ((h - 224) // 2, (w - 224) // 2), x / 255 computed in float64, then
    (x - mean) / std in float32. Video frames go the torch way (`preprocess_frames`): a few levels apart."""
    img = Image.fromarray(common.image_to_uint8(image).permute(1, 2, 0).numpy())  # PIL RGB
    h, w = shortest_edge_size(img.height, img.width, cfg.shortest_edge)
    x = np.asarray(img.resize((w, h), resample=Image.Resampling.BICUBIC, reducing_gap=None))
    C = cfg.crop
    top, left = (h - C) // 2, (w - C) // 2
    x = (x[top : top + C, left : left + C].astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(cfg.image_mean, np.float32)) / np.array(cfg.image_std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()  # (3, 224, 224)


def preprocess_frames(frames: torch.Tensor, cfg: VisionInputConfig) -> torch.Tensor:
    """(F, 3, H, W) uint8 -> (F, 3, 224, 224) float32. NOTE: the reference video processor resizes the uint8
    tensor with torchvision (antialiased bicubic, back to uint8): exactly torch's uint8 interpolate; the crop
    offsets are rounded, (x - 255 mean) / (255 std) in float32."""
    h, w = shortest_edge_size(frames.shape[-2], frames.shape[-1], cfg.shortest_edge)
    x = F.interpolate(frames, (h, w), mode="bicubic", antialias=True, align_corners=False)  # (F, 3, h, w)
    C = cfg.crop
    top, left = int(round((h - C) / 2.0)), int(round((w - C) / 2.0))
    x = x[..., top : top + C, left : left + C].float()  # (F, 3, 224, 224)
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1) * 255.0  # (3, 1, 1)
    return (x - mean) / (torch.tensor(cfg.image_std).view(3, 1, 1) * 255.0)  # (F, 3, 224, 224)


# ==========================================================================================================
# 3. Vision towers (CLIP ViT-L/14, written once, used twice)
# ==========================================================================================================


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        P, G = cfg.patch_size, cfg.image_size // cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))  # the CLS token's input vector
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=P, stride=P, bias=False
        )
        self.position_embedding = nn.Embedding(G * G + 1, cfg.hidden_size)  # slot 0: CLS

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (n, 3, S, S) -> (n, 1 + N, Dv)
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (n, N, Dv), patches row by row
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (n, 1, Dv)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (n, 1 + N, Dv)


class ClipAttention(nn.Module):
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
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh): bidirectional over CLS + patches
        return self.out_proj(y.transpose(1, 2).reshape(B, N, Dv))  # (B, N, Dv)


class ClipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick_gelu


class ClipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, feature_layer: int = -2):
        super().__init__()
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # NOTE: spelled so in CLIP
        layers = nn.ModuleList(ClipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.encoder = nn.ModuleDict({"layers": layers})  # `encoder.layers.{i}` as in the checkpoint
        self.n_used = cfg.num_hidden_layers + 1 + feature_layer  # hidden state -2 = after layer 23 of 24
        # NOTE: no post_layernorm: the checkpoint stores one (for CLIP's pooled output), unused here

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (n, 3, S, S) -> (n, 1 + N, Dv), CLS first
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder["layers"][: self.n_used]:
            x = layer(x)
        return x


# ==========================================================================================================
# 4. Projector
# ==========================================================================================================


class Projector(nn.Module):
    def __init__(self, cfg: VideoLlavaConfig):
        super().__init__()
        D = cfg.text_config.hidden_size
        self.linear_1 = nn.Linear(cfg.vision_config.hidden_size, D)
        self.linear_2 = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, N, Dv) -> (n, N, D)
        return self.linear_2(F.gelu(self.linear_1(x)))  # NOTE: the exact (erf) GELU here, quick_gelu in CLIP


# ==========================================================================================================
# 5. Language decoder (Llama 2 / Vicuna)
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
    group are folded into the query length (Vicuna-7B has Hkv = H, G = 1: plain multi-head attention):

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
        self.q_proj = nn.Linear(D, H * self.Dh, bias=False)  # Llama: no biases anywhere
        self.k_proj = nn.Linear(D, Hkv * self.Dh, bias=False)
        self.v_proj = nn.Linear(D, Hkv * self.Dh, bias=False)
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


class LlamaModel(nn.Module):
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
# 6. The VLM: encode images and videos, merge them, masks, forward, generate
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


class VideoLlava(nn.Module):
    quantized_parts = ("language_model", "lm_head")  # what quant.quantize may store in 8 or 4 bits

    def __init__(self, cfg: VideoLlavaConfig):
        super().__init__()
        self.cfg = cfg
        tc, vc = cfg.text_config, cfg.vision_config
        self.image_tower = ClipVisionTower(vc, cfg.vision_feature_layer)  # same architecture,
        self.video_tower = ClipVisionTower(vc, cfg.vision_feature_layer)  # different weights
        self.multi_modal_projector = Projector(cfg)
        self.language_model = LlamaModel(tc)
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.eos_token_ids: list[int] = []  # set by load() from generation_config.json
        self.pad_token_id = 0
        self.tokenizer: common.Tokenizer | None = None

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (n, 3, S, S) -> (n, 256, D)
        return self.multi_modal_projector(self.image_tower(pixel_values)[:, 1:])  # NOTE: images drop CLS

    def video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:  # -> (videos, F * 257, D)
        V = pixel_values_videos.shape[0]
        x = self.video_tower(pixel_values_videos.flatten(0, 1))  # (V*F, 257, Dv): frames keep their CLS
        y = self.multi_modal_projector(x)  # (V*F, 257, D)
        return y.reshape(V, -1, y.shape[-1])  # (V, F * 257, D): frame 0's 257 tokens, then frame 1's, ...

    def embed(self, input_ids, pixel_values=None, pixel_values_videos=None) -> torch.Tensor:
        """Token embeddings with the image and video features written over their placeholders, in order."""
        x = self.language_model.embed_tokens(input_ids)  # (B, T, D)
        G = self.cfg.vision_config.image_size // self.cfg.vision_config.patch_size
        n_frames = 0 if pixel_values_videos is None else pixel_values_videos.shape[1]
        per_image, per_video = G * G, (G * G + 1) * n_frames  # 256 patches; a frame keeps its CLS: 257
        for what, pixels, token_id, features, per_item in (
            ("image", pixel_values, self.cfg.image_token_id, self.image_features, per_image),
            ("video", pixel_values_videos, self.cfg.video_token_id, self.video_features, per_video),
        ):
            is_pad = input_ids == token_id
            need = 0 if pixels is None else pixels.shape[0] * per_item
            common.check_feature_count(
                what, f"<{what}>", is_pad, need, f"{G * G} per image, {G * G + 1} per frame"
            )
            if pixels is not None:
                feats = features(pixels.to(x.dtype))  # (items, per_item, D)
                x = x.masked_scatter(is_pad[..., None], feats.to(x.dtype))  # (B, T, D)
        return x

    def forward(
        self,
        input_ids,
        attention_mask=None,
        pixel_values_images=None,
        pixel_values_videos=None,
        pixel_values=None,
    ) -> torch.Tensor:
        """The full forward pass without a cache: logits (B, T, V). Differentiable. Images come as
        `pixel_values_images` (what the processor returns) or `pixel_values`: (n_images, 3, 224, 224);
        input_ids, attention_mask (B, T); pixel_values_videos (n_videos, F, 3, 224, 224).
        NOTE: positions count real tokens from 0 in every row (padding-aware, as transformers' generate does;
        its cache-less forward numbers left-padded rows from the first column instead)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        images = pixel_values_images if pixel_values is None else pixel_values
        x = self.embed(input_ids, images, pixel_values_videos)
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
        x = self.embed(input_ids, media.pop("pixel_values_images", None), **media)
        d = past.room(start + T + max_new_tokens, lambda S: self.language_model.new_caches(1, S, x))
        d.begin(start + T - 1, torch.tensor([start + T - 1], device=x.device))  # no padding
        pos = torch.arange(start, start + T, device=x.device)[None]  # (1, T)
        return self.prefill(x, pos, causal_padding_mask(d.keep[:, : start + T], T, start), d.caches, start), d

    @torch.inference_mode()
    def generate(
        self, input_ids, attention_mask=None, pixel_values_images=None, pixel_values_videos=None,
        pixel_values=None, *,
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
        x = self.embed(
            input_ids, pixel_values_images if pixel_values is None else pixel_values, pixel_values_videos
        )
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
    VideoLlavaProcessor: input_ids, attention_mask, pixel_values_images (images, 3, 224, 224; transformers
    5.23 still returns this legacy name) and pixel_values_videos (videos, F, 3, 224, 224)."""

    def __init__(
        self, tokenizer: common.Tokenizer, image: VisionInputConfig, video: VisionInputConfig, patch: int
    ):
        self.tokenizer, self.image, self.video, self.patch = tokenizer, image, video, patch
        self.decode, self.batch_decode = tokenizer.decode, tokenizer.batch_decode  # ids -> text
        self.image_token_id = tokenizer.token_id(IMAGE_TOKEN)
        self.video_token_id = tokenizer.token_id(VIDEO_TOKEN)
        self.bos_token_id = tokenizer.token_id("<s>")
        self.pad_token_id = tokenizer.token_id("<pad>")

    @staticmethod
    def from_dir(ckpt: Path, patch: int = 14) -> Processor:
        """Settings from preprocessor_config.json (+ video_preprocessor_config.json) as published, or the
        nested processor_config.json of transformers 5. Without a video config the image values are used."""
        p, image_d, video_d = common.read_processor_configs(ckpt)
        return Processor(
            common.Tokenizer(ckpt / "tokenizer.json"),
            VisionInputConfig.from_hf(image_d),
            VisionInputConfig.from_hf(image_d if video_d is None else video_d),
            patch,
        )

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """What the checkpoint's LLaVA-1.5-style template renders, a string `content` read as one text item
        (the template renders nothing for it). Per message: "USER: " / "ASSISTANT: " (a system message: its
        text only), then <image>\\n per image and <video>\\n per video, then each text item and a space.
        Example: "USER: <video>\\nWhy is this funny? ASSISTANT:". BOS is not part of it: the processor puts it
        in front, as the Llama tokenizer does."""
        out = []
        for m in messages:
            content = m["content"]
            items = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if m["role"] != "system":
                out.append(m["role"].upper() + ": ")
            out += [IMAGE_TOKEN + "\n" for it in items if it.get("type") == "image"]
            out += [VIDEO_TOKEN + "\n" for it in items if it.get("type") == "video"]
            out += [it["text"] + " " for it in items if it.get("type") == "text"]
        if add_generation_prompt:
            out.append("ASSISTANT:")
        return "".join(out)

    def load_video(self, path: str, num_frames: int | None = None, fps: float | None = None):
        """A video file -> media.Video: `num_frames` frames (default 8) at indices int(i * total /
        num_frames): a shorter video repeats frames (3 frames -> 0 0 0 1 1 1 2 2), as the reference sampling
        does. Or `fps` frames per second. Another count than 8 is warned about when the frames are
        preprocessed."""
        import media  # PyAV decoding: only for video files

        if fps is None:
            num_frames = num_frames or TRAINED_FRAMES
        return media.load_video(path, num_frames=num_frames, fps=fps, repeat=True)

    def preprocess_videos(self, videos: list) -> dict[str, torch.Tensor]:
        out = []
        for video in videos:
            frames = self.load_video(video).frames if isinstance(video, (str, Path)) else video
            x = common.frames_to_uint8(frames)  # (F, 3, H, W)
            if x.shape[0] != TRAINED_FRAMES:
                warnings.warn(
                    f"a video of {x.shape[0]} frames: Video-LLaVA was trained on {TRAINED_FRAMES}",
                    stacklevel=2,
                )
            out.append(preprocess_frames(x.contiguous(), self.video))
        if len({v.shape[0] for v in out}) > 1:
            raise ValueError(
                f"videos in one call must have the same number of frames: {[len(v) for v in out]}"
            )
        return {"pixel_values_videos": torch.stack(out)}  # (videos, F, 3, 224, 224)

    def __call__(self, text: str | list[str], images=None, videos=None, padding_side: str = "left"):
        texts, images, videos = common.as_list(text), common.as_list(images), common.as_list(videos)
        common.check_placeholders(texts, {IMAGE_TOKEN: images, VIDEO_TOKEN: videos})
        out = {}
        per_tile = (self.image.crop // self.patch) ** 2  # 256 patches; a video frame adds its CLS: 257
        if images:
            x = torch.stack([preprocess_image(im, self.image) for im in images])  # (images, 3, 224, 224)
            out["pixel_values_images"] = x
        if videos:
            out.update(self.preprocess_videos(videos))
        per_video = 0 if not videos else out["pixel_values_videos"].shape[1] * (per_tile + 1)
        tokens = {IMAGE_TOKEN: [per_tile] * len(images), VIDEO_TOKEN: [per_video] * len(videos)}
        ids = [
            [self.bos_token_id] + self.tokenizer.encode(t) for t in common.expand_placeholders(texts, tokens)
        ]
        input_ids, attention_mask = common.pad_batch(ids, self.pad_token_id, padding_side)
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}


# ==========================================================================================================
# 8. Weights
# ==========================================================================================================


def config_from_hf(d: dict) -> VideoLlavaConfig:
    """Reads config.json (published and transformers-5 formats both nest text_config/vision_config;
    fields a file leaves out take transformers' class defaults: Llama's, CLIP ViT-L/14's)."""
    t, v = d.get("text_config") or {}, d.get("vision_config") or {}
    if d.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError("vision_feature_select_strategy must be 'default' (images drop CLS), as released")
    if not isinstance(d.get("vision_feature_layer", -2), int) or d.get("vision_feature_layer", -2) >= 0:
        raise ValueError("vision_feature_layer must be one negative layer index (the released -2)")
    if v.get("hidden_act", "quick_gelu") != "quick_gelu" or d.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError("video_llava.py implements quick_gelu CLIP towers and a GELU projector, as released")
    rope = t.get("rope_parameters") or {}
    text = TextConfig(
        vocab_size=t.get("vocab_size", 32000),
        hidden_size=t.get("hidden_size", 4096),
        intermediate_size=t.get("intermediate_size", 11008),
        num_hidden_layers=t.get("num_hidden_layers", 32),
        num_attention_heads=t.get("num_attention_heads", 32),
        num_key_value_heads=t.get("num_key_value_heads", t.get("num_attention_heads", 32)),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),  # NOTE: Llama's class default; Vicuna's file says 1e-5
        rope_theta=rope.get("rope_theta", t.get("rope_theta", 10000.0)),
        max_position_embeddings=t.get("max_position_embeddings", 2048),
    )
    if (
        t.get("attention_bias")
        or t.get("mlp_bias")
        or (t.get("rope_scaling") or rope.get("rope_type", "default") != "default")
    ):
        raise ValueError("video_llava.py implements the plain Llama 2 decoder (no biases, no RoPE scaling)")
    vision = VisionConfig(
        hidden_size=v.get("hidden_size", 768),
        intermediate_size=v.get("intermediate_size", 3072),
        num_hidden_layers=v.get("num_hidden_layers", 12),
        num_attention_heads=v.get("num_attention_heads", 12),
        num_channels=v.get("num_channels", 3),
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 32),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5),
    )
    return VideoLlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
        video_token_id=d.get("video_token_index", d.get("video_token_id", 32001)),
        vision_feature_layer=d.get("vision_feature_layer", -2),
        tie_word_embeddings=d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)),
    )


def rename(key: str) -> str | None:
    """Checkpoint key -> our name. Ours are transformers 5's names without the leading `model.`. The published
    repo nests deeper (`image_tower.vision_model.*`, `video_tower.vision_model.*`, `language_model.model.*`,
    `language_model.lm_head`); transformers 5 writes `model.*` in memory and a mix when it saves."""
    key = re.sub(r"^model\.(?=image_tower|video_tower|multi_modal_projector|language_model)", "", key)
    key = re.sub(r"^(image|video)_tower\.vision_model\.", r"\1_tower.", key)
    if re.match(r"^(image|video)_tower\.post_layernorm\.", key):
        return None  # stored, never used: the features come from the penultimate layer, before it
    key = re.sub(r"^language_model\.lm_head\.", "lm_head.", key)
    return re.sub(r"^language_model\.model\.", "language_model.", key)


def load(name_or_path=DEFAULT, device=None, dtype=None, quantize=None) -> tuple[VideoLlava, Processor]:
    """A Hub id (or a PRESETS key) or a local directory -> (model in eval mode, processor). `quantize`
    ("int8" or "int4") stores the decoder's linear layers in 8 or 4 bits as they load (quant.py)."""
    ckpt = common.checkpoint_dir(PRESETS.get(name_or_path, name_or_path))
    raw, cfg = common.read_config(ckpt, "video_llava", config_from_hf)
    device = common.pick_device(device)
    dtype = common.pick_dtype(dtype, device, quantize)
    with torch.device("meta"):
        model = VideoLlava(cfg)
    if quantize:
        import quant  # the int8/int4 layers: only when asked for

        quant.quantize(model, quantize, device=device, dtype=dtype)
    tied = {"lm_head.weight": "language_model.embed_tokens.weight"} if cfg.tie_word_embeddings else None
    common.load_weights(model, ckpt, rename, device, dtype, tied)
    processor = Processor.from_dir(ckpt, cfg.vision_config.patch_size)
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
    ("image_tower.embeddings", "image tower: CLS + patch embedding + positions", "(n, 1+N, Dv)"),
    ("video_tower.embeddings", "video tower: the same, for every frame", "(n*F, 1+N, Dv)"),
    ("video_tower.encoder.layers.0", "video tower layer 1 (within each frame)", "(n*F, 1+N, Dv)"),
    ("multi_modal_projector", "2-layer MLP projector (images: CLS dropped first)", "(n, N or 1+N, D)"),
    ("language_model.embed_tokens", "token embeddings (features written over <image>/<video>)", "(B, T, D)"),
    ("language_model", "decoder stack <- embeddings, positions (B, T), mask", "(B, T, D)"),
    ("language_model.layers.0.self_attn.q_proj", "decoder layer 1: queries, H heads", "(B, T, H*Dh)"),
    ("language_model.layers.0", "decoder layer 1 (causal attention + SwiGLU)", "(B, T, D)"),
    ("language_model.norm", "final RMSNorm", "(B, T, D)"),
    ("lm_head", "logits", "(B, T, V)"),
]


def main(argv: list[str] | None = None) -> None:
    import cli  # the program's helpers: loaded when the file runs as a program, never on import

    ap = cli.parser(
        PRESETS,
        DEFAULT,
        "Chat with Video-LLaVA about images and videos (trained on 8 frames per video).",
        "python video_llava.py --video examples/pan.mp4 --prompt 'What happens in this video?'",
        frames=f"{TRAINED_FRAMES}, the trained count",
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
    C, G = processor.image.crop, processor.image.crop // processor.patch
    for i, im in enumerate(images):
        cli.say(
            f"image {i + 1}: {im.width}x{im.height} -> centre {C}x{C} -> {G}x{G} patches -> {G * G} tokens"
        )
    for i, v in enumerate(videos):
        n = len(v.indices) * (G * G + 1)
        cli.say(f"video {i + 1}: {cli.describe(v)} -> {len(v.indices)} x (CLS + {G}x{G}) -> {n} tokens")
    if a.show_prompt:
        cli.say(prompt)
    cli.generate_and_report(model, inputs, a, cli.visual_tokens(inputs, processor), STAGES)


if __name__ == "__main__":
    import cli

    cli.run_main(main)
