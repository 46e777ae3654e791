"""Where the decode loop waits for the device: host-device syncs counted through a dispatch mode.

A sync is a read of a tensor's value by Python (`aten._local_scalar_dense`: `.item()`, `int()`, `bool()`,
`.tolist()` of one element) or a copy to the CPU. On a CPU these cost nothing, but the same calls stall a GPU
each time, so they are counted here, on the CPU, for all five files."""

import importlib

import pytest
import tiny
from torch.utils._python_dispatch import TorchDispatchMode

FILES = ["qwen2_vl", "paligemma", "llava_onevision", "video_llava", "perception_lm"]
PLACEHOLDER = {"qwen2_vl": "<|image_pad|>", "perception_lm": "<|image|>"}  # the others: <image>


# The operations that read a value back: in inference mode `bool(t)` and `int(t)` arrive as is_nonzero and
# item, outside it as _local_scalar_dense. NOTE: `.tolist()` of a CPU tensor reads its memory without an
# operation, so it is not seen here (on CUDA it is a copy to the CPU, which is).
READS = ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal")


class CountSyncs(TorchDispatchMode):
    """Counts the operations that make the host wait for a device's result."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        to_cpu = name.startswith(("_to_copy", "copy_")) and str(kwargs.get("device", "")) == "cpu"
        if name.startswith(READS) or to_cpu:
            self.syncs.append(name)
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def loaded(hub_checkpoint):
    cache = {}

    def get(file):
        if file not in cache:
            m = importlib.import_module(file)
            model, proc = m.load(hub_checkpoint(file), device="cpu")
            text = "caption en" if file == "paligemma" else f"{PLACEHOLDER.get(file, '<image>')} hi"
            cache[file] = model, proc, proc(text=[text], images=[tiny.synthetic_image(60, 80)])
        return cache[file]

    return get


@pytest.mark.parametrize("file", FILES)
def test_decode_step_never_syncs(file, loaded, monkeypatch):
    model, _, inputs = loaded(file)
    per_step = []
    real = model.decode_step

    def counted(*args, **kwargs):
        with CountSyncs() as c:
            out = real(*args, **kwargs)
        per_step.append(len(c.syncs))
        return out

    monkeypatch.setattr(model, "decode_step", counted)
    model.generate(**inputs, max_new_tokens=6, eos_token_ids=[])
    assert per_step == [0] * 5


def syncs_of(model, inputs, n, **kwargs) -> int:
    with CountSyncs() as c:
        model.generate(**inputs, max_new_tokens=n, eos_token_ids=kwargs.pop("eos_token_ids", []), **kwargs)
    return len(c.syncs)


@pytest.mark.parametrize("file", FILES)
def test_decode_loop_syncs_once_per_8_steps_or_per_streamed_token(file, loaded):
    """Eight more steps cost one sync without a streamer (the check that every row has finished, so that
    generation can stop early) and eight with one (the token it prints, one read each)."""
    model, proc, inputs = loaded(file)
    assert syncs_of(model, inputs, 17) - syncs_of(model, inputs, 9) == 1
    stream = dict(streamer=lambda text: None)
    assert syncs_of(model, inputs, 17, **stream) - syncs_of(model, inputs, 9, **stream) == 8
