"""The main job: the tiny owl (owl_jax/demo/tiny.py) learns ShapesWorld, stage by stage, on CPU.

    python -m owl_jax.demo.run --workdir=/tmp/owl [--quick] [--blank_images] [--config.stages.stage1.num_steps=...]

Sections:
  model      the tiny owl (owl_jax/demo/tiny.py), shared by every stage; stage 2 adds LoRA
  prepare    the ShapesWorld build (owl_jax.demo.dataset): seed and split sizes
  stages     stage0 | stage1 | stage2: each is a set of overrides of owl_jax.train's config
             (owl_jax/configs.py:base_config), applied in order; data.dataset_dir and
             init.params_dir are filled in by the runner
  eval       exact-match evaluation on the held-out split, sample answers, attention plots
  quick      overrides merged over everything above by --quick (the CI smoke run)
"""
import ml_collections

from owl_jax.demo import tiny


def _tiny_model() -> ml_collections.ConfigDict:
    return tiny.get_config("stage1").model


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.model = _tiny_model()
    c.blank_images = False  # the control: every image (train and eval) replaced by a blank one
    c.prepare = ml_collections.ConfigDict({
        "seed": 0,
        "sizes": {"captions_train": 4000, "captions_test": 200, "instructions_train": 12000, "instructions_test": 400,
                  "text_train": 16000},
    })

    c.stages = ml_collections.ConfigDict()
    # Stage 0: text-only pretraining of the tiny LLaMA (it stands in for LLaMA's own pretraining):
    # captions and instructions with every image written out as its caption (split text_train),
    # so the LLM learns to answer from what the context shows, plus quizzes (a told scene, then up to
    # 5 questions about it: many binding examples per scene); the whole LLM trained.
    c.stages.stage0 = ml_collections.ConfigDict({
        "stage": "full_ft",
        "num_steps": 1000,
        # 32, not 16: binding a told scene is gradient-noise limited (docs/notes/research_log.md,
        # "Learning rate and batch"): stage 0's told-scene answers 43% -> 50%, and after stage 2 27% -> 33% of the
        # image questions, for ~6 more minutes.
        "batch_size": 32,
        "seq_len": 144,  # text_train conversations are at most ~145 tokens (the quizzes)
        "max_images_per_batch": 2,  # text only: unused slots
        "optim": {"lr": 2e-3, "end_lr": 1e-4, "warmup_steps": 50, "weight_decay": 0.01},
        "data": {"split": "text_train", "text_only": True},
        "log_every_steps": 10,
        "checkpoint": {"every_steps": 250},
    })
    # Stage 1: vision encoder + abstractor on captions, the LLM frozen.
    c.stages.stage1 = ml_collections.ConfigDict({
        "stage": "stage1",
        "num_steps": 600,
        "batch_size": 16,
        "seq_len": 104,  # captions are at most 99 tokens (17 image tokens included)
        "max_images_per_batch": 16,
        "optim": {"lr": 1e-3, "end_lr": 5e-5, "warmup_steps": 50, "weight_decay": 0.01},
        "data": {"split": "captions_train"},
        "log_every_steps": 10,
        "checkpoint": {"every_steps": 100},
    })
    # Stage 2: LoRA on q/v + the abstractor, on the instruction mix (text-only included). Packed: a
    # row of 224 tokens holds ~3 conversations (at most 107 tokens each, most far shorter), so 8 rows
    # carry ~23 samples, 91% full (16 rows of 112, one sample each: 16 samples, 63% full).
    c.stages.stage2 = ml_collections.ConfigDict({
        "stage": "stage2_lora",
        "train_abstractor": True,
        "model": {"lora": {"rank": 8, "alpha": 32.0, "dropout": 0.0}},
        "num_steps": 550,
        "batch_size": 8,
        "seq_len": 224,
        "max_images_per_batch": 24,
        "optim": {"lr": 2e-3, "end_lr": 5e-5, "warmup_steps": 50, "weight_decay": 0.01},
        "data": {"split": "instructions_train", "text_only_ratio": 0.25, "packing": True},
        "log_every_steps": 10,
        "checkpoint": {"every_steps": 100},
    })

    c.eval = ml_collections.ConfigDict({
        "split": "instructions_test",
        "batch_size": 64,
        "max_new_tokens": 12,  # answers are one word or number
        "max_questions": 0,  # 0: all
        "stage0_scenes_as_text": True,  # stage 0 is asked with every image written out as its caption
        "num_samples": 8,  # sample questions answered and printed (one per category first)
        "attention_images": 3,  # test images drawn with the abstractor's attention
        "attention_queries": 4,  # queries shown per image (heads averaged)
        "attention_layer": 0,  # abstractor layer drawn (0: the first look at the image)
    })

    # --quick: CI-sized (seconds per stage): a small ShapesWorld, a smaller owl, 60 steps a stage.
    c.quick = ml_collections.ConfigDict({
        "model": {
            "vision": {"image_size": 28, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_size": 64},
            "abstractor": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "ffn_size": 48, "num_queries": 4,
                           "encoder_hidden_size": 32},
            "llm": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2, "mlp_size": 64},
        },
        "prepare": {"sizes": {"captions_train": 64, "captions_test": 8, "instructions_train": 160,
                              "instructions_test": 32, "text_train": 200}},
        "stages": {
            name: {"num_steps": 60, "batch_size": 8, "log_every_steps": 1, "checkpoint": {"every_steps": 30},
                   "optim": {"warmup_steps": 2, "end_lr": 1e-3}}
            for name in ("stage0", "stage1", "stage2")
        },
        "eval": {"batch_size": 16, "max_new_tokens": 4, "num_samples": 3, "attention_images": 2,
                 "attention_queries": 2},
    })
    c.quick.stages.stage0.optim.lr = 1e-2
    c.quick.stages.stage1.optim.lr = 5e-3
    c.quick.stages.stage2.optim.lr = 3e-3
    c.quick.stages.stage2.batch_size = 16  # stage 2 has ~3 answer tokens a sample: less noisy steps
    c.quick.stages.stage1.max_images_per_batch = 8
    c.quick.stages.stage2.max_images_per_batch = 24
    return c
