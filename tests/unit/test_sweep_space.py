"""The sweep's search space and the paper grid's trial overrides (no Ray started; moved here from
tests/integration/test_sweep.py, which runs the sweeps)."""

from __future__ import annotations

from ser_platform.catalogue import PAPER_GRID, trial_overrides
from ser_platform.config import load_config
from ser_platform.sweep import search_space


def test_search_space_is_the_dotted_loss_keys():
    space = search_space()
    assert set(space) == {"loss.alpha", "loss.beta", "loss.margin", "loss.space"}
    config = load_config("demo")
    for key in space:  # every searched key is a real config key: the trial's overrides apply
        config.replace({key: {"loss.space": "text"}.get(key, 0.5)})
    variant, overrides = trial_overrides(PAPER_GRID, {"variant": "alpha=1 beta=0.5"})
    assert (variant, overrides) == ("alpha=1 beta=0.5", {"loss.alpha": 1.0, "loss.beta": 0.5})


def test_the_optuna_study_goes_where_the_config_or_the_environment_says(tmp_path, monkeypatch):
    from ser_platform.sweep import optuna_url

    monkeypatch.delenv("SER_OPTUNA_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    local = load_config("demo", overrides={"tracking.storage": str(tmp_path / "runs")})
    assert optuna_url(local) == f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    remote = load_config("demo", overrides={"tracking.storage": "s3://bucket/runs"})
    # SQLite needs a local file: the driver's cache, not the (job's) working directory
    assert optuna_url(remote) == f"sqlite:///{tmp_path / 'cache' / 'ser_platform' / 'optuna.db'}"
    monkeypatch.setenv("SER_OPTUNA_STORAGE", "postgresql+psycopg://ser@127.0.0.1:5432/optuna")
    assert optuna_url(remote) == "postgresql+psycopg://ser@127.0.0.1:5432/optuna"  # the head's database
    own = remote.replace({"tracking.optuna_storage": "postgresql+psycopg://ser@db:5432/study"})
    assert optuna_url(own) == "postgresql+psycopg://ser@db:5432/study"  # the config wins over the environment
