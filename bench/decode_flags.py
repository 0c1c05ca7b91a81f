"""The flags the decoding benchmarks share: batch sizes, prompt and answer lengths, the LLaMA's depth and
width, timed repeats."""
from __future__ import annotations

from absl import flags

from owl_jax import cli


def define_decode_flags(fv: flags.FlagValues, hidden: int) -> None:
    flags.DEFINE_string("batch", "1,8", "batch sizes timed in turn, comma-separated", flag_values=fv)
    cli.register_positive_ints("batch", fv)
    flags.DEFINE_integer("prompt_len", 64, "tokens per prompt", flag_values=fv)
    flags.DEFINE_integer("new_tokens", 128, "tokens generated per sample (EOS off)", flag_values=fv)
    flags.DEFINE_integer("layers", 4, "LLaMA layers", flag_values=fv)
    flags.DEFINE_integer("hidden", hidden, "LLaMA hidden size", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "timed calls per side (the best counts)", flag_values=fv)
