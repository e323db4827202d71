"""Acoustic features (§3.2) against independent references: librosa's own MFCC, a numpy STFT written out frame
by frame, and the torch twin (`AcousticFeatures`) against librosa on padded batches.

Tolerances (measured on this machine: MFCC max |diff| 3e-4, spectrogram 1.5e-3 dB, float32 throughout):
the torch twin agrees with librosa to within ``PARITY_ATOL_DB`` dB on the log-power spectrogram and
``PARITY_ATOL_MFCC`` on the MFCC coefficients, absolute, on every valid frame. dB is already a relative scale
(0.02 dB is a 0.5 % power ratio), and the top_db=80 floor keeps near-silent bins, where float32 FFT rounding
is largest relative to the bin, from counting.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import librosa
import numpy as np
import pytest
import scipy.signal
import soundfile
import torch

from ser_platform.config import SpeechEncoderConfig
from ser_platform.data.features import (
    AcousticFeatures,
    FeatureParams,
    mfcc_librosa,
    num_frames,
    spectrogram_librosa,
)

PARITY_ATOL_DB = 0.02
PARITY_ATOL_MFCC = 0.01
PARAMS = FeatureParams()


def _noise(num_samples: int, seed: int, scale: float = 0.1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(num_samples) * scale).astype(np.float32)


def _librosa_mfcc(audio: np.ndarray) -> np.ndarray:
    """librosa's public MFCC with §3.2's settings, written out independently of features.py."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return librosa.feature.mfcc(y=audio, sr=16000, n_mfcc=40, n_mels=40, htk=True, n_fft=640, win_length=640,
                                    hop_length=160, window="hamming").T


def _librosa_spectrogram(audio: np.ndarray, top_db: float | None = 80.0) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        power = np.abs(librosa.stft(audio, n_fft=640, hop_length=160, window="hamming")) ** 2
    return librosa.power_to_db(power, top_db=top_db).T


def _corpus_wavs(root: Path, count: int) -> list[np.ndarray]:
    paths = sorted(Path(root).glob("Session*/sentences/wav/*/*.wav"))[:count]
    assert len(paths) == count, f"synthetic corpus at {root} has fewer than {count} wavs"
    return [soundfile.read(p, dtype="float32")[0] for p in paths]


def _batch(signals: list[np.ndarray], pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in signals])
    audio = torch.full((len(signals), int(lengths.max())), pad_value)
    for i, s in enumerate(signals):
        audio[i, : len(s)] = torch.from_numpy(s)
    return audio, lengths


# --- librosa path ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_samples", [1, 159, 160, 161, 639, 640, 16000, 16083])
def test_num_frames_is_librosa_frame_count(num_samples):
    audio = _noise(num_samples, seed=num_samples)
    assert num_frames(num_samples, PARAMS) == _librosa_mfcc(audio).shape[0] == 1 + num_samples // 160
    assert mfcc_librosa(audio).shape == (num_frames(num_samples, PARAMS), 40)
    assert spectrogram_librosa(audio).shape == (num_frames(num_samples, PARAMS), 321)


def test_mfcc_equals_librosa_feature_mfcc_with_htk_mel():
    audio = _noise(12345, seed=1)
    np.testing.assert_allclose(mfcc_librosa(audio), _librosa_mfcc(audio), atol=1e-4, rtol=0)
    # HTK mel is a real choice: librosa's default (Slaney) mel scale gives different coefficients.
    slaney = librosa.feature.mfcc(y=audio, sr=16000, n_mfcc=40, n_mels=40, n_fft=640, hop_length=160,
                                  window="hamming").T
    assert np.abs(mfcc_librosa(audio) - slaney).max() > 0.1


def test_spectrogram_equals_a_hand_written_hamming_stft():
    """40 ms periodic Hamming windows every 10 ms over the zero-padded signal, one rfft per frame, in dB."""
    audio = _noise(4000, seed=2) + np.sin(2 * np.pi * 440 * np.arange(4000) / 16000).astype(np.float32)
    padded = np.concatenate([np.zeros(320), audio.astype(np.float64), np.zeros(320)])
    window = scipy.signal.get_window("hamming", 640, fftbins=True)
    frames = []
    for t in range(1 + len(audio) // 160):
        segment = padded[t * 160 : t * 160 + 640]
        frames.append(np.abs(np.fft.rfft(segment * window)) ** 2)
    power = np.array(frames)
    db = 10 * np.log10(np.maximum(power, 1e-10))
    expected = np.maximum(db, db.max() - 80.0)
    np.testing.assert_allclose(spectrogram_librosa(audio), expected, atol=1e-3, rtol=0)


def test_top_db_floor_is_per_utterance_and_optional():
    audio = np.concatenate([_noise(8000, seed=3, scale=0.5), np.zeros(8000, np.float32)])
    spec = spectrogram_librosa(audio)
    assert spec.min() == pytest.approx(spec.max() - 80.0, abs=1e-4)  # silence sits on the floor
    unfloored = spectrogram_librosa(audio, FeatureParams(top_db=None))
    assert unfloored.min() == pytest.approx(-100.0)  # only the amin floor (1e-10 -> -100 dB)
    np.testing.assert_allclose(unfloored, _librosa_spectrogram(audio, top_db=None), atol=1e-4)


def test_librosa_path_rejects_empty_or_multichannel_audio():
    with pytest.raises(ValueError, match="empty"):
        mfcc_librosa(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="mono"):
        spectrogram_librosa(np.zeros((2, 100), np.float32))


# --- the torch twin ----------------------------------------------------------------------------------------

def _assert_parity(signals: list[np.ndarray], pad_value: float = 0.0) -> None:
    audio, lengths = _batch(signals, pad_value)
    mfcc, spec, frame_lengths = AcousticFeatures(PARAMS)(audio, lengths)
    assert mfcc.shape == (len(signals), 1 + audio.shape[1] // 160, 40)
    assert spec.shape == (len(signals), 1 + audio.shape[1] // 160, 321)
    for i, signal in enumerate(signals):
        frames = int(frame_lengths[i])
        assert frames == num_frames(len(signal), PARAMS)
        np.testing.assert_allclose(mfcc[i, :frames].numpy(), _librosa_mfcc(signal), atol=PARITY_ATOL_MFCC, rtol=0)
        np.testing.assert_allclose(spec[i, :frames].numpy(), _librosa_spectrogram(signal), atol=PARITY_ATOL_DB,
                                   rtol=0)
        assert not mfcc[i, frames:].any() and not spec[i, frames:].any()  # padded frames are zero


def test_torch_twin_matches_librosa_on_random_noise():
    _assert_parity([_noise(16000, seed=4), _noise(7003, seed=5, scale=0.01), _noise(500, seed=6, scale=1.0)])


def test_torch_twin_matches_librosa_on_synthetic_speech(synthetic_corpus):
    _assert_parity(_corpus_wavs(synthetic_corpus, 4))


def test_torch_twin_ignores_whatever_lies_in_the_padding(synthetic_corpus):
    """Padding that is not zero (e.g. a collate that pads with noise) must not leak into any valid frame."""
    _assert_parity(_corpus_wavs(synthetic_corpus, 3), pad_value=0.7)


def test_batching_does_not_change_an_utterance(synthetic_corpus):
    signals = _corpus_wavs(synthetic_corpus, 3)
    module = AcousticFeatures(PARAMS)
    batched = module(*_batch(signals))
    for i, signal in enumerate(signals):
        alone = module(*_batch([signal]))
        frames = int(alone[2][0])
        torch.testing.assert_close(batched[0][i, :frames], alone[0][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(batched[1][i, :frames], alone[1][0], atol=1e-4, rtol=0)


def test_torch_twin_has_no_trainable_parameters_or_checkpoint_state():
    module = AcousticFeatures(PARAMS)
    assert list(module.parameters()) == []
    assert module.state_dict() == {}  # buffers are rebuilt from params, so old checkpoints always load


def test_torch_twin_top_db_none_matches_librosa():
    signal = np.concatenate([_noise(4000, seed=7), np.zeros(4000, np.float32)])
    params = FeatureParams(top_db=None)
    _, spec, frames = AcousticFeatures(params)(*_batch([signal]))
    np.testing.assert_allclose(spec[0, : int(frames[0])].numpy(), _librosa_spectrogram(signal, top_db=None),
                               atol=PARITY_ATOL_DB, rtol=0)


def test_torch_twin_rejects_bad_lengths():
    module = AcousticFeatures(PARAMS)
    with pytest.raises(ValueError, match="audio_lengths"):
        module(torch.zeros(2, 100), torch.tensor([100, 101]))
    with pytest.raises(ValueError, match="audio_lengths"):
        module(torch.zeros(2, 100), torch.tensor([0, 50]))
    with pytest.raises(ValueError, match=r"\(batch, samples\)"):
        module(torch.zeros(100), torch.tensor([100]))


# --- params ------------------------------------------------------------------------------------------------

def test_params_from_the_speech_config_are_the_papers():
    assert FeatureParams.from_speech_config(SpeechEncoderConfig(), 16000) == FeatureParams()
    assert FeatureParams.from_dict(FeatureParams().to_dict()) == FeatureParams()
    assert FeatureParams().n_freq == 321


@pytest.mark.parametrize("key, value", [("window", "hann"), ("hop_length", 0), ("n_mfcc", 41), ("n_fft", 641)])
def test_bad_params_name_the_field(key, value):
    with pytest.raises(ValueError, match=f"FeatureParams.{key}="):
        FeatureParams(**{key: value})
