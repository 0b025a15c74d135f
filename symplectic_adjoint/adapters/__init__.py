"""Framework adapters: the only modules that import torch or jax."""
