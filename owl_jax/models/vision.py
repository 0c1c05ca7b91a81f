"""CLIP ViT vision encoder in the released mPLUG-Owl layout."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from owl_jax.models.attention import attention
from owl_jax.models.config import RunOptions, VisionConfig
from owl_jax.models.layers import Dense, Dtype, LayerNorm, Stack, constrain, dot_accumulator, partitioned


def sincos2d_position_code(grid: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """float32[grid * grid, width]: each patch's (x, y) in sines and cosines of geometric frequencies,
    rows in the patches' row-major order (big_vision's `posemb_sincos_2d`)."""
    y, x = np.mgrid[:grid, :grid]
    omega = 1.0 / temperature ** (np.arange(width // 4) / max(width // 4 - 1, 1))
    x = x.reshape(-1, 1) * omega
    y = y.reshape(-1, 1) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class VisionAttention(nn.Module):
    cfg: VisionConfig
    run: RunOptions

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """float[N, S, D] -> float[N, S, D]; no mask (every image has all S tokens)."""
        n, s, d = x.shape
        h = self.cfg.num_heads
        init = nn.initializers.normal(self.cfg.initializer_range)
        dense = lambda f, axes, name: Dense(f, axes, dtype=self.run.dtype, param_dtype=self.run.param_dtype,
                                            kernel_init=init, name=name)
        # Fused projection; output axis ordered (head, {q,k,v}, head_dim) as in the released weights.
        qkv = dense(3 * d, ("embed", "heads"), "query_key_value")(x).reshape(n, s, h, 3, d // h)
        out = attention(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], None, impl=self.run.attention_impl)
        return dense(d, ("heads", "embed"), "dense")(out.reshape(n, s, d))


class VisionMLP(nn.Module):
    cfg: VisionConfig
    run: RunOptions

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.run.dtype, param_dtype=self.run.param_dtype,
                  kernel_init=nn.initializers.normal(self.cfg.initializer_range))
        x = quick_gelu(Dense(self.cfg.mlp_size, ("embed", "mlp"), name="fc1", **kw)(x))
        return Dense(self.cfg.hidden_size, ("mlp", "embed"), name="fc2", **kw)(x)


class TimeConv(nn.Module):
    """Depthwise convolution over frames, kernel 3, zero padding (the release's Conv3d with kernel
    (3, 1, 1) and groups = channels): out[t] = k[0] x[t-1] + k[1] x[t] + k[2] x[t+1] + b, per channel.
    kernel float[3, C] ≙ torch weight [C, 1, 3, 1, 1]."""

    run: RunOptions
    initializer_range: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """float[V, T, P, C] -> float[V, T, P, C]."""
        c = x.shape[-1]
        init = nn.initializers.normal(self.initializer_range)
        kernel = self.param("kernel", partitioned(init, (None, "mlp")), (3, c), self.run.param_dtype).astype(x.dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("mlp",)), (c,), self.run.param_dtype)
        padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)))
        out = kernel[0] * padded[:, :-2] + kernel[1] * padded[:, 1:-1] + kernel[2] * padded[:, 2:]
        return out + bias.astype(x.dtype)


class LocalTemporal(nn.Module):
    """The release's video-model module in each vision layer (`temporal`): every patch position of a
    clip mixes with the same position in the neighbouring frames through a bottleneck of half the width,
    up_proj(quick_gelu(conv(down_proj(ln(x))))); LayerNorm eps 1e-5 (torch's default, which the release
    leaves). Fresh up_proj weights are zero, as the release's."""

    cfg: VisionConfig
    run: RunOptions

    @nn.compact
    def __call__(self, x: jax.Array, frame_valid: jax.Array) -> jax.Array:
        """x float[V, T, S, D], frame_valid bool[V, T] -> float[V, T, S, D]: the patches' update and, at the
        class token, the class token itself. The release returns it so (and adds the result to x), which
        doubles each frame's class token in every layer of a clip; kept, for the released weights."""
        d, run = self.cfg.hidden_size, self.run
        kw = dict(dtype=run.dtype, param_dtype=run.param_dtype)
        init = nn.initializers.normal(self.cfg.initializer_range)
        u = LayerNorm(1e-5, run.param_dtype, name="ln")(x[:, :, 1:])
        u = Dense(d // 2, ("embed", "mlp"), kernel_init=init, name="down_proj", **kw)(u)
        # Frames past a clip's end are the convolution's zero padding, as they are in the release.
        u = jnp.where(frame_valid[:, :, None, None], u, 0)
        u = quick_gelu(TimeConv(run, self.cfg.initializer_range, name="conv")(u))
        u = Dense(d, ("mlp", "embed"), kernel_init=nn.initializers.zeros, name="up_proj", **kw)(u)
        return jnp.concatenate([x[:, :, :1], u.astype(x.dtype)], axis=2)


class VisionLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x)). The video model first adds its temporal
    module's output for clips of more than one frame (a clip of one frame computes as an image)."""

    cfg: VisionConfig
    run: RunOptions

    @nn.compact
    def __call__(self, x: jax.Array, frame_valid: jax.Array | None, deterministic: bool) -> tuple[jax.Array, None]:
        """x float[N, S, D]: N images (frame_valid None) or the frames of V clips (frame_valid bool[V, T],
        N = V * T, clip-major)."""
        ln = lambda name: LayerNorm(self.cfg.layer_norm_eps, self.run.param_dtype, name=name)
        clips = frame_valid is not None and frame_valid.shape[1] > 1
        if self.cfg.temporal and (clips or self.is_initializing()):  # init creates the module's params
            valid = frame_valid if clips else jnp.ones((x.shape[0], 1), bool)
            clip_tokens = x.reshape(valid.shape + x.shape[1:])  # [V, T, S, D]
            update = LocalTemporal(self.cfg, self.run, name="temporal")(clip_tokens, valid)
            if clips:
                multi_frame = (jnp.sum(valid, axis=1) > 1)[:, None, None, None]
                x = (clip_tokens + jnp.where(multi_frame, update, 0)).reshape(x.shape)
        x = x + VisionAttention(self.cfg, self.run, name="self_attn")(ln("input_layernorm")(x))
        x = x + VisionMLP(self.cfg, self.run, name="mlp")(ln("post_attention_layernorm")(x))
        return constrain(x, ("batch", "length", "embed")), None


class PatchEmbed(nn.Module):
    """The stride-p, p x p convolution of the patches (no bias), computed as one matmul of the
    flattened patches: XLA's CPU backend runs this convolution's weight gradient ~50x slower than
    the equivalent matmul. The kernel keeps `nn.Conv`'s float[p, p, 3, D] layout (checkpoints)."""

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    initializer_range: float = 0.02

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """float[N, H, W, C] -> float[N, (H/p) * (W/p), D], patches in row-major order."""
        p = self.patch_size
        n, h, w, c = pixels.shape
        kernel = self.param(
            "kernel",
            partitioned(nn.initializers.normal(self.initializer_range), (None, None, None, "embed")),
            (p, p, c, self.features),
            self.param_dtype,
        )
        x = pixels.astype(self.dtype).reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(n, (h // p) * (w // p), p * p * c)
        kernel = kernel.astype(self.dtype).reshape(p * p * c, self.features)
        return jnp.dot(x, kernel, preferred_element_type=dot_accumulator(self.dtype)).astype(self.dtype)


class VisionEmbeddings(nn.Module):
    cfg: VisionConfig
    run: RunOptions

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """float[N, H, W, 3] (CLIP-normalised) -> float[N, 1 + (H/p)*(W/p), D]."""
        d, p = self.cfg.hidden_size, self.cfg.patch_size
        init = nn.initializers.truncated_normal(self.cfg.initializer_range)
        dtype, param_dtype = self.run.dtype, self.run.param_dtype
        cls_token = self.param("cls_token", partitioned(init, (None, None, "embed")), (1, 1, d), param_dtype)
        if self.cfg.position_embedding_init == "sincos2d":
            grid = self.cfg.image_size // p
            init = lambda key, shape, dtype: jnp.asarray(
                np.concatenate([np.zeros((1, d)), sincos2d_position_code(grid, d)])[None], dtype)
        pos = self.param(
            "position_embedding", partitioned(init, (None, None, "embed")), (1, self.cfg.num_positions, d), param_dtype
        )
        patches = PatchEmbed(d, p, dtype, param_dtype, self.cfg.initializer_range, name="patch_embed")(pixels)
        n = patches.shape[0]
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(dtype), (n, 1, d)), patches], axis=1)
        x = x + pos[:, : x.shape[1]].astype(dtype)
        return LayerNorm(self.cfg.layer_norm_eps, param_dtype, name="pre_layernorm")(x)


class VisionEncoder(nn.Module):
    cfg: VisionConfig
    run: RunOptions = RunOptions()

    @nn.compact
    def __call__(self, pixels: jax.Array, deterministic: bool = True,
                 frame_valid: jax.Array | None = None) -> jax.Array:
        """Images float[N, H, W, 3] -> float[N, S, D], or clips float[V, T, H, W, 3] with frame_valid
        bool[V, T] (which of the T are the clip's; default all) -> float[V, T, S, D]: every token
        post-LayerNormed (S = 257 for ViT-L/14 @ 224). Frames are embedded one by one (no temporal
        position); only the video model's temporal modules mix them."""
        if pixels.ndim == 5:
            v, t = pixels.shape[:2]
            frame_valid = jnp.ones((v, t), bool) if frame_valid is None else frame_valid
            pixels = pixels.reshape((v * t,) + pixels.shape[2:])
        x = VisionEmbeddings(self.cfg, self.run, name="embeddings")(pixels)
        x = constrain(x, ("batch", "length", "embed"))
        x = Stack(VisionLayer, self.cfg.num_layers, self.run, dict(cfg=self.cfg, run=self.run), name="encoder")(
            x, frame_valid, deterministic
        )
        x = LayerNorm(self.cfg.layer_norm_eps, self.run.param_dtype, name="post_layernorm")(x)
        return x if frame_valid is None else x.reshape(frame_valid.shape + x.shape[1:])
