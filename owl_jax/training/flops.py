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
    clips: int = 0  # clip slots per step (the video model)
    frames_per_clip: int = 0


def _tower_multipliers(weights_train: bool, upstream_trains: bool, fed_by_pixels: bool = False) -> tuple[int, int]:
    needs_input_grad = upstream_trains or (weights_train and not fed_by_pixels)
    weight = 1 + int(needs_input_grad) + int(weights_train)
    attn = 3 if (weights_train or upstream_trains) else 1
    return weight, attn


def forward_flops(cfg: OwlConfig, shape: StepShape) -> dict[str, tuple[float, float]]:
    """Per tower: (weight-matmul FLOPs, attention-matmul FLOPs) of one forward pass."""
    v, a, l = cfg.vision, cfg.abstractor, cfg.llm
    s = v.num_positions
    # A clip's frames go through the vision tower as images do; with more than one frame a slot, the
    # temporal module (D -> D/2 -> D on the patch tokens) and both sets of queries join in.
    frames = shape.clips * shape.frames_per_clip
    temporal = shape.frames_per_clip > 1

    def vision(n: int) -> tuple[float, float, float]:
        """n images: (patch embedding, weight matmuls, attention matmuls)."""
        return (2 * n * (s - 1) * 3 * v.patch_size**2 * v.hidden_size,
                2 * n * s * v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.mlp_size),
                4 * n * v.num_layers * s * s * v.hidden_size)

    def abstractor(count: int, q: int, kv: int) -> tuple[float, float]:
        """`count` inputs of q queries over kv keys (an image: the queries and its tokens)."""
        h = a.hidden_size
        w = 2 * count * a.num_layers * (2 * q * h**2 + 2 * kv * h**2 + 3 * q * h * a.ffn_size)
        w += 2 * count * q * h * l.hidden_size  # visual_fc (and temporal_visual_fc)
        return w, 4 * count * a.num_layers * q * kv * h

    patch, vis_w, vis_a = vision(shape.images)
    clip_patch, clip_w, clip_a = vision(frames)
    temporal_w = 2 * frames * (s - 1) * v.num_layers * v.hidden_size**2 if temporal else 0.0
    q = a.num_queries
    abs_w, abs_a = abstractor(shape.images, q, q + s)
    queries = 2 * q if temporal else q
    clips_abs = abstractor(shape.clips, queries, queries + shape.frames_per_clip * s)
    abs_w, abs_a = abs_w + clips_abs[0], abs_a + clips_abs[1]
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
    return {"patch_embed": (patch + clip_patch, 0.0), "vision": (vis_w, vis_a), "vision_clips": (clip_w, clip_a),
            "temporal": (temporal_w, 0.0), "abstractor": (abs_w, abs_a), "llm": (llm_w, llm_a), "lora": (lora, 0.0)}


def train_step_flops(cfg: OwlConfig, shape: StepShape, trainable_towers: set[str]) -> float:
    """trainable_towers: subset of {"vision", "temporal", "abstractor", "llm", "lora"} ("temporal":
    the video model's temporal modules, inside the vision layers)."""
    fwd = forward_flops(cfg, shape)
    vision_trains, temporal_trains = "vision" in trainable_towers, "temporal" in trainable_towers
    total = 0.0
    # (tower, its weights train, a gradient must flow through it from below)
    plan = [("patch_embed", vision_trains, False), ("vision", vision_trains, False),
            # The temporal modules sit in every vision layer: training them takes the frames' gradients
            # through the whole tower, its own weights trained or not.
            ("vision_clips", vision_trains, temporal_trains),
            ("temporal", temporal_trains, vision_trains or temporal_trains)]
    upstream = vision_trains or temporal_trains
    for tower in ("abstractor", "llm"):
        # LoRA adapters sit inside every LLM layer: input gradients flow through the whole LLM.
        plan.append((tower, tower in trainable_towers, upstream or (tower == "llm" and "lora" in trainable_towers)))
        upstream = upstream or tower in trainable_towers
    for tower, trains, gradient_through in plan:
        wm, am = _tower_multipliers(trains, gradient_through, fed_by_pixels=tower == "patch_embed")
        total += wm * fwd[tower][0] + am * fwd[tower][1]
    if "lora" in trainable_towers:
        total += 3 * fwd["lora"][0]
    return float(total)


def towers_of(trainable_paths: list[str]) -> set[str]:
    towers = set()
    for p in trainable_paths:
        if p.endswith(("lora_a", "lora_b")):
            towers.add("lora")
        elif p.startswith("vision_model"):
            towers.add("temporal" if "/temporal/" in p else "vision")
        elif p.startswith(("abstractor", "query_tokens", "temporal_query_tokens")):
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
