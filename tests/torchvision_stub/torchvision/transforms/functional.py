import numpy as np
import torch

from torchvision.transforms import InterpolationMode  # noqa: F401


def pil_to_tensor(pic) -> torch.Tensor:
    x = torch.from_numpy(np.array(pic, copy=True))
    return (x[:, :, None] if x.ndim == 2 else x).permute(2, 0, 1).contiguous()


def __getattr__(name: str):  # anything else timm imports at import time but the tests never call
    from torchvision._missing import missing

    return missing(__name__, name)
