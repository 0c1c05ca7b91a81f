"""owl_jax.load / Owl.chat / generate / logits / score, and the `python -m owl_jax.generate` CLI."""
import dataclasses
import io

import jax
import numpy as np
import pytest
from PIL import Image

import owl_jax
from conftest import small_owl_config
from owl_jax import generate as generate_cli
from owl_jax.data.conversation import SYSTEM_PROMPT
from owl_jax.data.text import encode_conversation, encode_prompt
from owl_jax.data.tokenizer import train_tokenizer
from owl_jax.params_io import save_params
from test_generate import random_params

QUESTIONS = ["What is in the image?", "What colour is the circle?", "Which one is bigger?", "Describe it."]
ANSWERS = ["A red circle and a blue square.", "The circle is red.", "The square is bigger.", "Two shapes."]


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    """A params dir with a tokenizer beside the params (vocab <= the model's 384)."""
    d = tmp_path_factory.mktemp("owl")
    cfg = small_owl_config()
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=384))
    save_params(str(d), random_params(cfg, seed=7), cfg)
    train_tokenizer([SYSTEM_PROMPT] + QUESTIONS + ANSWERS, str(d), vocab_size=384)
    return str(d)


@pytest.fixture(scope="module")
def owl(owl_dir):
    return owl_jax.load(owl_dir)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    jpg, png = d / "a.jpg", d / "b.jpg"  # b.jpg holds a PNG (as OwlEval's 49.jpg)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(jpg, format="JPEG")
    Image.fromarray(rng.integers(0, 255, (64, 48, 4), dtype=np.uint8), "RGBA").save(png, format="PNG")
    return str(jpg), str(png)


def test_prompt_follows_the_released_template(owl):
    text = owl.prompt_text(2, [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                               {"role": "user", "content": "Q2"}])
    assert text == SYSTEM_PROMPT + "\nHuman: <image>\nHuman: <image>\nHuman: Q1\nAI: A1\nHuman: Q2\nAI: "
    assert owl.prompt_text(0, ["Q1", "A1", "Q2"]) == SYSTEM_PROMPT + "\nHuman: Q1\nAI: A1\nHuman: Q2\nAI: "
    ids = owl.encode(text)
    assert ids[0] == 1 and (ids == -1).sum() == 2 * owl.cfg.tokens_per_image
    assert 2 not in ids.tolist()  # the released processor tokenises the text as it is: no EOS after A1
    owl.prompt_tokenization = "training"
    try:
        assert owl.encode(text).tolist().count(2) == 1  # in training chunks the earlier answer ends with EOS
    finally:
        owl.prompt_tokenization = "release"
    with pytest.raises(ValueError):
        owl.prompt_text(0, ["Q1", "A1"])  # must end with a question


def test_chat_and_batched_generate_agree(owl, image_files):
    jpg, png = image_files
    kw = dict(max_new_tokens=6)
    single = owl.chat(images=[jpg], messages=QUESTIONS[0], **kw)
    assert isinstance(single, str)
    assert owl.chat(images=Image.open(jpg), messages=QUESTIONS[0], **kw) == single  # PIL image, not a list
    multi = [{"role": "user", "content": QUESTIONS[2]}, {"role": "assistant", "content": ANSWERS[2]},
             {"role": "user", "content": QUESTIONS[3]}]
    requests = [
        {"images": [jpg, png], "messages": multi},  # two images (one a PNG named .jpg), multi-turn
        {"images": [jpg], "messages": QUESTIONS[0]},
        {"messages": [QUESTIONS[1]]},  # text only
    ]
    batched = owl.generate(requests, batch_size=4, **kw)
    assert batched[1] == single
    assert batched == [owl.chat(images=r.get("images"), messages=r["messages"], **kw) for r in requests]


def test_score_ranks_like_summed_log_probs_of_a_full_forward(owl, image_files):
    jpg, _ = image_files
    candidates = ANSWERS + ["red", "A dog."]
    scores = owl.score([jpg], QUESTIONS[0], candidates)
    # The same numbers from raw logits, one candidate at a time.
    pixels = np.stack(owl.images([jpg]))
    prompt_ids = owl.encode(owl.prompt_text(1, QUESTIONS[0]))
    prompt_len = len(prompt_ids)
    expected = []
    for cand in candidates:
        text = owl.prompt_text(1, QUESTIONS[0]) + cand  # the candidate is the answer chunk, as in training
        answer = encode_conversation(text, owl.tokenizer, 1 << 20, owl.cfg.tokens_per_image, answer_eos=False).ids[
            len(encode_prompt(text[:-len(cand)], owl.tokenizer, owl.cfg.tokens_per_image, "training")):]
        ids = np.concatenate([prompt_ids, answer])
        padded, mask = np.zeros((1, 128), np.int32), np.zeros((1, 128), bool)  # one shape: one compilation
        padded[0, :len(ids)], mask[0, :len(ids)] = ids, True
        logits = owl.logits(padded, pixels, np.array([1]), mask)[0]
        logp = jax.nn.log_softmax(logits.astype(np.float64), axis=-1)
        expected.append(sum(float(logp[t - 1, ids[t]]) for t in range(prompt_len, len(ids))))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-4)
    assert np.argsort(scores).tolist() == np.argsort(expected).tolist()
    with_eos = owl.score([jpg], QUESTIONS[0], candidates, include_eos=True)
    assert (with_eos < scores).all()  # one more (negative) log-probability each


def test_cli_streams_one_turn_and_chats_interactively(owl_dir, owl, image_files):
    jpg, png = image_files
    base = ["--checkpoint", owl_dir, "--image", jpg, "--image", png, "--max-new-tokens", "6", "--chunk", "2"]
    out = io.StringIO()
    assert generate_cli.main(base + ["--prompt", QUESTIONS[0]], stdout=out) == 0
    first = owl.chat(images=[jpg, png], messages=QUESTIONS[0], max_new_tokens=6)
    assert out.getvalue() == "AI: " + first + "\n"

    out = io.StringIO()
    assert generate_cli.main(base + ["--interactive"], stdin=io.StringIO(f"{QUESTIONS[0]}\n{QUESTIONS[1]}\n"), stdout=out) == 0
    second = owl.chat(images=[jpg, png], messages=[QUESTIONS[0], first, QUESTIONS[1]], max_new_tokens=6)
    assert out.getvalue() == f"Human: AI: {first}\nHuman: AI: {second}\nHuman: "


def test_logits_run_on_the_generators_weights_and_match_the_training_layout(owl_dir, owl):
    """One copy of the weights (the decode layout the generator uses), same logits as the
    checkpoint's training layout through a plain MplugOwl."""
    from owl_jax.api import _forward
    from owl_jax.models.owl import is_decode_layout
    from owl_jax.params_io import load_params

    assert owl.params is owl.generator.params and is_decode_layout(owl.params)
    params, cfg = load_params(owl_dir)
    assert not is_decode_layout(params)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 300, (2, 20)).astype(np.int32)
    mask = np.ones((2, 20), bool)
    mask[1, :5] = False  # left padding
    expected = np.asarray(_forward(params, ids, None, np.zeros((2,), np.int32), mask, cfg=cfg))
    np.testing.assert_allclose(owl.logits(ids, None, None, mask), expected, atol=1e-5)
