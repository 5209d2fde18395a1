from __future__ import annotations

import pytest

from conftest import FAST
from transferlab.cli import main
from transferlab.config import compose_config, sweep_checks, validate
from transferlab.errors import ConfigError


def test_stages_command_prints_the_table(capsys) -> None:
    assert main(["stages", "test_resnet", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| st")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert "16x16" in out  # stage1 output resolution at 32 px


def test_unknown_backbone_is_one_line_error(capsys) -> None:
    assert main(["stages", "resnet_nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "not a timm model" in err


def test_sweep_checks_compose_group_choices_and_check_each_field_value_once() -> None:
    checks = sweep_checks(
        ["a=1", "finetune=probe,fine_tune,scratch", "data.samples_per_class=5,10,5", "seed=range(0,1000)"]
        + ["optim.lr=0.1,abc"]
    )
    assert checks.compose[0] == ["a=1", "finetune=probe", "data.samples_per_class=5", "seed=0", "optim.lr=0.1"]
    assert [c[1:] for c in checks.compose[1:]] == [
        ["data.samples_per_class=5", "seed=0", "optim.lr=0.1", "finetune=fine_tune"],
        ["data.samples_per_class=5", "seed=0", "optim.lr=0.1", "finetune=scratch"],
    ]  # 3 compositions for 3 x 2 x 1,000 x 2 jobs
    assert checks.derive == [("data.samples_per_class", 10)]  # set into the first point, checked whole
    assert checks.schema == [("seed", s) for s in range(1, 1000)] + [("optim.lr", "abc")]


def test_experiment_grid_values_are_validated() -> None:
    base = compose_config(["experiment=default"], hydra_cfg=True)
    combos = sweep_checks(["experiment=default"], base).compose
    assert any("finetune=probe_early" in c for c in combos)
    assert any("data=digits" in c for c in combos)


def test_a_bad_seed_among_many_fails_without_composing_per_seed(monkeypatch, capsys) -> None:
    import transferlab.config

    composed = []
    compose = transferlab.config.compose_config
    monkeypatch.setattr(transferlab.config, "compose_config", lambda *a, **k: composed.append(a) or compose(*a, **k))
    seeds = ",".join(map(str, range(300)))
    assert main(["train", "-m", *FAST, f"seed={seeds},-1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "transferlab train: error: seed=-1 is invalid: use an integer >= 0, e.g. seed=0"
    )
    assert len(composed) <= 4  # the first grid point's keys and config, not one per seed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data=nope", "Could not find 'data/nope'"),
        ("optim.lr=0", "optim.lr"),
        ("optim.schedule=linear", "one of cosine | constant"),
        ("trainer.max_epochs=0", "max_epochs"),
        ("data=imagefolder", "data.root is required"),
    ],
)
def test_bad_config_values_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        validate(compose_config([*FAST, override]))
    assert "\n" not in str(err.value)


def test_scratch_strategy_is_random_init_in_every_study() -> None:
    for experiment in ("default", "lr_mult", "freeze_depth"):
        assert compose_config([f"experiment={experiment}", "finetune=scratch"]).backbone.weights == "scratch"
    with pytest.raises(ConfigError, match="scratch means random init"):
        validate(compose_config(["finetune=scratch", "backbone.weights=source"]))


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_bare_and_help_list_every_command_with_an_example(argv, capsys) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("train", "pretrain", "stages", "report", "reproduce", "ui"):
        assert f"  {name} " in out
        assert f"e.g. transferlab {name}" in out


def test_train_help_is_still_hydras(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "Configuration groups" in capsys.readouterr().out


def test_unknown_command_suggests_the_closest(capsys) -> None:
    assert main(["reprodcue", "abc"]) == 2
    assert "did you mean `transferlab reproduce`" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["finetune.freeze_dept=2", "+finetune.freeze_dept=2", "++finetune.freeze_dept=2"])
def test_mistyped_field_gets_did_you_mean_and_is_never_added(override, capsys) -> None:
    assert main(["train", *FAST, override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "finetune.freeze_dept is not a config field" in err
    assert "did you mean finetune.freeze_depth?" in err


def test_typo_in_a_sweep_is_caught_before_any_job(capsys) -> None:
    assert main(["train", "-m", *FAST, "data.samples_per_clas=5,10"]) == 2
    assert "did you mean data.samples_per_class?" in capsys.readouterr().err


def test_plus_is_allowed_where_keys_are_forwarded() -> None:
    from transferlab.cli import _check_keys

    _check_keys(["data=digits", "+backbone.kwargs.drop_rate=0.1", "finetune=probe", "finetune.head.dropout=0.1"])
    with pytest.raises(ConfigError, match="did you mean data.fraction"):
        _check_keys(["data=digits", "data.fractoin=0.5"])


def test_a_grid_sweep_launches_without_composing_every_job_first(store, monkeypatch) -> None:
    """Hydra's basic sweeper composes each job's config before launching the first (the launcher
    composes it again); after the CLI's checks the grid sweeper launches at once."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    import transferlab.jobs.task
    from transferlab.jobs.returns import JobOutcome

    composed, at_start = [], []
    load = ConfigLoaderImpl.load_sweep_config
    monkeypatch.setattr(ConfigLoaderImpl, "load_sweep_config", lambda *a, **k: composed.append(1) or load(*a, **k))

    def job(cfg) -> JobOutcome:  # no training: how many compositions came before each job
        at_start.append(len(composed))
        return JobOutcome("FINISHED", 0.0, "", "", "")

    monkeypatch.setattr(transferlab.jobs.task, "run_job", job)
    sweep = ["train", "-m", *FAST, "study=grid", "seed=0,1,2,3,4"]
    assert main(sweep) == 0
    assert main([*sweep, "hydra/sweeper=basic"]) == 0
    assert at_start == [1, 2, 3, 4, 5, 11, 12, 13, 14, 15]  # Hydra's basic sweeper: 5 compositions first


def test_the_command_freezes_the_collector_after_main_returns_or_raises(monkeypatch) -> None:
    from transferlab import cli

    calls: list[str] = []
    monkeypatch.setattr(cli.gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 3)
    assert cli.entry() == 3
    assert calls == ["main", "freeze"]

    def fails():
        calls.append("main")
        raise SystemExit(2)

    monkeypatch.setattr(cli, "main", fails)
    with pytest.raises(SystemExit):
        cli.entry()
    assert calls == ["main", "freeze", "main", "freeze"]


def test_main_alone_never_freezes_the_collector(monkeypatch, capsys) -> None:
    # In-process callers (these tests, notebooks) keep collecting cycles after a command.
    from transferlab import cli

    monkeypatch.setattr(cli.gc, "freeze", lambda: pytest.fail("main froze the collector"))
    assert main(["--help"]) == 0
    assert main(["stages", "test_resnet", "--input-size", "32"]) == 0


def test_the_installed_command_and_python_m_go_through_entry() -> None:
    import importlib.util
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["transferlab"] == "transferlab.cli:entry"
    dunder_main = importlib.util.find_spec("transferlab.__main__").origin  # found, not run
    assert "sys.exit(entry())" in Path(dunder_main).read_text()
