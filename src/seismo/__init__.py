"""seismo: training-dynamics studies of transformer language models in JAX."""

__version__ = "0.1.0"
