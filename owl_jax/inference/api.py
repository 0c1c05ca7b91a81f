"""The Python API a user reaches for first::

    import owl_jax
    owl = owl_jax.load("checkpoints/owl")                      # params dir (+ tokenizer)
    owl.chat(images=["cat.jpg"], messages="What is in the image?")
    owl.chat(images=["a.jpg", "b.jpg"], messages=[
        {"role": "user", "content": "What differs between the images?"},
        {"role": "assistant", "content": "The colour of the car."},
        {"role": "user", "content": "Which one is older?"}])
    owl.generate([{"images": ["a.jpg"], "messages": "Describe it."}, ...], batch_size=8)
    video_owl.chat(videos=["clip.mp4"], messages="What happens?")  # the video model; images beside
    owl.logits(input_ids, pixel_values, num_images)             # raw logits (numpy)
    owl.score(["a.jpg"], "What colour is the car?", ["Red.", "Blue."])  # log-likelihood per candidate

Prompts follow the released conversation template (`owl_jax.data.conversation`): the
images as ``Human: <image>`` lines first, then the turns, ending in ``"AI: "``. They are tokenised
as the released processor does (the text split on ``<image>`` only, each piece tokenised whole), so
the released weights answer as in the release; ``load(..., prompt_tokenization="training")`` keeps
the chunks of training instead (`owl_jax.data.text.encode_prompt`), for a model evaluated in its own
training format. Images may be paths, PIL images, or arrays (uint8 [H, W, 3] pixels, or float32
[S, S, 3] already CLIP-normalised at the model's image size). Clips (the video model's) may be video
files (the release's 4 frames: `owl_jax.data.video`) or frames [f, H, W, 3] as images are; in the
prompt each is a ``Human: <|video|>`` line after the images'.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from owl_jax import params_io
from owl_jax.cli import UserError
from owl_jax.data import conversation
from owl_jax.data.text import PROMPT_TOKENIZATIONS, encode_prompt
from owl_jax.data.tokenizer import encode_text
from owl_jax.inference.engine import Generator, bucket_count, bucket_length, check_context, make_batch, trim
from owl_jax.inference.media import ImageLike, VideoLike, image_list, load_clip, load_image, video_list
from owl_jax.inference.sampling import Sampling
from owl_jax.models.config import OwlConfig
from owl_jax.models.owl import Videos, init_params, is_decode_layout

Messages = Any  # str | list[str] | list[dict(role, content)]

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_USER, _ASSISTANT = ("user", "human"), ("assistant", "ai")


def normalize_messages(messages: Messages) -> tuple[list[tuple[str, str | None]], str]:
    """Messages -> (turns [(question, answer)], system prompt); the last turn's answer is None.

    Accepts one question (str), alternating strings (user first), or dicts with `role`
    user/human, assistant/ai or system and `content`. Must end with a user message."""
    system = conversation.SYSTEM_PROMPT
    if isinstance(messages, str):
        messages = [messages]
    items = []
    for i, m in enumerate(messages):
        if isinstance(m, str):
            items.append(("user" if i % 2 == 0 else "assistant", m))
        else:
            role = str(m["role"]).lower()
            if role == "system":
                system = m["content"]
                continue
            if role not in _USER + _ASSISTANT:
                raise ValueError(f"message {i}: unknown role {m['role']!r}")
            items.append(("user" if role in _USER else "assistant", m["content"]))
    if not items or items[-1][0] != "user":
        raise ValueError("messages must end with a user message")
    turns: list[tuple[str, str | None]] = []
    for role, content in items:
        if role == "user":
            if turns and turns[-1][1] is None:
                raise ValueError("two user messages in a row")
            turns.append((content, None))
        else:
            if not turns or turns[-1][1] is not None:
                raise ValueError("an assistant message must follow a user message")
            turns[-1] = (turns[-1][0], content)
    return turns, system


class Owl:
    """A loaded model: params, config, tokenizer and a `Generator` (see `load`)."""

    def __init__(
        self, params: Any, cfg: OwlConfig, tokenizer, mesh=None, rules=None, prompt_tokenization: str = "release"
    ):
        if prompt_tokenization not in PROMPT_TOKENIZATIONS:
            raise ValueError(f"prompt_tokenization={prompt_tokenization!r}: expected one of {PROMPT_TOKENIZATIONS}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.prompt_tokenization = prompt_tokenization  # see owl_jax.data.text.encode_prompt
        self.mesh, self.rules = mesh, rules
        vocab_limit = len(tokenizer) if tokenizer is not None else None
        self.generator = Generator(params, cfg, mesh=mesh, rules=rules, vocab_limit=vocab_limit)
        # One copy of the weights: logits/score run on the generator's (decode-layout) params too.
        self.params = self.generator.params
        self.eos_id = self.generator.eos_id

    # -- prompts -----------------------------------------------------------------------------
    def prompt_text(self, num_images: int, messages: Messages, num_videos: int = 0) -> str:
        turns, system = normalize_messages(messages)
        return conversation.build_prompt(num_images, turns, system_prompt=system, num_videos=num_videos)

    def encode(self, text: str) -> np.ndarray:
        """Template text (with ``<image>`` tags, and ``<|video|>`` for the video model) -> ids with BOS
        and -1 (-2) placeholders."""
        return encode_prompt(text, self.tokenizer, image_token_count=self.cfg.tokens_per_image,
                             tokenization=self.prompt_tokenization, video_tags=self.cfg.video)

    def images(self, images: Sequence[ImageLike] | ImageLike | None) -> list[np.ndarray]:
        """Images (one or a list) -> CLIP-normalised float32 [S, S, 3] arrays."""
        return [load_image(x, self.cfg.vision.image_size) for x in image_list(images)]

    def clips(self, videos: Sequence[VideoLike] | VideoLike | None) -> list[np.ndarray]:
        """Clips (one or a list) -> CLIP-normalised float32 [f, S, S, 3] arrays; the video model only."""
        videos = video_list(videos)
        if videos:
            self._need_video_model()
        return [load_clip(x, self.cfg.vision.image_size) for x in videos]

    def _need_video_model(self) -> None:
        if not self.cfg.video:
            raise UserError("videos need the video model (a checkpoint with vision.temporal); this one reads images")

    def _request_text(self, request: dict) -> str:
        n, c = len(image_list(request.get("images"))), len(video_list(request.get("videos")))
        if c:
            self._need_video_model()
        counts = ((conversation.count_image_tags, n, "<image>", "image(s)"),
                  (conversation.count_video_tags, c, "<|video|>", "video(s)"))
        if "prompt" in request:  # raw template text
            text = request["prompt"]
            for count_tags, given, tag, what in counts:
                if (self.cfg.video or tag == "<image>") and count_tags(text) != given:
                    raise UserError(f"the prompt has {count_tags(text)} {tag} tags but {given} {what} were given")
            return text
        text = self.prompt_text(n, request["messages"], c)
        for count_tags, given, tag, what in counts:
            typed = count_tags(text) - given  # the template's own media lines aside
            if typed and (self.cfg.video or tag == "<image>"):
                raise UserError(f"the messages hold {typed} {tag} tag(s) and {given} {what} were given: leave the "
                                f"tags out, the template puts each on a 'Human: {tag}' line of its own first")
        return text

    def encode_request(self, request: dict, sampling: Sampling, what: str) -> np.ndarray:
        """A request's (`generate`'s format) prompt ids, refused (UserError) where its images, clips and
        tags disagree or where it leaves no room for max_new_tokens."""
        ids = self.encode(self._request_text(request))
        check_context(len(ids), sampling.max_new_tokens, self.cfg, what)
        return ids

    def _decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- generation --------------------------------------------------------------------------
    @staticmethod
    def _sampling(sampling: Sampling | None, kwargs: dict) -> Sampling:
        import dataclasses

        return dataclasses.replace(sampling or Sampling(), **kwargs)

    def chat(self, images: Sequence[ImageLike] | None = None, messages: Messages = None,
             sampling: Sampling | None = None, videos: Sequence[VideoLike] | None = None, **sampling_kwargs) -> str:
        """The answer to the last user message (greedy unless do_sample=True; see `Sampling`)."""
        return self.generate([{"images": images, "videos": videos, "messages": messages, "name": "the prompt"}],
                             batch_size=1, sampling=sampling, **sampling_kwargs)[0]

    def chat_stream(self, images: Sequence[ImageLike] | None = None, messages: Messages = None,
                    sampling: Sampling | None = None, chunk: int = 8, videos: Sequence[VideoLike] | None = None,
                    **sampling_kwargs) -> Iterator[str]:
        """Like `chat`, yielding pieces of the answer as they are decoded (every `chunk` tokens); the
        generator's return value (StopIteration.value) is the whole answer, as `chat` gives it. The
        request is checked (and its images and clips decoded) here, before the first piece is asked for."""
        sampling = self._sampling(sampling, sampling_kwargs)
        ids = self.encode_request({"images": images, "videos": videos, "messages": messages}, sampling, "the prompt")
        pixels, clips = self.images(images), self.clips(videos)
        batch = make_batch([ids], pixels, [len(pixels)], self.cfg, pad_id=self.generator.pad_id, clips=clips,
                           num_videos=[len(clips)])
        return self._stream(batch, sampling, chunk)

    def _stream(self, batch, sampling: Sampling, chunk: int) -> Iterator[str]:
        """The pieces of a one-request batch's answer (see `chat_stream`)."""
        printed, text = "", ""
        for out in self.generator.stream(batch, sampling, chunk=chunk):
            ids = trim(out["tokens"][0], int(out["length"][0]), self.eos_id)
            final = bool(out["done"][0]) or out["step"] >= sampling.max_new_tokens
            text, stable = self._decode_text(ids), self.stable_text(ids, final)
            if stable.startswith(printed) and len(stable) > len(printed):
                yield stable[len(printed):]
                printed = stable
        return text

    def stable_text(self, ids: Sequence[int], final: bool) -> str:
        """The text of an answer's ids so far that more ids cannot change (all of it once `final`)."""
        return self._decode_text(ids if final else ids[:self._stable_prefix(ids)])

    def _stable_prefix(self, ids: Sequence[int]) -> int:
        """Tokens whose text cannot change when more come: up to the last non-byte piece (a run of
        byte-fallback pieces decodes only once it is complete UTF-8)."""
        pieces = self.tokenizer.convert_ids_to_tokens(list(ids))
        k = len(pieces)
        while k > 0 and _BYTE_PIECE.fullmatch(pieces[k - 1] or ""):
            k -= 1
        return k

    def generate(self, requests: Sequence[dict], batch_size: int = 8, sampling: Sampling | None = None,
                 progress: Callable[[int], None] | None = None, **sampling_kwargs) -> list[str]:
        """Answers for requests `{"images": [...], "videos": [...], "messages": ...}` (or `"prompt"`: raw
        template text with ``<image>`` and ``<|video|>`` tags), in order; an optional `"name"` says which
        one an error is about (default
        "request i"). Runs in batches of `batch_size` (the last one padded, so every batch reuses one
        compilation per prompt-length bucket), shortest prompts together; `progress(n)` is called after
        each batch with the number of requests it finished."""
        sampling = self._sampling(sampling, sampling_kwargs)
        # Every request is checked before the first batch runs: a bad one late in the list loses no work.
        encoded = [self.encode_request(r, sampling, r.get("name", f"request {i}")) for i, r in enumerate(requests)]
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        answers: list[str | None] = [None] * len(requests)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            pixels = [self.images(requests[i].get("images")) for i in idx]
            clips = [self.clips(requests[i].get("videos")) for i in idx]
            batch = make_batch([encoded[i] for i in idx], [x for p in pixels for x in p], [len(p) for p in pixels],
                               self.cfg, pad_id=self.generator.pad_id, min_batch=bucket_count(batch_size),
                               clips=[x for c in clips for x in c], num_videos=[len(c) for c in clips])
            out = self.generator.generate(batch, sampling)
            for row, i in enumerate(idx):
                answers[i] = self._decode_text(trim(out["tokens"][row], int(out["length"][row]), self.eos_id))
            if progress is not None:
                progress(len(idx))
        return answers

    # -- scoring -----------------------------------------------------------------------------
    def logits(self, input_ids, pixel_values=None, num_images=None, attention_mask=None,
               videos: Videos | None = None) -> np.ndarray:
        """Raw logits float32[B, T, V] of a full forward. input_ids int[B, T] with -1 placeholders
        (tokens_per_image per image); pixel_values float[M, S, S, 3] CLIP-normalised; num_images
        int[B]; attention_mask int/bool[B, T] (default all ones; left or right padding); videos: the
        video model's clips (`owl_jax.models.owl.Videos`, their placeholders -2)."""
        input_ids = np.asarray(input_ids, np.int32)
        b, t = input_ids.shape
        mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if pixel_values is not None and len(pixel_values) == 0:
            pixel_values = None
        if num_images is None:
            num_images = np.zeros((b,), np.int32)
        with self.generator._context():
            out = _forward(
                self.params,
                jnp.asarray(input_ids),
                None if pixel_values is None else jnp.asarray(pixel_values),
                jnp.asarray(num_images, jnp.int32),
                jnp.asarray(mask),
                None if videos is None else jax.tree_util.tree_map(jnp.asarray, videos),
                cfg=self.cfg,
            )
        return np.asarray(out)

    def score(self, images: Sequence[ImageLike] | None, prompt: Messages, candidates: Sequence[str],
              include_eos: bool = False, batch_size: int = 16) -> np.ndarray:
        """Log-likelihood float64[len(candidates)] of each candidate as the AI's answer to `prompt`
        (a question, or messages ending with one) about `images`: the sum of the answer tokens'
        log-probabilities (plus EOS's with include_eos). Rank with argmax, as multiple-choice
        benchmarks (MMBench, SEED-Bench) do."""
        pixels = self.images(images)
        turns, system = normalize_messages(prompt)
        prompt_ids = self.encode(conversation.build_prompt(len(pixels), turns, system_prompt=system))
        rows, starts = [], []
        for cand in candidates:
            # The answer is a chunk of its own, as in training (where it follows the "AI: " chunk).
            answer = encode_text(self.tokenizer, cand) + ([self.eos_id] if include_eos else [])
            rows.append(np.concatenate([prompt_ids, np.asarray(answer, np.int32)]))
            starts.append(len(prompt_ids))
        scores = np.zeros((len(candidates),), np.float64)
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo:lo + batch_size]
            b = max(bucket_count(len(chunk)), 1)
            t = bucket_length(max(len(r) for r in chunk))
            ids = np.zeros((b, t), np.int32)
            mask = np.zeros((b, t), bool)
            target = np.zeros((b, t), bool)
            for i, r in enumerate(chunk):
                ids[i, :len(r)] = r
                mask[i, :len(r)] = True
                target[i, starts[lo + i]:len(r)] = True
            counts = np.zeros((b,), np.int32)
            counts[:len(chunk)] = len(pixels)
            pix = None
            if pixels:
                m = bucket_count(len(chunk) * len(pixels))
                pix = np.zeros((m,) + pixels[0].shape, np.float32)
                pix[:len(chunk) * len(pixels)] = np.stack(pixels * len(chunk))
            with self.generator._context():
                ll = _sequence_logprob(self.params, jnp.asarray(ids), None if pix is None else jnp.asarray(pix),
                                       jnp.asarray(counts), jnp.asarray(mask), jnp.asarray(target), cfg=self.cfg)
            scores[lo:lo + len(chunk)] = np.asarray(ll, np.float64)[:len(chunk)]
        return scores


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params, input_ids, pixel_values, num_images, mask, videos=None, *, cfg: OwlConfig):
    """Logits float32[B, T, V]; params in the training or the decode layout."""
    from owl_jax.models import quantization

    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    return (
        quantization.model(cfg, decode_layout=is_decode_layout(params))
        .apply({"params": params}, input_ids, pixel_values, num_images, mask, positions, videos=videos)
        .astype(jnp.float32)
    )


@functools.partial(jax.jit, static_argnames=("cfg",))
def _sequence_logprob(params, input_ids, pixel_values, num_images, mask, target, *, cfg: OwlConfig):
    """Sum over t with target[t] of log p(ids[t] | ids[<t]) -> float32[B]."""
    logits = _forward.__wrapped__(params, input_ids, pixel_values, num_images, mask, cfg=cfg)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nxt = jnp.maximum(input_ids[:, 1:], 0)
    tok = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(target[:, 1:], tok, 0.0), axis=1)


def find_tokenizer(checkpoint: str) -> str | None:
    for d in (checkpoint, os.path.join(checkpoint, "tokenizer")):
        if any(os.path.exists(os.path.join(d, f)) for f in ("tokenizer.model", "tokenizer.json")):
            return d
    return None


def shard_params(params: Any, cfg: OwlConfig, mesh, rules) -> Any:
    """Places params on `mesh` by their logical axis names under `rules`."""
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    specs = nn.get_partition_spec(abstract)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    return jax.device_put(params, shardings)


def load(path: str, tokenizer: Any = None, mesh=None, rules=None, dtype: str | None = None,
         prompt_tokenization: str = "release", quantize: str | None = None) -> Owl:
    """Loads an owl_jax params dir (`python -m owl_jax.convert from-torch` / `save_params` output).

    `tokenizer`: a tokenizer object, or a path (dir or .model); default: the checkpoint dir or its
    `tokenizer/` subdir. `mesh` + `rules` (logical axis rules; default `owl_jax.sharding.DEFAULT_RULES`,
    the training layout) shard the params; `dtype` (e.g.
    "bfloat16") casts the parameters and the compute. `prompt_tokenization`: "release" (the released
    processor's) or "training" (see `owl_jax.data.text.encode_prompt`). `quantize="int8"`: the LLM's
    weights held in int8 (`owl_jax.models.quantization`; LoRA merged first), one device."""
    # The tokenizer is checked against the config before the params load (minutes for 7B).
    tokenizer = open_tokenizer(tokenizer if tokenizer is not None else find_tokenizer(path),
                               params_io.load_config(path), path)
    params, cfg = params_io.load_params(path)
    return from_params(params, cfg, tokenizer, mesh, rules, dtype, where=path, prompt_tokenization=prompt_tokenization,
                       quantize=quantize)


def open_tokenizer(tokenizer: Any, cfg: OwlConfig, where: str = "the params") -> Any:
    """A tokenizer (object, or a path: dir or .model) for the model of `cfg` (from `where`). One with
    more ids than the model's vocabulary is refused: the extra ids have no embedding, and a prompt
    holding one gets NaN logits and an empty answer."""
    from owl_jax.data.tokenizer import load_tokenizer

    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer in {where} (tokenizer.model / tokenizer.json, or a tokenizer/ subdir); "
                                "pass tokenizer=PATH (--tokenizer)")
    name = os.fspath(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else getattr(tokenizer, "name_or_path", "")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(name)
    if len(tokenizer) > cfg.llm.vocab_size:
        raise UserError(f"tokenizer {name or type(tokenizer).__name__} has {len(tokenizer)} tokens but the model in "
                        f"{where} has a vocabulary of {cfg.llm.vocab_size} (llm.vocab_size): use the tokenizer it was "
                        "trained with")
    return tokenizer


def from_params(params: Any, cfg: OwlConfig, tokenizer: Any, mesh=None, rules=None, dtype: str | None = None,
                where: str = "the params", prompt_tokenization: str = "release", quantize: str | None = None) -> Owl:
    """An `Owl` from params in memory (numpy or jax arrays, unboxed) and a tokenizer (object or path)."""
    import dataclasses

    tokenizer = open_tokenizer(tokenizer, cfg, where)
    params = nn.unbox(params)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
        params = jax.tree_util.tree_map(
            lambda x: np.asarray(x).astype(jnp.dtype(dtype)) if np.issubdtype(np.asarray(x).dtype, np.floating) else x,
            params,
        )
    if quantize is not None:
        if quantize != "int8" or mesh is not None:
            raise UserError(f"quantize={quantize!r}" + (" on a mesh: int8 weights run on one device" if mesh is not None
                                                        else ": expected 'int8'"))
        params, cfg = int8_model(params, cfg)
        return Owl(params, cfg, tokenizer, prompt_tokenization=prompt_tokenization)
    if mesh is not None:
        if rules is None:
            from owl_jax.sharding import DEFAULT_RULES as rules
        params = shard_params(params, cfg, mesh, rules)
    else:
        params = jax.device_put(params)
    return Owl(params, cfg, tokenizer, mesh=mesh, rules=rules, prompt_tokenization=prompt_tokenization)


def int8_model(params: Any, cfg: OwlConfig) -> tuple[Any, OwlConfig]:
    """Float params -> the int8 model's (LoRA merged into the kernels, decode layout) and its config."""
    import dataclasses

    from flax import traverse_util

    from owl_jax.convert import merged_kernels
    from owl_jax.models import quantization
    from owl_jax.models.config import LoraConfig
    from owl_jax.models.owl import to_decode_layout

    if cfg.lora.rank:
        params = traverse_util.unflatten_dict(merged_kernels(params, cfg))
    cfg = dataclasses.replace(cfg, lora=LoraConfig(rank=0), weight_quantization="int8")
    if not is_decode_layout(params):
        params = to_decode_layout(params)
    # Quantised on the host: the float weights never sit on the device beside their int8 copies
    # (7B in bf16: 13.3 GiB + 7.1 would not fit a 16 GB chip).
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        quantized = quantization.quantize(params, cfg)
    return jax.device_put(quantized, jax.local_devices()[0]), cfg
