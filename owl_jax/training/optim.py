"""optax AdamW with warmup + cosine to a floor, global-norm clipping and a weight-decay mask."""
from __future__ import annotations

import ml_collections
import optax

from owl_jax.training.stages import decay_mask


def make_schedule(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=o.warmup_steps,
        decay_steps=max(total_steps, o.warmup_steps + 1),
        end_value=o.end_lr,
    )


def make_optimizer(o: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """`o` is config.optim: lr, end_lr, warmup_steps, b1, b2, eps, weight_decay, clip_norm."""
    adamw = optax.adamw(
        make_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
    )
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm else adamw
