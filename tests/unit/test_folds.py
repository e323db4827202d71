"""Folds of every protocol: disjoint speaker sets, the test side never seen by training or validation, every
utterance tested exactly once, and the leakage guard catching crafted leaks in each input form it accepts."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from ser_platform import config
from ser_platform.data.folds import (
    PROTOCOLS,
    SPEAKERS,
    FoldLeakageError,
    FoldSpec,
    all_folds,
    assert_no_leakage,
    fold_spec,
    num_folds,
    split_rows,
)
from ser_platform.data.iemocap import parse_iemocap

ALL_SPECS = [spec for protocol in PROTOCOLS for spec in all_folds(protocol)]


def _session(speaker: str) -> int:
    return int(speaker[4])


def test_protocols_are_the_configs():
    assert PROTOCOLS == config.PROTOCOLS
    assert [num_folds(p) for p in PROTOCOLS] == [5, 10, 1]
    assert SPEAKERS == tuple(f"Ses0{s}{g}" for s in range(1, 6) for g in "FM")


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_splits_are_disjoint_and_cover_all_ten_speakers(spec: FoldSpec):
    parts = [spec.train_speakers, spec.val_speakers, spec.test_speakers]
    for a, b in itertools.combinations(parts, 2):
        assert not a & b
    assert frozenset().union(*parts) == frozenset(SPEAKERS)
    assert spec.val_speakers and spec.test_speakers and spec.train_speakers
    # Held-out sessions are held out whole: none of their speakers trains or validates.
    for speaker in spec.train_speakers | spec.val_speakers:
        assert _session(speaker) not in spec.test_sessions
    for speaker in SPEAKERS:
        assert spec.split_for(speaker) == ("test" if speaker in spec.test_speakers else
                                           "val" if speaker in spec.val_speakers else "train")


@pytest.mark.parametrize("fold", range(1, 6))
def test_loso5_tests_one_whole_session_and_validates_outside_it(fold):
    spec = fold_spec(fold, "loso5")
    assert spec.test_sessions == {fold}
    assert spec.test_speakers == {f"Ses0{fold}F", f"Ses0{fold}M"}
    assert len(spec.val_speakers) == 1 and len(spec.train_speakers) == 7
    assert all(_session(s) != fold for s in spec.val_speakers)


def test_loso5_validation_speakers_spread_over_sessions_and_genders():
    val = [next(iter(s.val_speakers)) for s in all_folds("loso5")]
    assert sorted(_session(s) for s in val) == [1, 2, 3, 4, 5]
    assert {s[-1] for s in val} == {"F", "M"}


def test_every_speaker_is_tested_exactly_once_per_protocol():
    for protocol in ("loso5", "loso10"):
        tested = collections.Counter(s for spec in all_folds(protocol) for s in spec.test_speakers)
        assert tested == {s: 1 for s in SPEAKERS}, protocol


@pytest.mark.parametrize("fold", range(1, 11))
def test_loso10_keeps_the_partner_in_training_and_validates_in_another_session(fold):
    spec = fold_spec(fold, "loso10")
    (test,) = spec.test_speakers
    (val,) = spec.val_speakers
    partner = f"Ses0{_session(test)}{'M' if test.endswith('F') else 'F'}"
    assert partner in spec.train_speakers  # documented: the session partner trains
    assert _session(val) != _session(test)
    assert spec.test_sessions == frozenset()


def test_session5_is_loso5_fold5():
    (spec,) = all_folds("session5")
    loso = fold_spec(5, "loso5")
    assert (spec.test_sessions, spec.test_speakers, spec.val_speakers, spec.train_speakers) == (
        loso.test_sessions, loso.test_speakers, loso.val_speakers, loso.train_speakers)
    assert {_session(s) for s in spec.train_speakers | spec.val_speakers} == {1, 2, 3, 4}


@pytest.mark.parametrize("fold, protocol, match", [
    (0, "loso5", "fold=0"), (6, "loso5", "fold=6"), (11, "loso10", "fold=11"), (2, "session5", "fold=2"),
    (1, "loso4", "protocol='loso4'"), ("1", "loso5", "fold='1'"),
])
def test_bad_fold_or_protocol_is_named(fold, protocol, match):
    with pytest.raises(ValueError, match=match):
        fold_spec(fold, protocol)


@pytest.fixture(scope="module")
def corpus_rows(synthetic_corpus):
    utterances = parse_iemocap(synthetic_corpus).utterances
    return [{"id": u.id, "session": u.session, "speaker": u.speaker} for u in utterances]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_split_rows_covers_the_corpus_and_passes_the_guard(corpus_rows, protocol):
    tested = collections.Counter()
    for spec in all_folds(protocol):
        splits = split_rows(spec, corpus_rows)
        assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(range(len(corpus_rows)))
        assert splits["val"] and splits["test"] and splits["train"]
        for split, indices in splits.items():
            speakers = {corpus_rows[i]["speaker"] for i in indices}
            assert speakers == getattr(spec, f"{split}_speakers")  # every speaker of the corpus speaks
        if protocol != "loso10":
            assert {corpus_rows[i]["session"] for i in splits["test"]} == spec.test_sessions
        tested.update(corpus_rows[i]["id"] for i in splits["test"])
    if protocol != "session5":
        assert tested == {row["id"]: 1 for row in corpus_rows}  # every utterance tested exactly once


# --- the guard ---------------------------------------------------------------------------------------------

def _rows(*triples):
    return [{"id": i, "session": s, "speaker": sp} for i, s, sp in triples]


TRAIN = _rows(("Ses02F_impro01_F000", 2, "Ses02F"), ("Ses02F_impro01_M000", 2, "Ses02M"))
TEST = _rows(("Ses01F_impro01_F000", 1, "Ses01F"), ("Ses01F_impro01_M000", 1, "Ses01M"))


def test_guard_accepts_a_clean_split_in_every_input_form():
    spec = fold_spec(1, "loso5")
    assert_no_leakage(TRAIN, TEST, spec)
    as_columns = {key: np.array([row[key] for row in TRAIN]) for key in ("id", "session", "speaker")}  # Ray batch
    assert_no_leakage(as_columns, TEST, spec)
    pandas = pytest.importorskip("pandas")
    assert_no_leakage(pandas.DataFrame(TRAIN), pandas.DataFrame(TEST), spec)


def test_guard_raises_on_a_test_speaker_in_training():
    leaked = TRAIN + _rows(("Ses01F_script01_M003", 1, "Ses01M"))
    with pytest.raises(FoldLeakageError, match=r"Ses01M.*Ses01F_script01_M003"):
        assert_no_leakage(leaked, TEST)
    pandas = pytest.importorskip("pandas")
    with pytest.raises(FoldLeakageError, match="Ses01M"):
        assert_no_leakage(pandas.DataFrame(leaked), pandas.DataFrame(TEST))


def test_guard_raises_on_a_shared_utterance_id():
    with pytest.raises(FoldLeakageError, match="Ses01F_impro01_F000"):
        assert_no_leakage(TRAIN + [dict(TEST[0], speaker="Ses02F")], TEST)


def test_guard_with_spec_raises_on_held_out_session_and_test_speaker_absent_from_test_rows():
    spec = fold_spec(1, "loso5")
    # Only Ses01F is in the test rows, but the spec holds out Ses01M too: training on Ses01M still leaks.
    with pytest.raises(FoldLeakageError, match="loso5/fold1.*Ses01M"):
        assert_no_leakage(TRAIN + _rows(("Ses01F_impro02_M001", 1, "Ses01M")), TEST[:1], spec)
    # A row whose session column says 1 is a held-out-session leak whatever speaker it names.
    with pytest.raises(FoldLeakageError, match=r"held-out session\(s\) \[1\]"):
        assert_no_leakage(TRAIN + _rows(("Ses01F_impro02_X", 1, "Ses03F")), TEST, spec)
    # Test rows from a speaker the fold does not test.
    with pytest.raises(FoldLeakageError, match="Ses02F"):
        assert_no_leakage(TRAIN[1:], TEST + TRAIN[:1], spec)


def test_guard_without_session_column_derives_it_from_the_speaker():
    spec = fold_spec(1, "loso5")
    no_session = [{"id": r["id"], "speaker": r["speaker"]} for r in TRAIN]
    assert_no_leakage(no_session, TEST, spec)
    with pytest.raises(ValueError, match="not an IEMOCAP speaker"):
        assert_no_leakage([{"id": "x", "speaker": "Bob"}], TEST, spec)
