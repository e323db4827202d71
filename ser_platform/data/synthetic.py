"""A small synthetic corpus in IEMOCAP's exact layout, so everything downstream runs without the licensed data.

``write_synthetic_corpus(out)`` writes ``out/Session1`` .. ``out/Session5`` with the same folders, file names
and line formats as ``IEMOCAP_full_release`` (see ``data/iemocap.py``), and the same quirks the parser must
survive: evaluator lines under each category line, decoy ``.txt`` files in ``EmoEvaluation/Categorical``,
``Attribute`` and ``Self-evaluation``, transcript lines for ids that have no evaluation (``..._FXX0``) and
lines without an id (``F: [BREATHING]``), transcripts holding brackets and colons.

How it is generated (all from one ``numpy`` generator seeded by ``seed``, so a seed gives byte-identical files):

* Per session two actors, one female (F0 about 205 Hz) and one male (about 115 Hz), each with their own
  pitch, loudness and tempo offsets. Four dialogs per session: improvised and scripted, one of each led by
  either actor (``Ses01F_impro03``, ``Ses01M_script02_1``); within a dialog the two actors take turns, so both
  genders speak in every dialog.
* Labels: ``utterances_per_session`` kept utterances split over the four classes in IEMOCAP's proportions
  (happy 30 %, neutral 31 %, angry 20 %, sad 20 %; about 64 % of happy written as ``exc``, as in the real
  corpus), plus a quarter as many again with labels the parser drops (``xxx``, ``fru``, ``sur``, ``fea``,
  ``dis``, ``oth``), which look and sound like a nearby class (frustration like anger, ...).
* Words: improvised turns are fresh sentences of neutral filler with one or two emotion words mixed in
  (plus the odd word of another emotion, ``[LAUGHTER]`` more often when happy, ``!`` when angry or happy).
  Scripted turns take their line from a fixed script text shared by every session that performs that script,
  as in IEMOCAP, so the same sentence recurs across sessions.
* Sound: a voiced harmonic source (band-limited, spectral tilt by emotion, two formant resonances scaled by
  gender) whose F0 level, F0 range, loudness and syllable rate (amplitude modulation) depend on the emotion,
  with per-utterance jitter, breath noise and background noise; 1.0-3.0 s per utterance, mono int16 WAV.
* About a quarter of the kept utterances carry their emotion in one modality only: neutral words spoken with
  emotional prosody, or emotional words spoken flat. Neither modality alone can get those right; together they
  can. Neutral utterances are neutral in both.

The default (60 kept utterances per session, 375 WAVs in all) is sized for the demo preset: five folds train
in minutes on two CPU cores.

The corpus is an ``AtomicFolder`` (``data/atomic_folder.py``): written under a hidden partial name and renamed
into place, one writer at a time, and it carries a marker file (``MARKER_FILE``, JSON: the writer and its
settings). ``overwrite=True`` replaces only a folder holding that marker: never a real corpus, never anything
else a user pointed it at by mistake.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile

from ser_platform.data.atomic_folder import AtomicFolder
from ser_platform.data.errors import DataError
from ser_platform.data.iemocap import CLASSES, PAPER_COUNTS

SESSIONS = (1, 2, 3, 4, 5)
MARKER_FILE = ".ser_synthetic_corpus.json"  # what `overwrite` looks for (module docstring)
WRITER = "ser_platform.data.synthetic"
_DROPPED_PER_KEPT = 0.25  # distractor utterances written per kept one
_EXC_SHARE = 1041 / 1636  # share of happy written as "exc" in the real corpus
_ONE_MODALITY_SHARE = 0.36  # of emotional utterances; with ~69 % emotional that is ~25 % of all kept
_DROPPED_WEIGHTS = {"xxx": 0.40, "fru": 0.34, "sur": 0.10, "fea": 0.07, "dis": 0.05, "oth": 0.04}
# A dropped label looks and sounds like a nearby class; None: no majority, any class.
_LOOKALIKE = {"fru": "angry", "dis": "angry", "sur": "happy", "fea": "sad", "oth": "neutral", "xxx": None}
_RAW_LABEL = {"angry": "ang", "neutral": "neu", "sad": "sad"}  # happy: "hap" or "exc"
_CATEGORY_WORD = {
    "ang": "Anger", "hap": "Happiness", "exc": "Excited", "neu": "Neutral", "sad": "Sadness",
    "fru": "Frustration", "sur": "Surprise", "fea": "Fear", "dis": "Disgust", "oth": "Other",
}  # fmt: skip
# Mean valence, activation, dominance (1-5) the attribute evaluators give.
_VAD = {
    "ang": (1.8, 4.0, 4.0), "hap": (4.0, 3.2, 3.0), "exc": (4.1, 3.9, 3.3), "neu": (3.0, 2.5, 2.6),
    "sad": (1.9, 2.1, 2.0), "fru": (2.0, 3.4, 3.3), "sur": (3.4, 4.0, 2.9), "fea": (1.9, 3.6, 2.0),
    "dis": (1.8, 3.1, 3.4), "oth": (3.0, 3.0, 3.0), "xxx": (2.8, 3.0, 3.0),
}  # fmt: skip
_IMPRO_NAMES = ("impro01", "impro02", "impro03", "impro04", "impro05a", "impro05b", "impro06", "impro07", "impro08")
_SCRIPTS = (1, 2, 3)
_SCRIPT_LINES_PER_EMOTION = 5

_EMOTION_WORDS = {
    "angry": ("furious", "hate", "ridiculous", "stupid", "damn", "shut up"),
    "happy": ("wonderful", "love", "great", "amazing", "excited", "congratulations"),
    "sad": ("miss", "sorry", "alone", "cry", "lost", "goodbye"),
}
_FILLER_WORDS = (
    "I", "you", "we", "it", "the", "a", "that", "this", "just", "really", "know", "think", "mean", "well", "so",
    "okay", "yeah", "what", "about", "to", "go", "get", "have", "do", "with", "there", "here", "now", "time",
    "line", "form", "office", "car", "tomorrow", "again", "maybe", "said", "tell", "want", "need", "thing",
    "back", "home", "work", "phone", "right", "Monday", "paper", "dinner", "street",
)  # fmt: skip
_END_MARKS = {  # ".", "?", "!" probabilities
    "angry": (0.40, 0.10, 0.50), "happy": (0.45, 0.15, 0.40), "neutral": (0.70, 0.27, 0.03), "sad": (0.80, 0.17, 0.03),
}  # fmt: skip


@dataclass(frozen=True)
class _Prosody:
    f0_factor: float  # F0 level relative to the speaker's own
    f0_range: float  # semitones of F0 excursion around that level
    level: float  # RMS of the voiced signal, full scale = 1
    syllable_rate: float  # syllables per second (amplitude modulation)
    tilt: float  # harmonic k has amplitude k**-tilt: flatter = brighter, tenser voice


_PROSODY = {
    "angry": _Prosody(f0_factor=1.30, f0_range=3.0, level=0.160, syllable_rate=5.5, tilt=0.9),
    "happy": _Prosody(f0_factor=1.35, f0_range=6.0, level=0.110, syllable_rate=5.0, tilt=1.2),
    "neutral": _Prosody(f0_factor=1.00, f0_range=1.5, level=0.060, syllable_rate=4.0, tilt=1.5),
    "sad": _Prosody(f0_factor=0.90, f0_range=0.8, level=0.035, syllable_rate=2.8, tilt=1.9),
}


@dataclass(frozen=True)
class _Speaker:
    letter: str  # "F" | "M"
    f0: float  # Hz, the actor's neutral pitch
    gain: float  # loudness factor
    tempo: float  # syllable-rate factor
    formant_scale: float  # vocal-tract length: formants scale with it


@dataclass
class _Turn:
    raw_label: str
    text_emotion: str
    prosody_emotion: str
    speaker: str = ""
    id: str = ""
    text: str = ""
    start: float = 0.0
    num_samples: int = 0


def is_synthetic_corpus(path: str | Path) -> bool:
    """Whether ``path`` holds the marker file this module writes (the only folders ``overwrite`` replaces)."""
    try:
        return json.loads((Path(path) / MARKER_FILE).read_text()).get("written_by") == WRITER
    except (OSError, ValueError, AttributeError):
        return False


def write_synthetic_corpus(
    out: str | Path,
    *,
    utterances_per_session: int = 60,
    seed: int = 0,
    sample_rate: int = 16000,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a synthetic IEMOCAP-layout corpus to ``out`` and return its absolute root (holds Session1..5).

    ``utterances_per_session`` counts the kept (4-class) utterances; a quarter as many with dropped labels
    come on top. The corpus is written to a temporary sibling folder and renamed into place at the end, so a
    crash never leaves half a corpus; an existing non-empty ``out`` is replaced only with ``overwrite=True``, and
    only if it is a corpus written here (``is_synthetic_corpus``). ``out`` is resolved (symlinks followed).
    """
    if utterances_per_session < 8:
        raise DataError(out, f"utterances_per_session={utterances_per_session!r}: need at least 8 (two per class)")
    if sample_rate < 8000:
        raise DataError(out, f"sample_rate={sample_rate!r}: need at least 8000 Hz for the harmonic source")
    folder = AtomicFolder(out, writer="ser synth", what="synthetic corpus", marker=MARKER_FILE,
                          is_ours=is_synthetic_corpus, overwrite=overwrite)
    rng = np.random.default_rng(seed)
    scripts = {s: {e: [_sentence(rng, e) for _ in range(_SCRIPT_LINES_PER_EMOTION)] for e in CLASSES} for s in _SCRIPTS}
    num_dropped = round(utterances_per_session * _DROPPED_PER_KEPT)
    with folder:
        settings = {"seed": seed, "utterances_per_session": utterances_per_session, "sample_rate": sample_rate}
        (folder.partial / "README.txt").write_text(
            "Synthetic corpus in the layout of IEMOCAP_full_release, written by ser_platform.data.synthetic\n"
            f"(seed={seed}, utterances_per_session={utterances_per_session}, sample_rate={sample_rate}).\n"
            "Not speech: harmonic tones whose prosody follows the label. See the module docstring.\n",
            newline="\n",
        )
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(SESSIONS) * (utterances_per_session + num_dropped), desc="synthetic corpus",
                       unit="wav")
        try:
            for session in SESSIONS:
                _write_session(folder.partial, session, utterances_per_session, num_dropped, sample_rate, scripts,
                               rng, bar)
        finally:
            if bar is not None:
                bar.close()
        (folder.partial / MARKER_FILE).write_text(json.dumps({"written_by": WRITER, **settings}, sort_keys=True))
        return folder.commit()


def _quota(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Split ``total`` by ``shares`` with the largest-remainder rule (counts sum exactly to ``total``)."""
    norm = sum(shares.values())
    exact = {k: total * v / norm for k, v in shares.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def _plan_labels(rng: np.random.Generator, num_kept: int, num_dropped: int) -> list[_Turn]:
    turns = []
    for label, count in _quota(num_kept, {c: PAPER_COUNTS[c] for c in CLASSES}).items():
        for _ in range(count):
            raw = _RAW_LABEL.get(label) or ("exc" if rng.random() < _EXC_SHARE else "hap")
            text_emotion = prosody_emotion = label
            if label != "neutral" and rng.random() < _ONE_MODALITY_SHARE:
                if rng.random() < 0.5:
                    text_emotion = "neutral"  # neutral words, emotional voice
                else:
                    prosody_emotion = "neutral"  # emotional words, flat voice
            turns.append(_Turn(raw, text_emotion, prosody_emotion))
    names = list(_DROPPED_WEIGHTS)
    weights = np.array(list(_DROPPED_WEIGHTS.values()))
    for raw in rng.choice(names, size=num_dropped, p=weights / weights.sum()):
        lookalike = _LOOKALIKE[str(raw)]
        text_emotion = lookalike or str(rng.choice(CLASSES))
        prosody_emotion = lookalike or str(rng.choice(CLASSES))
        turns.append(_Turn(str(raw), text_emotion, prosody_emotion))
    rng.shuffle(turns)
    return turns


def _write_session(
    root: Path,
    session: int,
    num_kept: int,
    num_dropped: int,
    sample_rate: int,
    scripts: dict[int, dict[str, list[str]]],
    rng: np.random.Generator,
    bar,
) -> None:
    speakers = {"F": _actor(rng, "F", f0=205, f0_spread=15, formant_scale=1.15), "M": _actor(rng, "M", 115, 10, 1.0)}
    impro = rng.choice(_IMPRO_NAMES, size=2, replace=False)
    script_numbers = rng.choice(_SCRIPTS, size=2, replace=False)
    dialogs = [
        (f"Ses{session:02d}F_{impro[0]}", None),
        (f"Ses{session:02d}M_{impro[1]}", None),
        (f"Ses{session:02d}F_script{script_numbers[0]:02d}_{rng.integers(1, 3)}", int(script_numbers[0])),
        (f"Ses{session:02d}M_script{script_numbers[1]:02d}_{rng.integers(1, 3)}", int(script_numbers[1])),
    ]
    turns = _plan_labels(rng, num_kept, num_dropped)
    session_dir = root / f"Session{session}"
    for index, (dialog, script) in enumerate(dialogs):
        dialog_turns = turns[index :: len(dialogs)]
        letter = "F" if rng.random() < 0.5 else "M"
        numbers = {"F": 0, "M": 0}
        clock = rng.uniform(1.0, 8.0)
        for turn in dialog_turns:
            turn.speaker = letter
            turn.id = f"{dialog}_{letter}{numbers[letter]:03d}"
            numbers[letter] += 1
            letter = "M" if letter == "F" else "F"
            if script is None:
                turn.text = _sentence(rng, turn.text_emotion)
            else:
                turn.text = str(rng.choice(scripts[script][turn.text_emotion]))
            turn.num_samples = int(round(rng.uniform(1.0, 3.0) * sample_rate))
            turn.start = round(clock, 4)
            clock += turn.num_samples / sample_rate + rng.uniform(0.2, 1.5)

        wav_dir = session_dir / "sentences" / "wav" / dialog
        wav_dir.mkdir(parents=True)
        for turn in dialog_turns:
            audio = _synthesize(rng, turn.num_samples, sample_rate, speakers[turn.speaker], turn.prosody_emotion)
            soundfile.write(wav_dir / f"{turn.id}.wav", audio, sample_rate, subtype="PCM_16", format="WAV")
            if bar is not None:
                bar.update(1)
        _write_evaluation(session_dir / "dialog" / "EmoEvaluation", dialog, dialog_turns, sample_rate, rng)
        _write_transcription(session_dir / "dialog" / "transcriptions", dialog, dialog_turns, sample_rate, rng)


def _actor(rng: np.random.Generator, letter: str, f0: float, f0_spread: float, formant_scale: float) -> _Speaker:
    f0 = rng.normal(f0, f0_spread)
    gain = 10 ** (rng.normal(0, 2) / 20)
    return _Speaker(letter, f0, gain, tempo=rng.normal(1, 0.06), formant_scale=rng.normal(formant_scale, 0.03))


def _sentence(rng: np.random.Generator, emotion: str) -> str:
    words = [str(w) for w in rng.choice(_FILLER_WORDS, size=int(rng.integers(3, 8)))]
    if emotion != "neutral":
        for word in rng.choice(_EMOTION_WORDS[emotion], size=1 if rng.random() < 0.4 else 2, replace=False):
            words.insert(int(rng.integers(0, len(words) + 1)), str(word))
    if rng.random() < 0.1:  # people use other emotions' words too ("I love how you never listen")
        other = [e for e in _EMOTION_WORDS if e != emotion]
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(_EMOTION_WORDS[str(rng.choice(other))])))
    text = " ".join(words)
    text = text[0].upper() + text[1:] + str(rng.choice([".", "?", "!"], p=_END_MARKS[emotion]))
    if rng.random() < (0.2 if emotion == "happy" else 0.04):
        text += " [LAUGHTER]"
    if rng.random() < 0.06:
        text = str(rng.choice(["Look: ", "Listen: ", "[BREATHING] "])) + text
    return text


def _write_evaluation(folder: Path, dialog: str, turns: list[_Turn], sample_rate: int, rng) -> None:
    lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
    categorical, attribute = [], []
    for turn in turns:
        end = turn.start + turn.num_samples / sample_rate
        judges = [f"E{e}" for e in sorted(rng.choice(np.arange(1, 7), size=2, replace=False))] + [f"{turn.speaker}1"]
        if turn.raw_label == "xxx":  # no majority: every evaluator saw something else
            words = [str(w) for w in rng.choice(list(_CATEGORY_WORD.values()), size=3, replace=False)]
        else:
            majority = _CATEGORY_WORD[turn.raw_label]
            words = [majority, majority, str(rng.choice(list(_CATEGORY_WORD.values())))]
            rng.shuffle(words)
        vad = np.clip(np.rint(np.array(_VAD[turn.raw_label]) + rng.normal(0, 0.7, size=(2, 3))), 1, 5).astype(int)
        v, a, d = vad.mean(axis=0)
        lines.append(f"[{turn.start:.4f} - {end:.4f}]\t{turn.id}\t{turn.raw_label}\t[{v:.4f}, {a:.4f}, {d:.4f}]")
        for judge, word in zip(judges, words):
            extra = f" {_CATEGORY_WORD['fru']};" if word == "Anger" and rng.random() < 0.3 else ""
            lines.append(f"C-{judge}:\t{word};{extra}\t()")
        for judge, (v_i, a_i, d_i) in zip((judges[1], judges[2]), vad):
            lines.append(f"A-{judge}:\tval {v_i}; act {a_i}; dom  {d_i};\t()")
        lines.append("")
        categorical.append(f"{turn.id} :{words[0]}; ()")
        attribute.append(f"{turn.id} :act {vad[0][1]}; val {vad[0][0]}; dom {vad[0][2]}; ()")
    _write_lines(folder / f"{dialog}.txt", lines)
    # Per-evaluator files the real release keeps beside the dialog files; a parser must not read them.
    _write_lines(folder / "Categorical" / f"{dialog}_e2_cat.txt", categorical)
    _write_lines(folder / "Attribute" / f"{dialog}_e3_atr.txt", attribute)
    _write_lines(folder / "Self-evaluation" / f"{dialog}.txt", [lines[0], ""] + categorical[:2])


def _write_transcription(folder: Path, dialog: str, turns: list[_Turn], sample_rate: int, rng) -> None:
    lines = []
    unevaluated_at = int(rng.integers(0, len(turns) + 1))
    no_id_at = int(rng.integers(0, len(turns) + 1))
    for index in range(len(turns) + 1):
        if index == unevaluated_at:  # a turn the evaluators never labelled, as "_FXX0" lines in IEMOCAP
            t = turns[index - 1].start if index else 0.5
            letter = str(rng.choice(["F", "M"]))
            lines.append(f"{dialog}_{letter}XX0 [{t:08.4f}-{t + 0.8:08.4f}]: [LAUGHTER]")
        if index == no_id_at:
            lines.append(f"{rng.choice(['F', 'M'])}: [BREATHING]")
        if index < len(turns):
            turn = turns[index]
            end = turn.start + turn.num_samples / sample_rate
            lines.append(f"{turn.id} [{turn.start:08.4f}-{end:08.4f}]: {turn.text}")
    _write_lines(folder / f"{dialog}.txt", lines)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")


def _synthesize(rng: np.random.Generator, num_samples: int, sample_rate: int, speaker: _Speaker, emotion: str):
    """One utterance as int16: a harmonic voice whose pitch, loudness and rhythm follow ``emotion``."""
    p = _PROSODY[emotion]
    t = np.arange(num_samples) / sample_rate
    duration = num_samples / sample_rate

    # Slow controls (pitch contour, tempo drift) are computed every 5 ms and interpolated: they change below 3 Hz.
    control_t = np.arange(0.0, duration + 0.005, 0.005)

    # F0: the speaker's level times the emotion's, moved by a smooth contour spanning the emotion's range.
    f0_level = speaker.f0 * p.f0_factor * np.exp(rng.normal(0, 0.04))
    f0_range = p.f0_range * np.exp(rng.normal(0, 0.15))
    freqs, phases, weights = rng.uniform(0.3, 2.5, 3), rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.5, 1.0, 3)
    contour = (weights[:, None] * np.sin(2 * np.pi * freqs[:, None] * control_t + phases[:, None])).sum(0)
    contour = contour / weights.sum() - 0.5 * (control_t / duration - 0.5)  # declination: pitch drifts down
    f0 = np.interp(t, control_t, f0_level * 2 ** (f0_range / 12 * contour))

    # Syllables: raised-cosine bursts at the emotion's rate, random stress, some syllables silent (pauses).
    rate = p.syllable_rate * speaker.tempo * np.exp(rng.normal(0, 0.08))
    drift = np.interp(t, control_t, 1 + 0.1 * np.sin(2 * np.pi * 0.4 * control_t + rng.uniform(0, 2 * np.pi)))
    syllable_phase = rate * t * drift + rng.uniform()
    index = syllable_phase.astype(int)
    stress = rng.uniform(0.5, 1.0, index[-1] + 1) * (rng.random(index[-1] + 1) > 0.12)
    within = syllable_phase - index
    lead, trail = (int(rng.uniform(0.05, 0.2) * sample_rate) for _ in range(2))
    shape = np.where(within < 0.65, np.sin(np.pi * within / 0.65) ** 2, 0.0)
    shape[:lead] = 0.0
    shape[num_samples - trail :] = 0.0
    envelope = shape * stress[index]
    if not (envelope > 0.1).any():  # every syllable fell in a pause: keep them all rather than write silence
        envelope = shape * np.maximum(stress, 0.5)[index]

    # Band-limited harmonic source; sin(k x) by the Chebyshev recurrence (cheaper than one np.sin per harmonic).
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    top = min(4000.0, 0.45 * sample_rate)
    # float32 halves the memory traffic of this loop, the corpus writer's hot spot; its error is ~1e-6.
    two_cos = (2 * np.cos(phase)).astype(np.float32)
    previous, current = np.zeros(num_samples, np.float32), np.sin(phase).astype(np.float32)
    voice, scratch, fade = np.zeros(num_samples, np.float32), np.empty_like(current), np.empty_like(current)
    f0_32 = f0.astype(np.float32)
    for k in range(1, int(top / f0.min()) + 1):
        np.multiply(current, np.float32(k**-p.tilt), out=scratch)
        if k * f0.max() > top - 300.0:  # fade harmonics out over the last 300 Hz below the top
            np.multiply(f0_32, np.float32(-k / 300.0), out=fade)
            fade += np.float32(top / 300.0)
            scratch *= np.clip(fade, np.float32(0.0), np.float32(1.0), out=fade)
        voice += scratch
        np.multiply(two_cos, current, out=scratch)
        scratch -= previous
        previous, current, scratch = current, scratch, previous
    voice = voice.astype(np.float64)
    for formant, bandwidth in ((650.0, 120.0), (1700.0, 200.0)):
        voice = scipy.signal.lfilter(*_resonator(formant * speaker.formant_scale, bandwidth, sample_rate), voice)
    voice += 0.15 * rng.standard_normal(num_samples) * voice.std()  # breath

    signal = voice * envelope
    voiced_rms = np.sqrt(np.mean(signal[envelope > 0.1] ** 2))
    level = p.level * speaker.gain * 10 ** (rng.normal(0, 1.5) / 20)
    signal *= level / voiced_rms
    signal += 10 ** (rng.uniform(-52, -42) / 20) * rng.standard_normal(num_samples)  # room noise
    return np.clip(np.rint(signal * 32767), -32768, 32767).astype(np.int16)


def _resonator(frequency: float, bandwidth: float, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-pole resonance (a formant) with unit gain at DC."""
    radius = np.exp(-np.pi * bandwidth / sample_rate)
    a = np.array([1.0, -2 * radius * np.cos(2 * np.pi * frequency / sample_rate), radius**2])
    return np.array([a.sum()]), a
