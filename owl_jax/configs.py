"""Helpers for the ml_collections files under configs/: every section as plain data."""
from __future__ import annotations

import ml_collections

from owl_jax.models.config import OwlConfig, owl_config_to_dict
from owl_jax.sharding import DEFAULT_RULES


def model_section(cfg: OwlConfig = OwlConfig()) -> ml_collections.ConfigDict:
    """`config.model`: every OwlConfig field, overridable from the command line
    (e.g. --config.model.llm.num_layers=2)."""
    return ml_collections.ConfigDict(owl_config_to_dict(cfg))


def data_section(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.data`: the input pipeline's fields (owl_jax/data/__init__.py documents them) plus
    `source`: "tfds" (a dataset built by `python -m owl_jax.data.prepare`) or "synthetic" (random
    tokens: tests, benchmarks, AOT). Batch geometry is not repeated here: it follows the top-level
    batch_size / seq_len / max_images_per_batch / max_videos_per_batch / frames_per_video and the
    model's image size and tokens per image."""
    from owl_jax.data.pipeline import default_config

    d = default_config()
    d.source = "synthetic"
    d.images_per_sample = 1  # synthetic only
    d.batch_size = c.get_ref("batch_size")
    d.max_len = c.get_ref("seq_len")
    d.max_images_per_batch = c.get_ref("max_images_per_batch")
    d.max_videos_per_batch = c.get_ref("max_videos_per_batch")
    d.frames_per_video = c.get_ref("frames_per_video")
    d.image_size = c.model.vision.get_ref("image_size")
    d.image_token_count = c.model.abstractor.get_ref("num_queries") + 1
    return d


def base_config(model: OwlConfig) -> ml_collections.ConfigDict:
    """Every training field with a default; configs/*.py override what their recipe changes."""
    c = ml_collections.ConfigDict()
    c.model = model_section(model)
    # Which parameters train: stage1 | stage2_lora | full_ft | all (owl_jax/training/stages.py),
    # plus regexes in extra_trainable. train_abstractor: stage 2 also trains the abstractor (paper).
    c.stage = "stage1"
    c.train_abstractor = True
    c.extra_trainable = ()
    c.frozen_dtype = "float32"  # frozen weights may be held in bfloat16
    # The LM head in the loss: "answers" runs it on the answer tokens only (losses.answer_loss_from_hidden:
    # exact, about half the head's FLOPs on CPU, measured on bench_small); "all" on every token
    # (losses.answer_loss), the path whose 7B memory was AOT-measured on TPU slices (the answer rows
    # are gathered across the batch-sharded devices: re-measure before switching the 7B recipes).
    c.lm_head_rows = "answers"
    c.seed = 0
    c.num_steps = 100
    # One micro-batch, global: samples, tokens per sample, image slots. A step is
    # optim.grad_accum_steps micro-batches.
    c.batch_size = 8
    c.seq_len = 256
    c.max_images_per_batch = 8
    # The video model's clip slots, global, and the frames a slot holds (the release samples 4 a clip).
    # 0 slots: batches carry no clips (owl_jax/batch.py), and a sample with a clip is skipped and counted.
    c.max_videos_per_batch = 0
    c.frames_per_video = 4
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})  # -1 fills the devices
    c.logical_axis_rules = [list(r) for r in DEFAULT_RULES]
    c.optim = ml_collections.ConfigDict(
        {"lr": 1e-4, "end_lr": 1e-6, "warmup_steps": 10, "b1": 0.9, "b2": 0.98, "eps": 1e-6,
         "weight_decay": 0.1, "clip_norm": 1.0, "grad_accum_steps": 1}
    )
    c.data = data_section(c)
    # Initial weights: an owl_jax params dir (convert from-torch output, or a finished run's
    # workdir/params); missing parameters (e.g. fresh LoRA) are initialised. Empty: random init.
    c.init = ml_collections.ConfigDict({"params_dir": ""})
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 100, "keep": 2, "keep_best": True, "async_save": True})
    c.log_every_steps = 10
    c.export_params = True  # write workdir/params (owl_jax params dir, LoRA unmerged) at the end
    c.peak_flops_per_device = 0.0  # for MFU; 0 looks the device kind up (owl_jax/training/flops.py)
    return c


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> get_config(arg), as absl's config_flags would."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("owl_config_file", path)
    if module_spec is None:
        raise FileNotFoundError(f"{path}: not a config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
