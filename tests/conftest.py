"""Shared test helpers. Every checkpoint a test needs is made here with random weights."""
import glob
import os
import socket
import subprocess
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # AOT tests compile for TPU in several processes
# A compile cache shared by the test processes (xdist workers, subprocess tests): many tests compile
# the same tiny programs, and a hit takes ~1 s where a compile takes ~15.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "owl_jax_test_compile_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Eight fake CPU devices for the sharding tests; everything else runs on device 0 as usual.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import numpy as np
import pytest

from owl_jax.models.config import AbstractorConfig, LlamaConfig, OwlConfig, VisionConfig

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def subprocess_env(**extra) -> dict:
    """The environment of a test's child process: this checkout importable, CPU only, then `extra`."""
    path = os.pathsep.join(p for p in (REPO, os.path.dirname(__file__), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu", **extra}


class LoggedProcess(subprocess.Popen):
    """A child process whose stderr goes to a temporary file, not a pipe: a pipe holds 64 KiB, and a
    training process blocked writing its log to a full one never reaches the barrier its peer
    process waits at, so a test that reads the pipes only after both exit waits for ever."""

    def __init__(self, args, **kwargs):
        self._log = tempfile.TemporaryFile()
        super().__init__(args, stderr=self._log, **kwargs)

    def stderr_text(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_owl_config(**overrides) -> OwlConfig:
    """A few-layer owl with every feature the 7B one has (GQA off: the release has none)."""
    cfg = OwlConfig(
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=64, num_layers=2, num_heads=4, mlp_size=128),
        abstractor=AbstractorConfig(
            hidden_size=64, num_layers=2, num_heads=4, ffn_size=88, num_queries=8, encoder_hidden_size=64
        ),
        llm=LlamaConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, mlp_size=128,
                        max_position_embeddings=256),
    )
    import dataclasses

    return dataclasses.replace(cfg, **overrides)


def random_owl_params(cfg: OwlConfig, seed: int = 0, perturb_seed: int | None = None):
    """Initialised params of `cfg` (plain arrays), with `perturb(..., perturb_seed)` on every leaf when
    given, so zero-initialised tensors (LoRA B, biases) carry values too."""
    import flax.linen as nn

    from owl_jax.models.owl import init_params

    params = nn.unbox(init_params(cfg, jax.random.PRNGKey(seed)))
    return params if perturb_seed is None else perturb(params, seed=perturb_seed)


def peaked_params(cfg, seed: int = 0):
    """Initialised params plus large noise on every leaf (LoRA B, biases included). Large noise gives
    peaked logits, so greedy choices are not near-ties that a sharded run, summing in another order,
    could flip."""
    return perturb(random_owl_params(cfg, seed=seed), seed=seed, scale=0.3)


def perturb(params, seed: int = 0, scale: float = 0.05):
    """Random offsets on every leaf, so norms, biases and zero-initialised tensors are tested too."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(x) + rng.normal(0, scale, np.shape(x)).astype(np.asarray(x).dtype) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def randomize_torch_(model, seed: int = 0, scale: float = 0.05):
    """Random values for every torch parameter (norm weights around 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            is_norm_weight = p.ndim == 1 and name.endswith("weight")
            p.copy_(noise + (1.0 if is_norm_weight else 0.0))
    return model


# configs/tiny.py shrunk for tests: the same code paths, seconds per compile. One table, used both
# in-process (tiny_train_config) and on command lines (TINY_TRAIN_FLAGS).
TINY_OVERRIDES = {
    "model.vision.image_size": 28, "model.vision.hidden_size": 32, "model.vision.num_layers": 2,
    "model.vision.num_heads": 2, "model.vision.mlp_size": 64,
    "model.abstractor.hidden_size": 32, "model.abstractor.num_layers": 1, "model.abstractor.num_heads": 2,
    "model.abstractor.ffn_size": 48, "model.abstractor.num_queries": 4, "model.abstractor.encoder_hidden_size": 32,
    "model.llm.vocab_size": 64, "model.llm.hidden_size": 32, "model.llm.num_layers": 2, "model.llm.num_heads": 4,
    "model.llm.num_kv_heads": 2, "model.llm.mlp_size": 64,
    "batch_size": 8, "seq_len": 24, "max_images_per_batch": 8, "log_every_steps": 1, "optim.warmup_steps": 1,
}
TINY_TRAIN_FLAGS = [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()]


def tiny_train_config(stage: str = "stage1", **overrides):
    """The tiny config with TINY_OVERRIDES, 4 steps, synchronous checkpoints every 2, then
    `overrides` ("a.b": value)."""
    from owl_jax.configs import load_config_file

    config = load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", f"tiny.py:{stage}"))
    defaults = {"num_steps": 4, "checkpoint.every_steps": 2, "checkpoint.async_save": False}
    for key, value in {**TINY_OVERRIDES, **defaults, **overrides}.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def damage_checkpoint(step_dir: str, how: str):
    """Damages a checkpoint step dir. truncated: every file cut in half; state_cut: only the arrays'
    files (the small JSON files that orbax reads on opening the directory still parse); emptied:
    every file removed."""
    files = [f for f in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True) if os.path.isfile(f)]
    if how == "state_cut":
        files = [f for f in files if f"{os.sep}state{os.sep}" in f and "ocdbt" in f]
    assert files
    for f in files:
        if how == "emptied":
            os.remove(f)
        else:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)


class CharTokenizer:
    """Every character is one token: id = ord(c) + 3 (0..2 stay unk/bos/eos). Easy to work by hand."""

    def __call__(self, s, add_special_tokens=False):
        assert not add_special_tokens
        return {"input_ids": [ord(c) + 3 for c in s]}


# A ShapesWorld small enough to build in seconds: 16 captions = two tiny-config batches of 8.
SHAPESWORLD_SIZES = {"captions_train": 16, "captions_test": 8, "instructions_train": 48, "instructions_test": 16}
# Its tokenizer: at most 512 SentencePiece pieces, then the 160 object words; the LLM of a test
# that trains on it has this vocabulary.
SHAPESWORLD_VOCAB = 512 + 160


@pytest.fixture(scope="session")
def shapesworld_dir(tmp_path_factory):
    """A prepared ShapesWorld dataset dir (TFDS records + its tokenizer: 512 SentencePiece pieces at
    most, then the 160 object words)."""
    from owl_jax.demo.dataset import prepare

    out = str(tmp_path_factory.mktemp("shapesworld"))
    prepare(out, seed=0, sizes=SHAPESWORLD_SIZES, vocab_size=SHAPESWORLD_VOCAB)
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "real_data: needs data or source outside this repository (the OwlEval set, "
                                       "the released mPLUG-Owl code); run with `-m real_data`")


def pytest_collection_modifyitems(config, items):
    """The default suite is self-contained: `real_data` tests run only when `-m` names them."""
    if "real_data" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("real_data")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("real_data")]


# --------------------------------------------------------------------- a small owl checkpoint
# for the inference tests (test_api, test_inference_bad_input)
QUESTIONS = ["What is in the image?", "What colour is the circle?", "Which one is bigger?", "Describe it."]
ANSWERS = ["A red circle and a blue square.", "The circle is red.", "The square is bigger.", "Two shapes."]


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    """A params dir with a tokenizer beside the params (vocab <= the model's 384). The model has
    unmerged LoRA adapters (lora_b non-zero) and the configs' dropout rates (abstractor attention 0.1,
    LoRA 0.05), which answers and scores must not apply."""
    import dataclasses

    from owl_jax.data.conversation import SYSTEM_PROMPT
    from owl_jax.data.tokenizer import train_tokenizer
    from owl_jax.models.config import LoraConfig
    from owl_jax.params_io import save_params

    d = tmp_path_factory.mktemp("owl")
    cfg = small_owl_config(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.05))
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=384))
    assert cfg.abstractor.attention_dropout > 0
    save_params(str(d), peaked_params(cfg, seed=7), cfg)
    train_tokenizer([SYSTEM_PROMPT] + QUESTIONS + ANSWERS, str(d), vocab_size=384)
    return str(d)


@pytest.fixture(scope="module")
def owl(owl_dir):
    import owl_jax

    return owl_jax.load(owl_dir)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """(a.jpg, b.jpg): small random pictures; b.jpg holds an RGBA PNG."""
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    jpg, png = d / "a.jpg", d / "b.jpg"  # b.jpg holds a PNG (as OwlEval's 49.jpg)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(jpg, format="JPEG")
    Image.fromarray(rng.integers(0, 255, (64, 48, 4), dtype=np.uint8), "RGBA").save(png, format="PNG")
    return str(jpg), str(png)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
