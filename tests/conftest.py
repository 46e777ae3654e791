"""Test setup: the repository root on sys.path, the torchvision stand-in when needed, tiny checkpoints."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tiny  # noqa: E402

TORCHVISION = tiny.torchvision_for_reference()


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


@pytest.fixture(scope="session")
def hub_checkpoint(tmp_path_factory):
    """file (or "paligemma2": paligemma.py's PaliGemma 2) -> its tiny checkpoint in the published (Hub)
    layout, built once per test session."""
    root = tmp_path_factory.mktemp("hub")
    cache = {}

    def get(name: str):
        if name not in cache:
            if name == "paligemma2":
                cache[name] = tiny.build_paligemma(root / name, version=2)["hub"]
            else:
                cache[name] = getattr(tiny, f"build_{name}")(root / name)["hub"]
        return cache[name]

    return get
