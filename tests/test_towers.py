"""The pretrained towers (python -m owl_jax.demo.towers): the command CI-sized, the committed towers
against their recorded figures, and the pieces (the SigLIP loss, twins, probes, the tokenizer)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import subprocess_env

PRETRAINED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "owl_jax", "demo",
                          "pretrained")


def _one_device_env():
    env = subprocess_env()
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform" not in f)
    return env


def test_towers_command_quick(tmp_path):
    """The command as a user types it (relative workdir), CI-sized: both towers train (their losses
    fall), are probed and evaluated, and come out as one owl params dir that stage 1 can start from."""
    from owl_jax.demo import tiny
    from owl_jax.params_io import load_params

    proc = subprocess.run([sys.executable, "-m", "owl_jax.demo.towers", "--workdir=towers", "--quick"], cwd=tmp_path,
                          env=_one_device_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = tmp_path / "towers" / "pretrained"
    params, cfg = load_params(str(out))
    assert set(params) == {"vision_model", "language_model"}  # the abstractor is stage 1's to make
    assert cfg.llm.hidden_size < tiny.get_config().model.llm.hidden_size  # --quick's smaller owl
    record = json.load(open(out / "towers.json"))
    assert record["llm"]["accuracy"]["all"]["total"] == 32
    assert len(record["llm"]["answers"]) == 32
    assert set(record["vit"]["probes"]) == {"colour", "shape", "region", "count", "letters"}
    assert set(record["vit"]["twins"]) == {"shape", "colour", "count", "word"}
    assert all(0 <= v <= 1 for v in record["vit"]["twins"].values())
    siglip_losses = [h[1] for h in record["vit"]["history"]]
    assert siglip_losses[-1] < siglip_losses[0], siglip_losses
    # the drills ran first (20 steps teach no copying: their loss stays at log(vocab)) and the text
    # training started from them
    drills = record["llm"]["drills"]["history"]
    assert [h["step"] for h in drills] == [5, 10, 15, 20] and all(np.isfinite(h["loss"]) for h in drills), drills
    assert "initial params from" in proc.stderr and "llm_drills" in proc.stderr
    llm = [json.loads(line)["loss"] for line in open(tmp_path / "towers" / "llm" / "metrics.jsonl")]
    assert np.mean(llm[-6:]) < np.mean(llm[:6]), llm
    assert os.path.exists(out / "tokenizer" / "tokenizer.model")
    # the whole SigLIP model is kept as plain arrays (no partitioning boxes), as a later probe loads it
    import orbax.checkpoint as ocp

    kept = ocp.StandardCheckpointer().restore(str(tmp_path / "towers" / "vit" / "siglip"))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(kept)]
    assert any("text_model" in p for p in paths) and not any(p.endswith("['value']") for p in paths), paths
    # a rerun finds everything made
    again = subprocess.run([sys.executable, "-m", "owl_jax.demo.towers", "--workdir=towers", "--quick"], cwd=tmp_path,
                           env=_one_device_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "siglip step" not in again.stdout and "== llm" not in again.stdout


@pytest.mark.parametrize("task", ["repeat", "lookup"])
def test_drills_can_only_be_answered_from_the_context(task):
    """repeat: the loss is on a second copy of the segment; lookup: each answer is the query's
    neighbour in the segment (after it for NEXT, before it for PREVIOUS)."""
    from owl_jax.demo import drills

    ids, loss = next(drills.batches(np.random.default_rng(0), 64, 48, 1024, (task,)))
    assert ids.shape == loss.shape == (64, 48) and loss.sum(1).min() > 0
    assert ids[loss == 1].min() >= drills.FIRST_ID and ids.max() < 1024
    for row, mask in zip(ids, loss):
        sep = int(np.argmax(row == drills.SEP))
        segment = list(row[1:sep])
        targets = np.flatnonzero(mask)
        if task == "repeat":
            n = len(segment)
            assert list(row[sep + 1:sep + 1 + n]) == segment and list(targets) == list(range(sep + 2, sep + 1 + n))
            continue
        assert len(set(segment)) == len(segment)  # distinct: every query has one answer
        for t in targets:
            d, q, a = row[t - 2:t + 1]
            i = segment.index(q)
            assert a == segment[i + 1 if d == drills.NEXT else i - 1]
        assert {row[t - 2] for t in targets} <= {drills.NEXT, drills.PREVIOUS}


def test_object_words_are_one_token_each_and_start_as_the_sum_of_their_words(tmp_path):
    """The towers' text tells a scene one token a shape, then the written word: `prepare` adds the
    160 object words to the tokenizer it copies (beside the committed tokenizer's pieces, inside the
    LLM's vocabulary), the training text encodes each as one id, and each object word's embedding
    row starts as the sum of the rows of its colour, shape and region words."""
    import jax.numpy as jnp
    import sentencepiece as spm

    from owl_jax.data.tokenizer import encode_text, load_tokenizer
    from owl_jax.demo import scenes as sw
    from owl_jax.demo.dataset import prepare
    from owl_jax.demo.told_scenes import object_rows

    pieces = len(spm.SentencePieceProcessor(model_file=os.path.join(PRETRAINED, "tokenizer", "tokenizer.model")))
    prepare(str(tmp_path), seed=0, sizes={"instructions_test": 8}, tokenizer=os.path.join(PRETRAINED, "tokenizer"))
    tok = load_tokenizer(str(tmp_path / "tokenizer"))
    vocab = json.load(open(os.path.join(PRETRAINED, "owl_config.json")))["llm"]["vocab_size"]
    assert len(set(sw.OBJECT_WORDS)) == len(sw.COLOURS) * len(sw.SHAPES) * len(sw.REGION_ORDER) == 160
    assert len(tok) == pieces + 160 <= vocab
    encode = lambda s: encode_text(tok, s)  # noqa: E731 - as the pipeline and the evaluation encode

    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sw.sample_scene(rng)
        ids = encode(sw.tell(scene))
        shapes = scene["shapes"]
        assert tok.convert_ids_to_tokens(ids[:len(shapes)]) == [sw.object_word(s) for s in shapes]
        assert min(ids[:len(shapes)]) >= pieces and max(ids[len(shapes):]) < pieces
        if scene["word"]:
            assert sw.tell(scene).endswith(sw.describe(scene).split(". ", 1)[1])

    table = jnp.asarray(np.random.default_rng(1).normal(size=(vocab, 8)), jnp.float32)
    new = np.asarray(object_rows(table, encode))
    red_star_left = encode("<red-star-left>")[0]
    expected = sum(np.asarray(table)[encode(w)].sum(0) for w in ("red", "star", "left"))
    np.testing.assert_allclose(new[red_star_left], expected, rtol=1e-6)
    changed = np.flatnonzero(np.any(new != np.asarray(table), axis=1))
    assert sorted(changed) == sorted(encode("".join(sw.OBJECT_WORDS)))


def test_shuffled_told_scenes_name_the_same_shapes_in_another_order():
    """llm_probe --shuffle_objects: the told scene names every shape once, in a random order; without
    it, in the regions' fixed order (left, top, center, right, bottom), which an answer could lean on."""
    from owl_jax.demo import scenes as sw
    from owl_jax.demo.told_scenes import scene_sample

    rng, order_rng = np.random.default_rng(0), np.random.default_rng(1)
    encode = lambda s: [ord(c) for c in s]  # noqa: E731 - one id a character
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    reordered = 0
    for _ in range(100):
        scene = sw.sample_scene(rng, n_shapes=int(rng.integers(2, 5)), word=False)
        item = {"category": "count", "scenes": [scene], "turns": [("How many shapes are there?", "2")]}
        fixed, shuffled = (decode(scene_sample(item, encode, order_rng=r)[0][1:]).split(" Q:")[0]
                           for r in (None, order_rng))
        assert fixed == sw.describe(scene)
        phrases = lambda text: sorted(text.rstrip(".").replace(" and ", ", ").split(", "))  # noqa: E731
        assert phrases(shuffled.lower()) == phrases(fixed.lower())
        reordered += shuffled != fixed
    assert reordered > 50


# ------------------------------------------------------------------------------------ committed towers


def _committed():
    from owl_jax.params_io import load_params

    params, cfg = load_params(PRETRAINED)
    return params, cfg, json.load(open(os.path.join(PRETRAINED, "towers.json")))


def test_committed_towers_fit_the_main_job_and_are_small():
    from owl_jax.data.tokenizer import load_tokenizer
    from owl_jax.demo import config as job_config
    from owl_jax.models.config import owl_config_from_dict
    from owl_jax.params_io import load_params_for

    _, cfg, _ = _committed()
    job_cfg = owl_config_from_dict(job_config.get_config().model.to_dict())
    assert cfg == job_cfg
    params, fresh = load_params_for(PRETRAINED, job_cfg)  # what stage 1 does
    assert fresh and all(p.startswith(("abstractor/", "query_tokens")) for p in fresh)
    assert len(load_tokenizer(os.path.join(PRETRAINED, "tokenizer"))) <= cfg.llm.vocab_size
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(PRETRAINED) for f in fs)
    assert size < 25e6, size


def test_committed_vit_probes_match_their_record_and_beat_a_random_vit():
    """The probes of towers.json, recomputed with the recorded settings (the same scenes: drawn from
    the seed), within 2 points; and the trained ViT reads shape and count far better than a random
    ViT of the same shape does."""
    from owl_jax.data.tokenizer import load_tokenizer
    from owl_jax.demo import siglip
    from owl_jax.models.vision import VisionEncoder

    params, cfg, record = _committed()
    v = record["settings"]["vit"]
    from owl_jax.demo import config as job_config
    from owl_jax.demo.towers import held_out_caption_keys

    data = siglip.Scenes(load_tokenizer(os.path.join(PRETRAINED, "tokenizer")), cfg.vision.image_size,
                         v["caption_len"], v["seed"], held_out_caption_keys(job_config.get_config()))
    scenes = siglip.probe_scenes(data, v["probe_train"], v["probe_test"])
    probes = siglip.probe_vit(cfg.vision, params["vision_model"], scenes)
    for name, value in record["vit"]["probes"].items():
        assert abs(probes[name] - value) <= 0.02, (name, probes[name], value)
    random = VisionEncoder(cfg.vision).init(jax.random.PRNGKey(v["seed"] + 1), scenes["test"][0][:1])
    random_probes = siglip.probe_vit(cfg.vision, random["params"], scenes)
    for name in ("shape", "count"):
        assert probes[name] > random_probes[name] + 0.1, (name, probes, random_probes)
    for name in ("colour", "region"):
        assert probes[name] >= random_probes[name], (name, probes, random_probes)


def test_committed_llm_answers_as_recorded(tmp_path):
    """The first 64 held-out questions, scenes told as text, answered as towers.json records (greedy;
    another CPU's rounding may flip a near tie, so 60 of 64)."""
    from owl_jax.data.tokenizer import load_tokenizer
    from owl_jax.demo.dataset import iter_test_questions, prepare
    from owl_jax.inference.api import from_params
    from owl_jax.params_io import load_params_for

    _, cfg, record = _committed()
    prepare(str(tmp_path), seed=0, sizes={"instructions_test": len(record["llm"]["answers"])},
            tokenizer=os.path.join(PRETRAINED, "tokenizer"))
    questions = list(iter_test_questions(str(tmp_path), scenes_as_text=True))[:64]
    # The towers hold no abstractor (stage 1 initialises it); the text-only answers never read it.
    params, _ = load_params_for(PRETRAINED, cfg)
    owl = from_params(params, cfg, load_tokenizer(os.path.join(PRETRAINED, "tokenizer")),
                      prompt_tokenization="training")
    got = owl.generate([{"prompt": q["prompt"], "images": []} for q in questions], batch_size=64, max_new_tokens=12)
    recorded = {r["index"]: r["prediction"] for r in record["llm"]["answers"]}
    same = sum(g == recorded[q["index"]] for g, q in zip(got, questions))
    assert same >= 60, (same, list(zip(got, [recorded[q["index"]] for q in questions]))[:10])


# ------------------------------------------------------------------------------------ pieces


def test_sigmoid_loss_prefers_the_matched_pairs():
    from owl_jax.demo.siglip import sigmoid_loss

    matched = np.where(np.eye(4), 5.0, -5.0).astype(np.float32)
    assert float(sigmoid_loss(matched)) < float(sigmoid_loss(-matched))
    # each image: -sum_j log sigmoid(label_ij * logit_ij)
    logits = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    labels = 2 * np.eye(3) - 1
    expected = -np.mean(np.sum(np.log(1 / (1 + np.exp(-labels * logits))), -1))
    np.testing.assert_allclose(float(sigmoid_loss(logits)), expected, rtol=1e-5)


def test_the_captioner_predicts_each_caption_token_from_the_image_and_the_tokens_before_it(shapesworld_dir):
    """CoCa's captioner: caption token t is predicted from the image and tokens < t (changing token t
    leaves its own prediction alone, changes the next one), and the image changes every prediction.
    Without a captioner there are no captioner weights and no caption loss."""
    from owl_jax.data.tokenizer import load_tokenizer
    from owl_jax.demo import siglip
    from owl_jax.demo.config import get_config
    from owl_jax.models.config import VisionConfig

    tok = load_tokenizer(os.path.join(shapesworld_dir, "tokenizer"))
    vision = VisionConfig(**get_config().quick.model.vision)  # --quick's ViT: 28 px, 4 patches
    settings = siglip.Settings(steps=1, batch_size=4, lr=1e-3, end_lr=1e-5, warmup_steps=1, weight_decay=0.0,
                               embed_dim=16, text_layers=1, text_width=32, text_heads=2, caption_len=24,
                               log_every_steps=1, seed=0)
    data = siglip.Scenes(tok, vision.image_size, settings.caption_len, seed=0)
    pixels, ids, mask, _ = data.batch(0, 4)
    plain = siglip.SigLIP(vision, siglip.text_config(settings, len(tok)), 16)
    params = plain.init(jax.random.PRNGKey(0), pixels, ids, mask, method=plain.losses)["params"]
    assert "captioner" not in params
    assert float(plain.apply({"params": params}, pixels, ids, mask, method=plain.losses)[1]) == 0.0

    coca = siglip.SigLIP(vision, siglip.text_config(settings, len(tok)), 16, caption_layers=1)
    params = coca.init(jax.random.PRNGKey(0), pixels, ids, mask, method=coca.losses)["params"]
    logits = lambda x, i: np.asarray(coca.apply({"params": params}, i, mask, pixels=x,  # noqa: E731
                                                method=coca.caption_logits))
    base = logits(pixels, ids)
    assert base.shape == (*ids.shape, len(tok))
    t = 3
    changed = ids.copy()
    changed[:, t] = (ids[:, t] + 1) % len(tok)
    moved = logits(pixels, changed)
    np.testing.assert_array_equal(moved[:, :t + 1], base[:, :t + 1])
    assert np.abs(moved[:, t + 1] - base[:, t + 1]).max() > 1e-4
    other_image = logits(pixels[::-1].copy(), ids)
    assert np.abs(other_image[:, 0] - base[:, 0]).max() > 1e-4
    contrastive, caption = coca.apply({"params": params}, pixels, ids, mask, method=coca.losses)
    assert np.isfinite(float(contrastive)) and float(caption) > 0


def test_twins_differ_in_one_thing_and_batches_repeat_from_the_seed(shapesworld_dir):
    from owl_jax.data.tokenizer import load_tokenizer
    from owl_jax.demo import scenes as sw
    from owl_jax.demo.siglip import Scenes

    data = Scenes(load_tokenizer(os.path.join(shapesworld_dir, "tokenizer")), 28, 64, seed=3)
    pixels, ids, mask, drawn = data.batch(5, 32, twins=True)
    letter_twins = 0
    for a, b in zip(drawn[:16], drawn[16:]):
        (ka, word_a), (kb, word_b) = sw.scene_key(a), sw.scene_key(b)
        if word_a != word_b:  # one letter of the word changed, nothing else
            letter_twins += 1
            assert ka == kb and len(word_a) == len(word_b), (a, b)
            assert sum(x != y for x, y in zip(word_a, word_b)) == 1, (word_a, word_b)
            continue
        # one shape's kind or colour changed (two entries differ), or one shape more or fewer (one)
        changed = set(ka) ^ set(kb)
        assert len(changed) in (1, 2) and len({region for _, _, region in changed}) == 1, (ka, kb)
    assert letter_twins >= 1
    again = data.batch(5, 32, twins=True)
    np.testing.assert_array_equal(pixels, again[0])
    np.testing.assert_array_equal(ids, again[1])
    assert (mask.sum(1) < 64).all()  # no caption cut
    assert not np.array_equal(pixels, data.batch(6, 32, twins=True)[0])


def test_the_captioners_focus_weights_fall_on_the_shape_words_and_the_written_word(shapesworld_dir):
    from owl_jax.data.tokenizer import load_tokenizer
    from owl_jax.demo import scenes as sw
    from owl_jax.demo.siglip import Scenes

    for tokenizer_dir in (os.path.join(shapesworld_dir, "tokenizer"), os.path.join(PRETRAINED, "tokenizer")):
        tok = load_tokenizer(tokenizer_dir)
        data = Scenes(tok, 28, 64, seed=1)
        drawn = [data.draw(np.random.default_rng(k), word=k % 2 == 0) for k in range(12)]
        _, ids, mask = data.render(drawn)
        weights = data.focus_weights(drawn, 4.0)
        np.testing.assert_array_equal(data.focus_weights(drawn, 1.0), np.ones_like(weights))
        for scene, row, keep, w in zip(drawn, ids, mask, weights):
            focused = tok.decode(row[w == 4.0].tolist()).split()
            by_region = {s["region"]: s["shape"] for s in scene["shapes"]} | (
                {"center": scene["word"]} if scene["word"] else {})
            expected = [by_region[r] for r in sw.REGION_ORDER if r in by_region]
            # each shape word and the word whole, in caption order (place by place); nothing else, padding never
            assert "".join(focused) == "".join(expected), (tokenizer_dir, focused, expected)
            assert (w[keep == 0] == 1.0).all()


def test_the_vits_captions_name_each_place_then_what_is_there():
    from owl_jax.demo import scenes as sw
    from owl_jax.demo.siglip import located_caption

    rng = np.random.default_rng(0)
    for k in range(40):
        scene = sw.sample_scene(rng, word=k % 2 == 0)
        parts = located_caption(scene).rstrip(".").split(", ")
        assert [p.split()[0] for p in parts] == list(sw.REGION_ORDER)
        told = {p.split()[0]: p.split(" ", 1)[1] for p in parts}
        for s in scene["shapes"]:
            assert told.pop(s["region"]) == f"{s['colour']} {s['shape']}"
        if scene["word"]:
            assert told.pop("center") == f"word {scene['word']}"
        assert set(told.values()) <= {"no shape"}


def test_held_out_captions_are_never_drawn(shapesworld_dir):
    from owl_jax.data.tokenizer import load_tokenizer
    from owl_jax.demo import scenes as sw
    from owl_jax.demo.siglip import Scenes

    tok = load_tokenizer(os.path.join(shapesworld_dir, "tokenizer"))
    first = Scenes(tok, 28, 64, seed=0).batch(0, 6)[3]
    keys = {sw.sample_key({"category": "caption", "scenes": [s], "caption": sw.describe(s)}) for s in first}
    again = Scenes(tok, 28, 64, seed=0, exclude=keys).batch(0, 6)[3]
    assert not keys & {sw.sample_key({"category": "caption", "scenes": [s], "caption": sw.describe(s)})
                       for s in again}


def test_linear_probes_read_a_planted_signal():
    """Features that carry the labels linearly are read (near) perfectly; noise is read at chance."""
    from owl_jax.demo.siglip import PROBE_CLASSES, linear_probes

    rng = np.random.default_rng(0)

    def labels(n):
        colour = rng.integers(0, 9, (n, 5))
        region = (colour < 8).astype(np.int64)
        length = rng.integers(3, 7, n) * (rng.random(n) < 0.5)  # half the scenes without a word
        letters = np.where(np.arange(6) < length[:, None], rng.integers(0, 26, (n, 6)), 26)
        return {"colour": colour, "shape": np.where(region == 1, rng.integers(0, 4, (n, 5)), 4), "region": region,
                "count": rng.integers(0, 4, n), "letters": letters}

    def planted(lab):
        parts = [np.eye(c)[lab[k].reshape(len(lab[k]), -1)].reshape(len(lab[k]), -1)
                 for k, (_, c) in PROBE_CLASSES.items()]
        return np.concatenate(parts + [rng.normal(size=(len(parts[0]), 32))], 1).astype(np.float32)

    train, test = labels(512), labels(256)
    read = linear_probes(planted(train), train, planted(test), test)
    assert min(read.values()) > 0.97, read
    noise = linear_probes(rng.normal(size=(512, 64)).astype(np.float32), train,
                          rng.normal(size=(256, 64)).astype(np.float32), test)
    assert noise["count"] < 0.45 and noise["shape"] < 0.5 and noise["letters"] < 0.15, noise


@pytest.mark.parametrize("word", ["QXZAB", "HELLO"])
def test_the_committed_tokenizer_spells_capitals_one_letter_a_token(word):
    from owl_jax.data.tokenizer import encode_text, load_tokenizer

    tok = load_tokenizer(os.path.join(PRETRAINED, "tokenizer"))
    sentence = f"Spell the word {word} backwards."
    ids = encode_text(tok, sentence)
    pieces = tok.convert_ids_to_tokens(ids)
    at = pieces.index("▁word") + 2  # "▁word", "▁", then the letters
    assert pieces[at: at + len(word)] == list(word) and pieces[at + len(word)] == "▁backwards", pieces
    assert "Human" in tok.convert_ids_to_tokens(encode_text(tok, "Human: hi"))  # capitalised words stay whole
    assert tok.decode(ids) == sentence
