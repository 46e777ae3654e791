"""PerceptionLM against transformers 5.23 (and its vision tower against timm 1.0.31) on tiny random
checkpoints (fp32, CPU). The tiny model has 56 px tiles (4 x 4 patches, 4 tokens per tile after the 2x2
pooling) and at most 6 tiles per image; a second tiny checkpoint has the class-token-free tower of PLM-8B."""

from dataclasses import replace
from pathlib import Path

import jinja2
import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from tiny import max_diff, user

import perception_lm as plm

DATA = Path(__file__).parent / "data" / "perception_lm"


@pytest.fixture(scope="module")
def dirs(tiny_root):
    return tiny.build_perception_lm(tiny_root)


@pytest.fixture(scope="module")
def ref(dirs):
    from transformers import AutoProcessor, PerceptionLMForConditionalGeneration

    return AutoProcessor.from_pretrained(dirs["hf5"]), PerceptionLMForConditionalGeneration.from_pretrained(
        dirs["hf5"]
    ).eval()


@pytest.fixture(scope="module")
def ours(dirs):
    return plm.load(dirs["hf5"])


IMAGE_SIZES = {"photo": (100, 140), "square": (56, 56), "wide": (40, 300), "tall": (260, 50), "tiny": (9, 13)}
IMAGE_SIZES["big"] = (500, 380)  # larger than every canvas of 6 tiles: the closest-ratio branch


def image(name, seed=0):
    return Image.fromarray(tiny.synthetic_image(*IMAGE_SIZES[name], seed))


VIDEO = tiny.synthetic_video(4, 70, 90, seed=3)


# ---------------------------------------------------------------------------------------------------------
# Vision tower against timm


@pytest.mark.parametrize("cls_token", [True, False], ids=["pe_core_L", "pe_core_G_no_cls"])
def test_vision_tower_matches_timm(tiny_root, cls_token):
    """Our Perception Encoder, loaded from the checkpoint, against timm's Eva with the same weights."""
    dirs = tiny.build_perception_lm(tiny_root, cls_token=cls_token)
    model, _ = plm.load(dirs["hub"])
    from transformers import PerceptionLMForConditionalGeneration

    timm_model = PerceptionLMForConditionalGeneration.from_pretrained(
        dirs["hf5"]
    ).model.vision_tower.timm_model
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model.vision_tower(x), timm_model.eval().forward_features(x)
    assert got.shape == want.shape == (3, 16 + cls_token, 64)
    assert max_diff(got, want) <= 1e-5
    assert model.cfg.vision_config.class_token == cls_token


def test_rope_layout():
    """x (column) frequencies first, then y (row); 1-based with a class token; each angle twice in a row."""
    cfg = plm.VisionConfig(embed_dim=64, num_heads=4, image_size=56, patch_size=14, ref_feat_shape=(4, 4))
    a = plm.pe_rope_angles(cfg)  # (16, 16): 4 bands per axis, doubled
    bands = 1.0 / 10000 ** (torch.arange(4) / 4)
    row, col = 2, 3
    want = torch.cat([(col + 1) * bands, (row + 1) * bands]).repeat_interleave(2)
    assert torch.allclose(a[row * 4 + col], want)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing and prompt


def test_tile_grids_match_reference(ref):
    proc = ref[0].image_processor
    sizes = [
        (640, 480),
        (448, 448),
        (1024, 768),
        (1920, 1080),
        (300, 2000),
        (4000, 3000),
        (100, 100),
        (333, 50),
    ]
    for W, H in sizes:
        for n in (36, 6, 1):
            proc.max_num_tiles = n
            want = proc._fit_image_to_canvas(W, H, 448) or proc._find_closest_aspect_ratio(W, H, 448)
            assert plm.choose_tile_grid(W, H, 448, n) == tuple(want), (W, H, n)
    proc.max_num_tiles = 6
    assert plm.choose_tile_grid(640, 480, 448, 36) == (7, 5)  # the spec's measured values
    assert plm.choose_tile_grid(4000, 3000, 448, 36) == (4, 3)


@pytest.mark.parametrize("name", list(IMAGE_SIZES))
def test_processor_matches(ours, ref, name):
    text = ours[1].apply_chat_template(user("image"))
    got = ours[1](text=text, images=[image(name)])
    want = tiny.reference_inputs(ref[0], text=[text], images=[image(name)])
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert max_diff(got[k], want[k]) <= 1e-5, k


def test_single_tile_mode_matches(ours, ref):
    """vision_input_type other than thumb+tile: one squashed tile per image."""
    proc = ours[1]
    single = plm.Processor(proc.tokenizer, replace(proc.image, thumb_and_tiles=False), proc.video, 14, 2)
    got = single(text="<|image|>", images=[image("photo")])
    want = ref[0].image_processor(images=[image("photo")], vision_input_type="vanilla", return_tensors="pt")
    assert got["pixel_values"].shape == want["pixel_values"].shape == (1, 1, 3, 56, 56)
    assert max_diff(got["pixel_values"], want["pixel_values"]) <= 1e-5
    assert int((got["input_ids"] == proc.image_token_id).sum()) == 4


def test_video_processor_matches(ours, ref):
    for frames in (VIDEO, list(VIDEO[:3]), [Image.fromarray(f) for f in VIDEO]):
        got = ours[1].preprocess_videos([frames])["pixel_values_videos"]
        want = ref[0].video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]
        assert got.shape == want.shape and max_diff(got, want) <= 1e-5


CHATS = {
    "image": user("image"),
    "video": user("video", text="  Why is this funny?  "),
    "image_and_video": user("video", "image"),
    "system": [{"role": "system", "content": " Be brief. "}] + user("image"),
    "empty_system": [{"role": "system", "content": ""}] + user("image"),  # --system ""
    "multi_turn": user("image")
    + [
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
    ],
}


@pytest.mark.parametrize("name", list(CHATS))
def test_chat_template_matches_jinja(ours, name):
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        (DATA / "chat_template.jinja").read_text()
    )
    for gen in (True, False):
        want = template.render(messages=CHATS[name], add_generation_prompt=gen, bos_token="<|begin_of_text|>")
        assert ours[1].apply_chat_template(CHATS[name], gen) == want


# ---------------------------------------------------------------------------------------------------------
# Model


LOGIT_CASES = {"image_with_tiles": (("image",), ["photo"], []), "video": (("video",), [], [VIDEO])}
LOGIT_CASES["text_only"] = ((), [], [])
LOGIT_CASES["image_and_video"] = (("image", "video"), ["wide"], [VIDEO])


def case_inputs(proc, hproc, name):
    items, names, vids = LOGIT_CASES[name]
    text = proc.apply_chat_template(user(*items))
    imgs = [image(n, i) for i, n in enumerate(names)]
    hf = tiny.reference_inputs(hproc, text=[text], images=imgs or None, videos=vids or None)
    return proc(text=text, images=imgs or None, videos=vids or None), hf


@pytest.mark.parametrize("name", list(LOGIT_CASES))
def test_logits_match(ours, ref, name):
    got, want = case_inputs(ours[1], ref[0], name)
    if name == "image_with_tiles":
        assert got["pixel_values"].shape[1] > 2  # a thumbnail and several tiles
    with torch.no_grad():
        assert max_diff(ours[0](**got), ref[1](**want).logits) <= 1e-4


def test_logits_match_published_layout(dirs, ref):
    model, proc = plm.load(dirs["hub"])
    got, want = case_inputs(proc, ref[0], "image_and_video")
    with torch.no_grad():
        assert max_diff(model(**got), ref[1](**want).logits) <= 1e-4


@pytest.mark.parametrize("name", ["image_with_tiles", "video"])
def test_greedy_generation_matches(ours, ref, name):
    from transformers import GenerationConfig

    got, want = case_inputs(ours[1], ref[0], name)
    ids = ours[0].generate(**got, max_new_tokens=16, eos_token_ids=[])
    cfg = GenerationConfig(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    want_ids = ref[1].generate(**want, generation_config=cfg)[:, want["input_ids"].shape[1] :]
    assert ids.tolist() == want_ids.tolist()
    assert len(set(ids[0].tolist())) > 3  # the tiny model does not just repeat one token


def test_batch_equals_one_by_one(ours):
    model, proc = ours
    rows = [(user(text="Tell me a story."), [], []), (user("image"), [image("photo")], [])]
    rows += [(user("video", "image", text="Compare."), [image("square", 2)], [VIDEO])]
    texts = [proc.apply_chat_template(m) for m, _, _ in rows]
    imgs = [image("photo"), image("square", 2)]
    with pytest.raises(ValueError, match="same number of tiles"):  # 100x140 and 56x56 tile differently
        proc(text=texts, images=imgs, videos=[VIDEO])
    rows[2] = (rows[2][0], [image("photo", 2)], [VIDEO])
    tiny.assert_batch_equals_one_by_one(model, proc, [(t, i, v) for t, (_, i, v) in zip(texts, rows)])


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


@pytest.mark.parametrize("name", ["Perception-LM-1B", "Perception-LM-3B", "Perception-LM-8B"])
def test_real_config_shapes(name):
    from transformers import PerceptionLMConfig, PerceptionLMForConditionalGeneration

    mine, theirs = tiny.real_config_pair(
        DATA / f"{name}.config.json",
        plm.PerceptionLM,
        plm.config_from_hf,
        PerceptionLMForConditionalGeneration,
        PerceptionLMConfig,
    )
    tiny.assert_same_parameters(mine, theirs, plm.rename)


def test_llama3_rope_matches_reference(ours, ref):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    want, _ = ROPE_INIT_FUNCTIONS["llama3"](ref[1].config.text_config, "cpu")
    got = plm.llama3_inv_freq(ours[0].cfg.text_config)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    plain = plm.llama3_inv_freq(replace(ours[0].cfg.text_config, rope_scaling=None))
    assert not torch.allclose(got, plain)  # the tiny config's original length of 64 makes the scaling bite


# ---------------------------------------------------------------------------------------------------------
# Command line and bad input


def test_cli_streams_the_generated_text(dirs, ours, tmp_path):
    path = tmp_path / "photo.png"
    image("photo").save(path)
    args = ["--model", str(dirs["hub"]), "--image", str(path), "--prompt", "Describe this image."]
    stdout, summary = tiny.run_cli("perception_lm.py", *args, "--max-new-tokens", "12")
    model, proc = ours
    inputs = proc(
        text=proc.apply_chat_template(user("image", text="Describe this image.")), images=[Image.open(path)]
    )
    ids = model.generate(**inputs, max_new_tokens=12)
    assert stdout == proc.decode(ids[0]) + "\n"
    assert summary["visual_tokens"] == inputs["pixel_values"].shape[1] * 4


def test_bad_inputs(dirs, ours, tmp_path):
    model, proc = ours
    with pytest.raises(ValueError, match="zero frames"):
        proc.preprocess_videos([np.zeros((0, 64, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="2 <\\|image\\|> placeholder\\(s\\) but 1 were given"):
        proc(text="<|image|> and <|image|>", images=[image("photo")])
    inputs = proc(text="<|video|>", videos=[VIDEO])
    with pytest.raises(ValueError, match="16 <\\|video\\|> tokens but the videos give 8"):
        model(**dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][:, :2]))
