"""The command line's two long-running modes: --chat (a conversation driven through stdin) and --batch-input
(one prompt over a folder, a list or a .jsonl file, in batches, resumable)."""

import importlib
import io
import json

import pytest
import test_cli
import tiny
from PIL import Image

import cli
import common

FILES = ["qwen2_vl", "paligemma", "llava_onevision", "video_llava", "perception_lm"]
PROMPT = {"paligemma": "caption en"}
N = "4"  # --max-new-tokens


@pytest.fixture(scope="module")
def ckpt(hub_checkpoint):
    return {f: hub_checkpoint(f) for f in FILES}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A folder of three pictures of different sizes, a broken one among them and a text file."""
    d = tmp_path_factory.mktemp("pictures")
    for name, (h, w), seed in (("a.png", (60, 80), 1), ("c.jpg", (90, 50), 2), ("d.png", (40, 40), 3)):
        Image.fromarray(tiny.synthetic_image(h, w, seed)).save(d / name)
    (d / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png" * 10)
    (d / "notes.txt").write_text("not an image")
    return d


def run(capsys, monkeypatch, file, args, stdin=""):
    """(exit status, stdout, stderr) of `python FILE.py ARGS < stdin`, run in this process."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return test_cli.run(capsys, file, args)


# ----------------------------------------------------------------------------------------------------------
# --chat


@pytest.mark.parametrize("file", FILES)
def test_a_scripted_chat_answers_each_line_as_the_python_api(file, ckpt, pictures, capsys, monkeypatch):
    """One question per line; each answer and one empty line on stdout; a bad command or file is one
    `error:` line and the conversation goes on. The answers are those of Chat.ask with the same turns."""
    first = PROMPT.get(file, "What is in it?")
    script = f"/image {pictures / 'c.jpg'}\n{first}\n/image {pictures / 'b.png'}\n/bogus\n\n{first}\n"
    args = ["--model", ckpt[file], "--chat", "--max-new-tokens", N, "--image", pictures / "a.png"]
    code, out, err = run(capsys, monkeypatch, file, args + ["--prompt", first], script)
    assert code == 0, err
    assert err.count("error: ") == 2 and "unknown command /bogus" in err and "b.png" in err
    m = importlib.import_module(file)
    model, proc = m.load(ckpt[file])
    chat = (m.Chat if file == "paligemma" else common.Chat)(model, proc)
    a = Image.open(pictures / "a.png").convert("RGB")
    c = Image.open(pictures / "c.jpg").convert("RGB")
    want = [
        chat.ask(first, images=[a], max_new_tokens=int(N)),
        chat.ask(first, images=[c], max_new_tokens=int(N)),
    ]
    want.append(chat.ask(first, max_new_tokens=int(N)))  # "/image b.png" failed: no new image
    assert out == "".join(w + "\n\n" for w in want)


def test_ctrl_c_stops_an_answer_and_keeps_the_conversation(ckpt, capsys, monkeypatch):
    calls = []

    def interrupt_the_second(self, piece):
        calls.append(piece)
        if len(calls) == int(N) + 1:  # the first piece of the second answer
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.Printer, "__call__", interrupt_the_second)
    code, out, err = run(
        capsys,
        monkeypatch,
        "llava_onevision",
        ["--model", ckpt["llava_onevision"], "--chat", "--max-new-tokens", N],
        "one\ntwo\nthree\n",
    )
    assert code == 0, err
    assert "stopped" in err
    m = importlib.import_module("llava_onevision")
    model, proc = m.load(ckpt["llava_onevision"])
    chat = common.Chat(model, proc)
    chat.ask("one", max_new_tokens=int(N))
    tokens = []
    chat.ask("three", max_new_tokens=int(N), streamer=tokens.append)
    assert calls[int(N) + 1 :] == tokens  # the third turn continues on the first, without the second


def test_chat_commands(ckpt, capsys, monkeypatch, pictures):
    script = "/help\n/video\n/reset\nhi\n/quit\nnever asked\n"
    code, out, err = run(
        capsys,
        monkeypatch,
        "qwen2_vl",
        ["--model", ckpt["qwen2_vl"], "--chat", "--max-new-tokens", N],
        script,
    )
    assert code == 0 and "the conversation is forgotten" in err and "error: /video needs a path" in err
    assert err.count("first token") == 1  # one question answered; /quit ended before the next
    code, out, err = run(
        capsys, monkeypatch, "paligemma", ["--model", ckpt["paligemma"], "--chat"], "/video x.mp4\n"
    )
    assert "unknown command /video" in err  # PaliGemma reads no videos


# ----------------------------------------------------------------------------------------------------------
# --batch-input


def lines(out: str) -> list[dict]:
    return [json.loads(x) for x in out.splitlines()]


@pytest.mark.parametrize("file", FILES)
def test_a_folder_in_batches_equals_one_by_one_and_a_broken_file_is_its_own_line(
    file, ckpt, pictures, capsys, monkeypatch
):
    args = ["--model", ckpt[file], "--batch-input", pictures, "--prompt", PROMPT.get(file, "What is it?")]
    args += ["--max-new-tokens", N]
    code, out, err = run(capsys, monkeypatch, file, args + ["--batch-size", "8"])
    assert code == 1  # one input failed
    rows = lines(out)
    assert [r["image"].rsplit("/", 1)[1] for r in rows] == ["a.png", "b.png", "c.jpg", "d.png"]
    assert "error" in rows[1] and "answer" not in rows[1]
    assert all("answer" in r for r in rows[:1] + rows[2:])
    assert err.count("warning: ") == 1 and '"failed": 1' in err and '"answered": 3' in err
    code, out1, err = run(capsys, monkeypatch, file, args + ["--batch-size", "1"])
    assert lines(out1) == rows


def test_resume_and_jsonl(ckpt, pictures, capsys, monkeypatch, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{pictures / 'a.png'}\n{pictures / 'c.jpg'}\n")
    output = tmp_path / "out.jsonl"
    args = ["--model", ckpt["qwen2_vl"], "--prompt", "What is it?", "--max-new-tokens", N, "--output", output]
    code, out, err = run(capsys, monkeypatch, "qwen2_vl", args + ["--batch-input", listing])
    assert code == 0 and out == "" and len(lines(output.read_text())) == 2
    listing.write_text(listing.read_text() + f"{pictures / 'd.png'}\n")
    output.write_text(output.read_text() + '{"image": "cut short by a ki')  # an interrupted write
    code, out, err = run(capsys, monkeypatch, "qwen2_vl", args + ["--batch-input", listing])
    assert code == 0 and '"skipped": 2' in err and '"answered": 1' in err
    kept, cut, new = (
        output.read_text().splitlines()[:2],
        output.read_text().splitlines()[2],
        output.read_text().splitlines()[3:],
    )
    assert cut.startswith('{"image": "cut short')  # left as it was, on a line of its own
    rows = lines("\n".join(kept + new))
    assert [r["image"] for r in rows] == listing.read_text().split()
    # a .jsonl input: a prompt per image, each answered as a run with that --prompt
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(
        json.dumps({"image": str(pictures / "a.png"), "prompt": "Colour?"})
        + "\n"
        + json.dumps({"image": str(pictures / "d.png"), "prompt": "Shape?"})
        + "\n"
    )
    code, out, err = run(
        capsys,
        monkeypatch,
        "qwen2_vl",
        ["--model", ckpt["qwen2_vl"], "--batch-input", jsonl, "--max-new-tokens", N],
    )
    got = lines(out)
    assert [r["prompt"] for r in got] == ["Colour?", "Shape?"]
    for r in got:
        code, one, err = run(
            capsys,
            monkeypatch,
            "qwen2_vl",
            [
                "--model",
                ckpt["qwen2_vl"],
                "--image",
                r["image"],
                "--prompt",
                r["prompt"],
                "--max-new-tokens",
                N,
            ],
        )
        assert one == r["answer"] + "\n"


BAD = {
    "chat and batch": (["--chat", "--batch-input", "x"], "do not go together"),
    "batch and image": (["--batch-input", "x", "--image", "y.png", "--prompt", "p"], "leave out --image"),
    "no prompt": ([], "the prompt is missing"),
    "batch size 0": (
        ["--batch-input", ".", "--prompt", "p", "--batch-size", "0"],
        "--batch-size must be >= 1",
    ),
    "output alone": (["--prompt", "p", "--output", "o.jsonl"], "--output are for --batch-input"),
    "batch size alone": (["--prompt", "p", "--batch-size", "2"], "--batch-size and --output are for"),
    "prompt from stdin in a chat": (["--chat", "--prompt-file", "-"], "which --chat reads its questions"),
    "explain in a chat": (["--chat", "--explain"], "--explain: for a single question"),
    "missing folder": (["--batch-input", "nope/", "--prompt", "p"], "no such folder or file"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_session_flags(case, ckpt, capsys, monkeypatch):
    extra, needle = BAD[case]
    code, out, err = run(capsys, monkeypatch, "qwen2_vl", ["--model", ckpt["qwen2_vl"], *extra])
    assert code == 1 and out == "" and err.strip().splitlines()[-1].startswith("error: ") and needle in err
