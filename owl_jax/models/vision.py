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


class VisionLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    cfg: VisionConfig
    run: RunOptions

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> tuple[jax.Array, None]:
        ln = lambda name: LayerNorm(self.cfg.layer_norm_eps, self.run.param_dtype, name=name)
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
    def __call__(self, pixels: jax.Array, deterministic: bool = True) -> jax.Array:
        """float[N, H, W, 3] -> float[N, S, D]: every token post-LayerNormed (S = 257 for ViT-L/14 @ 224)."""
        x = VisionEmbeddings(self.cfg, self.run, name="embeddings")(pixels)
        x = constrain(x, ("batch", "length", "embed"))
        x = Stack(VisionLayer, self.cfg.num_layers, self.run, dict(cfg=self.cfg, run=self.run), name="encoder")(
            x, deterministic
        )
        return LayerNorm(self.cfg.layer_norm_eps, self.run.param_dtype, name="post_layernorm")(x)
