"""The names the transfer registries accept, without the registries (which import torch): the
config schema checks `optim.name` and `optim.schedule` against these before any model library
is imported. tests/test_startup.py checks that each registry holds exactly these names."""

OPTIMIZERS = ("adamw", "sgd")  # transfer.module.OPTIMIZERS
SCHEDULES = ("cosine", "constant")  # transfer.schedule.lr_factor
