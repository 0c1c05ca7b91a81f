"""Compile time of the 7B training step against depth: with nn.scan it stays flat.

    JAX_PLATFORMS=cpu python bench/compile_time.py [--topology v5e:4x4] [--layers 8 16 32]

Compiles configs/mplug_owl_llama7b.py:stage2_lora for a TPU topology (AOT, abstract inputs; needs the
`tpu` extra) with the LLM cut to each depth, and prints lowering + compile seconds.
"""
import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/mplug_owl_llama7b.py:stage2_lora")
    p.add_argument("--topology", default="v5e:4x4")
    p.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    args = p.parse_args()

    from owl_jax.aot import compile_step, tpu_devices
    from owl_jax.configs import load_config_file
    from owl_jax.sharding import make_mesh
    from owl_jax.training.trainer import Trainer

    devices = tpu_devices(args.topology)
    print(f"| LLM layers | lower + compile s ({args.config}, {args.topology}) |\n|---|---|")
    for layers in args.layers:
        config = load_config_file(args.config)
        config.model.llm.num_layers = layers
        trainer = Trainer(config, make_mesh(config.mesh.to_dict(), devices))
        start = time.time()
        compile_step(trainer)
        print(f"| {layers} | {time.time() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
