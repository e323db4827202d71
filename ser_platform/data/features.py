"""Acoustic features of §3.2: a 40-d MFCC on HTK-style mel frequencies (librosa) and a log-power spectrogram,
both framed by 40 ms Hamming windows with a 10 ms hop.

Two implementations of the same numbers:

* ``mfcc_librosa`` / ``spectrogram_librosa`` (numpy, one utterance): what ``ser prepare --features`` stores,
  and what the paper used (librosa).
* ``AcousticFeatures`` (torch + torchaudio, a batch of padded audio, any device, no trainable parameters): the
  same features computed next to the model, e.g. on the GPU, so a dataset without feature columns still works.
  ``tests/test_features.py`` holds it to librosa within the tolerance stated there (``PARITY_ATOL_DB``,
  ``PARITY_ATOL_MFCC``).

The pipeline, identical in both:

1. STFT with ``center=True`` and zero (``"constant"``) padding of ``n_fft // 2`` at both ends — librosa's
   default — so an utterance of ``n`` samples has ``1 + n // hop_length`` frames (``num_frames``). Zero padding
   matters for the batched twin: a batch is zero-padded to its longest utterance, and with zero centre padding
   every frame of a shorter utterance sees exactly the samples librosa would have given it.
2. Power ``|X|^2`` with a periodic Hamming window of ``win_length`` samples (scipy's and torch's default).
3. Spectrogram: ``power_to_db`` of the power. MFCC: ``power_to_db`` of the HTK mel power (``n_mels`` triangular
   filters, 0 Hz to Nyquist, Slaney area normalisation — librosa's default ``norm``), then an orthonormal DCT-II
   over the mel axis, first ``n_mfcc`` coefficients (``librosa.feature.mfcc`` with ``htk=True``).
4. dB floor: ``10 * log10(max(power, amin))`` with ``amin = 1e-10`` (-100 dB), then values more than ``top_db``
   (80 dB) below the utterance's own maximum are raised to that level. The maximum is taken over the
   utterance's valid frames only (the twin masks padded frames), so batching never changes an utterance's
   features. ``top_db=None`` keeps only the ``amin`` floor.

Padded frames of ``AcousticFeatures``' output (``t >= frame_lengths[b]``) are zero.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import librosa
import numpy as np
import torch
import torchaudio.functional
from torch import nn


@dataclass(frozen=True)
class FeatureParams:
    """Framing and filter settings of §3.2; the defaults are the paper's at 16 kHz."""

    sample_rate: int = 16000
    n_mfcc: int = 40
    n_mels: int = 40
    win_length: int = 640  # 40 ms at 16 kHz
    hop_length: int = 160  # 10 ms at 16 kHz
    n_fft: int = 640  # one window per FFT: 321 frequency bins
    window: str = "hamming"
    htk: bool = True  # HTK mel scale (§3.2 "HTK-style Mel frequencies")
    mel_norm: str | None = "slaney"  # librosa's default filter normalisation
    amin: float = 1e-10  # power floor before the log: -100 dB
    top_db: float | None = 80.0  # per-utterance dynamic range kept below its maximum

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"FeatureParams.{key}={getattr(self, key)!r}: expected {expected}")

        check(self.sample_rate > 0, "sample_rate", "a positive rate in Hz")
        check(0 < self.n_mfcc <= self.n_mels, "n_mfcc", f"in [1, n_mels={self.n_mels}]")
        check(0 < self.hop_length <= self.win_length, "hop_length", f"in [1, win_length={self.win_length}]")
        check(self.win_length <= self.n_fft, "win_length", f"<= n_fft={self.n_fft}")
        check(self.n_fft % 2 == 0, "n_fft", "an even number (centre padding of n_fft // 2 each side)")
        check(self.window == "hamming", "window", "'hamming' (§3.2)")
        check(self.mel_norm in (None, "slaney"), "mel_norm", "None or 'slaney'")
        check(self.amin > 0, "amin", "> 0")
        check(self.top_db is None or self.top_db >= 0, "top_db", "None or >= 0")

    @property
    def n_freq(self) -> int:
        """Frequency bins of the spectrogram: ``n_fft // 2 + 1``."""
        return self.n_fft // 2 + 1

    @classmethod
    def from_speech_config(cls, speech: Any, sample_rate: int = 16000) -> "FeatureParams":
        """From ``config.model.speech`` (``n_mfcc``, ``n_mels``, ``win_ms``, ``hop_ms``) at ``sample_rate``.

        ``n_fft`` is the window length rounded up to an even number of samples.
        """
        win_length = int(round(speech.win_ms * sample_rate / 1000))
        hop_length = int(round(speech.hop_ms * sample_rate / 1000))
        return cls(sample_rate=sample_rate, n_mfcc=speech.n_mfcc, n_mels=speech.n_mels, win_length=win_length,
                   hop_length=hop_length, n_fft=win_length + win_length % 2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "FeatureParams":
        return cls(**values)


def num_frames(num_samples: int, params: FeatureParams) -> int:
    """Frames of a centred STFT over ``num_samples`` samples: ``1 + num_samples // hop_length``."""
    return 1 + int(num_samples) // params.hop_length


# --- librosa (numpy, one utterance) ------------------------------------------------------------------------

def _as_mono_float32(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio: expected a 1-d mono signal, got shape {audio.shape}")
    if audio.size == 0:
        raise ValueError("audio: empty signal, no frames to compute")
    return audio.astype(np.float32, copy=False)


def power_spectrogram_librosa(audio: np.ndarray, params: FeatureParams = FeatureParams()) -> np.ndarray:
    """``|STFT|^2`` of one utterance, shape (frames, n_fft // 2 + 1), float32."""
    with warnings.catch_warnings():
        # An utterance shorter than n_fft is fine: centring zero-pads it, exactly as the torch twin does.
        warnings.filterwarnings("ignore", message="n_fft=.* is too large for input signal")
        stft = librosa.stft(_as_mono_float32(audio), n_fft=params.n_fft, hop_length=params.hop_length,
                            win_length=params.win_length, window=params.window, center=True, pad_mode="constant")
    return (np.abs(stft) ** 2).T.astype(np.float32)


def _power_to_db(power: np.ndarray, params: FeatureParams) -> np.ndarray:
    return librosa.power_to_db(power, ref=1.0, amin=params.amin, top_db=params.top_db)


@functools.lru_cache(maxsize=8)
def mel_filters_librosa(params: FeatureParams = FeatureParams()) -> np.ndarray:
    """HTK mel filterbank, shape (n_mels, n_fft // 2 + 1), as ``librosa.feature.mfcc(htk=True)`` builds it.

    Cached per params (``prepare`` calls it once per utterance); the array is read-only so no caller can
    change the cached copy."""
    filters = librosa.filters.mel(sr=params.sample_rate, n_fft=params.n_fft, n_mels=params.n_mels,
                                  htk=params.htk, norm=params.mel_norm)
    filters.flags.writeable = False
    return filters


def features_from_power(power: np.ndarray, params: FeatureParams = FeatureParams()) -> tuple[np.ndarray, np.ndarray]:
    """(mfcc (frames, n_mfcc), spectrogram (frames, n_freq)) from one power spectrogram (frames, n_freq).

    ``ser prepare`` computes the STFT once and derives both features from it.
    """
    spectrogram = _power_to_db(power, params)
    mel_db = _power_to_db(power @ mel_filters_librosa(params).T, params)  # (frames, n_mels)
    mfcc = librosa.feature.mfcc(S=mel_db.T, n_mfcc=params.n_mfcc, dct_type=2, norm="ortho").T
    return mfcc.astype(np.float32), spectrogram.astype(np.float32)


def mfcc_librosa(audio: np.ndarray, params: FeatureParams = FeatureParams()) -> np.ndarray:
    """40-d MFCC on HTK mel frequencies (§3.2), shape (frames, n_mfcc), float32."""
    return features_from_power(power_spectrogram_librosa(audio, params), params)[0]


def spectrogram_librosa(audio: np.ndarray, params: FeatureParams = FeatureParams()) -> np.ndarray:
    """Log-power spectrogram in dB (§3.2: 40 ms Hamming windows, 10 ms hop), shape (frames, n_fft // 2 + 1)."""
    return _power_to_db(power_spectrogram_librosa(audio, params), params).astype(np.float32)


# --- torch (a padded batch, any device) --------------------------------------------------------------------

class AcousticFeatures(nn.Module):
    """The torch/torchaudio twin of ``mfcc_librosa`` and ``spectrogram_librosa`` for a zero-padded batch.

    No trainable parameters; the window, mel filterbank (``torchaudio.functional.melscale_fbanks``) and DCT
    matrix (``torchaudio.functional.create_dct``) are buffers, so ``.to(device)`` moves them with the model.
    """

    def __init__(self, params: FeatureParams = FeatureParams()):
        super().__init__()
        self.params = params
        window = torch.hamming_window(params.win_length, periodic=True, dtype=torch.float32)
        mel = torchaudio.functional.melscale_fbanks(
            n_freqs=params.n_freq, f_min=0.0, f_max=params.sample_rate / 2, n_mels=params.n_mels,
            sample_rate=params.sample_rate, norm=params.mel_norm, mel_scale="htk" if params.htk else "slaney",
        )  # (n_freq, n_mels)
        dct = torchaudio.functional.create_dct(params.n_mfcc, params.n_mels, norm="ortho")  # (n_mels, n_mfcc)
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("mel_filters", mel, persistent=False)
        self.register_buffer("dct", dct, persistent=False)

    def frame_lengths(self, audio_lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames per utterance: ``1 + audio_lengths // hop_length`` (see ``num_frames``)."""
        return 1 + torch.div(audio_lengths, self.params.hop_length, rounding_mode="floor")

    def _power_to_db(self, power: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """librosa's ``power_to_db`` per utterance; the ``top_db`` reference is the max over valid frames."""
        db = 10.0 * torch.log10(power.clamp_min(self.params.amin))  # (B, T, C)
        if self.params.top_db is not None:
            valid = db.masked_fill(~frame_mask[:, :, None], float("-inf"))
            peak = valid.amax(dim=(1, 2), keepdim=True)
            db = torch.maximum(db, peak - self.params.top_db)
        return db

    def forward(
        self, audio: torch.Tensor, audio_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """audio (B, S) zero-padded, audio_lengths (B,) -> mfcc (B, T, n_mfcc), spectrogram (B, T, n_freq),
        frame_lengths (B,), with T = 1 + S // hop_length and padded frames set to zero."""
        if audio.dim() != 2:
            raise ValueError(f"audio: expected (batch, samples), got shape {tuple(audio.shape)}")
        if audio_lengths.shape != audio.shape[:1]:
            raise ValueError(f"audio_lengths: expected shape ({audio.shape[0]},), got {tuple(audio_lengths.shape)}")
        if bool((audio_lengths < 1).any()) or bool((audio_lengths > audio.shape[1]).any()):
            raise ValueError(f"audio_lengths: expected values in [1, {audio.shape[1]}], got {audio_lengths.tolist()}")
        audio = audio.float()
        # Zero every sample past its utterance's end, so padding that is not zero cannot leak into the frames.
        sample_mask = torch.arange(audio.shape[1], device=audio.device)[None, :] < audio_lengths[:, None]
        audio = audio * sample_mask
        stft = torch.stft(audio, n_fft=self.params.n_fft, hop_length=self.params.hop_length,
                          win_length=self.params.win_length, window=self.window, center=True, pad_mode="constant",
                          return_complex=True)  # (B, n_freq, T)
        power = (stft.real**2 + stft.imag**2).transpose(1, 2)  # (B, T, n_freq)
        frame_lengths = self.frame_lengths(audio_lengths.to(audio.device))
        frame_mask = torch.arange(power.shape[1], device=audio.device)[None, :] < frame_lengths[:, None]  # (B, T)
        spectrogram = self._power_to_db(power, frame_mask)
        mel_db = self._power_to_db(power @ self.mel_filters, frame_mask)  # (B, T, n_mels)
        mfcc = mel_db @ self.dct  # (B, T, n_mfcc)
        keep = frame_mask[:, :, None]
        return mfcc * keep, spectrogram * keep, frame_lengths
