"""Command line: python -m owl_jax.convert {from-torch,to-torch} ...

  from-torch --released DIR --out OUT
      the released mPLUG-Owl HF checkpoint -> an owl_jax params dir (config from its config.json)
  from-torch --clip DIR --llama DIR --config configs/X.py --out OUT
      stage-1 start: CLIP vision tower + LLaMA; abstractor and query tokens initialised fresh
  from-torch --released DIR --adapter PEFT_DIR --out OUT
      the released checkpoint with a stage-2 PEFT LoRA adapter on it (kept as LoRA, not merged)
  to-torch --src OWL_DIR --out OUT [--dtype bfloat16] [--max_shard_gb 5]
      an owl_jax params dir -> the released HF layout (LoRA merged), with its tokenizer files
  to-torch --src OWL_DIR --out OUT --adapter
      only its LoRA, as a PEFT adapter dir (adapter_model.safetensors + adapter_config.json)

Checkpoints are untrusted input: a tensor of the wrong shape or dtype, or one that maps to no
owl_jax parameter (it would be dropped; --allow_unused_tensors converts anyway), ends the run with
a one-line error and exit status 2. to-torch writes OUT.tmp and puts it in OUT's place only when
complete, so a failed run leaves OUT as it was.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import sys
import types

from absl import flags

from owl_jax import cli, convert, params_io
from owl_jax.cli import absolute
from owl_jax.convert import hf_config, peft
from owl_jax.models.config import owl_config_from_dict

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Every file to-torch writes: an existing OUT holding only these is an earlier export, safe to replace
# (a dir with .bin weights, such as a download of the release, is not).
OUTPUT_FILES = ("config.json", peft.CONFIG_FILE, peft.ADAPTER_FILES[0]) + TOKENIZER_FILES
OUTPUT_WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")
PATH_ARGS = ("out", "src", "released", "clip", "llama", "adapter", "config")


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name, the command first (None: sys.argv's)."""
    command, fv = cli.parse_command(argv, _commands(), __doc__)
    args = types.SimpleNamespace(command=command, **fv.flag_values_dict())
    for name in PATH_ARGS:
        if isinstance(getattr(args, name, None), str):  # to-torch's --adapter is a switch
            setattr(args, name, absolute(getattr(args, name)))
    try:
        return _to_torch(args) if args.command == "to-torch" else _from_torch(args)
    except (ValueError, KeyError, OSError) as e:  # bad input: say what, not where in our code
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {' '.join(str(message).splitlines())}", file=sys.stderr)
        return 2


def _commands() -> dict[str, cli.Command]:
    """Each command's flags, on FlagValues of their own (fresh for each main() call): --adapter is a
    directory to from-torch and a switch to to-torch."""
    f = flags.FlagValues()
    flags.DEFINE_string("released", None, "released mPLUG-Owl HF checkpoint dir", flag_values=f)
    flags.DEFINE_string("clip", None, "transformers CLIPVisionModel / CLIPModel dir (vision tower)", flag_values=f)
    flags.DEFINE_string("llama", None, "transformers LlamaForCausalLM dir (language model)", flag_values=f)
    flags.DEFINE_string("config", None, "owl_jax config file (configs/*.py) giving the model shape; "
                        "default: from the released config.json, or CLIP + LLaMA config.json files", flag_values=f)
    flags.DEFINE_enum("dtype", None, convert.TORCH_DTYPES, "cast parameters; default keeps the checkpoint dtype",
                      flag_values=f)
    flags.DEFINE_string("adapter", None, "PEFT LoRA adapter dir (the release's stage-2 output) to put on the weights",
                        flag_values=f)
    flags.DEFINE_integer("seed", 0, "seed for freshly initialised parameters", flag_values=f)
    flags.DEFINE_bool("allow_unused_tensors", False, "convert even when checkpoint tensors match no owl_jax "
                      "parameter (they are dropped and listed)", flag_values=f)
    flags.DEFINE_string("out", None, "the owl_jax params dir to write", flag_values=f)
    t = flags.FlagValues()
    flags.DEFINE_string("src", None, "owl_jax params dir", flag_values=t)
    flags.DEFINE_string("out", None, "the dir to write, replaced whole: it may hold only an earlier export",
                        flag_values=t)
    flags.DEFINE_enum("dtype", None, convert.TORCH_DTYPES, "cast tensors; default keeps their dtype", flag_values=t)
    flags.DEFINE_float("max_shard_gb", 5.0, "largest safetensors file, in GiB", flag_values=t)
    flags.DEFINE_bool("adapter", False, "write only the LoRA adapter, in PEFT's layout", flag_values=t)
    return {"from-torch": cli.Command(f, "torch checkpoint(s) -> owl_jax params dir", required=("out",)),
            "to-torch": cli.Command(t, "owl_jax params dir -> released HF layout", required=("src", "out"))}


def _to_torch(args) -> int:
    if "://" in args.out:
        raise ValueError(f"--out {args.out}: to-torch writes a local directory")
    params, cfg = _load_owl(args.src)
    try:
        convert.check_shapes(params, cfg)
    except ValueError as e:
        raise ValueError(f"{os.path.join(args.src, params_io.CONFIG_FILE)} disagrees with the params: {e}") from e
    with _fresh_dir(args.out) as tmp:
        if args.adapter:
            peft.save_adapter(params, cfg, tmp, dtype=args.dtype)
            what = f"the LoRA adapter (r={cfg.lora.rank}, {', '.join(cfg.lora.target_modules)})"
        else:
            files = convert.to_torch(params, cfg, tmp, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
            copied = _copy_tokenizer(args.src, tmp)
            what = f"{len(files)} safetensors file(s), config.json" + (
                f" and tokenizer files {copied}" if copied else ""
            )
    print(f"wrote {what} to {args.out}")
    return 0


def _load_owl(src: str):
    """An owl_jax params dir, with its path in every error."""
    if "://" not in src and not os.path.isdir(src):
        raise FileNotFoundError(f"--src {src}: no such directory")
    try:
        return params_io.load_params(src)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001  (json, the config's fields and orbax each fail differently)
        raise ValueError(f"{src}: cannot read owl_jax params ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def _fresh_dir(out: str):
    """Yields OUT.tmp to write into, which replaces OUT once complete: files of an earlier export left
    beside the new ones (shards, an index) would be read in their place, and a failed run must leave
    the earlier export whole."""
    tmp = out + ".tmp"
    _check_replaceable(out)
    _check_replaceable(tmp)  # left by an interrupted run
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out + ".old"  # OUT is never missing: a crash between the renames leaves OUT.old whole
    _check_replaceable(old)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(path: str) -> None:
    """A directory is replaced whole only when it holds nothing but what to-torch writes, so pointing
    --out at the wrong directory (the params dir, a home directory) deletes no one's work."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        raise ValueError(f"{path}: exists and is not a directory; to-torch writes a directory there")
    foreign = sorted(n for n in os.listdir(path) if not _is_output_file(os.path.join(path, n)))
    if foreign:
        raise ValueError(f"{path}: holds {convert.name_some(foreign)}, which to-torch does not write; the output "
                         "directory is replaced whole, so give a new one or remove them")


def _is_output_file(path: str) -> bool:
    name = os.path.basename(path)
    return (
        os.path.isfile(path)
        and not os.path.islink(path)
        and (name in OUTPUT_FILES or bool(OUTPUT_WEIGHTS.fullmatch(name)))
    )


def _from_torch(args) -> int:
    if args.config:
        cfg = _config_from_file(args.config)
    elif args.released:
        cfg = hf_config.owl_from_released(hf_config.read_json(args.released), convert.released_is_video(args.released))
    else:
        cfg = _config_from_parts(args)
    params, report = convert.from_torch(cfg, released=args.released, clip=args.clip, llama=args.llama, dtype=args.dtype,
                                        seed=args.seed, allow_unused=args.allow_unused_tensors)
    if args.adapter:
        params, cfg = peft.load_adapter(params, cfg, args.adapter, dtype=args.dtype)
        print(
            f"put the LoRA adapter of {args.adapter} (r={cfg.lora.rank}, {', '.join(cfg.lora.target_modules)}) "
            "on the weights"
        )
    params_io.save_params(args.out, params, cfg)
    copied = _copy_tokenizer(args.released or args.llama, args.out)
    print(report)
    if copied:
        print(f"copied tokenizer files {copied}")
    print(f"wrote owl_jax params to {args.out}")
    return 0


def _config_from_file(spec: str):
    from owl_jax.configs import load_config_file

    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    return owl_config_from_dict(load_config_file(spec).model.to_dict())


def _copy_tokenizer(src: str | None, out: str) -> list[str]:
    """The LLaMA tokenizer travels with the weights, both ways, so `owl_jax.load(out)` and the
    released code find it."""
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
        raise ValueError("from-torch: without --released, give --config, or both --clip and --llama")
    clip = hf_config.read_json(args.clip)
    vision = hf_config.vision_from_hf(clip.get("vision_config", clip), default_eps=1e-5)
    llm = hf_config.llama_from_hf(hf_config.read_json(args.llama))
    # The abstractor concatenates queries and image features, so its width is the vision width.
    abstractor = dataclasses.replace(
        AbstractorConfig(), hidden_size=vision.hidden_size, encoder_hidden_size=vision.hidden_size
    )
    return OwlConfig(vision=vision, abstractor=abstractor, llm=llm)


if __name__ == "__main__":
    sys.exit(main())
