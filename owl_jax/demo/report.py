"""The main job's report: exact-match scoring, loss summaries, image-blind baselines and PNG plots.

Used by `owl_jax.demo.run`; `python -m owl_jax.demo.report --workdir=DIR [--control=DIR]` redraws the plots
of a finished run (with --control, the accuracy plot also shows the blank-image control's bars).
"""
from __future__ import annotations

import collections
import json
import os
import sys
from typing import Any, Iterable, Sequence

import numpy as np
from absl import flags

from owl_jax.cli import parse_flags

CATEGORY_ORDER = ("colour", "shape", "count", "position", "two_image", "reading", "multi_turn", "text_only")
# The demo's targets: held-out exact-match accuracy after stage 2.
TARGETS = {"colour": 0.9, "shape": 0.9, "count": 0.9, "position": 0.8, "two_image": 0.8, "reading": 0.6,
           "text_only": 0.9}


# The CPU features that decide how XLA's CPU backend computes the tiny owl's bf16 matmuls: the same
# code and seeds give other per-question answers on a CPU with other ones.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def host_description(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """{"cpu": model name, "cpu_features": those of CPU_FEATURES it has, "cores", "jax", "allocator"}:
    what a main job's figures reproduce on (the features empty where `cpuinfo` cannot be read)."""
    import platform

    import jax

    from owl_jax.allocator import loaded_name

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return {"cpu": model, "cpu_features": [f for f in CPU_FEATURES if f in flags], "cores": os.cpu_count(),
            "jax": jax.__version__, "allocator": loaded_name()}


# ---------------------------------------------------------------------------------- scoring


def normalize_answer(text: str) -> str:
    """Exact match up to surrounding whitespace (answers are one word or number; case counts)."""
    return text.strip()


def score(rows: Sequence[dict]) -> dict:
    """rows: {category, answer, prediction} -> {category: {correct, total, accuracy}} plus
    `image_questions` (every category but text_only) and `all`."""
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        ok = normalize_answer(r["prediction"]) == normalize_answer(r["answer"])
        for key in (r["category"], "all") + (("image_questions",) if r["category"] != "text_only" else ()):
            counts[key][0] += ok
            counts[key][1] += 1
    order = [c for c in CATEGORY_ORDER if c in counts] + sorted(
        set(counts) - set(CATEGORY_ORDER) - {"all", "image_questions"}
    )
    order += [k for k in ("image_questions", "all") if k in counts]
    return {k: {"correct": counts[k][0], "total": counts[k][1], "accuracy": counts[k][0] / counts[k][1]} for k in order}


def blind_baselines(train_rows: Iterable[dict], test_rows: Sequence[dict]) -> dict:
    """What a model that never sees the image can reach, per category, on the test questions.

    `prior`: the most frequent train answer to the same question text (else to the category), the
    best an image-blind model can do from the training data; `uniform`: 1 / number of distinct
    answers of the category in train. train_rows / test_rows: {category, question, answer}.
    """
    by_question: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    by_category: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in train_rows:
        by_question[(r["category"], r["question"])][r["answer"]] += 1
        by_category[r["category"]][r["answer"]] += 1
    rows = []
    for r in test_rows:
        counter = by_question.get((r["category"], r["question"])) or by_category.get(r["category"])
        rows.append({"category": r["category"], "answer": r["answer"],
                     "prediction": counter.most_common(1)[0][0] if counter else ""})
    prior = score(rows)
    out = {}
    for cat, s in prior.items():
        entry = {"prior": s["accuracy"]}
        if cat in by_category:
            entry["uniform"] = 1.0 / len(by_category[cat])
        out[cat] = entry
    return out


# ---------------------------------------------------------------------------------- losses


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl rows, one per step (a resumed run re-logs steps: the last row of a step wins)."""
    if not os.path.exists(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def loss_summary(rows: Sequence[dict]) -> dict:
    if not rows:
        return {}
    losses = np.array([r["loss"] for r in rows])
    k = max(1, len(losses) // 10)
    return {
        "logged_steps": len(rows),
        "first": float(losses[0]),
        "last": float(losses[-1]),
        "min": float(losses.min()),
        "mean_first_10pct": float(losses[:k].mean()),
        "mean_last_10pct": float(losses[-k:].mean()),
        "token_accuracy_last": float(rows[-1].get("accuracy", float("nan"))),
        "tokens_per_s_mean": float(np.mean([r.get("tokens_per_s", 0.0) for r in rows[1:] or rows])),
    }


# ---------------------------------------------------------------------------------- attention


def abstractor_attention(params: Any, cfg, pixel_values: np.ndarray, layer: int = 0) -> np.ndarray:
    """One abstractor layer's attention of every query over the image patches, heads averaged:
    float32[N, Q, g, g] (g = image_size / patch_size). Not renormalised: a map sums to the share of
    the query's attention that goes to the patches (the rest goes to the queries and CLS)."""
    import jax
    import jax.numpy as jnp

    from owl_jax.models.owl import MplugOwl

    _, inter = MplugOwl(cfg).apply({"params": params}, jnp.asarray(pixel_values, jnp.float32),
                                   method=MplugOwl.encode_images, mutable=["intermediates"])
    probs = [v for p, v in jax.tree_util.tree_leaves_with_path(inter) if "attention_probs" in jax.tree_util.keystr(p)]
    probs = np.asarray(probs[0])[layer]  # [layers, N, H, Q, Q + 1 + P] -> [N, H, Q, Q + 1 + P]
    q = cfg.abstractor.num_queries
    g = cfg.vision.image_size // cfg.vision.patch_size
    patches = probs.mean(axis=1)[:, :, q + 1:]  # [N, Q, P]
    return patches.reshape(patches.shape[0], patches.shape[1], g, g)


def most_focused_queries(maps: np.ndarray, k: int) -> np.ndarray:
    """maps [Q, g, g] -> the k queries whose attention peaks highest (most localised)."""
    peak = maps.reshape(maps.shape[0], -1).max(-1)
    return np.argsort(-peak)[:k]


# ---------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(stage_metrics: dict[str, list[dict]], titles: dict[str, str], path: str) -> None:
    plt = _plt()
    names = [n for n in stage_metrics if stage_metrics[n]]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.5 * max(1, len(names)), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = stage_metrics[name]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("answer-token loss", color="tab:blue")
        ax.set_title(titles.get(name, name), fontsize=10)
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("accuracy", np.nan) for r in rows], color="tab:orange", alpha=0.8)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("answer-token accuracy", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(per_stage: dict[str, dict], baselines: dict, path: str, control: dict | None = None,
                  title: str = "") -> None:
    """Grouped bars: exact-match accuracy per ability, one bar per stage (and the blank control),
    with the image-blind prior (black tick) and the issue's target (red tick)."""
    plt = _plt()
    cats = [c for c in CATEGORY_ORDER if any(c in s for s in per_stage.values())]
    series = [(name, s) for name, s in per_stage.items() if s]
    if control:
        series.append(("blank control", control))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(1.2 * len(cats) + 2, 4.2))
    x = np.arange(len(cats))
    for i, (name, s) in enumerate(series):
        vals = [s.get(c, {}).get("accuracy", 0.0) for c in cats]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=name)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{100 * v:.0f}", ha="center", fontsize=6)
    for j, c in enumerate(cats):
        if c in baselines:
            ax.hlines(baselines[c]["prior"], j - 0.45, j + 0.45, colors="black", linestyles=":", linewidth=1.2)
        if c in TARGETS:
            ax.hlines(TARGETS[c], j - 0.45, j + 0.45, colors="red", linewidth=1.2)
    ax.plot([], [], color="black", linestyle=":", label="image-blind prior")
    ax.plot([], [], color="red", label="target")
    ax.set_xticks(x)
    ax.set_xticklabels(cats, rotation=20)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("held-out exact-match accuracy")
    ax.set_title(title or "ShapesWorld: accuracy per ability", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention(images: Sequence[np.ndarray], maps: np.ndarray, captions: Sequence[str], k: int, path: str,
                   layer: int = 0) -> None:
    """Rows: test images; columns: the image, then the k most focused queries' attention (abstractor
    layer `layer`, heads averaged) drawn over the patch grid, each scaled to its own maximum."""
    from PIL import Image

    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(n, k + 1, figsize=(2.2 * (k + 1), 2.4 * n), squeeze=False)
    for i, (img, m, cap) in enumerate(zip(images, maps, captions)):
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(cap, fontsize=6, wrap=True)
        size = img.shape[0]
        for j, qi in enumerate(most_focused_queries(m, k)):
            ax = axes[i, j + 1]
            heat = np.asarray(
                Image.fromarray((m[qi] / m[qi].max() * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
            )
            ax.imshow(img)
            ax.imshow(heat, cmap="inferno", alpha=0.55)
            ax.set_title(f"query {qi}: {100 * m[qi].sum():.0f}% on patches", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"abstractor attention over the image patches (layer {layer}, heads averaged)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def redraw(workdir: str, control: str | None = None) -> None:
    """Redraws plots/accuracy.png of a finished run, optionally with a control run's stage-2 bars."""
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    ctrl = None
    if control:
        with open(os.path.join(control, "report.json")) as f:
            ctrl = json.load(f)["stages"]["stage2"]["accuracy"]
    told = {"pretrained LLM (scenes told as text)": report["towers"]["llm_accuracy_scenes_told"]}
    plot_accuracy(told | {n: s["accuracy"] for n, s in report["stages"].items()}, report["blind_baselines"],
                  os.path.join(workdir, "plots", "accuracy.png"), control=ctrl)


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "the finished run's workdir", flag_values=fv)
    flags.DEFINE_string("control", None, "a --blank_images run's workdir", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    args = parse_flags(argv, _flags(), __doc__, required=("workdir",))
    redraw(args.workdir, args.control)
    return 0


if __name__ == "__main__":
    sys.exit(main())
