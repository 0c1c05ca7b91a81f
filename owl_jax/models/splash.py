"""The LLM's causal attention through Pallas' splash-attention kernel: TPU's fused attention.

On TPU the kernel keeps scores in VMEM block by block and skips the blocks above the diagonal, so
no [B, H, T, T] scores reach HBM. On CPU it runs in Pallas' interpreter (tests only: slow).
Under a mesh, it runs per shard (`jax.shard_map`): batch over the rules' `batch` axes, heads over
their `heads` axes, as the surrounding activations are sharded.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

BLOCKS = (512, 256, 128)  # the largest that divides the sequence is used for every tile


def _spec() -> P:
    """[B, H, T, Dh] as the surrounding activations are sharded (the rules in context)."""
    return P(*nn.logical_to_mesh_axes(("batch", "heads", None, None)))


def supports(b: int, t: int, h: int, head_dim: int) -> bool:
    """Whether causal self-attention of this shape can run through the kernel here: whole blocks,
    128-wide heads, not on GPU (only Pallas' slow interpreter would run there), and under a mesh,
    logical rules in context that split batch and heads evenly (shard_map needs even shards; without
    rules, XLA's own partitioning of the einsum path does better than a replicated kernel)."""
    if t % BLOCKS[-1] or head_dim % 128 or jax.default_backend() == "gpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return True
    spec = _spec()
    if all(axes is None for axes in spec):
        return False

    def size(axes) -> int:
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        return int(np.prod([mesh.shape[a] for a in axes]))

    return b % size(spec[0]) == 0 and h % size(spec[1]) == 0


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
    """q float[B, T, H, Dh], k/v float[B, T, K, Dh] (H % K == 0), segments int/bool[B, T] -> float[B, T, H, Dh].

    segments are the kernel's segment ids: each token's sample in its row (1, 2, ... packed; a bool
    validity is one sample), 0 on padding. A real query sees exactly the earlier keys of its own
    sample, wherever the padding is; padded queries see padded keys (never an empty row).
    """
    b, t, h, dh = q.shape
    groups = h // k.shape[2]
    if groups > 1:  # grouped KV heads: the multi-head kernel takes one KV head per query head
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    q = q * jnp.asarray(dh**-0.5, q.dtype)  # the kernel does not scale
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, Dh]
    segments = segments.astype(jnp.int32)
    block = next(x for x in BLOCKS if t % x == 0)
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

    def kernel_on_shard(q, k, v, segments, interpret: bool):
        heads = q.shape[1]
        mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((t, t))] * heads)
        kernel = kernel_lib.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        ids = kernel_lib.SegmentIds(q=segments, kv=segments)
        return jax.vmap(kernel)(q, k, v, segment_ids=ids)

    def per_shard(*args):
        # Mosaic when lowered for TPU (also an AOT compile on a CPU host), the interpreter elsewhere.
        return jax.lax.platform_dependent(*args, tpu=lambda *a: kernel_on_shard(*a, interpret=False),
                                          default=lambda *a: kernel_on_shard(*a, interpret=True))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = per_shard(q, k, v, segments)
    else:
        spec = _spec()
        out = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, spec, spec, P(spec[0], None)), out_specs=spec,
                            check_vma=False)(q, k, v, segments)
    return out.transpose(0, 2, 1, 3)
