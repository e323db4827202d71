"""benchmarks/memory.py: its counts against independent ones.

* parameters, gradients and Adam state against ``numel`` of a freshly built model (4 bytes each; Adam: 2x);
* "shape only" counting (no FLOPs, replayed LSTM) against the same forward run for real;
* the extrapolation from batches 1 and 2 against a direct measurement at batch 4;
* the three parts against one forward of the whole model;
* the CUDA bf16 policy against PyTorch's own autocast, where CPU and CUDA autocast agree (linear layers);
* the switches move what they must (frozen feature encoder: exactly its parameters stop training).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from support import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import memory  # noqa: E402

from ser_platform.config import preset  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    config = preset("paper").replace(memory.SMALL).model
    return config, memory.build_model(config)


def forward(model, batch: int, seconds: float = 0.5, tokens: int = 6):
    audio, text = memory.audio_inputs(model, batch, seconds), memory.text_inputs(batch, tokens)
    return (lambda: model(**audio, **text)), (*audio.values(), *text.values())


def test_state_bytes_are_four_bytes_per_parameter_and_adam_twice_the_gradients(tiny):
    config, model = tiny
    fresh = memory.SERModel(config, pretrained=False)  # another build: the count does not come from `model`
    numel = sum(p.numel() for p in fresh.parameters())
    state = memory.state_bytes(model)
    assert state == {"parameters": 4 * numel, "gradients": 4 * numel, "adam": 8 * numel}


def test_frozen_feature_encoder_stops_exactly_its_parameters(tiny):
    config, _ = tiny
    frozen = memory.build_model(config, frozen_fe=True)
    conv = sum(p.numel() for p in frozen.speech_encoder.ssl.encoder.feature_extractor.parameters())
    state = memory.state_bytes(frozen)
    assert conv > 0 and state["gradients"] == state["parameters"] - 4 * conv and state["adam"] == 2 * state["gradients"]


@pytest.mark.slow  # forwards of the tiny model through the counting modes: ~5-10 s on 2 busy cores
def test_shape_only_counts_what_a_real_forward_saves(tiny):
    _, model = tiny
    run, inputs = forward(model, 2)
    real = memory.count_saved(model, run, bf16=False, exclude=inputs, shape_only=False, replay=False)
    fast = memory.count_saved(model, run, bf16=False, exclude=inputs)
    assert real.total > 0 and (fast.total, fast.largest) == (real.total, real.largest)


@pytest.mark.slow  # forwards of the tiny model through the counting modes: ~5-10 s on 2 busy cores
def test_batch_extrapolation_matches_a_direct_measurement(tiny):
    _, model = tiny
    measured = {}
    for batch in (1, 2, 4):
        run, inputs = forward(model, batch)
        measured[batch] = memory.count_saved(model, run, bf16=True, exclude=inputs).total
    assert memory.linear_in_batch(measured[1], measured[2], 4) == measured[4]


@pytest.mark.slow  # forwards of the tiny model through the counting modes: ~5-10 s on 2 busy cores
def test_the_parts_add_up_to_the_whole_model(tiny):
    _, model = tiny
    run, inputs = forward(model, 2, seconds=1.0, tokens=8)
    whole = memory.count_saved(model, run, bf16=False, exclude=inputs).total
    parts = memory.measure_parts(model, 2, 1.0, 8, bf16=False)
    assert sum(p.total for p in parts.values()) == pytest.approx(whole, rel=0.01)


def test_bf16_policy_saves_what_autocast_saves_for_linear_layers():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).train()
    x = torch.randn(32, 16)

    def saved(context) -> list[tuple]:
        found = []

        def pack(tensor):
            found.append((tuple(tensor.shape), tensor.dtype))
            return tensor.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
            mlp(x)
        return sorted(found, key=str)

    parameters = {(tuple(p.shape), p.dtype) for p in mlp.parameters()}
    reference = [s for s in saved(torch.autocast("cpu", dtype=torch.bfloat16)) if s not in parameters]
    assert reference == [s for s in saved(memory.CudaPolicy(bf16=True)) if s not in parameters]
    assert any(dtype == torch.bfloat16 for _, dtype in reference)


def test_bf16_policy_runs_layer_norm_in_float32_as_cuda_does():
    norm = torch.nn.LayerNorm(8)
    dtypes = []

    def pack(tensor):
        dtypes.append(tensor.dtype)
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), memory.CudaPolicy(bf16=True):
        out = norm(torch.randn(4, 8).to(torch.bfloat16).requires_grad_())
    assert out.dtype == torch.float32 and torch.float32 in dtypes


@pytest.mark.slow
def test_small_run_reports_every_variant(tmp_path, capsys):
    rows = memory.main(["--small", "--json", str(tmp_path / "rows.json")])
    assert json.loads((tmp_path / "rows.json").read_text()) == json.loads(json.dumps(rows))
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {v[0] for v in memory.VARIANTS}
    base, bf16 = by_variant["fp32"], by_variant["bf16"]
    assert bf16["activations"] < base["activations"]
    assert by_variant["bf16 + frozen FE"]["parts"]["wav2vec2"] < bf16["parts"]["wav2vec2"]
    checkpointed = by_variant["bf16 + checkpointing"]
    assert checkpointed["activations"] < bf16["activations"] and checkpointed["recomputed layer"] > 0
    for row in rows:
        terms = ("parameters", "gradients", "adam", "inputs", "activations", "largest activation")
        assert row["peak"] >= sum(row[k] for k in terms) + row["recomputed layer"]
    out = capsys.readouterr().out
    assert "predicted peak per step at batch 32" in out
    # The paper preset's row is the one with the preset's switches (config.py: frozen FE, checkpointing, bf16).
    assert "the paper preset's own switches: bf16 + frozen FE + checkpointing" in out
