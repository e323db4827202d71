"""Config: presets, YAML, dotted overrides and the errors a user sees."""

import re

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
        # Issue 15: values once accepted without a word, or that crashed later.
        ({"train.lr": float("inf")}, "train.lr=inf: expected a finite number"),
        ({"train.lr": "nan"}, "train.lr=nan: expected a finite number"),
        ({"train.weight_decay": -1}, "train.weight_decay=-1.0: expected >= 0"),
        ({"train.grad_clip": -5}, "train.grad_clip=-5.0: expected >= 0 (0 turns clipping off)"),
        ({"train.gpus_per_worker": -1}, "train.gpus_per_worker=-1.0: expected >= 0"),
        ({"train.epochs": True}, "train.epochs=True: expected an integer"),
        ({"model.focus_attention": 2}, "model.focus_attention=2: expected true or false"),
        ({"model.num_heads": 0}, "model.num_heads=0: expected >= 1"),
        ({"model.embed_dim": 30, "model.num_heads": 4}, "model.embed_dim=30: expected a positive multiple of "
                                                        "model.num_heads=4"),
        ({"model.text.tiny_num_heads": 3}, "model.text.tiny_hidden_size=32: expected a positive multiple of "
                                           "model.text.tiny_num_heads=3"),
        ({"model.speech.n_mfcc": 80}, "model.speech.n_mfcc=80: expected <= model.speech.n_mels=40"),
        ({"model.speech.tiny_dropout": 1.0}, "model.speech.tiny_dropout=1.0: expected in [0, 1)"),
        ({"model.text.tiny_dropout": -0.1}, "model.text.tiny_dropout=-0.1: expected in [0, 1)"),
        ({"train.seed": -1}, "train.seed=-1: expected >= 0"),
        ({"tracking.experiment": " "}, "tracking.experiment=' ': expected an experiment name"),
        ({"data.folds": None}, "data.folds=None: expected integers"),
        ({"model.text.name": False}, "model.text.name=False: expected a string"),
    ],
)
def test_bad_values_are_quoted_in_the_error(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(preset("demo"), overrides)


def test_yaml_layers_over_the_preset_and_rejects_unknown_keys(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("preset: paper\nloss:\n  alpha: 1.0\n  space: speech\ntrain:\n  epochs: 3\n")
    cfg = load_config("paper", good, {"train.epochs": 4})
    assert cfg.preset == "paper" and cfg.model.text.name == "roberta-large"
    assert (cfg.loss.alpha, cfg.loss.space) == (1.0, "speech")
    assert cfg.train.epochs == 4  # overrides beat the YAML

    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  alfa: 1.0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*loss\.alfa"):
        load_config("demo", bad)


def test_the_preset_is_chosen_by_preset_alone(tmp_path):
    # A YAML (e.g. a run's resolved config.yaml) may repeat the preset, not switch it; nor may an override.
    saved = tmp_path / "config.yaml"
    saved.write_text("preset: paper\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: preset='paper': presets are chosen only by --preset "
                                          r"\(this command's is 'demo'\); pass --preset paper"):
        load_config("demo", saved)
    with pytest.raises(ConfigError, match="preset='paper': presets are chosen only by --preset"):
        apply_overrides(preset("demo"), {"preset": "paper"})
    assert apply_overrides(preset("demo"), {"preset": "demo"}) == preset("demo")
    assert load_config("paper", saved).train.epochs == 3


def test_a_key_given_twice_in_yaml_is_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 30\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: .*line 4: key 'epochs' given twice \(first at line 2\)"):
        load_config("demo", twice)
    # The same key in two different mappings is fine.
    twice.write_text("train:\n  seed: 3\nsweep:\n  seed: 4\n")
    assert (load_config("demo", twice).train.seed, load_config("demo", twice).sweep.seed) == (3, 4)


def test_a_single_fold_and_folds_within_the_protocol(tmp_path):
    assert apply_overrides(preset("demo"), dict([parse_override("data.folds=3")])).data.folds == (3,)
    single = tmp_path / "single.yaml"
    single.write_text("data:\n  folds: 3\n")
    assert load_config("demo", single).data.folds == (3,)
    assert apply_overrides(preset("demo"), {"data.protocol": "loso10", "data.folds": "7,10"}).data.folds == (7, 10)
    with pytest.raises(ConfigError, match=r"data\.folds=\(1, 7\): expected fold numbers in 1\.\.5 \(protocol "
                                          r"'loso5' has 5 folds\)"):
        apply_overrides(preset("demo"), {"data.folds": "1,7"})
    with pytest.raises(ConfigError, match=r"protocol 'session5' has 1 fold\)"):
        apply_overrides(preset("demo"), {"data.protocol": "session5"})  # the default folds 1..5: set data.folds=1
    assert apply_overrides(preset("demo"), {"data.protocol": "session5", "data.folds": 1}).data.folds == (1,)


def test_types_are_strict_when_built_in_code_too():
    from ser_platform.config import ModelConfig, TrainConfig

    with pytest.raises(ConfigError, match="train.epochs=True: expected an integer"):
        TrainConfig(epochs=True)
    with pytest.raises(ConfigError, match="model.focus_attention=2: expected true or false"):
        ModelConfig(focus_attention=2)
    with pytest.raises(ConfigError, match="train.lr=nan: expected a finite number"):
        TrainConfig(lr=float("nan"))
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)  # an int is a fine float


def test_string_fields_keep_the_text_as_written():
    assert parse_override("tracking.experiment=1.10") == ("tracking.experiment", "1.10")
    assert parse_override("model.text.name=") == ("model.text.name", "")
    with pytest.raises(ConfigError, match=r"model\.text\.name='': expected a checkpoint name"):
        apply_overrides(preset("demo"), dict([parse_override("model.text.name=")]))
    with pytest.raises(ConfigError, match=r"loss\.alpha='\[1': not a value"):
        parse_override("loss.alpha=[1")


def test_reported_metrics_are_those_the_sweep_reports():
    from ser_platform.tracking import schema
    from ser_platform.config import REPORTED_METRICS

    assert schema.SUMMARY_METRICS is REPORTED_METRICS  # what a trial logs is what the config accepts
    with pytest.raises(ConfigError, match="sweep.metric='bogus': expected one of"):
        apply_overrides(preset("demo"), {"sweep.metric": "bogus"})


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
