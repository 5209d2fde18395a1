"""Rerun a job from the config logged with it in MLflow, not from today's conf/ files.

The logged config is data, but a `_target_` in it would name code: anything outside the
packages transferlab builds from is refused, so a shared tracking server cannot become a
way to run arbitrary code on the machine that reproduces a run.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from transferlab import tags as tag_names
from transferlab.cache import verify
from transferlab.config import compose_config
from transferlab.errors import ConfigError
from transferlab.jobs.run import run
from transferlab.jobs.upstream import WEIGHTS, source_entry, uses_source
from transferlab.preflight import check_store
from transferlab.tracking.identity import HASH_NEUTRAL
from transferlab.tracking.run import tracking_uri

ALLOWED_TARGETS = ("transferlab.", "torch.", "timm.", "pytorch_lightning.", "lightning.", "torchmetrics.")
LOCAL_WRITES = ("cache_dir", "tracking.artifact_root", "tracking.fallback_dir")
COMPARED = ("test/acc", "test/f1", "test/loss", "compute/train_flops")


@dataclass
class Reproduction:
    run_id: str
    new_run_id: str
    original: dict[str, float]
    new: dict[str, float]

    @property
    def table(self) -> str:
        lines = [f"logged run: {self.run_id}", f"rerun:      {self.new_run_id}", ""]
        lines += ["| metric | logged | rerun | diff |", "|---|---|---|---|"]
        for key in COMPARED:
            old, new = self.original.get(key), self.new.get(key)
            diff = "" if old is None or new is None else f"{new - old:+.6g}"
            lines.append(f"| {key} | {old} | {new} | {diff} |")
        return "\n".join(lines)


def check_targets(node: object, path: str = "") -> None:
    """Refuse `_target_`s outside the allowed packages, anywhere in the config."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_" and not str(value).startswith(ALLOWED_TARGETS):
                raise ConfigError(
                    f"logged config sets {path}_target_={value!r}, outside {', '.join(ALLOWED_TARGETS)}: "
                    "refusing to run it"
                )
            check_targets(value, f"{path}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, f"{path}{i}.")


def logged_config(client: mlflow.MlflowClient, run_id: str) -> DictConfig:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
        except (MlflowException, OSError) as err:
            raise ConfigError(
                f"run {run_id} has no logged config.yaml ({type(err).__name__}): was it made by transferlab?"
            ) from err
        cfg = OmegaConf.load(Path(path))
    check_targets(OmegaConf.to_container(cfg, resolve=False))
    for field, neutral in HASH_NEUTRAL.items():  # added since that run: the value it computed with
        if OmegaConf.select(cfg, field, default=None) is None:
            OmegaConf.update(cfg, field, neutral, force_add=True)
    return cfg


def localize_paths(cfg: DictConfig) -> DictConfig:
    """A logged config may come from anyone with access to a shared store: where this machine
    writes (caches, artifacts, fallback logs) comes from its own defaults, never from the logged
    values, and a data download may only go inside the working directory."""
    defaults = compose_config([])
    for key in LOCAL_WRITES:
        OmegaConf.update(cfg, key, OmegaConf.select(defaults, key, default=None), merge=False)
    root = OmegaConf.select(cfg, "data.root")
    if OmegaConf.select(cfg, "data.download") and root is not None:
        here = Path.cwd().resolve()
        if not Path(root).resolve().is_relative_to(here):
            raise ConfigError(
                f"logged config downloads data into data.root={root!r}, outside {here}: refusing; "
                "put the data there yourself or reproduce from a folder that contains it"
            )
    return cfg


def source_weights(client: mlflow.MlflowClient, cfg: DictConfig, tags: dict[str, str]) -> str:
    """The source model a job started from: its run in this store, else the cached file with the
    same source-config hash (a job logged before its source was registered in this store)."""
    run_id, key = tags.get(tag_names.SOURCE_RUN_ID), tags.get(tag_names.SOURCE_CONFIG_HASH)
    if run_id:
        try:
            client.get_run(run_id)
            return f"runs:/{run_id}/model/{WEIGHTS}"
        except MlflowException:
            pass
    if key and verify(source_entry(cfg, key)) is None:
        return str(source_entry(cfg, key) / WEIGHTS)
    raise ConfigError(
        f"the source model of this run (run {run_id}, config hash {key}) is neither in {client.tracking_uri} "
        f"nor in the cache {cfg.cache_dir}: reproduce from the store that trained it (--tracking-uri)"
    )


def reproduce(run_id: str, uri: str | None = None) -> Reproduction:
    """Rerun `run_id` as a new run tagged `reproduced_from`, in the same store."""
    uri = uri or tracking_uri(OmegaConf.create({"uri": None}))
    check_store(uri)
    client = mlflow.MlflowClient(uri)
    try:
        original = client.get_run(run_id)
    except MlflowException as err:
        raise ConfigError(
            f"run {run_id!r} is not in the tracking store {uri}: check the id and MLFLOW_TRACKING_URI"
        ) from err
    cfg = localize_paths(logged_config(client, run_id))
    cfg.tracking.uri = uri
    cfg.tracking.resume = False  # a rerun, not a skip
    if uses_source(cfg):  # the exact source weights, not today's recipe
        cfg.backbone.weights = source_weights(client, cfg, original.data.tags)
    name = f"{original.info.run_name or run_id}-repro"
    new = run(cfg, extra_tags={"reproduced_from": run_id}, run_name=name)
    found = client.search_runs(
        [original.info.experiment_id],
        f"tags.reproduced_from = '{run_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return Reproduction(run_id, found[0].info.run_id if found else "?", dict(original.data.metrics), new)
