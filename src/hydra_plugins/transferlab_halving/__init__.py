"""transferlab's budget-aware Hydra sweeper (`hydra/sweeper=halving`)."""
