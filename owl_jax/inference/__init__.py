"""Inference: the decoding engine (`engine`), the Python API (`api`: `load`, `Owl`) and the OwlEval
runner (`owleval`). The command lines on top are `python -m owl_jax.generate` and
`python -m owl_jax.evaluate`."""
from owl_jax.inference.api import Owl, load
from owl_jax.inference.engine import Generator
from owl_jax.inference.sampling import Sampling

__all__ = ["Generator", "Owl", "Sampling", "load"]
