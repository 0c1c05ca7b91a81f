"""Command line: python -m owl_jax.convert {from-torch,to-torch} ...

  from-torch --released DIR --out OUT
      the released mPLUG-Owl HF checkpoint -> an owl_jax params dir (config from its config.json)
  from-torch --clip DIR --llama DIR --config configs/X.py --out OUT
      stage-1 start: CLIP vision tower + LLaMA; abstractor and query tokens initialised fresh
  from-torch --released DIR --adapter PEFT_DIR --out OUT
      the released checkpoint with a stage-2 PEFT LoRA adapter on it (kept as LoRA, not merged)
  to-torch --src OWL_DIR --out OUT [--dtype bfloat16] [--max-shard-gb 5]
      an owl_jax params dir -> the released HF layout (LoRA merged)
  to-torch --src OWL_DIR --out OUT --adapter
      only its LoRA, as a PEFT adapter dir (adapter_model.safetensors + adapter_config.json)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from owl_jax import convert, params_io
from owl_jax.convert import hf_config, peft
from owl_jax.models.config import owl_config_from_dict


def _config_from_file(spec: str):
    from owl_jax.configs import load_config_file

    return owl_config_from_dict(load_config_file(spec).model.to_dict())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m owl_jax.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("from-torch", help="torch checkpoint(s) -> owl_jax params dir")
    f.add_argument("--released", help="released mPLUG-Owl HF checkpoint dir")
    f.add_argument("--clip", help="transformers CLIPVisionModel / CLIPModel dir (vision tower)")
    f.add_argument("--llama", help="transformers LlamaForCausalLM dir (language model)")
    f.add_argument("--config", help="owl_jax config file (configs/*.py) giving the model shape; "
                   "default: from the released config.json, or CLIP + LLaMA config.json files")
    f.add_argument("--dtype", default=None, help="cast parameters (float32, bfloat16); default keeps the checkpoint dtype")
    f.add_argument("--adapter", help="PEFT LoRA adapter dir (the release's stage-2 output) to put on the weights")
    f.add_argument("--seed", type=int, default=0, help="seed for freshly initialised parameters")
    f.add_argument("--out", required=True)
    t = sub.add_parser("to-torch", help="owl_jax params dir -> released HF layout")
    t.add_argument("--src", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--dtype", default=None, help="cast tensors (float32, bfloat16, float16); default keeps their dtype")
    t.add_argument("--max-shard-gb", type=float, default=5.0)
    t.add_argument("--adapter", action="store_true", help="write only the LoRA adapter, in PEFT's layout")
    args = parser.parse_args(argv)

    if args.command == "to-torch":
        params, cfg = params_io.load_params(args.src)
        if args.adapter:
            path = peft.save_adapter(params, cfg, args.out, dtype=args.dtype)
            print(f"wrote the LoRA adapter (r={cfg.lora.rank}, {', '.join(cfg.lora.target_modules)}) to {path}")
            return 0
        files = convert.to_torch(params, cfg, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
        print(f"wrote {len(files)} safetensors file(s) and config.json to {args.out}")
        return 0

    if args.config:
        cfg = _config_from_file(args.config)
    elif args.released:
        cfg = hf_config.owl_from_released(hf_config.read_json(args.released))
    else:
        cfg = _config_from_parts(args)
    params, report = convert.from_torch(cfg, released=args.released, clip=args.clip, llama=args.llama, dtype=args.dtype, seed=args.seed)
    if args.adapter:
        params, cfg = peft.load_adapter(params, cfg, args.adapter, dtype=args.dtype)
        print(f"put the LoRA adapter of {args.adapter} (r={cfg.lora.rank}, {', '.join(cfg.lora.target_modules)}) on the weights")
    params_io.save_params(args.out, params, cfg)
    copied = _copy_tokenizer(args.released or args.llama, args.out)
    print(report)
    if copied:
        print(f"copied tokenizer files {copied}")
    print(f"wrote owl_jax params to {args.out}")
    return 0


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _copy_tokenizer(src: str | None, out: str) -> list[str]:
    """The LLaMA tokenizer travels with the weights, so `owl_jax.load(out)` finds it."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if src and os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))
            copied.append(name)
    return copied


def _config_from_parts(args):
    """Model config from the CLIP and LLaMA config.json files; abstractor per the released shapes."""
    from owl_jax.models.config import AbstractorConfig, OwlConfig

    if not (args.clip and args.llama):
        sys.exit("from-torch: without --released, give --config, or both --clip and --llama")
    clip = hf_config.read_json(args.clip)
    vision = hf_config.vision_from_hf(clip.get("vision_config", clip), default_eps=1e-5)
    llm = hf_config.llama_from_hf(hf_config.read_json(args.llama))
    # The abstractor concatenates queries and image features, so its width is the vision width.
    abstractor = dataclasses.replace(AbstractorConfig(), hidden_size=vision.hidden_size, encoder_hidden_size=vision.hidden_size)
    return OwlConfig(vision=vision, abstractor=abstractor, llm=llm)


if __name__ == "__main__":
    sys.exit(main())
