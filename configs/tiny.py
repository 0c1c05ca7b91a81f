"""The tiny owl of the ShapesWorld demo (owl_jax/demo/tiny.py), as a recipe for any program:
`--config=configs/tiny.py:stage1` (stage1 | stage2_lora | full_ft)."""
from owl_jax.demo.tiny import get_config  # noqa: F401
