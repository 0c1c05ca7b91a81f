"""LLaMA decoder in the HF `LlamaForCausalLM` layout, with LoRA, grouped KV heads and a
KV cache for decoding."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from owl_jax.models.attention import attention
from owl_jax.models.config import LlamaConfig, LoraConfig, RunOptions
from owl_jax.models.layers import (
    Dense,
    RMSNorm,
    constrain,
    partitioned,
    remat_layer,
    run_stacked_layers,
    runs_stacked_unrolled,
    scan_layers,
)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """HF "rotate-half" rotary embedding. x float[B, T, H, Dh], positions int[B, T]."""
    dh = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def projection(module: nn.Module, features: int, axes, name: str) -> Dense:
    """A bias-free LLaMA projection of `module` (which has cfg, lora and run), with LoRA when `name` is
    one of the LoRA target modules."""
    lora = module.lora if name in module.lora.target_modules else None
    return Dense(features, axes, use_bias=False, lora=lora, dtype=module.run.dtype, param_dtype=module.run.param_dtype,
                 kernel_init=nn.initializers.normal(module.cfg.initializer_range), name=name)


def segment_mask(segments: jax.Array) -> jax.Array:
    """bool[B, 1, T, T] causal attention within each sample of a row: segments int/bool[B, T] (1, 2, ...
    per sample, 0 on padding). Padding keys are never seen; a padding query sees the row's earlier
    real tokens (as with an unpacked padded row: its output is never read, and no row is empty)."""
    seg = segments.astype(jnp.int32)
    t = seg.shape[1]
    q, k = seg[:, None, :, None], seg[:, None, None, :]
    return jnp.tril(jnp.ones((t, t), bool))[None, None] & (k > 0) & ((q == k) | (q == 0))


def segment_positions(segments: jax.Array) -> jax.Array:
    """int32[B, T] RoPE positions that restart at 0 at each sample of a row (segments int/bool[B, T]:
    a new sample wherever the id changes; an unpacked right-padded row gets 0..T-1 on its tokens)."""
    seg = segments.astype(jnp.int32)
    t = jnp.arange(seg.shape[1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


class LlamaAttention(nn.Module):
    cfg: LlamaConfig
    lora: LoraConfig
    run: RunOptions
    decode: bool
    name_attention_residuals: bool = False  # see attention.attention(name_residuals=...)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segments: jax.Array, deterministic: bool) -> jax.Array:
        """x float[B, T, D], positions int[B, T], segments int/bool[B, T]: the sample of each token in
        its row (1, 2, ... in a packed row), 0 on padding (bool[B, S], the valid keys, over the cache
        when decoding) -> float[B, T, D]. A token sees the earlier tokens of its own sample."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, k, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = projection(self, h * dh, ("embed", "heads"), "q_proj")(x, deterministic).reshape(b, t, h, dh)
        key = projection(self, k * dh, ("embed", "kv_heads"), "k_proj")(x, deterministic).reshape(b, t, k, dh)
        value = projection(self, k * dh, ("embed", "kv_heads"), "v_proj")(x, deterministic).reshape(b, t, k, dh)
        q, key = rotary(q, positions, cfg.rope_theta), rotary(key, positions, cfg.rope_theta)

        if self.decode:
            key, value, query_slots = self._update_cache(key, value)  # [B, K, S, Dh]
            causal = jnp.arange(key.shape[2])[None, :] <= query_slots[:, None]  # [T, S]
            mask, segment_ids = causal[None, None] & segments[:, None, None, :].astype(bool), None
        else:
            mask, segment_ids = segment_mask(segments), segments.astype(jnp.int32)
        out = attention(q, key, value, mask, impl=self.run.attention_impl, kv_heads_first=self.decode,
                        causal_query_block=0 if self.decode else self.run.causal_query_block, causal=not self.decode,
                        name_residuals=self.name_attention_residuals, segment_ids=segment_ids)
        return projection(self, cfg.hidden_size, ("heads", "embed"), "o_proj")(out.reshape(b, t, h * dh), deterministic)

    def _update_cache(self, key: jax.Array, value: jax.Array):
        """Writes this call's T keys/values (float[B, T, K, Dh]) at slots [index, index + T) of the
        cache float[B, K, S, Dh]; returns the whole cache and the slots of this call's queries. A cache
        of length S is made by a first call with T = S."""
        key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # heads first: no per-step transpose
        initialised = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        t = key.shape[2]
        query_slots = index.value + jnp.arange(t)
        if initialised:
            start = (0, 0, index.value, 0)
            cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype), start)
            cached_value.value = jax.lax.dynamic_update_slice(
                cached_value.value, value.astype(cached_value.value.dtype), start
            )
            index.value = index.value + t
            return cached_key.value, cached_value.value, query_slots
        return key, value, query_slots


class LlamaMLP(nn.Module):
    cfg: LlamaConfig
    lora: LoraConfig
    run: RunOptions

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        gate = projection(self, self.cfg.mlp_size, ("embed", "mlp"), "gate_proj")(x, deterministic)
        up = projection(self, self.cfg.mlp_size, ("embed", "mlp"), "up_proj")(x, deterministic)
        h = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return projection(self, self.cfg.hidden_size, ("mlp", "embed"), "down_proj")(h, deterministic)


class LlamaLayer(nn.Module):
    cfg: LlamaConfig
    lora: LoraConfig
    run: RunOptions
    decode: bool
    name_attention_residuals: bool = False

    @nn.compact
    def __call__(self, x, positions, segments, deterministic: bool):
        norm = lambda name: RMSNorm(self.cfg.rms_norm_eps, self.run.param_dtype, name=name)
        attn = LlamaAttention(self.cfg, self.lora, self.run, self.decode, self.name_attention_residuals,
                              name="self_attn")
        x = x + attn(norm("input_layernorm")(x), positions, segments, deterministic)
        x = x + LlamaMLP(self.cfg, self.lora, self.run, name="mlp")(
            norm("post_attention_layernorm")(x), deterministic
        )
        return constrain(x, ("batch", "length", "embed")), None


class LlamaModel(nn.Module):
    """HF `LlamaModel`: embed_tokens, layers, norm.

    scan_layers=True (training, checkpoints): the layers run under `nn.scan`, parameters and KV cache
    stacked on a leading `layers` axis (submodule `layers`), so compile time is flat in depth.
    scan_layers=False (decoding): one submodule per layer, `layers_0` ... `layers_{L-1}`, each with
    its own parameters and KV cache. Inside a decoding loop the scanned stack would slice every
    layer's weights and cache out of the stacked arrays and write the cache back on every token;
    separate arrays are read in place and the cache is updated in place. `unstack_layers` /
    `stack_layers` convert the parameters between the two layouts.
    """

    cfg: LlamaConfig
    lora: LoraConfig = LoraConfig()
    run: RunOptions = RunOptions()
    decode: bool = False
    scan_layers: bool = True

    def setup(self):
        run = self.run
        self.embed_tokens = nn.Embed(
            self.cfg.vocab_size,
            self.cfg.hidden_size,
            dtype=run.dtype,
            param_dtype=run.param_dtype,
            embedding_init=partitioned(nn.initializers.normal(self.cfg.initializer_range), ("vocab", "embed")),
        )
        layer_kwargs = self._layer_kwargs()
        if self.scan_layers:
            self.layers = scan_layers(LlamaLayer, self.cfg.num_layers, run.remat_policy, num_args=3,
                                      unroll=run.scan_unroll, **layer_kwargs)
        else:  # a list attribute: flax names the submodules layers_0, layers_1, ...
            layer_cls = remat_layer(LlamaLayer, run.remat_policy, num_args=3)
            self.layers = [layer_cls(**layer_kwargs) for _ in range(self.cfg.num_layers)]
        self.norm = RMSNorm(self.cfg.rms_norm_eps, run.param_dtype)

    def _layer_kwargs(self) -> dict:
        return dict(cfg=self.cfg, lora=self.lora, run=self.run, decode=self.decode,
                    name_attention_residuals=self.run.remat_policy == "dots_no_batch_attention")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """int[B, T] -> float[B, T, D]."""
        return self.embed_tokens(input_ids)

    def __call__(self, inputs_embeds, positions, attention_mask, deterministic: bool = True) -> jax.Array:
        """inputs_embeds float[B, T, D], positions int[B, T], attention_mask int/bool[B, T]: each
        token's sample in its row, 0 on padding (owl_jax/batch.py; bool[B, S] over the cache when
        decoding) -> final hidden states float[B, T, D]."""
        x = constrain(inputs_embeds.astype(self.run.dtype), ("batch", "length", "embed"))
        if self.scan_layers and runs_stacked_unrolled(self, self.run.scan_unroll):
            x = run_stacked_layers(self, "layers", LlamaLayer, self.cfg.num_layers, self.run.remat_policy,
                                   self._layer_kwargs(), x, positions, attention_mask, deterministic)
        elif self.scan_layers:
            x, _ = self.layers(x, positions, attention_mask, deterministic)
        else:
            for layer in self.layers:
                x, _ = layer(x, positions, attention_mask, deterministic)
        return self.norm(x)


def unstack_layers(params: dict) -> dict:
    """`LlamaModel` params from the scanned layout (`layers`, leaves float[L, ...]) to the unrolled one
    of `scan_layers=False` (`layers_0` ... `layers_{L-1}`, leaves float[...]); other entries are
    shared, not copied. Exact. Sharded leaves keep their sharding, less the (never sharded) layers
    axis. Meant to run once, before decoding: it copies the layer weights."""
    params = dict(params)
    stacked = params.pop("layers")
    num_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: _layer_of(x, i), stacked)
    return params


def stack_layers(params: dict) -> dict:
    """Inverse of `unstack_layers`: `layers_0` ... `layers_{L-1}` -> `layers` (leaves float[L, ...])."""
    params = dict(params)
    names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[len("layers_"):]))
    if not names or [int(k[len("layers_"):]) for k in names] != list(range(len(names))):
        raise ValueError(f"expected layers_0 ... layers_N, found {names}")
    per_layer = [params.pop(k) for k in names]
    params["layers"] = jax.tree_util.tree_map(lambda *xs: _stacked(xs), *per_layer)
    return params


def to_decode_layout(params: dict) -> dict:
    """`LlamaForCausalLM` params (training layout) -> those of
    `LlamaForCausalLM(scan_layers=False, lm_head_vocab_major=True)`: layers unstacked, LM head kernel
    transposed to float[V, D]. Exact; copies the layer weights and the LM head, once, before decoding."""
    lm_head = {**params["lm_head"], "kernel": _transposed(params["lm_head"]["kernel"])}
    return {**params, "model": unstack_layers(params["model"]), "lm_head": lm_head}


def from_decode_layout(params: dict) -> dict:
    """Inverse of `to_decode_layout`."""
    lm_head = {**params["lm_head"], "kernel": _transposed(params["lm_head"]["kernel"])}
    return {**params, "model": stack_layers(params["model"]), "lm_head": lm_head}


def _placed_like(y, x, spec_of):
    """y with x's NamedSharding, its partition spec (padded to x.ndim) mapped by spec_of; y unchanged
    for numpy or otherwise placed x."""
    sharding = getattr(x, "sharding", None)
    if isinstance(x, np.ndarray) or not isinstance(sharding, NamedSharding):
        return y
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    return jax.device_put(y, NamedSharding(sharding.mesh, PartitionSpec(*spec_of(spec))))


def _layer_of(x, i: int):
    """Layer i of a stacked leaf [L, ...] (a sharded leaf drops the unsharded layers axis)."""
    return _placed_like(x[i], x, lambda spec: spec[1:])


def _stacked(xs):
    """Leaves [...] of every layer -> [L, ...] (numpy stays numpy; a sharded leaf gains the layers axis,
    unsharded)."""
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.stack(xs)
    return _placed_like(jnp.stack(xs), xs[0], lambda spec: (None,) + spec)


def _transposed(x):
    """A 2-D kernel transposed, its sharding with it."""
    return _placed_like(x.T, x, lambda spec: spec[::-1])


class LlamaForCausalLM(nn.Module):
    cfg: LlamaConfig
    lora: LoraConfig = LoraConfig()
    run: RunOptions = RunOptions()
    decode: bool = False
    scan_layers: bool = True  # False: layers unrolled, params `model/layers_{i}` (see LlamaModel)
    # The LM head kernel stored float[V, D] (torch's layout) instead of float[D, V]. For decoding: XLA's
    # CPU dot of float[8, 512] hidden states with a [32000, 512] kernel is ~30% faster (7 vs 10 ms).
    lm_head_vocab_major: bool = False

    def setup(self):
        self.model = LlamaModel(self.cfg, self.lora, self.run, self.decode, self.scan_layers)
        self.lm_head = Dense(
            self.cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.run.dtype,
            param_dtype=self.run.param_dtype,
            kernel_init=nn.initializers.normal(self.cfg.initializer_range), kernel_out_in=self.lm_head_vocab_major,
        )

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.model.embed(input_ids)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Token ids int[B, T] or embeddings float[B, T, D] -> logits float[B, T, V].

        attention_mask (each token's sample in its row, 0 on padding; owl_jax/batch.py) defaults to
        all-valid; positions default to 0..T-1 within each sample (`segment_positions`; pass explicit
        positions with left padding or when decoding with the cache)."""
        hidden = self.hidden_states(
            input_ids, inputs_embeds=inputs_embeds, positions=positions, attention_mask=attention_mask,
            deterministic=deterministic,
        )
        return constrain(self.lm_head(hidden), ("batch", "length", "vocab"))

    def hidden_states(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """The final (normed) hidden states float[B, T, D] that `__call__` multiplies by the LM head
        (training feeds them to `losses.answer_loss_from_hidden`); arguments as for `__call__`."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        b, t = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        if positions is None:
            positions = segment_positions(attention_mask)
        return self.model(inputs_embeds, positions, attention_mask, deterministic)
