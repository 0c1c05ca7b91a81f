r"""Can the tiny owl's image path learn what a scene shows, with direct supervision?

    JAX_PLATFORMS=cpu python -m owl_jax.demo.vision_probe [--readout abstractor|vit] [--steps 200]
        [--abstractor_init 0.088] [--vision_init 0.02] [--position_init sincos2d|normal]

The vision encoder and abstractor of configs/tiny.py (fresh weights, 112 x 112 ShapesWorld images)
feed a linear read-out that names, for each of the 5 regions, the colour (8 or none) and the shape
(4 or none) there: cross-entropy, AdamW, warmup + cosine, batch 32 of freshly drawn scenes. Every 50
steps it prints the colour and shape accuracy over the occupied regions of 256 held-out scenes.

--params DIR starts the towers from a trained owl (e.g. the main job's WORKDIR/stage1/params) and
keeps them frozen: only the read-out trains, so it measures what the towers' output already tells.

--readout vit reads the ViT's 65 tokens directly (each patch's own weights: position comes free);
--readout abstractor reads the abstractor's 17 output tokens, each RMS-normalised first as the LLM's
pre-norm layers see them. The gap between the two is what the abstractor loses at initialisation.
"""
import dataclasses
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from owl_jax.cli import parse_flags
from owl_jax.data.image import preprocess
from owl_jax.demo import scenes as sw
from owl_jax.demo import tiny
from owl_jax.demo.draw import render_scene
from owl_jax.models.config import owl_config_from_dict
from owl_jax.models.owl import MplugOwl

COLOURS, SHAPES, REGIONS = list(sw.COLOURS), list(sw.SHAPES), list(sw.REGION_ORDER)


def scene_batch(rng: np.random.Generator, n: int, image_size: int):
    """pixels float[n, S, S, 3]; colour int[n, 5], shape int[n, 5] per region (len(...) = empty)."""
    pixels, colour, shape = [], [], []
    for _ in range(n):
        scene = sw.sample_scene(rng)
        pixels.append(preprocess(render_scene(scene), image_size))
        c, s = np.full(len(REGIONS), len(COLOURS)), np.full(len(REGIONS), len(SHAPES))
        for item in scene["shapes"]:
            i = REGIONS.index(item["region"])
            c[i], s[i] = COLOURS.index(item["colour"]), SHAPES.index(item["shape"])
        colour.append(c)
        shape.append(s)
    return np.stack(pixels), np.stack(colour), np.stack(shape)


class Probe(nn.Module):
    cfg: object
    readout: str

    @nn.compact
    def __call__(self, pixels):
        owl = MplugOwl(self.cfg)
        if self.readout == "abstractor":
            h = owl.encode_images(pixels, True)  # float[N, Q + 1, D_llm]
            h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)
        else:
            h = owl.vision_model(pixels, True)  # float[N, 1 + patches, D_vision]
        h = h.reshape(h.shape[0], -1)
        n = len(REGIONS)
        return (nn.Dense(n * (len(COLOURS) + 1))(h).reshape(-1, n, len(COLOURS) + 1),
                nn.Dense(n * (len(SHAPES) + 1))(h).reshape(-1, n, len(SHAPES) + 1))


def accuracy(logits, labels, empty):
    occupied = labels < empty
    return ((jnp.argmax(logits, -1) == labels) & occupied).sum() / occupied.sum()


def _flags() -> flags.FlagValues:
    """This program's flags, on a FlagValues of their own (fresh for each main() call)."""
    fv = flags.FlagValues()
    flags.DEFINE_enum("readout", "abstractor", ["abstractor", "vit"], "what the linear read-out reads",
                      flag_values=fv)
    flags.DEFINE_integer("steps", 200, "training steps", flag_values=fv)
    flags.DEFINE_integer("batch", 32, "scenes per step", flag_values=fv)
    flags.DEFINE_float("lr", 1e-3, "peak learning rate", flag_values=fv)
    flags.DEFINE_float("abstractor_init", 0.0, "abstractor initializer_range (0: the config's)", flag_values=fv)
    flags.DEFINE_float("vision_init", 0.0, "vision initializer_range (0: the config's)", flag_values=fv)
    flags.DEFINE_string("position_init", "", "normal | sincos2d (empty: the config's)", flag_values=fv)
    flags.DEFINE_string("params", "", "a trained owl's params dir: its towers, frozen", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """argv: the arguments after the program's name (None: sys.argv's)."""
    args = parse_flags(argv, _flags(), __doc__)

    trained = None
    if args.params:
        from owl_jax.params_io import load_params

        trained, cfg = load_params(args.params)
    else:
        cfg = owl_config_from_dict(tiny.get_config("stage1").model.to_dict())
    vision, abstractor = cfg.vision, cfg.abstractor
    if args.vision_init:
        vision = dataclasses.replace(vision, initializer_range=args.vision_init)
    if args.position_init:
        vision = dataclasses.replace(vision, position_embedding_init=args.position_init)
    if args.abstractor_init:
        abstractor = dataclasses.replace(abstractor, initializer_range=args.abstractor_init)
    cfg = dataclasses.replace(cfg, vision=vision, abstractor=abstractor)
    print(f"vision init {vision.initializer_range}, position {vision.position_embedding_init}; "
          f"abstractor init {abstractor.initializer_range}; read-out from the {args.readout}")

    size = cfg.vision.image_size
    model = Probe(cfg, args.readout)
    rng = np.random.default_rng(0)
    params = model.init(jax.random.PRNGKey(0), scene_batch(rng, 2, size)[0])["params"]
    if trained is not None:
        owl = dict(params["MplugOwl_0"])
        owl.update({k: trained[k] for k in ("vision_model", "query_tokens", "abstractor")})
        params = {**params, "MplugOwl_0": owl}
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, 30, args.steps, args.lr / 20), weight_decay=0.01)
    if trained is not None:  # the towers stay as trained: no updates, no weight decay, no optimiser state
        labels = {name: "frozen" if name == "MplugOwl_0" else "read-out" for name in params}
        opt = optax.multi_transform({"read-out": opt, "frozen": optax.set_to_zero()}, labels)
    opt_state = opt.init(params)

    def loss_fn(params, pixels, colour, shape):
        if trained is not None:  # no gradient work through the frozen towers
            params = {**params, "MplugOwl_0": jax.lax.stop_gradient(params["MplugOwl_0"])}
        colour_logits, shape_logits = model.apply({"params": params}, pixels)
        return (optax.softmax_cross_entropy_with_integer_labels(colour_logits, colour).mean()
                + optax.softmax_cross_entropy_with_integer_labels(shape_logits, shape).mean())

    @jax.jit
    def train_step(params, opt_state, pixels, colour, shape):
        loss, grads = jax.value_and_grad(loss_fn)(params, pixels, colour, shape)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    test = scene_batch(np.random.default_rng(123), 256, size)

    @jax.jit
    def test_accuracy(params):
        colour_logits, shape_logits = model.apply({"params": params}, test[0])
        return accuracy(colour_logits, test[1], len(COLOURS)), accuracy(shape_logits, test[2], len(SHAPES))

    t0 = time.time()
    for step in range(1, args.steps + 1):
        params, opt_state, loss = train_step(params, opt_state, *scene_batch(rng, args.batch, size))
        if step % 50 == 0:
            colour, shape = test_accuracy(params)
            print(f"step {step}: loss {float(loss):.3f}, held-out colour {100 * float(colour):.0f}%, "
                  f"shape {100 * float(shape):.0f}% ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
