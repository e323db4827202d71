"""Scripted-text overlap: a hand-built corpus whose answer is counted by hand, the normalisation rules, the
synthetic corpus against a per-session brute force, and the summary that `ser prepare` stores and prints."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ser_platform.data.iemocap import Utterance, parse_iemocap
from ser_platform.data.overlap import normalise_transcript, overlapping_ids, transcript_overlap
from ser_platform.data.parquet import format_summary, prepare_dataset, read_summary

# loso5 fold 1 tests Ses01F/Ses01M, validates on Ses02F and trains on the other seven speakers.
HAND_ROWS = [
    # id, speaker, mode, transcript
    ("Ses01F_script01_1_F000", "Ses01F", "scripted", "Hello there."),  # = Ses02M's line (train)
    ("Ses01M_script01_1_M000", "Ses01M", "scripted", "I'm fine [LAUGHTER]"),  # = Ses02F's line (validation)
    ("Ses01F_script01_1_F001", "Ses01F", "scripted", "Unique line."),  # nowhere else
    ("Ses01M_impro01_M000", "Ses01M", "improvised", "hello   THERE"),  # = Ses02M's line
    ("Ses01F_impro01_F000", "Ses01F", "improvised", "[BREATHING]"),  # empty; Ses03F is empty too: no match
    ("Ses01M_impro01_M001", "Ses01M", "improvised", "Only here."),  # only its session partner says it
    ("Ses01F_impro01_F001", "Ses01F", "improvised", "only here"),
    ("Ses02M_script01_2_M000", "Ses02M", "scripted", "hello, there!"),
    ("Ses02F_script01_2_F000", "Ses02F", "scripted", "Im fine"),
    ("Ses03F_impro02_F000", "Ses03F", "improvised", "[LAUGHTER]"),
    ("Ses04M_script02_1_M000", "Ses04M", "scripted", "Unique lines."),
]  # fmt: skip


def _dicts(with_session: bool = True) -> list[dict]:
    rows = []
    for utterance_id, speaker, mode, transcript in HAND_ROWS:
        row = {"id": utterance_id, "speaker": speaker, "mode": mode, "transcript": transcript}
        if with_session:
            row["session"] = int(speaker[4])
        rows.append(row)
    return rows


def _utterances() -> list[Utterance]:
    return [Utterance(id=r["id"], session=r["session"], speaker=r["speaker"], gender=r["speaker"][-1],
                      mode=r["mode"], label="neutral", raw_label="neu", transcript=r["transcript"],
                      wav_path=f"/nowhere/{r['id']}.wav", duration=1.0) for r in _dicts()]


# Counted by hand from the comments above.
HAND_FOLDS = {
    "1": dict(test_utterances=7, overlapping=3, overlap_share=3 / 7, scripted_test_utterances=3,
              overlapping_scripted=2, scripted_overlap_share=2 / 3, improvised_test_utterances=4,
              overlapping_improvised=1, improvised_overlap_share=1 / 4, empty_test_transcripts=1),
    # Ses02's two lines occur in Ses01 (training side of fold 2: Ses03M validates).
    "2": dict(test_utterances=2, overlapping=2, overlap_share=1.0, scripted_test_utterances=2,
              overlapping_scripted=2, scripted_overlap_share=1.0, improvised_test_utterances=0,
              overlapping_improvised=0, improvised_overlap_share=None, empty_test_transcripts=0),
    "3": dict(test_utterances=1, overlapping=0, overlap_share=0.0, scripted_test_utterances=0,
              overlapping_scripted=0, scripted_overlap_share=None, improvised_test_utterances=1,
              overlapping_improvised=0, improvised_overlap_share=0.0, empty_test_transcripts=1),
    "4": dict(test_utterances=1, overlapping=0, overlap_share=0.0, scripted_test_utterances=1,
              overlapping_scripted=0, scripted_overlap_share=0.0, improvised_test_utterances=0,
              overlapping_improvised=0, improvised_overlap_share=None, empty_test_transcripts=0),
    "5": dict(test_utterances=0, overlapping=0, overlap_share=None, scripted_test_utterances=0,
              overlapping_scripted=0, scripted_overlap_share=None, improvised_test_utterances=0,
              overlapping_improvised=0, improvised_overlap_share=None, empty_test_transcripts=0),
}  # fmt: skip
HAND_MEAN = {
    "overlap_share": (3 / 7 + 1 + 0 + 0) / 4,  # fold 5 has no test utterance: left out
    "scripted_overlap_share": (2 / 3 + 1 + 0) / 3,
    "improvised_overlap_share": (1 / 4 + 0) / 2,
}


def _assert_matches(result: dict, folds: dict, mean: dict) -> None:
    assert list(result["folds"]) == list(folds)
    for fold, expected in folds.items():
        got = result["folds"][fold]
        assert set(got) == set(expected), fold
        for key, value in expected.items():
            assert got[key] == (None if value is None else pytest.approx(value)), (fold, key)
    assert result["mean"] == pytest.approx(mean)


@pytest.mark.parametrize("form", ["dicts", "dicts without session", "table", "columns", "utterances"])
def test_hand_built_corpus(form):
    rows = {
        "dicts": lambda: _dicts(),
        "dicts without session": lambda: _dicts(with_session=False),
        "table": lambda: pa.Table.from_pylist(_dicts()),
        "columns": lambda: pa.Table.from_pylist(_dicts()).to_pydict(),
        "utterances": _utterances,
    }[form]()
    result = transcript_overlap(rows)
    assert result["protocol"] == "loso5"
    _assert_matches(result, HAND_FOLDS, HAND_MEAN)
    assert overlapping_ids(rows, 1) == ["Ses01F_script01_1_F000", "Ses01M_script01_1_M000", "Ses01M_impro01_M000"]


def test_loso10_counts_the_session_partner_as_training():
    # loso10 fold 1 tests Ses01F alone; Ses01M trains (Ses02M validates), so "Only here." now overlaps.
    fold = transcript_overlap(_dicts(), protocol="loso10")["folds"]["1"]
    assert (fold["test_utterances"], fold["overlapping"]) == (4, 2)
    assert (fold["overlapping_scripted"], fold["scripted_test_utterances"]) == (1, 2)
    assert (fold["overlapping_improvised"], fold["improvised_test_utterances"]) == (1, 2)
    assert overlapping_ids(_dicts(), 1, "loso10") == ["Ses01F_script01_1_F000", "Ses01F_impro01_F001"]


@pytest.mark.parametrize("text, expected", [
    ("Oh, [LAUGHTER] don't!", "oh dont"),
    ("  Hello\tthere...  \n", "hello there"),
    ("[BREATHING]", ""),
    ("[LAUGHTER] [GARBAGE]", ""),
    ("Well--I mean, it's... [BREATHING] fine?", "well i mean its fine"),
    ("I\u2019m here", "im here"),  # a curly apostrophe like a straight one
    ("OK? [LIPSMACK]Yes.", "ok yes"),
    ("at 2 o'clock; snake_case", "at 2 oclock snake case"),
    ("Café!", "café"),
    ("", ""),
])  # fmt: skip
def test_normalisation(text, expected):
    assert normalise_transcript(text) == expected


def test_bad_rows_are_named():
    rows = _dicts()
    rows[3]["mode"] = "read"
    with pytest.raises(ValueError, match=r"row 3 \(Ses01M_impro01_M000\): mode 'read'"):
        transcript_overlap(rows)
    rows = _dicts()
    del rows[2]["transcript"]
    with pytest.raises(ValueError, match=r"row 2 \(Ses01F_script01_1_F001\) has no 'transcript'"):
        transcript_overlap(rows)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['mode'\]"):
        transcript_overlap(pa.Table.from_pylist(_dicts()).drop_columns(["mode"]))
    rows = _dicts()
    rows[0]["speaker"] = "Ses07F"
    with pytest.raises(ValueError, match="Ses07F"):
        transcript_overlap(rows)
    with pytest.raises(ValueError, match="protocol"):
        transcript_overlap(_dicts(), protocol="loso7")


# --- the synthetic corpus -----------------------------------------------------------------------------------

def test_synthetic_corpus_scripted_lines_recur_improvised_do_not(synthetic_corpus):
    utterances = parse_iemocap(synthetic_corpus).utterances
    result = transcript_overlap(utterances)
    # Independent reference: under loso5 the training side is every other session; the generator copies script
    # lines character for character, so raw-text equality must find the same matches.
    for session in range(1, 6):
        test = [u for u in utterances if u.session == session]
        seen = {u.transcript for u in utterances if u.session != session}
        fold = result["folds"][str(session)]
        assert fold["test_utterances"] == len(test)
        assert fold["scripted_test_utterances"] == sum("_script" in u.id for u in test)
        assert fold["overlapping_scripted"] == sum(u.transcript in seen for u in test if "_script" in u.id)
        assert fold["overlapping_improvised"] == sum(u.transcript in seen for u in test if "_impro" in u.id)
    # 24 utterances per session (the fixture): measured 45.9 % scripted, 0.0 % improvised (module docstring).
    assert result["mean"]["scripted_overlap_share"] > 0.3
    assert result["mean"]["improvised_overlap_share"] < 0.05
    assert all(f["overlapping_scripted"] > 0 for f in result["folds"].values())


def test_prepare_stores_and_prints_the_overlap(synthetic_corpus, tmp_path):
    out = tmp_path / "ds"
    summary = prepare_dataset(synthetic_corpus, out)
    table = pq.read_table(out, columns=["id", "session", "speaker", "mode", "transcript"])
    assert summary["transcript_overlap"] == transcript_overlap(table) == read_summary(out)["transcript_overlap"]
    text = format_summary(summary)
    for fold, f in summary["transcript_overlap"]["folds"].items():
        assert (f"fold {fold}: {f['overlapping']}/{f['test_utterances']} "
                f"({100 * f['overlap_share']:.1f} %); scripted {f['overlapping_scripted']}/") in text
    mean = summary["transcript_overlap"]["mean"]
    assert f"mean over folds: {100 * mean['overlap_share']:.1f} %; scripted" in text
    # Summaries written before the overlap existed still print.
    old = dict(summary)
    del old["transcript_overlap"]
    assert "test transcripts also in training" not in format_summary(old)
