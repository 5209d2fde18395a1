"""`transferlab train|pretrain|stages|advise|report|reproduce|ui`: thin wrappers over the modules.

`train` hands its arguments to Hydra (`-m` for a multirun); everything else is argparse.
Errors a user can fix print as one line (exit 2), after validating every sweep value.
"""

from __future__ import annotations

import argparse
import difflib
import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

from transferlab import console
from transferlab.errors import ConfigError, TransferlabError

# name -> (what it does, an example); `transferlab` and `transferlab --help` print this table.
COMMANDS = {
    "train": ("train one job, or a sweep with -m (Hydra overrides)", "transferlab train -m experiment=default"),
    "pretrain": ("train and cache the source model ahead of a sweep", "transferlab pretrain"),
    "stages": ("print a timm backbone's stage table", "transferlab stages resnet18 --input-size 64"),
    "advise": (
        "score a target's frozen features per stage in seconds; say which strategy to sweep",
        "transferlab advise data=digits data.samples_per_class=10",
    ),
    "report": ("accuracy-vs-compute report of a study", "transferlab report --experiment default"),
    "reproduce": ("rerun a logged run from its MLflow config", "transferlab reproduce <run_id>"),
    "ui": ("MLflow UI on the local store (127.0.0.1)", "transferlab ui --port 5000"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: transferlab <command> [args]   (transferlab <command> --help for its options)", ""]
    for name, (text, example) in COMMANDS.items():
        lines += [f"  {name:<{width}}  {text}", f"  {'':<{width}}    e.g. {example}"]
    return "\n".join(lines)


def entry() -> int:
    """The `transferlab` command: `main`, then a quick interpreter exit. Once torch, Lightning
    and MLflow are loaded, the cyclic collection during Python's shutdown walked their objects
    for ~2 s after every job (benchmarks/bench_startup.py). Frozen objects are skipped by it;
    atexit handlers, flushes and the closing of files still run as before. Only here, not in
    `main`: a process that calls `main` and goes on (the tests) keeps its collector."""
    try:
        return main()
    finally:
        gc.freeze()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    # Without a command the arguments are train's: re-launched DDP ranks see Hydra's argv only.
    command = argv[0] if argv[0] in COMMANDS else "train"
    args = argv[1:] if argv[0] in COMMANDS else argv
    if command == "train" and args == argv and "=" not in argv[0] and not argv[0].startswith("-"):
        near = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"did you mean `transferlab {near[0]}`?" if near else "see `transferlab --help`"
        print(f"transferlab: error: unknown command {argv[0]!r}: {hint}", file=sys.stderr)
        return 2
    handlers = {
        "train": _train,
        "pretrain": _pretrain,
        "stages": _stages,
        "advise": _advise,
        "report": _report,
        "reproduce": _reproduce,
        "ui": _ui,
    }
    try:
        return handlers[command](args)
    except TransferlabError as err:
        print(f"transferlab {command}: error: {err}", file=sys.stderr)
        return 2


def _train(args: list[str]) -> int:
    from transferlab.config import (
        SweepChecks,
        check_config,
        check_value,
        compose_config,
        sweep_checks,
        validate,
        with_value,
    )

    args, data_check = _data_check_flag(_verbosity(args))
    flags = [a for a in args if a.startswith("-")]
    if set(flags) - {"-m", "--multirun"}:  # help, --cfg, --config-dir ...: Hydra's own handling
        return _hydra(args)
    overrides = [a for a in args if not a.startswith("-")]
    checks, base = SweepChecks([overrides]), None
    if flags:
        first = sweep_checks(overrides).compose[0]
        _check_keys(first)
        base = compose_config(first, hydra_cfg=True)
        checks = sweep_checks(overrides, base)
    combos = []
    for combo in checks.compose:
        _check_keys(combo)
        combos.append(compose_config(combo))
    for key, value in checks.schema:  # no torch imported yet: typos and bad values answer at once
        check_value(key, value)
    combos += [with_value(combos[0], key, value) for key, value in checks.derive]
    for cfg in combos:
        check_config(cfg)
    for cfg in combos:
        validate(cfg)
    _probe_services(combos)
    if data_check:
        _check_targets(combos)
    else:
        print(f"transferlab: {NO_DATA_CHECK}: data, weights and teachers are checked by each job, where it runs")
    return _hydra(args, _grid_sweeper(args, base))


def _grid_sweeper(args: list[str], base) -> list[str]:
    """Hydra's basic sweeper composes every job's config before it launches the first (1,000 seeds:
    1,000 compositions); every swept value is checked above, so its twin that skips that runs the
    grid (src/hydra_plugins/transferlab_grid). An experiment's or the command line's sweeper stays."""
    target = str(base.hydra.sweeper.get("_target_", "")) if base is not None else ""
    chosen = any(a.startswith(("hydra/sweeper=", "hydra.sweeper._target_=")) for a in args)
    return ["hydra/sweeper=grid"] if target.endswith(".BasicSweeper") and not chosen else []


NO_DATA_CHECK = "--no-data-check"


def _data_check_flag(args: list[str]) -> tuple[list[str], bool]:
    """`--no-data-check`: skip the pre-sweep check of every target's data, weights files and
    teachers on this machine, for clusters whose data exists only on the nodes (each job still
    checks its own before it trains)."""
    return [a for a in args if a != NO_DATA_CHECK], NO_DATA_CHECK not in args


def _verbosity(args: list[str]) -> list[str]:
    """`-v` / `--verbose` (or TRANSFERLAB_VERBOSE=1): stream every job's epoch lines and the
    libraries' INFO lines; without it a sweep shows a progress line and one line per job."""
    if verbose := any(a in ("-v", "--verbose") for a in args):
        console.set_verbose(True)  # in the environment: launcher workers inherit it
    console.quiet_libraries()
    return [a for a in args if a not in ("-v", "--verbose")] if verbose else args


def _check_targets(combos: list) -> None:
    """Data, weights files and teachers of every sweep value, before the first job: a bad data
    root fails in seconds, not after minutes of source-model pretraining."""
    from transferlab.jobs.target import check_target

    with console.step("checking data, weights and teachers", total=len(combos), min_seconds=5.0) as advance:
        for cfg in combos:
            check_target(cfg)
            advance(1)


def _check_keys(overrides: list[str]) -> None:
    from transferlab.config import compose_config, config_groups
    from transferlab.overrides import check_override_keys

    check_override_keys(overrides, compose_config, config_groups())


def _probe_services(combos: list) -> None:
    """Once per sweep, before Hydra starts a job: the tracking store answers, and the model hub
    does when a job wants hub weights (else offline mode, so cached weights load at once)."""
    from transferlab.preflight import check_devices, check_store, check_writable, ensure_hub_or_offline
    from transferlab.tracking.run import tracking_uri
    from transferlab.transfer.backbone import needs_hub

    for cfg in combos:
        check_devices(cfg.trainer)
        if cfg.tracking.get("artifact_root"):
            check_writable(Path(cfg.tracking.artifact_root).expanduser(), "tracking.artifact_root")
    for uri in {tracking_uri(cfg.tracking) for cfg in combos}:
        check_store(uri)
    if any(needs_hub(cfg.backbone) for cfg in combos):  # ImageNet wheels need no hub
        ensure_hub_or_offline()


def _hydra(args: list[str], launch: list[str] | tuple[str, ...] = ()) -> int:
    """Run Hydra on `args` (+ `launch`, overrides the CLI adds), keeping sys.argv a valid command
    line for re-launched DDP ranks."""
    import hydra

    from transferlab.config import CONF_DIR

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def task(cfg):
        from transferlab.jobs.task import run_job

        try:
            return run_job(cfg)
        except TransferlabError as err:
            print(f"transferlab train: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        finally:
            _end_distributed()

    from transferlab.jobs.ledger import print_interrupted
    from transferlab.studies.sweep import SweepCallback

    sys.argv = [sys.argv[0], *args, *launch]
    SweepCallback.ledger, SweepCallback.failed = None, 0
    try:
        task()
    except KeyboardInterrupt:
        SweepCallback.fail_unfinished("KILLED")
        print_interrupted(SweepCallback.ledger, args)
        return 130
    finally:
        SweepCallback.fail_unfinished()
    return 1 if SweepCallback.failed else 0


def _end_distributed() -> None:
    """Barrier, then destroy the process group: without it gloo aborted at exit ~1 run in 5."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _pretrain(args: list[str]) -> int:
    from transferlab.config import compose_config, validate
    from transferlab.jobs.run import run
    from transferlab.jobs.upstream import ensure_source, uses_source

    args = _verbosity(args)  # epoch lines show its progress; library INFO lines only with -v
    _check_keys(args)
    cfg = compose_config(args)
    validate(cfg)
    if not uses_source(cfg):  # it would train minutes for a model no job reads
        raise ConfigError(
            f"backbone.weights={cfg.backbone.weights}: this backbone's jobs use no source model, so there is "
            "nothing to pretrain; set backbone.weights=source to train one"
        )
    weights, tags = ensure_source(cfg, train=run)
    print(f"source model: {weights}\nMLflow run: {tags['transferlab.source_run_id']}")
    return 0


def _stages(args: list[str]) -> int:
    import timm

    from transferlab.transfer.stages import format_table, map_stages, stage_table

    parser = argparse.ArgumentParser(prog="transferlab stages", description="Print a backbone's stage table.")
    parser.add_argument("backbone", help="timm model name, e.g. resnet18")
    parser.add_argument("--input-size", type=int, default=None, help="px (default: the model's own)")
    opts = parser.parse_args(args)
    if not timm.is_model(opts.backbone.split(".")[0]):
        raise TransferlabError(f"{opts.backbone!r} is not a timm model: see timm.list_models()")
    model = timm.create_model(opts.backbone, pretrained=False, num_classes=0)
    size = opts.input_size or timm.data.resolve_model_data_config(model)["input_size"][-1]
    stages = map_stages(model)
    print(f"{opts.backbone}: {len(stages.names)} stages at {size}px")
    print(format_table(stage_table(model, stages, size)))
    return 0


def _advise(args: list[str]) -> int:
    from transferlab.config import check_config, compose_config, validate
    from transferlab.studies.advise import Settings, advise, expand

    parser = argparse.ArgumentParser(
        prog="transferlab advise",
        description="Advice per target from frozen features: overrides as for train; sweeps of data* keys "
        "(or an experiment's grid) are targets, sweeps of backbone* keys are candidates.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=default")
    parser.add_argument("--small-per-class", type=int, default=Settings.small_per_class)
    parser.add_argument("--different-loss-pts", type=float, default=Settings.different_loss_pts)
    parser.add_argument("--similar-knn-gain-pts", type=float, default=Settings.similar_knn_gain_pts)
    opts, rest = parser.parse_known_args(_verbosity(args))
    overrides = [a for a in [*opts.overrides, *rest] if a not in ("-m", "--multirun")]
    _check_keys([o for o in overrides if "," not in o])
    settings = Settings(
        small_per_class=opts.small_per_class,
        different_loss_pts=opts.different_loss_pts,
        similar_knn_gain_pts=opts.similar_knn_gain_pts,
    )
    targets, candidates = expand(overrides)
    combos = [compose_config(t + c) for t in targets for c in candidates]
    for cfg in combos:
        check_config(cfg)
    for cfg in combos:
        validate(cfg)
    _check_targets(combos)  # every target's data before a source model is trained or loaded
    advise(overrides, settings)
    return 0


def _report(args: list[str]) -> int:
    from transferlab.studies.report import write_report

    parser = argparse.ArgumentParser(prog="transferlab report", description="Accuracy-vs-compute report of a study.")
    parser.add_argument("--experiment", default="default", help="study / MLflow experiment name")
    parser.add_argument("--out", type=Path, default=None, help="folder (default: reports/<experiment>)")
    parser.add_argument("--tracking-uri", default=None)
    opts = parser.parse_args(args)
    path = write_report(opts.experiment, opts.out or Path("reports") / opts.experiment, opts.tracking_uri)
    print(path.read_text())
    print(f"written: {path.parent}")
    return 0


def _reproduce(args: list[str]) -> int:
    from transferlab.jobs.reproduce import reproduce

    parser = argparse.ArgumentParser(
        prog="transferlab reproduce", description="Rerun a logged run from its MLflow config."
    )
    parser.add_argument("run_id")
    parser.add_argument("--tracking-uri", default=None)
    opts = parser.parse_args(args)
    print(reproduce(opts.run_id, opts.tracking_uri).table)
    return 0


def _ui(args: list[str]) -> int:
    """`mlflow server` on the local store, quiet (no per-request log), ended by Ctrl-C without a traceback."""
    from importlib.metadata import entry_points

    import mlflow
    from omegaconf import OmegaConf

    from transferlab import tags
    from transferlab.tracking.links import chart_url, set_default_view, ui_url
    from transferlab.tracking.run import tracking_uri
    from transferlab.tracking.ui_app import UI_APP

    parser = argparse.ArgumentParser(prog="transferlab ui", description="MLflow UI on the local store.")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) keeps the UI off the network")
    opts = parser.parse_args(args)
    uri = tracking_uri(OmegaConf.create({"uri": None}))
    artifacts = (Path.cwd() / "mlartifacts").as_uri()
    base = f"http://{opts.host}:{opts.port}"
    client = mlflow.MlflowClient(uri)
    studies = [e for e in client.search_experiments() if e.name != "Default"]
    print(f"MLflow UI on {base} (store {uri}); Ctrl-C stops it. Runs of each study:", flush=True)
    for exp in studies:
        set_default_view(client, exp.experiment_id)  # stores made before the view existed
        print(f"  {exp.name}: {ui_url(exp.experiment_id, base=base)}", flush=True)
        print(f"  {exp.name}, accuracy vs GFLOPs: {chart_url(exp.experiment_id, base=base)}", flush=True)
        query, order = tags.role_query(tags.ROLE_SWEEP), ["attributes.start_time DESC"]
        if sweeps := client.search_runs([exp.experiment_id], query, max_results=1, order_by=order):
            link = ui_url(exp.experiment_id, sweeps[0].info.run_id, base=base)
            print(f"  {exp.name}, last sweep (best per target, report): {link}", flush=True)
    # One worker and no job runner: ~0.5 GB instead of ~3 GB (shared NOTES). No access log, and
    # starlette's deprecation notice about mlflow's own import silenced: the terminal stays readable.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env["PYTHONWARNINGS"] = "ignore:starlette.middleware.wsgi is deprecated"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--registry-store-uri", uri]
    cmd += ["--default-artifact-root", artifacts, "--host", opts.host, "--port", str(opts.port), "--workers", "1"]
    cmd += ["--uvicorn-opts", "--no-access-log --log-level warning"]
    if entry_points(group="mlflow.app", name=UI_APP):  # installed with the package (pyproject.toml)
        cmd += ["--app-name", UI_APP]  # MLflow's app with its assistant panel closed at first view
    # Its own session: a terminal Ctrl-C reaches only this process, which stops the server with one
    # SIGTERM (a SIGINT to uvicorn's whole group cancels its lifespan task and prints a traceback).
    server = subprocess.Popen(cmd, env=env, start_new_session=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # both end it cleanly (SIGINT is ignored under `cmd &`)
        signal.signal(sig, signal.default_int_handler)
    try:
        return server.wait()
    except KeyboardInterrupt:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        print("MLflow UI stopped.")
        return 0
