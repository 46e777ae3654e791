"""Test-only stand-in for torchvision, used when the real package cannot be imported.

The PyPI torchvision wheels are CUDA builds that do not load next to the CPU-only torch our CI uses, yet
transformers 5.23 runs its default (torchvision-backend) image and video processors through a handful of
`torchvision.transforms.v2.functional` calls. This package provides exactly those calls with plain torch so
that the *transformers* processor code (sizes, ordering, normalisation) runs unchanged as the reference.

The one numerically delicate call is `resize`: torchvision's antialiased bilinear/bicubic resize of a uint8
tensor is `torch.nn.functional.interpolate(uint8, antialias=True)` on CPU (DESIGN.md, checked bit for bit on
four sizes). It is reproduced here the same way. When the real torchvision is importable (e.g. on the GPU
machine) conftest.py does not put this stand-in on the path and the real package is the reference.
"""

__version__ = "0.28.0"
