"""MplugOwl: vision encoder + visual abstractor + LLaMA, images spliced into the text."""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from owl_jax.batch import IMAGE_PLACEHOLDER_ID, VIDEO_PLACEHOLDER_ID
from owl_jax.models import llama
from owl_jax.models.abstractor import VisualAbstractor
from owl_jax.models.config import OwlConfig, RunOptions
from owl_jax.models.layers import partitioned, trace_platform
from owl_jax.models.llama import LlamaForCausalLM
from owl_jax.models.vision import VisionEncoder


def splice_images(
    text_embeds: jax.Array,
    image_tokens: jax.Array,
    is_image: jax.Array,
    num_images: jax.Array,
    image_start: jax.Array | None = None,
) -> jax.Array:
    """Puts the k-th image of each sample into the k-th run of placeholders of that sample.

    text_embeds float[B, T, D]; image_tokens float[M, P, D] (the batch's images, flat, in sample order;
    P tokens per image); is_image bool[B, T]; num_images int[B]; image_start int[B] index of each
    sample's first image (default: images packed, the exclusive cumsum of num_images; multi-process
    batches pass it, as each process's images start at its own block). Returns float[B, T, D].
    Vectorised: the j-th placeholder of a sample takes row j % P of its image j // P.

    Adjacent tags (`<image><image>`, one run of 2P placeholders) therefore take the sample's next two
    images in order, as tags with text between do. The release differs there: it starts an image only
    where the placeholder value changes (`get_media_indices`), and every tag's placeholders are the
    same -1, so it reads the run as one image, leaves the second P positions as the embedding of
    the id it put in their place (1 in forward, 0 in generate) and never uses the second image
    (generate then also gives the next samples of its batch the image before their own). Here every
    tag shows its image: the tags and images a sample has agree, and nothing is dropped silently.
    """
    m, p, d = image_tokens.shape
    if m == 0:
        return text_embeds
    first_image = jnp.cumsum(num_images) - num_images if image_start is None else image_start
    rank = jnp.cumsum(is_image, axis=1) - 1  # [B, T] placeholder rank within the sample
    flat_index = (first_image[:, None] + rank // p) * p + rank % p
    flat_index = jnp.clip(flat_index, 0, m * p - 1)
    gathered = jnp.take(image_tokens.reshape(m * p, d), flat_index, axis=0)  # [B, T, D]
    return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


@flax.struct.dataclass
class Videos:
    """A batch's clips (the video model), beside its images: each sample's k-th `<|video|>` run of
    placeholders (VIDEO_PLACEHOLDER_ID) takes its k-th clip, as images do (`splice_images`).

    pixel_values float[V, F, H, W, 3]: V clip slots of F frames, CLIP-normalised; frames int[V]: how many
    of the F are the clip's (the rest, and unused slots (0), are ignored); num_videos int[B] (sum <= V);
    video_start int[B] or None: each sample's first clip slot (default: packed, as for images)."""

    pixel_values: jax.Array
    frames: jax.Array
    num_videos: jax.Array
    video_start: jax.Array | None = None


class MplugOwl(nn.Module):
    """Parameters (top level, as in the released checkpoint): vision_model, query_tokens,
    abstractor, language_model; the video model (cfg.video) adds temporal_query_tokens.

    decode_layout=True builds the LLM for decoding: layers unrolled (see `LlamaModel`) and the LM head
    kernel float[V, D] (see `LlamaForCausalLM`). Its params are `to_decode_layout` of the usual ones.

    run: how every module computes (dtypes, attention kernel, remat, layer loop); by default
    `cfg.run_options` for the platform being traced for (a mesh's, else JAX's default backend)."""

    cfg: OwlConfig
    decode: bool = False
    decode_layout: bool = False
    run: RunOptions | None = None

    def setup(self):
        cfg = self.cfg
        run = self.run or cfg.run_options(trace_platform())
        self.vision_model = VisionEncoder(cfg.vision, run)
        self.query_tokens = self.param(
            "query_tokens",
            partitioned(nn.initializers.truncated_normal(cfg.abstractor.initializer_range), (None, None, "embed")),
            (1, cfg.abstractor.num_queries, cfg.abstractor.hidden_size),
            run.param_dtype,
        )
        if cfg.abstractor.temporal_queries:
            # The release initialises them at zero; it never trains them from nothing, so neither do we.
            self.temporal_query_tokens = self.param(
                "temporal_query_tokens", partitioned(nn.initializers.zeros, (None, None, "embed")),
                (1, cfg.abstractor.num_queries, cfg.abstractor.hidden_size), run.param_dtype,
            )
        self.abstractor = VisualAbstractor(cfg.abstractor, cfg.llm.hidden_size, run)
        self.language_model = LlamaForCausalLM(cfg.llm, cfg.lora, run, decode=self.decode,
                                               scan_layers=not self.decode_layout,
                                               lm_head_vocab_major=self.decode_layout)

    def encode_images(self, pixel_values: jax.Array, deterministic: bool = True) -> jax.Array:
        """float[M, H, W, 3] CLIP-normalised -> float[M, Q + 1, D_llm] (65 tokens per image)."""
        features = self.vision_model(pixel_values, deterministic)
        queries = jnp.broadcast_to(self.query_tokens, (features.shape[0],) + self.query_tokens.shape[1:])
        return self.abstractor(queries, features, deterministic)

    def encode_videos(self, pixel_values: jax.Array, frames: jax.Array, deterministic: bool = True) -> jax.Array:
        """Clips float[V, F, H, W, 3] CLIP-normalised, frames int[V] (see `Videos`) -> float[V, Q + 1, D_llm],
        as many tokens as an image. Needs the video model (cfg.video)."""
        if not self.cfg.video:
            raise ValueError("videos need the video model (vision.temporal and abstractor.temporal_queries)")
        valid = jnp.arange(pixel_values.shape[1])[None, :] < frames[:, None]
        features = self.vision_model(pixel_values, deterministic, valid)  # [V, F, S, D_vision]
        expand = lambda tokens: jnp.broadcast_to(tokens, (features.shape[0],) + tokens.shape[1:])
        return self.abstractor(expand(self.query_tokens), features, deterministic,
                               expand(self.temporal_query_tokens), valid)

    def embed(self, input_ids, pixel_values, num_images, deterministic: bool = True, image_start=None,
              videos: Videos | None = None):
        """Text embeddings with the images (and clips) spliced in: int[B, T] -> float[B, T, D_llm]."""
        is_image = input_ids == IMAGE_PLACEHOLDER_ID
        is_video = input_ids == VIDEO_PLACEHOLDER_ID
        text = self.language_model.embed(jnp.where(is_image | is_video, 0, input_ids))
        if pixel_values is not None and pixel_values.shape[0]:
            text = splice_images(text, self.encode_images(pixel_values, deterministic), is_image, num_images,
                                 image_start)
        if videos is not None and videos.pixel_values.shape[0]:
            clips = self.encode_videos(videos.pixel_values, videos.frames, deterministic)
            text = splice_images(text, clips, is_video, videos.num_videos, videos.video_start)
        return text

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        num_images: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        image_start: jax.Array | None = None,
        videos: Videos | None = None,
    ) -> jax.Array:
        """Logits float[B, T, V].

        input_ids int[B, T] with `IMAGE_PLACEHOLDER_ID` (65 per image), pixel_values float[M, H, W, 3]
        (M fixed per batch; unused slots are ignored), num_images int[B] (sum <= M), attention_mask
        int/bool[B, T] (each token's sample in its row: 1 in an unpacked row, 1, 2, ... in a packed one,
        0 on padding; bool[B, S] over the cache when decoding), positions int[B, T] (default 0..T-1 within
        each sample), image_start int[B] (see splice_images), videos: the clips of the video model (`Videos`;
        their placeholders VIDEO_PLACEHOLDER_ID)."""
        return self._llm(self.language_model, input_ids, pixel_values, num_images, attention_mask, positions,
                         deterministic, image_start, videos)

    def hidden_states(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        num_images: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        image_start: jax.Array | None = None,
        videos: Videos | None = None,
    ) -> jax.Array:
        """The LLM's final hidden states float[B, T, D_llm], before the LM head (for
        `losses.answer_loss_from_hidden`, which applies the head to the answer tokens only); arguments
        as for `__call__`."""
        return self._llm(self.language_model.hidden_states, input_ids, pixel_values, num_images, attention_mask,
                         positions, deterministic, image_start, videos)

    def prefill_logits(self, input_ids, pixel_values, num_images, positions, cache_mask, videos=None):
        """Decoding's first pass (decode=True): the prompts int[B, P], images and clips spliced in, through
        the LLM, writing its cache (cache_mask bool[B, S] over the cache's slots); float32[B, V] logits
        of each row's last position."""
        embeds = self.embed(input_ids, pixel_values, num_images, videos=videos)
        return self._last_logits(embeds, positions, cache_mask)

    def step_logits(self, token, position, cache_mask):
        """One decoding step (decode=True): token int[B] at position int[B] -> float32[B, V] logits."""
        return self._last_logits(self.language_model.embed(token[:, None]), position[:, None], cache_mask)

    def _last_logits(self, embeds, positions, cache_mask):
        hidden = self.language_model.model(embeds, positions, cache_mask)
        return self.language_model.lm_head(hidden[:, -1:])[:, 0].astype(jnp.float32)

    def _llm(self, llm_fn, input_ids, pixel_values, num_images, attention_mask, positions, deterministic, image_start,
             videos=None):
        """llm_fn (the LLM or its `hidden_states`) on the embedded text with the images spliced in."""
        embeds = self.embed(input_ids, pixel_values, num_images, deterministic, image_start, videos)
        return llm_fn(
            inputs_embeds=embeds,
            positions=positions,
            attention_mask=attention_mask,
            deterministic=deterministic,
        )


def to_decode_layout(params: dict) -> dict:
    """MplugOwl params -> those of `MplugOwl(decode_layout=True)` (see `llama.to_decode_layout`);
    everything outside the LLM is shared."""
    return {**params, "language_model": llama.to_decode_layout(params["language_model"])}


def from_decode_layout(params: dict) -> dict:
    """Inverse of `to_decode_layout`."""
    return {**params, "language_model": llama.from_decode_layout(params["language_model"])}


def is_decode_layout(params: dict) -> bool:
    """Whether MplugOwl params are in the decode layout (LLM layers unrolled) or the training one."""
    return "layers" not in params["language_model"]["model"]


def dummy_inputs(cfg: OwlConfig) -> dict[str, jax.Array]:
    """The smallest batch that touches every parameter: one sample with one image."""
    ids = jnp.full((1, cfg.tokens_per_image + 1), IMAGE_PLACEHOLDER_ID, jnp.int32).at[0, 0].set(cfg.llm.bos_token_id)
    size = cfg.vision.image_size
    return {
        "input_ids": ids,
        "pixel_values": jnp.zeros((1, size, size, 3), jnp.float32),
        "num_images": jnp.ones((1,), jnp.int32),
    }


def init_params(cfg: OwlConfig, rng: jax.Array) -> dict:
    """Boxed params (nn.LogicallyPartitioned leaves). Wrap in jax.eval_shape for shapes only."""
    return MplugOwl(cfg).init(rng, **dummy_inputs(cfg))["params"]


def param_shapes(cfg: OwlConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter's path and shape, without allocating (jax.eval_shape)."""
    abstract = jax.eval_shape(lambda: nn.unbox(init_params(cfg, jax.random.PRNGKey(0))))
    return {p: tuple(x.shape) for p, x in traverse_util.flatten_dict(abstract).items()}


def init_missing(cfg: OwlConfig, paths: list[tuple[str, ...]], rng: jax.Array) -> dict[tuple[str, ...], np.ndarray]:
    """Fresh initialisation of just `paths` (host arrays): jit drops the initialisers of the rest."""

    @jax.jit
    def init(rng):
        flat = traverse_util.flatten_dict(nn.unbox(init_params(cfg, rng)))
        return {"/".join(p): flat[p] for p in paths}

    return {tuple(k.split("/")): np.asarray(v) for k, v in init(rng).items()}
