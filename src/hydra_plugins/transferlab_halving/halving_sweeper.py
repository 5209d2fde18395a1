"""`hydra/sweeper=halving`: the sweep grid run by successive halving (transferlab.studies.halving).

Hydra imports every module under `hydra_plugins` at start-up, in every process: this one imports
only Hydra; the engine (Optuna, MLflow, torch) loads when a sweep starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class HalvingSweeper(Sweeper):
    """Runs the grid (`hydra.sweeper.params` and command-line sweeps) rung by rung; each rung's
    jobs go to the configured launcher in one batch, so parallel launchers run them at once."""

    def __init__(self, params: dict[str, str] | None = None, **settings: Any) -> None:
        self.params = dict(params or {})
        # eta, min_budget, metric, score, pruner, storage; search, n_trials, waves, seed (sampling mode)
        self.settings = {k: OmegaConf.to_container(v) if isinstance(v, DictConfig) else v for k, v in settings.items()}
        self.config: DictConfig | None = None
        self.launcher = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> dict[str, str]:
        try:
            from transferlab.studies.halving import HalvingSweep, Settings
        except ModuleNotFoundError as err:
            if err.name != "optuna":
                raise
            from transferlab.errors import ConfigError

            raise ConfigError("hydra/sweeper=halving needs Optuna: pip install 'transferlab[halving]'") from None

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        engine = HalvingSweep(Settings(**self.settings), self.config, self._launch, sweep_dir)
        return engine.run(arguments, self.params)

    def _launch(self, batch: list[list[str]]) -> list[Any]:
        results = self.launcher.launch(batch, initial_job_idx=self.job_idx)
        self.job_idx += len(batch)
        return list(results)
