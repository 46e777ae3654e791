"""Helpers the teaching notebooks share: picking a checkpoint, and drawing. Nothing here is architecture:
the notebooks call the model files for that.

- `load_checkpoint`: a directory named by an environment variable, else the official default (downloaded),
  else a tiny random checkpoint built on the spot with tests/tiny.py (answers are then random tokens)
- `example_photo`, `example_video`: the repository's example media (the video is written on first use)
- `draw_anatomy`, `draw_grid`, `draw_tokens`, `draw_heat`, `draw_pipeline` (two branches meeting at the
  scatter), `draw_scatter`: the pictures; `table`, `shape_table`: Markdown tables
- `show_source`: the model file's function that a picture draws, with a link to its line
- `stream`: generation with the answer streamed as it is produced, and its timings
- `square_picture`, `answer_targets`, `iou`: the synthetic tasks the demo models are trained on (a coloured
  square on grey), the next-token targets of the answers only, and the overlap of two boxes
- `reserved_for_test`, `square_places`, `draw_square`, `interval95`: the places kept out of training, every
  picture of a split, one picture drawn, and the 95 % interval of a held-out score
- `check_function`: a write-a-function exercise checked against the model file's function on many inputs
- `growing_square_video`, `two_square_picture` (with `two_square_boxes`, `two_squares_overlap`): the synthetic
  tasks of the Video-LLaVA and PaliGemma demos
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import os
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "examples"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import common  # noqa: E402
import media  # noqa: E402

MODELS = ("qwen2_vl", "paligemma", "llava_onevision", "video_llava", "perception_lm")
PHOTO = ROOT / "examples" / "grace_hopper.jpg"
VIDEO = ROOT / "examples" / "pan.mp4"
COLORS = {"text": "#9ecae1", "special": "#fdae6b", "image": "#74c476", "video": "#9e9ac8", "pad": "#d9d9d9"}
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, imported by transformers
plt.rcParams.update({"figure.dpi": 110, "axes.titlesize": 11, "font.size": 10})


def show_source(fn) -> None:
    """The source of a model file's function (the code the next picture draws), with a link to its line."""
    lines, start = inspect.getsourcelines(fn)
    path = Path(inspect.getsourcefile(fn)).resolve().relative_to(ROOT)
    link = f"[`{path}`, line {start}](../{path}#L{start}): `{fn.__qualname__}`"
    display(Markdown(f"{link}\n\n```python\n{''.join(lines)}```"))


def example_photo() -> Image.Image:
    return media.load_image(PHOTO)


def example_video() -> Path:
    """examples/pan.mp4 (2 s, 24 fps, 256x192, panning over the photo), written by examples/make_video.py."""
    if not VIDEO.is_file():
        import make_video

        make_video.write_video(VIDEO, make_video.pan_frames())
    return VIDEO


def load_checkpoint(m, env: str, build: str, **build_args):
    """(model, processor, tiny) for model file `m`. Order: the directory in $env, the official default
    m.DEFAULT (downloaded once to the Hugging Face cache; set HF_HUB_OFFLINE=1 to skip it), and, when neither
    can be had, a tiny random-weight checkpoint in the published layout built by tests/tiny.py's `build`."""
    path = os.environ.get(env)
    if not path:
        try:
            path = str(common.checkpoint_dir(m.DEFAULT))
        except ValueError as e:
            print(f"no real checkpoint: {str(e).split('(')[0].strip()}")
    if path:
        model, processor = m.load(path)
        print(f"loaded {path}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
        return model, processor, False
    ckpt = tiny_checkpoint(build, **build_args)
    model, processor = m.load(ckpt, device="cpu")
    n = sum(p.numel() for p in model.parameters())
    print(
        f"NOTE: using a TINY RANDOM checkpoint ({n / 1e6:.2f}M parameters, built by tests/tiny.py).\n"
        f"Its answers are random tokens and its widths are tiny. Set {env}=DIR (a checkpoint directory) or\n"
        f"allow the download of {m.DEFAULT} to see the real model. Pictures of preprocessing, prompts,\n"
        "positions and masks below use the published settings either way."
    )
    return model, processor, True


# The smallest published configuration of each model file (its config.json, copied to tests/data/).
PUBLISHED = {
    "qwen2_vl": "qwen2_vl/Qwen2-VL-2B-Instruct",
    "paligemma": "paligemma/paligemma-3b-mix-224",
    "llava_onevision": "llava_onevision/llava-onevision-qwen2-0.5b-ov-hf",
    "video_llava": "video_llava/Video-LLaVA-7B-hf",
    "perception_lm": "perception_lm/Perception-LM-1B",
}


def meta_model(m, config_json: Path | None = None, processor=None) -> torch.nn.Module:
    """The model of model file `m` for a published config.json (default: its smallest checkpoint's), built on
    the meta device: shapes without memory, for counting parameters and recording the shapes of a forward
    pass at the real widths. With `processor`, the config's image/video token ids become that processor's
    (a tiny checkpoint's tokenizer numbers them differently), so its output can run through the model. The
    model class X is the one whose config class XConfig sits beside it in the file."""
    config_json = config_json or ROOT / "tests" / "data" / f"{PUBLISHED[m.__name__]}.config.json"
    d = json.loads(Path(config_json).read_text())
    for kind in ("image", "video"):
        if hasattr(processor, f"{kind}_token_id"):
            d[f"{kind}_token_id"] = d[f"{kind}_token_index"] = getattr(processor, f"{kind}_token_id")
    for name, cls in vars(m).items():
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and hasattr(m, name + "Config"):
            with torch.device("meta"):
                return cls(m.config_from_hf(d))
    raise ValueError(f"no model class with a config class in {m.__name__}")


def on_meta(inputs: dict) -> dict:
    """The processor's float tensors (pixels) as meta tensors of the same shapes; token ids, masks and grids
    stay on the CPU, where the model reads them to place the vision features and count positions."""
    return {k: v.to("meta") if v.is_floating_point() else v for k, v in inputs.items()}


def tile_canvas(tiles, rows: int, cols: int, mean, std) -> torch.Tensor:
    """(rows*cols, 3, S, S) normalised tiles, row by row -> one (rows*S, cols*S, 3) picture."""
    pics = [torch.from_numpy(to_image(t, mean, std)) for t in tiles]
    return torch.cat([torch.cat(pics[r * cols : (r + 1) * cols], 1) for r in range(rows)])


def on(model, inputs: dict) -> dict:
    """The processor's tensors moved to the model's device."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in inputs.items()}


def tiny_checkpoint(build: str, **build_args) -> Path:
    """A tiny random-weight checkpoint in the published layout, built by tests/tiny.py's `build` in a
    temporary directory (quietly: the builder uses transformers, which reports its progress)."""
    import tiny

    tiny.torchvision_for_reference()
    out = Path(tempfile.mkdtemp(prefix="tiny_"))
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return getattr(tiny, build)(out, **build_args)["hub"]


def draw_grid(ax, image, rows: int, cols: int, title: str, color: str = "white", lw: float = 0.6) -> None:
    """An image with a rows x cols grid over it (patches, merged tokens or tiles)."""
    image = np.asarray(image)
    H, W = image.shape[:2]
    ax.imshow(image, extent=(0, W, H, 0))
    for r in range(1, rows):
        ax.axhline(r * H / rows, color=color, lw=lw)
    for c in range(1, cols):
        ax.axvline(c * W / cols, color=color, lw=lw)
    first = ax.get_subplotspec() is None or ax.get_subplotspec().is_first_col()
    ax.set(title=title, xlabel="x (pixels)", ylabel="y (pixels)" if first else "")  # one y label per row


def to_image(x, mean, std) -> np.ndarray:
    """A normalised (3, H, W) tensor back to an (H, W, 3) picture."""
    m, s = np.array(mean)[:, None, None], np.array(std)[:, None, None]
    return np.clip((x.float().numpy() * s + m).transpose(1, 2, 0), 0, 1)


def token_kinds(ids, processor) -> list[str]:
    """text, special, image or video per token (the ids of the last two from the processor)."""
    image_id, video_id = processor.image_token_id, getattr(processor, "video_token_id", None)
    vocab_size = processor.tokenizer.tok.get_vocab_size(with_added_tokens=False)
    kinds = []
    for i in ids:
        i = int(i)
        piece = processor.tokenizer.tok.id_to_token(i) or ""
        if i == image_id:
            kinds.append("image")
        elif i == video_id:
            kinds.append("video")
        elif i >= vocab_size or (piece.startswith("<") and piece.endswith(">") and len(piece) > 2):
            kinds.append("special")
        else:
            kinds.append("text")
    return kinds


def draw_tokens(ids, processor, title: str) -> None:
    """The token stream as a grid of cells, one per token, coloured by kind, read left to right."""
    kinds = token_kinds(ids, processor)
    per_row = 64 * -(-len(kinds) // (64 * 24))  # at most 24 rows
    n_rows = -(-len(kinds) // per_row)
    grid = np.ones((n_rows, per_row, 3))
    for i, k in enumerate(kinds):
        grid[i // per_row, i % per_row] = [int(COLORS[k][j : j + 2], 16) / 255 for j in (1, 3, 5)]
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.16 * n_rows))
    ax.imshow(grid, aspect="auto", interpolation="nearest")
    ax.set(title=title, xlabel=f"token index mod {per_row}", ylabel=f"row of {per_row} tokens")
    ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    counts = {k: kinds.count(k) for k in COLORS if k in kinds}
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in counts]
    ax.legend(handles, [f"{k}: {n}" for k, n in counts.items()], loc="upper left", bbox_to_anchor=(1, 1))
    plt.show()


def compact(ids, processor) -> str:
    """The prompt's tokens as text, with runs of one repeated special token written once with its count."""
    pieces, i = [], 0
    ids = [int(t) for t in ids]
    while i < len(ids):
        j = i
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        text = processor.tokenizer.decode([ids[i]], skip_special_tokens=False)
        pieces.append(f"{text} x {j - i} " if j - i > 3 else text * (j - i))
        i = j
    return "".join(pieces)


def draw_heat(ax, heat, box: tuple[int, int, int], side: int, title: str) -> None:
    """An attention map (rows, cols) over a side x side picture, on its own axes: each cell's share divided
    by the uniform share (1 = as much as every cell gets when attention is spread evenly), in diverging
    colours centred on 1, with the square (x, y, size) as an outline."""
    from matplotlib.colors import TwoSlopeNorm

    ratio = np.asarray(heat / heat.mean())
    spread = max(abs(ratio.max() - 1), abs(1 - ratio.min()), 0.05)
    norm = TwoSlopeNorm(1.0, vmin=max(0.0, 1 - spread), vmax=1 + spread)  # a share is never below 0
    im = ax.imshow(ratio, extent=(0, side, side, 0), cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax.add_patch(plt.Rectangle(box[:2], box[2], box[2], fill=False, color="black", lw=2, ls="--"))
    ax.set(title=f"{title}\nshare / uniform share: {ratio.min():.2f} to {ratio.max():.2f}")
    ax.set(xlabel="x (pixels)", ylabel="y (pixels)")
    plt.colorbar(im, ax=ax, fraction=0.046, label="share / uniform share")


def table(rows: list[dict] | list[list], headers: list[str] | None = None) -> None:
    """A Markdown table (rendered by Jupyter and by code hosts)."""
    headers = headers or list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [r[h] for h in headers] if isinstance(r, dict) else r
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    display(Markdown("\n".join(lines)))


def first_calls(recorded: list[dict]) -> dict[str, dict]:
    """Each recorded module's first call (a forward pass and then decode steps all add rows)."""
    seen = {}
    for r in recorded:
        seen.setdefault(r["module"], r)
    return seen


def shape_table(recorded: list[dict], stages, inputs: dict) -> None:
    """The inputs' shapes, then each stage's first recorded call. Every stage must have run."""
    seen = first_calls(recorded)
    missing = [p for p, _, _ in stages if p not in seen]
    assert not missing, f"these stages never ran: {missing}"
    rows = [[f"input `{k}`", "", str(tuple(v.shape))] for k, v in inputs.items()]
    rows += [[f"`{p}`: {what}", legend, str(seen[p]["shape"])] for p, what, legend in stages]
    table(rows, ["stage", "legend", "shape"])


def draw_pipeline(recorded: list[dict], stages, inputs: dict, title: str, steps: dict | None = None) -> None:
    """The model as two branches that meet at the scatter: token ids -> token embeddings on the left,
    pixels -> vision tower -> projector on the right (a separate video tower gets a column of its own, the
    two joined at the projector both share), then the decoder down to the logits. Each stage of `stages` (in
    the file's order) carries its recorded shape (its first call); `steps` = {stage path: text} adds a step
    with no module of its own (packing, pooling) after that stage. Vision green, embeddings and scatter
    orange, the decoder blue."""
    seen, steps = first_calls(recorded), steps or {}
    i_embed = next(i for i, (p, _, _) in enumerate(stages) if "embed_tokens" in p)
    vision, decoder = stages[:i_embed], stages[i_embed + 1 :]
    two = any(p.startswith("video_tower") for p, _, _ in vision)
    columns: dict[str, list] = {"image": []} | ({"video": []} if two else {})
    shared: list = []  # the stages after two towers (the projector both use), where the towers join
    for path, what, legend in vision:
        tower = (
            "video" if path.startswith("video_tower") else "image" if path.startswith("image_tower") else None
        )
        into = columns[tower] if two and tower else shared if two else columns["image"]
        into.append((f"{textwrap.fill(what, 40)}\n{legend} = {seen[path]['shape']}", COLORS["image"]))
        if path in steps:
            into.append((steps[path], COLORS["image"]))
    pixels = {k: v for k, v in inputs.items() if v.is_floating_point()}
    for tower, column in columns.items():  # each tower takes its own pixels; one tower takes them all
        keys = [k for k in pixels if not two or ("video" in k) == (tower == "video")]
        column.insert(0, ("\n".join(f"{k} {tuple(pixels[k].shape)}" for k in keys), "#d9d9d9"))
    depth = max(len(c) for c in columns.values())
    xs = {"image": 0.52, "video": 0.84} if two else {"image": 0.7}
    join, scatter = sum(xs.values()) / len(xs), depth + len(shared)  # the scatter's row
    path, what, legend = stages[i_embed]
    left = [(f"input_ids {tuple(inputs['input_ids'].shape)}", "#d9d9d9")]
    left.append((f"{what.split(' (')[0]}\n{legend} = {seen[path]['shape']}", "#fdae6b"))
    fig, ax = plt.subplots(figsize=(12 if two else 10, 0.8 * (scatter + 1 + len(decoder))))
    ends = []
    for x, column, last in [(0.16, left, scatter - 1), *((xs[t], c, depth - 1) for t, c in columns.items())]:
        for j, (text, colour) in enumerate(column):  # each column ends on its row `last`
            box(ax, x, -(last - len(column) + 1 + j), text, colour, arrow_in=j > 0)
        ends.append((x, -last))
    for j, (text, colour) in enumerate(shared):
        box(ax, join, -(depth + j), text, colour, arrow_in=j > 0)
    if shared:
        for end in ends[1:]:
            arrow(ax, end, (join, -depth))
        ends = [ends[0], (join, -(scatter - 1))]
    box(
        ax,
        0.5,
        -scatter,
        "scatter: vision features written over the placeholder rows of the embeddings",
        "#fdae6b",
    )
    for end in ends:
        arrow(ax, end, (0.5, -scatter))
    for j, (path, what, legend) in enumerate(decoder, start=1):
        box(ax, 0.5, -scatter - j, f"{what}\n{legend} = {seen[path]['shape']}", COLORS["text"], arrow_in=True)
    ax.set(xlim=(0, 1), ylim=(-scatter - len(decoder) - 0.6, 0.6), title=title)
    ax.axis("off")
    plt.show()


def box(ax, x: float, y: float, text: str, colour: str, arrow_in: bool = False) -> None:
    """One box of draw_pipeline, centred at (x, y); arrow_in: an arrow from the box above it."""
    ax.text(
        x, y, text, ha="center", va="center", fontsize=8, bbox=dict(boxstyle="round", fc=colour, ec="grey")
    )
    if arrow_in:
        arrow(ax, (x, y + 1), (x, y))


def arrow(ax, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A grey arrow between two boxes of draw_pipeline, from just below one to just above the other."""
    ax.annotate(
        "", (end[0], end[1] + 0.3), (start[0], start[1] - 0.3), arrowprops=dict(arrowstyle="->", color="grey")
    )


def draw_scatter(before: torch.Tensor, after: torch.Tensor, is_pad: torch.Tensor, title: str) -> None:
    """The token embeddings (T, D) of one prompt before and after the vision features are scattered over the
    placeholder rows (marked on the left), on one colour scale."""
    before, after = before.detach().float().cpu(), after.detach().float().cpu()
    lim = float(max(before.abs().max(), after.abs().max()))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, x, name in (
        (axes[0], before, "token embeddings of input_ids"),
        (axes[1], after, "after masked_scatter"),
    ):
        im = ax.imshow(x, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, interpolation="nearest")
        rows = is_pad.nonzero().flatten()
        ax.plot([-1.5] * len(rows), rows, "s", color=COLORS["image"], ms=3, clip_on=False)
        ax.set(title=name, xlabel="embedding dimension", xlim=(-2, x.shape[1] - 0.5))
    axes[0].set_ylabel("token (green: vision placeholder)")
    fig.suptitle(title)
    plt.colorbar(im, ax=axes, fraction=0.03)
    plt.show()


def stream(model, inputs: dict, max_new_tokens: int = 24, **kw) -> tuple[str, dict]:
    """Generates with the answer printed as it streams; returns it and the timings."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    stamps: list[float] = []

    def streamer(piece: str) -> None:
        stamps.append(time.perf_counter())
        print(piece, end="", flush=True)

    t0 = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **kw)
    t1 = time.perf_counter()
    print()
    n = out.shape[1]
    ttft = (stamps[0] if stamps else t1) - t0
    rate = (n - 1) / (t1 - t0 - ttft) if n > 1 else float("nan")
    timing = dict(prompt_tokens=inputs["input_ids"].shape[1], new_tokens=n, ttft_s=round(ttft, 3))
    timing.update(tokens_per_s=round(rate, 1), steps_s=np.diff([t0] + stamps).round(4).tolist())
    return model.tokenizer.decode(out[0]), timing


SQUARE_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}


def reserved_for_test(x: int, y: int, *, grid: int) -> bool:
    """The places held out: a square whose top-left corner, counted in grid steps, has (column + row) % 4 ==
    0 is drawn only for testing, never in training. Every column and every row still occurs in training,
    with other partners, so a test picture asks for a combination the model has not seen."""
    return (x // grid + y // grid) % 4 == 0


def square_picture(
    rng: np.random.Generator, side: int = 112, grid: int = 1, split: str | None = None
) -> tuple[np.ndarray, str, tuple[int, int, int]]:
    """A grey (side, side, 3) uint8 picture with one square of a random colour, size (a quarter to half the
    side) and place, both multiples of `grid` pixels: (picture, colour name, (x, y, size) in pixels).
    split="train" draws only places not reserved_for_test, "test" only reserved ones, None any place."""
    while True:
        s = grid * int(rng.integers(side // 4 // grid, side // 2 // grid + 1))
        x, y = (grid * int(v) for v in rng.integers(0, (side - s) // grid, size=2))
        colour = list(SQUARE_COLOURS)[int(rng.integers(len(SQUARE_COLOURS)))]
        if split is None or reserved_for_test(x, y, grid=grid) == (split == "test"):
            return draw_square(colour, (x, y, s), side), colour, (x, y, s)


def draw_square(colour: str, box: tuple[int, int, int], side: int = 112) -> np.ndarray:
    """The picture of square_picture: grey, with a square of `colour` at box = (x, y, size) in pixels."""
    picture = np.full((side, side, 3), 128, np.uint8)
    x, y, s = box
    picture[y : y + s, x : x + s] = SQUARE_COLOURS[colour]
    return picture


def square_places(side: int = 112, grid: int = 1, split: str | None = None) -> list[tuple]:
    """Every (colour, (x, y, size)) that square_picture can draw for `split`, in a fixed order."""
    sizes = range(side // 4 // grid, side // 2 // grid + 1)
    boxes = [
        (grid * i, grid * j, grid * k)
        for k in sizes
        for j in range((side - grid * k) // grid)
        for i in range((side - grid * k) // grid)
    ]
    keep = [
        b for b in boxes if split is None or reserved_for_test(b[0], b[1], grid=grid) == (split == "test")
    ]
    return [(colour, box) for box in keep for colour in SQUARE_COLOURS]


def interval95(k: int, n: int) -> tuple[float, float]:
    """Wilson's 95 % interval for a success rate of k in n: the spread a held-out score of n pictures has."""
    z, p = 1.96, k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def iou(a: tuple, b: tuple) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def answer_targets(input_ids: torch.Tensor, answer_lengths: list[int]) -> torch.Tensor:
    """Next-token targets (B, T) for left-padded rows that end with their answer: each row's last
    answer_lengths[b] tokens, -100 (ignored by the loss) everywhere else."""
    targets = torch.full_like(input_ids, -100)
    for b, n in enumerate(answer_lengths):
        targets[b, -n:] = input_ids[b, -n:]
    return targets


def draw_step_times(timing: dict, title: str) -> None:
    """Time to each streamed piece: the first bar is the prefill (vision + prompt), the rest decode steps."""
    fig, ax = plt.subplots(figsize=(8, 2.4))
    steps = timing["steps_s"]
    ax.bar(range(len(steps)), [s * 1000 for s in steps], color=["#e6550d"] + ["#3182bd"] * (len(steps) - 1))
    ax.set(title=title, xlabel="streamed piece (0 = first token, after the prefill)", ylabel="ms")
    ax.set_yscale("log")
    plt.show()


def check_function(mine, reference, cases: list[tuple]) -> None:
    """A write-a-function exercise's check: `mine(*case)` against the model file's `reference(*case)` for
    every case (a tuple of arguments). While `mine` returns None it says so and stops; at the first case
    where the two differ it raises an AssertionError that names the case and both results."""
    if mine(*cases[0]) is None:
        print(f"not written yet: fill in the function, then run this cell again ({len(cases)} cases wait)")
        return
    for case in cases:
        got, want = mine(*case), reference(*case)
        assert same(got, want), f"for {case}: yours gives {got}, {reference.__qualname__} gives {want}"
    print(
        f"right: yours agrees with {reference.__module__}.{reference.__qualname__} on all {len(cases)} cases"
    )


def same(a, b) -> bool:
    """Equal results: tensors and arrays of one shape within 1e-5, sequences element by element, else ==."""
    if isinstance(a, (torch.Tensor, np.ndarray)) or isinstance(b, (torch.Tensor, np.ndarray)):
        a, b = torch.as_tensor(np.asarray(a) if isinstance(a, np.ndarray) else a), torch.as_tensor(b)
        return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-5)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def draw_anatomy() -> None:
    """The parts every model here shares, as one diagram: the text branch (tokenizer, token embeddings)
    and the vision branch (preprocessing, vision tower, shrink + projector) meet at the scatter;
    then the decoder."""
    left = [
        "prompt text with a placeholder",
        "(1) tokenizer + chat template\ntoken ids, placeholders repeated",
        "token embeddings (B, T, D)",
    ]
    right = [
        "image or video frames",
        "(2) preprocessing\nresize / tile / crop, cut into patches",
        "(3) vision tower (a ViT)\none vector per patch",
        "(4) projector to the width D\n(three of the five also shrink the count)",
    ]
    below = [
        "(5) scatter: vision vectors written over the placeholder rows",
        "(6) decoder: positions (1-D or M-RoPE) + attention mask (causal or prefix-LM)",
        "next-token logits, then (7) generate: prefill, KV cache, one token per step",
    ]
    fig, ax = plt.subplots(figsize=(10, 5.2))
    for x, column, colour in ((0.22, left, "#fdae6b"), (0.72, right, COLORS["image"])):
        for j, text in enumerate(column):
            y = -j - (len(right) - len(column))
            ax.text(
                x,
                y,
                text,
                ha="center",
                va="center",
                bbox=dict(boxstyle="round", fc=colour if j else "#d9d9d9", ec="grey"),
            )
            if j:
                arrow(ax, (x, y + 1), (x, y))
        arrow(ax, (x, -len(right) + 1), (0.5, -len(right)))
    for j, text in enumerate(below):
        y = -len(right) - j
        colour = "#fdae6b" if j == 0 else COLORS["text"]
        ax.text(0.5, y, text, ha="center", va="center", bbox=dict(boxstyle="round", fc=colour, ec="grey"))
        if j:
            arrow(ax, (0.5, y + 1), (0.5, y))
    ax.set(xlim=(0, 1), ylim=(-len(right) - len(below) + 0.4, 0.6), title="the anatomy of the five models")
    ax.axis("off")
    plt.show()


def growing_square_video(
    rng: np.random.Generator, side: int = 56, frames: int = 8, split: str | None = None
) -> tuple[np.ndarray, str, tuple]:
    """A grey video (frames, side, side, 3) uint8 of one square that grows or shrinks steadily about a fixed
    centre: (video, "grow" or "shrink", (colour, cx, cy, start, end)), sizes and centre in pixels. The small
    size lies between side/9 and 3 side/8, the large one at least side/4 above it and at most 3 side/4;
    which of the two comes first is a coin toss. Test videos are those with (cx + cy + start) % 4 == 0:
    split="train" draws only the others, "test" only those, None any; every centre and every start size still
    occurs in training, with other partners."""
    while True:
        small = int(rng.integers(side // 9, side * 3 // 8))
        large = int(rng.integers(small + side // 4, side * 3 // 4 + 1))
        start, end = (small, large) if rng.integers(2) else (large, small)
        cx, cy = (int(v) for v in rng.integers(large // 2, side - (large - large // 2) + 1, size=2))
        colour = list(SQUARE_COLOURS)[int(rng.integers(len(SQUARE_COLOURS)))]
        if split is None or ((cx + cy + start) % 4 == 0) == (split == "test"):
            break
    video = np.full((frames, side, side, 3), 128, np.uint8)
    for t in range(frames):
        s = round(start + (end - start) * t / (frames - 1))
        video[t, cy - s // 2 : cy - s // 2 + s, cx - s // 2 : cx - s // 2 + s] = SQUARE_COLOURS[colour]
    return video, "grow" if end > start else "shrink", (colour, cx, cy, start, end)


def two_square_boxes(side: int = 112, grid: int = 14) -> list[tuple[int, int, int]]:
    """Every (x, y, size) in pixels that two_square_picture may give a square: 2 or 3 grid steps a side, its
    top-left corner on the grid, wholly inside a side x side picture."""
    n = side // grid
    return [
        (grid * i, grid * j, grid * k) for k in (2, 3) for j in range(n - k + 1) for i in range(n - k + 1)
    ]


def two_squares_overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether two squares (x, y, size) share any pixel (touching edges do not count)."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[2] and b[1] < a[1] + a[2]


def two_square_picture(
    rng: np.random.Generator, fixed: dict | None = None, side: int = 112, grid: int = 14
) -> tuple[np.ndarray, dict[str, tuple[int, int, int]]]:
    """A grey (side, side, 3) uint8 picture with a red and a blue square that do not overlap: (picture,
    {"red": (x, y, size), "blue": (x, y, size)}) in pixels. `fixed` = {colour: box} puts that square there
    (a test picture's asked square, at a place reserved_for_test); every other square is drawn at random from
    the places of two_square_boxes that are NOT reserved_for_test and do not overlap a square already placed.
    So without `fixed` (training) no square is ever at a reserved place."""
    boxes = dict(fixed or {})
    free = [b for b in two_square_boxes(side, grid) if not reserved_for_test(b[0], b[1], grid=grid)]
    for colour in ("red", "blue"):
        if colour not in boxes:
            ok = [b for b in free if not any(two_squares_overlap(b, o) for o in boxes.values())]
            boxes[colour] = ok[int(rng.integers(len(ok)))]
    picture = np.full((side, side, 3), 128, np.uint8)
    for colour, (x, y, s) in boxes.items():
        picture[y : y + s, x : x + s] = SQUARE_COLOURS[colour]
    return picture, boxes
