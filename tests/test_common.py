"""common.py: loader errors, config checks, sampling, the decode loop, streaming decode, images in memory."""

import dataclasses
import json
import types

import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from safetensors.torch import save_file

import common

# ---------------------------------------------------------------------------------------------------------
# Weights


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 5, bias=False)


def test_load_weights_strict(tmp_path):
    good = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "head.weight": torch.randn(5, 4)}

    def load(state, rename=lambda k: k, tied=None):
        for f in tmp_path.glob("*.safetensors"):
            f.unlink()
        save_file(state, str(tmp_path / "model.safetensors"))
        with torch.device("meta"):
            m = Two()
        common.load_weights(m, tmp_path, rename, torch.device("cpu"), torch.float32, tied)
        return m

    m = load(good)
    assert torch.equal(m.a.weight, good["a.weight"]) and m.a.weight.device.type == "cpu"
    with pytest.raises(ValueError, match=r"1 missing: head.weight"):
        load({k: v for k, v in good.items() if k != "head.weight"})
    with pytest.raises(ValueError, match=r"1 unexpected: extra.weight"):
        load({**good, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"wrong shape: a.bias: checkpoint \(5,\) vs model \(4,\)"):
        load({**good, "a.bias": torch.zeros(5)})
    # rename can drop keys; tied parameters end up as one Parameter, cast once
    sq = {"a.weight": torch.randn(4, 4), "a.bias": torch.randn(4), "junk": torch.zeros(1)}
    save_file(sq, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        m = torch.nn.Module()
        m.a = torch.nn.Linear(4, 4)
        m.head = torch.nn.Linear(4, 4, bias=False)
    common.load_weights(
        m,
        tmp_path,
        lambda k: None if k == "junk" else k,
        torch.device("cpu"),
        torch.bfloat16,
        tied={"head.weight": "a.weight"},
    )
    assert m.head.weight is m.a.weight and m.a.weight.dtype == torch.bfloat16


def test_sharded_checkpoint_and_missing_files(tmp_path):
    state = {f"w{i}": torch.full((2,), float(i)) for i in range(5)}
    tiny.write_safetensors(state, tmp_path, shards=3)
    names = common.read_safetensors_names(tmp_path)
    assert sorted(names) == sorted(state) and len(set(names.values())) == 3
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        common.read_safetensors_names(tmp_path / "nothing_here")


def test_checkpoint_dir_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        common.checkpoint_dir(tmp_path / "missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="--model DIR"):
        common.checkpoint_dir("someone/some-model-that-is-not-cached")


@dataclasses.dataclass(frozen=True)
class Width:
    hidden_size: int


def test_model_type_check(tmp_path):
    def read(model_type, **fields):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **fields}))
        return common.read_config(tmp_path, "qwen2_vl", lambda raw: Width(raw["hidden_size"]))

    assert read("qwen2_vl", hidden_size=8) == ({"model_type": "qwen2_vl", "hidden_size": 8}, Width(8))
    with pytest.raises(ValueError, match="the field 'hidden_size' is missing"):
        read("qwen2_vl")
    with pytest.raises(ValueError, match="hidden_size = 0, expected a whole number >= 1"):
        read("qwen2_vl", hidden_size=0)
    with pytest.raises(ValueError, match="model_type='video_llava', but qwen2_vl.py .*use video_llava.py"):
        read("video_llava")
    with pytest.raises(ValueError, match="model_type='llama'"):
        read("llama")


def test_pick_dtype():
    cpu = torch.device("cpu")
    assert common.pick_dtype(None, cpu) == torch.float32
    assert common.pick_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert common.pick_dtype("bf16", cpu) == torch.bfloat16
    for bad in ("int8", torch.int8, "float64"):
        with pytest.raises(ValueError, match="unsupported dtype"):
            common.pick_dtype(bad, cpu)


# ---------------------------------------------------------------------------------------------------------
# Sampling and the decode loop


def test_pad_batch():
    ids, mask = common.pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = common.pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="padding_side must be"):
        common.pad_batch([[1]], 0, side="middle")


def draws(logits, n, **settings) -> set[int]:
    """The tokens `n` draws pick, each with its own noise key."""
    return {common.sample(logits, key=torch.tensor([k]), **settings).item() for k in range(n)}


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert common.sample(logits).item() == 0
    assert draws(logits, 300, temperature=1.0, top_k=2) == {0, 1}
    # softmax([3, 2, 1, 0, -1]) = [.636, .234, .086, .032, .012]: top_p=0.8 keeps {0, 1} (0.636 < 0.8 <= 0.87)
    assert draws(logits, 300, temperature=1.0, top_p=0.8) == {0, 1}
    assert draws(logits, 50, temperature=1.0, top_p=0.5) == {0}
    assert draws(logits, 300, temperature=1.0) == {0, 1, 2, 3, 4}


def test_sampling_draws_from_the_distribution():
    """argmax(p / E) with E ~ Exp(1) from the keyed noise picks token j with probability p_j."""
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    p = logits.softmax(-1)[0]
    keys = torch.arange(20000)
    picks = common.sample(logits.expand(len(keys), -1), temperature=1.0, key=keys)
    share = torch.bincount(picks, minlength=4) / len(keys)
    assert (share - p).abs().max() < 0.015, (share, p)  # 4 standard errors at p = 0.5


def test_noise_is_a_function_of_key_and_column():
    a, b = (common.exponential_noise(torch.tensor(keys), 1000) for keys in ([7, 8], [7]))
    assert torch.equal(a[:1], b) and not torch.equal(a[0], a[1])
    assert bool((a > 0).all()) and abs(float(a.mean()) - 1.0) < 0.1  # Exp(1) has mean 1
    assert torch.equal(common.noise_keys(5, 3), common.noise_keys(5, 3))
    assert not torch.equal(common.noise_keys(5, 3), common.noise_keys(6, 3))


def test_top_p_looks_only_at_the_candidates():
    """top-p over a near-flat distribution: more than TOP_P_CANDIDATES tokens would be needed to reach it, so
    the candidates are all kept, and nothing beyond them."""
    V = 3 * common.TOP_P_CANDIDATES
    logits = -1e-4 * torch.arange(V, dtype=torch.float)[None]  # token 0 the most likely, by a hair
    picks = draws(logits, 200, temperature=1.0, top_p=0.9)
    assert max(picks) < common.TOP_P_CANDIDATES and len(picks) > 150


def test_repetition_penalty():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    seen = torch.tensor([[True, False, True, False]])
    assert common.sample(logits, seen, repetition_penalty=2.0).item() == 1  # 2.0 -> 1.0 loses to 1.9
    seen = torch.tensor([[False, False, True, False]])
    logits = torch.tensor([[-5.0, -5.0, -1.0, -1.5]])
    assert common.sample(logits, seen, repetition_penalty=2.0).item() == 3  # -1.0 -> -2.0 loses to -1.5


class Scripted:
    """A stand-in model whose decode step returns one-hot logits of a scripted token per row."""

    pad_token_id, tokenizer, T = 0, None, 3

    def __init__(self, script):
        self.script = script

    def onehot(self, col):
        return torch.nn.functional.one_hot(self.script[:, col], 6).float()

    def decode_step(self, token, pos, slot, keep, caches):
        return self.onehot(int(slot) - self.T + 1)  # slot T + i holds new token i: logits for token i + 1


def scripted_decode(script, settings):
    model, (B, N) = Scripted(script), script.shape
    S = Scripted.T + N
    caches = [types.SimpleNamespace(k=torch.zeros(B, 1, S, 1), v=torch.zeros(B, 1, S, 1))]
    d = common.new_decoding(caches, B, S)
    d.begin(Scripted.T - 1, torch.full((B,), Scripted.T - 1))
    prompt = (torch.ones(B, Scripted.T, dtype=torch.long), torch.ones(B, Scripted.T))
    return common.decode_loop(model, model.onehot(0), d, settings, *prompt)


def test_decode_loop_stops_rows_and_pads():
    """Rows that reach EOS are padded from there on; the columns after every row has finished are cut."""
    script = torch.tensor([[1, 2, 5, 3, 3, 3, 3, 3, 3, 3], [2, 2, 2, 2, 5, 1, 1, 1, 1, 1]])
    out = scripted_decode(script, common.GenerationSettings(max_new_tokens=10, eos_token_ids=5))
    assert out.tolist() == [[1, 2, 5, 0, 0], [2, 2, 2, 2, 5]]
    out = scripted_decode(script, common.GenerationSettings(max_new_tokens=4, eos_token_ids=[]))
    assert out.tolist() == script[:, :4].tolist()


def test_generation_settings_are_checked():
    assert common.GenerationSettings(eos_token_ids=7).eos_token_ids == [7]
    for bad, needle in (
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(max_new_tokens="3"), "max_new_tokens must be an integer"),
        (dict(top_p=float("inf")), "top_p must be a finite number, got inf"),
        (dict(temperature=None), "temperature must be a number"),
        (dict(seed=-1), "seed must be a whole number"),
        (dict(eos_token_ids=["x"]), "eos_token_ids must be token ids"),
    ):
        with pytest.raises(ValueError, match=needle):
            common.GenerationSettings(**bad)


def test_generate_door_and_feature_count():
    ids, s = torch.ones(1, 4, dtype=torch.long), common.GenerationSettings(max_new_tokens=8)
    assert common.check_generate_inputs(ids, None, s).tolist() == [[1, 1, 1, 1]]
    for args, needle in (
        ((ids[0], None, s), r"input_ids must be \(B, T\)"),
        ((ids, torch.ones(1, 3), s), "does not match input_ids"),
        ((ids.expand(2, 4), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), s), "left padding"),
        ((ids.expand(2, 4), None, s, print), "streaming needs a single prompt"),
        ((ids, None, s, None, 10), "max_position_embeddings \\(10\\)"),
    ):
        with pytest.raises(ValueError, match=needle):
            common.check_generate_inputs(*args)
    common.check_feature_count("image", "<image>", ids == 1, 4)
    with pytest.raises(ValueError, match="the prompt has 4 <image> tokens but the images give 3 features"):
        common.check_feature_count("image", "<image>", ids == 1, 3)


def test_streaming_decode_is_utf8_safe(tmp_path):
    tiny.make_tokenizer(tmp_path, ["<|im_end|>"])
    tok = common.Tokenizer(tmp_path / "tokenizer.json")
    text = "你好，世界。这是一张图片。 émigré 🙂 ✓"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # byte-level pieces split multi-byte characters
    pieces = []
    stream = common.TextStream(pieces.append, tok)
    for i in ids:
        stream(i)
    stream.flush()
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    with pytest.raises(ValueError, match="streaming needs the model's tokenizer"):
        common.TextStream(print, None)
    with pytest.raises(ValueError, match="not in this tokenizer.json"):
        tok.token_id("<|not_there|>")


# ---------------------------------------------------------------------------------------------------------
# Images in memory: taken as they are, without media.py


def test_image_to_uint8_takes_8_bit_images_arrays_and_tensors_itself(monkeypatch):
    """PIL images of 8-bit modes, (H, W, 3) or (3, H, W) uint8 arrays and tensors need nothing of media.py."""
    monkeypatch.setitem(__import__("sys").modules, "media", None)  # importing media now fails
    arr = tiny.synthetic_image(30, 40)  # (H, W, 3)
    want = torch.from_numpy(arr).permute(2, 0, 1)
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1))
    for src in (Image.fromarray(arr), arr, torch.from_numpy(arr), chw, torch.from_numpy(chw)):
        got = common.image_to_uint8(src)
        assert torch.equal(got, want) and got.is_contiguous(), type(src)
    video = np.stack([arr, arr[::-1]])  # (F, H, W, 3), as PyAV gives it
    assert torch.equal(common.frames_to_uint8(video), torch.stack([want, want.flip(1)]))
    rgba = np.concatenate([arr, np.full_like(arr[..., :1], 128)], axis=-1)  # half transparent
    white = np.rint(arr * 0.502 + 255 * 0.498)  # composited onto white, as the reference processors do
    got = common.image_to_uint8(Image.fromarray(rgba)).permute(1, 2, 0).numpy()
    assert np.abs(got - white).max() <= 1
    grey = Image.fromarray(arr).convert("L")
    assert torch.equal(common.image_to_uint8(grey), torch.from_numpy(np.array(grey)).expand(3, -1, -1))
    with pytest.raises(ImportError):  # a 16-bit image: media.py scales it to 8 bits
        common.image_to_uint8(Image.fromarray(arr[..., 0].astype(np.uint16) * 257))
