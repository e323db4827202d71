"""benchmarks/checkpoint.py: the bytes it reports against the model's own tensor sizes.

Before: the whole state dict twice (weights and best weights) and Adam's two moments of every trainable parameter.
Now, at an epoch that is the best so far: the state dict without frozen parameters once, and the same Adam state;
at an epoch that is not: the kept weights once more, in bf16 (the paper preset's ``train.precision``). Counted
here from a model built independently of the benchmark: a file holds at least those bytes and at most 1 KiB more
per tensor (what ``torch.save`` adds: names, pickled metadata, alignment).
"""

from __future__ import annotations

import sys

import pytest

from support import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import checkpoint  # noqa: E402

from ser_platform.config import load_config  # noqa: E402


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.slow
def test_sizes_match_the_models_tensors(capsys):
    from ser_platform.models.ser_model import SERModel

    rows = checkpoint.main(["--small", "--epochs", "2"])
    model = SERModel(load_config("paper", overrides=checkpoint.SMALL).model, pretrained=False)
    state = model.state_dict()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen, "the paper preset freezes wav2vec2's feature encoder"
    whole = tensor_bytes(state.values())
    kept = tensor_bytes(v for k, v in state.items() if k not in frozen)
    assert load_config("paper").train.precision == "bf16"
    kept_bf16 = sum(v.numel() * (2 if v.is_floating_point() else v.element_size())
                    for k, v in state.items() if k not in frozen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    adam = 2 * tensor_bytes(trainable)
    adam_tensors = 3 * len(trainable)  # exp_avg, exp_avg_sq and the step count, per parameter

    def holds(size: int, raw: int, tensors: int) -> bool:
        return raw <= size <= raw + 1024 * tensors

    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["best is this epoch"]  # the first epoch is the best so far
    for row in rows:
        assert holds(row["before"]["bytes"], 2 * whole + adam, 2 * len(state) + adam_tensors), row
        copies = 1 if row["best is this epoch"] else 2
        raw = kept + adam + (0 if row["best is this epoch"] else kept_bf16)
        assert holds(row["now"]["bytes"], raw, copies * (len(state) - len(frozen)) + adam_tensors), row
        assert row["now"]["bytes"] < row["before"]["bytes"]
    assert "| epoch | best epoch is this one | before MiB | now MiB |" in capsys.readouterr().out
