"""Frozen encoders served from the cache (``ser cache`` + ``data.encoder_cache``) vs recomputed in the loop:
one 5-fold trial each, measured in one run, plus the same comparison in FLOPs at the paper's sizes.

Trial: ``train.fit_folds`` (the plain-torch per-worker loop, no Ray: Ray's fixed start-up would blur the
ratio) over the 5 loso5 folds, the demo preset with ``model.encoders=frozen``, on a synthetic corpus prepared
with its feature columns (``ser prepare --features``: MFCC/spectrogram read, not computed per step, on both sides
alike, so the cached side runs only what the FLOP count holds). Batches come in-process from the Parquet rows
(``loader.LocalFolds``, the library's in-process path).

* recompute: the frozen encoders run on every batch of every epoch (train, validation and test passes);
* cached: ``build_encoder_cache`` once (timed apart), then the same trial reading the cache
  (``open_encoder_cache`` + ``cached_collate``, loading included); the model is built without the encoders.

Both sides give the same fold results (checked and printed): the cache changes the cost, not the trial.

Encoders (``--size mid``, the default): "tiny" encoders, i.e. randomly initialised from their config classes
(no download), of mid size so that they dominate the step as in the paper yet a trial runs in minutes on 2
CPU cores — RoBERTa 512-d, 8 layers, 8 heads (FFN 2048) over the byte-level tokenizer; wav2vec2 512-d, 8
layers, 8 heads (FFN 2048), the tiny 3-layer conv stack at 256 channels (320-sample stride).
``--size tiny`` uses the demo's 32-d encoders (then the ratio says nothing about the paper).

FLOPs (``--flops``, default on): ``FlopCounterMode`` per utterance of 4.5 s and 24 tokens at the paper's sizes
(roberta-large, wav2vec2-base, paper preset heads): the frozen encoders' forward, against the trainable rest's
forward + backward (what remains per step with the cache). Their ratio bounds from below what the cache can
save at the paper's sizes (data handling and the LSTMs' poor hardware use are not in FLOPs).

    python benchmarks/cache.py                      # ~3 min on 2 cores
    python benchmarks/cache.py --features computed  # as it was: MFCC/spectrogram computed on every batch
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ser_platform.tracking import git_commit  # noqa: E402

SIZES = {
    "mid": {"model.text.tiny_hidden_size": 512, "model.text.tiny_num_layers": 8, "model.text.tiny_num_heads": 8,
            "model.speech.tiny_hidden_size": 512, "model.speech.tiny_num_layers": 12,
            "model.speech.tiny_num_heads": 8, "model.speech.tiny_conv_dim": 512},
    "tiny": {},
}


def trial(config, dataset: str, collate) -> tuple[float, dict]:
    from ser_platform.data.loader import LocalFolds
    from ser_platform.train import fit_folds

    started = time.perf_counter()
    results = fit_folds(config, list(config.data.folds), LocalFolds(dataset, config, collate), log=None)
    return time.perf_counter() - started, results


def step_flops(config, seconds: float, tokens: int) -> dict[str, float]:
    """FLOPs per utterance of ``seconds`` of audio and ``tokens`` tokens (batch of one, FlopCounterMode): the
    frozen encoders' forward; the trainable rest's forward + backward (a training step) and forward alone (an
    evaluation step), the rest fed states of the encoders' shapes as the cache feeds it."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.throughput import cpu_attention_flops
    from ser_platform.data.features import AcousticFeatures, FeatureParams
    from ser_platform.models.ser_model import SERModel
    from ser_platform.models.speech import SSLSpeechEncoder
    from ser_platform.models.text import TextEncoder

    samples = int(seconds * 16000)
    audio = torch.randn(1, samples) * 0.1
    audio_lengths = torch.tensor([samples])
    input_ids = torch.randint(5, 255, (1, tokens))
    attention_mask = torch.ones(1, tokens, dtype=torch.bool)
    out = {}
    with torch.inference_mode():
        text = TextEncoder(config.model.text, frozen=True, pretrained=False).eval()
        with FlopCounterMode(display=False, custom_mapping=cpu_attention_flops()) as counter:
            text_states, _ = text(input_ids, attention_mask)
        out["text encoder forward"] = counter.get_total_flops()
        del text
        ssl = SSLSpeechEncoder(config.model.speech, frozen=True, pretrained=False).eval()
        with FlopCounterMode(display=False, custom_mapping=cpu_attention_flops()) as counter:
            ssl_states, _ = ssl(audio, audio_lengths)
        out["speech encoder forward"] = counter.get_total_flops()
        del ssl
    rest = SERModel(config.model, pretrained=False, cached_encoder_states=True).train()
    mfcc, spectrogram, feature_lengths = AcousticFeatures(FeatureParams())(audio, audio_lengths)
    inputs = dict(input_values=None, audio_lengths=audio_lengths, mfcc=mfcc, spectrogram=spectrogram,
                  feature_lengths=feature_lengths, input_ids=None, attention_mask=attention_mask,
                  text_states=text_states.clone(), speech_ssl_states=ssl_states.clone())
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flops()) as counter:
        rest(**inputs).logits.sum().backward()
    out["trainable rest forward + backward"] = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_attention_flops()) as counter:
        rest.eval()(**inputs)
    out["trainable rest forward"] = counter.get_total_flops()
    return out


def flop_ratios(flops: dict[str, float], train_passes: int, eval_passes: int) -> tuple[float, float, float]:
    """(training step, evaluation step, whole trial) FLOP ratios cached / recomputed."""
    encoders = flops["text encoder forward"] + flops["speech encoder forward"]
    train, evaluate = flops["trainable rest forward + backward"], flops["trainable rest forward"]
    trial = (train_passes * train + eval_passes * evaluate) / (train_passes * (train + encoders)
                                                               + eval_passes * (evaluate + encoders))
    return train / (train + encoders), evaluate / (evaluate + encoders), trial


def passes(dataset: str, config) -> tuple[int, int]:
    """Utterance passes of a trial: training (train rows x epochs) and evaluation (val x epochs + test)."""
    import pyarrow.parquet as pq

    from ser_platform.data.folds import fold_spec

    speakers = pq.read_table(dataset, columns=["speaker"]).column("speaker").to_pylist()
    train = evaluate = 0
    for fold in config.data.folds:
        spec = fold_spec(fold, config.data.protocol)
        count = {split: sum(s in getattr(spec, f"{split}_speakers") for s in speakers) for split in ("train", "val",
                                                                                                   "test")}
        train += count["train"] * config.train.epochs
        evaluate += count["val"] * config.train.epochs + count["test"]
    return train, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    parser.add_argument("--utterances-per-session", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--no-flops", dest="flops", action="store_false")
    parser.add_argument("--features", choices=("stored", "computed"), default="stored",
                        help="MFCC/spectrogram read from the dataset's feature columns (ser prepare --features), or "
                             "computed on every batch as before they were (both sides alike)")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from ser_platform.config import load_config
    from ser_platform.data.loader import make_collate
    from ser_platform.data.parquet import prepare_dataset
    from ser_platform.data.synthetic import write_synthetic_corpus
    from ser_platform.frozen_encoders import build_encoder_cache, cached_collate, open_encoder_cache
    from ser_platform.models.ser_model import parameter_counts, SERModel
    from ser_platform.models.text import build_tokenizer

    torch.set_num_threads(args.threads)
    device = "cpu"
    config = load_config("demo", overrides={**SIZES[args.size], "model.encoders": "frozen",
                                            "train.epochs": args.epochs, "train.seed": 0})
    cached_config = config.replace({"data.encoder_cache": "auto"})
    with tempfile.TemporaryDirectory(prefix="ser-bench-cache-") as tmp:
        corpus = write_synthetic_corpus(Path(tmp) / "corpus", utterances_per_session=args.utterances_per_session,
                                        seed=0)
        summary = prepare_dataset(corpus, Path(tmp) / "parquet", features=args.features == "stored")
        dataset = summary["dataset"]
        collate = make_collate(build_tokenizer(config.model.text), max_text_tokens=config.data.max_text_tokens,
                               max_audio_samples=int(config.data.max_audio_seconds * config.data.sample_rate))

        started = time.perf_counter()
        build_encoder_cache(config, dataset, batch_size=16, device=device, progress=False, log=None)
        build_s = time.perf_counter() - started
        cache_bytes = sum(p.stat().st_size for p in Path(dataset + ".cache").rglob("*") if p.is_file())

        def cached_trial():
            started = time.perf_counter()
            served = cached_collate(collate, open_encoder_cache(cached_config, dataset))
            seconds, results = trial(cached_config, dataset, served)
            return time.perf_counter() - started, results

        cached_s, cached_results = cached_trial()
        recompute_s, recompute_results = trial(config, dataset, collate)
        train_passes, eval_passes = passes(dataset, config)
        table = pq.read_table(dataset, columns=["duration", "transcript"])
        mean_seconds = float(np.mean(table.column("duration").to_numpy()))
        tokenizer = build_tokenizer(config.model.text)
        mean_tokens = int(round(np.mean([len(t) for t in tokenizer(table.column("transcript").to_pylist())
                                         ["input_ids"]])))

    same = all(cached_results[k].test_ua == recompute_results[k].test_ua
               and cached_results[k].best_epoch == recompute_results[k].best_epoch for k in recompute_results)
    with torch.device("meta"):
        counts = parameter_counts(SERModel(config.model, pretrained=False))
    print(f"device: CPU, {os.cpu_count()} logical CPUs, {args.threads} torch threads, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, git {git_commit()}")
    print(f"encoders ({args.size}, random, frozen): text RoBERTa {config.model.text.tiny_hidden_size}-d x "
          f"{config.model.text.tiny_num_layers} layers ({counts['text encoder'][0] / 1e6:.1f}M), speech wav2vec2 "
          f"{config.model.speech.tiny_hidden_size}-d x {config.model.speech.tiny_num_layers} layers, conv "
          f"{config.model.speech.tiny_conv_dim} ch ({counts['speech: wav2vec2'][0] / 1e6:.1f}M); trainable rest "
          f"{counts['total'][1] / 1e6:.2f}M (demo preset heads)")
    print(f"data: synthetic, {summary['utterances']} utterances ({summary['seconds']:.0f} s of audio), 5 folds x "
          f"{args.epochs} epochs, batch {config.train.batch_size}, plain-torch loop (train.fit_folds); MFCC/spectrogram "
          f"{'read from the dataset' if args.features == 'stored' else 'computed per batch'}")
    print()
    print("| run | seconds |")
    print("|---|---:|")
    print(f"| build the cache once (`build_encoder_cache`, {cache_bytes / 2**20:.1f} MiB) | {build_s:.1f} |")
    print(f"| 5-fold trial, frozen encoders recomputed | {recompute_s:.1f} |")
    print(f"| 5-fold trial on the cache (loading included) | {cached_s:.1f} |")
    print()
    print(f"same fold results on both sides: {'yes' if same else 'NO'}")
    print(f"ratio cached / recomputed trial: {cached_s / recompute_s:.3f}x (goal <= 0.05x)")
    print(f"ratio with the one-off build counted in: {(cached_s + build_s) / recompute_s:.3f}x; over a 10-trial "
          f"sweep {(10 * cached_s + build_s) / (10 * recompute_s):.3f}x")
    if args.flops:
        paper = load_config("paper", overrides={"model.encoders": "frozen"})
        print()
        print("| FLOPs per utterance (FlopCounterMode) | this run's model | paper sizes |")
        print("|---|---:|---:|")
        ours = step_flops(config, mean_seconds, mean_tokens)
        theirs = step_flops(paper, 4.5, 24)
        print(f"| utterance | {mean_seconds:.2f} s, {mean_tokens} tokens (corpus means) | 4.5 s, 24 tokens |")
        for name in ours:
            print(f"| {name} | {ours[name] / 1e9:.2f} G | {theirs[name] / 1e9:.2f} G |")
        ours_r, theirs_r = flop_ratios(ours, train_passes, eval_passes), flop_ratios(theirs, train_passes, eval_passes)
        for label, index in (("training step", 0), ("evaluation step", 1), ("this trial's passes", 2)):
            print(f"| FLOP ratio cached / recomputed, {label} | {ours_r[index]:.3f}x | {theirs_r[index]:.3f}x |")
        print(f"(trial passes: {train_passes} training, {eval_passes} evaluation utterance-passes; paper sizes: "
              f"roberta-large + wav2vec2-base, the paper preset's acoustic encoders, crossmodal and heads)")
        measured, floor = cached_s / recompute_s, ours_r[2]
        print()
        print(f"measured ratio {measured:.3f}x against this run's FLOP ratio {floor:.3f}x (same model, same passes): "
              f"{measured / floor - 1:+.0%} ({'within' if measured <= 1.15 * floor else 'NOT within'} 15 %)")


if __name__ == "__main__":
    main()
