"""Every MLflow tag name transferlab writes, and the labels runs are grouped by, in one registry.

Tags are how runs are found again (resume, lineage, the report, `reproduce`), so their names are
part of the stored format: change one here and every reader and writer follows. It sits at the
bottom of the package so that any layer may name a tag without importing the tracking layer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

PREFIX = "transferlab."


def tag(name: str) -> str:
    """The full tag name of `name` (`role` -> `transferlab.role`)."""
    return PREFIX + name


# Identity: which job a run is, and which runs it depends on.
ROLE = tag("role")  # job | sweep | pretrain | teacher | advise
CONFIG_HASH = tag("config_hash")  # everything the job computes (identity.config_hash)
CONDITION_HASH = tag("condition_hash")  # the same without the seed: runs of one condition
SEED = tag("seed")
SUBSET_HASH = tag("subset_hash")
SKIPPED_FILES = tag("skipped_files")
SOURCE_RUN_ID = tag("source_run_id")
SOURCE_CONFIG_HASH = tag("source_config_hash")
REGISTERED_FROM = tag("registered_from")
BACKBONE = tag("backbone.")  # + the backbone builder's own tags (timm tag, weights, provenance)
TEACHER_WEIGHTS = tag("teacher.weights")
TEACHER_NAME = tag("teacher.name")
TEACHER_RUN_ID = tag("teacher.run_id")
LORA_LAYERS = tag("lora.layers")
TRUNCATED_AT = tag("truncated_at")  # the stage a truncated job keeps last (truncate_after resolved)
CACHE_FEATURES = tag("cache_features")
FEATURE_CACHE = tag("feature_cache")
# How a run ended.
FAILURE = tag("failure")  # one-line reason of a FAILED or KILLED run
PRUNED = tag("pruned")  # rung and reason of a run a halving sweep stopped early
SWEEP_SUMMARY = tag("sweep_summary")
# Metrics of a sweep's parent run, so its row and page show results: job counts (`sweep/finished`,
# `failed`, `skipped`, `paused`, `pruned`) and the best mean accuracy per target (summary_metric).
SWEEP_COUNT = "sweep/"
BEST = "best/"
ADVISE = tag("advise.")  # + target, size, domain, strategies, stages, ...
# Environment (identity.environment_tags): which software produced the numbers.
VERSION_NAMES = ("python", "torch", "lightning", "timm", "mlflow", "device")

ROLE_JOB, ROLE_SWEEP, ROLE_PRETRAIN, ROLE_TEACHER, ROLE_ADVISE = "job", "sweep", "pretrain", "teacher", "advise"


def role_query(role: str) -> str:
    """MLflow search filter for runs of one role."""
    return f"tags.`{ROLE}` = '{role}'"


def target_name(params: dict[str, Any]) -> str:
    """A data set's display name: an image folder is named after its folder, not `imagefolder`."""
    name, root = str(params.get("params.data.name")), params.get("params.data.root")
    if name == "imagefolder" and isinstance(root, str) and root not in ("", "None", "???"):
        return Path(root.rstrip("/")).name or name
    return name


def target_label(name: str, train_size: float | None) -> str:
    """How the report and advise name a target: `digits / 50 train`."""
    known = train_size is not None and train_size == train_size  # not None, not NaN
    return f"{name} / {int(train_size)} train" if known else f"{name} / ? train"


def candidate_label(name: str, weights: str) -> str:
    """How a backbone is named in advise metrics and matched to sweep runs (params backbone.*);
    characters MLflow refuses in metric names (a weights path may hold any) become `_`."""
    return re.sub(r"[^\w\-. :/]", "_", f"{name}:{weights}")


def summary_metric(name: str, train_size: float | None, what: str) -> str:
    """A parent-run metric for one target, `best/digits-50/test_acc_pct`: the data set's name
    keeps only characters MLflow allows in a metric name and that cannot form a path step."""
    known = train_size is not None and train_size == train_size
    safe = re.sub(r"[^A-Za-z0-9_\-. ]", "_", name).strip(". ") or "_"
    return f"{BEST}{safe}-{int(train_size) if known else 'unknown'}/{what}"
