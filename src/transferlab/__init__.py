"""transferlab: transfer-learning experiments over timm backbones, tracked in MLflow."""

__version__ = "0.1.0"
