"""`transferlab advise`: which of the four classic cases a target is in, in seconds, before a sweep.

For each target (the data overrides, swept ones expanded) and each candidate (swept backbone
overrides; default the configured backbone), frozen pooled features at the end of every stage are
extracted once and scored with cheap transferability measures (`transferability.py`). From the
scores it states, with numbers: small or large (train images per class against a threshold),
similar or different source (how much the last stage's probe loses against the best stage), the
best stage to cut at, and the classic recommendation, then prints a verifying sweep command.
Each target's advice is one MLflow run (role `advise`); the report checks it against the sweep.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from transferlab import console, tags
from transferlab.config import compose_config, validate
from transferlab.data import build_datamodule
from transferlab.errors import ConfigError
from transferlab.jobs.run import run
from transferlab.jobs.upstream import resolve_checkpoint
from transferlab.studies.transferability import knn_accuracy, logme, ridge_probe_accuracy
from transferlab.tags import candidate_label
from transferlab.tracking.identity import flatten
from transferlab.tracking.run import RunTracker
from transferlab.transfer.backbone import build_model, create_backbone, input_spec
from transferlab.transfer.features import extract_stage_features
from transferlab.transfer.stages import format_table, map_stages

# Classic four cases -> finetune options that implement them (the report checks these).
STRATEGIES = {
    ("small", "similar"): ("probe",),
    ("small", "different"): ("probe_early",),
    ("large", "similar"): ("fine_tune",),
    ("large", "different"): ("fine_tune", "scratch"),
}
VERIFY = ("scratch", "probe", "probe_early", "fine_tune")


@dataclass(frozen=True)
class Settings:
    """Thresholds of the verdicts; every one is printed next to the number it judges."""

    small_per_class: int = 50  # fewer train images per class than this: a small target
    # Calibrated on the bundled data (README): the last stage's probe lost 4.9-6.7 pts on the similar
    # targets and 5.9-8.6 on digits, too thin to decide alone; the last stage's k-NN gain over
    # random-init features was +5.4 and +40 on the similar targets, -3.4 and -26 on digits.
    different_loss_pts: float = 7.0  # last stage's probe this far below the best stage: different source
    similar_knn_gain_pts: float = 0.0  # last stage's k-NN below random-init features' by more: different
    knn_k: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)  # of the verifying sweep

    def __post_init__(self) -> None:
        if self.small_per_class < 1 or self.knn_k < 1:
            raise ConfigError(f"--small-per-class={self.small_per_class} and k={self.knn_k} must be >= 1")
        if not self.different_loss_pts >= 0:
            raise ConfigError(f"--different-loss-pts={self.different_loss_pts} must be >= 0 (pts of val accuracy)")
        if not np.isfinite(self.similar_knn_gain_pts):
            raise ConfigError(
                f"--similar-knn-gain-pts={self.similar_knn_gain_pts} must be a number (pts of k-NN accuracy)"
            )


@dataclass
class Advice:
    target: str
    per_class: int
    size: str
    domain: str
    best_candidate: str
    best_stage: str
    last_stage: str
    loss_pts: float
    knn_gain_pts: float  # best candidate's last-stage k-NN minus the random-init reference's
    strategies: tuple[str, ...]
    scores: list[dict] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    seconds: float = 0.0
    data_seconds: float = 0.0  # preparing the target's data beforehand (the sweep's jobs reuse it)


def _label(cfg: DictConfig) -> str:
    return candidate_label(str(cfg.backbone.name), str(cfg.backbone.weights))


def target_label(data: DictConfig, train_size: int) -> str:
    """The label the report gives the target's runs (`tables.label_runs`): name and train images."""
    name = tags.target_name({"params.data.name": str(data.name), "params.data.root": str(data.get("root"))})
    return tags.target_label(name, train_size)


# --- what to advise on ---------------------------------------------------------------------------
def expand(overrides: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """(targets, candidates) as override lists. Sweeps of `data*` keys (command line and the
    experiment's grid) give targets; `backbone*` overrides give candidates (swept ones expanded);
    other sweeps (finetune, seed) are what the sweep compares and are ignored here."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides([o for o in overrides if not o.startswith("-")])
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = {o.get_key_element(): list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()}
    grid = OmegaConf.select(compose_config(fixed, hydra_cfg=True), "hydra.sweeper.params") or {}
    for key, value in grid.items():
        override = parser.parse_override(f"{key}={value}")
        sweeps.setdefault(key, list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(value)])

    def is_backbone(override: str) -> bool:
        return override.lstrip("+~").split("=")[0].split(".")[0] == "backbone"

    def product(prefix: str) -> list[list[str]]:
        keys = [k for k in sweeps if k == prefix or k.startswith(prefix + ".")]
        return [[f"{k}={v}" for k, v in zip(keys, values)] for values in itertools.product(*(sweeps[k] for k in keys))]

    common = [o for o in fixed if not is_backbone(o)]
    chosen = [o for o in fixed if is_backbone(o)]
    return [common + t for t in product("data")], [chosen + c for c in product("backbone")]


# --- features and scores --------------------------------------------------------------------------
def prepare_data(cfg: DictConfig) -> float:
    """Decode the target into the prepared-data store, as the sweep's first job would (its jobs
    then reuse it), so advise's own time is its scoring. -> seconds taken (~0 once prepared)."""
    start = time.perf_counter()
    spec = input_spec(build_model(cfg.backbone, pretrained=False), cfg.backbone, cfg.data)
    build_datamodule(cfg.data, spec, int(cfg.seed), cache_dir=cfg.cache_dir)  # the store the sweep reuses
    return time.perf_counter() - start


def stage_features(
    cfg: DictConfig,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], list[str], int]:
    """Pooled frozen features at the end of every stage, one forward per split through the feature
    cache: ({split: {stage: [N, C]}}, {split: labels}, stage names in forward order, the backbone's
    parameter count, for the "bigger ImageNet model first" baseline). The backbone
    gets its weights the way a job does (source model, file, hub or scratch)."""
    torch.manual_seed(int(cfg.seed))  # random-init weights (the reference) are the same every time
    checkpoint, _ = resolve_checkpoint(cfg, train=run)  # may train the source model first
    backbone = create_backbone(cfg.backbone, checkpoint, cfg.cache_dir).model
    data = build_datamodule(cfg.data, input_spec(backbone, cfg.backbone, cfg.data), int(cfg.seed))
    found = extract_stage_features(cfg, backbone, map_stages(backbone), data, ("train", "val"))
    order = [n for n in map_stages(build_model(cfg.backbone, pretrained=False)).names if n in found["train"].features]
    feats = {split: {n: np.asarray(fs.features[n], dtype=np.float64) for n in order} for split, fs in found.items()}
    params = sum(p.numel() for p in backbone.parameters())
    return feats, {split: fs.labels.numpy() for split, fs in found.items()}, order, params


def score_stages(
    feats: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray], stages: list[str], knn_k: int
) -> list[dict]:
    """One row per stage: LogME and k-NN on train, the ridge probe's val accuracy (in %)."""
    # Leave-one-out k-NN with k near the class size votes against the left-out class (its class
    # has one image fewer): keep k at most half the smallest class.
    k = max(1, min(knn_k, (int(np.bincount(labels["train"]).min()) - 1) // 2))
    rows = []
    for stage in stages:
        train, val = feats["train"][stage], feats["val"][stage]
        rows.append(
            {
                "stage": stage,
                "dims": train.shape[1],
                "logme": logme(train, labels["train"]),
                "knn": 100 * knn_accuracy(train, labels["train"], k),
                "probe": 100 * ridge_probe_accuracy(train, labels["train"], val, labels["val"]),
            }
        )
    return rows


# --- verdicts ---------------------------------------------------------------------------------------
def decide(target: str, per_class: int, scores: list[dict], settings: Settings) -> Advice:
    """The four-case verdict from the scores (rows with candidate, stage, probe, ...; stages of a
    candidate in forward order; rows marked `reference` are random-init features of the same
    network). The best (candidate, stage) has the highest probe accuracy, LogME breaking ties.
    The source is different when its late layers are source-specific (the last stage probes far
    below the best) or do not group the target's classes better than an untrained network does
    (k-NN on the last stage vs random-init features: label-free geometry, where a ridge probe
    reads classes out of random convolutions almost as well as out of trained ones)."""
    real = [r for r in scores if r.get("listed", not r.get("reference"))] or scores
    best = max(real, key=lambda r: (r["probe"], r["logme"]))
    last = [r for r in real if r["candidate"] == best["candidate"]][-1]
    loss = best["probe"] - last["probe"]
    reference = [r for r in scores if r.get("reference") and r["stage"] == last["stage"]]
    # No random-init stage of that name (another architecture): no k-NN vote; render says why.
    gain = last["knn"] - reference[0]["knn"] if reference and np.isfinite(reference[0]["knn"]) else float("nan")
    size = "small" if per_class < settings.small_per_class else "large"
    different = loss > settings.different_loss_pts or gain < settings.similar_knn_gain_pts  # NaN gain: no vote
    domain = "different" if different else "similar"
    return Advice(
        target,
        per_class,
        size,
        domain,
        best["candidate"],
        best["stage"],
        last["stage"],
        loss,
        gain,
        STRATEGIES[size, domain],
        scores=list(scores),
    )


def verify_commands(
    advice: Advice, study: str, target: list[str], candidate: list[str], settings: Settings
) -> list[str]:
    """`transferlab train -m ...` lines for a small verifying sweep: the four strategies at the
    target, and a probe at every scored stage of the best candidate (seconds each on cached
    features), so the report's Kendall tau has a point per stage, not two."""
    seeds = "seed=" + ",".join(map(str, settings.seeds))
    named = [] if any(o.startswith("study=") for o in target) else [f"study={study}"]
    base = ["transferlab", "train", "-m", *named, *target, *candidate]
    # finetune=scratch sets backbone.weights=scratch itself: any other weights override refutes it.
    pinned = any(o.startswith("backbone.weights=") and o != "backbone.weights=scratch" for o in candidate)
    strategies = VERIFY[1:] if pinned else VERIFY
    lines = [" ".join([*base, "finetune=" + ",".join(strategies), seeds])]
    mine = [r["stage"] for r in advice.scores if r["candidate"] == advice.best_candidate and not r.get("reference")]
    earlier = [stage for stage in dict.fromkeys(mine) if stage != advice.last_stage]
    if earlier:
        cuts = "finetune.truncate_after=" + ",".join([*earlier, "null"])
        lines.append(" ".join([*base, "finetune=probe", cuts, seeds]))
    return lines


def render(advice: Advice, settings: Settings) -> str:
    """The ranked table and the verdicts with the numbers behind them (printed and logged)."""
    ranked = sorted(advice.scores, key=lambda r: (-r["probe"], -r["logme"]))
    rows = [
        {
            "rank": i + 1,
            "candidate": r["candidate"]
            + (" (random-init reference)" if r.get("reference") and not r.get("listed") else ""),
            "params": f"{r.get('params', 0) / 1e6:.2f}M",
            "stage": r["stage"],
            "dims": r["dims"],
            "probe val %": f"{r['probe']:.1f}",
            "kNN LOO %": f"{r['knn']:.1f}",
            "LogME": f"{r['logme']:.3f}",
        }
        for i, r in enumerate(ranked)
    ]
    a = advice
    lines = [
        f"## advise: {a.target}",
        "",
        format_table(rows),
        "",
        f"- size: {a.size} ({a.per_class} train images in the smallest class; small < {settings.small_per_class})",
        f"- source: {a.domain} (the best stage {a.best_stage} probes {a.loss_pts:+.1f} pts above the last "
        f"stage {a.last_stage}: different above {settings.different_loss_pts:g}; {_knn_verdict(a, settings)})",
        f"- cut / freeze at: {a.best_stage} of {a.best_candidate}",
        f"- strategy ({a.size} + {a.domain}): {' or '.join(a.strategies)}"
        + (f" (finetune.truncate_after={a.best_stage})" if "probe_early" in a.strategies else ""),
        f"- scored in {a.seconds:.1f} s (the data, prepared once for advise and the sweep, in {a.data_seconds:.1f} s)",
        "",
        "Verify with:",
        *[f"    {c}" for c in a.commands],
    ]
    return "\n".join(lines) + "\n"


def _knn_verdict(a: Advice, settings: Settings) -> str:
    if not np.isfinite(a.knn_gain_pts):
        return (
            f"the last stage's k-NN was not compared with random-init features: the reference network "
            f"has no stage {a.last_stage} (it is the first candidate's), so only the probe loss voted"
        )
    return (
        f"the last stage's k-NN is {a.knn_gain_pts:+.1f} pts above that of random-init features: "
        f"different below {settings.similar_knn_gain_pts:g}"
    )


# --- one target -------------------------------------------------------------------------------------
def advise_target(target: list[str], candidates: list[list[str]], settings: Settings) -> Advice:
    """Score every (candidate, stage) of one target, decide, print, and log one MLflow run."""
    cfgs = [compose_config(target + c) for c in candidates]
    for cfg in cfgs:
        validate(cfg)
    data_seconds = prepare_data(cfgs[0])
    start = time.perf_counter()
    # Random-init features of the first candidate's network: the bar a useful source must clear.
    reference = compose_config([*target, *candidates[0], "backbone.weights=scratch"])
    known = {_label(c) for c in cfgs}
    scores: list[dict] = []
    scored = [*cfgs, reference] if _label(reference) not in known else cfgs
    with console.step(f"advise {target_label(cfgs[0].data, 0).split(' / ')[0]}: scoring", len(scored)) as advance:
        for cfg in scored:
            feats, labels, stages, params = stage_features(cfg)
            # A listed random-init candidate is both the reference and a candidate of its own.
            extra = {"candidate": _label(cfg), "reference": _label(cfg) == _label(reference), "params": params}
            extra["listed"] = extra["candidate"] in known
            scores += [extra | row for row in score_stages(feats, labels, stages, settings.knn_k)]
            advance(1)
    cfg = cfgs[0]
    train_labels = labels["train"]
    per_class = int(np.bincount(train_labels).min())
    advice = decide(target_label(cfg.data, len(train_labels)), per_class, scores, settings)
    best = next(c for c, g in zip(candidates, cfgs) if _label(g) == advice.best_candidate)
    advice.commands = verify_commands(advice, str(cfg.study), target, best, settings)
    advice.seconds, advice.data_seconds = time.perf_counter() - start, data_seconds
    _log(cfg, advice, settings, {"data/train_size": len(train_labels), "data/val_size": len(labels["val"])})
    return advice


def _log(cfg: DictConfig, advice: Advice, settings: Settings, sizes: dict[str, float]) -> None:
    tracker = RunTracker(cfg.tracking)
    run_tags = {
        tags.ROLE: tags.ROLE_ADVISE,
        tags.ADVISE + "target": advice.target,
        tags.ADVISE + "size": advice.size,
        tags.ADVISE + "domain": advice.domain,
        tags.ADVISE + "best_candidate": advice.best_candidate,
        tags.ADVISE + "best_stage": advice.best_stage,
        tags.ADVISE + "strategies": ",".join(advice.strategies),
        tags.ADVISE + "stages": ",".join(dict.fromkeys(r["stage"] for r in advice.scores)),
    }
    tracker.start(f"advise-{cfg.data.name}-{sizes['data/train_size']}", run_tags)
    try:
        tracker.log_params(flatten(cfg) | {f"advise.{k}": str(v) for k, v in vars(settings).items()})
        metrics = {
            f"advise/{r['candidate']}/{r['stage']}/{m}": r[m]
            for r in advice.scores
            for m in ("logme", "knn", "probe", "params")
            if m in r
        }
        metrics |= sizes | {
            "advise/per_class": advice.per_class,
            "advise/last_stage_loss_pts": advice.loss_pts,
            "advise/last_stage_knn_gain_over_random_pts": advice.knn_gain_pts,
            "advise/seconds": advice.seconds,
            "advise/data_seconds": advice.data_seconds,
        }
        tracker.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        tracker.log_text(render(advice, settings), "advice.md")
        header = "candidate,stage,dims,logme,knn,probe\n"
        body = "".join(
            f"{r['candidate']},{r['stage']},{r['dims']},{r['logme']},{r['knn']},{r['probe']}\n" for r in advice.scores
        )
        tracker.log_text(header + body, "scores.csv")
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()


def advise(overrides: list[str], settings: Settings | None = None) -> list[Advice]:
    """Advice for every target of the overrides (an experiment's grid or command-line sweeps)."""
    settings = settings or Settings()
    targets, candidates = expand(overrides)
    results = []
    for target in targets:
        advice = advise_target(target, candidates, settings)
        print(render(advice, settings), flush=True)
        results.append(advice)
    return results
