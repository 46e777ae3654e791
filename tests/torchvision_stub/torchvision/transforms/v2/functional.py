import torch
import torch.nn.functional as F

from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_to_tensor  # noqa: F401


def resize(
    image: torch.Tensor, size, interpolation=InterpolationMode.BILINEAR, antialias=True
) -> torch.Tensor:
    mode = InterpolationMode(interpolation).value
    if mode not in ("bilinear", "bicubic", "nearest", "nearest-exact"):
        raise NotImplementedError(f"torchvision stand-in: resize mode {mode} is not reproduced")
    shape = image.shape
    x = image.reshape(-1, *shape[-3:])
    aa = antialias and mode in ("bilinear", "bicubic")
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    if x.dtype == torch.uint8 and mode in ("bilinear", "bicubic"):
        out = F.interpolate(x, size=list(size), mode=mode, antialias=aa, **kw)
    else:
        out = F.interpolate(
            x.float() if not x.is_floating_point() else x, size=list(size), mode=mode, antialias=aa, **kw
        )
        out = out.round().clamp(0, 255).to(x.dtype) if not x.is_floating_point() else out
    return out.reshape(*shape[:-2], *out.shape[-2:])


def normalize(image: torch.Tensor, mean, std, inplace: bool = False) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    if not inplace:
        image = image.clone()
    return image.sub_(mean).div_(std)


def grayscale_to_rgb(image: torch.Tensor) -> torch.Tensor:
    return image.expand(*image.shape[:-3], 3, *image.shape[-2:]) if image.shape[-3] == 1 else image


def to_dtype(image: torch.Tensor, dtype=torch.float32, scale: bool = False) -> torch.Tensor:
    if not scale or image.dtype == dtype:
        return image.to(dtype)
    if image.is_floating_point() and not dtype.is_floating_point:
        return image.mul(255).round_().clamp_(0, 255).to(dtype)
    if not image.is_floating_point() and dtype.is_floating_point:
        return image.to(dtype).div_(255)
    return image.to(dtype)


def pad(image: torch.Tensor, padding, fill=0, padding_mode="constant") -> torch.Tensor:
    if padding_mode != "constant":
        raise NotImplementedError("torchvision stand-in: only constant padding")
    left, top, right, bottom = padding if len(padding) == 4 else (padding[0], padding[1]) * 2
    if isinstance(fill, (list, tuple)):  # one value per channel
        return torch.stack(
            [F.pad(image[..., c, :, :], (left, right, top, bottom), value=v) for c, v in enumerate(fill)],
            dim=-3,
        )
    return F.pad(image, (left, right, top, bottom), value=fill)


def crop(image: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    return image[..., top : top + height, left : left + width]


def center_crop(image: torch.Tensor, output_size) -> torch.Tensor:
    h, w = image.shape[-2:]
    th, tw = output_size
    return crop(image, int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)), th, tw)
