"""jmtl: multi-task transformer training in JAX/Flax."""

__version__ = "0.1.0"
