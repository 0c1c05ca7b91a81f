"""Which parameters each training stage trains. Everything else is frozen: it is not
differentiated, carries no optimiser state and may be held in a lower precision.

Patterns are regular expressions matched (re.search) against '/'-joined parameter paths.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from flax import traverse_util

from owl_jax.cli import UserError

# The abstractor with its queries; in the video model also its temporal queries and the vision
# layers' temporal modules, which train with it.
ABSTRACTOR = (r"^query_tokens$", r"^abstractor/", r"^temporal_query_tokens$", r"^vision_model/encoder/layers/temporal/")

STAGE_PATTERNS: dict[str, tuple[str, ...]] = {
    # vision encoder, abstractor, query tokens, visual_fc, vit_eos; the LLM frozen
    "stage1": (r"^vision_model/",) + ABSTRACTOR,
    # LoRA adapters on the LLM (+ the abstractor when config.train_abstractor, as in the paper)
    "stage2_lora": (r"/lora_[ab]$",),
    # the whole LLM (full fine-tune variant; also the text-only pretraining of the tiny LLM)
    "full_ft": (r"^language_model/",),
    # everything (benchmarks)
    "all": (r".",),
}


def trainable_patterns(stage: str, train_abstractor: bool = False, extra: Sequence[str] = ()) -> tuple[str, ...]:
    if stage not in STAGE_PATTERNS:
        raise UserError(f"config.stage={stage!r}: expected one of {sorted(STAGE_PATTERNS)}")
    patterns = STAGE_PATTERNS[stage]
    if stage == "stage2_lora" and train_abstractor:
        patterns += ABSTRACTOR
    return patterns + tuple(extra)


def _is_trainable(path: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def split_params(params: dict, patterns: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; leaves may be arrays or nn.LogicallyPartitioned boxes."""
    flat = traverse_util.flatten_dict(params, sep="/")
    trainable = {k: v for k, v in flat.items() if _is_trainable(k, patterns)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    if not trainable:
        raise UserError(f"no parameter matches the trainable patterns {list(patterns)}")
    return traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")


def merge_params(trainable: dict, frozen: dict) -> dict:
    flat = traverse_util.flatten_dict(frozen, sep="/")
    flat.update(traverse_util.flatten_dict(trainable, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices (kernels, embeddings, LoRA factors), not on norms, biases, tokens."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: k[-1] in ("kernel", "embedding", "lora_a", "lora_b") for k in flat})
