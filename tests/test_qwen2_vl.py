"""Qwen2-VL against transformers 5.23 on tiny random checkpoints (fp32, CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import jinja2
import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from tiny import max_diff, user

import common
import media
import qwen2_vl

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "qwen2_vl"


@pytest.fixture(scope="module")
def dirs(tiny_root):
    return tiny.build_qwen2_vl(tiny_root)


@pytest.fixture(scope="module")
def ref(dirs):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    proc = AutoProcessor.from_pretrained(dirs["hf5"])
    model = Qwen2VLForConditionalGeneration.from_pretrained(dirs["hf5"], attn_implementation="eager").eval()
    return proc, model


@pytest.fixture(scope="module")
def ours(dirs):
    return qwen2_vl.load(dirs["hf5"])


IMAGE_SIZES = {  # (h, w)
    "photo": (224, 320),
    "odd": (333, 517),
    "very_wide": (40, 1200),
    "very_tall": (900, 50),
    "tiny": (10, 12),
    "above_max_pixels": (600, 800),
}


def image(name_or_hw, seed=0):
    h, w = IMAGE_SIZES[name_or_hw] if isinstance(name_or_hw, str) else name_or_hw
    return Image.fromarray(tiny.synthetic_image(h, w, seed))


VIDEO = tiny.synthetic_video(5, 64, 96, seed=3)  # odd frame count: the last frame is repeated


# ---------------------------------------------------------------------------------------------------------
# Preprocessing


def test_smart_resize_rules():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as ref_resize

    assert qwen2_vl.smart_resize(480, 640, 28, 3136, 12845056) == (476, 644)
    # round-half-to-even: 70 / 28 = 2.5 rounds to 2, 98 / 28 = 3.5 rounds to 4
    assert qwen2_vl.smart_resize(70, 98, 28, 56, 10**9) == (56, 112)
    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 3000, size=(300, 2)):
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in ((3136, 12845056), (3136, 50176), (100352, 602112)):
            assert qwen2_vl.smart_resize(int(h), int(w), 28, lo, hi) == ref_resize(int(h), int(w), 28, lo, hi)
    with pytest.raises(ValueError, match="aspect ratio"):
        qwen2_vl.smart_resize(10, 2500)
    with pytest.raises(ValueError, match="raise min_pixels"):
        qwen2_vl.smart_resize(10, 12, 28, min_pixels=0, max_pixels=50176)


@pytest.mark.parametrize("name", list(IMAGE_SIZES))
def test_image_processor_matches(ours, ref, name):
    img = image(name)
    got = ours[1](["<|vision_start|><|image_pad|><|vision_end|>"], images=[img])
    want = ref[0].image_processor(images=[img], return_tensors="pt")
    assert got["image_grid_thw"].tolist() == want["image_grid_thw"].tolist()
    assert max_diff(got["pixel_values"], want["pixel_values"]) <= 1e-5


def test_image_modes_match(ours, ref):
    rgba = tiny.synthetic_image(50, 70, 1, channels=4)
    rgba[..., 3] = np.linspace(0, 255, 70, dtype=np.uint8)
    gray = tiny.synthetic_image(60, 80, 2, channels=1)[..., 0]
    for img in (Image.fromarray(rgba, "RGBA"), Image.fromarray(gray, "L"), tiny.synthetic_image(56, 84, 4)):
        got = ours[1].preprocess_images([img])
        want = ref[0].image_processor(images=[img], return_tensors="pt")
        assert max_diff(got["pixel_values"], want["pixel_values"]) <= 1e-5


def test_tensor_images_and_videos_match(ours, ref):
    """torchvision's layouts, (C, H, W) images and (F, C, H, W) videos as uint8 tensors, as the reference
    processor reads them."""
    img = torch.from_numpy(tiny.synthetic_image(56, 84, 4)).permute(2, 0, 1)  # (3, H, W)
    got = ours[1].preprocess_images([img])
    want = ref[0].image_processor(images=[img], return_tensors="pt")
    assert max_diff(got["pixel_values"], want["pixel_values"]) <= 1e-5
    frames = torch.from_numpy(VIDEO[:4]).permute(0, 3, 1, 2)  # (F, 3, H, W)
    got = ours[1].preprocess_videos([frames])
    want = ref[0].video_processor(videos=[frames], return_tensors="pt")
    assert max_diff(got["pixel_values_videos"], want["pixel_values_videos"]) <= 1e-5


@pytest.mark.parametrize(
    "frames",
    [VIDEO, list(VIDEO[:4]), [Image.fromarray(f) for f in VIDEO[:3]]],
    ids=["array_odd", "list_of_arrays", "list_of_pil"],
)
def test_video_processor_matches(ours, ref, frames):
    got = ours[1].preprocess_videos([frames])
    want = ref[0].video_processor(videos=[frames], return_tensors="pt")
    assert got["video_grid_thw"].tolist() == want["video_grid_thw"].tolist()
    assert max_diff(got["pixel_values_videos"], want["pixel_values_videos"]) <= 1e-5


def batch_prompts(proc):
    rows = [
        user(text="Hello there, how are you?"),
        user("image"),
        user("image", "image", "video", text="Compare."),
    ]
    return [proc.apply_chat_template(m) for m in rows], [
        image("photo"),
        image("odd", 1),
        image("very_wide", 2),
    ]


@pytest.mark.parametrize("layout", ["hf5", "hub", "v4_52"])
def test_processor_batch_matches(dirs, ref, layout):
    _, proc = qwen2_vl.load(dirs[layout])
    texts, images = batch_prompts(proc)
    got = proc(text=texts, images=images, videos=[VIDEO])
    want = ref[0](
        text=texts, images=images, videos=[VIDEO], padding=True, padding_side="left", return_tensors="pt"
    )
    assert sorted(got) == sorted(want.keys())
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert max_diff(got[k], want[k]) <= 1e-5, k


CHATS = {
    "text_only": [{"role": "user", "content": "Hi! 你好"}],
    "one_image": user("image"),
    "two_images_and_video": user("image", "image", "video", text="What changed?"),
    "multi_turn": user("image")
    + [
        {"role": "assistant", "content": "A photo."},
        {"role": "user", "content": [{"type": "text", "text": "More detail."}]},
    ],
    "system": [{"role": "system", "content": "Be brief."}] + user("video"),
    "empty_system": [{"role": "system", "content": ""}] + user("image"),  # --system ""
    "system_list_content": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]
    + user("image"),
}


@pytest.mark.parametrize("name", list(CHATS))
@pytest.mark.parametrize("vision_id", [False, True])
def test_chat_template_matches_jinja(ours, name, vision_id):
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # the settings transformers renders with
    template = env.from_string((DATA / "chat_template.jinja").read_text())
    for gen in (True, False):
        want = template.render(messages=CHATS[name], add_generation_prompt=gen, add_vision_id=vision_id)
        assert ours[1].apply_chat_template(CHATS[name], gen, add_vision_id=vision_id) == want


def test_chat_template_file_spellings(dirs):
    for layout in ("hf5", "hub"):
        assert tiny.read_chat_template(dirs[layout]) == (DATA / "chat_template.jinja").read_text()


# ---------------------------------------------------------------------------------------------------------
# Model


LOGIT_CASES = {
    "text_only": (user(text="Tell me a story about a fox."), [], []),
    "one_image": (user("image"), ["photo"], []),
    "two_images": (user("image", "image"), ["odd", "very_tall"], []),
    "image_and_video": (user("image", "video"), ["above_max_pixels"], [VIDEO]),
}


def case_inputs(proc, hproc, name):
    msgs, imgs, vids = LOGIT_CASES[name]
    text = proc.apply_chat_template(msgs)
    imgs = [image(n, i) for i, n in enumerate(imgs)]
    got = proc(text=text, images=imgs or None, videos=vids or None)
    want = hproc(text=text, images=imgs or None, videos=vids or None, return_tensors="pt")
    return got, want


@pytest.mark.parametrize("name", list(LOGIT_CASES))
def test_logits_match(ours, ref, name):
    got, want = case_inputs(ours[1], ref[0], name)
    with torch.no_grad():
        diff = max_diff(ours[0](**got), ref[1](**want).logits)
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("layout", ["hub", "v4_52"])
def test_logits_match_other_layouts(dirs, ref, layout):
    model, proc = qwen2_vl.load(dirs[layout])
    got, want = case_inputs(proc, ref[0], "image_and_video")
    with torch.no_grad():
        assert max_diff(model(**got), ref[1](**want).logits) <= 1e-4


@pytest.mark.parametrize("name", ["one_image", "image_and_video"])
def test_greedy_generation_matches(ours, ref, name):
    from transformers import GenerationConfig

    got, want = case_inputs(ours[1], ref[0], name)
    ids = ours[0].generate(**got, max_new_tokens=16, eos_token_ids=[])
    cfg = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    want_ids = ref[1].generate(**want, generation_config=cfg)[:, want["input_ids"].shape[1] :]
    assert ids.tolist() == want_ids.tolist()


def test_batch_equals_one_by_one(ours):
    model, proc = ours
    texts, images = batch_prompts(proc)
    rows = [(texts[0], [], []), (texts[1], [images[0]], []), (texts[2], images[1:], [VIDEO])]
    tiny.assert_batch_equals_one_by_one(model, proc, rows)


def test_cache_equals_full_forward(ours, monkeypatch):
    """Logits of every cached decode step equal the full no-cache forward over prompt + generated tokens
    (two left-padded rows with images of different sizes: exercises padding, rope_delta and the cache)."""
    model, proc = ours
    texts = [
        proc.apply_chat_template(user("image")),
        proc.apply_chat_template(user("image", text="Be brief, ok?")),
    ]
    inputs = proc(text=texts, images=[image("photo"), image("very_wide", 3)])
    diffs = tiny.cache_vs_full_forward(model, inputs, monkeypatch)
    assert max(diffs) <= 1e-4, diffs


def test_rope_index_matches_reference(ours, ref):
    """Positions equal transformers' on images and on a video whose frame pairs do not exceed its grid
    sides."""
    texts, images = batch_prompts(ours[1])
    got = ours[1](text=texts, images=images, videos=[VIDEO])
    pos, delta = ours[0].positions(
        got["input_ids"],
        got["attention_mask"],
        got["mm_token_type_ids"],
        got["image_grid_thw"],
        got["video_grid_thw"],
    )
    rpos, rdelta = ref[1].model.get_rope_index(
        got["input_ids"],
        got["mm_token_type_ids"],
        got["image_grid_thw"],
        got["video_grid_thw"],
        got["attention_mask"],
    )
    keep = got["attention_mask"].bool()
    assert torch.equal(pos[:, keep], rpos[:, keep]) and delta.tolist() == rdelta.flatten().tolist()


def test_positions_after_long_video_follow_released_model(ours, ref):
    """A video of 8 frames at 56x56: grid (4, 4, 4) -> merged (t=4, 2, 2) = 16 tokens. The released model (and
    transformers 4.x) continue text at start + max(4, 2, 2) = 2 + 4 = 6; transformers 5.23 at 2 + 2 = 4."""
    ids = torch.tensor([[5, 6] + [7] * 16 + [8]])
    types = torch.tensor([[0, 0] + [2] * 16 + [0]])
    grid = torch.tensor([[4, 4, 4]])
    pos, delta = qwen2_vl.get_rope_index(types, torch.ones_like(ids), None, grid, merge=2)
    t = [0, 1] + [2 + i // 4 for i in range(16)] + [6]
    h = [0, 1] + [2 + (i % 4) // 2 for i in range(16)] + [6]
    w = [0, 1] + [2 + i % 2 for i in range(16)] + [6]
    assert pos[:, 0].tolist() == [t, h, w] and delta.tolist() == [7 - 19]
    rpos, _ = ref[1].model.get_rope_index(ids, types, None, grid, torch.ones_like(ids))
    assert rpos[0, 0, -1].item() == 4  # the documented difference


def test_sampling_is_seeded(ours):
    model, proc = ours
    tiny.assert_sampling_is_seeded(
        model, proc(text=proc.apply_chat_template(user("image")), images=[image("photo")])
    )


@pytest.mark.parametrize("name", ["Qwen2-VL-2B-Instruct", "Qwen2-VL-7B-Instruct"])
def test_real_config_shapes(name):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    mine, theirs = tiny.real_config_pair(
        DATA / f"{name}.config.json",
        qwen2_vl.Qwen2VL,
        qwen2_vl.config_from_hf,
        Qwen2VLForConditionalGeneration,
        Qwen2VLConfig,
    )
    tiny.assert_same_parameters(mine, theirs, qwen2_vl.rename)


def test_vision_heads_divide_embed_dim_not_hidden_size(tmp_path):
    """vision_config.hidden_size is the merger's output (the decoder's width), so the vision heads need not
    divide it (bench.py's "small" configuration: 640 and 6 heads); its attention width, embed_dim, must."""
    raw = json.loads((DATA / "Qwen2-VL-2B-Instruct.config.json").read_text())
    raw["vision_config"]["num_heads"] = 20  # 1280 / 20 = 64, while 1536 / 20 is not whole
    (tmp_path / "config.json").write_text(json.dumps(raw))
    _, cfg = common.read_config(tmp_path, "qwen2_vl", qwen2_vl.config_from_hf)
    assert cfg.vision_config.num_heads == 20
    raw["vision_config"]["num_heads"] = 24
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="vision_config.embed_dim = 1280 does not divide by num_heads = 24"):
        common.read_config(tmp_path, "qwen2_vl", qwen2_vl.config_from_hf)


# ---------------------------------------------------------------------------------------------------------
# Command line and bad input


def test_cli_streams_the_generated_text(dirs, ours, tmp_path):
    path = tmp_path / "photo.png"
    image("photo").save(path)
    args = ["--model", str(dirs["hub"]), "--image", str(path), "--prompt", "Describe this image."]
    stdout, summary = tiny.run_cli("qwen2_vl.py", *args, "--max-new-tokens", "12")
    model, proc = ours
    inputs = proc(
        text=proc.apply_chat_template(user("image", text="Describe this image.")),
        images=[media.load_image(path)],
    )
    ids = model.generate(**inputs, max_new_tokens=12)
    assert stdout == proc.decode(ids[0]) + "\n"
    assert summary["visual_tokens"] == int(inputs["image_grid_thw"].prod()) // 4
    assert summary["prompt_tokens"] == inputs["input_ids"].shape[1]


def test_parse_boxes_reads_grounding_answers():
    text = (
        "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(120,340),(560,880)<|box_end|> and "
        "<|box_start|>(900,100),(500,50)<|box_end|><|im_end|>"
    )
    boxes = qwen2_vl.parse_boxes(text, width=640, height=480)  # 0-1000 of each side -> pixels
    assert [label for label, _ in boxes] == ["the dog", ""]
    assert np.allclose([box for _, box in boxes], [(76.8, 163.2, 358.4, 422.4), (320, 24, 576, 48)])
    assert qwen2_vl.parse_boxes("no boxes here", 640, 480) == []


def test_cli_draws_boxes(dirs, tmp_path):
    path, out = tmp_path / "photo.png", tmp_path / "boxes.png"
    image("photo").save(path)
    args = ["--model", str(dirs["hub"]), "--image", str(path), "--prompt", "Find the dog.", "--device", "cpu"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "qwen2_vl.py"), *args, "--max-new-tokens", "4", "--draw-boxes", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # random weights: no boxes, but the picture is written and the count said
    assert done.returncode == 0 and "0 box(es) drawn on" in done.stderr, done.stderr
    assert Image.open(out).size == image("photo").size


def test_cli_reports_bad_input_cleanly(dirs, tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "qwen2_vl.py"),
        "--model",
        str(dirs["hf5"]),
        "--image",
        str(tmp_path / "nope.png"),
        "--prompt",
        "x",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert (
        run.returncode != 0
        and run.stderr.strip().splitlines()[-1] == f"error: image file not found: {tmp_path}/nope.png"
    )


def test_bad_inputs(dirs, ours, tmp_path):
    model, proc = ours
    sys.path.insert(0, str(ROOT / "examples"))
    import make_video

    make_video.write_video(tmp_path / "empty.mp4", np.zeros((0, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="no video frames"):
        proc(text="<|video_pad|>", videos=[str(tmp_path / "empty.mp4")])
    with pytest.raises(ValueError, match="zero frames"):
        proc.preprocess_videos([np.zeros((0, 64, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholder\\(s\\) but 1 were given"):
        proc(text="<|image_pad|> and <|image_pad|>", images=[image("photo")])
    inputs = proc(text=proc.apply_chat_template(user("image")), images=[image("photo")])
    ids = inputs["input_ids"].clone()
    ids[ids == proc.image_token_id] = proc.pad_token_id  # as if the placeholders had been truncated away
    with pytest.raises(ValueError, match="0 <\\|image_pad\\|> tokens but the images give 54 features"):
        model(**dict(inputs, input_ids=ids))
    with pytest.raises(ValueError, match="image pixels and grid_thw come together"):
        model(**dict(inputs, image_grid_thw=None))
    with pytest.raises(TypeError, match="token_type_ids"):
        model(**inputs, token_type_ids=inputs["mm_token_type_ids"])
    right = proc(text=["hi", "a longer prompt"], padding_side="right")
    with pytest.raises(ValueError, match="left padding"):
        model.generate(**right, max_new_tokens=2)
    with pytest.raises(ValueError, match="unsupported dtype"):
        qwen2_vl.load(dirs["hf5"], dtype="int8")
