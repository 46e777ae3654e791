"""Writes examples/pan.mp4: a 2-second, 24 fps, 256x192 video panning and zooming over grace_hopper.jpg.

    python examples/make_video.py [OUT.mp4]      # default: examples/pan.mp4

`write_video` is also what the tests use to make their video files.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def write_video(path: str | Path, frames: np.ndarray, fps: int = 24) -> None:
    """(F, H, W, 3) uint8 -> an MPEG-4 file (H and W even). F may be 0: a valid file with no frames."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = (frames.shape[1], frames.shape[2]) if len(frames) else (64, 64)
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "3"}
        container.start_encoding()  # writes the header even when there is no frame
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def pan_frames(n: int = 48, size: tuple[int, int] = (256, 192)) -> np.ndarray:
    photo = Image.open(HERE / "grace_hopper.jpg").convert("RGB")  # 512 x 600
    W, H = photo.size
    frames = []
    for i in range(n):
        a = i / max(1, n - 1)
        w = int(W * (1.0 - 0.4 * a))  # zoom in while panning down
        h = int(w * size[1] / size[0])
        top = int((H - h) * a)
        left = (W - w) // 2
        frames.append(np.asarray(photo.crop((left, top, left + w, top + h)).resize(size, Image.BICUBIC)))
    return np.stack(frames)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "out", nargs="?", default=HERE / "pan.mp4", help="where to write it (default: %(default)s)"
    )
    out = Path(ap.parse_args().out)
    if out.suffix.lower() != ".mp4":
        sys.exit(f"error: {out} does not end in .mp4: name an .mp4 file")
    write_video(out, pan_frames())
    print(f"wrote {out}")
