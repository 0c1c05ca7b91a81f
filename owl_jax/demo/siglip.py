"""The tiny ViT pretrained as CLIP is: a contrastive image-text objective (SigLIP's sigmoid loss) on
freshly drawn ShapesWorld scenes and their captions; then linear probes on its patch features.

The image tower is the owl's own vision encoder (its parameters go to the owl unchanged), pooled by
attention from one learnt query (SigLIP's "MAP" head); the text tower is a small LLaMA over the
caption's tokens, read at its last token. Both project to a shared width; the loss scores every
image-caption pair of a batch by a sigmoid of t * cos + b (Zhai et al. 2023, as big_vision writes it).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from owl_jax.batch import EOS_ID
from owl_jax.data.image import preprocess
from owl_jax.data.tokenizer import encode_text
from owl_jax.demo import scenes as sw
from owl_jax.demo.draw import render_scene
from owl_jax.models.config import LlamaConfig, VisionConfig
from owl_jax.models.llama import LlamaModel
from owl_jax.models.vision import VisionEncoder

COLOURS, SHAPES, REGIONS = list(sw.COLOURS), list(sw.SHAPES), list(sw.REGION_ORDER)
# What a twin changes: a shape's kind, a shape's colour, the number of shapes, one letter of the
# written word. Shape first: at 112 pixels a shape spans about two patches, and a ViT told colour and
# place apart long before kind. A scene with a word gets a one-letter twin half the time: no other
# twin makes the letters matter, and without them pretraining loses what a random ViT reads of them.
TWIN_KINDS = ("shape", "colour", "count", "word")
TWIN_CHANGES = (0.5, 0.25, 0.25)  # shape, colour, count (a scene without a word, or no letter twin)
LETTER_TWIN_SHARE = 0.5
LETTER_TWIN = TWIN_KINDS.index("word")


# CoCa's weights: its captioning loss counts twice its contrastive one (Yu et al. 2022).
CAPTION_WEIGHT = 2.0


class SigLIP(nn.Module):
    vision: VisionConfig
    text: LlamaConfig
    embed_dim: int
    caption_layers: int = 0  # > 0: CoCa's captioner too, a LLaMA of this depth over [image tokens, caption]

    def setup(self):
        self.vision_model = VisionEncoder(self.vision)
        self.pool_query = self.param("pool_query", nn.initializers.normal(0.02), (1, 1, self.vision.hidden_size))
        self.pool = nn.MultiHeadDotProductAttention(num_heads=self.vision.num_heads)
        self.image_proj = nn.Dense(self.embed_dim)
        self.text_model = LlamaModel(self.text)
        self.text_proj = nn.Dense(self.embed_dim)
        self.log_temperature = self.param("log_temperature", nn.initializers.constant(np.log(10.0)), ())
        self.bias = self.param("bias", nn.initializers.constant(-10.0), ())
        if self.caption_layers:
            self.caption_in = nn.Dense(self.text.hidden_size)
            image_tokens = 1 + (self.vision.image_size // self.vision.patch_size) ** 2
            self.captioner = LlamaModel(dataclasses.replace(
                self.text, num_layers=self.caption_layers,
                max_position_embeddings=self.text.max_position_embeddings + image_tokens))
            self.caption_head = nn.Dense(self.text.vocab_size, use_bias=False)

    def embed_images(self, pixels=None, tokens=None):
        """float[N, S, S, 3] (or the ViT's tokens float[N, 1 + P, D]) -> unit float[N, E]."""
        tokens = self.vision_model(pixels) if tokens is None else tokens  # float[N, 1 + P, D]
        query = jnp.broadcast_to(self.pool_query, (tokens.shape[0], 1, tokens.shape[-1]))
        pooled = self.pool(query, tokens)[:, 0]
        z = self.image_proj(pooled)
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    def embed_texts(self, ids, mask):
        """ids, mask int[N, T] (the caption, EOS last) -> unit float[N, E], read at the last token."""
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        h = self.text_model(self.text_model.embed(ids), positions, mask.astype(bool))
        last = jnp.take_along_axis(h, (mask.sum(1) - 1)[:, None, None], axis=1)[:, 0]
        z = self.text_proj(last)
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    def __call__(self, pixels, ids, mask):
        """Pair logits float[N, N] (images x captions)."""
        zimg, ztxt = self.embed_images(pixels), self.embed_texts(ids, mask)
        return zimg @ ztxt.T * jnp.exp(self.log_temperature) + self.bias

    def losses(self, pixels, ids, mask, weights=None):
        """(sigmoid loss, caption loss: the captioner's next-token cross-entropy over the caption, read
        from the ViT's tokens, each token's weighted by `weights` float[N, T] (None: 1) and summed over
        the caption's token count; 0 without a captioner)."""
        tokens = self.vision_model(pixels)
        logits = self.embed_images(tokens=tokens) @ self.embed_texts(ids, mask).T
        contrastive = sigmoid_loss(logits * jnp.exp(self.log_temperature) + self.bias)
        if not self.caption_layers:
            return contrastive, jnp.zeros(())
        nll = optax.softmax_cross_entropy_with_integer_labels(self.caption_logits(ids, mask, tokens=tokens), ids)
        weighted = nll * mask if weights is None else nll * mask * weights
        return contrastive, jnp.sum(weighted) / jnp.maximum(jnp.sum(mask), 1)

    def caption_logits(self, ids, mask, pixels=None, tokens=None):
        """The captioner's predictions float[N, T, V] of caption tokens ids[:, t] (from the image and
        ids[:, :t]), over the image's pixels or the ViT's tokens float[N, 1 + P, D]."""
        tokens = self.vision_model(pixels) if tokens is None else tokens
        prefix = self.caption_in(tokens)  # float[N, 1 + P, W]
        x = jnp.concatenate([prefix, self.captioner.embed(ids)], axis=1)
        keep = jnp.concatenate([jnp.ones(prefix.shape[:2], bool), mask.astype(bool)], axis=1)
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        h = self.captioner(x, positions, keep)
        # the last image token predicts the caption's first token, caption token t the next one
        return self.caption_head(h[:, prefix.shape[1] - 1:-1]).astype(jnp.float32)


def sigmoid_loss(logits):
    """float[N, N] pair logits, the diagonal matched -> mean over images of the summed pair losses."""
    labels = 2 * jnp.eye(logits.shape[0]) - 1
    return -jnp.mean(jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=-1))


# ------------------------------------------------------------------------------------ data


def located_caption(scene: dict) -> str:
    """The ViT's caption: each region in turn, then what is there ("left red circle, top no shape,
    center word KEPLO, right blue star, bottom no shape."). Each content word then follows the place it
    is read from, so the captioner looks it up by position, which the patches' position code gives it
    at once, and its loss on a shape's kind or a letter reaches the ViT's patches there as directly as
    a supervised read-out's (LocCa, Wan et al. 2024). The main job's captions (`scenes.describe`) name
    the shapes first and must be read by colour, a lookup the captioner learns late."""
    by_region = {s["region"]: s for s in scene["shapes"]}
    parts = []
    for region in REGIONS:
        if region in by_region:
            parts.append(f"{region} {by_region[region]['colour']} {by_region[region]['shape']}")
        elif region == "center" and scene["word"]:
            parts.append(f"center word {scene['word']}")
        else:
            parts.append(f"{region} no shape")
    return ", ".join(parts) + "."


class Scenes:
    """Freshly drawn scenes, rendered and captioned, batch by batch: batch k of a stream (0:
    training, 1 and 2: the probes' train and test scenes) is a function of (seed, stream, k) alone.
    A scene whose
    caption sample belongs to the held-out captions (`exclude`, ShapesWorld sample keys) is
    redrawn."""

    def __init__(self, tokenizer, image_size: int, max_len: int, seed: int, exclude: set = frozenset()):
        self.tokenizer, self.image_size, self.max_len, self.seed, self.exclude = (
            tokenizer, image_size, max_len, seed, exclude)
        self._chunks: dict[str, tuple] = {}

    def draw(self, rng: np.random.Generator, word: bool | None = None) -> dict:
        while True:
            scene = sw.sample_scene(rng, word=word)
            item = {"category": "caption", "scenes": [scene], "caption": sw.describe(scene)}
            if sw.sample_key(item) not in self.exclude:
                return scene

    def twin(self, scene: dict, rng: np.random.Generator, kind: int | None = None) -> dict:
        """`scene` with one thing changed (`kind`, an index of TWIN_KINDS; None: a letter of the word
        LETTER_TWIN_SHARE of the time where there is one, else drawn by TWIN_CHANGES): a shape's kind
        or colour, one shape more or fewer (the others stay where they are), or one letter of the
        word. Random scenes differ in many ways at once, and colour alone tells most captions apart;
        a twin in the same batch is told apart only by what changed."""
        if kind is None and scene["word"] and rng.random() < LETTER_TWIN_SHARE:
            kind = LETTER_TWIN
        for _ in range(100):
            twin = json.loads(json.dumps(scene))
            shapes = twin["shapes"]
            kind = rng.choice(3, p=TWIN_CHANGES) if kind is None else kind
            i = int(rng.integers(len(shapes)))
            if kind == LETTER_TWIN:
                word = list(twin["word"])
                j = int(rng.integers(len(word)))
                word[j] = str(rng.choice([c for c in sw.LETTERS if c != word[j]]))
                twin["word"] = "".join(word)
            elif kind == 0:
                shapes[i]["shape"] = str(rng.choice([t for t in SHAPES if t != shapes[i]["shape"]]))
            elif kind == 1:
                shapes[i]["colour"] = str(rng.choice([c for c in COLOURS if c != shapes[i]["colour"]]))
            elif len(shapes) > 1 and (len(shapes) == 4 or rng.random() < 0.5):
                del shapes[i]
            else:
                other = sw.sample_scene(rng, n_shapes=1, word=bool(twin["word"]))["shapes"][0]
                if other["region"] in {t["region"] for t in shapes}:
                    continue
                shapes.append(other)
                shapes.sort(key=lambda t: REGIONS.index(t["region"]))
            item = {"category": "caption", "scenes": [twin], "caption": sw.describe(twin)}
            if sw.sample_key(item) not in self.exclude:
                return twin
        return self.draw(rng)

    def batch(self, k: int, n: int, stream: int = 0, twins: bool = False
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
        """pixels float[n, S, S, 3], ids int32[n, T], mask int32[n, T], the scenes. `twins`: the
        second half of the batch is the first half's twins."""
        rng = np.random.default_rng([self.seed, stream, k])
        drawn = [self.draw(rng) for _ in range(n - n // 2 if twins else n)]
        if twins:
            drawn += [self.twin(s, rng) for s in drawn[: n // 2]]
        return *self.render(drawn), drawn

    def render(self, drawn: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The scenes' pixels float[n, S, S, 3] and captions: ids, mask int32[n, T] (EOS last)."""
        n = len(drawn)
        pixels = np.stack([preprocess(render_scene(s), self.image_size) for s in drawn])
        ids = np.zeros((n, self.max_len), np.int32)
        mask = np.zeros((n, self.max_len), np.int32)
        for i, s in enumerate(drawn):
            t = (encode_text(self.tokenizer, located_caption(s)) + [EOS_ID])[-self.max_len:]
            ids[i, : len(t)], mask[i, : len(t)] = t, 1
        return pixels, ids, mask

    def focus_weights(self, drawn: list[dict], focus: float) -> np.ndarray:
        """float32[n, T], aligned with `render`'s ids: `focus` on the tokens of the caption's shape
        words and of its written word, 1 elsewhere: the words the captioner learns last (a shape's
        kind spans two patches, a letter part of one), a few of a caption's tokens. SentencePiece
        never merges across a space, so a caption's ids are its space-separated chunks' ids one
        after the other, and each chunk's tokens are known."""
        out = np.ones((len(drawn), self.max_len), np.float32)
        if focus == 1.0:
            return out
        for i, s in enumerate(drawn):
            w = []
            for chunk in located_caption(s).split(" "):
                word = chunk.rstrip(".,")  # its punctuation is its last pieces
                focused = len(self._chunk_ids(word)) if word in sw.SHAPES or word == s["word"] else 0
                w += [focus] * focused + [1.0] * (len(self._chunk_ids(chunk)) - focused)
            w = np.array(w + [1.0])[-self.max_len:]  # EOS last
            out[i, : len(w)] = w
        return out

    def _chunk_ids(self, chunk: str) -> tuple:
        if chunk not in self._chunks:  # the grammar's chunks recur; a written word adds one (small)
            self._chunks[chunk] = tuple(encode_text(self.tokenizer, chunk))
        return self._chunks[chunk]


# ------------------------------------------------------------------------------------ training


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int
    batch_size: int
    lr: float
    end_lr: float
    warmup_steps: int
    weight_decay: float
    embed_dim: int
    text_layers: int
    text_width: int
    text_heads: int
    caption_len: int
    log_every_steps: int
    seed: int
    twins: bool = True  # half of every batch: twins of the other half (Scenes.twin)
    caption_layers: int = 0  # > 0: CoCa, a captioner of this depth beside the contrastive loss
    focus_weight: float = 1.0  # the captioner's loss weight on shape words and letters (Scenes.focus_weights)


def text_config(s: Settings, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=s.text_width, num_layers=s.text_layers,
                       num_heads=s.text_heads, num_kv_heads=s.text_heads, mlp_size=4 * s.text_width,
                       max_position_embeddings=max(64, s.caption_len))


def train(vision: VisionConfig, settings: Settings, data: Scenes, vocab_size: int, log=print) -> tuple[dict, list]:
    """Trains the two towers (and the captioner) from scratch; returns (params, [(step, sigmoid loss,
    seconds, caption loss)])."""
    s = settings
    model = SigLIP(vision, text_config(s, vocab_size), s.embed_dim, s.caption_layers)
    pixels, ids, mask, _ = data.batch(0, 2)
    params = model.init(jax.random.PRNGKey(s.seed), pixels, ids, mask, method=SigLIP.losses)["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, s.warmup_steps, max(s.steps, s.warmup_steps + 1), s.end_lr)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=s.weight_decay))
    opt_state = opt.init(params)

    def total(p, pixels, ids, mask, weights):
        contrastive, caption = model.apply({"params": p}, pixels, ids, mask, weights, method=SigLIP.losses)
        return contrastive + CAPTION_WEIGHT * caption, (contrastive, caption)

    @jax.jit
    def step(params, opt_state, pixels, ids, mask, weights):
        (_, parts), grads = jax.value_and_grad(total, has_aux=True)(params, pixels, ids, mask, weights)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    history, t0 = [], time.time()
    for k in range(s.steps):
        pixels, ids, mask, drawn = data.batch(k, s.batch_size, twins=s.twins)
        weights = data.focus_weights(drawn, s.focus_weight)
        params, opt_state, (loss, caption) = step(params, opt_state, pixels, ids, mask, weights)
        if (k + 1) % s.log_every_steps == 0 or k + 1 == s.steps:
            loss, caption = float(loss), float(caption)
            if not np.isfinite(loss + caption):
                raise FloatingPointError(f"SigLIP loss {loss}, caption loss {caption} at step {k + 1}")
            history.append((k + 1, loss, time.time() - t0, caption))
            log(f"   siglip step {k + 1}/{s.steps}: loss {loss:.4f}"
                + (f", caption loss {caption:.4f}" if s.caption_layers else "") + f" ({time.time() - t0:.0f} s)")
    return nn.unbox(jax.device_get(params)), history  # plain arrays: the saved model restores as it was


# ------------------------------------------------------------------------------------ probes


WORD_SLOTS = 6  # the longest written word (scenes.random_word)
NO_LETTER = len(sw.LETTERS)


def scene_labels(drawn: list[dict]) -> dict[str, np.ndarray]:
    """Per scene: colour int[5] and shape int[5] per region (len(COLOURS) / len(SHAPES) = empty),
    occupied int[5] (0/1 per region), count int (shapes - 1), letters int[WORD_SLOTS] (the written
    word's, NO_LETTER past its end or without one)."""
    n = len(drawn)
    colour = np.full((n, len(REGIONS)), len(COLOURS))
    shape = np.full((n, len(REGIONS)), len(SHAPES))
    letters = np.full((n, WORD_SLOTS), NO_LETTER)
    for i, scene in enumerate(drawn):
        for item in scene["shapes"]:
            r = REGIONS.index(item["region"])
            colour[i, r], shape[i, r] = COLOURS.index(item["colour"]), SHAPES.index(item["shape"])
        letters[i, : len(scene["word"])] = [sw.LETTERS.index(c) for c in scene["word"]]
    return {"colour": colour, "shape": shape, "region": (colour < len(COLOURS)).astype(np.int64),
            "count": np.array([len(s["shapes"]) - 1 for s in drawn]), "letters": letters}


PROBE_CLASSES = {"colour": (len(REGIONS), len(COLOURS) + 1), "shape": (len(REGIONS), len(SHAPES) + 1),
                 "region": (len(REGIONS), 2), "count": (1, 4), "letters": (WORD_SLOTS, NO_LETTER + 1)}


@functools.lru_cache(maxsize=None)
def _flat_tokens(vision: VisionConfig):
    """One jitted ViT forward per config, so every probe set (and ViT) reuses its compilation."""
    encoder = VisionEncoder(vision)
    return jax.jit(lambda p, x: encoder.apply({"params": p}, x).reshape(x.shape[0], -1))


def patch_features(vision: VisionConfig, vision_params, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
    """The ViT's output tokens, flattened: float32[N, (1 + P) * D]."""
    f = _flat_tokens(vision)
    return np.concatenate([np.asarray(f(vision_params, pixels[i:i + batch])) for i in range(0, len(pixels), batch)])


RIDGE_LAMBDAS = tuple(10.0 ** k for k in range(-3, 4))  # times the mean of the Gram matrix's diagonal


def linear_probes(train_x, train_labels, test_x, test_labels) -> dict:
    """One linear read-out per property, fitted by ridge regression to +-1 one-hot targets on frozen
    features (as big_vision's few-shot probes are), its L2 weight chosen per property by
    leave-one-out accuracy on the training scenes (closed form, from one eigendecomposition of the
    Gram matrix). Held-out accuracy per property: colour and shape over the occupied regions, region
    over every (region, occupied?) pair, count over scenes, letters over the written words' letters."""
    x = np.asarray(train_x, np.float64)
    mu = x.mean(0)
    x, t = x - mu, np.asarray(test_x, np.float64) - mu
    s, u = np.linalg.eigh(x @ x.T)  # Gram matrix, [N, N]
    s = np.maximum(s, 0.0)
    cross = t @ x.T  # [M, N]
    scale = s.sum() / len(s)
    out = {}
    for name, (slots, classes) in PROBE_CLASSES.items():
        y_train = np.asarray(train_labels[name]).reshape(len(x), slots)
        y_test = np.asarray(test_labels[name]).reshape(len(t), slots)
        targets = (2 * np.eye(classes)[y_train] - 1).reshape(len(x), slots * classes)
        uy = u.T @ targets
        best = None
        for lam in RIDGE_LAMBDAS:
            shrink = s / (s + lam * scale)
            fitted = u @ (shrink[:, None] * uy)
            hat_diag = (u * u) @ shrink
            loo = (fitted - hat_diag[:, None] * targets) / (1 - hat_diag)[:, None]
            loo_pred = loo.reshape(len(x), slots, classes).argmax(-1)
            score = _accuracy(name, loo_pred, y_train, train_labels)
            if best is None or score > best[0]:
                best = (score, lam)
        alpha = u @ ((1 / (s + best[1] * scale))[:, None] * uy)
        pred = (cross @ alpha).reshape(len(t), slots, classes).argmax(-1)
        out[name] = _accuracy(name, pred, y_test, test_labels)
    return out


def _accuracy(name: str, pred, labels, all_labels: dict) -> float:
    if name in ("colour", "shape"):
        return float((pred == labels)[np.asarray(all_labels["region"]) == 1].mean())
    if name == "letters":
        return float((pred == labels)[labels < NO_LETTER].mean())
    return float((pred == labels).mean())


def probe_scenes(data: Scenes, num_train: int, num_test: int, batch: int = 256) -> dict:
    """The probes' scenes: {"train": (pixels, labels), "test": (pixels, labels)}, drawn from `data`'s
    streams 1 (the probes' training) and 2 (held out), never among the ViT's training scenes
    (stream 0)."""
    def draw(stream: int, n: int):
        pix, drawn = [], []
        for i in range((n + batch - 1) // batch):
            p, _, _, d = data.batch(i, min(batch, n - i * batch), stream)
            pix.append(p)
            drawn += d
        return np.concatenate(pix), scene_labels(drawn)

    return {"train": draw(1, num_train), "test": draw(2, num_test)}


def probe_vit(vision: VisionConfig, vision_params, scenes: dict) -> dict:
    """Linear probes on the frozen ViT's patch features over `probe_scenes`: accuracy per property."""
    (train_pixels, train_labels), (test_pixels, test_labels) = scenes["train"], scenes["test"]
    return linear_probes(patch_features(vision, vision_params, train_pixels), train_labels,
                         patch_features(vision, vision_params, test_pixels), test_labels)


def twin_accuracy(vision: VisionConfig, settings: Settings, vocab_size: int, params, data: Scenes, pairs: int = 256,
                  batch: int = 64) -> dict:
    """Held-out pairs of twins per kind of change (TWIN_KINDS; scenes of `data`'s stream 3): the share
    of pairs where both images score their own caption above their twin's. A model that ignores the
    image scores 0 (one of the two prefers the wrong caption), one that guesses at random 0.25."""
    model = SigLIP(vision, text_config(settings, vocab_size), settings.embed_dim, settings.caption_layers)
    # params as an argument: closed over, they would be baked into the program as constants
    score = jax.jit(lambda p, x, ids, mask: model.apply({"params": p}, x, ids, mask))
    out = {}
    for kind, name in enumerate(TWIN_KINDS):
        correct = 0
        for k in range(pairs // (batch // 2)):
            rng = np.random.default_rng([data.seed, 3, kind, k])
            first = [data.draw(rng, word=True if kind == LETTER_TWIN else None) for _ in range(batch // 2)]
            pixels, ids, mask = data.render(first + [data.twin(sc, rng, kind) for sc in first])
            logits = np.asarray(score(params, pixels, ids, mask))
            h = batch // 2
            own, other = np.diagonal(logits), np.concatenate([np.diagonal(logits, h), np.diagonal(logits, -h)])
            correct += int(((own[:h] > other[:h]) & (own[h:] > other[h:])).sum())
        out[name] = correct / (pairs // (batch // 2) * (batch // 2))
    return out
