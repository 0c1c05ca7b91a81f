"""The grain pipeline: fixed-shape batches, image slots, mixing, exact resumption, process shards."""
import json
import os

import numpy as np

from owl_jax import batch as batch_format
from owl_jax.data import pipeline, records
from owl_jax.data.tokenizer import load_tokenizer

from conftest import SHAPESWORLD_SIZES, SHAPESWORLD_VOCAB

K = 5  # placeholders per image in these tests (tiny); the default is 65
def cfg_for(dataset_dir, **kw):
    cfg = pipeline.default_config()
    cfg.update(
        dataset="shapesworld",
        split="instructions_train",
        dataset_dir=dataset_dir,
        batch_size=4,
        max_len=192,
        max_images_per_batch=4,
        image_size=16,
        image_token_count=K,
        read_threads=1,
        read_buffer_size=4,
    )
    cfg.update(**kw)
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_prepare_outputs(shapesworld_dir):
    bdir = records.builder_dir(shapesworld_dir, "shapesworld")
    report = json.load(open(os.path.join(bdir, "report.json")))
    assert report["written"]["instructions_train"] == 48 and report["counts"] == {}
    for split, n in SHAPESWORLD_SIZES.items():
        assert len(records.data_source(shapesworld_dir, "shapesworld", split)) == n
        assert len(np.load(os.path.join(bdir, records.META_DIR, f"num_images-{split}.npy"))) == n
    tok = load_tokenizer(os.path.join(shapesworld_dir, "tokenizer"))
    assert len(tok) <= SHAPESWORLD_VOCAB and tok.bos_token_id == 1
    assert "<red-star-left>" in tok.get_added_vocab()


def test_batch_contract(shapesworld_dir):
    it = pipeline.make_iterator(cfg_for(shapesworld_dir), 0, 1)
    for b in take(it, 6):
        assert set(b) == set(batch_format.KEYS)
        for k, shape in batch_format.shapes(batch_size=4, seq_len=192, max_images=4, image_size=16).items():
            assert b[k].shape == shape and b[k].dtype == batch_format.DTYPES[k], k
        ids, att, loss, n = b["input_ids"], b["attention_mask"], b["loss_mask"], b["num_images"]
        assert n.sum() <= 4
        assert b["image_start"].tolist() == [int(n[:i].sum()) for i in range(4)]  # images packed in sample order
        assert (ids == -1).sum(1).tolist() == (K * n).tolist()
        assert (ids[:, 0] == 1).all()
        lengths = att.sum(1)
        for row in range(4):  # right padding: ones then zeros; pad id 0
            assert att[row, : lengths[row]].all() and not att[row, lengths[row]:].any()
            assert not ids[row, lengths[row]:].any()
        assert not (loss & (1 - att)).any() and not (loss.astype(bool) & (ids == -1)).any()
        assert (ids[loss.astype(bool)] >= 2).all()  # answers and EOS only
        used = int(n.sum())
        assert not b["pixel_values"][used:].any()
        assert all(b["pixel_values"][i].std() > 0 for i in range(used))


def test_loss_rows_end_with_eos(shapesworld_dir):
    it = pipeline.make_iterator(cfg_for(shapesworld_dir, max_len=400, max_images_per_batch=8), 0, 1)
    for b in take(it, 4):
        for row in range(4):
            pos = np.flatnonzero(b["loss_mask"][row])
            assert len(pos) and b["input_ids"][row, pos[-1]] == 2
            assert b["input_ids"][row, pos[-1] + 1] == 0  # the conversation ends with the last answer


def test_resume_yields_identical_batches(shapesworld_dir):
    # M=2 with 2-image samples forces deferrals, so states with a waiting sample are covered.
    cfg = cfg_for(shapesworld_dir, max_images_per_batch=2, text_only_ratio=0.5, augment=True, seed=4)
    it = pipeline.make_iterator(cfg, 0, 1)
    states, batches, stats = [], [], []
    for _ in range(10):
        states.append(it.get_state())
        batches.append(next(it))
        stats.append(it.stats)
    assert it.stats["deferred"] > 0
    json.dumps(states)  # JSON-able
    for k in range(8):  # every state, including those saved while a deferred sample waits
        resumed = pipeline.make_iterator(cfg, 0, 1)
        resumed.set_state(states[k])
        assert_same(take(resumed, 2), batches[k: k + 2])
        assert resumed.stats == stats[k + 1]  # the counters resume too


def test_orbax_checkpoint_round_trip(shapesworld_dir, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = cfg_for(shapesworld_dir, seed=1)
    it = pipeline.make_iterator(cfg, 0, 1)
    take(it, 2)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = take(it, 3)
    fresh = pipeline.make_iterator(cfg, 0, 1)
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same(take(fresh, 3), expected)
    mngr.close()


def test_two_process_shards_are_disjoint_and_cover(shapesworld_dir):
    seen = []
    for pi in range(2):
        cfg = cfg_for(shapesworld_dir, batch_size=4, max_images_per_batch=4, num_epochs=1, return_index=True)
        it = pipeline.make_iterator(cfg, pi, 2)
        batches = list(it)
        idx = [i for b in batches for i in b["index"].tolist() if i >= 0]
        assert all(b["input_ids"].shape == (2, 192) and b["pixel_values"].shape[0] == 2 for b in batches)
        assert len(idx) == len(set(idx))
        assert set(idx) == set(pipeline.shard_indices(48, pi, 2).tolist())
        seen.append(set(idx))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(48))


def test_finite_epoch_fills_last_batch(shapesworld_dir):
    cfg = cfg_for(shapesworld_dir, batch_size=5, max_images_per_batch=10, num_epochs=1, shuffle=False,
                  return_index=True)
    it = pipeline.make_iterator(cfg, 0, 1)
    batches = list(it)
    assert sorted(i for b in batches for i in b["index"].tolist() if i >= 0) == list(range(48))
    last = batches[-1]
    filler = last["index"] == -1
    assert filler.sum() == it.stats["filler_rows"] == 2
    assert (last["attention_mask"][filler].sum(1) == 1).all() and not last["loss_mask"][filler].any()


def test_text_only_ratio_mixes_exactly(shapesworld_dir):
    cfg = cfg_for(shapesworld_dir, text_only_ratio=0.5, max_len=400, max_images_per_batch=8)
    it = pipeline.make_iterator(cfg, 0, 1)
    for b in take(it, 5):
        assert (b["num_images"] == 0).sum() == 2
    assert it.stats["deferred"] == 0
    only_images = pipeline.make_iterator(cfg_for(shapesworld_dir, text_only_ratio=0.0, max_len=400,
                                                 max_images_per_batch=8), 0, 1)
    assert all((b["num_images"] > 0).all() for b in take(only_images, 3))


def test_truncated_answers_give_zero_loss_rows_and_are_counted(shapesworld_dir):
    # max_len just past the system prompt + one image: most answers are cut off
    it = pipeline.make_iterator(cfg_for(shapesworld_dir, max_len=48, max_images_per_batch=4), 0, 1)
    zero_rows = 0
    for b in take(it, 6):
        per_row = b["loss_mask"].sum(1)
        zero_rows += int((per_row == 0).sum())  # the loss of such rows: tests/test_loss.py
    assert zero_rows > 0 and it.stats["no_loss_tokens"] == zero_rows
    assert it.stats["truncated"] >= zero_rows


def test_too_many_images_are_dropped_and_counted(shapesworld_dir):
    it = pipeline.make_iterator(cfg_for(shapesworld_dir, max_images_per_batch=1, max_len=400, num_epochs=1), 0, 1)
    batches = list(it)
    assert all(b["num_images"].sum() <= 1 for b in batches)
    n_two = int((records.num_images_index(shapesworld_dir, "shapesworld", "instructions_train") == 2).sum())
    assert n_two > 0 and it.stats["dropped_too_many_images"] == n_two


def test_blank_images(shapesworld_dir):
    b = next(pipeline.make_iterator(cfg_for(shapesworld_dir, blank_images=True, text_only_ratio=0.0), 0, 1))
    assert b["num_images"].sum() > 0 and not b["pixel_values"].any()


def test_seed_controls_order(shapesworld_dir):
    a = take(pipeline.make_iterator(cfg_for(shapesworld_dir, seed=0), 0, 1), 2)
    b = take(pipeline.make_iterator(cfg_for(shapesworld_dir, seed=0), 0, 1), 2)
    c = take(pipeline.make_iterator(cfg_for(shapesworld_dir, seed=9), 0, 1), 2)
    assert_same(a, b)
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_worker_processes_match_and_resume(shapesworld_dir):
    cfg = cfg_for(shapesworld_dir, worker_count=1, max_images_per_batch=2)
    it = pipeline.make_iterator(cfg, 0, 1)
    first = take(it, 3)
    state = it.get_state()
    expected = take(it, 3)
    it.close()
    assert_same(
        first + expected, take(pipeline.make_iterator(cfg_for(shapesworld_dir, max_images_per_batch=2), 0, 1), 6)
    )
    resumed = pipeline.make_iterator(cfg, 0, 1)
    resumed.set_state(state)
    assert_same(take(resumed, 3), expected)
    resumed.close()


def test_eval_accessor(shapesworld_dir):
    from owl_jax.demo.dataset import iter_test_questions

    qs = list(iter_test_questions(shapesworld_dir, "instructions_test", image_size=16))
    assert len(qs) == 16
    for q in qs:
        assert q["prompt"].endswith("\nAI: ") and q["answer"] and q["category"]
        assert q["pixel_values"].shape == (q["num_images"], 16, 16, 3)
        assert q["prompt"].count("<image>") == q["num_images"]
    caps = list(iter_test_questions(shapesworld_dir, "captions_test", image_size=16, blank_images=True))
    assert all(c["prompt"].endswith("AI: ") and not c["pixel_values"].any() for c in caps)
    told = list(iter_test_questions(shapesworld_dir, "instructions_test", image_size=16, scenes_as_text=True))
    assert [t["answer"] for t in told] == [q["answer"] for q in qs]
    for t, q in zip(told, qs):
        assert t["num_images"] == 0 and "<image>" not in t["prompt"] and t["prompt"].endswith("\nAI: ")
        assert len(t["prompt"]) >= len(q["prompt"]) and t["scene"] == q["scene"]
