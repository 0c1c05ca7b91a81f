"""Device mesh and logical-axis sharding: one code path for 1 CPU, a CPU mesh, GPUs and TPU pods.

Every parameter and key activation carries logical axis names (owl_jax/models/layers.py); the
config's `logical_axis_rules` table maps them to mesh axes, MaxText-style:

  logical name   meaning                               default mesh axes
  batch          examples (and images) in a batch      (data, fsdp)
  embed          model width of weights                fsdp      (ZeRO-3 style weight sharding)
  heads/kv_heads fused attention heads                 tensor
  mlp            feed-forward width                    tensor
  vocab          vocabulary                            tensor
  length, norm, layers, lora                           replicated
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from owl_jax.cli import UserError

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("norm", None),
    ("layers", None),
    ("lora", None),
)


def mesh_shape(axes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves one `-1` entry to fill the devices; checks the product."""
    sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
        raise UserError(f"config.mesh: unknown axes {unknown}; expected {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise UserError(f"config.mesh {dict(axes)}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise UserError(f"config.mesh {dict(axes)}: {num_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise UserError(f"config.mesh {dict(axes)} needs {int(np.prod(sizes))} devices, found {num_devices}")
    return tuple(sizes)


def make_mesh(axes: dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), GSPMD-style (auto) axes."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(dict(axes), len(devices))
    grid = np.asarray(devices).reshape(shape)
    if devices[0].platform in ("tpu", "gpu"):
        from jax.experimental import mesh_utils

        try:  # a physical-topology-aware device order (ICI rings on TPU, NVLink on GPU)
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            pass
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Config lists (ml_collections turns tuples into lists) -> the tuple form flax expects."""
    if not rules:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree whose leaves may be nn.LogicallyPartitioned (others: replicated)."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules, ndim: int, leading_unsharded: int = 0) -> NamedSharding:
    """Shards the batch dimension (after `leading_unsharded` dims, e.g. a micro-batch axis)."""
    batch_axes = dict(rules).get("batch")
    spec = [None] * leading_unsharded + [batch_axes] + [None] * (ndim - leading_unsharded - 1)
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_axis_size(mesh: Mesh, rules) -> int:
    axes = dict(rules).get("batch")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in axes]))
