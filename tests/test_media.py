"""media.py: images from files, URLs, data URIs and arrays in any layout (with their guards), and videos."""

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

import common
import media

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import make_video  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Images


def test_load_image_sources(tmp_path):
    arr = tiny.synthetic_image(30, 40)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    data_uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    for src in (str(path), path, data_uri, Image.fromarray(arr), arr):
        assert np.array_equal(np.asarray(media.load_image(src)), arr)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        media.load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="not a readable image"):
        media.load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="uint8"):
        media.load_image(arr.astype(np.float32))


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
        assert np.array_equal(np.asarray(media.load_image(src)), want), tuple(src.shape)
    for bad, needle in (
        (torch.rand(3, 30, 40), r"must be uint8 .* got float32 \(3, 30, 40\)"),
        (arr[:, :, None], r"got uint8 \(30, 40, 1, 3\)"),
        (np.zeros((5, 30, 40), np.uint8), r"with C = 1 to 4; got uint8 \(5, 30, 40\)"),
        (None, "not NoneType"),
    ):
        with pytest.raises(ValueError, match=needle):
            media.load_image(bad)
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
    assert media.load_image(tmp_path / "rot.jpg").size == (20, 50)  # width, height after rotation
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    out = np.asarray(media.load_image(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [200, 0, 0] and out[3, 0].tolist() == [255, 255, 255]


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    frames = np.stack([np.full((32, 48, 3), 6 * i, np.uint8) for i in range(40)])
    make_video.write_video(path, frames, fps=20)
    return path


def test_load_video_sampling(video_file):
    everything = media.load_video(video_file, num_frames=40)
    assert everything.indices == list(range(40)) and everything.total_frames == 40 and everything.fps == 20.0
    v = media.load_video(video_file, num_frames=4)  # sparse: seeks to each frame
    assert (
        v.indices == [0, 10, 20, 30]
        and v.timestamps == [0.0, 0.5, 1.0, 1.5]
        and v.frames.shape == (4, 32, 48, 3)
    )
    dense = media.load_video(video_file, num_frames=30)  # dense: one pass
    for got in (v, dense):
        assert np.array_equal(got.frames, everything.frames[got.indices])  # the right frames, seek or not
    assert media.load_video(video_file, fps=4).indices == [0, 5, 10, 15, 20, 25, 30, 35]
    assert len(media.load_video(video_file, num_frames=100).indices) == 40  # clamped to what the file has
    more = media.load_video(video_file, num_frames=100, repeat=True)  # or each frame in turn, repeated
    assert more.indices == [i * 40 // 100 for i in range(100)] and more.indices[:6] == [0, 0, 0, 1, 1, 2]
    assert np.array_equal(more.frames, everything.frames[more.indices])
    rate = media.load_video(video_file, fps=80, repeat=True)  # 160 frames asked by rate: never repeated
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
        assert media.sample_frame_indices(*args, **kw) == indices
        assert capsys.readouterr().err == f"note: the video has {note}\n"
    assert media.sample_frame_indices(3, 3, repeat=True) == [0, 1, 2] and not capsys.readouterr().err


def test_load_video_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="video file not found"):
        media.load_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="a whole number >= 1"):
        media.load_video("x.mp4", num_frames=0)
    (tmp_path / "bad.mp4").write_bytes(b"garbage" * 50)
    with pytest.raises(ValueError, match="not a readable video"):
        media.load_video(tmp_path / "bad.mp4")
    make_video.write_video(tmp_path / "empty.mp4", np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="no video frames"):
        media.load_video(tmp_path / "empty.mp4")


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
    monkeypatch.setattr(media, "URL_DEADLINE_S", 0.3)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="took more than 0.3 s"):
        media.load_image(f"http://127.0.0.1:{server.server_port}/slow.png")
    assert time.perf_counter() - t0 < 1.5
    server.shutdown()


def test_pixel_limit_leaves_pillows_own_setting_alone(tmp_path):
    Image.fromarray(tiny.synthetic_image(30, 40)).save(tmp_path / "x.png")
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="40x30 = 1200 pixels, more than the limit of 100"):
        media.load_image(tmp_path / "x.png", max_pixels=100)
    assert media.load_image(tmp_path / "x.png", max_pixels=1200).size == (40, 30)
    assert Image.MAX_IMAGE_PIXELS == before


def test_high_bit_depth_images_stay_gray(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    rgb = np.asarray(media.load_image(tmp_path / "ramp16.png"))
    expected = np.rint(ramp / 257.0)  # 65535 -> 255: a grey ramp stays a grey ramp
    assert rgb.shape == (32, 64, 3) and (rgb[..., 0] == rgb[..., 1]).all()
    assert np.abs(rgb[..., 0] - expected).max() <= 1 and rgb.min() == 0 and rgb.max() == 255
    Image.fromarray((ramp / 65535.0).astype(np.float32)).save(tmp_path / "ramp.tiff")
    assert np.abs(np.asarray(media.load_image(tmp_path / "ramp.tiff"))[..., 0] - expected).max() <= 1
