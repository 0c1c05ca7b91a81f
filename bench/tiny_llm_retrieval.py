r"""How fast does the tiny LLaMA (configs/tiny.py) learn to read its context? (issue 6 diagnosis)

    JAX_PLATFORMS=cpu python bench/tiny_llm_retrieval.py --task copy  [--steps 300]
    JAX_PLATFORMS=cpu python bench/tiny_llm_retrieval.py --task scene --tokenizer DIR/tokenizer [--steps 600]

copy:  BOS x1..x12 SEP x1..x12 with random token ids, loss on the second half: pure in-context
       copying (an induction head). Prints the loss/accuracy every 50 steps.
scene: ShapesWorld questions with the scene told as text ("<caption> Q: <question> A: <answer>",
       no system prompt, loss on every token), trained from scratch; every 100 steps prints the
       exact-match rate per ability on 256 held-out questions (teacher-forced: every answer token
       must be the argmax). The main job's frozen LLM needs exactly this skill.

The tokenizer is the one `python -m owl_jax.data.prepare --dataset=shapesworld` trains (or the
main job's WORKDIR/data/tokenizer).
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax.api import _forward
from owl_jax.configs import load_config_file
from owl_jax.sharding import make_mesh
from owl_jax.training.stages import merge_params
from owl_jax.training.trainer import Trainer, global_batch, stack_micro_batches


def copy_batches(rng, batch: int, length: int = 12):
    while True:
        x = rng.integers(10, 1000, (batch, length))
        ids = np.concatenate([np.ones((batch, 1), int), x, np.full((batch, 1), 5), x], 1).astype(np.int32)
        loss = np.zeros_like(ids)
        loss[:, length + 2:] = 1
        yield ids, loss


def scene_sample(item, encode) -> tuple[list[int], list[int]]:
    from owl_jax.data import shapesworld as sw

    turns = [("Describe.", item["caption"])] if item["category"] == "caption" else item["turns"]
    ids = [1] + encode(" ".join(sw.describe(s) for s in item["scenes"]))
    answer = [0] * len(ids)
    for q, a in turns:
        p, ans = encode(" Q: " + q + " A:"), encode(" " + a) + [2]
        ids += p + ans
        answer += [0] * len(p) + [1] * len(ans)
    return ids, answer


def scene_batches(rng, batch: int, seq_len: int, encode):
    from owl_jax.data import shapesworld as sw

    while True:
        ids, loss = np.zeros((batch, seq_len), np.int32), np.zeros((batch, seq_len), np.int32)
        i = 0
        while i < batch:
            item = sw._text_item(rng)
            if item is None:
                continue
            x = scene_sample(item, encode)[0][:seq_len]
            ids[i, :len(x)], loss[i, 1:len(x)] = x, 1  # pretraining: every token is a target
            i += 1
        yield ids, loss


def heldout_questions(encode, seq_len: int, n: int = 256):
    from owl_jax.data import shapesworld as sw

    rng = np.random.default_rng(99)
    ids, answer, cats = np.zeros((n, seq_len), np.int32), np.zeros((n, seq_len), np.int32), []
    while len(cats) < n:
        item = sw._instruction(rng)
        if item is None or item["category"] == "text_only":
            continue
        x, a = scene_sample(item, encode)
        i = len(cats)
        ids[i, :len(x[:seq_len])], answer[i, :len(a[:seq_len])] = x[:seq_len], a[:seq_len]
        cats.append(item["category"])
    return ids, answer, cats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["copy", "scene"], required=True)
    p.add_argument("--tokenizer", default="", help="scene: the ShapesWorld tokenizer directory")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=64, help="scene only (copy: 26)")
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()

    rng = np.random.default_rng(0)
    seq_len = 26 if args.task == "copy" else args.seq_len
    if args.task == "copy":
        batches = copy_batches(rng, args.batch)
    else:
        from owl_jax.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        encode = lambda s: list(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        batches = scene_batches(rng, args.batch, seq_len, encode)
        q_ids, q_answer, q_cats = heldout_questions(encode, seq_len)

    c = load_config_file("configs/tiny.py:full_ft")
    c.batch_size, c.seq_len, c.max_images_per_batch, c.num_steps = args.batch, seq_len, 1, args.steps
    c.optim.lr, c.optim.warmup_steps, c.optim.end_lr = args.lr, 30, args.lr / 20
    trainer = Trainer(c, make_mesh({"fsdp": 1}, jax.devices()[:1]))
    size = c.model.vision.image_size

    def as_batch(ids, loss):
        return stack_micro_batches([{"input_ids": ids, "attention_mask": (ids != 0).astype(np.int32),
                                     "loss_mask": loss, "pixel_values": np.zeros((1, size, size, 3), np.float32),
                                     "num_images": np.zeros((len(ids),), np.int32)}])

    first = as_batch(*next(batches))
    step = trainer.jit_train_step({k: v.shape for k, v in first.items()})
    state = trainer.init_state(jax.random.PRNGKey(0))

    @jax.jit
    def exact(params):
        mask = jnp.asarray(q_ids != 0)
        logits = _forward.__wrapped__(params, jnp.asarray(q_ids), None, jnp.zeros((len(q_ids),), jnp.int32), mask,
                                      cfg=trainer.model_cfg)
        hit = (jnp.argmax(logits[:, :-1], -1) == q_ids[:, 1:]) | (q_answer[:, 1:] == 0)
        return jnp.all(hit, axis=1)

    t0 = time.time()
    for i in range(1, args.steps + 1):
        state, m = step(state, global_batch(as_batch(*next(batches)), step.batch_shardings))
        line = f"step {i}: loss {float(m['loss']):.3f} token accuracy {float(m['accuracy']):.3f} ({time.time() - t0:.0f} s)"
        if args.task == "copy" and i % 50 == 0:
            print(line, flush=True)
        elif args.task == "scene" and i % 100 == 0:
            ok = np.asarray(exact(merge_params(state["trainable"], state["frozen"])))
            per = {k: f"{100 * np.mean([o for o, cc in zip(ok, q_cats) if cc == k]):.0f}%" for k in sorted(set(q_cats))}
            print(line, f"held-out exact match {100 * ok.mean():.0f}%", per, flush=True)


if __name__ == "__main__":
    main()
