"""Static-shape decoding: compiled generation gives the eager tokens (one model of each decoder kind), and
bfloat16 runs on the CPU for every file. The same on CUDA is in the `gpu` tests (skipped without a GPU)."""

import importlib
import json
import subprocess
import sys

import pytest
import tiny
import torch
from conftest import ROOT

import common

FILES = ["qwen2_vl", "paligemma", "llava_onevision", "video_llava", "perception_lm"]
KINDS = {  # decoder kind -> (model file, builder options)
    "qwen2-mrope": ("qwen2_vl", {}),
    "gemma": ("paligemma", {"version": 1}),
    "gemma2-window": ("paligemma", {"version": 2}),  # its sliding window (8) is shorter than the prompts
    "llama2": ("video_llava", {}),
    "llama3": ("perception_lm", {}),
}
PLACEHOLDER = {"qwen2_vl": "<|image_pad|>", "perception_lm": "<|image|>"}  # the others: <image>
BF16_TOLERANCE = 0.05  # max |bf16 - fp32| logit, as a share of the largest fp32 logit (measured: <= 0.03)
NEW_TOKEN_TYPE = {"paligemma": {"token_type_ids": 1}}  # generated tokens are PaliGemma's causal suffix


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    cache = {}

    def get(file, **options):
        key = (file, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = getattr(tiny, f"build_{file}")(root / f"{file}{len(cache)}", **options)["hub"]
        return cache[key]

    return get


def prompts(file) -> list[str]:
    """Two prompts of different lengths, each with one image placeholder (PaliGemma: task prefixes)."""
    if file == "paligemma":
        return ["caption en", "answer en what is in the picture today"]
    tok = PLACEHOLDER.get(file, "<image>")
    return [f"{tok} hi", f"{tok} a much longer prompt than the first"]


def two_rows(file, proc):
    """A left-padded batch of the 2 prompts, each with an image."""
    image = tiny.synthetic_image(60, 80)
    return proc(text=prompts(file), images=[image, image])


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_generation_equals_eager(kind, built):
    file, options = KINDS[kind]
    m = importlib.import_module(file)
    model, proc = m.load(built(file, **options), device="cpu")
    inputs = two_rows(file, proc)
    assert not bool(inputs["attention_mask"].all()), "the batch must be padded"
    eager = model.generate(**inputs, max_new_tokens=20, eos_token_ids=[])
    compiled = model.generate(**inputs, max_new_tokens=20, eos_token_ids=[], compile=True)
    assert torch.equal(eager, compiled)
    again = model.generate(**inputs, max_new_tokens=20, eos_token_ids=[], compile=True)  # reuses the compile
    assert torch.equal(eager, again)


@pytest.mark.parametrize("file", FILES)
def test_bfloat16_on_cpu(file, built):
    m = importlib.import_module(file)
    f32, proc = m.load(built(file), device="cpu")
    b16, _ = m.load(built(file), device="cpu", dtype="bfloat16")
    assert next(b16.parameters()).dtype == torch.bfloat16
    inputs = two_rows(file, proc)
    with torch.no_grad():
        ref, got = f32(**inputs), b16(**inputs).float()
    assert (got - ref).abs().max() <= BF16_TOLERANCE * ref.abs().max()
    out = b16.generate(**inputs, max_new_tokens=8, eos_token_ids=[])
    assert out.shape == (2, 8)
    assert tiny.greedy_shortfall(f32, inputs, out, NEW_TOKEN_TYPE.get(file)) <= BF16_TOLERANCE


def test_decode_step_has_static_shapes(built):
    """Every decode step attends over the whole cache: the shapes recorded in the attention never grow."""
    import qwen2_vl

    model, proc = qwen2_vl.load(built("qwen2_vl"), device="cpu")
    seen = []
    attn = model.model.layers[0].self_attn
    hook = attn.o_proj.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    cache_shapes = []
    real_update = qwen2_vl.KVCache.update

    def update(self, slot, k, v):
        out = real_update(self, slot, k, v)
        cache_shapes.append(tuple(out[0].shape))
        return out

    try:
        qwen2_vl.KVCache.update = update
        model.generate(**proc(text="hello there"), max_new_tokens=6, eos_token_ids=[])
    finally:
        qwen2_vl.KVCache.update = real_update
        hook.remove()
    layer0 = cache_shapes[:: model.cfg.text_config.num_hidden_layers]
    assert len(set(layer0[1:])) == 1, f"decode steps read caches of shapes {layer0[1:]}"
    assert len(set(seen[1:])) == 1


def test_cli_compile_reports_the_compile_time(built, tmp_path, capsys):
    import cli
    import qwen2_vl

    args = ["--model", built("qwen2_vl"), "--prompt", "hello", "--device", "cpu", "--max-new-tokens", "4"]
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: qwen2_vl.main([str(a) for a in [*args, "--compile"]]))
        raise SystemExit(0)
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["compile_s"] > 0 and summary["new_tokens"] == 4
    assert "note: the decode step compiles" in err  # said before the wait
    assert summary["tokens_per_s"] > 1 / summary["compile_s"]  # the 2 steps after the compiled one


# ----------------------------------------------------------------------------------------------------------
# On a CUDA GPU (bfloat16, the default there)


@pytest.mark.gpu
@pytest.mark.parametrize("file", FILES)
def test_cuda_bfloat16_against_cpu_float32(file, built):
    """bf16 on CUDA against fp32 on the CPU. Greedy tokens are judged by their shortfall under the fp32 model
    (tiny.greedy_shortfall): a random tiny model has near-ties that bf16 rounding may break either way, as it
    did on an H200 for LLaVA-OneVision (step 3) and Video-LLaVA (a first-token gap of 0.1 in 5.0)."""
    m = importlib.import_module(file)
    f32, proc = m.load(built(file), device="cpu")
    gpu, _ = m.load(built(file), device="cuda")
    assert next(gpu.parameters()).dtype == torch.bfloat16
    inputs = two_rows(file, proc)
    on_gpu = {k: v.cuda() for k, v in inputs.items()}
    with torch.no_grad():
        ref, got = f32(**inputs), gpu(**on_gpu).float().cpu()
    assert (got - ref).abs().max() <= BF16_TOLERANCE * ref.abs().max()
    new_type = NEW_TOKEN_TYPE.get(file)
    for compile in (False, True):  # eager, then the compiled step with CUDA graphs
        out = gpu.generate(**on_gpu, max_new_tokens=16, eos_token_ids=[], compile=compile).cpu()
        assert tiny.greedy_shortfall(f32, inputs, out, new_type) <= BF16_TOLERANCE
    for text in prompts(file):  # each row alone
        alone = proc(text=[text], images=[tiny.synthetic_image(60, 80)])
        out = gpu.generate(**{k: v.cuda() for k, v in alone.items()}, max_new_tokens=16, eos_token_ids=[])
        assert tiny.greedy_shortfall(f32, alone, out.cpu(), new_type) <= BF16_TOLERANCE


@pytest.mark.gpu
@pytest.mark.parametrize("file", FILES)
def test_cli_on_cuda(file, built, tmp_path):
    from PIL import Image

    Image.fromarray(tiny.synthetic_image(60, 80)).save(tmp_path / "photo.png")
    prompt = "caption en" if file == "paligemma" else "Describe it."
    cmd = [
        sys.executable,
        str(ROOT / f"{file}.py"),
        "--model",
        str(built(file)),
        "--image",
        str(tmp_path / "photo.png"),
    ]
    cmd += ["--prompt", prompt, "--device", "cuda", "--max-new-tokens", "8", "--compile"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stderr.strip().splitlines()[-1])
    assert summary["device"].startswith("cuda") and summary["dtype"] == "bfloat16"
    assert summary["compile_s"] is not None


# ----------------------------------------------------------------------------------------------------------
# The compiled token: caches kept, what runs outside it, recompiles, host reads


class Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operations that run while it is on (by name)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


HOST_READS = ("_local_scalar_dense", "item", "is_nonzero")
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=0)


def ops_of(model, inputs, n, **settings) -> list[str]:
    """The aten operations of one generate() of n tokens outside the compiled token (which runs with the
    counter off: what it does is inside the graph)."""
    with Ops() as ops:
        model.generate(**inputs, max_new_tokens=n, eos_token_ids=[], compile=True, **settings)
    return ops.names


@pytest.fixture(scope="module")
def qwen(built):
    import qwen2_vl

    model, proc = qwen2_vl.load(built("qwen2_vl"), device="cpu")
    compiled = common.compiled_next_token(model)

    def uncounted(*args):  # the compiled token runs with the counter off
        with torch.utils._python_dispatch._disable_current_modes():
            return compiled(*args)

    model.__dict__["_compiled_next_token"] = uncounted
    return model, proc


@pytest.mark.parametrize("settings", [{}, SAMPLED], ids=["greedy", "top-k+top-p+penalty"])
def test_at_most_two_operations_per_token_outside_the_compiled_token(qwen, settings):
    model, proc = qwen
    inputs = proc(text="hello there")
    ops_of(model, inputs, 4, **settings)  # compiles
    short, long = ops_of(model, inputs, 8, **settings), ops_of(model, inputs, 16, **settings)
    extra = [op for op in long if long.count(op) > short.count(op)]
    per_token = (len(long) - len(short)) / 8
    assert per_token <= 2, f"{per_token} operations per token outside the compiled token: {set(extra)}"
    reads = [op for op in long if op.startswith(HOST_READS)]
    assert len(reads) == len([op for op in short if op.startswith(HOST_READS)]), "a host read per token"


def test_no_sort_over_the_vocabulary(built):
    """Eager decoding runs the same token function as the compiled one: no sort anywhere in it."""
    import qwen2_vl

    model, proc = qwen2_vl.load(built("qwen2_vl"), device="cpu")
    with Ops() as ops:
        model.generate(**proc(text="hello there"), max_new_tokens=6, eos_token_ids=[], **SAMPLED)
    assert "topk.default" in ops.names and not [op for op in ops.names if "sort" in op]


def test_second_generate_reuses_the_caches(built):
    import qwen2_vl

    model, proc = qwen2_vl.load(built("qwen2_vl"), device="cpu")
    inputs = proc(text="hello there")
    first = model.generate(**inputs, max_new_tokens=6, eos_token_ids=[])
    d = model._decoding
    storage = [c.k.untyped_storage().data_ptr() for c in d.caches] + [d.tokens.data_ptr()]
    assert torch.equal(first, model.generate(**inputs, max_new_tokens=6, eos_token_ids=[]))
    assert model._decoding is d
    assert storage == [c.k.untyped_storage().data_ptr() for c in d.caches] + [d.tokens.data_ptr()]
    model.generate(**proc(text=["hello there", "hi"]), max_new_tokens=6, eos_token_ids=[])
    assert model._decoding is not d and model._decoding.keep.shape[0] == 2  # another batch size: new ones


def test_recompiles_only_once_for_a_batch_of_one(built):
    """Prompt lengths within a cache bucket and across buckets, batch sizes 1 -> 2 -> 1 -> 3: torch compiles
    the token twice (a batch of 1, and any other batch: it specializes sizes of 1), then never again."""
    from torch._dynamo.utils import counters

    import qwen2_vl

    model, proc = qwen2_vl.load(built("qwen2_vl"), device="cpu")
    torch._dynamo.reset()  # what other tests compiled (for any model of the same kind) would serve this one
    graphs = []
    for texts in (["hi"], ["hello there"], ["a prompt long enough for the next cache bucket " * 2]):
        model.generate(**proc(text=texts), max_new_tokens=5, eos_token_ids=[], compile=True)
        graphs.append(counters["stats"]["unique_graphs"])
    for n in (2, 1, 3, 2):
        batch = proc(text=["hi", "a longer one", "and a third prompt"][:n])
        model.generate(**batch, max_new_tokens=5, eos_token_ids=[], compile=True)
        graphs.append(counters["stats"]["unique_graphs"])
    assert [g - graphs[0] for g in graphs] == [0, 0, 0, 1, 1, 1, 1], graphs


def test_streaming_reads_one_token_per_step(qwen):
    """With a streamer: one host read per token (late, after the next step is launched); the text streamed is
    the answer."""
    model, proc = qwen
    inputs, pieces = proc(text="hello there"), []
    kw = dict(eos_token_ids=[], compile=True, streamer=pieces.append)
    model.generate(**inputs, max_new_tokens=4, **kw)
    with Ops() as short:
        model.generate(**inputs, max_new_tokens=8, **kw)
    pieces.clear()
    with Ops() as long:
        out = model.generate(**inputs, max_new_tokens=16, **kw)
    reads = [len([op for op in ops.names if op.startswith(HOST_READS)]) for ops in (short, long)]
    assert reads[1] - reads[0] == 8  # one per token
    assert "".join(pieces) == model.tokenizer.decode(out[0])


@pytest.mark.parametrize("kind", ["qwen2-mrope", "gemma2-window"])
def test_seeded_sampling_compiled_equals_eager(kind, built):
    """The compiled token samples with the eager maths and the same keyed noise (common.sample): with a seed,
    the same tokens, for a padded batch; another seed, other tokens."""
    file, options = KINDS[kind]
    m = importlib.import_module(file)
    model, proc = m.load(built(file, **options), device="cpu")
    inputs = two_rows(file, proc)
    kw = dict(max_new_tokens=12, eos_token_ids=[], **SAMPLED)
    eager = model.generate(**inputs, **kw)
    assert torch.equal(eager, model.generate(**inputs, **kw, compile=True))
    assert not torch.equal(eager, model.generate(**inputs, **(kw | dict(seed=1))))
