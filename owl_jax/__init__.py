"""owl_jax: mPLUG-Owl in JAX/Flax."""
