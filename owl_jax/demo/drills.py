"""Copy and lookup drills: random-token sequences that teach a language model to read its context.

LLaMA's pretraining text is full of repetition (names, lists, code), and that is where a
transformer's induction heads form: find where the current token occurred before, copy what came
next. ShapesWorld's text has almost none, and the tiny LLaMA trained on it alone never formed them
(docs/notes/research_log.md, "Copy drills first"). A few hundred steps of these drills first, then
the text, and the told-scene answers that need a lookup (the colour *of the star*, the written word)
come within a few hundred steps.

Each generator yields (ids int32[B, T], loss_mask int32[B, T]) with BOS = 1, padding 0, and the
loss on the tokens only the context can predict. Token ids are drawn from [10, vocab_size).

repeat: BOS s SEP s, s a random segment of random length; loss on the second copy after its first
        token. The offset between the copies varies: only an induction head predicts it.
lookup: BOS s SEP (d q a)*, s a segment of distinct tokens, q one of them, a the token after q in s
        (d = NEXT) or before it (d = PREVIOUS); loss on each a. Binding a told scene is this lookup:
        "a red star": the shape after "red", the colour before "star".
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

SEP, NEXT, PREVIOUS = 5, 6, 7
FIRST_ID = 10
TASKS = ("repeat", "lookup")


def repeat_row(rng: np.random.Generator, seq_len: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(6, (seq_len - 2) // 2 + 1))
    s = rng.integers(FIRST_ID, vocab_size, n)
    row = np.concatenate([[1], s, [SEP], s])
    loss = np.zeros(len(row), np.int32)
    loss[n + 3:] = 1
    return row, loss


def lookup_row(rng: np.random.Generator, seq_len: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(6, (seq_len - 2) // 2 + 1))
    s = rng.choice(np.arange(FIRST_ID, vocab_size), n, replace=False)
    row, loss = [1, *s, SEP], [0] * (n + 2)
    while len(row) + 3 <= seq_len:
        forward = rng.random() < 0.5
        i = int(rng.integers(0, n - 1)) + (0 if forward else 1)
        row += [NEXT if forward else PREVIOUS, int(s[i]), int(s[i + 1 if forward else i - 1])]
        loss += [0, 0, 1]
    return np.asarray(row), np.asarray(loss, np.int32)


def trainer_batch(ids: np.ndarray, loss: np.ndarray, image_size: int) -> dict[str, np.ndarray]:
    """Text-only rows (ids, loss_mask int32[B, T]) as the trainer's batch: one unused image slot."""
    from owl_jax.training.trainer import stack_micro_batches

    return stack_micro_batches([{"input_ids": ids, "attention_mask": (ids != 0).astype(np.int32), "loss_mask": loss,
                                 "pixel_values": np.zeros((1, image_size, image_size, 3), np.float32),
                                 "num_images": np.zeros((len(ids),), np.int32),
                                 "image_start": np.zeros((len(ids),), np.int32)}])


def batches(rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int,
            tasks: tuple[str, ...] = TASKS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows of the `tasks` in equal shares, right-padded to `seq_len`."""
    make = {"repeat": repeat_row, "lookup": lookup_row}
    unknown = set(tasks) - set(make)
    if unknown:
        raise ValueError(f"drill tasks {sorted(unknown)}: expected some of {TASKS}")
    while True:
        ids, loss = np.zeros((batch, seq_len), np.int32), np.zeros((batch, seq_len), np.int32)
        for b in range(batch):
            row, mask = make[tasks[int(rng.integers(len(tasks)))]](rng, seq_len, vocab_size)
            ids[b, :len(row)], loss[b, :len(row)] = row, mask
        yield ids, loss
