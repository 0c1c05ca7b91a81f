"""Building blocks shared by the three towers: logically-partitioned dense layers (with LoRA),
fp32 norms, and the scan/remat wrapper that stacks identical layers (attention: models/attention.py).

Every parameter carries logical axis names (see `owl_jax.sharding` for the rules table):
  embed     model width             heads    fused heads*head_dim of q/o projections
  kv_heads  fused kv heads*head_dim mlp      feed-forward width
  vocab     vocabulary              layers   the scanned layer axis (never sharded)
  norm      norm scales/biases      lora     LoRA rank
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from owl_jax.models.attention import ATTENTION_RESIDUALS
from owl_jax.models.config import LoraConfig, RunOptions

Dtype = Any

DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


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
        # jnp.asarray, not .astype: int8 weights (models/quantization.py) arrive as qwix's wrapper here
        y = jax.lax.dot_general(x.astype(self.dtype), jnp.asarray(kernel, self.dtype), dims, preferred_element_type=acc)
        y = y.astype(self.dtype)
        if self.use_bias:
            bias = self.param(
                "bias", partitioned(nn.initializers.zeros, self.axes[1:]), (self.features,), self.param_dtype
            )
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
                "lora_b",
                partitioned(nn.initializers.zeros, ("lora", self.axes[1])),
                (self.lora.rank, self.features),
                self.param_dtype,
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
        layer_params = jax.tree_util.tree_map(lambda p, i=i: p[i], stacked)
        x, _ = layer.apply({"params": layer_params}, x, *args, rngs=rngs)
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
    run: RunOptions  # remat_policy and scan_unroll apply here
    layer_kwargs: dict

    @nn.compact
    def __call__(self, x: jax.Array, *args) -> jax.Array:
        remat_policy, unroll = self.run.remat_policy, self.run.scan_unroll
        if runs_stacked_unrolled(self, unroll):
            return run_stacked_layers(self, "layers", self.layer_cls, self.num_layers, remat_policy, self.layer_kwargs,
                                      x, *args)
        layers = scan_layers(self.layer_cls, self.num_layers, remat_policy, len(args), unroll, name="layers",
                             **self.layer_kwargs)
        return layers(x, *args)[0]


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Activation sharding constraint by logical names; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, names)
