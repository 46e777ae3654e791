"""Video-LLaVA against transformers 5.23 on tiny random checkpoints (fp32, CPU).

The tiny model has 56 px inputs (4 x 4 = 16 patches; video frames keep their CLS: 17 per frame) and 3 CLIP
layers per tower, so the penultimate-layer features are a real intermediate layer."""

import sys
import warnings
from pathlib import Path

import jinja2
import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from tiny import max_diff, user

import video_llava as vl

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "video_llava"


@pytest.fixture(scope="module")
def dirs(tiny_root):
    return tiny.build_video_llava(tiny_root)


@pytest.fixture(scope="module")
def ref(dirs):
    from transformers import AutoProcessor, VideoLlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(dirs["hf5"])
    model = VideoLlavaForConditionalGeneration.from_pretrained(dirs["hf5"], attn_implementation="eager")
    return proc, model.eval()


@pytest.fixture(scope="module")
def ours(dirs):
    return vl.load(dirs["hf5"])


IMAGE_SIZES = {
    "photo": (100, 140),
    "portrait": (150, 90),
    "very_wide": (40, 600),
    "tiny": (9, 13),
    "exact": (56, 56),
}


def image(name, seed=0):
    return Image.fromarray(tiny.synthetic_image(*IMAGE_SIZES[name], seed))


VIDEO = tiny.synthetic_video(8, 70, 90, seed=3)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing and prompt


@pytest.mark.parametrize("name", list(IMAGE_SIZES))
def test_image_processor_matches(ours, ref, name):
    """The PIL path: PIL's bicubic resize, floor-centred crop, float64 rescale."""
    got = torch.stack([vl.preprocess_image(image(name), ours[1].image)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref[0].image_processor(images=[image(name)], return_tensors="pt")["pixel_values_images"]
    assert got.shape == want.shape and max_diff(got, want) <= 1e-5


@pytest.mark.parametrize(
    "frames",
    [VIDEO, list(VIDEO), [Image.fromarray(f) for f in VIDEO[:5]]],
    ids=["array", "list", "pil_5_frames"],
)
def test_video_processor_matches(ours, ref, frames):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours[1].preprocess_videos([frames])["pixel_values_videos"]
    want = ref[0].video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]
    assert got.shape == want.shape and max_diff(got, want) <= 1e-5


def test_processor_batch_matches(ours, ref):
    texts = [
        ours[1].apply_chat_template(user("image")),
        ours[1].apply_chat_template(user("video", "image", text="Compare them, please.")),
    ]
    imgs = [image("photo"), image("portrait", 1)]
    got = ours[1](text=texts, images=imgs, videos=[VIDEO])
    want = tiny.reference_inputs(ref[0], text=texts, images=imgs, videos=[VIDEO])
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert max_diff(got[k], want[k]) <= 1e-5, k


CHATS = {
    "image": user("image"),
    "video": user("video", text="Why is this video funny?"),
    "image_and_video": user("video", "image"),
    "multi_turn": user("image")
    + [
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]},
    ],
    "system": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + user("image"),
    "empty_system": [{"role": "system", "content": ""}] + user("image"),  # --system ""
    "string_content": [{"role": "user", "content": "Hello"}],
}


@pytest.mark.parametrize("name", list(CHATS))
def test_chat_template_matches_jinja(ours, name):
    source = (DATA / "chat_template.jinja").read_text()
    source = source.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )  # training-mask markers
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


def test_prompt_starts_with_bos(ours):
    proc = ours[1]
    ids = proc(text="USER: <image>\nHi ASSISTANT:", images=[image("photo")])["input_ids"][0].tolist()
    first = ids.index(proc.image_token_id)
    assert ids[0] == proc.bos_token_id and ids[first : first + 16] == [proc.image_token_id] * 16
    assert proc.decode(ids) == "USER: \nHi ASSISTANT:"  # the placeholders are special: skipped


def test_short_video_file_repeats_frames(ours, tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    import make_video

    make_video.write_video(tmp_path / "three.mp4", VIDEO[:3])
    v = ours[1].load_video(str(tmp_path / "three.mp4"))
    assert v.indices == [0, 0, 0, 1, 1, 1, 2, 2] and v.frames.shape[0] == 8  # as the reference sampling
    four = ours[1].load_video(str(tmp_path / "three.mp4"), num_frames=4)
    with pytest.warns(UserWarning, match="a video of 4 frames: Video-LLaVA was trained on 8"):
        ours[1].preprocess_videos([four.frames])


# ---------------------------------------------------------------------------------------------------------
# Model


LOGIT_CASES = {"image": (("image",), ["photo"], []), "video": (("video",), [], [VIDEO])}
LOGIT_CASES["image_and_video"] = (("image", "video"), ["very_wide"], [VIDEO])
LOGIT_CASES["two_images"] = (("image", "image"), ["portrait", "tiny"], [])


def case_inputs(proc, hproc, name):
    items, names, vids = LOGIT_CASES[name]
    text = proc.apply_chat_template(user(*items))
    imgs = [image(n, i) for i, n in enumerate(names)]
    hf = tiny.reference_inputs(hproc, text=[text], images=imgs or None, videos=vids or None)
    return proc(text=text, images=imgs or None, videos=vids or None), hf


@pytest.mark.parametrize("name", list(LOGIT_CASES))
def test_logits_match(ours, ref, name):
    got, want = case_inputs(ours[1], ref[0], name)
    with torch.no_grad():
        assert max_diff(ours[0](**got), ref[1](**want).logits) <= 1e-4


def test_logits_match_published_layout(dirs, ref):
    model, proc = vl.load(dirs["hub"])
    got, want = case_inputs(proc, ref[0], "image_and_video")
    with torch.no_grad():
        assert max_diff(model(**got), ref[1](**want).logits) <= 1e-4
        assert (
            max_diff(model(**dict(got, pixel_values=got.pop("pixel_values_images"))), ref[1](**want).logits)
            <= 1e-4
        )


def test_towers_are_separate(ours):
    model = ours[0]
    a, b = (
        model.image_tower.encoder["layers"][0].mlp.fc1.weight,
        model.video_tower.encoder["layers"][0].mlp.fc1.weight,
    )
    assert a.data_ptr() != b.data_ptr() and not torch.equal(a, b)


@pytest.mark.parametrize("name", ["image", "image_and_video"])
def test_greedy_generation_matches(ours, ref, name):
    from transformers import GenerationConfig

    got, want = case_inputs(ours[1], ref[0], name)
    ids = ours[0].generate(**got, max_new_tokens=16, eos_token_ids=[])
    cfg = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    want_ids = ref[1].generate(**want, generation_config=cfg)[:, want["input_ids"].shape[1] :]
    assert ids.tolist() == want_ids.tolist()
    assert len(set(ids[0].tolist())) > 3  # the tiny model does not just repeat one token


def test_batch_equals_one_by_one(ours):
    model, proc = ours
    rows = [(user(text="Tell me a story."), [], []), (user("image"), [image("photo")], [])]
    rows += [(user("video", "image", text="Compare."), [image("very_wide", 2)], [VIDEO])]
    tiny.assert_batch_equals_one_by_one(
        model, proc, [(proc.apply_chat_template(m), i, v) for m, i, v in rows]
    )


def test_cache_equals_full_forward(ours, monkeypatch):
    """Logits of every cached decode step equal the full no-cache forward over prompt + generated tokens."""
    model, proc = ours
    texts = [
        proc.apply_chat_template(user("image")),
        proc.apply_chat_template(user("video", text="Why, and how?")),
    ]
    inputs = proc(text=texts, images=[image("photo")], videos=[VIDEO])
    diffs = tiny.cache_vs_full_forward(model, inputs, monkeypatch)
    assert max(diffs) <= 1e-4, diffs


def test_real_config_shapes():
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    mine, theirs = tiny.real_config_pair(
        DATA / "Video-LLaVA-7B-hf.config.json",
        vl.VideoLlava,
        vl.config_from_hf,
        VideoLlavaForConditionalGeneration,
        VideoLlavaConfig,
    )
    tiny.assert_same_parameters(mine, theirs, vl.rename, unused="post_layernorm")
    tc = mine.cfg.text_config
    assert (tc.rms_norm_eps, tc.num_key_value_heads, mine.cfg.vision_config.num_hidden_layers) == (
        1e-5,
        32,
        24,
    )


# ---------------------------------------------------------------------------------------------------------
# Command line and bad input


def test_cli_streams_the_generated_text(dirs, ours, tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    import make_video

    make_video.write_video(tmp_path / "clip.mp4", VIDEO)
    args = [
        "--model",
        str(dirs["hub"]),
        "--video",
        str(tmp_path / "clip.mp4"),
        "--prompt",
        "Why is this video funny?",
    ]
    stdout, summary = tiny.run_cli("video_llava.py", *args, "--max-new-tokens", "12")
    model, proc = ours
    frames = proc.load_video(str(tmp_path / "clip.mp4")).frames
    inputs = proc(
        text=proc.apply_chat_template(user("video", text="Why is this video funny?")), videos=[frames]
    )
    ids = model.generate(**inputs, max_new_tokens=12)
    assert stdout == proc.decode(ids[0]) + "\n"
    assert summary["visual_tokens"] == 8 * 17


def test_bad_inputs(dirs, ours, tmp_path):
    model, proc = ours
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 10)
    with pytest.raises(ValueError, match="not a readable video|no video frames"):
        proc(text="<video>", videos=[str(tmp_path / "corrupt.mp4")])
    with pytest.raises(ValueError, match="zero frames"):
        proc.preprocess_videos([np.zeros((0, 64, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="2 <image> placeholder\\(s\\) but 1 were given"):
        proc(text="<image> and <image>", images=[image("photo")])
    inputs = proc(text="<video>", videos=[VIDEO])
    with pytest.raises(ValueError, match="136 <video> tokens but the videos give 68"):
        model(**dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][:, :4]))
