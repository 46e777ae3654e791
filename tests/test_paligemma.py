"""PaliGemma 1 and 2 against transformers 5.23 on tiny random checkpoints (fp32, CPU)."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from tiny import max_diff

import paligemma

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "paligemma"


@pytest.fixture(scope="module", params=[1, 2], ids=["pg1", "pg2"])
def dirs(request, tiny_root):
    return tiny.build_paligemma(tiny_root, request.param)


@pytest.fixture(scope="module")
def ref(dirs):
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(dirs["hf5"])
    model = PaliGemmaForConditionalGeneration.from_pretrained(dirs["hf5"], attn_implementation="eager").eval()
    return proc, model


@pytest.fixture(scope="module")
def ours(dirs):
    return paligemma.load(dirs["hf5"])


IMAGE_SIZES = {"square": (224, 224), "photo": (240, 320), "very_wide": (30, 900), "very_tall": (700, 40)}
IMAGE_SIZES |= {"tiny": (9, 13), "exact": (56, 56)}


def image(name, seed=0):
    return Image.fromarray(tiny.synthetic_image(*IMAGE_SIZES[name], seed))


def without_labels(d):
    return {k: v for k, v in d.items() if k != "labels"}


# ---------------------------------------------------------------------------------------------------------
# Preprocessing and prompt


@pytest.mark.parametrize("name", list(IMAGE_SIZES))
def test_image_processor_matches(ours, ref, name):
    got = ours[1].preprocess_images([image(name)])
    want = ref[0].image_processor(images=[image(name)], return_tensors="pt")
    assert got["pixel_values"].shape == want["pixel_values"].shape
    assert max_diff(got["pixel_values"], want["pixel_values"]) <= 1e-5


def test_image_modes_match(ours, ref):
    rgba = tiny.synthetic_image(50, 70, 1, channels=4)
    rgba[..., 3] = np.linspace(0, 255, 70, dtype=np.uint8)
    gray = tiny.synthetic_image(60, 80, 2, channels=1)[..., 0]
    for img in (Image.fromarray(rgba, "RGBA"), Image.fromarray(gray, "L"), tiny.synthetic_image(56, 84, 4)):
        got = ours[1].preprocess_images([img])
        want = ref[0].image_processor(images=[img], return_tensors="pt")
        assert max_diff(got["pixel_values"], want["pixel_values"]) <= 1e-5


PROMPT_CASES = {  # text, images, suffix
    "prefix_only": ("caption en", [image("photo")], None),
    "placeholder": ("<image>answer en what is this?", [image("square")], None),
    "batch_padded": (
        ["caption en", "answer en where is the cat on the mat?"],
        [image("photo"), image("tiny")],
        None,
    ),
    "two_images_per_row": (["caption en"], [[image("photo"), image("very_wide")]], None),
    "suffix": (
        ["detect cat", "ocr"],
        [image("photo"), image("very_tall")],
        ["<loc0012><loc0100><loc0900><loc1000> cat", "The quick fox"],
    ),
}


@pytest.mark.parametrize("name", list(PROMPT_CASES))
def test_processor_matches(ours, ref, name):
    text, images, suffix = PROMPT_CASES[name]
    got = ours[1](text=text, images=images, suffix=suffix)
    want = tiny.reference_inputs(ref[0], text=text, images=images, suffix=suffix)
    if suffix is None:
        want.pop(
            "labels"
        )  # transformers always adds labels (all -100 without a suffix); we add them with one
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert max_diff(got[k], want[k]) <= 1e-5, k


def test_prompt_format(ours):
    proc = ours[1]
    assert paligemma.build_prompt("caption en") == "<image><bos>caption en\n"
    ids = proc(text="caption en", images=[image("photo")])["input_ids"][0].tolist()
    n = proc.image.image_seq_length
    assert ids[:n] == [proc.image_token_id] * n and ids[n] == proc.bos_token_id  # nothing in between
    assert proc.decode(ids[n + 1 :]) == "caption en\n"
    with pytest.warns(UserWarning, match="no task prefix"):
        proc(text="What is this?", images=[image("photo")])


def test_parse_boxes():
    text = "<loc0256><loc0128><loc0768><loc0512> cat ; <loc0000><loc0000><loc1023><loc1023> big dog"
    boxes = paligemma.parse_boxes(text, width=640, height=480)
    assert boxes[0] == ("cat", (80.0, 120.0, 320.0, 360.0))  # x = 128/1024*640, y = 256/1024*480, ...
    assert boxes[1][0] == "big dog" and boxes[1][1] == pytest.approx((0, 0, 639.375, 479.53125))
    assert paligemma.parse_boxes("<loc0512><loc0512><loc0256><loc0256> x", 100, 100) == [
        ("x", (25, 25, 50, 50))
    ]
    assert paligemma.parse_boxes("no boxes here", 10, 10) == []


# ---------------------------------------------------------------------------------------------------------
# Model


LOGIT_CASES = ["prefix_only", "batch_padded", "two_images_per_row", "suffix"]


def logits_case(proc, hproc, name):
    text, images, suffix = PROMPT_CASES[name]
    return proc(text=text, images=images, suffix=suffix), tiny.reference_inputs(
        hproc, text=text, images=images, suffix=suffix
    )


@pytest.mark.parametrize("name", LOGIT_CASES)
def test_logits_match(ours, ref, name):
    got, want = logits_case(ours[1], ref[0], name)
    keep = got["attention_mask"].bool()
    # transformers' forward numbers padded rows from the first column; pass the positions generate() uses
    want["position_ids"] = got["attention_mask"].cumsum(-1)
    with torch.no_grad():
        mine = ours[0](**without_labels(got))
        theirs = ref[1](**without_labels(want)).logits
    assert max_diff(mine[keep], theirs[keep]) <= 1e-4


@pytest.mark.parametrize("layout", ["hub"])
def test_logits_match_published_layout(dirs, ref, layout):
    model, proc = paligemma.load(dirs[layout])
    got, want = logits_case(proc, ref[0], "two_images_per_row")
    with torch.no_grad():
        assert max_diff(model(**got), ref[1](**without_labels(want)).logits) <= 1e-4


def test_loss_with_suffix_matches(ours, ref):
    got, want = logits_case(ours[1], ref[0], "suffix")
    want["position_ids"] = got["attention_mask"].cumsum(-1)
    loss, _ = ours[0](**got)
    theirs = ref[1](**want).loss
    assert abs(loss.item() - theirs.item()) <= 1e-5
    loss.backward()  # differentiable: a fine-tuning step can use it
    assert ours[0].multi_modal_projector.linear.weight.grad is not None
    ours[0].zero_grad(set_to_none=True)


def test_sliding_window_is_exercised(ours, ref, monkeypatch):
    """PaliGemma 2's window (8) is shorter than the prompts: switching it off changes the answer's logits, so
    the parity tests above do cover it."""
    model, proc = ours
    tc = model.cfg.text_config
    got, _ = logits_case(proc, ref[0], "suffix")
    if not tc.is_gemma2:  # PaliGemma 1: one mask for every layer
        mask, window_mask = model.masks(
            got["attention_mask"].bool(), got["token_type_ids"] == 0, got["input_ids"].shape[1]
        )
        assert mask is not None and window_mask is None and tc.sliding_window is None
        return
    got, _ = logits_case(proc, ref[0], "suffix")
    assert tc.sliding_window < got["input_ids"].shape[1] and "sliding_attention" in tc.layer_types
    with torch.no_grad():
        _, windowed = model(**got)
        no_window = replace(tc, sliding_window=10**6)
        monkeypatch.setattr(model, "cfg", replace(model.cfg, text_config=no_window))
        _, unwindowed = model(**got)
    suffix = got["token_type_ids"].bool()
    assert max_diff(windowed[suffix], unwindowed[suffix]) > 1e-3


@pytest.mark.parametrize("name", ["prefix_only", "two_images_per_row"])
def test_greedy_generation_matches(ours, ref, name):
    from transformers import GenerationConfig

    got, want = logits_case(ours[1], ref[0], name)
    ids = ours[0].generate(**got, max_new_tokens=16, eos_token_ids=[])
    cfg = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    want_ids = ref[1].generate(**without_labels(want), generation_config=cfg)[:, want["input_ids"].shape[1] :]
    assert ids.tolist() == want_ids.tolist()
    assert len(set(ids[0].tolist())) > 3  # the tiny model does not just repeat one token


def test_batch_equals_one_by_one(ours):
    model, proc = ours
    texts = ["caption en", "answer en what colour is the mat on the floor?", "detect cat"]
    images = [[image("photo")], [image("very_wide"), image("tiny")], [image("square")]]
    out = model.generate(**proc(text=texts, images=images), max_new_tokens=12, eos_token_ids=[])
    for b in range(3):
        one = model.generate(**proc(text=texts[b], images=[images[b]]), max_new_tokens=12, eos_token_ids=[])
        assert out[b].tolist() == one[0].tolist()


@pytest.mark.parametrize("rows", [2, 1], ids=["padded", "unpadded"])
def test_cache_equals_full_forward(ours, monkeypatch, rows):
    """Logits of every cached decode step equal the full no-cache forward over prompt + generated tokens, the
    generated ones marked as suffix (token_type 1: causal). Two left-padded rows (every step masked), or one
    row (the mask-free prefill and steps); for PaliGemma 2 the sequence outgrows the sliding window."""
    model, proc = ours
    texts, images = ["caption en", "answer en is it raining outside?"], [image("photo"), image("tiny")]
    inputs = proc(text=texts[:rows], images=images[:rows])
    diffs = tiny.cache_vs_full_forward(model, inputs, monkeypatch, {"token_type_ids": 1})
    assert max(diffs) <= 1e-4, diffs


def test_sampling_is_seeded(ours):
    tiny.assert_sampling_is_seeded(ours[0], ours[1](text="caption en", images=[image("photo")]))


@pytest.mark.parametrize(
    "name", ["paligemma-3b-mix-224", "paligemma-3b-mix-448", "paligemma2-3b-mix-224", "paligemma2-3b-mix-448"]
)
def test_real_config_shapes(name):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    mine, theirs = tiny.real_config_pair(
        DATA / f"{name}.config.json",
        paligemma.PaliGemma,
        paligemma.config_from_hf,
        PaliGemmaForConditionalGeneration,
        PaliGemmaConfig,
    )
    tiny.assert_same_parameters(mine, theirs, paligemma.rename)
    tc = mine.cfg.text_config
    assert (tc.num_attention_heads, tc.head_dim, tc.rope_theta) == (8, 256, 10000.0)
    if "paligemma2" in name:
        assert tc.layer_types[:2] == ("sliding_attention", "full_attention") and tc.sliding_window == 4096
        assert (tc.attn_logit_softcapping, tc.final_logit_softcapping, tc.query_pre_attn_scalar) == (
            50.0,
            30.0,
            256,
        )


# ---------------------------------------------------------------------------------------------------------
# Command line and bad input


def test_cli_streams_and_draws_boxes(dirs, ours, tmp_path):
    path = tmp_path / "photo.png"
    image("photo").save(path)
    out_png = tmp_path / "boxes.png"
    args = [
        "--model",
        str(dirs["hub"]),
        "--image",
        str(path),
        "--prompt",
        "detect cat",
        "--max-new-tokens",
        "12",
    ]
    stdout, summary = tiny.run_cli("paligemma.py", *args, "--draw-boxes", str(out_png))
    model, proc = ours
    ids = model.generate(**proc(text="detect cat", images=[Image.open(path)]), max_new_tokens=12)
    assert stdout == proc.decode(ids[0]) + "\n"
    assert summary["visual_tokens"] == proc.image.image_seq_length
    assert Image.open(out_png).size == (320, 240)


def test_bad_inputs(dirs, ours, tmp_path):
    model, proc = ours
    with pytest.raises(ValueError, match="2 <image> placeholder\\(s\\) but 1 were given"):
        proc(text="<image><image>caption en", images=[image("photo")])
    with pytest.raises(ValueError, match="1 images for 2 prompts"):
        proc(text=["caption en", "ocr"], images=[image("photo")])
    with pytest.raises(ValueError, match="needs an image"):
        proc(text="caption en")
    with pytest.raises(ValueError, match="needs an image with every prompt: a prompt's image is None or"):
        proc(text=["caption en", "ocr"], images=[image("photo"), None])
    two = dict(text=["caption en", "ocr"], images=[image("photo"), image("photo")])
    # a row left without labels would train on nothing: one answer per prompt, or an error
    for suffix in ("a cat", ["a cat"], ["a cat", None], ["a", "b", "c"]):
        with pytest.raises(ValueError, match=r"suffix: one answer string per prompt \(2\), not "):
            proc(**two, suffix=suffix)
    inputs = proc(text="caption en", images=[image("photo")])
    with pytest.raises(ValueError, match="16 <image> tokens but the images give 32"):
        model(**dict(inputs, pixel_values=inputs["pixel_values"].repeat(2, 1, 1, 1)))
    with pytest.raises(TypeError, match="mm_token_type_ids"):
        model(**inputs, mm_token_type_ids=inputs["token_type_ids"])
    with pytest.raises(ValueError, match="unsupported dtype"):
        paligemma.load(dirs["hf5"], dtype="int8")
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "paligemma.py"),
            "--model",
            str(dirs["hf5"]),
            "--image",
            "nope.png",
            "--prompt",
            "ocr",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        run.returncode != 0 and run.stderr.strip().splitlines()[-1] == "error: image file not found: nope.png"
    )
