"""Focus attention (eq. 1-5) against brute-force loops, and every backend against eager."""

import math
import warnings

import pytest
import torch

from ser_platform.config import ConfigError, ModelConfig
from ser_platform.models.focus_attention import (
    ATTENTION_FUNCTIONS,
    FocusAttention,
    _flex_focal_attention,
    focal_attn_mask,
    focal_bias,
    scale_to_length,
)

from support import multihead_reference

FOCAL_PARAMS = ("w_p.weight", "w_g.weight", "u_c", "u_d")




def _masks(lengths, total):
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


def _config(embed_dim=8, num_heads=2, **settings) -> ModelConfig:
    """A ModelConfig of these sizes; attention dropout 0 unless given (the tests compare deterministic outputs)."""
    return ModelConfig(embed_dim=embed_dim, num_heads=num_heads, **{"attn_dropout": 0.0, **settings})


def _module(embed_dim=8, num_heads=2, seed=0, **settings):
    torch.manual_seed(seed)
    module = FocusAttention(_config(embed_dim, num_heads, **settings))
    # Random (not default) focal weights so μ, σ differ clearly between queries.
    with torch.no_grad():
        if module.focus_attention:
            for name in FOCAL_PARAMS:
                module.get_parameter(name).normal_(0.0, 0.8)
    return module.eval()


def _brute_force(module, hidden_states, key_value_states, query_lengths, key_lengths):
    """Eq. (1)-(6) with Python loops over batch, query, key, head and channel; plain floats throughout."""
    params = {name: p.detach().double().tolist() for name, p in module.named_parameters()}
    x = hidden_states.detach().double().tolist()
    y = key_value_states.detach().double().tolist()
    batch, query_len, dim = hidden_states.shape
    heads, head_dim = module.num_heads, module.head_dim

    def linear(weight, bias, vector):
        return [sum(weight[o][c] * vector[c] for c in range(dim)) + (bias[o] if bias else 0.0) for o in range(dim)]

    output = [[[0.0] * dim for _ in range(query_len)] for _ in range(batch)]
    biases = {}
    for b in range(batch):
        t_k = key_lengths[b]
        if t_k == 0:
            continue
        g = [sum(y[b][j][c] for j in range(t_k)) / t_k for c in range(dim)]
        wg_g = linear(params["w_g.weight"], None, g)
        keys = [linear(params["k_proj.weight"], params["k_proj.bias"], y[b][j]) for j in range(t_k)]
        values = [linear(params["v_proj.weight"], params["v_proj.bias"], y[b][j]) for j in range(t_k)]
        for i in range(query_lengths[b]):
            wp_x = linear(params["w_p.weight"], None, x[b][i])
            hidden = [math.tanh(wp_x[c] + wg_g[c]) for c in range(dim)]
            mu = sum(params["u_c"][c] * hidden[c] for c in range(dim))
            sigma = sum(params["u_d"][c] * hidden[c] for c in range(dim))
            mu_tilde = t_k / (1.0 + math.exp(-mu))
            sigma_tilde = t_k / (1.0 + math.exp(-sigma)) + module.sigma_min
            query = linear(params["q_proj.weight"], params["q_proj.bias"], x[b][i])
            mixed = [0.0] * dim
            for h in range(heads):
                channels = range(h * head_dim, (h + 1) * head_dim)
                logits = []
                for j in range(t_k):
                    f_ij = -((j - mu_tilde) ** 2) / (sigma_tilde**2 / 2.0)
                    biases[b, i, j] = f_ij
                    dot = sum(query[c] * keys[j][c] for c in channels) / math.sqrt(head_dim)
                    logits.append(dot + f_ij)
                top = max(logits)
                weights = [math.exp(v - top) for v in logits]
                total = sum(weights)
                for c in channels:
                    mixed[c] = sum(weights[j] / total * values[j][c] for j in range(t_k))
            output[b][i] = linear(params["out_proj.weight"], params["out_proj.bias"], mixed)
    return torch.tensor(output, dtype=torch.float64), biases


def test_worked_example_of_the_docstring():
    mu_tilde = scale_to_length(torch.zeros(1, 1), torch.tensor([4.0]))
    sigma_tilde = scale_to_length(torch.zeros(1, 1), torch.tensor([4.0])) + 1.0
    assert mu_tilde.item() == 2.0 and sigma_tilde.item() == 3.0
    bias = focal_bias(mu_tilde, sigma_tilde, torch.arange(4.0))
    torch.testing.assert_close(bias, torch.tensor([[[-8 / 9, -2 / 9, 0.0, -2 / 9]]]))


@pytest.mark.parametrize("per_key", [False, True], ids=["per_query", "as_written"])
@pytest.mark.parametrize("with_padding", [True, False])
def test_fused_focal_mask_matches_eq5_with_padding_values_and_gradients(with_padding, per_key):
    """The fused mask against eq. (5) then masked_fill; as written the centres are the 6 keys, the positions the 4
    queries', and f is transposed onto the (query, key) logits."""
    generator = torch.Generator().manual_seed(0)
    centres, positions_len = (6, 4) if per_key else (4, 6)
    mu = (6 * torch.rand(2, centres, generator=generator, dtype=torch.float64)).requires_grad_()
    sigma = (1 + 5 * torch.rand(2, centres, generator=generator, dtype=torch.float64)).requires_grad_()
    keep = _masks([6, 3], 6) if with_padding else None
    positions = torch.arange(positions_len, dtype=torch.float64).expand(2, -1) + float(per_key)
    expected = focal_bias(mu, sigma, positions)
    expected = expected.transpose(1, 2) if per_key else expected
    assert expected.shape == (2, 4, 6)
    if keep is not None:
        expected = expected.masked_fill(~keep[:, None], float("-inf"))
    torch.testing.assert_close(focal_attn_mask(mu, sigma, positions, keep, per_key), expected)

    def finite_part(mu, sigma):  # gradcheck needs finite outputs: read the valid keys only
        mask = focal_attn_mask(mu, sigma, positions, keep, per_key)
        return mask if keep is None else mask[keep[:, None].expand_as(mask)]

    assert torch.autograd.gradcheck(finite_part, (mu, sigma))
    # An upstream gradient at padded keys (a constant -inf) must not reach μ̃, σ̃, as with masked_fill.
    upstream = torch.randn(2, 4, 6, generator=generator, dtype=torch.float64)
    fused = torch.autograd.grad(focal_attn_mask(mu, sigma, positions, keep, per_key), (mu, sigma), upstream)
    reference = torch.autograd.grad(expected, (mu, sigma), upstream)
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_focal_bias_and_output_match_brute_force_loops(attn_implementation):
    module = _module(attn_implementation=attn_implementation)
    query_lengths, key_lengths = [4, 2], [5, 3]
    hidden_states, key_value_states = torch.randn(2, 4, 8), torch.randn(2, 5, 8)
    query_mask, key_mask = _masks(query_lengths, 4), _masks(key_lengths, 5)

    output, focal = module(hidden_states, key_value_states, query_mask, key_mask, output_focal=True)
    expected, expected_bias = _brute_force(module, hidden_states, key_value_states, query_lengths, key_lengths)

    bias = focal_bias(focal.mu_tilde, focal.sigma_tilde, focal.positions)
    assert bias.shape == (2, 4, 5) and torch.equal(focal.attn_bias(), bias)
    for (b, i, j), value in expected_bias.items():
        assert bias[b, i, j].item() == pytest.approx(value, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(focal.lengths, torch.tensor([5.0, 3.0]))


def _run(module, inputs, attn_implementation):
    module.attn_implementation = attn_implementation
    module.zero_grad()
    hidden_states, key_value_states, query_mask, key_mask = inputs
    hidden_states = hidden_states.clone().requires_grad_()
    key_value_states = key_value_states.clone().requires_grad_()
    output, _ = module(hidden_states, key_value_states, query_mask, key_mask)
    # A fixed random cotangent so every output element matters to the gradients.
    cotangent = torch.randn(output.shape, generator=torch.Generator().manual_seed(1)).to(output.device)
    (output * cotangent).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    grads["hidden_states"], grads["key_value_states"] = hidden_states.grad, key_value_states.grad
    return output.detach(), grads


CASES = {
    "no_padding": ((3, 6, 9), None, None),
    "padding": ((3, 6, 9), [6, 2, 4], [9, 5, 1]),
    "all_padding_keys": ((3, 6, 9), [6, 3, 4], [9, 0, 4]),
    "all_padding_queries": ((3, 6, 9), [6, 0, 4], [9, 5, 7]),
    "batch_of_one": ((1, 7, 4), [5], [3]),
    "queries_longer_than_keys": ((2, 12, 3), [12, 8], [3, 2]),
}


READINGS = ("per_query", "as_written")
# (focus_attention, focal_reading): without focus attention there is no reading to vary.
VARIANTS = [(True, "per_query"), (True, "as_written"), (False, "per_query")]


@pytest.mark.parametrize("focus_attention, focal_reading", VARIANTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_sdpa_matches_eager_values_and_gradients(case, focus_attention, focal_reading):
    (batch, query_len, key_len), query_lengths, key_lengths = CASES[case]
    module = _module(embed_dim=16, num_heads=4, focus_attention=focus_attention, focal_reading=focal_reading)
    inputs = (
        torch.randn(batch, query_len, 16),
        torch.randn(batch, key_len, 16),
        None if query_lengths is None else _masks(query_lengths, query_len),
        None if key_lengths is None else _masks(key_lengths, key_len),
    )
    eager_output, eager_grads = _run(module, inputs, "eager")
    sdpa_output, sdpa_grads = _run(module, inputs, "sdpa")

    torch.testing.assert_close(sdpa_output, eager_output, rtol=1e-5, atol=1e-5)
    assert eager_grads.keys() == sdpa_grads.keys()
    for name in eager_grads:
        assert torch.isfinite(eager_grads[name]).all(), name
        torch.testing.assert_close(sdpa_grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    for b in range(batch):
        padded_queries = slice(query_len if query_lengths is None else query_lengths[b], None)
        assert (eager_output[b, padded_queries] == 0).all()
        if key_lengths is not None and key_lengths[b] == 0:
            assert (eager_output[b] == 0).all() and (sdpa_output[b] == 0).all()


@pytest.mark.parametrize("focal_reading", READINGS)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_gradients_reach_the_focal_parameters(attn_implementation, focal_reading):
    module = _module(embed_dim=16, num_heads=4, attn_implementation=attn_implementation, focal_reading=focal_reading)
    _, grads = _run(module, (torch.randn(2, 5, 16), torch.randn(2, 7, 16), _masks([5, 3], 5), _masks([7, 4], 7)),
                    attn_implementation)
    for name in FOCAL_PARAMS:
        assert grads[name].abs().sum() > 0, name


@pytest.mark.parametrize("focal_reading", READINGS)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_padding_changes_nothing(attn_implementation, focal_reading):
    """μ̃, σ̃, G and positions use true lengths: extra padded queries/keys holding garbage change no valid output."""
    module = _module(embed_dim=16, num_heads=4, attn_implementation=attn_implementation, focal_reading=focal_reading)
    hidden_states, key_value_states = torch.randn(1, 4, 16), torch.randn(1, 6, 16)
    reference, reference_focal = module(hidden_states, key_value_states, output_focal=True)

    padded_hidden = torch.cat((hidden_states, 50 * torch.randn(1, 3, 16)), dim=1)
    padded_keys = torch.cat((key_value_states, 50 * torch.randn(1, 5, 16)), dim=1)
    output, focal = module(padded_hidden, padded_keys, _masks([4], 7), _masks([6], 11), output_focal=True)

    torch.testing.assert_close(output[:, :4], reference, rtol=1e-5, atol=1e-6)
    assert (output[:, 4:] == 0).all()
    centres = 6 if focal_reading == "as_written" else 4  # as written the keys carry the centres
    torch.testing.assert_close(focal.mu_tilde[:, :centres], reference_focal.mu_tilde)
    torch.testing.assert_close(focal.sigma_tilde[:, :centres], reference_focal.sigma_tilde)


def test_left_padding_uses_positions_of_valid_keys():
    module = _module(embed_dim=16, num_heads=4)
    hidden_states, key_value_states = torch.randn(1, 4, 16), torch.randn(1, 6, 16)
    reference, _ = module(hidden_states, key_value_states)
    left_padded = torch.cat((torch.randn(1, 2, 16), key_value_states), dim=1)
    key_mask = torch.tensor([[False, False] + [True] * 6])
    output, focal = module(hidden_states, left_padded, None, key_mask, output_focal=True)
    torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(focal.positions[0, 2:], torch.arange(6.0))


def test_sigma_floor_keeps_the_bias_finite_when_sigma_collapses():
    module = _module(embed_dim=16, num_heads=4, sigma_min=0.5)
    with torch.no_grad():
        module.w_p.weight.copy_(torch.eye(16))
        module.w_g.weight.zero_()
        module.u_d.fill_(-1e4)
    hidden_states = torch.ones(2, 3, 16)  # tanh(W_p x + W_g G) = tanh(1) everywhere: σ ≈ -1.2e5, sigmoid(σ) = 0
    output, focal = module(hidden_states, torch.randn(2, 5, 16), None, _masks([5, 2], 5), output_focal=True)
    torch.testing.assert_close(focal.sigma_tilde, torch.full((2, 3), 0.5))
    output.sum().backward()
    for name, parameter in module.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name
    assert torch.isfinite(output).all()


def test_without_focus_attention_equals_plain_multihead_attention():
    module = _module(embed_dim=16, num_heads=4, focus_attention=False)
    assert {name for name, _ in module.named_parameters()} == {
        f"{proj}.{kind}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj") for kind in ("weight", "bias")
    }
    reference = multihead_reference(module)
    hidden_states, key_value_states = torch.randn(3, 5, 16), torch.randn(3, 8, 16)
    query_lengths, key_mask = [5, 2, 4], _masks([8, 3, 6], 8)
    expected, _ = reference(hidden_states.transpose(0, 1), key_value_states.transpose(0, 1),
                            key_value_states.transpose(0, 1), key_padding_mask=~key_mask)
    expected = expected.transpose(0, 1)
    for attn_implementation in ("eager", "sdpa"):
        module.attn_implementation = attn_implementation
        output, focal = module(hidden_states, key_value_states, _masks(query_lengths, 5), key_mask, output_focal=True)
        assert focal is None
        for b, length in enumerate(query_lengths):
            torch.testing.assert_close(output[b, :length], expected[b, :length], rtol=1e-5, atol=1e-6)


def test_focus_attention_flag_changes_only_the_bias():
    with_focus = _module(embed_dim=16, num_heads=4)
    without = FocusAttention(_config(16, 4, focus_attention=False)).eval()
    missing, unexpected = without.load_state_dict(with_focus.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == sorted(FOCAL_PARAMS)
    hidden_states, key_value_states = torch.randn(2, 5, 16), torch.randn(2, 8, 16)
    key_mask = _masks([8, 3], 8)
    output, focal = with_focus(hidden_states, key_value_states, None, key_mask, output_focal=True)
    plain, _ = without(hidden_states, key_value_states, None, key_mask)
    # Re-derive the focus output by hand: the plain path with the focal bias added to its logits.
    q, k, v = (layer(states).view(2, -1, 4, 4).transpose(1, 2) for layer, states in (
        (without.q_proj, hidden_states), (without.k_proj, key_value_states), (without.v_proj, key_value_states)))
    bias = focal_bias(focal.mu_tilde, focal.sigma_tilde, focal.positions).masked_fill(~key_mask[:, None], -1e30)
    for attn_bias, result in ((torch.zeros_like(bias).masked_fill(~key_mask[:, None], -1e30), plain), (bias, output)):
        weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + attn_bias[:, None], dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(2, 5, 16)
        torch.testing.assert_close(result, without.out_proj(mixed), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(output, plain)


def test_focal_parameters_are_shared_by_all_heads_and_per_query():
    module = _module(embed_dim=16, num_heads=4)
    _, focal = module(torch.randn(2, 5, 16), torch.randn(2, 8, 16), output_focal=True)
    assert focal.mu_tilde.shape == focal.sigma_tilde.shape == (2, 5)
    assert ((focal.mu_tilde >= 0) & (focal.mu_tilde <= 8)).all()
    assert ((focal.sigma_tilde >= 1.0) & (focal.sigma_tilde <= 9.0)).all()
    assert focal.mu_tilde.std() > 0


def test_bad_configuration_and_inputs_are_refused():
    with pytest.raises(ValueError, match="attn_implementation='nope'"):
        FocusAttention(_config(16, 4, attn_implementation="nope"))
    with pytest.raises(ValueError, match="attn_implementation='nope'"):
        FocusAttention(_config(16, 4)).attn_implementation = "nope"
    with pytest.raises(ConfigError, match="multiple of model.num_heads"):
        FocusAttention(_config(10, 4))
    # sigma_min = 0 is eq. (4) as written (test_fidelity.py); a negative floor is refused.
    with pytest.raises(ConfigError, match="sigma_min"):
        FocusAttention(_config(16, 4, sigma_min=-0.5))
    module = FocusAttention(_config(16, 4))
    with pytest.raises(ValueError, match="key_attention_mask must be bool"):
        module(torch.randn(2, 5, 16), torch.randn(2, 8, 16), None, torch.ones(2, 8))
    assert set(ATTENTION_FUNCTIONS) == {"eager", "sdpa", "flex_attention"}


def test_flex_attention_refuses_cpu_tensors():
    module = FocusAttention(_config(16, 4, attn_implementation="flex_attention"))
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        module(torch.randn(2, 5, 16), torch.randn(2, 8, 16))


@pytest.mark.parametrize("focus_attention, focal_reading", VARIANTS)
def test_flex_score_mod_matches_eager_forward_on_cpu(focus_attention, focal_reading):
    """The flex backend's score_mod and head-dim padding, checked forward-only through uncompiled flex on CPU
    (the CUDA test below covers compiled values and gradients where a GPU exists)."""
    module = _module(embed_dim=40, num_heads=8, focus_attention=focus_attention, attn_implementation="eager",
                     focal_reading=focal_reading)
    hidden_states, key_value_states = torch.randn(3, 6, 40), torch.randn(3, 9, 40)
    key_mask = _masks([9, 0, 4], 9)
    query, key, value = (layer(states).view(3, -1, 8, 5).transpose(1, 2) for layer, states in (
        (module.q_proj, hidden_states), (module.k_proj, key_value_states), (module.v_proj, key_value_states)))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query_mask = _masks([6, 4, 5], 6)
        focal = (module.focal_parameters(hidden_states, key_value_states, query_mask, key_mask)
                 if focus_attention else None)
        expected = ATTENTION_FUNCTIONS["eager"](query, key, value, focal, key_mask, dropout=0.0, scale=5**-0.5)
        flex = _flex_focal_attention(query, key, value, focal, key_mask, scale=5**-0.5, compiled=False)
    torch.testing.assert_close(flex, expected, rtol=1e-5, atol=1e-6)
    assert (flex[1] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention runs (and has a backward) on CUDA only")
@pytest.mark.parametrize("focus_attention", [True, False])
def test_flex_attention_matches_eager_on_cuda(focus_attention):
    module = _module(embed_dim=40, num_heads=8, focus_attention=focus_attention).cuda()
    inputs = (torch.randn(3, 20, 40), torch.randn(3, 33, 40), _masks([20, 7, 12], 20), _masks([33, 0, 9], 33))
    inputs = tuple(t.cuda() for t in inputs)
    eager_output, eager_grads = _run(module, inputs, "eager")
    flex_output, flex_grads = _run(module, inputs, "flex_attention")
    torch.testing.assert_close(flex_output, eager_output, rtol=1e-4, atol=1e-5)
    for name in eager_grads:
        torch.testing.assert_close(flex_grads[name], eager_grads[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_bfloat16_runs_and_stays_close_to_float32(attn_implementation):
    module = _module(embed_dim=16, num_heads=4, attn_implementation=attn_implementation)
    hidden_states, key_value_states = torch.randn(2, 5, 16), torch.randn(2, 301, 16)
    masks = (_masks([5, 3], 5), _masks([301, 257], 301))
    expected, expected_focal = module(hidden_states, key_value_states, *masks, output_focal=True)
    module = module.to(torch.bfloat16)
    output, focal = module(hidden_states.bfloat16(), key_value_states.bfloat16(), *masks, output_focal=True)
    output.float().sum().backward()
    assert output.dtype == torch.bfloat16 and focal.positions.dtype == torch.float32
    assert focal.positions[0, 300] == 300 and focal.lengths.tolist() == [301.0, 257.0]
    torch.testing.assert_close(focal.mu_tilde, expected_focal.mu_tilde, rtol=0.05, atol=0.5)
    torch.testing.assert_close(output.float(), expected, rtol=0.05, atol=0.05)
