"""A backbone turned into a transfer model: weights, stages, the LightningModule, its routes, and what it costs."""
