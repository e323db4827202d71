"""Frozen-encoder cache (``ser cache``, ``data.encoder_cache``): layout, metadata, equivalence, staleness.

Truths:
* equivalence: the same frozen tiny encoders run in the loop (``SERModel`` with encoders built) — the cached path
  must give the same logits, in eval mode, to ``LOGIT_ATOL`` (float32; measured here: ~1e-8, the states only
  differ by how matmuls are blocked for another batch shape). Through ``train.fit_folds`` (plain loop) and
  through Ray Train (``train_folds``, in tests/integration/test_encoder_cache_ray.py): the same fold results.
* staleness: each thing the cache depends on changed in turn (model name, revision, layer, dataset
  fingerprint, missing ids, max lengths) must stop the run with an error that names it.
* atomicity: a build that fails midway leaves no entry and no partial folder, and keeps the old entry.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ser_platform.cli import main
from ser_platform.config import ConfigError, load_config
from ser_platform.data.encoder_cache import (
    CachedStatesCollate,
    EncoderKey,
    EncoderStates,
    EntryRequest,
    EntryWriter,
    StaleCacheError,
    check_entry,
    read_entry_metadata,
    safe_name,
)
from ser_platform.data.errors import DataError
from ser_platform.data.features import AcousticFeatures
from ser_platform.data.loader import LocalFolds, make_collate, read_rows
from ser_platform.data.parquet import prepare_dataset
from ser_platform.data.synthetic import write_synthetic_corpus
from ser_platform.frozen_encoders import build_encoder_cache, cached_collate, entry_requests, open_encoder_cache
from ser_platform.losses import JointLoss
from ser_platform.models.ser_model import SERModel
from ser_platform.models.speech import SSLSpeechEncoder
from ser_platform.models.text import build_tokenizer
from ser_platform.train import fit_folds, model_inputs

from support import CACHE_TINY as TINY

LOGIT_ATOL = 1e-5


def tiny_config(**overrides):
    return load_config("demo", overrides={**TINY, **overrides})


@pytest.fixture(scope="module")
def dataset(training_dataset, tmp_path_factory) -> str:
    """A copy of the shared training dataset: these tests write caches beside it."""
    return shutil.copytree(training_dataset, tmp_path_factory.mktemp("cache") / "parquet").as_posix()


@pytest.fixture(scope="module")
def built(dataset):
    """The cache of the tiny config's encoders (layers -1 and 0) beside ``dataset``, built once."""
    report = build_encoder_cache(tiny_config(), dataset, layers={"text": (-1, 0), "speech": (-1, 0)}, batch_size=8,
                                 progress=False, log=None)
    return report


def rows_of(dataset: str) -> dict[str, np.ndarray]:
    return read_rows(dataset, ["id", "speaker", "label", "mode", "transcript", "audio", "duration"])


def collate_for(config):
    return make_collate(build_tokenizer(config.model.text), max_text_tokens=config.data.max_text_tokens,
                        max_audio_samples=int(config.data.max_audio_seconds * config.data.sample_rate))


# --- layout and metadata -----------------------------------------------------------------------------------

def test_entries_sit_beside_the_dataset_keyed_by_name_revision_and_layer(dataset, built):
    root = Path(dataset + ".cache")
    paths = sorted(Path(e["path"]).relative_to(root).as_posix() for e in built)
    assert [p.split("/")[0] for p in paths] == ["speech", "speech", "text", "text"]
    for path in paths:
        modality, folder, layer = path.split("/")
        assert folder.startswith("tiny@tiny-") and layer in ("layer=-1", "layer=0")
    meta = read_entry_metadata(root / next(p for p in paths if p.startswith("text/") and p.endswith("=-1")))
    assert meta["name"] == "tiny" and meta["layer"] == -1 and meta["rows"] == 40 and meta["hidden_size"] == 16
    assert meta["settings"]["max_text_tokens"] == 64 and len(meta["settings"]["tokenizer"].split()[1]) == 12
    request = entry_requests(tiny_config(), dataset)["text"][0]
    assert meta["dataset_fingerprint"] == request.dataset_fingerprint and meta["revision"] == request.key.revision
    speech = read_entry_metadata(root / next(p for p in paths if p.startswith("speech/") and p.endswith("=-1")))
    assert speech["settings"]["max_audio_samples"] == 16000 and speech["settings"]["sample_rate"] == 16000
    assert not list(root.rglob(".*partial*"))


def test_an_up_to_date_cache_is_not_recomputed(dataset, built):
    again = build_encoder_cache(tiny_config(), dataset, layers={"text": (-1, 0), "speech": (-1, 0)}, progress=False,
                                log=None)
    assert sorted(e["path"] for e in again) == sorted(e["path"] for e in built)
    assert {e["status"] for e in again} == {"up to date"}


def test_safe_name_keeps_hub_names_readable():
    assert safe_name("facebook/wav2vec2-base") == "facebook--wav2vec2-base"
    assert safe_name("/models/my roberta/") == "models--my_roberta"
    assert EncoderKey("text", "roberta-large", "abc123", 12).relative_path == "text/roberta-large@abc123/layer=12"


# --- equivalence -------------------------------------------------------------------------------------------

def test_cached_states_give_the_logits_of_running_the_frozen_encoders(dataset, built):
    config = tiny_config()
    cached_config = config.replace({"data.encoder_cache": "auto"})
    torch.manual_seed(11)
    running = SERModel(config.model).eval()
    torch.manual_seed(11)
    cached = SERModel(cached_config.model, cached_encoder_states=True).eval()
    assert cached.text_encoder.encoder is None and cached.speech_encoder.ssl.encoder is None
    # The same seed gives the same trainable weights: a frozen tiny encoder draws from its own seed.
    running_state = running.state_dict()
    for name, value in cached.state_dict().items():
        assert torch.equal(value, running_state[name]), name

    rows = rows_of(dataset)
    collate = cached_collate(collate_for(config), open_encoder_cache(cached_config, dataset))
    features = AcousticFeatures()
    order = np.random.default_rng(0).permutation(len(rows["id"]))  # other batches, other padding than the cache's
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(order), 6):
            batch = collate({k: v[order[start:start + 6]] for k, v in rows.items()})
            inputs = model_inputs(batch, features)
            direct = running(**{k: v for k, v in inputs.items() if k not in ("text_states", "speech_ssl_states")})
            served = cached(**{**inputs, "input_values": None, "input_ids": None})
            worst = max(worst, float((direct.logits - served.logits).abs().max()))
            assert torch.allclose(direct.embedding, served.embedding, atol=LOGIT_ATOL)
            # The cached states are the encoders' own, padded the same way.
            text_states, _ = running.text_encoder(batch["input_ids"], batch["attention_mask"])
            torch.testing.assert_close(batch["text_states"], text_states, atol=1e-5, rtol=1e-5)
    assert worst <= LOGIT_ATOL, worst


def test_a_hidden_layer_is_served_as_the_encoder_computes_it(dataset, built):
    config = tiny_config(**{"model.text.layer": 0, "model.speech.layer": 0})
    entries = open_encoder_cache(config.replace({"data.encoder_cache": "auto"}), dataset)
    assert all(path.endswith("layer=0") for path in entries.values())
    rows = rows_of(dataset)
    batch = cached_collate(collate_for(config), entries)({k: v[:8] for k, v in rows.items()})
    ssl = SSLSpeechEncoder(config.model.speech, frozen=True)
    with torch.no_grad():
        states, mask = ssl(batch["input_values"], batch["audio_lengths"])
        (last,), _ = ssl.layer_states(batch["input_values"], batch["audio_lengths"], [-1])
    torch.testing.assert_close(batch["speech_ssl_states"][:, :states.shape[1]], states, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(states, last)  # layer 0 really is another layer than the output


def test_a_training_step_on_the_cache_equals_one_on_the_frozen_encoders(dataset, built):
    """What is deterministic in training on the cache: the same batch, the same initial weights give the same
    joint loss and the same gradient for every trained weight. (Over epochs the 1e-8 float differences between
    the cache's batching and the loop's grow: on an Intel Xeon here two epochs moved losses by up to 6e-3
    relative, so epochs are compared for what they are, not for equal floats: next test.)"""
    config = tiny_config()
    cached_config = config.replace({"data.encoder_cache": "auto"})
    rows = {k: v[:8] for k, v in rows_of(dataset).items()}
    batch = cached_collate(collate_for(config), open_encoder_cache(cached_config, dataset))(rows)
    inputs = model_inputs(batch, AcousticFeatures())
    running_inputs = {k: v for k, v in inputs.items() if k not in ("text_states", "speech_ssl_states")}
    served_inputs = {**inputs, "input_values": None, "input_ids": None}  # the encoders' states come cached
    steps = {}
    for name, model_config, cached, model_in in (("running", config, False, running_inputs),
                                                 ("served", cached_config, True, served_inputs)):
        torch.manual_seed(5)
        model = SERModel(model_config.model, cached_encoder_states=cached).train()
        torch.manual_seed(6)  # the same dropout masks in both
        losses = JointLoss(config.loss)(model(**model_in), batch["labels"])
        losses.loss.backward()
        steps[name] = (losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (running, running_grads), (served, served_grads) = steps["running"], steps["served"]
    torch.testing.assert_close(served.loss, running.loss, rtol=1e-5, atol=1e-6)
    assert set(served_grads) == {n for n in running_grads if not n.startswith(("text_encoder.encoder.",
                                                                                "speech_encoder.ssl.encoder."))}
    for name, grad in served_grads.items():
        torch.testing.assert_close(grad, running_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_training_on_the_cache_runs_the_same_epochs_and_scores_the_same_utterances(dataset, built):
    config = tiny_config(**{"train.epochs": 2})
    cached_config = config.replace({"data.encoder_cache": "auto"})
    running = fit_folds(config, [1], LocalFolds(dataset, config, collate_for(config)), log=None)[1]
    collate = cached_collate(collate_for(config), open_encoder_cache(cached_config, dataset))
    served = fit_folds(cached_config, [1], LocalFolds(dataset, config, collate), log=None)[1]
    assert (served.epochs_run, served.num_test) == (running.epochs_run, running.num_test) == (2, served.num_test)
    assert [h["train_samples"] for h in served.history] == [h["train_samples"] for h in running.history]
    # The first epoch starts from the same weights on the same batches: its training loss agrees to float drift.
    assert served.history[0]["train_loss"] == pytest.approx(running.history[0]["train_loss"], rel=1e-3)


def test_the_cached_model_refuses_a_batch_without_states(dataset, built):
    config = tiny_config(**{"data.encoder_cache": "auto"})
    model = SERModel(config.model, cached_encoder_states=True).eval()
    batch = collate_for(config)({k: v[:4] for k, v in rows_of(dataset).items()})
    with pytest.raises(ValueError, match="encoder cache"):
        model(**model_inputs(batch, AcousticFeatures()))


def test_cached_frame_lengths_follow_the_conv_stack_formula():
    config = tiny_config(**{"data.encoder_cache": "auto"})
    lengths = torch.tensor([320, 400, 401, 7999, 16000, 72000])
    built = SSLSpeechEncoder(config.model.speech, frozen=True)
    served = SSLSpeechEncoder(config.model.speech, frozen=True, cached=True)
    assert torch.equal(served.frame_lengths(lengths), built.frame_lengths(lengths))
    base = config.replace({"model.speech.name": "facebook/wav2vec2-base"}).model.speech
    with torch.device("meta"):
        built = SSLSpeechEncoder(base, frozen=True, pretrained=False)
    served = SSLSpeechEncoder(base, frozen=True, pretrained=False, cached=True)
    assert torch.equal(served.frame_lengths(lengths), built.encoder._get_feat_extract_output_lengths(lengths))


def test_a_cache_needs_frozen_encoders():
    with pytest.raises(ConfigError, match="model.encoders=frozen"):
        load_config("demo", overrides={"data.encoder_cache": "auto"})


# --- stale or mismatched caches ----------------------------------------------------------------------------

def open_with(dataset, **overrides):
    return open_encoder_cache(tiny_config(**{"data.encoder_cache": "auto", **overrides}), dataset)


def test_another_revision_is_named(dataset, built):
    # Another seed for the frozen tiny text encoder = other weights = another revision.
    with pytest.raises(StaleCacheError, match=r"no text states for tiny@tiny-\w+ layer -1; the cache holds: .*"
                                              r"revision 'tiny-\w+' instead of 'tiny-\w+'"):
        open_with(dataset, **{"model.text.tiny_seed": 1})
    with pytest.raises(StaleCacheError, match="revision"):
        open_with(dataset, **{"model.speech.tiny_hidden_size": 8, "model.speech.tiny_num_heads": 2})


def test_another_layer_is_named(dataset, built):
    with pytest.raises(StaleCacheError, match=r"no speech states for tiny@\S+ layer 1; .*layer -1 instead of 1.*"
                                              r"layer 0 instead of 1"):
        open_with(dataset, **{"model.speech.layer": 1})


def test_another_model_name_is_named(tmp_path):
    root = tmp_path / "ds.cache"
    key = EncoderKey("text", "org/encoder", "abc", -1)
    with EntryWriter(root, key) as writer:
        writer.add("u1", np.zeros((3, 4), np.float32), 3)
        writer.commit({"dataset_fingerprint": "f", "settings": {"max_text_tokens": 8}})
    wanted = EntryRequest(EncoderKey("text", "org/other", "abc", -1), "f", {"max_text_tokens": 8})
    with pytest.raises(StaleCacheError, match=r"name 'org/encoder' instead of 'org/other'"):
        check_entry(root, wanted)
    # Two names that share a folder ("org/encoder" and "org--encoder") are told apart by the stored name.
    clash = EntryRequest(EncoderKey("text", "org--encoder", "abc", -1), "f", {"max_text_tokens": 8})
    with pytest.raises(StaleCacheError, match=r"name: cache 'org/encoder', wanted 'org--encoder'"):
        check_entry(root, clash)
    assert check_entry(root, EntryRequest(key, "f", {"max_text_tokens": 8}))[1]["rows"] == 1


def test_another_dataset_is_named(dataset, built, tmp_path):
    corpus = write_synthetic_corpus(tmp_path / "IEMOCAP_full_release", utterances_per_session=8, seed=2)
    other = prepare_dataset(corpus, tmp_path / "parquet")["dataset"]
    with pytest.raises(StaleCacheError, match=r"stale encoder cache.*dataset_fingerprint: cache '\w+', wanted '\w+'"):
        open_encoder_cache(tiny_config(**{"data.encoder_cache": dataset + ".cache"}), other)


@pytest.mark.parametrize("override, named", [
    ({"data.max_text_tokens": 16}, r"max_text_tokens: cache 64, wanted 16"),
    ({"data.max_audio_seconds": 0.5}, r"max_audio_samples: cache 16000, wanted 8000"),
])
def test_other_max_lengths_are_named(dataset, built, override, named):
    with pytest.raises(StaleCacheError, match=named):
        open_with(dataset, **override)


def test_missing_ids_are_named(dataset, built, tmp_path):
    root = tmp_path / "copy.cache"
    shutil.copytree(dataset + ".cache", root)
    entry = open_with(dataset)["text"].replace(dataset + ".cache", str(root))
    part = sorted(Path(entry).glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    dropped = table.column("id").to_pylist()[:2]
    pq.write_table(table.slice(2), part)  # the metadata still says "complete": only the ids can tell
    with pytest.raises(StaleCacheError, match=r"lacks 2 of the dataset's 40 ids \(first: \["):
        open_with(dataset, **{"data.encoder_cache": str(root)})
    # And in a batch: the collate names the row.
    states = EncoderStates.load(entry)
    missing = dropped[0]
    assert missing not in states.ids
    rows = rows_of(dataset)
    index = np.flatnonzero(rows["id"] == missing)
    with pytest.raises(DataError, match=rf"row {missing}: not in the encoder cache"):
        CachedStatesCollate(collate_for(tiny_config()), text=states)({k: v[index] for k, v in rows.items()})


def test_a_collate_with_other_cropping_is_stopped_per_row(dataset, built):
    entries = open_with(dataset)
    rows = rows_of(dataset)
    config = tiny_config(**{"data.max_text_tokens": 8, "data.max_audio_seconds": 0.25})
    collate = cached_collate(collate_for(config), {"text": entries["text"]})
    with pytest.raises(DataError, match=r"row \S+: the encoder cache .* holds \d+ token states but the tokenizer "
                                        r"gives 8 tokens"):
        collate({k: v[:4] for k, v in rows.items()})
    collate = cached_collate(collate_for(config), {"speech": entries["speech"]})
    with pytest.raises(DataError, match=r"row \S+: the encoder cache .* was computed from \d+ audio samples, the "
                                        r"batch holds 4000"):
        collate({k: v[:4] for k, v in rows.items()})


def test_a_cache_is_never_half_written(dataset, built, monkeypatch):
    config = tiny_config()
    before = {e["path"]: read_entry_metadata(e["path"])["created"] for e in built}
    calls = {"n": 0}
    original = EntryWriter.add

    def failing_add(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 30:
            raise RuntimeError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EntryWriter, "add", failing_add)
    with pytest.raises(RuntimeError, match="disk full"):
        build_encoder_cache(config, dataset, force=True, batch_size=8, progress=False, log=None)
    root = Path(dataset + ".cache")
    assert not [p for p in root.rglob("*") if "partial" in p.name]
    assert {p: read_entry_metadata(p)["created"] for p in before} == before  # old entries untouched
    # A fresh root: nothing at all is left behind.
    calls["n"] = 0
    fresh = Path(dataset).parent / "fresh.cache"
    with pytest.raises(RuntimeError, match="disk full"):
        build_encoder_cache(config, dataset, root=str(fresh), batch_size=8, progress=False, log=None)
    assert not [p for p in fresh.rglob("*") if p.is_file()]


# --- the command line -------------------------------------------------------------------------------------

def test_ser_cache_command_writes_the_entries(dataset, tmp_path, capsys):
    out = tmp_path / "cli.cache"
    sets = [arg for k, v in TINY.items() if k.startswith(("model.", "data.")) for arg in ("--set", f"{k}={v}")]
    code = main(["cache", "--dataset", dataset, "--text-encoder", "tiny", "--speech-encoder", "tiny", "--layers=-1,1",
                 "--batch-size", "4", "--device", "cpu", "--out", str(out), *sets])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("written:") == 4 and "data.encoder_cache=" in printed
    assert sorted(p.name for p in out.glob("*/*/layer=*")) == ["layer=-1", "layer=-1", "layer=1", "layer=1"]
    assert main(["cache", "--dataset", dataset, "--layers", "x"]) == 2
    assert "--layers='x'" in capsys.readouterr().err


