"""Weight-only int8 and int4 quantization of a model's decoder: the maths written out, one linear layer per
format, and `quantize(model, mode)`. A model file's load() imports this module only when it is asked to
quantize (load(..., quantize="int8"), --quantize int8).

Why: a decode step at batch 1 reads every decoder weight once to make one token, so its speed is set by the
bytes it reads. Weights stored in 8 or 4 bits, multiplied by kernels that read them as stored, cut those bytes
by 2x or about 3.5x. Only the decoder's linear layers are quantized (each model names them in
`quantized_parts`): the vision tower, the projector and the embeddings stay in the load dtype; they are a
small share of the bytes a step reads, and a quantized vision side is where quantized VLMs lose the image.

- int8: symmetric, one scale per output row: W ~ q * scale[:, None], q in [-127, 127].
- int4: asymmetric groups of G inputs (G = 128 by default): in each group the 16 codes span [min, max].
A quantized layer computes x @ dequantize(W).T + bias; the tests check torch's kernels against exactly that.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("int8", "int4")

# ----------------------------------------------------------------------------------------------------------
# The maths


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


def by_row_blocks(quantize_rows, w: torch.Tensor) -> list[torch.Tensor]:
    """`quantize_rows` applied 4096 rows at a time, the results joined: a large matrix (an output layer) is
    never in float32 whole."""
    return [torch.cat(parts) for parts in zip(*(quantize_rows(b) for b in w.split(4096)))]


# ----------------------------------------------------------------------------------------------------------
# The layers. Built empty on the meta device; `quantized_state(w)` turns a float weight (N, K) into their
# buffers (load_weights calls it as each weight is read, `quantize` for a model already loaded).


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + bias: `weight` (N, K) int8 and `scale` (N,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device="meta")
        )
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device="meta")) if bias else None

    @torch.no_grad()
    def quantized_state(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = by_row_blocks(quantize_int8, w)
        return {"weight": q, "scale": scale.to(self.scale.dtype)}

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, int8, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        lead, K = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, K).to(self.scale.dtype).contiguous()  # (M, K): the kernel takes 2-D rows
        if x.device.type == "cuda" or x.shape[0] > 32:
            # x @ (q * s).T == (x @ q.T) * s. On CUDA, compiled, the cast of q fuses into the product's reads;
            # on the CPU a prefill's many rows make the product, not the weight's bytes, the cost
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale  # (M, N)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)  # (M, N)
        if self.bias is not None:
            y = y + self.bias  # NOTE: the kernel takes no bias; Qwen2's q/k/v biases are added here
        return y.reshape(*lead, self.out_features)


class Int4Linear(nn.Module):
    """y = x @ dequantize_int4(W).T + bias. `weight` holds the codes packed as torch's int4 kernel for the
    device reads them (CPU: uint8 (N', K/2); CUDA: int32 tiles), `scales_and_zeros` is (K/G, N', 2); N' is N
    padded to the kernels' tile of 16 rows, and the padding is cut from the output.
    NOTE: the packing depends on the device, so a layer runs on the device type it was packed for."""

    def __init__(self, in_features, out_features, bias, dtype, group_size=128, packed_for="cpu", name=""):
        super().__init__()
        K, N = in_features, out_features
        self.in_features, self.out_features, self.packed_for = K, N, packed_for
        self.group_size = int4_group_size(K, group_size)
        if self.group_size is None or (packed_for == "cuda" and K % 32):
            raise ValueError(
                f"int4 cannot take layer {name}: its {K} inputs do not divide into groups of {group_size}, "
                "64 or 32 (on CUDA K must also be a multiple of 32); use int8 for it"
            )
        self.rows = -(-N // 16) * 16  # N', padded to the kernels' tile
        packed = self.pack(torch.zeros(self.rows, K, dtype=torch.uint8, device="meta"))
        self.register_buffer("weight", torch.empty_like(packed))
        sz = torch.empty(K // self.group_size, self.rows, 2, dtype=dtype, device="meta")
        self.register_buffer("scales_and_zeros", sz)
        self.bias = nn.Parameter(torch.empty(N, dtype=dtype, device="meta")) if bias else None

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        """Codes q (N', K) in 0..15 -> the layout the device's int4 kernel reads."""
        if self.packed_for == "cuda":
            tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)  # K tiling: K % 16t == 0
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (N', K/2): the even code in the high half
            return torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)  # (N', K/2) uint8

    @torch.no_grad()
    def quantized_state(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale, zero = by_row_blocks(lambda b: quantize_int4(b, self.group_size), w)
        pad = self.rows - self.out_features  # padded rows: code 8 with scale 0 and zero 0, a weight of 0
        q = F.pad(q, (0, 0, 0, pad), value=8)  # (N', K)
        sz = F.pad(torch.stack([scale, zero], dim=-1), (0, 0, 0, 0, 0, pad))  # (N', K/G, 2)
        dtype = self.scales_and_zeros.dtype
        return {"weight": self.pack(q), "scales_and_zeros": sz.transpose(0, 1).contiguous().to(dtype)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        if x.device.type != self.packed_for:
            raise ValueError(
                f"int4 weights packed for {self.packed_for} cannot run on {x.device}: load on it"
            )
        lead, K = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, K).to(self.scales_and_zeros.dtype).contiguous()  # (M, K)
        mm = torch.ops.aten._weight_int4pack_mm
        mm = mm if self.packed_for == "cuda" else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(x, self.weight, self.group_size, self.scales_and_zeros)[:, : self.out_features]  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"{self.in_features}, {self.out_features}, int4, group_size={self.group_size}, bias={bias}"


# ----------------------------------------------------------------------------------------------------------
# The model


def quantize(
    model: nn.Module,
    mode: str,
    group_size: int = 128,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace every linear layer under `model.quantized_parts` (the decoder and its output layer) with an
    Int8Linear or Int4Linear, in place, one layer at a time. A model on the meta device gets empty layers for
    `common.load_weights` to fill: `device` and `dtype` then say where and in which dtype it will run (the
    int4 packing depends on the device). Returns the model."""
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)}, not {mode!r}")
    if device is not None and torch.device(device).type not in ("cpu", "cuda"):
        raise ValueError(f"quantized weights run on cpu or cuda (torch's kernels), not {device}")
    parts = tuple(model.quantized_parts)
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.Linear) or not any(name == p or name.startswith(p + ".") for p in parts):
            continue
        where = torch.device(device) if device is not None else m.weight.device
        layer_dtype = dtype or m.weight.dtype
        args = (m.in_features, m.out_features, m.bias is not None, layer_dtype)
        if mode == "int8":
            q = Int8Linear(*args)
        else:
            q = Int4Linear(*args, group_size, packed_for="cuda" if where.type == "cuda" else "cpu", name=name)
        if m.weight.device.type != "meta":
            state = q.quantized_state(m.weight.to(where))
            if m.bias is not None:
                state["bias"] = m.bias.detach().to(where, layer_dtype)
            q.load_state_dict(state, assign=True)
        *parent, leaf = name.split(".")
        setattr(model.get_submodule(".".join(parent)), leaf, q)
    return model
