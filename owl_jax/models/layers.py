"""Building blocks shared by the three towers: logically-partitioned dense layers (with LoRA),
fp32 norms, attention, and the scan/remat wrapper that stacks identical layers.

Every parameter carries logical axis names (see `owl_jax.sharding` for the rules table):
  embed     model width             heads    fused heads*head_dim of q/o projections
  kv_heads  fused kv heads*head_dim mlp      feed-forward width
  vocab     vocabulary              layers   the scanned layer axis (never sharded)
  norm      norm scales/biases      lora     LoRA rank
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from owl_jax.models.config import LoraConfig

Dtype = Any

DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def dtype_of(name: str) -> Dtype:
    return jnp.dtype(name)


def partitioned(init: Callable, names: Sequence[str | None]) -> Callable:
    return nn.with_logical_partitioning(init, tuple(names))


def trace_platform() -> str:
    """The platform being traced for: the mesh's when one is set (an AOT compile for a TPU slice
    traces on a CPU host), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def dot_accumulator(dtype: Dtype) -> Dtype | None:
    """`preferred_element_type` for a weight matmul computed in `dtype`.

    On CPU, fp32 for 16-bit inputs: given bf16 x bf16 -> bf16, XLA's CPU backend converts both
    operands to fp32 first, the whole weight matrix on every call (a [8, 512] x [512, 32000] decode
    step's LM head: 22.5 ms, against 1.7 ms for bf16 x bf16 -> fp32, which runs natively). Elsewhere
    None (the input dtype): GPUs and TPUs accumulate in fp32 anyway, and a wider output would double
    the activations that remat saves. (On CPU it does: bf16 training there saves fp32 matmul
    outputs, and its backward matmuls take the fp32 cotangent; the gain is the forward and decoding.)
    """
    if jnp.dtype(dtype).itemsize < 4 and trace_platform() == "cpu":
        return jnp.float32
    return None


class Dense(nn.Module):
    """y = x @ kernel (+ bias) (+ LoRA: scale * dropout(x) @ lora_a @ lora_b).

    kernel float[in, out] ≙ torch Linear weight [out, in] transposed; lora_a float[in, r] ≙ PEFT lora_A.T,
    lora_b float[r, out] ≙ PEFT lora_B.T. lora_b starts at zero, so a fresh adapter is the identity.
    kernel_out_in=True stores the kernel float[out, in] instead (torch's layout; the LLM's LM head when
    decoding, see LlamaForCausalLM.lm_head_vocab_major).
    """

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    lora: LoraConfig | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = DEFAULT_KERNEL_INIT
    kernel_out_in: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        in_features = x.shape[-1]
        shape, names = (in_features, self.features), self.axes
        if self.kernel_out_in:
            shape, names = shape[::-1], names[::-1]
        kernel = self.param("kernel", partitioned(self.kernel_init, names), shape, self.param_dtype)
        # Matmuls on 2-D operands: XLA's CPU backend computes the weight gradient of a 3-D x @ W
        # (contracting batch and length) about 3x slower than the same product flattened.
        lead = x.shape[:-1]
        x = x.reshape(-1, in_features)
        acc = dot_accumulator(self.dtype)
        # x @ kernel (kernel [in, out]), or x @ kernel.T (kernel_out_in: [out, in], contracting both
        # operands' minor dimension)
        dims = (((1,), (1 if self.kernel_out_in else 0,)), ((), ()))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), dims, preferred_element_type=acc)
        y = y.astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, self.axes[1:]), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora is not None and self.lora.rank > 0:
            lora_a = self.param(
                "lora_a",
                # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)). Flax's kaiming_uniform
                # draws sqrt(6) times wider, which scales every early LoRA update by as much.
                partitioned(nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), (self.axes[0], "lora")),
                (in_features, self.lora.rank),
                self.param_dtype,
            )
            lora_b = self.param(
                "lora_b", partitioned(nn.initializers.zeros, ("lora", self.axes[1])), (self.lora.rank, self.features), self.param_dtype
            )
            h = nn.Dropout(self.lora.dropout)(x, deterministic=deterministic)
            h = jnp.dot(h.astype(self.dtype), lora_a.astype(self.dtype), preferred_element_type=acc).astype(self.dtype)
            h = jnp.dot(h, lora_b.astype(self.dtype), preferred_element_type=acc).astype(self.dtype)
            y = y + self.lora.scale * h
        return y.reshape(*lead, self.features)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (like the release's LayerNormFp32), result in the input dtype."""

    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (d,), self.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("norm",)), (d,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in fp32, cast back, then scale (HF order of operations)."""

    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * y.astype(x.dtype)


def _attention_probs(scores: jax.Array, mask: jax.Array | None, dropout_rate: float, dropout_rng) -> jax.Array:
    """fp32 softmax of float[..., T, S] scores; masked scores get the dtype's minimum (a fully masked
    row, a padding query, stays finite); then attention dropout."""
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return probs


# "xla": our einsums with an fp32 softmax (every platform; dropout). "cudnn": cuDNN's fused attention
# where it applies, else "xla". "splash": Pallas' splash kernel (models/splash.py) for the LLM's causal
# attention where it applies, else "xla". "jax": jax.nn.dot_product_attention's own default (the call
# cuDNN gets, runnable anywhere: tests). "auto": "cudnn" on GPU, "splash" on TPU, "xla" on CPU.
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "jax", "auto")


def platform_attention(platform: str) -> str:
    """What "auto" means on a platform ("cpu", "gpu", "tpu")."""
    return {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    impl: str = "xla",
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    kv_heads_first: bool = False,
    causal_query_block: int = 0,
    causal: bool = False,
    name_residuals: bool = False,
) -> jax.Array:
    """Multi-head attention with grouped KV heads.

    q float[B, T, H, Dh], k/v float[B, S, K, Dh] (float[B, K, S, Dh] with kv_heads_first: the KV
    cache's layout, so decoding reads it without a transpose) with H % K == 0, mask bool[B, 1, T, S]
    (True = attend) or None. Returns float[B, T, H, Dh]. Softmax in fp32.

    causal: the attention is causal (T == S); a given `mask` must already hold the triangle (the
    LLM's does), a missing one stands for the triangle alone. The kernels are told (cuDNN's
    `is_causal`, splash's causal block mask) and skip the upper triangle; the mask still applies, so
    results do not depend on where the padding is.

    causal_query_block > 0 (the "xla" path, T == S, a mask that is causal): the queries run in even
    blocks of at most that many rows, each against the keys up to its own last row. That skips the
    masked upper triangle (about half the score work) and keeps each block's scores small: a
    bench_small LLaMA layer's attention, fwd+bwd on 2 CPU cores, 92 -> 62 ms at 128.

    name_residuals ("cudnn" only): the output and softmax statistics that cuDNN keeps for the
    backward pass are tagged ATTENTION_RESIDUALS (`with_named_residuals`), so that remat
    "dots_no_batch_attention" saves them instead of rerunning the kernel in the backward pass.
    """
    b, t, h, dh = q.shape
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}: expected one of {ATTENTION_IMPLS}")
    if impl == "auto":
        impl = platform_attention(trace_platform())
    s = k.shape[2 if kv_heads_first else 1]
    if impl == "splash":  # the LLM's causal self-attention only (not the ViT, abstractor or decode steps)
        from owl_jax.models import splash  # Pallas' TPU kernels: imported only when asked for

        if causal and s == t and not kv_heads_first and dropout_rate == 0.0 and splash.supports(b, t, h, dh):
            # The last query's row of a causal mask is every key's validity.
            key_valid = jnp.ones((b, t), bool) if mask is None else jnp.broadcast_to(mask[:, 0, -1, :], (b, t))
            return splash.causal_attention(q, k, v, key_valid)
        impl = "xla"
    # cuDNN's flash attention trains on even lengths only (jax 0.11: "Unsupported sequence length Q
    # 257, KV 257", raised when the gradient is built) and has no dropout here: the ViT's 257 tokens,
    # the abstractor while it trains and one-token decode steps take the einsum path.
    if (impl == "cudnn" and (t % 2 or s % 2)) or (impl in ("cudnn", "jax") and dropout_rate > 0.0):
        impl = "xla"
    if impl == "xla" and causal and s == t and mask is None:  # the einsums see causality only through the mask
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if 0 < causal_query_block < t and impl == "xla" and not kv_heads_first and s == t:
        return _causal_blocks(q, k, v, mask, causal_query_block, dropout_rate, dropout_rng)
    if impl in ("cudnn", "jax"):
        if kv_heads_first:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        fused = functools.partial(jax.nn.dot_product_attention, is_causal=causal and s == t,
                                  implementation="cudnn" if impl == "cudnn" else None)
        if impl == "cudnn" and name_residuals:
            fused = with_named_residuals(fused, ATTENTION_RESIDUALS)
        return fused(q, k, v, mask=mask)
    kv_heads = k.shape[1] if kv_heads_first else k.shape[2]
    kv = "bksd" if kv_heads_first else "bskd"
    groups = h // kv_heads
    if groups == 1 and not kv_heads_first:
        # Ungrouped heads: plain 4-D einsums. XLA CPU runs the grouped 5-D form with its size-1 group
        # axis ~40% slower (a bench_small LLaMA layer's attention, fwd+bwd: 406 vs 240 ms).
        q_spec, kv, scores_spec = "bthd", "bshd", "bhts"
    else:
        q, mask = q.reshape(b, t, kv_heads, groups, dh), None if mask is None else mask[:, :, None]
        q_spec, scores_spec = "btkgd", "bkgts"
    scores = jnp.einsum(f"{q_spec},{kv}->{scores_spec}", q, k, preferred_element_type=jnp.float32) * (dh**-0.5)
    probs = _attention_probs(scores, mask, dropout_rate, dropout_rng)  # mask bool[B, 1, (1,) T, S]
    out = jnp.einsum(f"{scores_spec},{kv}->{q_spec}", probs.astype(v.dtype), v)
    return out.reshape(b, t, h, dh)


def _causal_blocks(q, k, v, mask, block: int, dropout_rate: float, dropout_rng) -> jax.Array:
    """`attention` of a causal mask in query blocks (see there). q float[B, T, H, Dh], k/v float[B, T, K, Dh]."""
    b, t, h, dh = q.shape
    rows = -(-t // -(-t // block))  # even blocks of at most `block` rows
    starts = range(0, t, rows)
    rngs = [None if dropout_rng is None else jax.random.fold_in(dropout_rng, i) for i in range(len(starts))]
    if k.shape[2] != h:  # grouped KV heads: each block through the grouped path
        return jnp.concatenate([
            attention(q[:, a:a + rows], k[:, :a + rows], v[:, :a + rows],
                      None if mask is None else mask[:, :, a:a + rows, :a + rows],
                      dropout_rate=dropout_rate, dropout_rng=rng)
            for a, rng in zip(starts, rngs)
        ], axis=1)
    # Heads first once: every block then slices keys along their length, with no per-block transpose.
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, Dh]
    outs = []
    for a, rng in zip(starts, rngs):
        e = min(a + rows, t)
        scores = jnp.einsum("bhtd,bhsd->bhts", qh[:, :, a:e], kh[:, :, :e], preferred_element_type=jnp.float32)
        probs = _attention_probs(scores * dh**-0.5, None if mask is None else mask[:, :, a:e, :e], dropout_rate, rng)
        outs.append(jnp.einsum("bhts,bhsd->bhtd", probs.astype(v.dtype), vh[:, :, :e]))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


ATTENTION_RESIDUALS = "attention_residuals"


def with_named_residuals(fn: Callable, name: str) -> Callable:
    """fn(q, k, v, mask=mask) -> out float[B, T, H, Dh] (mask bool or None, not differentiated),
    differentiated as before, with its output and the per-row statistics its backward pass keeps
    (residuals of at most B * T * H elements, e.g. cuDNN's log-sum-exp) tagged
    `checkpoint_name(., name)`. A remat policy can then save them (`save_only_these_names`)
    instead of rerunning fn in the backward pass. Anything else fn keeps is left to the enclosing
    policy: q, k, v are fn's inputs, a bias that fn builds from the mask is rebuilt from it. The
    output is matched by identity, not shape, so that copies of q, k or v (the same shape) are
    never saved by mistake. The mask is an argument, not a closure: a custom_vjp must not close
    over traced values."""

    @jax.custom_vjp
    def wrapped(q, k, v, mask):
        return fn(q, k, v, mask=mask)

    def forward(q, k, v, mask):
        out, backward = jax.vjp(lambda q, k, v: fn(q, k, v, mask=mask), q, k, v)
        # The output is named as it leaves, too: whatever reads it in the backward pass (the
        # o_proj's weight gradient) then finds it saved rather than rerunning fn.
        named_out = checkpoint_name(out, name)
        row_stats = out.size // out.shape[-1]

        def tag(x):
            if x is out:
                return named_out
            small_stats = jnp.issubdtype(x.dtype, jnp.floating) and 0 < x.size <= row_stats
            return checkpoint_name(x, name) if small_stats and x.shape != out.shape else x

        leaves, tree = jax.tree_util.tree_flatten(backward)
        return named_out, jax.tree_util.tree_unflatten(tree, [tag(x) for x in leaves])

    def backward_rule(backward, g):
        return (*backward(g), None)  # no cotangent for the mask

    wrapped.defvjp(forward, backward_rule)
    return lambda q, k, v, mask=None: wrapped(q, k, v, mask)


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # dots_no_batch, and cuDNN attention's output and softmax statistics (the LLM passes
    # name_residuals=True under this policy): the forward kernel then runs once a layer, not again
    # in the backward pass (3% of the 7B stage-2 step on an H100; not yet measured with it).
    "dots_no_batch_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_RESIDUALS),
    ),
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


def remat_layer(layer_cls: Any, remat_policy: str, num_args: int) -> Any:
    """`layer_cls` under `nn.remat` with the named policy ("none": unchanged). The layer's __call__
    is `(carry, *args, deterministic)` with `num_args` arguments after the carry, the last static."""
    if remat_policy == "none":
        return layer_cls
    if remat_policy not in _REMAT_POLICIES:
        raise ValueError(f"remat_policy {remat_policy!r}: expected 'none' or one of {sorted(_REMAT_POLICIES)}")
    # argnum 0 is self, 1 the carry, so `deterministic` is num_args + 1.
    return nn.remat(layer_cls, policy=_REMAT_POLICIES[remat_policy], prevent_cse=False, static_argnums=(num_args + 1,))


def scan_layers(
    layer_cls: Any, num_layers: int, remat_policy: str, num_args: int, unroll: int = 1, **layer_kwargs
) -> nn.Module:
    """`num_layers` copies of `layer_cls` under `nn.scan` (unbound; name it via layer_kwargs).

    The layer's __call__ must be `(carry, *broadcast_args, deterministic) -> (carry, None)` with
    `num_args` arguments after the carry; they are shared by all layers and the last one
    (`deterministic`) is static. Parameters get a leading `layers` axis, so compile time does not grow
    with depth.
    """
    layer_cls = remat_layer(layer_cls, remat_policy, num_args)
    return nn.scan(
        layer_cls,
        variable_axes={"params": 0, "cache": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * num_args,
        length=num_layers,
        unroll=num_layers if unroll == 0 else unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(**layer_kwargs)


def run_stacked_layers(parent: nn.Module, name: str, layer_cls: Any, num_layers: int, remat_policy: str,
                       layer_kwargs: dict, x: jax.Array, *args) -> jax.Array:
    """The layers that `scan_layers(..., name=name)` created in `parent`, run one after another in
    Python on slices of their stacked params (float[L, ...]): same params, same result, no loop.

    A `lax.scan` stacks what the backward pass needs (every layer's activations, attention
    probabilities included) into [L, ...] buffers, zero-filled first and written and read one
    slice per layer; on CPU that costs ~15% of a bench_small LLaMA training step. Here every layer
    keeps its own buffers, at the price of compile time growing with depth (config
    `scan_unroll=0`; XLA's cost analysis then counts every layer, as FLOP audits need).
    """
    stacked = nn.unbox(parent.variables["params"][name])
    layer = remat_layer(layer_cls, remat_policy, len(args))(**layer_kwargs, parent=None)
    dropout = parent.make_rng("dropout") if parent.has_rng("dropout") else None
    for i in range(num_layers):
        rngs = {} if dropout is None else {"dropout": jax.random.fold_in(dropout, i)}
        x, _ = layer.apply({"params": jax.tree_util.tree_map(lambda p: p[i], stacked)}, x, *args, rngs=rngs)
    return x


def runs_stacked_unrolled(module: nn.Module, unroll: int) -> bool:
    """Whether `module` runs its scanned layers with `run_stacked_layers`: with `unroll == 0`, once
    the params exist (init goes through the scan, which creates them), and unless a collection
    other than params is live (the decode cache, sown attention maps: the scan handles those)."""
    return (unroll == 0 and not module.is_initializing()
            and not any(module.is_mutable_collection(c) for c in ("cache", "intermediates")))


class Stack(nn.Module):
    """A module holding the scanned layers as submodule `layers` (torch: `<name>.layers.{i}`)."""

    layer_cls: Any
    num_layers: int
    remat_policy: str
    layer_kwargs: dict
    unroll: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *args) -> jax.Array:
        if runs_stacked_unrolled(self, self.unroll):
            return run_stacked_layers(self, "layers", self.layer_cls, self.num_layers, self.remat_policy,
                                      self.layer_kwargs, x, *args)
        layers = scan_layers(
            self.layer_cls, self.num_layers, self.remat_policy, len(args), self.unroll, name="layers", **self.layer_kwargs
        )
        return layers(x, *args)[0]


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Activation sharding constraint by logical names; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, names)
