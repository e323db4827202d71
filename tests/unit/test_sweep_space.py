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


def test_staggered_trials_start_an_interval_apart_and_never_more_than_the_limit_at_once(monkeypatch):
    """sweep.start_interval_s through Tune's own searcher API, on a real OptunaSearch: "not yet" (None) within the
    interval of the last start, a suggestion after it; never more live trials than max_concurrent; the last start
    survives Tune's save/restore of the searcher's state as wall-clock time."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from ser_platform import sweep

    now = [1000.0]
    monkeypatch.setattr(sweep.time, "time", lambda: now[0])
    searcher = sweep._staggered(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=0)), max_concurrent=2,
                                interval_s=20.0)
    searcher.set_search_properties("val_ua_mean", "max", {"loss.alpha": tune.uniform(0, 1)})

    first = searcher.suggest("t0")
    assert set(first) == {"loss.alpha"}
    now[0] += 19.9
    assert searcher.suggest("t1") is None  # within the interval
    now[0] += 0.2
    assert searcher.suggest("t1") is not None  # 20.1 s after the first start
    now[0] += 60
    assert searcher.suggest("t2") is None  # two live trials: the limit, however long ago the last start
    searcher.on_trial_complete("t0", {"val_ua_mean": 0.5})
    assert searcher.suggest("t2") is not None

    state = searcher.get_state()  # what Tune saves with the experiment (SearchGenerator.save_to_dir)
    restored = sweep._staggered(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=0)), 2, 20.0)
    restored.set_state(state)
    assert restored.last_start == now[0] and restored.live_trials == {"t1", "t2"}

    unstaggered = sweep._staggered(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=0)), 3, 0.0)
    unstaggered.set_search_properties("val_ua_mean", "max", {"loss.alpha": tune.uniform(0, 1)})
    assert all(unstaggered.suggest(f"u{i}") is not None for i in range(3))  # 0: all at once, up to the limit
    assert unstaggered.suggest("u3") is None
