"""`transferlab --help` and config errors that need no model answer without importing torch,
Lightning, timm or MLflow (benchmarks/bench_startup.py times them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from transferlab.transfer import names

HEAVY = ("torch", "pytorch_lightning", "lightning", "timm", "mlflow", "torchvision")
PROBE = """
import json, sys
from transferlab.cli import main
code = main({argv!r})
print(json.dumps({{"code": code, "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "finetune.freeze_dept=2"],  # typo: did you mean
        ["train", "backbone=nope"],  # unknown group option
        ["train", "optim.lr=abc"],  # bad value (schema.FIELDS)
        ["train", "optim.name=adamx"],  # a registry name, checked against transfer.names
        ["train", "-m", "optim.lr=0.1,-1"],  # a bad swept value
    ],
    ids=["help", "typo", "unknown group", "bad value", "unknown optimizer", "bad swept value"],
)
def test_config_errors_answer_without_importing_torch(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True, text=True, timeout=120
    )
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["code"] == (0 if argv == ["--help"] else 2), result.stderr
    assert outcome["heavy"] == [], result.stderr
    if argv != ["--help"]:
        assert result.stderr.startswith("transferlab train: error:"), result.stderr


def test_registries_hold_exactly_the_names_the_schema_checks() -> None:
    from transferlab.transfer.module import OPTIMIZERS
    from transferlab.transfer.schedule import lr_factor

    assert set(OPTIMIZERS) == set(names.OPTIMIZERS)
    for schedule in names.SCHEDULES:
        assert 0.0 <= lr_factor(5, 10, 0, schedule) <= 1.0  # each name is one lr_factor knows
