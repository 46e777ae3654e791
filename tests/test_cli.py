"""The five command lines: one set of shared flags, and every bad input ends in one `error:` line.

The bad-input matrix runs each file's `main` in this process through `cli.run_main`, exactly as the
`if __name__ == "__main__"` line does, so it is fast; a few tests run the real scripts."""

import importlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import tiny
import torch
from conftest import ROOT
from PIL import Image

import cli

sys.path.insert(0, str(ROOT / "examples"))
import make_video  # noqa: E402

FILES = ["qwen2_vl", "paligemma", "llava_onevision", "video_llava", "perception_lm"]
VIDEO_FILES = [f for f in FILES if f != "paligemma"]
PROMPT = {"paligemma": "caption en"}  # the others take any prompt


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """file -> its tiny checkpoint directory (published layout)."""
    root = tmp_path_factory.mktemp("cli")
    return {f: getattr(tiny, f"build_{f}")(root)["hub"] for f in FILES}


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.fromarray(tiny.synthetic_image(60, 80)).save(d / "photo.png")
    make_video.write_video(d / "clip.mp4", tiny.synthetic_video(6, 64, 64))
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png" * 10)
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 10)
    return d


def run(capsys, file, args):
    """(exit status, stdout, stderr) of `python FILE.py ARGS`, run in this process."""
    m = importlib.import_module(file)
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: m.main([str(a) for a in args]))
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def base(file, ckpt, media, image=True):
    args = ["--model", ckpt[file], "--prompt", PROMPT.get(file, "Describe it."), "--device", "cpu"]
    return args + (["--image", media / "photo.png"] if image else [])


def assert_one_error_line(code, out, err, *needles):
    assert code == 1, err
    assert out == "", "stdout holds only the answer"
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for n in needles:
        assert n in last, last


BAD_EVERYWHERE = {
    "missing image": (["--image", "nope.png"], "image file not found: nope.png"),
    "negative temperature": (["--temperature", "-1"], "--temperature must be >= 0"),
    "top-p 0": (["--top-p", "0"], "--top-p must be in (0, 1]"),
    "top-p above 1": (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    "negative top-k": (["--top-k", "-2"], "--top-k must be >= 0"),
    "repetition penalty 0": (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    "max-new-tokens 0": (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    "max-new-tokens -5": (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1"),
    "infinite temperature": (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    "image folder": (["--image", ROOT / "examples"], "is a folder: name a file in it"),
    "device tpu": (["--device", "tpu"], "unknown device 'tpu'"),
    "max-image-pixels 0": (["--max-image-pixels", "0"], "--max-image-pixels must be >= 1"),
    "unknown flag": (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    "bad number": (["--top-k", "two"], "invalid int value: 'two'"),
    "quantize int3": (["--quantize", "int3"], "invalid choice: 'int3' (choose from 'int8', 'int4')"),
}
if not torch.cuda.is_available():
    BAD_EVERYWHERE["cuda without a GPU"] = (["--device", "cuda"], "torch sees no CUDA GPU; use --device cpu")


@pytest.mark.parametrize("case", BAD_EVERYWHERE, ids=str)
@pytest.mark.parametrize("file", FILES)
def test_bad_flag_values_stop_before_loading(file, case, ckpt, media, capsys, monkeypatch):
    extra, needle = BAD_EVERYWHERE[case]
    assert_one_error_line(
        *run_without_loading(capsys, monkeypatch, file, base(file, ckpt, media) + extra), needle
    )


def run_without_loading(capsys, monkeypatch, file, args):
    """`run`, with the file's `load` made to fail the test: what it reports is found before loading."""
    m = importlib.import_module(file)
    monkeypatch.setattr(m, "load", lambda *a, **k: pytest.fail("loaded a checkpoint before checking"))
    return run(capsys, file, args)


BAD_FRAMES = {
    "num-frames 0": (["--num-frames", "0"], "a whole number >= 1, got 0"),
    "num-frames -3": (["--num-frames", "-3"], "a whole number >= 1, got -3"),
    "fps 0": (["--fps", "0"], "--fps must be a finite number > 0"),
    "both": (["--num-frames", "4", "--fps", "2"], "give --num-frames or --fps, not both"),
    "missing video": (["--video", "nope.mp4"], "video file not found: nope.mp4"),
    "frames without a video": (["--num-frames", "4"], "--num-frames and --fps sample a --video"),
}


@pytest.mark.parametrize("case", BAD_FRAMES, ids=str)
@pytest.mark.parametrize("file", VIDEO_FILES)
def test_bad_video_settings_stop_before_loading(file, case, ckpt, media, capsys):
    extra, needle = BAD_FRAMES[case]
    video = [] if case in ("missing video", "frames without a video") else ["--video", media / "clip.mp4"]
    code, out, err = run(capsys, file, base(file, ckpt, media, image=False) + video + extra)
    assert_one_error_line(code, out, err, needle)


def broken_checkpoint(src, dst):
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # a download cut short
    return dst


@pytest.mark.parametrize("file", FILES)
def test_bad_files_after_loading(file, ckpt, media, capsys, tmp_path):
    args = base(file, ckpt, media, image=False)
    cases = [
        (["--image", media / "corrupt.png"], "is not a readable image"),
        (["--image", media / "photo.png", "--max-image-pixels", "100"], "more than the limit of 100"),
        (["--image", media / "photo.png", "--max-new-tokens", "100000"], "max_position_embeddings"),
        (["--image", media / "photo.png", "--model", tmp_path / "none"], "no such checkpoint directory"),
        (
            ["--image", media / "photo.png", "--model", broken_checkpoint(ckpt[file], tmp_path / "cut")],
            "safetensors",
        ),
    ]
    other = FILES[(FILES.index(file) + 1) % len(FILES)]
    cases.append((["--image", media / "photo.png", "--model", ckpt[other]], f"use {other}.py"))
    if file in VIDEO_FILES:
        cases.append((["--video", media / "corrupt.mp4"], "is not a readable video"))
    for extra, needle in cases:
        assert_one_error_line(*run(capsys, file, args + extra), needle)


def test_model_specific_values(ckpt, media, capsys):
    cases = [
        ("perception_lm", ["--max-num-tiles", "0"], "--max-num-tiles must be >= 1"),
        ("perception_lm", ["--max-num-tiles", "100000"], "more than the model's context of"),
        ("qwen2_vl", ["--min-pixels", "10"], "need 784 <= min <= max"),
        ("qwen2_vl", ["--min-pixels", "5000", "--max-pixels", "4000"], "need 784 <= min <= max"),
        ("paligemma", ["--system", "be brief"], "unrecognized arguments: --system"),
    ]
    for file, extra, needle in cases:
        assert_one_error_line(*run(capsys, file, base(file, ckpt, media) + extra), needle)
    code, out, err = run(capsys, "paligemma", base("paligemma", ckpt, media, image=False))
    assert_one_error_line(code, out, err, "PaliGemma needs an image")


@pytest.mark.parametrize("file", FILES)
def test_ctrl_c_is_one_line_and_status_130(file, ckpt, media, capsys, monkeypatch):
    m = importlib.import_module(file)
    cls = type(m.load(ckpt[file], device="cpu")[0])

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cls, "generate", interrupted)
    code, out, err = run(capsys, file, base(file, ckpt, media))
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err


@pytest.mark.parametrize("file", FILES)
def test_answer_on_stdout_notes_and_valid_json_on_stderr(file, ckpt, media, capsys):
    video = ["--video", media / "clip.mp4", "--num-frames", "8"] if file in VIDEO_FILES else []
    args = base(file, ckpt, media) + video + ["--max-new-tokens", "1", "--dtype", "float16"]
    code, out, err = run(capsys, file, args)
    assert code == 0, err
    lines = err.strip().splitlines()
    summary = json.loads(lines[-1])  # one token: no rate, and still valid JSON
    assert summary["new_tokens"] == 1 and summary["tokens_per_s"] is None and summary["dtype"] == "float16"
    assert summary["stopped"] in ("eos", "max_new_tokens")
    assert any(line.startswith("warning: float16") for line in lines)
    assert lines[0].startswith(f"loading {ckpt[file]} (") and lines[0].endswith(
        " MB on disk) on cpu as float16"
    )
    assert summary["load_s"] > 0
    assert any(line.startswith("image 1: 80x60 -> ") and line.endswith(" tokens") for line in lines)
    if video:  # Video-LLaVA repeats frames of a short video up to the count; the others take what there is
        taken = "8 frames repeated from 6" if file == "video_llava" else "6 of 6 frames"
        assert any(line.startswith(f"video 1: {taken} (") for line in lines), lines
    assert out.endswith("\n") and not any(w in out for w in ("warning", "note:", "image 1", '{"model"'))


@pytest.mark.parametrize("file", VIDEO_FILES)
def test_short_video_notice(file, ckpt, media, capsys):
    args = base(file, ckpt, media, image=False) + ["--video", media / "clip.mp4", "--num-frames", "12"]
    code, out, err = run(capsys, file, args + ["--max-new-tokens", "2"])
    assert code == 0, err
    how = "repeating them to make" if file == "video_llava" else "using them instead of"
    assert f"note: the video has 6 frames; {how} 12\n" in err


def test_qwen2_vl_says_how_it_rounds_an_odd_frame_count(ckpt, media, capsys):
    args = base("qwen2_vl", ckpt, media, image=False) + ["--video", media / "clip.mp4", "--num-frames", "5"]
    code, out, err = run(capsys, "qwen2_vl", args + ["--max-new-tokens", "1"])
    assert code == 0 and "note: --num-frames 5: this model takes frames in groups, 4 here\n" in err, err


def help_of(file):
    run = subprocess.run([sys.executable, str(ROOT / f"{file}.py"), "--help"], capture_output=True, text=True)
    assert run.returncode == 0
    return run.stdout


def flag_lines(text):
    """flag -> its help text, from argparse's --help (defaults and checkpoints differ per file: cut)."""
    out, flag = {}, None
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("--"):
            flag = parts[0].rstrip(",")
            out[flag] = " ".join(parts[1:])
        elif flag and line.startswith(" " * 10):
            out[flag] += " " + " ".join(parts)
        else:
            flag = None
    return out


def test_help_agrees_on_the_shared_flags():
    helps = {f: help_of(f) for f in FILES}
    flags = {f: flag_lines(h) for f, h in helps.items()}
    shared = [
        "--image",
        "--prompt",
        "--show-prompt",
        "--explain",
        "--max-new-tokens",
        "--temperature",
        "--top-k",
    ]
    shared += [
        "--top-p",
        "--repetition-penalty",
        "--seed",
        "--device",
        "--dtype",
        "--max-image-pixels",
        "--compile",
    ]
    for flag in shared:
        assert len({flags[f][flag] for f in FILES}) == 1, flag
    for flag in ("--video", "--fps"):
        assert len({flags[f][flag] for f in VIDEO_FILES}) == 1 and flag not in flags["paligemma"]
    assert "--system" in flags["qwen2_vl"] and "--system" not in flags["paligemma"]
    for f, h in helps.items():
        m = importlib.import_module(f)
        assert m.DEFAULT in h and "downloaded on first use" in h and f"example:\n  python {f}.py" in h


def test_explain_one_image_and_one_video(ckpt, media, capsys):
    args = base("qwen2_vl", ckpt, media) + [
        "--video",
        media / "clip.mp4",
        "--max-new-tokens",
        "3",
        "--explain",
    ]
    code, out, err = run(capsys, "qwen2_vl", args)
    assert code == 0, err
    lines = err.splitlines()
    start = lines.index(
        "explain: the path of this input through the model (legend: the model file's docstring)"
    )

    def rows(phase, stage):
        return [line.split() for line in lines[start:] if line.startswith(f"  {phase} ") and stage in line]

    assert rows("input", "pixel_values") and rows("input", "pixel_values_videos")
    merges = rows("prefill", "2x2 merge + MLP")
    assert len(merges) == 2, "the image, then the video, through the tower"
    image_tokens = int(next(line for line in lines if line.startswith("image 1:")).split()[-2])
    assert merges[0][1:5] == ["(N/4,", "D)", "=", f"({image_tokens},"]
    (decoder,) = rows("decode", "decoder stack <- embeddings, M-RoPE positions")
    assert "<- (1, 1, 64), (3, 1, 1), (1, 1, 1, " in " ".join(decoder), "one token, its 3 positions, the mask"
    assert rows("decode", "logits") and not rows("decode", "patch embedding"), "decoding skips the tower"
    assert "explain" not in out


def test_sampling_ranges_in_the_python_api(ckpt):
    import qwen2_vl

    model, proc = qwen2_vl.load(ckpt["qwen2_vl"], device="cpu")
    inputs = proc(text="hello")
    T = inputs["input_ids"].shape[1]
    for kw, needle in (
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=float("nan")), "top_p must be a finite number"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(top_k=2.5), "top_k must be an integer, got 2.5"),
        (dict(repetition_penalty=-1.0), "repetition_penalty must be > 0"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=10**6), "max_position_embeddings (4096)"),
        (dict(max_new_tokens="3"), "max_new_tokens must be an integer, got '3'"),
        (dict(max_new_tokens=3.0), "max_new_tokens must be an integer, got 3.0"),
        (dict(temperature=None), "temperature must be a number, got None"),
        (dict(top_k=True), "top_k must be an integer, got True"),
        (dict(input_ids=inputs["input_ids"][0]), f"input_ids must be (B, T), got ({T},)"),
        (dict(attention_mask=inputs["attention_mask"][:, 1:]), f"attention_mask (1, {T - 1}) does not match"),
    ):
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            model.generate(**{**inputs, **kw})
    first = int(model.generate(**inputs, max_new_tokens=1, eos_token_ids=[])[0, 0])
    assert model.generate(**inputs, max_new_tokens=4, eos_token_ids=first).tolist() == [[first]]  # one id
    for bad in (dict(num_frames=0), dict(fps=0.0), dict(num_frames=4, fps=2.0)):
        with pytest.raises(ValueError, match="frames|fps"):
            proc.load_video("x.mp4", **bad)


def test_preprocessing_ranges_in_the_python_api():
    import perception_lm
    import qwen2_vl

    with pytest.raises(ValueError, match="need 784 <= min <= max"):
        qwen2_vl.VisionInputConfig(min_pixels=100, max_pixels=10**6)
    with pytest.raises(ValueError, match="need 784 <= min <= max"):
        qwen2_vl.VisionInputConfig(min_pixels=5000, max_pixels=4000)
    with pytest.raises(ValueError, match="max_num_tiles must be >= 1"):
        perception_lm.VisionInputConfig(max_num_tiles=0)


def test_no_function_changes_module_state():
    """Settings travel as arguments and results as return values: no `global` statement anywhere."""
    for name in [*FILES, "common", "quant", "media", "cli", "bench"]:
        source = (ROOT / f"{name}.py").read_text()
        assert not [line for line in source.splitlines() if line.strip().startswith("global ")], name


# ----------------------------------------------------------------------------------------------------------
# Hostile checkpoints, prompts and flags: one `error:` line each, and valid odd inputs accepted


def copy_with(src, dst, change):
    """A copy of a checkpoint directory with `change(dst)` applied."""
    shutil.copytree(src, dst)
    change(dst)
    return dst


def wrong_shard(d):
    """The index names the other shard for one tensor."""
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    others = sorted({f for f in index["weight_map"].values() if f != shard})
    index["weight_map"][name] = others[0]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def rewrite_tensor(d, change):
    from safetensors.torch import load_file, save_file

    shard = sorted(d.glob("*.safetensors"))[0]
    state = load_file(shard)
    name = next(k for k in sorted(state) if "layers.0" in k and "proj.weight" in k)
    state[name] = change(state[name])
    save_file(state, shard, metadata={"format": "pt"})


def write(name, text):
    return lambda d: (d / name).write_text(text)


BROKEN_FILES = {
    "config.json not JSON": (write("config.json", "{ not json"), "config.json is not valid JSON"),
    "config.json a list": (write("config.json", "[1, 2]"), "config.json holds a JSON list, not an object"),
    "generation_config.json": (write("generation_config.json", "{"), "generation_config.json is not valid"),
    "preprocessor_config.json": (
        write("preprocessor_config.json", "<html>"),
        "preprocessor_config.json is not",
    ),
    "tokenizer.json": (write("tokenizer.json", '{"model": '), "tokenizer.json is not a readable tokenizer"),
    "index not JSON": (
        write("model.safetensors.index.json", "{"),
        "model.safetensors.index.json is not valid",
    ),
    "index without weight_map": (write("model.safetensors.index.json", "{}"), "has no weight_map"),
    "tensor in the wrong shard": (wrong_shard, "cannot be read from"),
    "shard missing": (
        lambda d: sorted(d.glob("*.safetensors"))[-1].unlink(),
        "-of-00002.safetensors, not in",
    ),
    "int8 weights": (
        lambda d: rewrite_tensor(d, lambda t: t.to(torch.int8)),
        "is int8, where the model takes float",
    ),
    "NaN weights": (
        lambda d: rewrite_tensor(d, lambda t: torch.full_like(t, float("nan"))),
        "NaN/inf logits in float32: the checkpoint's weights hold NaN/inf",
    ),
}


def edit_config(change):
    """config.json with `change(config, text_config)` applied (text_config: the nested one, or the root)."""

    def edit(d):
        config = json.loads((d / "config.json").read_text())
        change(config, config.get("text_config", config))
        (d / "config.json").write_text(json.dumps(config))

    return edit


BAD_CONFIGS = {  # the same fields in all five files; what the error names
    "layers as a string": (lambda c, t: t.update(num_hidden_layers="2"), "num_hidden_layers"),
    "layers 2.5": (lambda c, t: t.update(num_hidden_layers=2.5), "num_hidden_layers"),
    "heads 0": (lambda c, t: t.update(num_attention_heads=0), "num_attention_heads"),
    "heads not dividing": (lambda c, t: t.update(num_attention_heads=3), "num_attention_heads"),
    "max positions a string": (
        lambda c, t: t.update(max_position_embeddings="4096"),
        "max_position_embeddings = '4096', expected a whole number >= 1",
    ),
    "eps negative": (
        lambda c, t: t.update(rms_norm_eps=-1e-6),
        "rms_norm_eps = -1e-06, expected a finite number > 0",
    ),
    "vision config a list": (lambda c, t: c.update(vision_config=[1, 2]), "config.json"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=str)
@pytest.mark.parametrize("file", FILES)
def test_bad_config_values(file, case, ckpt, media, capsys, tmp_path):
    change, needle = BAD_CONFIGS[case]
    if (file, case) == ("paligemma", "heads not dividing"):  # its head_dim is given: a config of other shapes
        needle = "do not fit the model built from its config.json"
    broken = copy_with(ckpt[file], tmp_path / "broken", edit_config(change))
    code, out, err = run(capsys, file, base(file, ckpt, media) + ["--model", broken])
    assert_one_error_line(code, out, err, "config.json", needle)


def test_model_specific_config_values(ckpt, media, capsys, tmp_path):
    cases = [
        ("qwen2_vl", lambda c, t: c.pop("vision_config"), "the field 'vision_config' is missing"),
        (
            "qwen2_vl",
            lambda c, t: c.update(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 1]}),
            "mrope",
        ),
        ("llava_onevision", lambda c, t: c.update(image_token_index=-3), "image_token_id = -3"),
        ("paligemma", lambda c, t: c.update(projection_dim=100), "projector must output D"),
        ("qwen2_vl", lambda c, t: c["vision_config"].update(hidden_size=32), "the merger must output"),
    ]
    for i, (file, change, needle) in enumerate(cases):
        broken = copy_with(ckpt[file], tmp_path / f"broken{i}", edit_config(change))
        code, out, err = run(capsys, file, base(file, ckpt, media) + ["--model", broken])
        assert_one_error_line(code, out, err, "config.json", needle)


@pytest.mark.parametrize("case", BROKEN_FILES, ids=str)
@pytest.mark.parametrize("file", FILES)
def test_broken_checkpoint_files(file, case, ckpt, media, capsys, tmp_path):
    change, needle = BROKEN_FILES[case]
    broken = copy_with(ckpt[file], tmp_path / "broken", change)
    args = base(file, ckpt, media) + ["--model", broken, "--max-new-tokens", "2"]
    assert_one_error_line(*run(capsys, file, args), needle)


BAD_PROMPTS = {  # extra flags -> what the error says; all found before a checkpoint is loaded
    "prompt not UTF-8": (["--prompt", "caption en \udcff"], "--prompt is not valid UTF-8 text"),
    "missing prompt file": (["--prompt-file", "nope.txt"], "prompt file not found: nope.txt"),
    "prompt and prompt file": (["--prompt-file", "x.txt"], "not allowed with argument --prompt"),
    "seed 2**70": (["--seed", str(2**70)], "seed must be a whole number in [0, 2**63)"),
    "seed -1": (["--seed", "-1"], "seed must be a whole number in [0, 2**63)"),
}


@pytest.mark.parametrize("case", BAD_PROMPTS, ids=str)
@pytest.mark.parametrize("file", FILES)
def test_bad_prompts_and_seeds_stop_before_loading(file, case, ckpt, media, capsys, monkeypatch):
    extra, needle = BAD_PROMPTS[case]
    args = base(file, ckpt, media)
    if extra[0].startswith("--prompt") and case != "prompt and prompt file":
        args = args[:2] + args[4:]  # without --prompt
    assert_one_error_line(*run_without_loading(capsys, monkeypatch, file, args + extra), needle)


@pytest.mark.parametrize("file", FILES)
def test_prompt_file_gives_the_prompts_answer(file, ckpt, media, capsys, tmp_path, monkeypatch):
    prompt = PROMPT.get(file, "Describe it.")
    (tmp_path / "p.txt").write_text(prompt + "\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    args = base(file, ckpt, media) + ["--max-new-tokens", "4"]
    code, want, err = run(capsys, file, args)
    assert code == 0, err
    without = args[:2] + args[4:]
    code, got, err = run(capsys, file, without + ["--prompt-file", tmp_path / "p.txt"])
    assert code == 0 and got == want, err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(prompt.encode())))
    code, got, err = run(capsys, file, without + ["--prompt-file", "-"])
    assert code == 0 and got == want, err
    code, out, err = run(capsys, file, without + ["--prompt-file", tmp_path / "latin1.txt"])
    assert_one_error_line(code, out, err, "latin1.txt is not UTF-8 text (byte 3)")


def test_other_bad_inputs(ckpt, media, capsys, tmp_path, monkeypatch):
    bad_uri = "data:image/png;base64,%%%not-base64%%%"
    code, out, err = run(capsys, "qwen2_vl", base("qwen2_vl", ckpt, media) + ["--image", bad_uri])
    assert_one_error_line(code, out, err, "the data URI's base64 payload does not decode")
    cases = [  # found before loading
        (tmp_path / "no" / "such" / "dir.png", "is not a directory this program can write to"),
        (tmp_path / "boxes.txt", "end the name in an image extension"),
    ]
    for path, needle in cases:
        args = base("paligemma", ckpt, media) + ["--draw-boxes", path]
        assert_one_error_line(*run_without_loading(capsys, monkeypatch, "paligemma", args), needle)
    args = base("qwen2_vl", ckpt, media, image=False) + ["--draw-boxes", tmp_path / "b.png"]
    needle = "--draw-boxes draws on the first --image: add one"
    assert_one_error_line(*run_without_loading(capsys, monkeypatch, "qwen2_vl", args), needle)
    args = base("llava_onevision", ckpt, media) + ["--draw-boxes", tmp_path / "b.png"]
    assert_one_error_line(*run(capsys, "llava_onevision", args), "unrecognized arguments: --draw-boxes")


def test_an_internal_error_is_called_a_bug(capsys):
    def broken():
        raise TypeError("an unexpected internal problem")

    with pytest.raises(TypeError):
        cli.run_main(broken)
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: an internal error, a bug to report")


@pytest.mark.parametrize("file", FILES)
def test_empty_prompts_in_the_python_api(file, ckpt):
    """No prompt at all is one ValueError. An empty prompt gets the tokens transformers' processor gives it:
    <bos> where the tokenizer adds one (Video-LLaVA; PaliGemma writes "<bos>" and "\n" around it), and the
    model continues that; none in the three others, which is one ValueError that says so."""
    m = importlib.import_module(file)
    model, proc = m.load(ckpt[file], device="cpu")
    with pytest.raises(ValueError, match="no prompts"):
        proc(text=[], images=[])
    if file == "paligemma":
        with pytest.warns(UserWarning, match="no task prefix"):
            inputs = proc(text="", images=[tiny.synthetic_image(60, 80)])
    elif file == "video_llava":
        inputs = proc(text="")
        assert inputs["input_ids"].tolist() == [[proc.bos_token_id]]
    else:
        with pytest.raises(ValueError, match="prompt 0 is empty"):
            proc(text="")
        inputs = None
    if inputs is not None:
        assert model.generate(**inputs, max_new_tokens=2).shape == (1, 2)
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids has no tokens"):
        model.generate(input_ids=empty, attention_mask=empty)


def test_paligemma_raw_prompt_with_its_own_image_token(ckpt, media, capsys):
    """PaliGemma's own prompt format, "<image>" in the text: from the command line, and through the API with a
    flat or a nested image list, the same tensors as transformers' processor."""
    from transformers import AutoProcessor

    import paligemma

    args = base("paligemma", ckpt, media) + ["--max-new-tokens", "2"]
    args[args.index("caption en")] = "<image>caption en"
    code, out, err = run(capsys, "paligemma", args)
    assert code == 0 and out.strip(), err
    _, proc = paligemma.load(ckpt["paligemma"], device="cpu")
    image = tiny.synthetic_image(60, 80)
    flat = proc(text="<image>caption en", images=[image])
    nested = proc(text="<image>caption en", images=[[image]])
    theirs = tiny.reference_inputs(
        AutoProcessor.from_pretrained(ckpt["paligemma"]), text=["<image>caption en"], images=[image]
    )
    for k in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(flat[k], nested[k]) and torch.equal(flat[k], theirs[k]), k


def test_record_shapes_hooks_named_stages_and_removes_them():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    stages = [("0", "first linear", "(B, 8)"), ("2", "second linear", "(B, 3)")]
    with cli.record_shapes(model, stages) as rows:
        model(torch.zeros(5, 4))
        model(torch.zeros(1, 4))  # a second call (a decode step) adds rows
    got = [(r["module"], r["shape"]) for r in rows]
    assert got == [("0", (5, 8)), ("2", (5, 3)), ("0", (1, 8)), ("2", (1, 3))]
    assert rows[1]["stage"] == "second linear" and rows[1]["legend"] == "(B, 3)"
    model(torch.zeros(2, 4))
    assert len(rows) == 4, "the hooks are gone after the block"
    with pytest.raises(AttributeError):
        with cli.record_shapes(model, [("9", "no such module", "")]):
            pass


def test_a_reader_that_stops_early_is_no_error(ckpt, media):
    """`... | head -c 10`: stdout's reader is gone before the answer ends; the program stops quietly."""
    read, write = os.pipe()
    os.close(read)  # the reader has already stopped
    cmd = [sys.executable, str(ROOT / "qwen2_vl.py"), *map(str, base("qwen2_vl", ckpt, media))]
    done = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(write)
    assert done.returncode == 0 and "error" not in done.stderr, done.stderr
