"""Images and videos from files, URLs and data URIs, with the checks and guards a program that reads them
needs.

- `load_image`: a path, an http(s) URL or a base64 data URI -> a PIL RGB image, with a pixel limit
  (decompression bombs) and its EXIF orientation applied; also any PIL mode (`to_rgb`: transparency, 16-bit,
  CMYK, palettes) and uint8 arrays or tensors in any of their layouts (`as_image`)
- `load_video`: frames decoded with PyAV, sampled uniformly by count or by rate (`sample_frame_indices`),
  seeking to each frame when few are wanted
A processor imports this module only for what common.image_to_uint8 does not take itself: a PIL image of an
8-bit mode, or a uint8 array or tensor laid out (H, W, 3) or (3, H, W), never needs it.
"""

from __future__ import annotations

import base64
import io
import math
import os
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

import common

MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
URL_TIMEOUT_S = 20  # for each read
URL_DEADLINE_S = 60  # for a whole download
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # larger images are refused (decompression bombs)

# ----------------------------------------------------------------------------------------------------------
# Images


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, as common.to_rgb makes it; 16- and 32-bit grey images first scaled to 8 bits (PIL's own convert
    would clip them to nearly white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        x = np.asarray(image, dtype=np.float64)
        if image.mode == "F":  # floats: 0..1, or already 0..255
            x = x * 255.0 if x.max(initial=0) <= 1.0 else x
        elif image.mode.startswith("I;16") or x.max(initial=0) > 255:  # 16-bit values ("I" holds them too)
            x = x / 257.0
        image = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    return common.to_rgb(image)


def as_image(src) -> Image.Image:
    """A PIL RGB image from a PIL image, or from a uint8 array or tensor laid out (H, W), (H, W, C) as PIL and
    NumPy do, or (C, H, W) as torchvision does (C = 1 to 4)."""
    x = src.detach().cpu().numpy() if isinstance(src, torch.Tensor) else src
    if isinstance(x, np.ndarray):
        if x.ndim == 3 and x.shape[-1] not in (1, 2, 3, 4) and x.shape[0] in (1, 2, 3, 4):
            x = x.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if x.dtype != np.uint8 or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in (1, 2, 3, 4)):
            raise ValueError(
                f"an image array or tensor must be uint8 (0-255), laid out (H, W), (H, W, C) or (C, H, W) "
                f"with C = 1 to 4; got {x.dtype} {tuple(src.shape)}"
            )
        x = Image.fromarray(np.ascontiguousarray(x[..., 0] if x.shape[-1:] == (1,) else x))
    if not isinstance(x, Image.Image):
        kinds = "a PIL image, a uint8 array or tensor, a path, an http(s) URL or a data URI"
        raise ValueError(f"an image is {kinds}, not {type(src).__name__}")
    return to_rgb(x)


def read_url(url: str) -> bytes:
    """The bytes at an http(s) URL, at most MAX_DOWNLOAD_BYTES, within URL_DEADLINE_S."""
    deadline, chunks, size = time.monotonic() + URL_DEADLINE_S, [], 0
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as r:
            while chunk := r.read1(1 << 16):  # what has arrived: a slow server cannot stall us
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES or time.monotonic() > deadline:
                    break
    except Exception as e:
        raise ValueError(f"could not fetch {url}: {e}") from e
    if size > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"{url} is larger than {MAX_DOWNLOAD_BYTES >> 20} MiB: download and resize it first")
    if time.monotonic() > deadline:
        raise ValueError(f"{url} took more than {URL_DEADLINE_S} s to download: download it, pass the file")
    return b"".join(chunks)


def read_bytes(src: str) -> tuple[bytes, str]:
    """The bytes of a data URI, an http(s) URL or a file, and how to name it in an error."""
    if src.startswith("data:"):
        head, _, payload = src.partition(",")
        if ";base64" not in head:
            raise ValueError("only base64 data URIs are supported (data:image/png;base64,...)")
        try:
            return base64.b64decode(payload, validate=True), "the data URI"
        except ValueError as e:
            raise ValueError(f"the data URI's base64 payload does not decode ({e})") from e
    if src.startswith(("http://", "https://")):
        return read_url(src), src
    if not os.path.isfile(src):
        raise FileNotFoundError(f"image file not found: {src}")
    return Path(src).read_bytes(), src


def load_image(src, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A PIL RGB image from a path, an http(s) URL or a data URI, or from anything `as_image` takes.
    Its EXIF orientation is applied; one of more than `max_pixels` pixels is refused before it is decoded.
    NOTE: Pillow refuses images above twice its own Image.MAX_IMAGE_PIXELS (about 179 million pixels) in
    any case; this module leaves that global setting as it is."""
    if not isinstance(src, (str, Path)):
        return as_image(src)
    data, name = read_bytes(str(src))
    try:
        with warnings.catch_warnings():  # Pillow's warning above its own limit: ours below replaces it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
        if image.width * image.height > max_pixels:
            raise ValueError(
                f"{name} is {image.width}x{image.height} = {image.width * image.height} pixels, more than "
                f"the limit of {max_pixels} (a guard against decompression bombs): downscale it, or raise "
                "the limit with --max-image-pixels N (media.load_image(src, max_pixels=N))"
            )
        image.load()
    except Image.DecompressionBombError as e:  # above Pillow's own limit, which this module leaves as it is
        raise ValueError(f"{name} is larger than Pillow opens ({e}): downscale it") from e
    except UnidentifiedImageError as e:
        raise ValueError(f"{name} is not a readable image (not a format Pillow knows, or damaged)") from e
    except OSError as e:
        raise ValueError(f"{name} is not a readable image ({e})") from e
    return to_rgb(ImageOps.exif_transpose(image))


# ----------------------------------------------------------------------------------------------------------
# Videos


@dataclass
class Video:
    frames: np.ndarray  # (F, H, W, 3) uint8
    indices: list[int]  # which frames of the file were taken
    timestamps: list[float]  # their times in seconds
    fps: float  # the file's frame rate
    total_frames: int


def check_frames(num_frames: int | None, fps: float | None) -> None:
    """How many frames to sample: `num_frames` (>= 1) or `fps` (> 0), not both."""
    if num_frames is not None and fps is not None:
        raise ValueError("give --num-frames or --fps, not both")
    if num_frames is not None and (num_frames != int(num_frames) or num_frames < 1):
        raise ValueError(f"the number of frames must be a whole number >= 1, got {num_frames}")
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a finite number > 0, got {fps}")


def sample_frame_indices(
    total: int,
    num_frames: int | None = None,
    fps: float | None = None,
    video_fps: float | None = None,
    repeat: bool = False,
) -> list[int]:
    """Uniform indices: `num_frames` of them, or `fps` per second of video. A count above what the video
    has takes all its frames, or with `repeat` each frame in turn (3 for 8: 0 0 0 1 1 1 2 2).
    An fps never repeats frames."""
    check_frames(num_frames, fps)
    asked = num_frames
    if fps is not None:
        video_fps = video_fps or 24.0
        num_frames, repeat, asked = max(1, int(total / video_fps * fps)), False, f"{fps:g} per second"
    if num_frames is None or num_frames == total:
        return list(range(total))
    if num_frames > total:
        has = f"{total} frame{'s' * (total != 1)}" + (f" at {video_fps:g} per second" if fps else "")
        them = "it" if total == 1 else "them"
        how = f"repeating {them} to make" if repeat else f"using {them} instead of"
        print(f"note: the video has {has}; {how} {asked}", file=sys.stderr)
        return [i * total // num_frames for i in range(num_frames)] if repeat else list(range(total))
    return torch.arange(0, total, total / num_frames).int().tolist()[:num_frames]


def seek_frames(container, stream, wanted: list[int], rate: float) -> dict[int, np.ndarray]:
    """Frame index -> (H, W, 3) uint8, by seeking to each wanted frame's timestamp (for a few frames of a long
    video, much faster than decoding it all). Frames it cannot reach are missing from the result."""
    frames, start = {}, stream.start_time or 0
    for idx in wanted:
        container.seek(start + int(idx / rate / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.pts is None or round((frame.pts - start) * stream.time_base * rate) >= idx:
                frames[idx] = frame.to_ndarray(format="rgb24")
                break
    return frames


def load_video(
    src: str | Path, num_frames: int | None = None, fps: float | None = None, repeat: bool = False
) -> Video:
    """Decode frames with PyAV, sampled uniformly by count or rate (`sample_frame_indices`; `repeat`: a short
    video's frames repeated up to the count). When few frames are wanted it seeks to each one instead of
    decoding the whole file."""
    import av

    check_frames(num_frames, fps)
    src = str(src)
    if not src.startswith(("http://", "https://")) and not os.path.isfile(src):
        raise FileNotFoundError(f"video file not found: {src}")
    try:
        container = av.open(src, timeout=URL_TIMEOUT_S)
    except Exception as e:
        raise ValueError(f"{src} is not a readable video ({e})") from e
    with container:
        if not container.streams.video:
            raise ValueError(f"{src} contains no video frames (no video stream)")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 24.0)
        total = stream.frames  # from the header; 0 when the container does not say
        if not total and stream.duration:
            total = int(float(stream.duration * stream.time_base) * rate)
        wanted = sample_frame_indices(total, num_frames, fps, rate, repeat) if total else []
        sparse = total and len(wanted) * 4 < total
        frames = seek_frames(container, stream, wanted, rate) if sparse else {}
        if not wanted or len(frames) < len(wanted):  # dense, or the header's frame count was off
            container.seek(0)
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            if total == 0 or len(decoded) < total:
                if total and decoded:
                    msg = (
                        f"its header says {total} frames but only {len(decoded)} decode; sampling from those"
                    )
                    print(f"note: {src}: {msg}", file=sys.stderr)
                total = len(decoded)
                wanted = sample_frame_indices(total, num_frames, fps, rate, repeat) if total else []
            frames = {i: decoded[i] for i in wanted}
    if not frames:
        raise ValueError(f"{src} contains no decodable video frames")
    return Video(np.stack([frames[i] for i in wanted]), wanted, [i / rate for i in wanted], rate, total)
