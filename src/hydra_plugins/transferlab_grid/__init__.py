"""transferlab's grid sweeper (`hydra/sweeper=grid`, the default)."""
