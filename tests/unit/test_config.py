"""Config: presets, YAML, dotted overrides and the errors a user sees."""

import pytest

from ser_platform.config import (
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    preset,
)


def test_presets_match_the_paper_where_it_speaks():
    paper = preset("paper")
    # §3.2: Adam lr 1e-5, batch 32, dropout 0.25; §2.1: roberta-large and wav2vec2-base.
    assert paper.train.lr == 1e-5
    assert paper.train.batch_size == 32
    assert paper.model.dropout == 0.25
    assert paper.model.text.name == "roberta-large"
    assert paper.model.speech.name == "facebook/wav2vec2-base"
    assert paper.model.speech.n_mfcc == 40
    assert (paper.model.speech.win_ms, paper.model.speech.hop_ms) == (40.0, 10.0)
    # Table 2's best weights are the default of both presets.
    for cfg in (paper, preset("demo")):
        assert (cfg.loss.alpha, cfg.loss.beta) == (0.5, 1.0)
        assert cfg.data.protocol == "loso5" and cfg.data.folds == (1, 2, 3, 4, 5)
    assert preset("demo").model.text.name == "tiny"


def test_round_trip_through_a_dict():
    cfg = preset("paper")
    assert from_dict(cfg.to_dict()) == cfg


def test_dotted_overrides_coerce_to_the_field_type():
    cfg = apply_overrides(preset("demo"), {"loss.alpha": "1", "model.focus_attention": "false",
                                           "data.folds": "1,3", "train.epochs": 2.0})
    assert cfg.loss.alpha == 1.0 and isinstance(cfg.loss.alpha, float)
    assert cfg.model.focus_attention is False
    assert cfg.data.folds == (1, 3)
    assert cfg.train.epochs == 2 and isinstance(cfg.train.epochs, int)
    # The original is untouched.
    assert preset("demo").loss.alpha == 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss.alpah": 1}, "unknown config key 'loss.alpah'"),
        ({"alpha": 1}, "did you mean 'loss.alpha'"),
        ({"loss.space": "both"}, "loss.space='both'"),
        ({"loss.alpha": -1}, "loss.alpha=-1.0"),
        ({"loss.alpha": 0, "loss.beta": 0}, "loss.alpha+loss.beta=0.0"),
        ({"train.epochs": 1.5}, "train.epochs=1.5"),
        ({"model.focus_attention": "maybe"}, "model.focus_attention='maybe'"),
        ({"model.embed_dim": 31}, "model.embed_dim=31"),
        ({"data.folds": "1,1"}, "data.folds=(1, 1)"),
        ({"model.attn_implementation": "flash"}, "model.attn_implementation='flash'"),
    ],
)
def test_bad_values_are_quoted_in_the_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        apply_overrides(preset("demo"), overrides)


def test_yaml_layers_over_the_preset_and_rejects_unknown_keys(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("preset: paper\nloss:\n  alpha: 1.0\n  space: speech\ntrain:\n  epochs: 3\n")
    cfg = load_config("demo", good, {"train.epochs": 4})
    assert cfg.preset == "paper" and cfg.model.text.name == "roberta-large"
    assert (cfg.loss.alpha, cfg.loss.space) == (1.0, "speech")
    assert cfg.train.epochs == 4  # overrides beat the YAML

    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  alfa: 1.0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*loss\.alfa"):
        load_config("demo", bad)


def test_flat_keys_are_the_override_keys():
    cfg = preset("demo")
    flat = cfg.flat()
    assert flat["loss.alpha"] == 0.5 and flat["model.text.name"] == "tiny"
    # Every flat key is accepted back as an override, unchanged.
    assert apply_overrides(cfg, flat) == cfg


def test_parse_override_reads_values_as_yaml():
    assert parse_override("loss.alpha=0.5") == ("loss.alpha", 0.5)
    assert parse_override("model.focus_attention=false") == ("model.focus_attention", False)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("loss.alpha")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset='large'"):
        preset("large")
    assert isinstance(Config(), Config)
