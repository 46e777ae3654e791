"""Test setup: the repository root on sys.path, the torchvision stand-in when needed, tiny checkpoints."""

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# transformers 5.23 runs its default image/video processors through torchvision. The PyPI wheels are CUDA
# builds that cannot load next to a CPU-only torch, so use the stand-in (see its docstring) unless the real
# package imports. This must happen before transformers is imported anywhere.
try:
    importlib.import_module("torchvision.transforms.v2.functional")
    TORCHVISION = "real"
except Exception:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.path.insert(0, str(ROOT / "tests" / "torchvision_stub"))
    TORCHVISION = "stand-in"


def pytest_report_header(config):
    return f"torchvision for the reference processors: {TORCHVISION}"


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")
