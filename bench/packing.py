r"""Packed against padded training steps on `bench_small`, on length profiles like the paper's data.

    JAX_PLATFORMS=cpu python bench/packing.py [--steps 4] [--quick]

Each stage draws conversations from its length profile (below), batches them with the input
pipeline's own batcher twice, one sample a row (padded) and first-fit packed (`data.packing`), and
times bench_small training steps (bench/train_throughput.py's shapes: batch 4, LLaMA 4 x 512, ViT
4 x 256 on 224 px, 65 tokens an image) on both, alternating, medians after a warm-up step each. It
reports samples/s and useful (non-padding) tokens/s and ends with one line per stage:

    stage1 useful tokens/s packed/padded = X.XXx

Length profiles (token counts in LLaMA tokens; the release's conversation template, ~38 tokens of
system prompt and turn prefixes, is added to each sample, and each image is 65 tokens):
  stage1  one image and one web caption, as CC3M / LAION: words drawn log-normally with a mean of
          ~11 (CC3M's captions average 10.3 words, Sharma et al. 2018), 1.3 tokens a word. Rows of
          512 tokens (the release's stage-1 max_length).
  stage2  the release's instruction mix (mPLUG-Owl, section 4.1): half text-only (Alpaca: one
          instruction and answer, ~40 + 120 tokens; Vicuna / ShareGPT: long multi-turn chats, a
          mean of ~1000 tokens, capped by the row; Baize: 3-6 turns of ~60 tokens each), half
          LLaVA-Instruct conversations with one image (3 parts in 5 conversations of 2-6 turns of
          ~50 tokens, 1 in 5 detailed descriptions of ~150 tokens, the rest one complex-reasoning
          answer of ~200). Rows of 1024 tokens (bench_small's positions; the release trains at 2048).
The profiles are models of the datasets' published statistics, not samples of them: the data is not
downloaded here.

Last, without a model, how full the 7B recipes' packed micro-batches are on the same profiles
(configs/mplug_owl_llama7b.py: rows, seq_len and image slots as there): the --fill of bench/aot_7b.sh.

--model 7b: the 7B recipes (configs/mplug_owl_llama7b.py: bf16 compute, their remat and attention)
on one accelerator, in bench/gpu_train_step.py's rows (stage 1: 32 x 512, stage 2: 8 x 2048; the
recipes' micro-batches span a slice), with the same length profiles. Each layout also reports its
model FLOP/s on useful tokens (training/flops.py, per sample: the padding's FLOPs are not counted)
and, on a chip with a known peak, that MFU. --rows and --llm_layers shrink a step that does not fit.

--quick: tiny shapes and two steps (the CI smoke, either model); its ratios are not the benchmark's.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from owl_jax import cli  # noqa: E402
from owl_jax.batch import BOS_ID, EOS_ID, IMAGE_PLACEHOLDER_ID  # noqa: E402
from owl_jax.data.batching import BatchDataset  # noqa: E402

TEMPLATE_TOKENS = 38  # the release's system prompt and "Human: " / "AI: " prefixes, LLaMA tokens
STAGES = {"stage1": ("stage1", 512), "stage2": ("stage2_lora", 1024)}
STAGES_7B = {"stage1": ("stage1", 32, 512), "stage2": ("stage2_lora", 8, 2048)}  # stage, rows, seq_len
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _lognormal(rng, mean: float, sigma: float = 0.5) -> float:
    return float(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma))


def stage1_sample(rng) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) lengths: one image, one caption."""
    words = max(2, round(_lognormal(rng, 11.0)))
    return [TEMPLATE_TOKENS], [round(1.3 * words) + 1]


def stage2_sample(rng) -> tuple[list[int], list[int], int]:
    """Turn lengths (prompt tokens per turn, answer tokens per turn) and the image count."""
    if rng.random() < 0.5:  # text only
        kind = rng.choice(["alpaca", "vicuna", "baize"], p=[0.4, 0.3, 0.3])
        if kind == "alpaca":
            return [TEMPLATE_TOKENS + round(_lognormal(rng, 40))], [round(_lognormal(rng, 120))], 0
        if kind == "vicuna":
            total, prompts, answers = _lognormal(rng, 1000, 0.7), [], []
            while TEMPLATE_TOKENS + sum(prompts) + sum(answers) < total:
                prompts.append(round(_lognormal(rng, 60)))
                answers.append(round(_lognormal(rng, 200)))
            prompts[0] += TEMPLATE_TOKENS
            return prompts, answers, 0
        turns = int(rng.integers(3, 7))
        prompts = [round(_lognormal(rng, 30)) for _ in range(turns)]
        prompts[0] += TEMPLATE_TOKENS
        return prompts, [round(_lognormal(rng, 60)) for _ in range(turns)], 0
    u = rng.random()
    if u < 0.6:
        turns = int(rng.integers(2, 7))
        prompts = [round(_lognormal(rng, 15)) for _ in range(turns)]
        answers = [round(_lognormal(rng, 50)) for _ in range(turns)]
    elif u < 0.8:
        prompts, answers = [round(_lognormal(rng, 15))], [round(_lognormal(rng, 150))]
    else:
        prompts, answers = [round(_lognormal(rng, 25))], [round(_lognormal(rng, 200))]
    prompts[0] += TEMPLATE_TOKENS
    return prompts, answers, 1


def encode(prompts, answers, images: int, seq_len: int, image_tokens: int, vocab: int, pixels: np.ndarray, rng,
           ) -> tuple[dict, bool]:
    """One encoded sample as the pipeline's (padded to seq_len, truncated there) and whether it was cut."""
    ids, loss = [BOS_ID] + [IMAGE_PLACEHOLDER_ID] * image_tokens * images, [0] * (1 + image_tokens * images)
    for p, a in zip(prompts, answers):
        ids += rng.integers(3, vocab, p).tolist() + rng.integers(3, vocab, a).tolist() + [EOS_ID]
        loss += [0] * p + [1] * (a + 1)
    cut = len(ids) > seq_len
    ids, loss = ids[:seq_len], loss[:seq_len]
    out = {k: np.zeros((seq_len,), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    out["input_ids"][:len(ids)], out["attention_mask"][:len(ids)], out["loss_mask"][:len(ids)] = ids, 1, loss
    out["images"] = pixels[:images]  # one shared array: what the pixels are does not change the step's time
    out["num_images"] = images
    return out, cut


def batches(samples: list[dict], batch: int, max_images: int, seq_len: int, image_size: int, packing: bool):
    """The pipeline's batcher over `samples` (in order): padded or packed batches."""
    source = grain.MapDataset.source(samples).to_iter_dataset()
    return iter(BatchDataset(source, batch, max_images, seq_len, image_size, packing))


def draw(stage: str, n: int, seq_len: int, image_tokens: int, vocab: int, pixels: np.ndarray, rng,
         shrink: int = 1) -> tuple[list[dict], int]:
    """n encoded samples of a stage's profile (lengths divided by `shrink`) and how many were cut."""
    samples, cut = [], 0
    for _ in range(n):
        if stage == "stage1":
            (prompts, answers), images = stage1_sample(rng), 1
        else:
            prompts, answers, images = stage2_sample(rng)
        if shrink > 1:
            prompts, answers = [max(1, p // shrink) for p in prompts], [max(1, a // shrink) for a in answers]
        sample, was_cut = encode(prompts, answers, images, seq_len, image_tokens, vocab, pixels, rng)
        samples.append(sample)
        cut += was_cut
    return samples, cut


def samples_in(attention_mask: np.ndarray) -> int:
    """Samples in a batch's rows: the distinct sample ids (1, 2, ...) of each row, summed."""
    return sum(len(np.unique(row[row > 0])) for row in attention_mask.reshape(-1, attention_mask.shape[-1]))


def recipe_fill(stage: str, rows_measured: int) -> str:
    """How full the 7B recipe's packed micro-batches are on the stage's profile, over about
    `rows_measured` rows (no model runs)."""
    from owl_jax.configs import load_config_file

    recipe = load_config_file(os.path.join(ROOT, "configs", f"mplug_owl_llama7b.py:{stage}"))
    rows, seq_len, slots = recipe.batch_size, recipe.seq_len, recipe.max_images_per_batch
    batches_measured = max(1, rows_measured // rows)
    rng = np.random.default_rng(1)
    pixels = np.zeros((1, 1, 1, 3), np.float32)
    name = "stage1" if stage == "stage1" else "stage2"
    image_tokens, vocab = recipe.model.abstractor.num_queries + 1, recipe.model.llm.vocab_size
    samples, _ = draw(name, int(rows * seq_len / 100 * (batches_measured + 1)), seq_len, image_tokens, vocab, pixels,
                      rng)
    it = batches(samples, rows, slots, seq_len, 1, True)
    fill, count, images = [], [], []
    for _ in range(batches_measured):
        b = next(it)
        fill.append(np.mean(b["attention_mask"] > 0))
        count.append(samples_in(b["attention_mask"]))
        images.append(int(b["num_images"].sum()))
    return (f"7B recipe {stage}: packed micro-batch of {rows} x {seq_len} with {slots} image slots: rows "
            f"{np.mean(fill):.1%} full, {np.mean(count):.1f} samples and {np.mean(images):.1f} images a micro-batch")


def useful_flops(cfg, towers: set, host: dict) -> float:
    """Analytic model FLOPs of a batch's samples as if each ran alone, unpadded: each sample's tokens
    (its attention over its own length) and the images. host: one step's stacked batch."""
    from owl_jax.training.flops import StepShape, train_step_flops

    total = train_step_flops(cfg, StepShape(0, 0, int(host["num_images"].sum())), towers)
    mask = host["attention_mask"].reshape(-1, host["attention_mask"].shape[-1])
    for length in np.concatenate([np.bincount(row[row > 0])[1:] for row in mask]):
        if length:
            total += train_step_flops(cfg, StepShape(1, int(length), 0), towers)
    return total


def stage_config(args, name: str):
    """(owl_jax.train config, rows of seq_len tokens) of a stage on --model, --quick shrinking it."""
    from train_throughput import bench_config

    from owl_jax.configs import load_config_file

    if args.model == "7b":
        stage, rows, seq_len = STAGES_7B[name]
        config = load_config_file(os.path.join(ROOT, "configs", f"mplug_owl_llama7b.py:{stage}"))
        config.optim.grad_accum_steps = 1
        config.batch_size = args.rows or rows
        if args.llm_layers:
            config.model.llm.num_layers = args.llm_layers
    else:
        stage, seq_len = STAGES[name]
        config = bench_config(stage)
    if args.quick:
        config.model.vision.update(image_size=28, hidden_size=32, num_layers=1, num_heads=2, mlp_size=64)
        config.model.abstractor.update(hidden_size=32, num_layers=1, num_heads=2, ffn_size=48, num_queries=4,
                                       encoder_hidden_size=32)
        config.model.llm.update(vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                mlp_size=64)
        config.batch_size = min(config.batch_size, 4)
        seq_len //= 4
    return config, seq_len


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_integer("steps", 4, "timed steps per layout (after one warm-up step)", flag_values=fv)
    flags.DEFINE_bool("quick", False, "tiny shapes, two steps: a smoke run", flag_values=fv)
    flags.DEFINE_enum("model", "bench_small", ["bench_small", "7b"], "the model and its step shapes", flag_values=fv)
    flags.DEFINE_integer("rows", 0, "--model 7b: rows a step (0: the stage's, 32 or 8)", flag_values=fv)
    flags.DEFINE_integer("llm_layers", 0, "--model 7b: the LLM cut to this many layers (0: all 32)", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_flags(argv, _flags(), __doc__)
    from owl_jax.sharding import make_mesh
    from owl_jax.training.flops import peak_flops, towers_of
    from owl_jax.training.trainer import Trainer, global_batch, stack_micro_batches

    steps = 2 if args.quick else args.steps
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind)
    print(f"# {args.model} on {device.device_kind}, jax {jax.__version__}", flush=True)
    lines = []
    for name in STAGES:
        config, seq_len = stage_config(args, name)
        image_tokens = config.model.abstractor.num_queries + 1
        size, vocab, b = config.model.vision.image_size, config.model.llm.vocab_size, config.batch_size
        rng = np.random.default_rng(0)
        pixels = rng.normal(size=(1, size, size, 3)).astype(np.float32)
        samples, cut = draw(name, 16 * b * (steps + 1), seq_len, image_tokens, vocab, pixels, rng,
                            shrink=4 if args.quick else 1)
        real = [int(s["attention_mask"].sum()) for s in samples]
        # Image slots: one a row padded; packed, as many as a batch's samples bring on average. The
        # vision tower encodes every slot, used or not, so spare slots cost as much as images.
        per_row = seq_len / np.mean(real)
        mean_images = np.mean([s["num_images"] for s in samples])
        layouts = {"padded": (False, b), "packed": (True, max(b, int(round(b * per_row * mean_images))))}
        results = {}
        prepared = {}
        state = None  # one state for both layouts (the same parameters): a 7B model is held once
        for layout, (packing, max_images) in layouts.items():
            config.update(seq_len=seq_len, max_images_per_batch=max_images)
            trainer = Trainer(config, make_mesh({"fsdp": 1}, [device]))
            it = batches(samples, b, max_images, seq_len, size, packing)
            host = [stack_micro_batches([{k: v for k, v in next(it).items() if not k.startswith("_")}])
                    for _ in range(steps + 1)]
            step = trainer.jit_train_step({k: v.shape for k, v in host[0].items()})
            if state is None:
                state = trainer.init_state(jax.random.PRNGKey(0))
                towers = towers_of(trainer.trainable_paths)
            prepared[layout] = (step, host)
        times = {layout: [] for layout in layouts}
        for i in range(steps + 1):  # alternate the layouts, so both see the same machine state
            for layout, (step, host) in prepared.items():
                batch = global_batch(host[i], step.batch_shardings)
                t = time.perf_counter()
                state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
                if i:
                    times[layout].append(time.perf_counter() - t)
        for layout, (_, host) in prepared.items():
            seconds = statistics.median(times[layout])
            tokens = np.mean([np.count_nonzero(h["attention_mask"]) for h in host[1:]])
            count = np.mean([samples_in(h["attention_mask"]) for h in host[1:]])
            flops = np.mean([useful_flops(trainer.model_cfg, towers, h) for h in host[1:]]) / seconds
            results[layout] = (tokens / seconds, count / seconds)
            print(f"{name} {layout}: {seconds * 1e3:.0f} ms/step, {layouts[layout][1]} image slots, "
                  f"{tokens:.0f} of {b * seq_len} tokens real "
                  f"({tokens / (b * seq_len):.0%}), {count:.1f} samples a step; {tokens / seconds:.0f} useful "
                  f"tokens/s, {count / seconds:.2f} samples/s; useful model FLOP/s {flops:.3g}"
                  + (f" (MFU {flops / peak:.1%})" if peak else ""), flush=True)
        print(f"{name}: {len(samples)} samples drawn, mean {np.mean(real):.0f} tokens, {cut} cut at {seq_len}")
        lines.append(f"{name} useful tokens/s packed/padded = {results['packed'][0] / results['padded'][0]:.2f}x "
                     f"(samples/s {results['packed'][1] / results['padded'][1]:.2f}x)")
    for stage in ("stage1", "stage2_lora"):
        print(recipe_fill(stage, 256 if args.quick else 2048), flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
