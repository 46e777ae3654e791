"""common.py: loader errors, sampling, the generation loop, streaming decode, media I/O."""

import base64
import io
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from safetensors.torch import save_file

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import make_video  # noqa: E402

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


def test_model_type_check():
    common.check_model_type({"model_type": "qwen2_vl"}, "qwen2_vl", "qwen2_vl.py")
    with pytest.raises(ValueError, match="model_type='video_llava'.*use video_llava.py"):
        common.check_model_type({"model_type": "video_llava"}, "qwen2_vl", "qwen2_vl.py")
    with pytest.raises(ValueError, match="model_type='llama'"):
        common.check_model_type({"model_type": "llama"}, "qwen2_vl", "qwen2_vl.py")


def test_pick_dtype():
    cpu = torch.device("cpu")
    assert common.pick_dtype(None, cpu) == torch.float32
    assert common.pick_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert common.pick_dtype("bf16", cpu) == torch.bfloat16
    for bad in ("int8", torch.int8, "float64"):
        with pytest.raises(ValueError, match="unsupported dtype"):
            common.pick_dtype(bad, cpu)


# ---------------------------------------------------------------------------------------------------------
# Sampling and the generation loop


def test_pad_batch():
    ids, mask = common.pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = common.pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="padding_side must be"):
        common.pad_batch([[1]], 0, side="middle")


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert common.sample(logits).item() == 0
    g = torch.Generator().manual_seed(0)
    draws = {common.sample(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(300)}
    assert draws == {0, 1}
    # softmax([3, 2, 1, 0, -1]) = [.636, .234, .086, .032, .012]: top_p=0.8 keeps {0, 1} (0.636 < 0.8 <= 0.87)
    draws = {common.sample(logits, temperature=1.0, top_p=0.8, generator=g).item() for _ in range(300)}
    assert draws == {0, 1}
    draws = {common.sample(logits, temperature=1.0, top_p=0.5, generator=g).item() for _ in range(50)}
    assert draws == {0}


def test_repetition_penalty():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    seen = torch.tensor([[True, False, True, False]])
    assert common.sample(logits, seen, repetition_penalty=2.0).item() == 1  # 2.0 -> 1.0 loses to 1.9
    seen = torch.tensor([[False, False, True, False]])
    logits = torch.tensor([[-5.0, -5.0, -1.0, -1.5]])
    assert common.sample(logits, seen, repetition_penalty=2.0).item() == 3  # -1.0 -> -2.0 loses to -1.5


def test_generate_loop_stops_rows_and_pads():
    V, eos, pad = 6, 5, 0
    script = torch.tensor([[1, 2, 5, 3, 3, 3, 3, 3, 3, 3], [2, 2, 2, 2, 5, 1, 1, 1, 1, 1]])

    def onehot(col):
        return torch.nn.functional.one_hot(script[:, col], V).float()

    out = common.generate_loop(
        onehot(0),
        lambda tok, i: onehot(i + 1),
        torch.ones(2, 3, dtype=torch.long),
        torch.ones(2, 3),
        common.GenerationSettings(max_new_tokens=10),
        [eos],
        pad,
    )
    assert out.tokens.tolist() == [[1, 2, 5, 0, 0], [2, 2, 2, 2, 5]] and out.stopped == "eos"
    out = common.generate_loop(
        onehot(0),
        lambda tok, i: onehot(i + 1),
        torch.ones(2, 3, dtype=torch.long),
        torch.ones(2, 3),
        common.GenerationSettings(max_new_tokens=4),
        [],
        pad,
    )
    assert out.tokens.tolist() == script[:, :4].tolist() and out.stopped == "max_new_tokens"


def test_streaming_decode_is_utf8_safe(tmp_path):
    tiny.make_tokenizer(tmp_path, ["<|im_end|>"])
    tok = common.Tokenizer(tmp_path / "tokenizer.json")
    text = "你好，世界。这是一张图片。 émigré 🙂 ✓"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # byte-level pieces split multi-byte characters
    push = tok.stream()
    pieces = [push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    with pytest.raises(ValueError, match="not in this tokenizer.json"):
        tok.token_id("<|not_there|>")


# ---------------------------------------------------------------------------------------------------------
# Media


def test_load_image_sources(tmp_path):
    arr = tiny.synthetic_image(30, 40)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    data_uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    for src in (str(path), path, data_uri, Image.fromarray(arr), arr):
        assert np.array_equal(np.asarray(common.load_image(src)), arr)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        common.load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="not a readable image"):
        common.load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="uint8"):
        common.load_image(arr.astype(np.float32))


def test_image_and_video_arrays_in_either_layout():
    """NumPy/PIL's (H, W, C) and torchvision's (C, H, W), arrays or tensors, give the same pixels."""
    arr = tiny.synthetic_image(30, 40)  # (H, W, 3)
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1))
    gray = (
        arr[..., :1],
        torch.from_numpy(chw[:1]),
        np.concatenate([arr[..., :1], np.full_like(arr[..., :1], 255)], -1),
    )
    for src in (chw, torch.from_numpy(chw), torch.from_numpy(arr), *gray):  # the last: grey + opaque alpha
        want = arr if src.shape[-1] == 3 or src.shape[0] == 3 else np.repeat(arr[..., :1], 3, axis=-1)
        assert np.array_equal(np.asarray(common.load_image(src)), want), tuple(src.shape)
    for bad, needle in (
        (torch.rand(3, 30, 40), r"must be uint8 .* got float32 \(3, 30, 40\)"),
        (arr[:, :, None], r"got uint8 \(30, 40, 1, 3\)"),
        (np.zeros((5, 30, 40), np.uint8), r"with C = 1 to 4; got uint8 \(5, 30, 40\)"),
        (None, "not NoneType"),
    ):
        with pytest.raises(ValueError, match=needle):
            common.load_image(bad)
    video = np.stack([tiny.synthetic_image(30, 40, seed=i) for i in range(3)])  # (F, H, W, 3)
    want = common.frames_to_uint8(video)
    fchw = np.ascontiguousarray(video.transpose(0, 3, 1, 2))
    for frames in (torch.from_numpy(video), fchw, torch.from_numpy(fchw), list(torch.from_numpy(fchw))):
        assert torch.equal(common.frames_to_uint8(frames), want)


def test_exif_orientation_and_alpha(tmp_path):
    arr = tiny.synthetic_image(20, 50)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    (tmp_path / "rot.jpg").write_bytes(buf.getvalue())
    assert common.load_image(tmp_path / "rot.jpg").size == (20, 50)  # width, height after rotation
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    out = np.asarray(common.load_image(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [200, 0, 0] and out[3, 0].tolist() == [255, 255, 255]


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    frames = np.stack([np.full((32, 48, 3), 6 * i, np.uint8) for i in range(40)])
    make_video.write_video(path, frames, fps=20)
    return path


def test_load_video_sampling(video_file):
    everything = common.load_video(video_file, num_frames=40)
    assert everything.indices == list(range(40)) and everything.total_frames == 40 and everything.fps == 20.0
    v = common.load_video(video_file, num_frames=4)  # sparse: seeks to each frame
    assert (
        v.indices == [0, 10, 20, 30]
        and v.timestamps == [0.0, 0.5, 1.0, 1.5]
        and v.frames.shape == (4, 32, 48, 3)
    )
    dense = common.load_video(video_file, num_frames=30)  # dense: one pass
    for got in (v, dense):
        assert np.array_equal(got.frames, everything.frames[got.indices])  # the right frames, seek or not
    assert common.load_video(video_file, fps=4).indices == [0, 5, 10, 15, 20, 25, 30, 35]
    assert len(common.load_video(video_file, num_frames=100).indices) == 40  # clamped to what the file has
    more = common.load_video(video_file, num_frames=100, repeat=True)  # or each frame in turn, repeated
    assert more.indices == [i * 40 // 100 for i in range(100)] and more.indices[:6] == [0, 0, 0, 1, 1, 2]
    assert np.array_equal(more.frames, everything.frames[more.indices])
    rate = common.load_video(video_file, fps=80, repeat=True)  # 160 frames asked by rate: never repeated
    assert rate.indices == list(range(40))


def test_frame_sampling_notes(capsys):
    rate = "12 frames at 4 per second; using them instead of 100 per second"  # a rate never repeats
    for args, kw, indices, note in (
        ((3, 8), dict(repeat=True), [0, 0, 0, 1, 1, 1, 2, 2], "3 frames; repeating them to make 8"),
        ((3, 8), {}, [0, 1, 2], "3 frames; using them instead of 8"),
        ((1, 4), dict(repeat=True), [0] * 4, "1 frame; repeating it to make 4"),
        ((12,), dict(fps=100, video_fps=4.0), list(range(12)), rate),
        ((12,), dict(fps=100, video_fps=4.0, repeat=True), list(range(12)), rate),
    ):
        assert common.sample_frame_indices(*args, **kw) == indices
        assert capsys.readouterr().err == f"note: the video has {note}\n"
    assert common.sample_frame_indices(3, 3, repeat=True) == [0, 1, 2] and not capsys.readouterr().err


def test_load_video_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="video file not found"):
        common.load_video(tmp_path / "missing.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"garbage" * 50)
    with pytest.raises(ValueError, match="not a readable video"):
        common.load_video(tmp_path / "bad.mp4")
    make_video.write_video(tmp_path / "empty.mp4", np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="no video frames"):
        common.load_video(tmp_path / "empty.mp4")


def test_record_shapes_hooks_named_stages_and_removes_them():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    stages = [("0", "first linear", "(B, 8)"), ("2", "second linear", "(B, 3)")]
    with common.record_shapes(model, stages) as rows:
        model(torch.zeros(5, 4))
        model(torch.zeros(1, 4))  # a second call (a decode step) adds rows
    got = [(r["module"], r["shape"]) for r in rows]
    assert got == [("0", (5, 8)), ("2", (5, 3)), ("0", (1, 8)), ("2", (1, 3))]
    assert rows[1]["stage"] == "second linear" and rows[1]["legend"] == "(B, 3)"
    model(torch.zeros(2, 4))
    assert len(rows) == 4, "the hooks are gone after the block"
    with pytest.raises(AttributeError):
        with common.record_shapes(model, [("9", "no such module", "")]):
            pass


def test_url_downloads_have_a_total_deadline(monkeypatch):
    """A server that dribbles bytes never trips the per-read timeout; the total deadline stops it."""
    import http.server
    import threading

    class Dribble(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"x" * 10)
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Dribble)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(common, "URL_DEADLINE_S", 0.3)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="took more than 0.3 s"):
        common.load_image(f"http://127.0.0.1:{server.server_port}/slow.png")
    assert time.perf_counter() - t0 < 1.5
    server.shutdown()
