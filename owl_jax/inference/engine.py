"""Batched decoding under jit with the KV cache.

Two jitted programs:

* `prefill`: splices the images (and the video model's clips) into the prompt embeddings, runs the
  LLM once over the (left-padded) prompts, writing the cache, and samples the first new token.
* `decode`: a `lax.while_loop` of single-token steps with the cache, until every sample has hit EOS
  or a step limit (`stop_at`, traced: chunked streaming does not recompile).

Prompts of different lengths are left-padded, with positions = cumsum(mask) - 1, so a sample's tokens
do not depend on what it is batched with. Prompt lengths, batch sizes, image and clip counts and
frames per clip are padded to buckets so repeated calls reuse the compiled programs: one compilation
per (batch bucket, prompt bucket, image bucket, clip buckets, max_new_tokens, do_sample). Sampling
parameters (temperature, top-k, top-p) are traced scalars; the random stream is
`fold_in(PRNGKey(seed), step)`, so the same seed gives the same samples however decoding is chunked.
Works with params sharded on a mesh: pass `mesh` and the logical axis `rules` (the model's activation
constraints then apply); nothing goes back to the host between tokens.

Both programs take params in the training layout or the decode layout (`owl_jax.models.owl`
`to_decode_layout`: LLM layers unrolled, LM head kernel [V, D]); `Generator` converts them once. With
the layers unrolled the loop reads every layer's weights and KV cache where they are and writes the
cache in place; under `nn.scan` each token would slice the weights and cache out of the stacked
`[L, ...]` arrays and write the whole cache back.

The command line on top of it is `python -m owl_jax.generate` (owl_jax/generate.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from owl_jax.batch import IMAGE_PLACEHOLDER_ID, VIDEO_PLACEHOLDER_ID
from owl_jax.cli import UserError
from owl_jax.inference.sampling import Sampling, sample_token
from owl_jax.models import quantization
from owl_jax.models.config import OwlConfig
from owl_jax.models.owl import Videos, is_decode_layout, to_decode_layout

# ----------------------------------------------------------------------------------------------
# The two jitted programs


_STATIC = ("cfg", "max_new_tokens", "greedy", "pad_id", "vocab_limit", "return_logits")


def _decoder(params, cfg: OwlConfig):
    """The decoding model for `params` in either layout (the tree structure is static under jit), its
    weights int8 where the config says so."""
    return quantization.model(cfg, decode=True, decode_layout=is_decode_layout(params))


@functools.partial(jax.jit, static_argnames=_STATIC)
def prefill(
    params,
    input_ids,
    prompt_mask,
    pixel_values,
    num_images,
    num_rows,
    row_limit,
    rng,
    eos_id,
    temperature,
    top_k,
    top_p,
    videos: Videos | None = None,
    *,
    cfg: OwlConfig,
    max_new_tokens: int,
    greedy: bool,
    pad_id: int,
    vocab_limit: int | None,
    return_logits: bool,
) -> dict:
    """Left-padded prompts int[B, P] (mask int/bool[B, P]) -> decoding state with the first new token.
    `videos`: the video model's clips (their placeholders VIDEO_PLACEHOLDER_ID), or None.

    The state holds the cache (P + max_new_tokens slots), `tokens` int[B, max_new_tokens] (pad_id
    after the end), `step` (tokens generated so far), `done` bool[B], `length` int[B] (tokens
    generated per sample, EOS included) and, with return_logits, `logits` float[B, max_new_tokens, V]:
    the distribution each token was drawn from. eos_id: int32 scalar, -1 for none. Rows from
    `num_rows` on are batch padding: done from the start, so they never hold the loop up. row_limit
    int[B]: each row's most new tokens (<= max_new_tokens): a row is done at its own limit."""
    model = _decoder(params, cfg)
    b, p = input_ids.shape
    s = p + max_new_tokens
    cache_shapes = jax.eval_shape(
        lambda prm: model.apply({"params": prm}, jnp.zeros((b, s), jnp.int32), mutable=["cache"])[1]["cache"], params
    )
    cache = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), cache_shapes)
    mask = prompt_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    # Slots after the prompt hold the generated tokens; causality hides the ones not written yet.
    cache_mask = jnp.concatenate([mask, jnp.ones((b, max_new_tokens), bool)], axis=1)
    logits, variables = model.apply(
        {"params": params, "cache": cache}, input_ids, pixel_values, num_images, positions, cache_mask, videos,
        method="prefill_logits", mutable=["cache"],
    )
    token = sample_token(logits, jax.random.fold_in(rng, 0), temperature, top_k, top_p, greedy=greedy,
                         vocab_limit=vocab_limit)
    done = (token == eos_id) | (jnp.arange(b) >= num_rows) | (row_limit <= 1)
    state = {
        "cache": variables["cache"],
        "cache_mask": cache_mask,
        "tokens": jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token),
        "position": mask.sum(1).astype(jnp.int32),  # position of the token fed next
        "step": jnp.array(1, jnp.int32),
        "done": done,
        "length": jnp.ones((b,), jnp.int32),
        "limit": row_limit.astype(jnp.int32),
        "rng": rng,
    }
    if return_logits:
        state["logits"] = jnp.zeros((b, max_new_tokens, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
    return state


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def decode(params, state, stop_at, eos_id, temperature, top_k, top_p, *, cfg: OwlConfig, max_new_tokens: int,
           greedy: bool, pad_id: int, vocab_limit: int | None, return_logits: bool) -> dict:
    """Single-token steps until step == min(stop_at, max_new_tokens) or every sample is done."""
    model = _decoder(params, cfg)
    limit = jnp.minimum(stop_at, max_new_tokens)

    def cond(st):
        return (st["step"] < limit) & ~jnp.all(st["done"])

    def body(st):
        step = st["step"]
        last = jax.lax.dynamic_slice_in_dim(st["tokens"], step - 1, 1, axis=1)[:, 0]
        logits, variables = model.apply(
            {"params": params, "cache": st["cache"]}, last, st["position"], st["cache_mask"],
            method="step_logits", mutable=["cache"],
        )
        token = sample_token(logits, jax.random.fold_in(st["rng"], step), temperature, top_k, top_p,
                             greedy=greedy, vocab_limit=vocab_limit)
        token = jnp.where(st["done"], pad_id, token)
        new = dict(st)
        new["cache"] = variables["cache"]
        new["tokens"] = jax.lax.dynamic_update_slice_in_dim(st["tokens"], token[:, None], step, axis=1)
        new["length"] = st["length"] + (~st["done"]).astype(jnp.int32)
        new["done"] = st["done"] | (token == eos_id) | (new["length"] >= st["limit"])
        new["position"] = st["position"] + 1
        new["step"] = step + 1
        if return_logits:
            new["logits"] = jax.lax.dynamic_update_slice_in_dim(st["logits"], logits[:, None], step, axis=1)
        return new

    return jax.lax.while_loop(cond, body, state)


# ----------------------------------------------------------------------------------------------
# Host side: batching, buckets, streaming


def bucket_length(n: int, minimum: int = 16) -> int:
    """Prompt-length bucket: powers of two up to 256, then multiples of 128."""
    n = max(n, minimum)
    if n <= 256:
        return 1 << (n - 1).bit_length()
    return -(-n // 128) * 128


def bucket_count(n: int) -> int:
    """Batch / image-count bucket: the next power of two (0 stays 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@dataclasses.dataclass
class Batch:
    input_ids: np.ndarray  # int32[B, P] left-padded
    prompt_mask: np.ndarray  # bool[B, P]
    pixel_values: np.ndarray | None  # float32[M, H, W, 3]
    num_images: np.ndarray  # int32[B]
    size: int  # real samples (rows after that are batch padding)
    videos: Videos | None = None  # numpy: clips [V, F, S, S, 3], frames [V], num_videos [B]


def make_batch(prompts: Sequence[np.ndarray], images: Sequence[np.ndarray] | np.ndarray | None,
               num_images: Sequence[int], cfg: OwlConfig, pad_id: int = 0, min_batch: int = 1,
               buckets: bool = True, clips: Sequence[np.ndarray] = (), num_videos: Sequence[int] | None = None
               ) -> Batch:
    """Left-pads token-id prompts (placeholders -1 for images, -2 for clips) into bucketed arrays.

    `images`: the batch's images flat in sample order, float32 [H, W, 3] each (CLIP-normalised,
    cfg.vision.image_size); `num_images[i]` of them belong to prompt i. `clips` (the video model's):
    float32 [f, H, W, 3] each, flat in sample order, `num_videos[i]` of them prompt i's."""
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts")
    num_images = [int(x) for x in num_images]
    if len(num_images) != n:
        raise ValueError(f"{n} prompts but {len(num_images)} image counts")
    lengths = [len(p) for p in prompts]
    b = max(bucket_count(n), min_batch) if buckets else max(n, min_batch)
    p = bucket_length(max(lengths)) if buckets else max(lengths)
    ids = np.full((b, p), pad_id, np.int32)
    mask = np.zeros((b, p), bool)
    for i, prompt in enumerate(prompts):
        ids[i, p - len(prompt):] = prompt
        mask[i, p - len(prompt):] = True
    # Batch-padding rows: a lone BOS, no images.
    ids[n:, -1] = cfg.llm.bos_token_id
    mask[n:, -1] = True
    total = sum(num_images)
    images = [] if images is None else list(images)
    if len(images) != total:
        raise ValueError(f"num_images sums to {total} but {len(images)} images were given")
    num_videos = [0] * n if num_videos is None else [int(x) for x in num_videos]
    if len(num_videos) != n or sum(num_videos) != len(clips):
        raise ValueError(f"{n} prompts, {len(num_videos)} clip counts summing to {sum(num_videos)}, {len(clips)} clips")
    for i, (prompt, k, c) in enumerate(zip(prompts, num_images, num_videos)):
        prompt = np.asarray(prompt)
        other = sorted(set(prompt[prompt < 0].tolist()) - {IMAGE_PLACEHOLDER_ID, VIDEO_PLACEHOLDER_ID})
        if other:
            raise ValueError(f"prompt {i}: negative ids {other[:5]} are no placeholder (-1: image, -2: clip)")
        for what, placeholder, count in (("image", IMAGE_PLACEHOLDER_ID, k), ("clip", VIDEO_PLACEHOLDER_ID, c)):
            placeholders = int(np.sum(np.asarray(prompt) == placeholder))
            if placeholders != count * cfg.tokens_per_image:
                raise ValueError(f"prompt {i}: {placeholders} {what} placeholders for {count} {what}(s) of "
                                 f"{cfg.tokens_per_image} tokens")
    pixels = None
    if total:
        m = max(bucket_count(total), b) if buckets else total  # >= one slot per row: fewer compilations
        size = cfg.vision.image_size
        pixels = np.zeros((m, size, size, 3), np.float32)
        pixels[:total] = np.stack([np.asarray(x, np.float32) for x in images])
    counts = np.zeros((b,), np.int32)
    counts[:n] = num_images
    return Batch(ids, mask, pixels, counts, n, _clip_slots(clips, num_videos, b, cfg, buckets))


def _clip_slots(clips: Sequence[np.ndarray], num_videos: list[int], b: int, cfg: OwlConfig,
                buckets: bool) -> Videos | None:
    """The batch's clips in V slots of F frames (both bucketed), zero frames after each clip's own."""
    if not clips:
        return None
    size = cfg.vision.image_size
    for i, clip in enumerate(clips):
        if np.ndim(clip) != 4 or len(clip) < 1 or np.shape(clip)[1:] != (size, size, 3):
            raise ValueError(f"clip {i} of shape {np.shape(clip)}: expected frames [f >= 1, {size}, {size}, 3]")
    frames = [len(c) for c in clips]
    v = bucket_count(len(clips)) if buckets else len(clips)
    f = bucket_count(max(frames)) if buckets else max(frames)
    pixels = np.zeros((v, f, size, size, 3), np.float32)
    for slot, clip in enumerate(clips):
        pixels[slot, : len(clip)] = clip
    counts = np.zeros((b,), np.int32)
    counts[: len(num_videos)] = num_videos
    return Videos(pixels, np.asarray(frames + [0] * (v - len(clips)), np.int32), counts)


def check_context(prompt_tokens: int, max_new_tokens: int, cfg: OwlConfig, what: str = "the prompt") -> None:
    """Refuses a prompt (`prompt_tokens`, image placeholders included) that leaves no room for
    `max_new_tokens` within the model's positions: past max_position_embeddings the model was never
    trained, and its answers there are noise."""
    limit = cfg.llm.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        raise UserError(
            f"{what} has {prompt_tokens} tokens (images included) and max_new_tokens is {max_new_tokens}: "
            f"{prompt_tokens + max_new_tokens} > the model's max_position_embeddings {limit}; lower max_new_tokens "
            f"(--max_new_tokens) or shorten the prompt"
        )


class Generator:
    """Generation with one set of params. `params` may be sharded on `mesh` (give the logical axis
    `rules` that map the model's names to mesh axes)."""

    def __init__(self, params: Any, cfg: OwlConfig, mesh: jax.sharding.Mesh | None = None,
                 rules: Sequence[tuple[str, Any]] | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, vocab_limit: int | None = None, decode_layout: bool = True):
        # decode_layout: decode with the params in the decode layout (see the module docstring); costs
        # a copy of the LLM's layer weights and LM head, made once here. False: as given.
        self.params = to_decode_layout(params) if decode_layout and not is_decode_layout(params) else params
        self.cfg = cfg
        self.mesh = mesh
        self.rules = tuple(rules) if rules is not None else None
        self.eos_id = cfg.llm.eos_token_id if eos_id is None else eos_id
        self.pad_id = cfg.llm.pad_token_id if pad_id is None else pad_id
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < cfg.llm.vocab_size else None

    @contextlib.contextmanager
    def _context(self):
        with contextlib.ExitStack() as stack:
            if self.mesh is not None:
                stack.enter_context(jax.set_mesh(self.mesh))
            if self.rules is not None:
                stack.enter_context(nn.logical_axis_rules(self.rules))
            yield

    def _statics(self, sampling: Sampling, return_logits: bool) -> dict:
        return dict(cfg=self.cfg, max_new_tokens=sampling.max_new_tokens, greedy=sampling.greedy,
                    pad_id=self.pad_id, vocab_limit=self.vocab_limit,
                    return_logits=return_logits)

    def _sampling_args(self, sampling: Sampling):
        return (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))

    def stream(self, batch: Batch, sampling: Sampling = Sampling(), chunk: int | None = None,
               return_logits: bool = False, disable_eos: bool = False,
               limits: Sequence[int] | None = None) -> Iterator[dict]:
        """Yields the decoding state (numpy: tokens, length, done, step [, logits]) after the prefill
        and after every `chunk` further steps (chunk None: all at once) until the end. `limits`: each
        sample's most new tokens, within sampling.max_new_tokens (which sizes the compiled programs):
        requests of different lengths share one batch and one compilation."""
        if sampling.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        row_limit = np.full((len(batch.input_ids),), sampling.max_new_tokens, np.int32)
        if limits is not None:
            if len(limits) != batch.size or not all(1 <= n <= sampling.max_new_tokens for n in limits):
                raise ValueError(f"limits {list(limits)}: one per sample, each in 1..{sampling.max_new_tokens}")
            row_limit[:batch.size] = limits
        # Each sample within the model's positions with its own limit (the cache has room for the largest).
        lengths = np.asarray(batch.prompt_mask)[:batch.size].sum(1)
        longest = int(np.argmax(lengths + row_limit[:batch.size]))
        check_context(int(lengths[longest]), int(row_limit[longest]), self.cfg, f"prompt {longest} of the batch")
        statics = self._statics(sampling, return_logits)
        eos = jnp.int32(-1 if disable_eos or self.eos_id is None else self.eos_id)
        samp = self._sampling_args(sampling)
        rng = jax.random.PRNGKey(sampling.seed)
        with self._context():
            pixels = None if batch.pixel_values is None else jnp.asarray(batch.pixel_values)
            videos = None if batch.videos is None else jax.tree_util.tree_map(jnp.asarray, batch.videos)
            state = prefill(self.params, jnp.asarray(batch.input_ids), jnp.asarray(batch.prompt_mask), pixels,
                            jnp.asarray(batch.num_images), jnp.int32(batch.size), jnp.asarray(row_limit), rng, eos,
                            *samp, videos, **statics)
            step = 1
            yield self._host(state, batch.size, return_logits)
            while step < sampling.max_new_tokens:
                stop_at = sampling.max_new_tokens if chunk is None else min(step + chunk, sampling.max_new_tokens)
                state = decode(self.params, state, jnp.int32(stop_at), eos, *samp, **statics)
                out = self._host(state, batch.size, return_logits)
                yield out
                step = out["step"]
                if out["done"].all() or step < stop_at:
                    break

    @staticmethod
    def _host(state: dict, n: int, return_logits: bool) -> dict:
        keys = ["tokens", "length", "done"] + (["logits"] if return_logits else [])
        out = {k: np.asarray(state[k])[:n] for k in keys}
        out["step"] = int(state["step"])
        return out

    def generate(self, batch: Batch, sampling: Sampling = Sampling(), return_logits: bool = False,
                 disable_eos: bool = False) -> dict:
        """Runs to the end. Returns numpy `tokens` int[n, max_new_tokens], `length` int[n] (EOS
        included), `done` bool[n] [, `logits` float[n, max_new_tokens, V]]."""
        last = None
        for last in self.stream(batch, sampling, None, return_logits, disable_eos):  # noqa: B007 - the last state
            pass
        return last


def trim(tokens: np.ndarray, length: int, eos_id: int) -> list[int]:
    """A sample's generated ids without the EOS and the padding after it."""
    ids = [int(t) for t in tokens[:length]]
    if ids and ids[-1] == eos_id:
        ids = ids[:-1]
    return ids


def check_max_new_tokens(max_new_tokens: int, cfg: OwlConfig, checkpoint: str) -> None:
    """--max_new_tokens against the checkpoint's config, before its params load (minutes for 7B)."""
    limit = cfg.llm.max_position_embeddings
    if not 1 <= max_new_tokens < limit:
        raise UserError(f"--max_new_tokens {max_new_tokens}: expected 1 to {limit - 1} (the model in {checkpoint} "
                        f"has max_position_embeddings {limit}, which must hold the prompt too)")
