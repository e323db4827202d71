"""Scores independent of batch mates: what wav2vec2-base's GroupNorm does to them, and what the fix costs (CPU).

wav2vec2-base normalises its first conv layer's output with GroupNorm over the whole sequence, so under Hugging
Face's recipe for it (zero-padded batch, no attention mask: ``model.speech.group_norm="padded"``) an utterance's
valid frames change with the padding its batch mates bring. ``group_norm="valid"`` normalises each utterance over
its own frames and passes the attention mask. A third way is one forward pass per utterance, unpadded.

The speech encoder is wav2vec2-base's published config (7-layer 512-channel conv stack with GroupNorm, 768-d,
12 heads) with ``--layers`` transformer layers and random weights (``pretrained=False``: no download), fp32, eval
mode, no autograd. Utterances: ``--batch`` durations drawn (seeded) from a log-normal with median 3.5 s, clipped
to [0.6, 15] s (the paper preset's crop); audio is seeded noise. Batches: the utterances in random order (one
padded batch) and sorted by length into batches of ``--bucket`` (the least padding a bucketed loader gives).

1. Cost, per utterance, of the speech encoder's forward over the whole set: padded recipe, valid-frame GroupNorm
   (both batched) and per-utterance passes; medians over ``--repeats`` interleaved repeats, ratios to the padded
   recipe measured in the same run.
2. Effect: the relative change of a 1 s utterance's valid wav2vec2 states when padded to 4 s (median over
   frames and channels of |padded - alone| / |alone|), and the largest change of any utterance's logits between
   alone and in the random batch, through the whole model (the paper preset's model with a tiny text encoder;
   "alone" = the utterance's own audio, features and tokens, unpadded).
3. Training side: the joint loss (the paper preset's: alpha .5, beta 1, margin .3, speech space) of a training
   batch planned by ``data.loader.plan_batches`` (batch 8, 2 per class) with and without ``bucket_by_length``,
   against the same loss from each utterance's outputs computed alone; eval mode, so only padding differs.

    python benchmarks/batch_mates.py             # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ser_platform.tracking import git_commit  # noqa: E402

SAMPLE_RATE = 16_000


def base_shaped_folder(folder: Path, layers: int) -> str:
    """A local config folder: wav2vec2-base's published config with ``layers`` transformer layers."""
    from transformers import Wav2Vec2Config

    from ser_platform.models.speech import KNOWN_SPEECH_CONFIGS

    Wav2Vec2Config(**{**KNOWN_SPEECH_CONFIGS["facebook/wav2vec2-base"], "num_hidden_layers": layers}
                   ).save_pretrained(folder)
    return str(folder)


def paper_config(speech_folder: str, group_norm: str):
    """The paper preset with the speech encoder from ``speech_folder`` (random weights) and a tiny text encoder."""
    from ser_platform.config import load_config

    return load_config("paper", overrides={"model.speech.name": speech_folder, "model.speech.group_norm": group_norm,
                                           "model.text.name": "tiny"})


def audio_batch(seconds: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded seeded noise (B, S) and the valid samples per utterance (B,)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([int(s * SAMPLE_RATE) for s in seconds])
    audio = 0.1 * torch.randn(len(seconds), int(lengths.max()), generator=generator)
    return audio * (torch.arange(audio.shape[1])[None] < lengths[:, None]), lengths


def token_ids(counts: list[int], seed: int) -> list[list[int]]:
    """Random transcripts: ``<s>``, ``count`` byte-level token ids, ``</s>``."""
    generator = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(5, 261, (count,), generator=generator).tolist() + [2] for count in counts]


def model_inputs(audio: torch.Tensor, lengths: torch.Tensor, features, ids: list[list[int]]) -> dict:
    """SERModel inputs of a batch: the padded audio, its MFCC and spectrogram (``AcousticFeatures``, as the
    training loop computes them), and the token ids padded with ``<pad>`` (1)."""
    mfcc, spectrogram, frames = features(audio, lengths)
    input_ids = torch.ones(len(ids), max(len(row) for row in ids), dtype=torch.long)
    for b, row in enumerate(ids):
        input_ids[b, :len(row)] = torch.tensor(row)
    return {"input_values": audio, "audio_lengths": lengths, "mfcc": mfcc, "spectrogram": spectrogram,
            "feature_lengths": frames, "input_ids": input_ids, "attention_mask": input_ids != 1}


def utterance_inputs(audio: torch.Tensor, lengths: torch.Tensor, features, ids: list[list[int]]) -> list[dict]:
    """The same utterances one by one, each unpadded: its own audio, features and tokens (a batch of one)."""
    return [model_inputs(audio[b:b + 1, :int(lengths[b])], lengths[b:b + 1], features, [ids[b]])
            for b in range(len(ids))]


def measure_cost(encoders: dict, seconds: list[float], bucket: int, repeats: int) -> dict[str, float]:
    """Median seconds per utterance of each way over the whole set (interleaved repeats, order rotated)."""
    audio, lengths = audio_batch(seconds, seed=1)
    order = np.argsort(seconds, kind="stable")
    ways = {
        "padded recipe, one random batch": lambda: encoders["padded"](audio, lengths),
        "valid-frame GroupNorm, one random batch": lambda: encoders["valid"](audio, lengths),
        f"padded recipe, length-sorted batches of {bucket}": lambda: [
            encoders["padded"](*audio_batch([seconds[i] for i in order[s:s + bucket]], seed=1))
            for s in range(0, len(order), bucket)],
        f"valid-frame GroupNorm, length-sorted batches of {bucket}": lambda: [
            encoders["valid"](*audio_batch([seconds[i] for i in order[s:s + bucket]], seed=1))
            for s in range(0, len(order), bucket)],
        "one pass per utterance (unpadded)": lambda: [
            encoders["valid"](audio[b:b + 1, :int(lengths[b])], lengths[b:b + 1]) for b in range(len(seconds))],
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    with torch.no_grad():
        for name in names:  # warm-up
            ways[name]()
        for repeat in range(repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                started = time.perf_counter()
                ways[name]()
                times[name].append((time.perf_counter() - started) / len(seconds))
    return {name: statistics.median(values) for name, values in times.items()}


def padding_effect(encoder) -> float:
    """Median relative change of a 1 s utterance's valid states when zero-padded to 4 s."""
    audio, lengths = audio_batch([1.0], seed=2)
    padded = torch.cat((audio, torch.zeros(1, 3 * SAMPLE_RATE)), dim=1)
    with torch.no_grad():
        states, mask = encoder(audio, lengths)
        states_padded, _ = encoder(padded, lengths)
    frames = int(mask.sum())
    reference = states[0, :frames]
    return float(((states_padded[0, :frames] - reference).abs() / reference.abs().clamp(min=1e-6)).median())


def build_model(config):
    from ser_platform.models.ser_model import SERModel

    torch.manual_seed(0)
    return SERModel(config.model, pretrained=False).eval()


def logit_change(model, inputs: dict, alone: list[dict]) -> float:
    """Largest |logit alone - logit in the batch| over the batch's utterances."""
    with torch.no_grad():
        batched = model(**inputs).logits
        return max(float((model(**one).logits[0] - batched[b]).abs().max()) for b, one in enumerate(alone))


def loss_change(model, loss_fn, inputs: dict, alone: list[dict], labels: torch.Tensor) -> tuple[float, float]:
    """(joint loss of the padded batch, relative change against the loss of the utterances run alone)."""
    from ser_platform.models.ser_model import SEROutput

    with torch.no_grad():
        batched = loss_fn(model(**inputs), labels).loss
        outputs = [model(**one) for one in alone]
        stacked = SEROutput(**{field: torch.cat([getattr(o, field) for o in outputs])
                               for field in ("logits", "embedding", "speech_embedding", "text_embedding")})
        unpadded = loss_fn(stacked, labels).loss
    return float(batched), abs(float(batched) - float(unpadded)) / abs(float(unpadded))


def training_batches(seed: int) -> dict[bool, tuple[list[float], list[int]]]:
    """(durations, labels) of the first training batch ``plan_batches`` makes from a pool of 64, with and without
    length bucketing (batch 8, 2 per class: the paper preset's class-balanced layout at a CPU-sized batch)."""
    from ser_platform.data.loader import plan_batches

    rng = np.random.default_rng(seed)
    pool_seconds = np.clip(rng.lognormal(np.log(3.5), 0.6, 64), 0.6, 15.0)
    pool_labels = np.tile(np.arange(4), 16)
    batches = {}
    for bucket in (False, True):
        planned, _ = plan_batches(pool_labels, pool_seconds, 8, samples_per_class=2, bucket_by_length=bucket,
                                  rng=np.random.default_rng(seed))
        first = planned[0]
        batches[bucket] = ([float(pool_seconds[i]) for i in first], [int(pool_labels[i]) for i in first])
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="utterances in the cost measurement")
    parser.add_argument("--bucket", type=int, default=4, help="utterances per length-sorted batch")
    parser.add_argument("--layers", type=int, default=2, help="wav2vec2 transformer layers (base: 12)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from ser_platform.data.features import AcousticFeatures, FeatureParams
    from ser_platform.losses import JointLoss
    from ser_platform.models.speech import SSLSpeechEncoder

    rng = np.random.default_rng(args.seed)
    seconds = [float(s) for s in np.clip(rng.lognormal(np.log(3.5), 0.6, args.batch), 0.6, 15.0)]
    print(f"device: CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} logical CPUs, "
          f"{torch.get_num_threads()} torch threads")
    print(f"torch {torch.__version__}, python {platform.python_version()}, git {git_commit()}")
    print(f"speech encoder: wav2vec2-base's config, {args.layers} transformer layers, random weights, fp32, eval")
    print(f"utterances: {', '.join(f'{s:.2f}' for s in seconds)} s")
    with tempfile.TemporaryDirectory(prefix="ser-batch-mates-") as tmp:
        folder = base_shaped_folder(Path(tmp), args.layers)
        configs = {mode: paper_config(folder, mode) for mode in ("padded", "valid")}
        encoders = {}
        for mode, config in configs.items():
            torch.manual_seed(0)
            encoders[mode] = SSLSpeechEncoder(config.model.speech, pretrained=False).eval()
        encoders["valid"].load_state_dict(encoders["padded"].state_dict())

        print("\n1. cost of the speech encoder's forward (median s per utterance; ratio to the padded recipe "
              "on one random batch, same run)\n")
        costs = measure_cost(encoders, seconds, args.bucket, args.repeats)
        baseline = costs["padded recipe, one random batch"]
        print("| way | s per utterance | ratio |")
        print("|---|---:|---:|")
        for name, value in costs.items():
            print(f"| {name} | {value:.3f} | {value / baseline:.2f}x |")

        print("\n2. effect on the scores\n")
        print("| group_norm | 1 s utterance padded to 4 s: median relative change of its wav2vec2 states | "
              "largest logit change, alone vs in the random batch |")
        print("|---|---:|---:|")
        features = AcousticFeatures(FeatureParams.from_speech_config(configs["valid"].model.speech))
        ids = token_ids([int(t) for t in rng.integers(5, 40, args.batch)], seed=3)
        audio, lengths = audio_batch(seconds, seed=1)
        inputs, alone = model_inputs(audio, lengths, features, ids), utterance_inputs(audio, lengths, features, ids)
        models = {mode: build_model(config) for mode, config in configs.items()}
        for mode in ("padded", "valid"):
            change = logit_change(models[mode], inputs, alone)
            print(f"| {mode} | {padding_effect(encoders[mode]):.2e} | {change:.2e} |")

        print("\n3. training side: joint loss of one planned training batch (8 utterances, 2 per class), padded "
              "vs every utterance alone\n")
        print("| bucket_by_length | durations (s) | audio padding | group_norm | loss | relative change |")
        print("|---|---|---:|---|---:|---:|")
        loss_fn = JointLoss(configs["valid"].loss)
        for bucket, (batch_seconds, labels) in training_batches(args.seed).items():
            audio, lengths = audio_batch(batch_seconds, seed=4)
            padding = 1.0 - float(lengths.sum()) / (len(batch_seconds) * audio.shape[1])
            ids = token_ids([int(t) for t in rng.integers(5, 40, len(labels))], seed=5)
            inputs, alone = model_inputs(audio, lengths, features, ids), utterance_inputs(audio, lengths, features, ids)
            for mode in ("padded", "valid"):
                loss, change = loss_change(models[mode], loss_fn, inputs, alone, torch.tensor(labels))
                durations = " ".join(f"{s:.1f}" for s in batch_seconds)
                print(f"| {bucket} | {durations} | {padding:.0%} | {mode} | {loss:.4f} | {change:.2e} |")


if __name__ == "__main__":
    main()
