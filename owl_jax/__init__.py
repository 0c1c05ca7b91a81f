"""owl_jax: mPLUG-Owl in JAX/Flax."""


def load(path, **kwargs):
    """`owl_jax.inference.api.load`, imported when first called so that `import owl_jax` stays light."""
    from owl_jax.inference.api import load as _load

    return _load(path, **kwargs)
