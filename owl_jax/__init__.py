"""owl_jax: mPLUG-Owl in JAX/Flax."""
def load(path, **kwargs): from owl_jax.inference.api import load as _load; return _load(path, **kwargs)  # noqa: E704
