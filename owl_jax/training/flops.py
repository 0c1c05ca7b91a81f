"""Analytic model FLOPs of a training step (matmuls only; remat recomputation not counted).

Per tower, weight matmuls cost 2 FLOPs per multiply-add forward, the same again for the input
gradient when anything upstream trains or the tower's own weights train, and again for the weight
gradient when the tower's weights train. A tower's own weights need its input gradients: each
layer's weights need the gradient of its output, which comes through the layers above it, and
every tower has trained weights below its first layer too (the LLM's embedding table, the ViT's
position embedding, the abstractor's query tokens). So a frozen LLM in stage 1
costs forward + input gradient (4N per token), a fully fine-tuned one 6N with nothing upstream
training. The patch embedding counts as its own tower, fed by pixels: never an input gradient.
Attention score/value matmuls: forward, plus 2x backward when a gradient flows through them.
"""
from __future__ import annotations

import dataclasses

from owl_jax.models.config import OwlConfig


@dataclasses.dataclass(frozen=True)
class StepShape:
    batch: int  # samples per step (all micro-batches)
    seq_len: int
    images: int  # images per step


def _tower_multipliers(weights_train: bool, upstream_trains: bool, fed_by_pixels: bool = False) -> tuple[int, int]:
    needs_input_grad = upstream_trains or (weights_train and not fed_by_pixels)
    weight = 1 + int(needs_input_grad) + int(weights_train)
    attn = 3 if (weights_train or upstream_trains) else 1
    return weight, attn


def forward_flops(cfg: OwlConfig, shape: StepShape) -> dict[str, tuple[float, float]]:
    """Per tower: (weight-matmul FLOPs, attention-matmul FLOPs) of one forward pass."""
    v, a, l = cfg.vision, cfg.abstractor, cfg.llm
    s = v.num_positions
    n_img = shape.images
    patch = 2 * n_img * (s - 1) * 3 * v.patch_size**2 * v.hidden_size
    vis_w = 2 * n_img * s * v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.mlp_size)
    vis_a = 4 * n_img * v.num_layers * s * s * v.hidden_size
    q, kv = a.num_queries, a.num_queries + s
    abs_w = (
        2
        * n_img
        * a.num_layers
        * (2 * q * a.hidden_size**2 + 2 * kv * a.hidden_size**2 + 3 * q * a.hidden_size * a.ffn_size)
    )
    abs_w += 2 * n_img * q * a.hidden_size * l.hidden_size  # visual_fc
    abs_a = 4 * n_img * a.num_layers * q * kv * a.hidden_size
    tokens = shape.batch * shape.seq_len
    d, hd = l.hidden_size, l.head_dim
    per_layer = d * l.num_heads * hd * 2 + 2 * d * l.num_kv_heads * hd + 3 * d * l.mlp_size
    llm_w = 2 * tokens * (l.num_layers * per_layer + d * l.vocab_size)
    llm_a = 4 * tokens * shape.seq_len * l.num_heads * hd * l.num_layers
    lora = 0.0
    if cfg.lora.rank:
        widths = {
            "q_proj": (d, l.num_heads * hd),
            "k_proj": (d, l.num_kv_heads * hd),
            "v_proj": (d, l.num_kv_heads * hd),
            "o_proj": (l.num_heads * hd, d),
            "gate_proj": (d, l.mlp_size),
            "up_proj": (d, l.mlp_size),
            "down_proj": (l.mlp_size, d),
        }
        lora = 2 * tokens * l.num_layers * sum(cfg.lora.rank * sum(widths[m]) for m in cfg.lora.target_modules)
    return {"patch_embed": (patch, 0.0), "vision": (vis_w, vis_a), "abstractor": (abs_w, abs_a), "llm": (llm_w, llm_a),
            "lora": (lora, 0.0)}


def train_step_flops(cfg: OwlConfig, shape: StepShape, trainable_towers: set[str]) -> float:
    """trainable_towers: subset of {"vision", "abstractor", "llm", "lora"}."""
    fwd = forward_flops(cfg, shape)
    total = 0.0
    upstream = False
    for tower in ("patch_embed", "vision", "abstractor", "llm"):
        trains = ("vision" if tower == "patch_embed" else tower) in trainable_towers
        # LoRA adapters sit inside every LLM layer: input gradients flow through the whole LLM.
        upstream_for_tower = upstream or (tower == "llm" and "lora" in trainable_towers)
        wm, am = _tower_multipliers(trains, upstream_for_tower, fed_by_pixels=tower == "patch_embed")
        total += wm * fwd[tower][0] + am * fwd[tower][1]
        upstream = upstream or trains
    if "lora" in trainable_towers:
        total += 3 * fwd["lora"][0]
    return float(total)


def towers_of(trainable_paths: list[str]) -> set[str]:
    towers = set()
    for p in trainable_paths:
        if p.endswith(("lora_a", "lora_b")):
            towers.add("lora")
        elif p.startswith("vision_model"):
            towers.add("vision")
        elif p.startswith(("abstractor", "query_tokens")):
            towers.add("abstractor")
        elif p.startswith("language_model"):
            towers.add("llm")
    return towers


# Dense peak FLOP/s per chip (bf16), for the MFU estimate.
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "nvidia h100": 989e12,
    "nvidia h200": 989e12,
    "nvidia a100": 312e12,
}


def peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for name, value in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name) or name in kind:
            return value
    return None
