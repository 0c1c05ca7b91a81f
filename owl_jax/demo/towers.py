r"""The main job's pretrained towers, made as the paper's are before its stage 1: the tiny LLaMA
pretrained on ShapesWorld text (LLaMA's part), the tiny ViT by a contrastive image-text objective
(CLIP's part), and the tokenizer they share.

    python -m owl_jax.demo.towers --workdir=DIR [--quick] [--only=llm|vit] [--config.towers.llm.num_steps=...]

Sections, top to bottom (settings: the `towers` section of owl_jax/demo/config.py):
  data   ShapesWorld text (captions, instructions and quizzes with every scene told in object
         words, one token a shape, and text-only tasks; no sample of the main job's held-out
         splits) and its tokenizer, the object words added, into DIR/data
  llm    the tiny LLaMA: copy drills on random tokens first (owl_jax.demo.drills: its
         induction heads form there, as a real LLM's do on repetitive text; DIR/llm_drills), its
         object words' embeddings set to the sums of their words', then trained on the text
         (owl_jax.train, the whole LLM: DIR/llm) and asked the held-out questions with each
         scene told in object words (DIR/llm/eval.json)
  vit    the tiny ViT and a small text tower trained by SigLIP's sigmoid loss (and CoCa's
         captioner) on freshly drawn scenes and their captions (DIR/vit), then linear probes on its
         patch features
  out    DIR/pretrained: an owl_jax params dir holding the LLM and the ViT (no abstractor: stage 1
         initialises it), DIR/pretrained/tokenizer, DIR/pretrained/towers.json (figures, times)

A finished part is skipped on a rerun; the LLM's text training resumes from its last checkpoint,
its drills (minutes) and the ViT's training start again. The two towers may be made at once by two
processes (--only=llm, --only=vit) once the data is there. The main job's committed towers
(owl_jax/demo/pretrained) are DIR/pretrained of a run with the config file's settings, its two towers
made by separate `--only` runs (BENCHMARKS.md, "The pretrained towers").
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags

from owl_jax.demo import jobs
from owl_jax.training.checkpoints import WorkdirLock

FLAGS = flags.FLAGS
PARTS = ("llm", "vit")
TOWERS_JSON = "towers.json"


def _define_flags() -> None:
    """Only when run as a program: owl_jax.train's --config (here the main job's file, whose `towers`
    section this program reads) and --workdir, then its own."""
    from owl_jax import train

    train._define_flags()
    flags.adopt_module_key_flags(train)
    FLAGS.set_default("config", jobs.DEFAULT_CONFIG)
    flags.DEFINE_bool("quick", False, "CI-sized: merge the config's `quick` section.")
    flags.DEFINE_enum("only", None, PARTS, "Make one tower only.")


# ------------------------------------------------------------------------------------ data


def prepare_text(config, workdir: str) -> str:
    """ShapesWorld text and its tokenizer into WORKDIR/data; returns that dir."""
    from owl_jax.demo.dataset import prepare

    data_dir = os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(data_dir, "tokenizer", "tokenizer.model")):
        print(f"== data: ShapesWorld text into {data_dir}")
        prepare(data_dir, seed=config.prepare.seed, sizes={"text_train": config.towers.text_train} | held_out(config))
    return data_dir


def held_out(config) -> dict:
    """The main job's held-out split sizes, which the towers' text and scenes leave out."""
    return {k: config.prepare.sizes[k] for k in ("captions_test", "instructions_test")}


# ------------------------------------------------------------------------------------ the LLM


def pretrain_llm(config, workdir: str, data_dir: str) -> dict:
    """Trains the tiny LLaMA on ShapesWorld text (resumable), then asks it the held-out questions
    with each scene told as text. Returns {"wall_s", "accuracy", "last_metrics"}."""
    from owl_jax import train

    out = os.path.join(workdir, "llm")
    done = os.path.join(out, "eval.json")
    if os.path.exists(done):
        return jobs.read_json(done)
    # Its own lock: owl_jax.train takes WORKDIR/llm's, and two `--only=llm` runs must not both drill.
    with WorkdirLock(os.path.join(workdir, "llm_drills")):
        drilled = drill_llm(config, workdir, data_dir)
    tc = jobs.train_config(config.model, config.towers.llm, "towers.llm", data_dir, drilled)
    print(f"== llm: {tc.num_steps} steps of {tc.batch_size} x {tc.seq_len} tokens on {tc.data.split}")
    t0 = time.time()
    last = train.train(tc, out)
    wall = time.time() - t0
    if not os.path.exists(os.path.join(out, "params", "owl_config.json")):
        raise SystemExit("the LLM's pretraining stopped before its last step (preempted?): rerun to resume")
    result = jobs.evaluate(os.path.join(out, "params"), data_dir, config.eval, False, "llm", scenes_as_text=True)
    record = {"wall_s": wall, "last_metrics": last, "eval_wall_s": result["wall_s"], "accuracy": result["accuracy"],
              "answers": result["answers"],
              "drills": jobs.read_json(os.path.join(os.path.dirname(drilled), "drills.json")) if drilled else None}
    jobs.write_json(done, record)
    print("   llm exact match, scenes told as text: "
          + ", ".join(f"{c} {100 * a['accuracy']:.0f}%" for c, a in record["accuracy"].items()))
    return record


def drill_llm(config, workdir: str, data_dir: str) -> str:
    """The LLM's drills on random tokens (config.towers.drills; not resumable: minutes), then each
    object word's embedding set to the sum of its colour, shape and region words' (a fresh row
    learns the lookup far more slowly: docs/notes/research_log.md, "Object words and keyed
    answers"). Returns the params dir (the LLM alone) its text training starts from; '' when there
    are no drills."""
    import jax
    import numpy as np

    from owl_jax.data.tokenizer import encode_text, load_tokenizer
    from owl_jax.demo import drills
    from owl_jax.demo.told_scenes import object_rows
    from owl_jax.params_io import save_params
    from owl_jax.sharding import make_mesh
    from owl_jax.training.stages import merge_params
    from owl_jax.training.trainer import Trainer, global_batch

    d = config.towers.drills
    out = os.path.join(workdir, "llm_drills")
    if not d.steps:
        return ""
    # drills.json is written last: params without it are a run that died while saving
    if os.path.exists(os.path.join(out, "drills.json")):
        return os.path.join(out, "params")
    tc = jobs.train_config(config.model, {"stage": "full_ft", "num_steps": d.steps, "batch_size": d.batch_size,
                                          "seq_len": d.seq_len, "optim": d.optim.to_dict(), "seed": d.seed},
                           "towers.drills", "", "")
    size = tc.model.vision.image_size
    batches = drills.batches(np.random.default_rng(d.seed), d.batch_size, d.seq_len, tc.model.llm.vocab_size,
                             tuple(d.tasks))

    def as_batch(ids, loss):
        return drills.trainer_batch(ids, loss, size)

    trainer = Trainer(tc, make_mesh({"fsdp": 1}, jax.devices()[:1]))
    first = as_batch(*next(batches))
    step = trainer.jit_train_step({k: v.shape for k, v in first.items()})
    state = trainer.init_state(jax.random.PRNGKey(tc.seed))
    print(f"== llm drills: {d.steps} steps of {d.batch_size} x {d.seq_len} random tokens ({', '.join(d.tasks)})")
    t0, history = time.time(), []
    for i in range(1, d.steps + 1):
        state, m = step(state, global_batch(first if i == 1 else as_batch(*next(batches)), step.batch_shardings))
        if i % d.log_every_steps == 0 or i == d.steps:
            history.append({"step": i, "loss": float(m["loss"]), "accuracy": float(m["accuracy"])})
            print(f"   step {i}: loss {history[-1]['loss']:.3f}, token accuracy {history[-1]['accuracy']:.3f}")
    if not np.isfinite(history[-1]["loss"]):
        raise SystemExit(f"the LLM's drills diverged (loss {history[-1]['loss']}): lower towers.drills.optim.lr")
    llm = jax.device_get(merge_params(state["trainable"], state["frozen"])["language_model"])
    tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer"))
    embed = llm["model"]["embed_tokens"]
    embed["embedding"] = np.asarray(object_rows(embed["embedding"], lambda text: encode_text(tokenizer, text)))
    save_params(os.path.join(out, "params"), {"language_model": llm}, trainer.model_cfg)
    jobs.write_json(os.path.join(out, "drills.json"), {"wall_s": time.time() - t0, "history": history})
    return os.path.join(out, "params")


# ------------------------------------------------------------------------------------ the ViT


def siglip_settings(v):
    """config.towers.vit -> siglip.Settings."""
    from owl_jax.demo import siglip

    return siglip.Settings(**{f.name: v[f.name] for f in dataclasses.fields(siglip.Settings)})


def held_out_caption_keys(config) -> set:
    """The sample keys of the main job's held-out captions (scene + caption): never trained on."""
    from owl_jax.demo.scenes import split_keys

    return split_keys("captions_test", config.prepare.sizes.captions_test, config.prepare.seed)


def pretrain_vit(config, workdir: str, data_dir: str) -> dict:
    """Trains the tiny ViT (and its text tower) by the sigmoid contrastive loss, then probes its patch
    features and a random ViT's. Returns {"wall_s", "history", "twins", "probes", "probes_random"} and keeps the
    ViT's params in WORKDIR/vit. Training that stopped half-way starts again; finished, it is kept."""
    out = os.path.join(workdir, "vit")
    done = os.path.join(out, "vit.json")
    if os.path.exists(done):
        return jobs.read_json(done)
    with WorkdirLock(out):
        return _pretrain_vit(config, out, data_dir)


def _pretrain_vit(config, out: str, data_dir: str) -> dict:
    import jax
    import orbax.checkpoint as ocp

    from owl_jax.data.tokenizer import load_tokenizer
    from owl_jax.demo import siglip
    from owl_jax.models.config import owl_config_from_dict
    from owl_jax.models.vision import VisionEncoder
    from owl_jax.params_io import load_params, save_params

    v = config.towers.vit
    cfg = owl_config_from_dict(config.model.to_dict())
    tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer"))
    data = siglip.Scenes(tokenizer, cfg.vision.image_size, v.caption_len, v.seed, held_out_caption_keys(config))
    trained = os.path.join(out, "train.json")
    if not os.path.exists(trained):
        settings = siglip_settings(v)
        print(f"== vit: {settings.steps} steps of {settings.batch_size} scenes and captions (SigLIP)")
        t0 = time.time()
        params, history = siglip.train(cfg.vision, settings, data, len(tokenizer))
        save_params(os.path.join(out, "params"), {"vision_model": params["vision_model"]}, cfg)
        # the whole model too (text tower, pooling head, temperature): what the twins are scored with
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.abspath(os.path.join(out, "siglip")), params, force=True)
        checkpointer.wait_until_finished()
        twins = siglip.twin_accuracy(cfg.vision, settings, len(tokenizer), params, data)
        jobs.write_json(trained, {"wall_s": time.time() - t0, "history": history, "twins": twins})
    train_record = jobs.read_json(trained)
    vision, _ = load_params(os.path.join(out, "params"))
    scenes = siglip.probe_scenes(data, v.probe_train, v.probe_test)
    probes = siglip.probe_vit(cfg.vision, vision["vision_model"], scenes)
    random = VisionEncoder(cfg.vision).init(jax.random.PRNGKey(v.seed + 1), scenes["test"][0][:1])["params"]
    probes_random = siglip.probe_vit(cfg.vision, random, scenes)
    record = train_record | {"probes": probes, "probes_random": probes_random}
    jobs.write_json(os.path.join(out, "vit.json"), record)
    print("   vit twins told apart (held-out pairs): " + ", ".join(
        f"{kind} {100 * share:.0f}%" for kind, share in record["twins"].items()))
    print("   vit linear probes (held-out scenes): " + ", ".join(
        f"{k} {100 * probes[k]:.0f}% (random ViT {100 * probes_random[k]:.0f}%)" for k in probes))
    return record


# ------------------------------------------------------------------------------------ out


def assemble(workdir: str, data_dir: str, made: dict, config) -> str:
    """WORKDIR/pretrained: the owl params dir of the two towers (abstractor and queries absent: stage 1
    initialises them), its tokenizer and towers.json. Returns its path."""
    import shutil

    from owl_jax.params_io import load_params, save_params

    out = os.path.join(workdir, "pretrained")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    llm, cfg = load_params(os.path.join(workdir, "llm", "params"))
    vit, _ = load_params(os.path.join(workdir, "vit", "params"))
    save_params(tmp, {"vision_model": vit["vision_model"], "language_model": llm["language_model"]}, cfg)
    shutil.copytree(os.path.join(data_dir, "tokenizer"), os.path.join(tmp, "tokenizer"))
    record = {
        "command": "python -m owl_jax.demo.towers --workdir=DIR",
        "llm": {k: made["llm"][k] for k in ("wall_s", "eval_wall_s", "accuracy", "last_metrics", "answers", "drills")},
        "vit": {k: made["vit"][k] for k in ("wall_s", "probes", "probes_random", "twins", "history")},
        "settings": config.towers.to_dict(),
        # what the towers never trained on: the main job refuses other held-out splits
        "held_out": {"seed": config.prepare.seed} | held_out(config),
    }
    jobs.write_json(os.path.join(tmp, TOWERS_JSON), record)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"== towers: {out}")
    return out


# ------------------------------------------------------------------------------------ main


def make_towers(config, workdir: str, only: str | None = None) -> dict:
    """Makes the towers into `workdir` (resumable); returns {"llm", "vit", "out"} (what was made).
    `config` is the main job's (owl_jax/demo/config.py), --quick already merged if given."""
    from owl_jax.cli import absolute

    workdir = absolute(workdir)
    os.makedirs(workdir, exist_ok=True)
    # Each part holds its own lock (the LLM's: owl_jax.train's on WORKDIR/llm), so the two towers
    # may be made at once by two processes (--only=llm, --only=vit) once the data is there.
    with WorkdirLock(workdir):
        data_dir = prepare_text(config, workdir)
    made = {}
    if only in (None, "llm"):
        made["llm"] = pretrain_llm(config, workdir, data_dir)
    if only in (None, "vit"):
        made["vit"] = pretrain_vit(config, workdir, data_dir)
    if only is None:
        with WorkdirLock(workdir):
            made["out"] = assemble(workdir, data_dir, made, config)
    return made


def main(argv):
    del argv
    from owl_jax import train

    train.start_program()
    # inside run_cli: a bad config section is a one-line error, not a traceback
    sys.exit(train.run_cli(lambda: make_towers(jobs.resolve_config(FLAGS.config, FLAGS.quick), FLAGS.workdir,
                                               FLAGS.only)))


if __name__ == "__main__":
    from owl_jax.cli import parse_absl_flags

    _define_flags()
    app.run(main, flags_parser=parse_absl_flags)
