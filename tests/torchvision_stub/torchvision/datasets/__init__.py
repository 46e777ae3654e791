"""Stand-in: timm.data imports dataset classes at import time; none is used."""

from torchvision._missing import missing


def __getattr__(name: str):
    return missing("torchvision.datasets", name)
