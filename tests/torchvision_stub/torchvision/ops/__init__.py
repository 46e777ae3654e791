"""Stand-in for torchvision.ops: timm imports `ops.misc.FrozenBatchNorm2d` at import time."""
