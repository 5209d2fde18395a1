"""Successive halving over a sweep grid: the engine behind `hydra/sweeper=halving`.

A configuration is a grid point without its seed; its rung score is the mean over seeds of the
metric the jobs logged (`val/acc`). Per target (the `data*` keys) only the best 1/eta of the
configurations train on to the next rung's budget; the survivors train to `trainer.max_epochs`.
A promoted job is the same job with a larger `trainer.stop_after_epochs`, so it continues from
its checkpoint in its own MLflow run (jobs.fit, jobs.resume). Optuna keeps the books: one study
per target, one trial per configuration, `trial.report(score, step=budget)`, a pruner decides,
and an RDB storage lets a killed sweep resume at the rung it was in.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
from omegaconf import DictConfig

from transferlab import console, tags
from transferlab.config import parse_sweep
from transferlab.errors import ConfigError
from transferlab.jobs.ledger import SweepLedger
from transferlab.jobs.resume import JobCheckpoint
from transferlab.tracking.run import experiment_id

SCORES = ("best", "last")
PRUNERS = ("rung", "asha")
NO_TARGET = "all"  # the one study of a grid that sweeps no data* key


@dataclass(frozen=True)
class Settings:
    """The sweeper's fields (conf/hydra/sweeper/halving.yaml)."""

    eta: int = 3
    min_budget: int = 1
    metric: str = "val/acc"
    score: str = "best"  # best | last value of the metric the job logged up to the rung
    pruner: str = "rung"  # rung: every configuration of a rung compared | asha: Optuna's SuccessiveHalvingPruner
    storage: str | None = None  # None: sqlite:///<sweep dir>/halving.db
    # Sampling mode: {key: {low, high, log}} searched by TPE instead of a grid of those keys;
    # `n_trials` configurations per target and wave, each wave halved, later waves guided by earlier ones.
    search: dict[str, dict[str, Any]] | None = None
    n_trials: int = 9
    waves: int = 2
    seed: int = 0

    def validate(self) -> None:
        if int(self.eta) < 2:
            raise ConfigError(f"hydra.sweeper.eta={self.eta} is invalid: use an integer >= 2, e.g. 3")
        if int(self.min_budget) < 1:
            raise ConfigError(f"hydra.sweeper.min_budget={self.min_budget} is invalid: use an integer >= 1")
        if self.score not in SCORES:
            raise ConfigError(f"hydra.sweeper.score={self.score!r} is unknown: use {' or '.join(SCORES)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"hydra.sweeper.pruner={self.pruner!r} is unknown: use {' or '.join(PRUNERS)}")
        for key, space in (self.search or {}).items():
            if set(space) - {"low", "high", "log"} or not float(space["low"]) < float(space["high"]):
                raise ConfigError(
                    f"hydra.sweeper.search.{key}={dict(space)} is invalid: use {{low: a, high: b, log: false}}, a < b"
                )


@dataclass(frozen=True)
class Configuration:
    """One grid point without its seed; its jobs are the grid's seeds."""

    overrides: tuple[str, ...]  # key=value of every swept key but seed
    target: str  # the data* overrides: configurations compete within their target
    seeds: tuple[str, ...]

    @property
    def key(self) -> str:
        return " ".join(self.overrides) or "(no overrides)"

    def jobs(self, fixed: Sequence[str], budget: int | None) -> list[list[str]]:
        stop = "null" if budget is None else str(budget)
        seed = [[f"seed={s}"] for s in self.seeds] or [[]]
        return [[*fixed, *self.overrides, *s, f"trainer.stop_after_epochs={stop}"] for s in seed]


def rung_budgets(min_budget: int, eta: int, max_budget: int) -> list[int]:
    """min_budget * eta^k below max_budget, then max_budget: 1, 3, 9 for (1, 3, 9); 1, 3, 6 for (1, 3, 6)."""
    budgets, budget = [], int(min_budget)
    while budget < max_budget:
        budgets.append(budget)
        budget *= int(eta)
    return [*budgets, int(max_budget)]


def planned_launches(alive: Sequence[int], rungs: int, eta: int, per_config: int) -> int:
    """Jobs that `rungs` rungs launch when each target starts with `alive[i]` configurations and
    keeps max(1, n // eta) per rung (the rung pruner's rule; the sweep re-plans before each rung)."""
    total = 0
    for n in (a for a in alive if a > 0):
        for _ in range(rungs):
            total, n = total + n * per_config, max(1, n // int(eta))
    return total


def configurations(overrides: Sequence[str], grid: dict[str, Any] | None) -> tuple[list[str], list[Configuration]]:
    """(fixed overrides, configurations) of a multirun, read by the one sweep-grid parser."""
    fixed, sweeps = parse_sweep(list(overrides), grid)
    if "trainer.max_epochs" in sweeps and len(sweeps["trainer.max_epochs"]) > 1:
        raise ConfigError("trainer.max_epochs is the halving sweep's full budget: set one value, do not sweep it")
    seeds = tuple(sweeps.pop("seed", []))
    keys = list(sweeps)
    found = []
    for values in itertools.product(*(sweeps[k] for k in keys)):
        pairs = [f"{k}={v}" for k, v in zip(keys, values)]
        target = " ".join(p for p in pairs if p.split("=", 1)[0].lstrip("+~").startswith("data")) or NO_TARGET
        found.append(Configuration(tuple(pairs), target, seeds))
    return fixed, found


class RungPruner(optuna.pruners.BasePruner):
    """Synchronous successive halving: a trial survives its rung when its score is among the best
    max(1, n // eta) of the n trials that reported at the same step. Optuna's own
    SuccessiveHalvingPruner is asynchronous (ASHA): it compares a trial only with those asked
    before it, so when a whole rung reports at once the first trials asked are promoted whatever
    their score (tests/test_halving.py::test_asha_promotes_by_ask_order_when_a_rung_reports_at_once)."""

    def __init__(self, eta: int) -> None:
        self.eta = int(eta)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        return math.isnan(value) or value < rung_rank(study, trial, step, self.eta)[2]


def rung_rank(study: optuna.Study, trial: optuna.trial.FrozenTrial, step: int, eta: int) -> tuple[int, int, float]:
    """(rank of the trial, trials of its wave that reported at `step`, the lowest score kept) at one rung."""
    wave = trial.user_attrs.get("wave", 0)
    same = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("wave", 0) == wave]
    scores = [t.intermediate_values[step] for t in same if step in t.intermediate_values]
    ordered = sorted((-math.inf if math.isnan(s) else s for s in scores), reverse=True)
    value = trial.intermediate_values[step]
    value = -math.inf if math.isnan(value) else value
    return 1 + sum(s > value for s in ordered), len(ordered), ordered[max(1, len(ordered) // eta) - 1]


def make_pruner(settings: Settings) -> optuna.pruners.BasePruner:
    if settings.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=int(settings.min_budget), reduction_factor=int(settings.eta), min_early_stopping_rate=0
        )
    return RungPruner(settings.eta)


def rung_score(client: mlflow.MlflowClient, run_id: str, metric: str, score: str) -> float:
    """The best or last value of `metric` the run logged (NaN: it logged none)."""
    history = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
    if not history:
        return math.nan
    return history[-1].value if score == "last" else max(m.value for m in history)


@dataclass
class JobResult:
    seed: str
    config_hash: str
    cache_dir: str
    run_id: str | None
    score: float
    finished: bool = False  # the run FINISHED: its whole plan fit in the rung's budget (an L-BFGS probe)


Launch = Callable[[list[list[str]]], list[Any]]  # a batch of override lists -> Hydra JobReturns


class HalvingSweep:
    """The rung loop over one multirun, with its books in Optuna's storage."""

    def __init__(self, settings: Settings, config: DictConfig, launch: Launch, sweep_dir: Path) -> None:
        settings.validate()
        self.settings, self.config, self.launch = settings, config, launch
        if settings.storage is None:
            Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        self.storage = settings.storage or f"sqlite:///{Path(sweep_dir).resolve() / 'halving.db'}"
        self.client, self.exp_id = experiment_id(config.tracking)
        self.studies: dict[str, optuna.Study] = {}
        self.ledger = SweepLedger(sweep_dir)  # the job lines' counter: launches against the planned total
        self.launched = 0
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    def run(self, overrides: Sequence[str], grid: dict[str, Any] | None) -> dict[str, str]:
        """Every rung of the grid (or of each sampled wave); -> the winning configuration per target."""
        fixed, found = configurations(overrides, grid)
        budgets = rung_budgets(self.settings.min_budget, self.settings.eta, int(self.config.trainer.max_epochs))
        if not self.settings.search:
            self._halve(self._trials(found), fixed, budgets)
            return self._winners()
        if swept := _swept_beyond_targets(found):
            raise ConfigError(
                f"hydra.sweeper.search samples configurations: sweep only data* keys and seed, not {swept}"
            )
        targets = [int(self.settings.n_trials)] * len({c.target for c in found})
        wave_jobs = planned_launches(targets, len(budgets), self.settings.eta, len(found[0].jobs(fixed, None)))
        for wave in range(int(self.settings.waves)):
            print(f"wave {wave + 1}/{self.settings.waves}: {self.settings.n_trials} sampled configurations per target")
            later = wave_jobs * (int(self.settings.waves) - wave - 1)
            self._halve(self._sampled(found, wave), fixed, budgets, later)
        return self._winners()

    def _halve(
        self, trials: list[tuple[optuna.Study, optuna.Trial]], fixed: list[str], budgets: list[int], later: int = 0
    ) -> None:
        """Successive halving over these trials, rung by rung (a resumed sweep skips what is done);
        `later`: the jobs of the waves after this one, for the planned total."""
        by_key = {t.user_attrs["config"]: _configuration(t) for _, t in trials}
        per_config = max((len(c.jobs(fixed, None)) for c in by_key.values()), default=0)
        for number, budget in enumerate(budgets, start=1):
            last = number == len(budgets)
            alive = [(study, t) for study, t in trials if _state(study, t) == optuna.trial.TrialState.RUNNING]
            todo = [(s, t) for s, t in alive if budget not in _frozen(s, t).intermediate_values]
            jobs = sum(len(by_key[t.user_attrs["config"]].jobs(fixed, None)) for _, t in todo)
            print(
                f"rung {number}/{len(budgets)} (budget {budget} of {budgets[-1]} epochs): {len(alive)} configurations "
                f"alive, {jobs} jobs to run",
                flush=True,
            )
            self._plan(alive, jobs, per_config, len(budgets) - number, later, f"{number}/{len(budgets)}")
            self._run_rung([(s, t, by_key[t.user_attrs["config"]]) for s, t in todo], fixed, budget, last)
            for study, trial in alive:
                if last or _completed(study, trial):  # a job that fits its plan in the budget is done
                    self._finish(study, trial, budget)
                else:
                    self._decide(study, trial, number, budget)

    def _plan(self, alive: list, jobs: int, per_config: int, rungs_after: int, later: int, rung: str) -> None:
        """Before a rung (`rung`: "r/R"): the job lines' N is the launches so far, this rung's, and
        those its alive configurations make at later rungs; this rung's jobs are numbered on."""
        per_target = Counter(t.user_attrs["target"] for _, t in alive)
        eta = int(self.settings.eta)
        after = planned_launches([max(1, n // eta) for n in per_target.values()], rungs_after, eta, per_config)
        total = self.launched + jobs + after + later
        self.ledger.plan_rung(total, *map(int, rung.split("/")), first=self.launched)
        console.sweep_total(total)

    def _study(self, target: str) -> optuna.Study:
        """The target's study in the storage, created or found again (resume)."""
        if target not in self.studies:
            sampler = optuna.samplers.TPESampler(n_startup_trials=int(self.settings.n_trials), seed=self.settings.seed)
            self.studies[target] = optuna.create_study(
                study_name=f"{self.config.study}/{target}",
                storage=self.storage,
                direction="maximize",
                pruner=make_pruner(self.settings),
                sampler=sampler,
                load_if_exists=True,
            )
        return self.studies[target]

    def _trials(self, found: list[Configuration]) -> list[tuple[optuna.Study, optuna.Trial]]:
        """One trial per grid configuration, in its target's study."""
        out = []
        for config in found:
            study = self._study(config.target)
            known = {t.user_attrs.get("config"): t for t in study.get_trials(deepcopy=False)}
            if config.key in known:
                trial = optuna.trial.Trial(study, known[config.key]._trial_id)
            else:
                trial = study.ask()
                _describe(trial, config, wave=0)
            out.append((study, trial))
        return out

    def _sampled(self, found: list[Configuration], wave: int) -> list[tuple[optuna.Study, optuna.Trial]]:
        """`n_trials` configurations per target for this wave, sampled by TPE from every earlier
        trial of the target (pruned ones count by the rung they reached); kept across a resume."""
        out = []
        for base in {c.target: c for c in found}.values():
            study = self._study(base.target)
            mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("wave") == wave]
            out += [(study, optuna.trial.Trial(study, t._trial_id)) for t in mine]
            for _ in range(int(self.settings.n_trials) - len(mine)):
                trial = study.ask()
                picked = [
                    f"{key}={trial.suggest_float(key, float(s['low']), float(s['high']), log=bool(s.get('log'))):.4g}"
                    for key, s in self.settings.search.items()
                ]
                _describe(trial, Configuration((*base.overrides, *picked), base.target, base.seeds), wave)
                out.append((study, trial))
        return out

    def _run_rung(
        self, todo: list[tuple[optuna.Study, optuna.Trial, Configuration]], fixed: list[str], budget: int, last: bool
    ) -> None:
        """Launch every job of the rung at once (the launcher runs them in parallel), then report."""
        batches = [config.jobs(fixed, None if last else budget) for _, _, config in todo]
        results = self.launch([job for batch in batches for job in batch]) if batches else []
        self.launched += sum(map(len, batches))
        it = iter(results)
        for (_, trial, config), batch in zip(todo, batches):
            jobs = [self._result(seed, next(it)) for seed, _ in zip(config.seeds or ("",), batch)]
            trial.set_user_attr("jobs", json.dumps([vars(j) for j in jobs]))
            scores = [j.score for j in jobs]
            trial.report(math.nan if any(math.isnan(s) for s in scores) else sum(scores) / len(scores), budget)

    def _result(self, seed: str, ret: Any) -> JobResult:
        outcome = ret.return_value  # jobs.returns.JobOutcome: the JobReturn's configs are dropped
        key = outcome.config_hash
        query = f"tags.`{tags.CONFIG_HASH}` = '{key}'"
        found = self.client.search_runs([self.exp_id], query, max_results=1, order_by=["attributes.start_time DESC"])
        run_id = found[0].info.run_id if found else None
        status = found[0].info.status if found else None
        ok = status in ("FINISHED", "SCHEDULED")
        score = rung_score(self.client, run_id, self.settings.metric, self.settings.score) if ok else math.nan
        return JobResult(seed, key, outcome.cache_dir, run_id, score, finished=status == "FINISHED")

    def _decide(self, study: optuna.Study, trial: optuna.Trial, number: int, budget: int) -> None:
        """Prune or promote after a rung; a decision is recorded once, so a resumed sweep keeps it."""
        attr = f"rung{number}"
        decision = _frozen(study, trial).user_attrs.get(attr)
        if decision is None:
            frozen = _frozen(study, trial)
            value = frozen.intermediate_values[budget]
            rank, n, cutoff = rung_rank(study, frozen, budget, self.settings.eta)
            if not trial.should_prune():
                decision = "promoted"
            elif math.isnan(value):
                decision = f"rung {number} (budget {budget} epochs): a job failed or logged no {self.settings.metric}"
            else:
                decision = (
                    f"rung {number} (budget {budget} epochs): rank {rank} of {n}, score {100 * value:.1f} "
                    f"< cutoff {100 * cutoff:.1f} (kept: top {max(1, n // self.settings.eta)})"
                )
            trial.set_user_attr(attr, decision)
        if decision != "promoted":
            self._prune(study, trial, decision)

    def _prune(self, study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
        """The trial ends PRUNED; its runs end KILLED with the reason, curves kept; checkpoints go."""
        for job in json.loads(_frozen(study, trial).user_attrs.get("jobs", "[]")):
            if job["run_id"]:
                self.client.set_tag(job["run_id"], tags.PRUNED, reason)
                self.client.set_terminated(job["run_id"], "KILLED")
            JobCheckpoint(job["cache_dir"], job["config_hash"], enabled=True).discard()
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        print(f"pruned {_frozen(study, trial).user_attrs['config']}: {reason}", flush=True)

    def _finish(self, study: optuna.Study, trial: optuna.Trial, budget: int) -> None:
        """The trial ends COMPLETE with its score (FAIL if a job failed): at the last rung, or at an
        earlier one whose jobs all finished their plan (it costs nothing more and is never pruned)."""
        value = _frozen(study, trial).intermediate_values[budget]
        if math.isnan(value):  # a survivor's job failed at the full budget
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, value)

    def _winners(self) -> dict[str, str]:
        best: dict[str, tuple[float, str]] = {}
        for frozen in (t for study in self.studies.values() for t in study.get_trials(deepcopy=False)):
            if frozen.state == optuna.trial.TrialState.COMPLETE and frozen.value is not None:
                target = frozen.user_attrs["target"]
                if target not in best or frozen.value > best[target][0]:
                    best[target] = (frozen.value, frozen.user_attrs["config"])
        for target, (value, config) in best.items():
            print(f"halving winner for {target}: {config} ({self.settings.metric} {100 * value:.1f})", flush=True)
        return {target: config for target, (_, config) in best.items()}


def _swept_beyond_targets(found: list[Configuration]) -> list[str]:
    """Keys with more than one value in the grid that are not targets (data*)."""
    values: dict[str, set[str]] = {}
    for config in found:
        for pair in config.overrides:
            key, _, value = pair.partition("=")
            values.setdefault(key, set()).add(value)
    return sorted(k for k, v in values.items() if len(v) > 1 and not k.lstrip("+~").startswith("data"))


def _describe(trial: optuna.Trial, config: Configuration, wave: int) -> None:
    """What the trial is, in its user attrs: enough to rebuild its jobs after a resume."""
    trial.set_user_attr("config", config.key)
    trial.set_user_attr("target", config.target)
    trial.set_user_attr("overrides", list(config.overrides))
    trial.set_user_attr("seeds", list(config.seeds))
    trial.set_user_attr("wave", wave)


def _configuration(trial: optuna.Trial) -> Configuration:
    attrs = trial.user_attrs
    return Configuration(tuple(attrs["overrides"]), attrs["target"], tuple(attrs["seeds"]))


def _completed(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Every job of the trial finished its whole plan within the rung's budget."""
    jobs = json.loads(_frozen(study, trial).user_attrs.get("jobs", "[]"))
    return bool(jobs) and all(job.get("finished", False) for job in jobs)


def _frozen(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    return study._storage.get_trial(trial._trial_id)


def _state(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.TrialState:
    return _frozen(study, trial).state
