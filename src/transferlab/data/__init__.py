"""Data: sources decoded once into uint8 tensors, fixed val/test splits, nested train subsets."""

from transferlab.data.datamodule import TransferDataModule, build_datamodule, check_data, validate_data_config
from transferlab.data.sources import SOURCES
from transferlab.data.transforms import InputSpec

__all__ = ["SOURCES", "InputSpec", "TransferDataModule", "build_datamodule", "check_data", "validate_data_config"]
