"""common.Chat (a conversation on a kept KV cache) and paligemma.Chat (kept vision features): every turn's
greedy tokens equal generate() run from scratch on the conversation's tokens, on the tiny fp32 checkpoints."""

import importlib

import pytest
import tiny
import torch
from PIL import Image

import common

CHAT_FILES = ["qwen2_vl", "llava_onevision", "video_llava", "perception_lm"]
N = 6  # new tokens per turn
END_OF_TURN = {"qwen2_vl": "<|im_end|>", "llava_onevision": "<|im_end|>", "perception_lm": "<|eot_id|>"}


def picture(h, w, seed):
    return Image.fromarray(tiny.synthetic_image(h, w, seed))


# Turn 1: an image; turn 2: text only; turn 3: a second image (Qwen2-VL: its 3-D positions start where the
# text left off) or a video.
TURNS = [("What is in it?", [picture(60, 90, 1)], []), ("And the colour?", [], [])]
THIRD = {
    "qwen2_vl": ("Compare it with this one.", [picture(70, 50, 2)], []),
    "llava_onevision": ("And this video?", [], [tiny.synthetic_video(3, 40, 60, seed=3)]),
    "video_llava": ("And this video?", [], [tiny.synthetic_video(8, 70, 90, seed=3)]),
    "perception_lm": ("And this video?", [], [tiny.synthetic_video(4, 70, 90, seed=3)]),
}


@pytest.fixture(scope="module")
def loaded(hub_checkpoint):
    cache = {}

    def get(file):
        if file not in cache:
            m = importlib.import_module(file)
            cache[file] = (m, *m.load(hub_checkpoint(file), dtype="float32"))
        return cache[file]

    return get


def media_of(m, proc, images, videos) -> dict:
    """The processor tensors of all the conversation's images and videos (each processed as in its turn)."""
    if not images and not videos:
        return {}
    image, video = (m.IMAGE_PAD, m.VIDEO_PAD) if m.__name__ == "qwen2_vl" else (m.IMAGE_TOKEN, m.VIDEO_TOKEN)
    text = "".join([image] * len(images) + [video] * len(videos))
    out = proc(text=text, images=images or None, videos=videos or None)
    return {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}


@pytest.mark.parametrize("file", CHAT_FILES)
def test_every_turn_equals_generate_from_scratch(file, loaded, monkeypatch):
    """Each turn's greedy tokens equal generate() on the conversation's tokens, and the logits the turn's
    prefill gives (on the kept cache) equal the full forward pass's at the last prompt token."""
    m, model, proc = loaded(file)
    chat = common.Chat(model, proc)
    firsts, extend = [], model.extend

    def recorded(*args):
        first, step = extend(*args)
        firsts.append(first)
        return first, step

    monkeypatch.setattr(model, "extend", recorded)
    images, videos, lengths = [], [], []
    for text, new_images, new_videos in TURNS + [THIRD[file]]:
        answer = chat.ask(text, images=new_images, videos=new_videos, max_new_tokens=N, eos_token_ids=[])
        images, videos = images + new_images, videos + new_videos
        prompt, got, media = chat.input_ids[:, :-N], chat.input_ids[:, -N:], media_of(m, proc, images, videos)
        want = model.generate(prompt, **media, max_new_tokens=N, eos_token_ids=[])
        assert got.tolist() == want.tolist(), f"turn {len(lengths) + 1}"
        assert answer == proc.decode(want[0])
        with torch.no_grad():
            full = model(prompt, **media)[:, -1]  # (1, V)
        assert tiny.max_diff(firsts[-1], full) <= 1e-4
        lengths.append(chat.input_ids.shape[1])
    # each turn added only its own tokens; the cache holds all but the last answer's last token
    assert chat.past.length == lengths[-1] - 1
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 3
    assert chat.messages[-1]["content"] == answer


def test_the_vision_tower_runs_on_a_turn_s_new_media_only(loaded):
    m, model, proc = loaded("qwen2_vl")
    runs = []
    hook = model.visual.register_forward_hook(lambda mod, args, out: runs.append(args[0].shape[0]))
    try:
        chat = common.Chat(model, proc)
        for text, images, videos in TURNS + [THIRD["qwen2_vl"]]:
            chat.ask(text, images=images, videos=videos, max_new_tokens=2)
    finally:
        hook.remove()
    assert len(runs) == 2  # turn 1's image, turn 3's image; nothing in the text-only turn


@pytest.mark.parametrize("file", CHAT_FILES)
def test_an_answer_ended_at_eos_leaves_the_template_s_end_of_turn_once(file, loaded):
    """The model is made to answer with its first EOS id at once: the conversation then holds the
    template's end-of-turn token once per message (not the EOS and the template's token), and the next turn
    still equals a run from scratch."""
    m, model, proc = loaded(file)
    eos = model.eos_token_ids[0]
    hook = model.lm_head.register_forward_hook(
        lambda mod, args, out: out.index_add(-1, torch.tensor([eos]), 100 + 0 * out[..., :1])
    )
    try:
        chat = common.Chat(model, proc, system="Be brief.")
        assert chat.ask("Hi", images=TURNS[0][1], max_new_tokens=N) == ""
        pieces = []  # streamed: the loop stops at the EOS before feeding it (the command line's path)
        assert chat.ask("Again", max_new_tokens=N, streamer=pieces.append) == "" and pieces == []
    finally:
        hook.remove()
    ids = chat.input_ids[0].tolist()
    if file in END_OF_TURN:  # system, user, assistant, user: the last answer's comes with the next turn
        assert ids.count(proc.tokenizer.token_id(END_OF_TURN[file])) == 4
    else:  # Video-LLaVA's template ends an answer with a space, not </s>
        assert eos not in ids
    if file in ("qwen2_vl", "perception_lm"):  # with empty answers: the tokens of the template's whole render
        # (LLaVA-OneVision's template writes "assistant \n" in a past turn, "assistant\n" to generate)
        whole = proc(text=proc.apply_chat_template(chat.messages[:-1]), images=TURNS[0][1])["input_ids"]
        assert ids == whole[0].tolist()
    answer = chat.ask("Once more", max_new_tokens=N, eos_token_ids=[])
    want = model.generate(
        chat.input_ids[:, :-N], **media_of(m, proc, TURNS[0][1], []), max_new_tokens=N, eos_token_ids=[]
    )
    assert answer == proc.decode(want[0])
    assert chat.input_ids[0, -N:].tolist() == want[0].tolist()


def test_an_interrupted_turn_leaves_the_conversation_as_it_was(loaded):
    """Ctrl-C in a turn with a new image (whose M-RoPE delta the prefill already took): the conversation, its
    cache length and position delta are as before, and the next turn equals a run from scratch."""
    m, model, proc = loaded("qwen2_vl")
    chat = common.Chat(model, proc)
    chat.ask("What is it?", images=TURNS[0][1], max_new_tokens=N, eos_token_ids=[])
    before = (chat.input_ids.tolist(), list(chat.messages), chat.past.length, chat.past.delta)

    def stop(piece):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chat.ask("And this?", images=[picture(70, 50, 2)], streamer=stop, max_new_tokens=N, eos_token_ids=[])
    assert (chat.input_ids.tolist(), chat.messages, chat.past.length, chat.past.delta) == before
    chat.ask("And the colour?", max_new_tokens=N, eos_token_ids=[])
    media = media_of(m, proc, TURNS[0][1], [])
    want = model.generate(chat.input_ids[:, :-N], **media, max_new_tokens=N, eos_token_ids=[])
    assert chat.input_ids[0, -N:].tolist() == want[0].tolist()


def test_the_cache_grows_and_keeps_what_it_holds(loaded):
    """Caches are allocated with room (a multiple of 256) and copied into twice the length when a turn
    does not fit; the answers after the copy still equal a run from scratch."""
    m, model, proc = loaded("qwen2_vl")
    chat = common.Chat(model, proc)
    chat.ask("Hi", max_new_tokens=N, eos_token_ids=[])
    first = chat.past.caches[0].k.shape[2]
    assert first == 256
    long = " ".join(["word"] * 60)
    answer = chat.ask(long, max_new_tokens=N, eos_token_ids=[])
    need = chat.input_ids.shape[1]  # the prompt and N new tokens
    assert need > 256 and chat.past.caches[0].k.shape[2] == max(512, -(-need // 256) * 256)
    want = model.generate(chat.input_ids[:, :-N], max_new_tokens=N, eos_token_ids=[])
    assert answer == proc.decode(want[0])


def test_reset_and_settings(loaded):
    m, model, proc = loaded("qwen2_vl")
    chat = common.Chat(model, proc)
    a = chat.ask("Hi", max_new_tokens=N, eos_token_ids=[], temperature=0.8, seed=3)
    chat.reset()
    assert chat.messages == [] and chat.input_ids.shape == (1, 0) and chat.past.length == 0
    assert chat.ask("Hi", max_new_tokens=N, eos_token_ids=[], temperature=0.8, seed=3) == a
    pieces = []
    chat.ask("Go on", max_new_tokens=N, eos_token_ids=[], streamer=pieces.append)
    assert "".join(pieces) == chat.messages[-1]["content"]
    before = chat.input_ids.clone()
    with pytest.raises(ValueError, match="temperature"):
        chat.ask("Hi", temperature=-1)
    assert torch.equal(chat.input_ids, before) and len(chat.messages) == 4


def test_paligemma_keeps_the_image_features_not_the_cache(loaded):
    """A second task prefix on the same image equals a fresh run, and the vision tower ran once."""
    m, model, proc = loaded("paligemma")
    runs = []
    hook = model.vision_tower.register_forward_hook(lambda *args: runs.append(1))
    try:
        chat = m.Chat(model, proc)
        image = picture(60, 90, 1)
        answers = [
            chat.ask(p, images=[image] if i == 0 else (), max_new_tokens=N, eos_token_ids=[])
            for i, p in enumerate(["caption en", "detect square", "answer en what colour?"])
        ]
        assert len(runs) == 1
        chat.ask("caption en", images=[picture(50, 50, 2)], max_new_tokens=N)  # a new image: the tower runs
        assert len(runs) == 2
    finally:
        hook.remove()
    for prefix, answer in zip(["caption en", "detect square", "answer en what colour?"], answers):
        want = model.generate(**proc(prefix, images=[image]), max_new_tokens=N, eos_token_ids=[])
        assert answer == proc.decode(want[0])
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 4
    with pytest.raises(ValueError, match="not videos"):
        chat.ask("caption en", videos=[tiny.synthetic_video(2, 20, 20)])
    chat.reset()
    with pytest.raises(ValueError, match="needs an image"):
        chat.ask("caption en")
    with pytest.raises(ValueError, match="system"):
        m.Chat(model, proc, system="Be brief.")
