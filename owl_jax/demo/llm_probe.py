r"""How fast does the tiny LLaMA (configs/tiny.py) learn to read its context?

    JAX_PLATFORMS=cpu python -m owl_jax.demo.llm_probe --task copy  [--steps 300]
    JAX_PLATFORMS=cpu python -m owl_jax.demo.llm_probe --task repeat [--steps 500] [--torch]
    JAX_PLATFORMS=cpu python -m owl_jax.demo.llm_probe --task scene --tokenizer DIR/tokenizer [--steps 600]
        [--qa_per_scene 8 --answers_only --seq_len 144 --batch 16] [--heads 8] [--single_shape_share 1.0]

copy:      BOS x1..x12 SEP x1..x12 with random token ids, loss on the second half. The offset
           between the copies is always 13, so a positional head alone solves it.
repeat:    BOS s SEP s with s random tokens of random length 6-22, loss on the second copy after its
           first token: the offset varies, so it takes an induction head (find the previous
           occurrence of the current token, copy its successor).
induction: BOS x1..x24 SEP x_j..x_j+7 (random j), loss on the chunk after its first token: an
           induction head with only 7 targets a sample.
scene:     ShapesWorld questions with the scene told as text ("<caption> Q: <question> A: <answer>",
           no system prompt, loss on every token), trained from scratch; every 100 steps prints the
           exact-match rate per ability on 256 held-out questions (teacher-forced: every answer token
           must be the argmax). The main job's frozen LLM needs exactly this skill.
           --qa_per_scene K trains on one scene followed by up to K distinct questions about it (8x
           the binding examples per token), --answers_only puts the loss on the answers alone,
           --heads N changes the LLM's head count (head size hidden/N), --layers N its depth,
           --width N its hidden size, --rope_theta its RoPE base.
           --pretrain_repeat N first trains N steps of copy drills (owl_jax.demo.drills, 32 rows of
           48 tokens; --drill_tasks picks them), then --lookup_steps M steps of repeat and lookup
           drills (binding is a lookup), --repeat_share S mixes repeat drills into the
           scene batches instead (a share S of the rows), --nonsense_share S writes a share S of
           the quizzes with random whole-word tokens for the colour and shape words, the same
           within a quiz (only a lookup answers them).
           --shuffle_objects tells every scene's shapes in a random order (the towers' text and the
           captions tell them left, top, center, right, bottom: "the shape on the left" is the
           first one told, an answer that needs no lookup).
           --object_words tells each shape as one word of its own ("<red-star-left>", as the
           towers' text does; added to the tokenizer, its embedding started as the sum of its
           three words'): with ShapesWorld's keyed answers ("What colour is the star?" -> "star
           red") the lookup is one step from the token just read.

Every 50 steps (100 for scene) it prints the loss and token accuracy. --torch trains transformers'
PyTorch `LlamaForCausalLM` of the same shape on the same batches with the same recipe (AdamW,
warmup + cosine, global-norm clipping) instead: the reference that tells a slow plateau from a bug.

The tokenizer is the one `python -m owl_jax.demo.dataset` trains (or the
main job's WORKDIR/data/tokenizer).
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from owl_jax.cli import fail, parse_flags
from owl_jax.demo import tiny
from owl_jax.demo.drills import batches as drill_batches
from owl_jax.demo.drills import trainer_batch
from owl_jax.demo.told_scenes import object_rows, scene_sample
from owl_jax.inference.api import _forward
from owl_jax.sharding import make_mesh
from owl_jax.training.stages import merge_params
from owl_jax.training.trainer import Trainer, global_batch


def copy_batches(rng, batch: int, length: int = 12):
    while True:
        x = rng.integers(10, 1000, (batch, length))
        ids = np.concatenate([np.ones((batch, 1), int), x, np.full((batch, 1), 5), x], 1).astype(np.int32)
        loss = np.zeros_like(ids)
        loss[:, length + 2:] = 1
        yield ids, loss


def induction_batches(rng, batch: int, length: int = 24, chunk: int = 8):
    """BOS x1..x24 SEP x_j..x_{j+7} with j random: continuing the chunk needs an induction head
    (find where the current token occurred, copy its successor); loss on the chunk after its first token."""
    while True:
        x = rng.integers(10, 1000, (batch, length))
        j = rng.integers(0, length - chunk + 1, (batch,))
        c = np.stack([x[b, j[b]:j[b] + chunk] for b in range(batch)])
        ids = np.concatenate([np.ones((batch, 1), int), x, np.full((batch, 1), 5), c], 1).astype(np.int32)
        loss = np.zeros_like(ids)
        loss[:, length + 3:] = 1
        yield ids, loss


def repeat_batches(rng, batch: int, seq_len: int = 48):
    """BOS s SEP s with s a random-token segment of random length (6-22): the offset between the
    copies varies, so only an induction head predicts the second copy; loss on its tokens after the first."""
    return drill_batches(rng, batch, seq_len, 1000, ("repeat",))


def recall_batches(rng, batch: int, seq_len: int = 34):
    """BOS f.. c f.. SEP c: one 'key' token c (ids 10-17, like the 8 colours) among random filler (ids
    100-999) of random length; after SEP the model must say c. One head that attends to the key-type
    token and copies it (no composition): what "What colour is the shape?" needs with one shape."""
    while True:
        ids, loss = np.zeros((batch, seq_len), np.int32), np.zeros((batch, seq_len), np.int32)
        for b in range(batch):
            n = int(rng.integers(8, seq_len - 3))
            row = rng.integers(100, 1000, n)
            row[int(rng.integers(n))] = c = int(rng.integers(10, 18))
            row = np.concatenate([[1], row, [5, c]])
            ids[b, :len(row)] = row
            loss[b, len(row) - 1] = 1
        yield ids, loss


def nonsense_ids(encode, pool: np.ndarray):
    """Token ids of the colour and shape words (plurals with their singular) -> a function that
    replaces them in a row, consistently, with random ids of `pool` not otherwise in the row: a quiz
    that only a lookup answers (no word's prior helps)."""
    from owl_jax.demo import scenes as sw

    words = list(sw.COLOURS) + list(sw.SHAPES)
    groups = [[encode(" " + w)[-1]] + ([encode(" " + w + "s")[-1]] if w in sw.SHAPES else []) for w in words]

    pool = np.setdiff1d(pool, [i for g in groups for i in g])  # a real colour for a shape would mislead

    def replace(rng, ids: list[int]) -> list[int]:
        taken = set(ids)
        free = np.setdiff1d(pool, np.fromiter(taken, int))
        new = rng.choice(free, len(groups), replace=False)
        table = {i: int(n) for g, n in zip(groups, new) for i in g}
        return [table.get(i, i) for i in ids]

    return replace


def word_ids(tok) -> np.ndarray:
    """The vocabulary's whole-word pieces ("▁" and at least two lower-case letters): nonsense words."""
    pieces = tok.convert_ids_to_tokens(list(range(tok.vocab_size)))
    return np.array([i for i, p in enumerate(pieces) if p.startswith("▁") and p[1:].isalpha() and p[1:].islower()
                     and len(p) > 2])


def scene_batches(rng, batch: int, seq_len: int, encode, qa_per_scene: int = 0, answers_only: bool = False,
                  repeat_share: float = 0.0, nonsense_share: float = 0.0, nonsense_pool=None,
                  shuffle_objects: bool = False, tell=None):
    from owl_jax.demo import drills
    from owl_jax.demo import scenes as sw

    nonsense = nonsense_ids(encode, nonsense_pool) if nonsense_share else None
    order_rng = np.random.default_rng(1) if shuffle_objects else None  # its own stream: the same quizzes drawn
    if qa_per_scene:
        while True:
            ids, loss = np.zeros((batch, seq_len), np.int32), np.zeros((batch, seq_len), np.int32)
            for i in range(batch):
                if rng.random() < repeat_share:  # a copy drill of segments up to 40 tokens
                    row, mask = drills.repeat_row(rng, min(seq_len, 82), 1000)
                    ids[i, :len(row)], loss[i, :len(row)] = row, mask
                    continue
                while (item := sw._quiz(rng, qa_per_scene)) is None:  # the towers' text quizzes
                    pass
                x, a = scene_sample(item, encode, order_rng, tell)
                x, a = x[:seq_len], np.asarray(a[:seq_len])
                if rng.random() < nonsense_share:
                    x = nonsense(rng, x)
                ids[i, :len(x)] = x
                loss[i, :len(x)] = a if answers_only else np.r_[0, np.ones(len(x) - 1, int)]
            yield ids, loss
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


def heldout_questions(encode, seq_len: int, n: int = 256, shuffle_objects: bool = False, tell=None):
    from owl_jax.demo import scenes as sw

    rng = np.random.default_rng(99)
    ids, answer, cats = np.zeros((n, seq_len), np.int32), np.zeros((n, seq_len), np.int32), []
    while len(cats) < n:
        item = sw._instruction(rng)
        if item is None or item["category"] == "text_only":
            continue
        x, a = scene_sample(item, encode, np.random.default_rng(len(cats)) if shuffle_objects else None, tell)
        i = len(cats)
        ids[i, :len(x[:seq_len])], answer[i, :len(a[:seq_len])] = x[:seq_len], a[:seq_len]
        cats.append(item["category"])
    return ids, answer, cats


def train_torch(c, batches) -> None:
    """The same recipe on transformers' LlamaForCausalLM (configs/tiny.py's LLM shape)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m, o = c.model.llm, c.optim
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.mlp_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta, max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=False))
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    floor = o.end_lr / o.lr
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / o.warmup_steps
            if s < o.warmup_steps
            else floor
            + (1 - floor) * 0.5 * (1 + np.cos(np.pi * (s - o.warmup_steps) / max(c.num_steps - o.warmup_steps, 1)))
        ),
    )
    t0 = time.time()
    for i in range(1, c.num_steps + 1):
        ids, loss_mask = (torch.as_tensor(x, dtype=torch.long) for x in next(batches))
        logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits[:, :-1]
        weight = loss_mask[:, 1:].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * weight).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        sched.step()
        if i % 50 == 0:
            acc = ((logits.argmax(-1) == ids[:, 1:]).float() * weight).sum() / weight.sum()
            print(
                f"step {i}: loss {loss.item():.3f} token accuracy {acc.item():.3f} ({time.time() - t0:.0f} s) [torch]",
                flush=True,
            )


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_enum("task", None, ["copy", "recall", "induction", "repeat", "scene"], "what the LLM learns",
                      flag_values=fv)
    flags.DEFINE_string("tokenizer", "", "scene: the ShapesWorld tokenizer directory", flag_values=fv)
    flags.DEFINE_integer("steps", 300, "training steps", flag_values=fv)
    flags.DEFINE_integer("batch", 32, "sequences per step", flag_values=fv)
    flags.DEFINE_integer("seq_len", 64, "scene only (copy: 26)", flag_values=fv)
    flags.DEFINE_float("lr", 2e-3, "peak learning rate", flag_values=fv)
    flags.DEFINE_float("single_shape_share", 0.0,
                       "scene: share of training scenes drawn with one shape (the held-out ones keep 1-4)",
                       flag_values=fv)
    flags.DEFINE_integer("qa_per_scene", 0, "scene: train on one scene followed by this many questions about it "
                         "(0: the text_train mix)", flag_values=fv)
    flags.DEFINE_float("repeat_share", 0.0, "scene with --qa_per_scene: share of rows that are copy drills "
                       "(a random segment, then the same again)", flag_values=fv)
    flags.DEFINE_integer("pretrain_repeat", 0, "scene: first train this many steps of the repeat task (an "
                         "induction head first), on the same learning-rate schedule", flag_values=fv)
    flags.DEFINE_list("drill_tasks", ["repeat"], "--pretrain_repeat: the drills (owl_jax.demo.drills.TASKS)",
                      flag_values=fv)
    flags.DEFINE_integer("lookup_steps", 0, "scene: after --pretrain_repeat, this many steps of repeat and "
                         "lookup drills in equal shares (the lookups once the induction head exists)", flag_values=fv)
    flags.DEFINE_float("nonsense_share", 0.0, "scene with --qa_per_scene: share of quizzes whose colour and shape "
                       "words are random tokens (consistent within the quiz)", flag_values=fv)
    flags.DEFINE_bool("answers_only", False, "scene with --qa_per_scene: loss on the answers only", flag_values=fv)
    flags.DEFINE_bool("shuffle_objects", False, "scene: every told scene names its shapes in a random order (else "
                      "left, top, center, right, bottom)", flag_values=fv)
    flags.DEFINE_bool("object_words", False, "scene: each shape told as one word (\"<red-star-left>\", added to the "
                      "tokenizer), its embedding started as the sum of its three words'", flag_values=fv)
    flags.DEFINE_integer("width", 0, "LLM hidden size (0: configs/tiny.py's)", flag_values=fv)
    flags.DEFINE_integer("heads", 0, "LLM attention heads (0: configs/tiny.py's)", flag_values=fv)
    flags.DEFINE_integer("layers", 0, "LLM layers (0: configs/tiny.py's)", flag_values=fv)
    flags.DEFINE_float("rope_theta", 0.0, "the LLM's RoPE base (0: configs/tiny.py's)", flag_values=fv)
    flags.DEFINE_float("init_range", 0.0, "the LLM's initializer_range (0: configs/tiny.py's)", flag_values=fv)
    flags.DEFINE_bool("torch", False, "copy/repeat/induction: train the PyTorch reference instead", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    args = parse_flags(argv, _flags(), __doc__, required=("task",))
    if args.torch and args.task == "scene":
        fail("--torch: copy, repeat or induction only")

    rng = np.random.default_rng(0)
    seq_len = {"copy": 26, "recall": 34, "induction": 34, "repeat": 48}.get(args.task, args.seq_len)
    if args.task == "copy":
        batches = copy_batches(rng, args.batch)
    elif args.task == "recall":
        batches = recall_batches(rng, args.batch)
    elif args.task == "repeat":
        batches = repeat_batches(rng, args.batch)
    elif args.task == "induction":
        batches = induction_batches(rng, args.batch)
    else:
        from owl_jax.data.tokenizer import load_tokenizer
        from owl_jax.demo import scenes as sw

        tok = load_tokenizer(args.tokenizer)
        if args.object_words:
            tok.add_tokens(list(sw.OBJECT_WORDS))
        encode = lambda s: list(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        tell = sw.tell if args.object_words else sw.describe
        q_ids, q_answer, q_cats = heldout_questions(encode, seq_len, shuffle_objects=args.shuffle_objects, tell=tell)
        if args.single_shape_share > 0:
            draw = sw.sample_scene

            def sample_scene(r, n_shapes=None, word=None):
                if n_shapes is None and r.random() < args.single_shape_share:
                    n_shapes = 1
                return draw(r, n_shapes, word)

            sw.sample_scene = sample_scene
        batches = scene_batches(rng, args.batch, seq_len, encode, args.qa_per_scene, args.answers_only,
                                args.repeat_share, args.nonsense_share, word_ids(tok), args.shuffle_objects, tell)

    c = tiny.get_config("full_ft")
    c.batch_size, c.seq_len, c.max_images_per_batch, c.num_steps = args.batch, seq_len, 1, args.steps
    c.num_steps += args.pretrain_repeat + args.lookup_steps
    if args.heads:
        c.model.llm.update(num_heads=args.heads, num_kv_heads=args.heads)
    if args.layers:
        c.model.llm.num_layers = args.layers
    if args.width:  # the MLP keeps configs/tiny.py's ratio to the width
        m = c.model.llm
        m.update(mlp_size=args.width * m.mlp_size // m.hidden_size, hidden_size=args.width)
    if args.rope_theta:
        c.model.llm.rope_theta = args.rope_theta
    if args.init_range:
        c.model.llm.initializer_range = args.init_range
    c.optim.lr, c.optim.warmup_steps, c.optim.end_lr = args.lr, 30, args.lr / 20
    if args.torch:
        train_torch(c, batches)
        return 0
    trainer = Trainer(c, make_mesh({"fsdp": 1}, jax.devices()[:1]))
    size = c.model.vision.image_size

    def as_batch(ids, loss):
        return trainer_batch(ids, loss, size)

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
    if args.pretrain_repeat:
        # at 16 rows the induction head had not formed by 900 steps; at 32 by 500-600
        drills = drill_batches(np.random.default_rng(1), 32, 48, c.model.llm.vocab_size, tuple(args.drill_tasks))
        drill_step = trainer.jit_train_step({k: v.shape for k, v in as_batch(*next(drills)).items()})
        lookups = drill_batches(np.random.default_rng(2), 32, 48, c.model.llm.vocab_size, ("repeat", "lookup"))
        for i in range(1, args.pretrain_repeat + args.lookup_steps + 1):
            phase = "repeat" if i <= args.pretrain_repeat else "lookup"
            rows = next(drills if phase == "repeat" else lookups)
            state, m = drill_step(state, global_batch(as_batch(*rows), drill_step.batch_shardings))
            if i % 100 == 0:
                print(f"{phase} drill step {i}: loss {float(m['loss']):.3f} token accuracy {float(m['accuracy']):.3f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
    if args.task == "scene" and args.object_words:  # after the drills, which train every row as a random token
        embed = state["trainable"]["language_model"]["model"]["embed_tokens"]
        embed["embedding"] = object_rows(embed["embedding"], encode)
    for i in range(1, args.steps + 1):
        state, m = step(state, global_batch(as_batch(*next(batches)), step.batch_shardings))
        line = (f"step {i}: loss {float(m['loss']):.3f} token accuracy {float(m['accuracy']):.3f} "
                f"({time.time() - t0:.0f} s)")
        if args.task != "scene" and i % 50 == 0:
            print(line, flush=True)
        elif args.task == "scene" and i % 100 == 0:
            ok = np.asarray(exact(merge_params(state["trainable"], state["frozen"])))
            per = {k: f"{100 * np.mean([o for o, cc in zip(ok, q_cats) if cc == k]):.0f}%" for k in sorted(set(q_cats))}
            print(line, f"held-out exact match {100 * ok.mean():.0f}%", per, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
