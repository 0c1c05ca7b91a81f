"""Compile time of the 7B training step against depth: with nn.scan it stays flat.

    JAX_PLATFORMS=cpu python bench/compile_time.py [--topology v5e:4x4] [--layers 8,16,32]

Compiles configs/mplug_owl_llama7b.py:stage2_lora for a TPU topology (AOT, abstract inputs; needs the
`tpu` extra) with the LLM cut to each depth, and prints lowering + compile seconds.
"""
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import flags  # noqa: E402

from owl_jax import cli  # noqa: E402


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("config", "configs/mplug_owl_llama7b.py:stage2_lora", "the training config compiled",
                        flag_values=fv)
    flags.DEFINE_string("topology", "v5e:4x4", "the TPU topology compiled for", flag_values=fv)
    flags.DEFINE_string("layers", "8,16,32", "LLM depths compiled in turn, comma-separated", flag_values=fv)
    cli.register_positive_ints("layers", fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    args = cli.parse_flags(argv, _flags(), __doc__)

    from owl_jax.aot import compile_step, tpu_devices
    from owl_jax.configs import load_config_file
    from owl_jax.sharding import make_mesh
    from owl_jax.training.trainer import Trainer

    devices = tpu_devices(args.topology)
    print(f"| LLM layers | lower + compile s ({args.config}, {args.topology}) |\n|---|---|")
    for layers in cli.positive_ints(args.layers):
        config = load_config_file(args.config)
        config.model.llm.num_layers = layers
        trainer = Trainer(config, make_mesh(config.mesh.to_dict(), devices))
        start = time.time()
        compile_step(trainer)
        print(f"| {layers} | {time.time() - start:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
