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
