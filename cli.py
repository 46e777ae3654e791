"""The command line the five model files share: what only the program needs, never the model.

- `parser`: the shared flags, with the same names, meanings and help text in every file
- `check`: every value the command line can check before a checkpoint is downloaded or loaded
- `load_media`, `messages`, `visual_tokens`: the media files, the chat turn, the count for the summary
- `say`, `generate_and_report`, `record_shapes`, `explain`: the stderr report (media lines, --explain
  shapes, the JSON summary); only the answer goes to stdout
- `check_output_image`, `draw_boxes`: PaliGemma's --draw-boxes
- `chat` (with `chat_command`, `ask`): --chat, a conversation on a kept cache through a terminal or a script
- `batch` (with `batch_rows`, `answered`, `answer_rows`): --batch-input, one prompt over many images
- `run_main`: one `error: ...` line and exit status 1 for a problem the user can fix, 130 for Ctrl-C
A model file imports this module inside its `main()` only, so `import qwen2_vl` never loads it: the unit a
researcher copies is the model file and common.py. The notebooks use `record_shapes` too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import common
import media
import quant


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors end like every other error: one `error: ...` line, exit status 1."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(1)


def parser(
    presets: dict[str, str],
    default: str,
    description: str,
    example: str,
    frames: str | None,
    system: str | None,
    boxes: str | None = None,
) -> Parser:
    """The options all five files share. `presets`/`default`: the file's PRESETS and DEFAULT; `frames`: how
    this model samples a video file by default ("8", "2 per second"), None for an image-only model; `system`:
    what the default system message is, None when the model has no chat template; `boxes`: the form of the
    boxes in this model's answers, for --draw-boxes (None: no such flag)."""
    ap = Parser(
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--model",
        default=default,
        help=f"Hub repo id (downloaded on first use to the Hugging Face cache, only the files needed), a "
        f"preset ({', '.join(sorted(presets))}) or a local checkpoint directory (default: {default})",
    )
    ap.add_argument(
        "--image", action="append", default=[], help="image file, http(s) URL or data: URI (repeat)"
    )
    if frames is not None:
        ap.add_argument("--video", action="append", default=[], help="video file (repeat for several)")
        ap.add_argument(
            "--num-frames", type=int, help=f"frames sampled uniformly per video (default: {frames})"
        )
        ap.add_argument(
            "--fps", type=float, help="sample this many frames per second instead of --num-frames"
        )
    prompt = ap.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the question or instruction (with --chat: the first one)")
    prompt.add_argument(
        "--prompt-file", metavar="PATH", help="read the prompt from a UTF-8 text file (- for standard input)"
    )
    if system is not None:
        ap.add_argument("--system", help=f"system message (default: {system})")
    ap.add_argument(
        "--chat",
        action="store_true",
        help="a conversation: a question per line, the answers on the cache the earlier turns left "
        + (
            "(PaliGemma: a task prefix per line on the same image, its features kept)"
            if system is None
            else "(/help lists its commands)"
        ),
    )
    ap.add_argument(
        "--batch-input",
        metavar="PATH",
        help="answer --prompt for every image of a folder, or of a file with an image path or URL per line "
        '(or, in a .jsonl file, lines {"image": ..., "prompt": ...}); JSON Lines on stdout',
    )
    ap.add_argument("--batch-size", type=int, help="images per generate call (default: 8)")
    ap.add_argument(
        "--output",
        metavar="FILE",
        help="with --batch-input: append the JSON lines to FILE, skipping the inputs FILE already answers",
    )
    if boxes is not None:
        ap.add_argument(
            "--draw-boxes", metavar="OUT.png", help=f"draw the {boxes} boxes of the answer, save here"
        )
    ap.add_argument("--show-prompt", action="store_true", help="print the full prompt to stderr")
    ap.add_argument("--explain", action="store_true", help="print each stage's tensor shape to stderr")
    g = ap.add_argument_group("generation")
    g.add_argument(
        "--max-new-tokens", type=int, default=256, help="at most this many new tokens (default: 256)"
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, > 0 samples (default: 0)")
    g.add_argument(
        "--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = off (default)"
    )
    g.add_argument(
        "--top-p", type=float, default=1.0, help="sample within this probability mass (default: 1 = off)"
    )
    g.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default: 1)"
    )
    g.add_argument("--seed", type=int, help="random seed for sampling (default: none)")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step with its sampling (CUDA graphs on CUDA): a slow first step",
    )
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on CUDA or with --quantize, else float32",
    )
    g.add_argument(
        "--quantize",
        choices=quant.MODES,
        help="store the decoder's linear layers in 8 or 4 bits as they load: less memory, faster decoding "
        "(the vision tower, projector and embeddings stay in --dtype; default: off)",
    )
    limit = media.DEFAULT_MAX_IMAGE_PIXELS
    g.add_argument(
        "--max-image-pixels", type=int, default=limit, help=f"refuse larger images (default: {limit})"
    )
    return ap


def read_prompt_file(path: str) -> str:
    """The prompt from a UTF-8 file or standard input ("-"), without its final newline: for prompts longer
    than a command line takes (Linux: 128 KiB per argument)."""
    if path != "-" and not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = "standard input" if path == "-" else path
        raise ValueError(f"{where} is not UTF-8 text (byte {e.start}): save the prompt as UTF-8") from e
    return text.removesuffix("\n")


def check(a: argparse.Namespace) -> argparse.Namespace:
    """The parsed flags, after everything the command line can check before downloading or loading a
    checkpoint: sampling ranges and the seed, the prompt (read from --prompt-file; UTF-8), frame counts, the
    image size limit, that local media files exist, the device."""
    try:
        common.GenerationSettings(
            a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.seed
        )
        common.pick_device(a.device)
        if hasattr(a, "num_frames"):
            media.check_frames(a.num_frames, a.fps)
    except ValueError as e:  # the Python API's messages, in the command line's words: flags, not arguments
        name, rest = str(e).split(" ", 1)
        flag = f"--{name.replace('_', '-')}" if hasattr(a, name) else name
        raise ValueError(f"{flag} {rest}".replace("use the CPU", "use --device cpu")) from None
    check_modes(a)
    if a.prompt_file is not None:
        a.prompt = read_prompt_file(a.prompt_file)
    if a.prompt is None and not a.chat and not str(a.batch_input).endswith(".jsonl"):
        raise ValueError("the prompt is missing: pass --prompt TEXT (or --prompt-file PATH, or --chat)")
    for flag in ("prompt", "system"):
        text = getattr(a, flag, None)
        # NOTE: Python keeps command-line bytes that are not UTF-8 as lone surrogates
        if text is not None and any("\ud800" <= c <= "\udfff" for c in text):
            raise ValueError(f"--{flag} is not valid UTF-8 text: write it in UTF-8 (or use --prompt-file)")
    if getattr(a, "draw_boxes", None):
        check_output_image(a.draw_boxes)
        if not a.image:
            raise ValueError("--draw-boxes draws on the first --image: add one")
    if a.max_image_pixels < 1:
        raise ValueError(f"--max-image-pixels must be >= 1, got {a.max_image_pixels}")
    for kind, sources in (("image", a.image), ("video", getattr(a, "video", []))):
        for src in sources:
            if os.path.isdir(src):
                raise ValueError(
                    f"--{kind} {src} is a folder: name a file in it (--batch-input answers a folder)"
                )
            if not str(src).startswith(("http://", "https://", "data:")) and not os.path.isfile(src):
                raise FileNotFoundError(f"{kind} file not found: {src}")
    if hasattr(a, "num_frames"):
        if (a.num_frames or a.fps) and not (a.video or a.chat):  # --chat's /video uses them
            raise ValueError("--num-frames and --fps sample a --video: add --video FILE or leave them out")
    return a


def check_modes(a: argparse.Namespace) -> None:
    """--chat and --batch-input: what goes with them and what does not."""
    if a.chat and a.batch_input:
        raise ValueError("--chat and --batch-input do not go together: use one")
    if a.batch_input and (a.image or getattr(a, "video", [])):
        raise ValueError("--batch-input reads its images from PATH: leave out --image/--video")
    one = [
        f"--{k.replace('_', '-')}"
        for k in ("explain", "show_prompt", "compile", "draw_boxes")
        if getattr(a, k, 0)
    ]
    if (a.chat or a.batch_input) and one:
        raise ValueError(f"{', '.join(one)}: for a single question, not with --chat or --batch-input")
    if a.chat and a.prompt_file == "-":
        raise ValueError("--prompt-file - reads standard input, which --chat reads its questions from")
    if a.batch_input and not os.path.exists(a.batch_input):
        raise FileNotFoundError(f"--batch-input {a.batch_input}: no such folder or file")
    if (a.batch_size is not None or a.output is not None) and not a.batch_input:
        raise ValueError("--batch-size and --output are for --batch-input runs: leave them out")
    a.batch_size = 8 if a.batch_size is None else a.batch_size
    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {a.batch_size}")


def load(load_fn: Callable, presets: dict[str, str], a) -> tuple:
    """A model file's load() on --model, with one stderr line as loading starts (checkpoint, size on disk,
    device, dtype) and the seconds it took in a.load_s for the summary. A Hub download happens first, with
    huggingface_hub's own progress bars."""
    ckpt = common.checkpoint_dir(presets.get(a.model, a.model))
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    size = f"{size / 1e9:.1f} GB" if size > 1e8 else f"{size / 1e6:.1f} MB"
    device = common.pick_device(a.device)
    with warnings.catch_warnings():  # load() says them
        warnings.simplefilter("ignore")
        dtype = str(common.pick_dtype(a.dtype, device, a.quantize)).removeprefix("torch.")
    quantized = f", decoder weights in {a.quantize}" if a.quantize else ""
    say(f"loading {ckpt} ({size} on disk) on {device} as {dtype}{quantized}")
    t0 = time.perf_counter()
    loaded = load_fn(str(ckpt), a.device, a.dtype, a.quantize)
    a.load_s = round(time.perf_counter() - t0, 2)
    return loaded


def load_media(a, processor) -> tuple[list, list[media.Video]]:
    """The --image files as PIL images (under --max-image-pixels) and the --video files as sampled frames
    (the processor's own sampling, with --num-frames / --fps)."""
    images = [media.load_image(src, a.max_image_pixels) for src in a.image]
    videos = [processor.load_video(src, a.num_frames, a.fps) for src in getattr(a, "video", [])]
    for v in videos:  # Qwen2-VL reads frames in pairs; a short video has its own note
        if a.num_frames and len(v.indices) != a.num_frames and v.total_frames >= a.num_frames:
            say(
                f"note: --num-frames {a.num_frames}: this model takes frames in groups, {len(v.indices)} here"
            )
    return images, videos


def messages(a, n_images: int, n_videos: int, text: str | None = None) -> list[dict]:
    """The chat of one command-line question: --system if given, then one user turn with the images, the
    videos and the text (default: --prompt)."""
    items = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
    user = {"role": "user", "content": items + [{"type": "text", "text": a.prompt if text is None else text}]}
    system = getattr(a, "system", None)  # "" is an empty system turn, as the checkpoints' templates render it
    return ([{"role": "system", "content": system}] if system is not None else []) + [user]


def visual_tokens(inputs: dict, processor) -> int:
    """How many of the prompt's tokens are image or video placeholders."""
    ids = inputs["input_ids"]
    return sum(int((ids == getattr(processor, f"{m}_token_id", -1)).sum()) for m in ("image", "video"))


def describe(v: media.Video) -> str:
    """One line about a loaded video, for the media lines."""
    H, W = v.frames.shape[1:3]
    times = ", ".join(f"{t:.2f}" for t in v.timestamps)
    n, total = len(v.indices), v.total_frames
    taken = f"{n} frames repeated from {total}" if n > total else f"{n} of {total} frames"
    return f"{taken} ({times} s), {W}x{H}"


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())  # a message on one line, whatever its newlines


def say(*lines: str) -> None:
    """Notes for the person at the terminal: on stderr, so that stdout holds only the answer."""
    for line in lines:
        print(line, file=sys.stderr)


class Printer:
    """The streamer the command line gives generate(): prints each piece of the answer to stdout as it comes,
    and notes when it came (the first: the time to first token; the next: after the first decode step)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, piece: str) -> None:
        self.times.append(time.perf_counter())
        print(piece, end="", flush=True)


def generate_and_report(model, inputs: dict, a, n_visual: int, stages=()) -> torch.Tensor:
    """Generate with the command line's settings, stream the text to stdout, then print a one-line JSON
    summary to stderr (with --explain, first the shape of every stage in `stages`). The sampling settings are
    the command line's: generation_config.json gives only EOS."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    printer = Printer()
    kw = settings(a) | dict(streamer=printer, compile=a.compile)
    if a.compile:
        say("note: the decode step compiles, with its sampling, during the first step (tens of seconds)")
    t0 = time.perf_counter()
    with record_shapes(model, stages if a.explain else []) as rows:
        tokens = model.generate(**inputs, **kw)
    t1 = time.perf_counter()
    print()
    if a.explain:
        explain(rows, inputs)  # the logits, the last of `stages`, end each step
    n, times = tokens.shape[1], printer.times + [t1]  # a final EOS is not printed: t1 stands for it
    ttft = times[0] - t0
    first = 2 if a.compile else 1  # the steps after the compiled one, with --compile
    rate = round((n - first) / (t1 - times[first - 1]), 2) if n > first and t1 > times[first - 1] else None
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    summary = dict(model=a.model, device=str(device), dtype=dtype)
    summary.update(quantize=a.quantize, load_s=getattr(a, "load_s", None))
    summary.update(prompt_tokens=inputs["input_ids"].shape[1], visual_tokens=n_visual, new_tokens=n)
    stopped = "eos" if n and int(tokens[0, -1]) in model.eos_token_ids else "max_new_tokens"
    summary.update(ttft_s=round(ttft, 3), tokens_per_s=rate, stopped=stopped)
    if a.compile:  # the first decode step compiles
        summary["compile_s"] = round(times[1] - times[0], 2) if n > 1 else 0.0
    print(json.dumps(summary), file=sys.stderr)
    return tokens


@contextmanager
def record_shapes(model: torch.nn.Module, stages: list[tuple[str, str, str]]) -> Iterator[list[dict]]:
    """Records the output shape of every named stage while the block runs. `stages` is a model file's
    STAGES: (submodule path, what it does, its shape in the legend). Yields a list that receives one
    {"stage", "module", "legend", "shape", "inputs"} per call (`inputs`: the shapes of its tensor arguments),
    in call order (a prefill and each decode step all add rows). The hooks are removed when the block ends."""
    rows: list[dict] = []

    def hook(path: str, what: str, legend: str):
        def record(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            ins = [tuple(x.shape) for x in args if torch.is_tensor(x)]
            rows.append(dict(stage=what, module=path, legend=legend, shape=tuple(out.shape), inputs=ins))

        return record

    handles = [model.get_submodule(p).register_forward_hook(hook(p, w, leg)) for p, w, leg in stages]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def explain(rows: list[dict], inputs: dict) -> None:
    """The recorded stages on stderr, in call order: the prefill (up to its logits), then one decode step."""
    say("explain: the path of this input through the model (legend: the model file's docstring)")
    say(*(f"  input    {str(tuple(v.shape)):<18} {k}" for k, v in inputs.items()))
    phase, last = "prefill", rows[-1]["module"] if rows else None  # the logits end every step
    for r in rows:
        into = f"  <- {', '.join(map(str, r['inputs']))}" if r["inputs"] else ""
        say(f"  {phase:<8} {r['legend']:<14} = {str(r['shape']):<18} {r['stage']}{into}")
        if r["module"] == last:
            if phase == "decode":
                break
            phase = "decode"


def check_output_image(path: str) -> None:
    """Before loading: --draw-boxes must name a writable directory and an image format PIL writes."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"--draw-boxes {path}: {folder} is not a directory this program can write to")
    Image.init()
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        raise ValueError(f"--draw-boxes {path}: end the name in an image extension PIL writes, such as .png")


def report_boxes(a, tokens: torch.Tensor, processor, image: Image.Image, parse: Callable) -> None:
    """--draw-boxes: the boxes of the answer `tokens` (read by the model file's `parse_boxes`, in pixels of
    `image`) drawn on a copy of the image, and listed on stderr, one per line."""
    boxes = parse(processor.decode(tokens[0], skip_special_tokens=False), image.width, image.height)
    draw_boxes(image, boxes, a.draw_boxes)
    say(
        f"{len(boxes)} box(es) drawn on {a.draw_boxes}",
        *(
            f"  {label or '(no label)'}: ({x0:.0f}, {y0:.0f}) to ({x1:.0f}, {y1:.0f}) pixels"
            for label, (x0, y0, x1, y1) in boxes
        ),
    )


def draw_boxes(image: Image.Image, boxes, path: str) -> None:
    """(label, (x0, y0, x1, y1)) boxes in pixels drawn in red on a copy of the image, saved to `path`."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    for label, box in boxes:
        draw.rectangle(box, outline=(255, 0, 0), width=max(2, image.width // 200))
        draw.text((box[0] + 3, box[1] + 2), label, fill=(255, 0, 0))
    image.save(path)


# ----------------------------------------------------------------------------------------------------------
# --chat: one load, a conversation

CHAT_HELP = """a question per line; commands:
  /image PATH   add an image (file, URL or data: URI) to the next question
  /video PATH   add a video to the next question
  /reset        forget the conversation (the cache is reused)
  /help         this text
  /quit         end (or Ctrl-D); Ctrl-C stops an answer and keeps the conversation"""


def settings(a) -> dict:
    """The command line's sampling settings, as generate() and Chat.ask take them."""
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    return kw | dict(repetition_penalty=a.repetition_penalty, seed=a.seed)


def chat(a, conversation, processor) -> None:
    """--chat. On a terminal: a "> " marker on stderr, the answer streamed to stdout, then the next question.
    Otherwise (a script writing to stdin): one question per line, each answer on stdout and one empty line
    after it (an empty answer for a question that failed). --image/--video/--prompt make the first turn. A
    bad file or question is one `error:` line and the conversation goes on; exit status 1 if any failed."""
    tty, failed = sys.stdin.isatty(), 0
    images, videos = load_media(a, processor)
    new = {"images": images, "videos": [v.frames for v in videos]}  # for the next question
    lines = iter([a.prompt] if a.prompt is not None else [])
    if tty:
        say("chat: " + CHAT_HELP)
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = next(lines, None)
            line = (input() if line is None else line).strip()
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: a fresh line, not the end
            say("", "(Ctrl-D or /quit ends the chat)")
            continue
        try:
            if line.startswith("/"):
                if chat_command(line, a, conversation, processor, new) == "quit":
                    break
            elif line:
                ask(conversation, line, new, a, tty)
                new = {"images": [], "videos": []}
        except (ValueError, OSError, torch.OutOfMemoryError) as e:
            print("error: " + one_line(e), file=sys.stderr)
            if line and not line.startswith("/"):
                failed += 1
                if not tty:  # an empty answer: a script's answers stay one block per question
                    print("\n", flush=True)
    if failed:
        sys.exit(1)


def chat_command(line: str, a, conversation, processor, new: dict) -> str | None:
    command, _, arg = line.partition(" ")
    video = command == "/video" and hasattr(a, "num_frames")  # not PaliGemma's
    if command in ("/image", "/video") and not arg.strip():
        raise ValueError(f"{command} needs a path: {command} PATH")
    if command == "/image":
        new["images"].append(media.load_image(arg.strip(), a.max_image_pixels))
        say(f"image added to the next question ({len(new['images'])} so far)")
    elif video:
        new["videos"].append(processor.load_video(arg.strip(), a.num_frames, a.fps).frames)
        say(f"video added to the next question ({len(new['videos'])} so far)")
    elif command == "/reset":
        conversation.reset()
        new["images"], new["videos"] = [], []
        say("the conversation is forgotten")
    elif command == "/help":
        say(CHAT_HELP)
    elif command in ("/quit", "/exit"):
        return "quit"
    else:
        raise ValueError(f"unknown command {command}: /help lists them")
    return None


def ask(conversation, question: str, new: dict, a, tty: bool) -> None:
    """One turn: the answer streamed to stdout, a line on stderr on what was prefilled and how fast."""
    printer, past = Printer(), getattr(conversation, "past", None)
    kept = 0 if past is None else past.length
    before = conversation.input_ids.shape[1]
    t0 = time.perf_counter()
    try:
        conversation.ask(question, **new, **settings(a), streamer=printer)
    except KeyboardInterrupt:
        print("" if tty else "\n", flush=True)
        say("(stopped: the question and its answer are left out of the conversation)")
        return
    t1 = time.perf_counter()
    print("\n" if not tty else "", flush=True)  # a script reads an empty line after each answer
    n = len(printer.times)
    new_tokens = conversation.input_ids.shape[1] - (0 if past is None else before)  # PaliGemma: all new
    ttft = (printer.times[0] if n else t1) - t0
    rate = f", {(n - 1) / (t1 - t0 - ttft):.1f} tokens/s" if n > 1 else ""
    say(f"[{new_tokens} tokens read or written, {kept} kept in the cache; first token {ttft:.2f} s{rate}]")


# ----------------------------------------------------------------------------------------------------------
# --batch-input: one prompt over a folder of images


def batch_rows(path: str, prompt: str | None) -> list[dict]:
    """The inputs of --batch-input, in order: {"image": ..., "prompt": ...} each."""
    p = Path(path)
    if p.is_dir():
        Image.init()
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in Image.registered_extensions())
        rows = [{"image": str(f)} for f in files]
    elif not p.is_file():
        raise FileNotFoundError(f"--batch-input {path}: no such folder or file")
    elif p.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(p.read_text("utf-8").splitlines()):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {i + 1} is not JSON ({e})") from e
                if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                    raise ValueError(f'{path} line {i + 1}: write {{"image": PATH, "prompt": TEXT}}')
                rows.append(row)
    else:
        rows = [{"image": x.strip()} for x in p.read_text("utf-8").splitlines() if x.strip()]
    for row in rows:
        row["prompt"] = row.get("prompt", prompt)
        if not isinstance(row["prompt"], str):
            raise ValueError(f'no prompt for {row["image"]}: pass --prompt (or a "prompt" in each line)')
    if not rows:
        raise ValueError(f"--batch-input {path}: no images found")
    return rows


def answered(path: str | None) -> set:
    """(image, prompt) of the lines of --output FILE that have an answer: a rerun skips them. A line cut
    short by an interrupted run is left out (and the file gets the newline it lacks)."""
    if path is None or not os.path.isfile(path):
        return set()
    text, done = Path(path).read_text("utf-8"), set()
    for line in text.splitlines():
        try:
            row = json.loads(line)
            done |= {(row["image"], row["prompt"])} if "answer" in row else set()
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    if text and not text.endswith("\n"):
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n")
    return done


def batch(a, model, processor, prompt_of: Callable[[str], str]) -> None:
    """--batch-input: `prompt_of(text)` is the model's prompt for one image. Rows of --batch-size images
    go through one generate() each; a file that cannot be read gets an "error" in its line, and the rest
    go on. Exit status 1 when any input failed."""
    from tqdm import tqdm  # installed with huggingface_hub

    rows, done = batch_rows(a.batch_input, a.prompt), answered(a.output)
    todo = [r for r in rows if (r["image"], r["prompt"]) not in done]
    out = open(a.output, "a", encoding="utf-8") if a.output else sys.stdout
    bar = tqdm(total=len(todo), unit="image", file=sys.stderr, disable=not sys.stderr.isatty())
    t0, failed = time.perf_counter(), 0
    try:
        for i in range(0, len(todo), a.batch_size):
            group = todo[i : i + a.batch_size]
            for row, result in zip(group, answer_rows(group, a, model, processor, prompt_of), strict=True):
                failed += "error" in result
                print(json.dumps(row | result, ensure_ascii=False), file=out, flush=True)
            bar.update(len(group))
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    seconds = time.perf_counter() - t0
    summary = dict(inputs=len(rows), skipped=len(rows) - len(todo), answered=len(todo) - failed)
    summary.update(failed=failed, seconds=round(seconds, 2))
    summary.update(images_per_s=round(len(todo) / seconds, 3) if todo else None)
    print(json.dumps(summary), file=sys.stderr)
    if failed:
        sys.exit(1)


def answer_rows(group: list[dict], a, model, processor, prompt_of) -> list[dict]:
    """{"answer": ...} or {"error": ...} per row: the readable images in one generate() call. When the
    processor or the model refuses the group (PerceptionLM batches only images of one tile count; one
    prompt may be too long), its rows are answered one by one, so an error stays with its own row."""
    results = []
    for row in group:
        try:
            results.append(media.load_image(row["image"], a.max_image_pixels))
        except (ValueError, OSError) as e:
            results.append({"error": one_line(e)})
            print(f"warning: {results[-1]['error']}", file=sys.stderr)  # it names the file
    good = [i for i, r in enumerate(results) if not isinstance(r, dict)]
    try:
        if good:
            texts = [prompt_of(group[i]["prompt"]) for i in good]
            inputs = processor(text=texts, images=[results[i] for i in good])
            device = next(model.parameters()).device
            tokens = model.generate(**{k: v.to(device) for k, v in inputs.items()}, **settings(a))
            for i, text in zip(good, processor.batch_decode(tokens), strict=True):
                results[i] = {"answer": text}
    except ValueError as e:
        if len(good) > 1:
            for i in good:
                results[i] = answer_rows([group[i]], a, model, processor, prompt_of)[0]
        else:
            results[good[0]] = {"error": one_line(e)}
            print(f"warning: {group[good[0]]['image']}: {results[good[0]]['error']}", file=sys.stderr)
    return results


def run_main(main: Callable[[], None]) -> None:
    """Runs a CLI's main(). A problem the user can cause (ValueError, OSError, out of memory) ends with one
    `error: ...` line (exit status 1), Ctrl-C with one line (exit status 130); warnings are one `warning: ...`
    line each. Anything else is a bug: one line saying so, then its traceback."""
    try:
        with warnings.catch_warnings():  # each warning one line on stderr, every time it is raised
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *args, **kwargs: print(
                f"warning: {message}", file=sys.stderr
            )
            main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout stopped reading (| head): not an error of this program
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        sys.exit(0)
    except (ValueError, OSError, torch.OutOfMemoryError) as e:  # OSError includes FileNotFoundError
        print("error: " + one_line(e), file=sys.stderr)
        sys.exit(1)
    except Exception:
        bug = "error: an internal error, a bug to report (with the command line and the traceback below)"
        print(bug, file=sys.stderr)
        raise
