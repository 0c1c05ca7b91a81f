r"""The main job: a tiny owl learns ShapesWorld on CPU, end to end, in one command.

  python -m owl_jax.demo.run --workdir=/tmp/owl                  # the tiny owl, from the pretrained towers
  python -m owl_jax.demo.run --workdir=/tmp/owl_blank --blank_images   # the control: every image blank
  python -m owl_jax.demo.run --workdir=/tmp/owl --from_scratch   # pretrain the towers first (hours)
  python -m owl_jax.demo.run --workdir=/tmp/owl_ci --quick       # CI-sized smoke run, towers included
  [--config=owl_jax/demo/config.py] [--config.stages.stage1.num_steps=600 ...]

Sections below, top to bottom:
  towers   the pretrained tiny LLaMA and ViT and their tokenizer (as the paper starts from LLaMA
           and CLIP): owl_jax/demo/pretrained, made by `python -m owl_jax.demo.towers`; with
           --from_scratch or --quick they are made first, into WORKDIR/towers
  data     ShapesWorld is generated into WORKDIR/data (kept if already there), tokenised by the
           towers' tokenizer
  stage 1  vision encoder + abstractor on captions, LLM frozen, from the towers
  stage 2  LoRA (q, v) + abstractor on the instruction mix (text-only samples included)
           each stage trains into WORKDIR/stage{1,2} (owl_jax.train: checkpoints/, metrics.jsonl,
           tensorboard/, params/) and is then evaluated: exact match per ability category on the
           held-out split, batched greedy decoding (stage{k}/eval.json)
  samples  a few test questions and the stage-2 owl's answers, printed
  export   WORKDIR/export: the released PyTorch layout (LoRA merged) + the tokenizer
  report   WORKDIR/report.json and WORKDIR/plots/{loss,accuracy,attention}.png

Resumable: rerunning the same command skips what is finished (stage{k}/stage.json, eval.json)
and resumes an interrupted stage from its last checkpoint. Every setting is in the config file
(owl_jax/demo/config.py); --quick merges its `quick` section, --blank_images sets blank_images.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

from absl import app, flags

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
STAGES = ("stage1", "stage2")
STAGE_TITLES = {
    "stage1": "stage 1: vision + abstractor on captions",
    "stage2": "stage 2: LoRA + abstractor on instructions",
}

FLAGS = flags.FLAGS
from owl_jax import train as _train  # noqa: E402
from owl_jax.demo.jobs import (  # noqa: E402
    DEFAULT_CONFIG,
    evaluate,
    read_json,
    resolve_config,
    train_config,
    write_json,
)


def _define_flags() -> None:
    """Only when run as a program. owl_jax.train's flags --config (a config file, `--config.x=y`
    overrides) and --workdir are shared: here --config is the job's file (default
    owl_jax/demo/config.py) and --workdir receives everything (data, stages, export, report)."""
    _train._define_flags()
    flags.adopt_module_key_flags(_train)  # --help lists --workdir and --config with this program's flags
    FLAGS.set_default("config", DEFAULT_CONFIG)
    flags.DEFINE_bool("quick", False, "CI-sized smoke run: merge the config's `quick` section.")
    flags.DEFINE_bool("blank_images", False, "The control run: every image (training and evaluation) blank.")
    flags.DEFINE_bool("from_scratch", False, "Pretrain the towers first (owl_jax.demo.towers, into WORKDIR/towers) "
                      "instead of starting from the committed ones.")


# ------------------------------------------------------------------------------------ config


def stage_config(config, name: str, data_dir: str, init_dir: str):
    """owl_jax.train's config for stage `name`: base_config(model), then the stage's overrides."""
    return train_config(config.model, config.stages[name], f"stages.{name}", data_dir, init_dir,
                        bool(config.blank_images))


# ------------------------------------------------------------------------------------ stages


def run_stage(config, name: str, workdir: str, data_dir: str, init_dir: str) -> dict:
    """Trains (or resumes) one stage; returns its stage.json record. Skips a finished stage."""
    stage_dir = os.path.join(workdir, name)
    done = os.path.join(stage_dir, "stage.json")
    if os.path.exists(done):
        print(f"== {STAGE_TITLES[name]}: finished earlier ({done})")
        return read_json(done)
    tc = stage_config(config, name, data_dir, init_dir)
    resumed = os.path.isdir(os.path.join(stage_dir, "checkpoints"))
    print(f"== {STAGE_TITLES[name]}: {tc.num_steps} steps of {tc.batch_size} x {tc.seq_len} tokens on "
          f"{tc.data.split}{' (resuming)' if resumed else ''}")
    t0 = time.time()
    last = _train.train(tc, stage_dir)
    wall = time.time() - t0
    if not os.path.exists(os.path.join(stage_dir, "params", "owl_config.json")):
        raise SystemExit(f"{name} stopped before its last step (preempted?): rerun the same command to resume")
    record = {"name": name, "title": STAGE_TITLES[name], "train_stage": tc.stage, "num_steps": tc.num_steps,
              "batch_size": tc.batch_size, "seq_len": tc.seq_len, "split": tc.data.split,
              "wall_s": wall, "resumed": resumed, "last_metrics": last, "config": tc.to_dict()}
    write_json(done, record)
    return record


# ------------------------------------------------------------------------------------ evaluation


def evaluate_stage(config, name: str, workdir: str, data_dir: str) -> dict:
    path = os.path.join(workdir, name, "eval.json")
    if os.path.exists(path):
        return read_json(path)
    result = evaluate(os.path.join(workdir, name, "params"), data_dir, config.eval, bool(config.blank_images), name)
    write_json(path, result)
    acc = result["accuracy"]
    print(f"   {name} exact match: " + ", ".join(f"{c} {100 * a['accuracy']:.0f}%" for c, a in acc.items())
          + f"  ({result['wall_s']:.0f} s)")
    return result


def print_samples(result: dict, n: int) -> list[dict]:
    """One question per category first, then more, up to n; printed with the expected answer."""
    seen, picked = set(), []
    for r in result["answers"]:
        if r["category"] not in seen:
            seen.add(r["category"])
            picked.append(r)
    picked += [r for r in result["answers"] if r not in picked]
    picked = picked[:n]
    print("== sample questions (stage 2 owl, held-out)")
    for r in picked:
        mark = "ok " if r["correct"] else "XX "
        print(f"   {mark}[{r['category']}] {r['question']}  ->  {r['prediction']!r}  (expected {r['answer']!r})")
    return picked


# ------------------------------------------------------------------------------------ export, report


def export(workdir: str, data_dir: str) -> dict:
    """WORKDIR/export: stage 2's params in the released PyTorch layout (LoRA merged) + tokenizer."""
    from owl_jax.convert import to_torch
    from owl_jax.params_io import load_params

    out = os.path.join(workdir, "export")
    t0 = time.time()
    if not os.path.exists(os.path.join(out, "config.json")):
        params, cfg = load_params(os.path.join(workdir, "stage2", "params"))
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        to_torch(params, cfg, tmp)
        for f in os.listdir(os.path.join(data_dir, "tokenizer")):
            shutil.copy(os.path.join(data_dir, "tokenizer", f), tmp)
        os.replace(tmp, out)
    print(f"== export: {out} (released PyTorch layout, LoRA merged; load with "
          f"owl_jax.convert.from_torch(cfg, released=...))")
    return {"dir": out, "files": sorted(os.listdir(out)), "wall_s": time.time() - t0}


def test_answers_for_baselines(data_dir: str, split: str):
    """(train rows, test rows) of {category, question, answer} for the image-blind baselines."""
    from owl_jax.data import records

    def rows(s):
        src = records.data_source(data_dir, "shapesworld", s)
        for i in range(len(src)):
            r = src[i]
            yield {k: records.as_str(r[k]) for k in ("category", "question", "answer")}

    return rows(split.replace("_test", "_train")), list(rows(split))


def write_report(config, workdir: str, data_dir: str, towers: dict, timings: dict, stages: dict, evals: dict,
                 samples: list, exported: dict) -> dict:
    from owl_jax.demo import report as rp
    from owl_jax.params_io import load_params

    t0 = time.time()
    plots = os.path.join(workdir, "plots")
    os.makedirs(plots, exist_ok=True)
    metrics = {n: rp.read_metrics(os.path.join(workdir, n, "metrics.jsonl")) for n in STAGES}
    train_rows, test_rows = test_answers_for_baselines(data_dir, config.eval.split)
    baselines = rp.blind_baselines(train_rows, test_rows)
    rp.plot_losses(metrics, STAGE_TITLES, os.path.join(plots, "loss.png"))
    rp.plot_accuracy(
        {"pretrained LLM (scenes told as text)": towers["llm"]["accuracy"]} | {n: evals[n]["accuracy"] for n in STAGES},
        baselines,
        os.path.join(plots, "accuracy.png"),
        title="ShapesWorld held-out exact match" + (" (blank-image control)" if config.blank_images else ""),
    )

    # attention of the stage-2 abstractor on a few single-image test questions
    from owl_jax.demo.dataset import iter_test_questions
    from owl_jax.demo.draw import render_scene
    from owl_jax.demo.scenes import describe

    params, cfg = load_params(os.path.join(workdir, "stage2", "params"))
    picked = []
    for q in iter_test_questions(data_dir, config.eval.split, image_size=cfg.vision.image_size,
                                 blank_images=bool(config.blank_images)):
        if q["num_images"] == 1 and len(q["scene"][0]["shapes"]) >= 2:
            picked.append(q)
        if len(picked) >= config.eval.attention_images:
            break
    attention_on_patches = {}
    if picked:
        import numpy as np

        layer = config.eval.attention_layer
        maps = rp.abstractor_attention(params, cfg, np.concatenate([q["pixel_values"] for q in picked]), layer)
        images = [np.asarray(render_scene(q["scene"][0])) for q in picked]
        rp.plot_attention(images, maps, [describe(q["scene"][0]) for q in picked], config.eval.attention_queries,
                          os.path.join(plots, "attention.png"), layer)
        pixels = np.concatenate([q["pixel_values"] for q in picked])
        attention_on_patches = {
            f"layer {i}": float(rp.abstractor_attention(params, cfg, pixels, i).sum((-1, -2)).mean())
            for i in range(cfg.abstractor.num_layers)
        }
    timings["report_s"] = time.time() - t0
    report = {
        "job": "owl_jax.demo.run (ShapesWorld)",
        "blank_images": bool(config.blank_images),
        "stages": {n: {"title": STAGE_TITLES[n], "wall_s": stages[n]["wall_s"], "resumed": stages[n]["resumed"],
                       "num_steps": stages[n]["num_steps"], "batch_size": stages[n]["batch_size"],
                       "seq_len": stages[n]["seq_len"], "split": stages[n]["split"],
                       "loss": rp.loss_summary(metrics[n]), "accuracy": evals[n]["accuracy"],
                       "eval_wall_s": evals[n]["wall_s"]} for n in STAGES},
        # what the job started from: the LLM asked with the scenes told as text, the ViT's probes
        "towers": {"dir": towers["dir"], "llm_accuracy_scenes_told": towers["llm"]["accuracy"],
                   "vit_probes": towers["vit"]["probes"], "random_vit_probes": towers["vit"]["probes_random"]},
        "blind_baselines": baselines,
        # stage 2 abstractor: mean share of a query's attention on the image patches (vs queries, CLS)
        "abstractor_attention_on_patches": attention_on_patches,
        "targets": rp.TARGETS,
        "samples": samples,
        "export": exported,
        "timings_s": timings,
        "host": rp.host_description(),
        "plots": sorted(os.listdir(plots)),
        "config": config.to_dict(),
    }
    write_json(os.path.join(workdir, "report.json"), report)
    return report


# ------------------------------------------------------------------------------------ main job


def run(config, workdir: str) -> dict:
    """The whole job (resumable; `workdir` may be relative to the current directory); returns the
    report. One job at a time per workdir (a lock)."""

    from owl_jax.cli import absolute
    from owl_jax.training.checkpoints import WorkdirLock

    workdir = absolute(workdir)
    os.makedirs(workdir, exist_ok=True)
    with WorkdirLock(workdir):
        return _run(config, workdir)


def check_held_out(towers: dict, config, record: str) -> None:
    """The towers must have left out the held-out splits this config evaluates on (seed and sizes)."""
    from owl_jax.cli import UserError
    from owl_jax.demo import towers as tw

    expected = {"seed": config.prepare.seed} | tw.held_out(config)
    if towers.get("held_out", expected) != expected:
        raise UserError(f"{record}: the towers left out the held-out splits {towers['held_out']}, this config "
                        f"evaluates on {expected}: some held-out questions could be in the towers' training")


def check_same_tokenizer(data_dir: str, towers_dir: str) -> None:
    """The data kept in a workdir must be tokenised as the towers' LLM was trained: a workdir made with
    other towers (or --from_scratch) would train on token ids the LLM never saw, with no error."""
    from owl_jax.cli import UserError

    kept, towers = (os.path.join(d, "tokenizer", "tokenizer.model") for d in (data_dir, towers_dir))
    with open(kept, "rb") as a, open(towers, "rb") as b:
        if a.read() != b.read():
            raise UserError(f"{kept} is not the towers' tokenizer ({towers}): this workdir's data was made "
                            "for other towers; use a new --workdir")


def _run(config, workdir: str) -> dict:
    from owl_jax.demo import towers as tw
    from owl_jax.demo.dataset import prepare

    t_start = time.time()
    timings: dict = {}

    # ------------------------------------------------------------------------------- towers
    towers_dir = PRETRAINED
    if config.from_scratch:
        t0 = time.time()
        towers_dir = tw.make_towers(config, os.path.join(workdir, "towers"))["out"]
        timings["towers_s"] = time.time() - t0
    record = os.path.join(towers_dir, tw.TOWERS_JSON)
    if not os.path.exists(record):
        from owl_jax.cli import UserError

        raise UserError(f"no pretrained towers at {towers_dir} ({tw.TOWERS_JSON} missing): make them with "
                        "`python -m owl_jax.demo.towers --workdir=DIR`, or run with --from_scratch")
    towers = read_json(record) | {"dir": towers_dir}
    check_held_out(towers, config, record)
    print(f"== towers: {towers_dir}")

    # ------------------------------------------------------------------------------- data
    data_dir = os.path.join(workdir, "data")
    t0 = time.time()
    if not os.path.exists(os.path.join(data_dir, "tokenizer", "tokenizer.model")):
        print(f"== data: generating ShapesWorld into {data_dir}")
        prepare(data_dir, seed=config.prepare.seed, sizes=config.prepare.sizes.to_dict(),
                tokenizer=os.path.join(towers_dir, "tokenizer"))
    check_same_tokenizer(data_dir, towers_dir)
    timings["data_s"] = time.time() - t0

    # ------------------------------------------------------------------------------- stages 1, 2
    stages, evals = {}, {}
    init_dir = towers_dir
    for name in STAGES:
        stages[name] = run_stage(config, name, workdir, data_dir, init_dir)
        evals[name] = evaluate_stage(config, name, workdir, data_dir)
        init_dir = os.path.join(workdir, name, "params")
    timings["train_s"] = sum(s["wall_s"] for s in stages.values())
    timings["eval_s"] = sum(e["wall_s"] for e in evals.values())

    # ------------------------------------------------------------------------------- samples, export
    samples = print_samples(evals["stage2"], config.eval.num_samples)
    exported = export(workdir, data_dir)

    # ------------------------------------------------------------------------------- report
    previous = os.path.join(workdir, "report.json")
    invocations = read_json(previous).get("invocations", []) if os.path.exists(previous) else []
    report = write_report(config, workdir, data_dir, towers, timings, stages, evals, samples, exported)
    timings["this_invocation_s"] = time.time() - t_start
    report["timings_s"] = timings
    # every invocation that reached the report (a rerun skips finished work: its time is small)
    report["invocations"] = invocations + [{"wall_s": timings["this_invocation_s"], "data_s": timings["data_s"]}]
    write_json(os.path.join(workdir, "report.json"), report)
    acc = report["stages"]["stage2"]["accuracy"]
    print(f"== report: {os.path.join(workdir, 'report.json')}, plots in {os.path.join(workdir, 'plots')}")
    print("   stage 2 exact match: " + ", ".join(f"{c} {100 * a['accuracy']:.0f}% ({a['correct']}/{a['total']})"
                                              for c, a in acc.items()))
    host = report["host"]
    print(f"   wall time of this invocation: {timings['this_invocation_s']:.0f} s on {host['cores']} cores of "
          f"{host['cpu']} (features: {', '.join(host['cpu_features']) or 'none known'})")
    return report


def main(argv):
    del argv
    _train.start_program()
    # inside run_cli: a bad config section is a one-line error, not a traceback
    sys.exit(_train.run_cli(lambda: run(resolve_config(FLAGS.config, FLAGS.quick, FLAGS.blank_images,
                                                       FLAGS.from_scratch), FLAGS.workdir)))


if __name__ == "__main__":
    from owl_jax.cli import parse_absl_flags

    _define_flags()
    app.run(main, flags_parser=parse_absl_flags)
