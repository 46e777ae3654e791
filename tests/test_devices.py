"""Ready for a GPU, checked on the CPU: the five files run on a simulated accelerator, which refuses a tensor
made on the CPU inside the model, and counts every read of a device value by the host (a sync).

A first GPU run usually fails on one of two things: a tensor made on the CPU inside the model
(`torch.arange(n)` without a device) meeting tensors on the GPU, or host-device syncs (`.item()`, `int(t)`,
`if t:`, `.tolist()`, `.cpu()`) that stall every decode step. Both show here.

The simulated device: every parameter, buffer and input becomes an `OnDevice` tensor, which holds its values
on the CPU and reports the `meta` device. `Simulated` runs every operation on those CPU values and
- refuses an operation that mixes an `OnDevice` tensor with a CPU tensor of one or more dimensions (a CPU
  scalar of 0 dimensions mixes with CUDA tensors, so it is allowed here too);
- makes a tensor asked for on the device (`torch.zeros(..., device=x.device)`) an `OnDevice` one;
- counts the syncs: reads of a device value (`item`, `is_nonzero`, `_local_scalar_dense`, `nonzero`, `equal`),
  `.tolist()`, and copies to the CPU.
So the tokens can be compared with a plain CPU run: they must be equal.

NOTE: torch's FakeTensorMode cannot do this in a CPU-only build of torch. On a fake `cuda` device, indexing,
index assignment and F.scaled_dot_product_attention take a CUDA device guard and fail with "PyTorch is not
linked with support for cuda devices"; fake tensors also hold no values, so nothing that reads one (the
grids, Qwen2-VL's positions, the EOS check) can run. The `meta` device is reported because its guard needs no
backend; `torch.tensor(data, device=...)` bypasses dispatch modes, so it is wrapped by hand below. Stricter
than CUDA in one respect: CUDA accepts CPU index tensors (with a hidden copy); the simulator refuses them."""

import contextlib
import importlib

import pytest
import tiny
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

FILES = ["qwen2_vl", "paligemma", "llava_onevision", "video_llava", "perception_lm"]
CONFIGS = [*FILES, "paligemma2"]  # PaliGemma 2: paligemma.py with Gemma 2's sliding-window layers
PLACEHOLDER = {"qwen2_vl": "<|image_pad|>", "perception_lm": "<|image|>"}  # the others: <image>
DEVICE = torch.device("meta")
READS = ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal")


class OnDevice(torch.Tensor):
    """A tensor whose values live on the CPU and whose device is reported as DEVICE."""

    @staticmethod
    def __new__(cls, values: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, values.shape, strides=values.stride(), storage_offset=values.storage_offset(),
            dtype=values.dtype, device=DEVICE,
        )  # fmt: skip

    def __init__(self, values: torch.Tensor):
        self.values = values

    def __repr__(self):
        return f"OnDevice({self.values!r})"

    def tolist(self):  # a copy to the host: counted by the active Simulated mode
        Simulated.active.syncs.append("tolist")
        return self.values.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on an OnDevice tensor outside `simulated(...)`")


class Simulated(TorchDispatchMode):
    """Runs operations on OnDevice tensors' CPU values, refuses CPU tensors among them, counts syncs."""

    active: "Simulated"

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, name = dict(kwargs or {}), func.__name__
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        held = [t for t in tensors if isinstance(t, OnDevice)]
        on_cpu = [t for t in tensors if not isinstance(t, OnDevice) and t.dim() > 0]
        copy = name.startswith(("_to_copy", "copy_", "to."))  # moving between devices is what a copy is for
        if held and on_cpu and not copy:
            shapes = ", ".join(str(tuple(t.shape)) for t in on_cpu)
            raise RuntimeError(f"{func}: tensors {shapes} made on the CPU meet tensors on the device")
        asked = kwargs.get("device")
        if asked is not None:
            kwargs["device"] = torch.device("cpu")
        to_device = torch.device(asked).type == DEVICE.type if asked is not None else bool(held)
        if name.startswith("copy_") and not isinstance(args[0], OnDevice):  # into a host tensor
            to_device = False
        if held and (name.startswith(READS) or (copy and not to_device)):
            self.syncs.append(name)
        args, kwargs = tree_map(lambda t: t.values if isinstance(t, OnDevice) else t, (args, kwargs))
        out = func(*args, **kwargs)
        if not to_device:
            return out
        mine = {id(t.values): t for t in held}  # an in-place operation returns its own input

        def wrap(t):
            return (mine[id(t)] if id(t) in mine else OnDevice(t)) if isinstance(t, torch.Tensor) else t

        return tree_map(wrap, out)


@contextlib.contextmanager
def simulated(model: torch.nn.Module):
    """The model's parameters and buffers on the simulated device, inside inference mode (as generate runs);
    yields the Simulated mode (its `syncs`). Everything is put back on exit."""
    real_tensor, swapped = torch.tensor, []

    def tensor(data, *args, device=None, **kwargs):  # torch.tensor(..., device=) does not reach a mode
        t = real_tensor(data, *args, **kwargs)
        return OnDevice(t) if device is not None and torch.device(device).type == DEVICE.type else t

    with torch.inference_mode():
        for module in model.modules():
            for where in (module._parameters, module._buffers):
                for name, t in where.items():
                    if t is not None:
                        swapped.append((where, name, t))
                        where[name] = OnDevice(t.detach())
        torch.tensor = tensor
        try:
            with Simulated() as mode:
                Simulated.active = mode
                yield mode
        finally:
            torch.tensor = real_tensor
            for where, name, t in swapped:
                where[name] = t


def on_device(inputs: dict) -> dict:
    """The processor's output moved to the device, as the CLI moves every tensor."""
    return {k: OnDevice(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def values(t: torch.Tensor) -> torch.Tensor:
    assert isinstance(t, OnDevice), "the result is not on the device"
    return t.values


def prompts(name: str, proc, n: int) -> dict:
    """The processor's output for n prompts with an image each (n = 2: different lengths, left padded)."""
    text = "caption en" if name.startswith("paligemma") else f"{PLACEHOLDER.get(name, '<image>')} hi"
    texts, images = [text, text + " there"][:n], [tiny.synthetic_image(60, 80), tiny.synthetic_image(50, 40)]
    return proc(text=texts, images=images[:n], padding_side="left")


@pytest.fixture(scope="module")
def loaded(hub_checkpoint):
    """name (a file or "paligemma2") -> (model, processor), loaded once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            module = importlib.import_module("paligemma" if name == "paligemma2" else name)
            cache[name] = module.load(hub_checkpoint(name), device="cpu")
        return cache[name]

    return get


@pytest.mark.parametrize("file", CONFIGS)
def test_forward_and_generation_run_on_the_device(file, loaded):
    """The full forward pass, greedy and sampled generation of a batch of two (vision, prefill, decode steps
    with their caches, masks, positions, the sampler) and streaming one prompt: no tensor made on the CPU
    meets one on the device, and every answer equals the CPU's."""
    model, proc = loaded(file)
    batch, one = prompts(file, proc, 2), prompts(file, proc, 1)
    sampling = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2)

    def runs(move):
        torch.manual_seed(0)
        streamed = []
        out = dict(
            forward=model(**move(batch)),
            greedy=model.generate(**move(batch), max_new_tokens=10, eos_token_ids=[]),
            sampled=model.generate(**move(batch), max_new_tokens=10, eos_token_ids=[], **sampling),
            stream=model.generate(**move(one), max_new_tokens=6, eos_token_ids=[], streamer=streamed.append),
        )
        return out, "".join(streamed)

    expected, expected_text = runs(lambda x: x)
    with simulated(model):
        got, text = runs(on_device)
    for name, t in got.items():
        assert torch.equal(values(t), expected[name]), name
    assert text == expected_text and text


VIDEO_PLACEHOLDER = {"qwen2_vl": "<|video_pad|>", "perception_lm": "<|video|>"}  # the others: <video>


@pytest.mark.parametrize("file", [f for f in FILES if f != "paligemma"])
def test_video_runs_on_the_device(file, loaded):
    """A batch of a video prompt and an image prompt: the video tower's path (frames, their positions, pooling
    or merging) on the device too, with the CPU's tokens."""
    model, proc = loaded(file)
    image, video = PLACEHOLDER.get(file, "<image>"), VIDEO_PLACEHOLDER.get(file, "<video>")
    inputs = proc(
        text=[f"{video} what happens?", f"{image} hi"],
        images=[tiny.synthetic_image(60, 80)],
        videos=[tiny.synthetic_video(8, 64, 96, seed=3)],
        padding_side="left",
    )
    expected = model.generate(**inputs, max_new_tokens=6, eos_token_ids=[])
    with simulated(model):
        got = model.generate(**on_device(inputs), max_new_tokens=6, eos_token_ids=[])
    assert torch.equal(values(got), expected)


def decode_step_without_devices(model, monkeypatch):
    """The model's decode_step with every `torch.arange` in it made on the CPU, as `torch.arange(n)` is."""
    real_step, real_arange = model.decode_step, torch.arange

    def step(*args, **kwargs):
        monkeypatch.setattr(torch, "arange", lambda *a, device=None, **k: real_arange(*a, **k))
        try:
            return real_step(*args, **kwargs)
        finally:
            monkeypatch.setattr(torch, "arange", real_arange)

    return step


@pytest.mark.parametrize("file", CONFIGS)
def test_a_tensor_made_on_the_cpu_in_the_decoder_is_refused(file, loaded, monkeypatch):
    """The check of the check: decode_step with `torch.arange(...)` made without a device fails here, as it
    would on a GPU (and runs on the CPU alone, where nothing is wrong)."""
    model, proc = loaded(file)
    monkeypatch.setattr(model, "decode_step", decode_step_without_devices(model, monkeypatch))
    model.generate(**prompts(file, proc, 1), max_new_tokens=3, eos_token_ids=[])
    with simulated(model), pytest.raises(RuntimeError, match="made on the CPU meet tensors on the device"):
        model.generate(**on_device(prompts(file, proc, 1)), max_new_tokens=3, eos_token_ids=[])


@pytest.mark.parametrize("file", CONFIGS)
def test_decode_step_never_syncs(file, loaded, monkeypatch):
    model, proc = loaded(file)
    per_step, real = [], model.decode_step

    def counted(*args, **kwargs):
        before = len(Simulated.active.syncs)
        out = real(*args, **kwargs)
        per_step.append(len(Simulated.active.syncs) - before)
        return out

    monkeypatch.setattr(model, "decode_step", counted)
    with simulated(model):
        model.generate(**on_device(prompts(file, proc, 2)), max_new_tokens=6, eos_token_ids=[])
    assert per_step == [0] * 5


def syncs_of(model, inputs, n, eos=(), **kwargs) -> list[str]:
    with simulated(model) as mode:
        model.generate(**on_device(inputs), max_new_tokens=n, eos_token_ids=list(eos), **kwargs)
    return mode.syncs


@pytest.mark.parametrize("file", CONFIGS)
def test_decode_loop_syncs_once_per_8_steps_or_per_streamed_token(file, loaded):
    """Eight more steps cost no sync without a streamer and EOS ids, one with EOS ids (the check that every
    row has finished, so that generation can stop early) and eight with a streamer (the token it prints, one
    read each)."""
    model, proc = loaded(file)
    inputs = prompts(file, proc, 1)
    assert len(syncs_of(model, inputs, 17)) == len(syncs_of(model, inputs, 9))
    never = [10**6]  # an EOS id no row samples
    assert len(syncs_of(model, inputs, 17, never)) - len(syncs_of(model, inputs, 9, never)) == 1
    stream = dict(streamer=lambda text: None)
    assert len(syncs_of(model, inputs, 17, **stream)) - len(syncs_of(model, inputs, 9, **stream)) == 8
