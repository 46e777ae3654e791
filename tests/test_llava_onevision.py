"""LLaVA-OneVision against transformers 5.23 on tiny random checkpoints (fp32, CPU).

The tiny model has 56 px tiles (4 x 4 features per tile, 2 x 2 per video frame) and pinpoints up to 4 x 4
tiles, so the anyres path, the unpadding and the 9-tile shrink all run on small tensors."""

import sys
from pathlib import Path

import jinja2
import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from tiny import max_diff, user

import llava_onevision as lo

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "llava_onevision"


@pytest.fixture(scope="module")
def dirs(tiny_root):
    return tiny.build_llava_onevision(tiny_root)


@pytest.fixture(scope="module")
def ref(dirs):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    proc = AutoProcessor.from_pretrained(dirs["hf5"])
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(dirs["hf5"], attn_implementation="eager")
    return proc, model.eval()


@pytest.fixture(scope="module")
def ours(dirs):
    return lo.load(dirs["hf5"])


IMAGE_SIZES = {  # (h, w)
    "photo": (100, 140),
    "square_tile": (56, 56),
    "shrunk": (400, 380),  # 4 x 4 tiles = a 16 x 16 map > 9 tiles' worth: bilinear shrink
    "very_wide": (30, 500),
    "very_tall": (450, 40),
    "tiny": (9, 13),
    "odd": (131, 77),
}


def image(name, seed=0):
    return Image.fromarray(tiny.synthetic_image(*IMAGE_SIZES[name], seed))


VIDEO = tiny.synthetic_video(3, 40, 60, seed=3)


def hf_inputs(hproc, text, images, videos, nested):
    """transformers decides single- vs multi-image from how the list is nested: one list per row."""
    imgs = None
    if images:
        imgs = nested if nested is not None else images
    return tiny.reference_inputs(hproc, text=text, images=imgs, videos=videos or None)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing and prompt


def test_shrink_and_unpad_are_exercised(ours):
    cfg = ours[1].image
    lay = cfg.layout(*IMAGE_SIZES["shrunk"])
    assert lay.tiles == (4, 4) and lay.size != lay.cropped  # the 9-tile shrink runs
    lay = cfg.layout(*IMAGE_SIZES["very_wide"])
    assert lay.crop_rows > 0 and lay.size == lay.cropped  # letterbox rows are cut away


@pytest.mark.parametrize("name", list(IMAGE_SIZES))
def test_image_processor_matches(ours, ref, name):
    text = ours[1].apply_chat_template(user("image"))
    got = ours[1](text=text, images=[image(name)])
    want = hf_inputs(ref[0], [text], [image(name)], [], None)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert max_diff(got[k], want[k]) <= 1e-5, k


def test_token_counts_agree_with_the_model(ours):
    """For many sizes, the processor's count of <image> tokens equals the length of what the model packs."""
    model, proc = ours
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(5, 500, 2)) for _ in range(25)] + list(IMAGE_SIZES.values())
    for h, w in sizes:
        inputs = proc(text="<image>", images=[Image.fromarray(tiny.synthetic_image(h, w))])
        with torch.no_grad():
            feats = model.image_features(
                inputs["pixel_values"], inputs["image_sizes"], inputs["batch_num_images"]
            )
        assert feats[0].shape[0] == int((inputs["input_ids"] == proc.image_token_id).sum()), (h, w)


def test_multi_image_and_video_processor_match(ours, ref):
    text = ours[1].apply_chat_template(user("image", "image", "video"))
    imgs = [image("photo"), image("very_tall", 1)]
    got = ours[1](text=text, images=imgs, videos=[VIDEO])
    want = hf_inputs(ref[0], [text], imgs, [VIDEO], [imgs])
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and max_diff(got[k], want[k]) <= 1e-5, k


def test_video_processor_matches_on_frame_lists(ours, ref):
    for frames in (list(VIDEO), [Image.fromarray(f) for f in VIDEO]):
        got = ours[1].preprocess_videos([frames])["pixel_values_videos"]
        want = ref[0].video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]
        assert got.shape == want.shape and max_diff(got, want) <= 1e-5


CHATS = {
    "one_image": user("image"),
    "text_first": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]}],
    "images_and_video": user("image", "video", "image", text="Compare them."),
    "text_only_string": [{"role": "user", "content": "Hi! 你好"}],
    "multi_turn": user("image")
    + [
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
    ],
    "system": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + user("video"),
    "empty_system": [{"role": "system", "content": ""}] + user("image"),  # --system ""
}


@pytest.mark.parametrize("name", list(CHATS))
def test_chat_template_matches_jinja(ours, name):
    source = (DATA / "chat_template.jinja").read_text()
    # transformers' {% generation %} tag only marks the assistant text for training masks: drop it here
    source = source.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    msgs = CHATS[name]
    as_lists = [
        dict(m, content=[{"type": "text", "text": m["content"]}]) if isinstance(m["content"], str) else m
        for m in msgs
    ]
    for gen in (True, False):
        assert ours[1].apply_chat_template(msgs, gen) == template.render(
            messages=as_lists, add_generation_prompt=gen
        )


def test_chat_template_file_spellings(dirs):
    for layout in ("hf5", "hub"):
        assert tiny.read_chat_template(dirs[layout]) == (DATA / "chat_template.jinja").read_text()


# ---------------------------------------------------------------------------------------------------------
# Model


LOGIT_CASES = {  # items, image names, videos
    "one_image": (("image",), ["photo"], []),
    "shrunk_image": (("image",), ["shrunk"], []),
    "several_images": (("image", "image", "image"), ["odd", "very_wide", "tiny"], []),
    "video": (("video",), [], [VIDEO]),
    "image_and_video": (("image", "video"), ["very_tall"], [VIDEO]),
}


def case_inputs(proc, hproc, name):
    items, names, vids = LOGIT_CASES[name]
    text = proc.apply_chat_template(user(*items))
    imgs = [image(n, i) for i, n in enumerate(names)]
    got = proc(text=text, images=imgs or None, videos=vids or None)
    want = hf_inputs(hproc, [text], imgs, vids, [imgs] if len(imgs) > 1 else None)
    return got, want


@pytest.mark.parametrize("name", list(LOGIT_CASES))
def test_logits_match(ours, ref, name):
    got, want = case_inputs(ours[1], ref[0], name)
    with torch.no_grad():
        assert max_diff(ours[0](**got), ref[1](**want).logits) <= 1e-4


def test_logits_match_published_layout(dirs, ref):
    model, proc = lo.load(dirs["hub"])
    got, want = case_inputs(proc, ref[0], "image_and_video")
    with torch.no_grad():
        assert max_diff(model(**got), ref[1](**want).logits) <= 1e-4


@pytest.mark.parametrize("name", ["one_image", "several_images", "image_and_video"])
def test_greedy_generation_matches(ours, ref, name):
    from transformers import GenerationConfig

    got, want = case_inputs(ours[1], ref[0], name)
    ids = ours[0].generate(**got, max_new_tokens=16, eos_token_ids=[])
    cfg = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    want_ids = ref[1].generate(**want, generation_config=cfg)[:, want["input_ids"].shape[1] :]
    assert ids.tolist() == want_ids.tolist()
    assert len(set(ids[0].tolist())) > 3  # the tiny model does not just repeat one token


def batch_rows(proc):
    rows = [
        (user(text="Tell me a story."), [], []),
        (user("image"), [image("photo")], []),
        (user("image", "image", text="Compare."), [image("odd"), image("very_wide", 1)], []),
        (user("image", "video"), [image("shrunk", 2)], [VIDEO]),
    ]
    return [(proc.apply_chat_template(m), i, v) for m, i, v in rows]


def test_batch_equals_one_by_one(ours):
    tiny.assert_batch_equals_one_by_one(ours[0], ours[1], batch_rows(ours[1]))


def test_batch_processor_matches(ours, ref):
    rows = batch_rows(ours[1])
    texts = [r[0] for r in rows]
    got = ours[1](text=texts, images=[i for r in rows for i in r[1]], videos=[VIDEO])
    want = hf_inputs(ref[0], texts, True, [VIDEO], [r[1] for r in rows])
    for k in want:
        assert got[k].shape == want[k].shape and max_diff(got[k], want[k]) <= 1e-5, k
    want["position_ids"] = (got["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate() numbers them
    keep = got["attention_mask"].bool()
    with torch.no_grad():
        assert max_diff(ours[0](**got)[keep], ref[1](**want).logits[keep]) <= 1e-4


def test_cache_equals_full_forward(ours, monkeypatch):
    """Logits of every cached decode step equal the full no-cache forward over prompt + generated tokens."""
    model, proc = ours
    rows = batch_rows(proc)[1:3]
    inputs = proc(text=[r[0] for r in rows], images=[i for r in rows for i in r[1]])
    diffs = tiny.cache_vs_full_forward(model, inputs, monkeypatch)
    assert max(diffs) <= 1e-4, diffs


def test_sampling_is_seeded(ours):
    model, proc = ours
    tiny.assert_sampling_is_seeded(
        model, proc(text=proc.apply_chat_template(user("image")), images=[image("photo")])
    )


@pytest.mark.parametrize("name", ["llava-onevision-qwen2-0.5b-ov-hf", "llava-onevision-qwen2-7b-ov-hf"])
def test_real_config_shapes(name):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    mine, theirs = tiny.real_config_pair(
        DATA / f"{name}.config.json",
        lo.LlavaOnevision,
        lo.config_from_hf,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionConfig,
    )
    tiny.assert_same_parameters(mine, theirs, lo.rename, unused="post_layernorm")
    assert mine.cfg.text_config.rope_theta == 1e6 and mine.cfg.max_tiles == 9


# ---------------------------------------------------------------------------------------------------------
# Command line and bad input


def test_cli_streams_the_generated_text(dirs, ours, tmp_path):
    path = tmp_path / "photo.png"
    image("photo").save(path)
    args = ["--model", str(dirs["hub"]), "--image", str(path), "--prompt", "Describe this image."]
    stdout, summary = tiny.run_cli("llava_onevision.py", *args, "--max-new-tokens", "12")
    model, proc = ours
    inputs = proc(
        text=proc.apply_chat_template(user("image", text="Describe this image.")), images=[Image.open(path)]
    )
    ids = model.generate(**inputs, max_new_tokens=12)
    assert stdout == proc.decode(ids[0]) + "\n"
    assert summary["visual_tokens"] == int((inputs["input_ids"] == proc.image_token_id).sum())


def test_bad_inputs(dirs, ours, tmp_path):
    model, proc = ours
    sys.path.insert(0, str(ROOT / "examples"))
    import make_video

    make_video.write_video(tmp_path / "empty.mp4", np.zeros((0, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="no video frames"):
        proc(text="<video>", videos=[str(tmp_path / "empty.mp4")])
    with pytest.raises(ValueError, match="zero frames"):
        proc.preprocess_videos([np.zeros((0, 64, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="same number of frames"):
        proc(text="<video><video>", videos=[VIDEO, VIDEO[:2]])
    with pytest.raises(ValueError, match="2 <image> placeholder\\(s\\) but 1 were given"):
        proc(text="<image> and <image>", images=[image("photo")])
    inputs = proc(text="<image>", images=[image("photo")])
    ids = inputs["input_ids"].clone()
    ids[0, :3] = proc.pad_token_id  # as if three placeholders had been cut off
    with pytest.raises(ValueError, match="image sizes \\[\\[100, 140\\]\\]"):
        model(**dict(inputs, input_ids=ids))
    with pytest.raises(TypeError, match="image_grid_thw"):
        model(**inputs, image_grid_thw=inputs["image_sizes"])
