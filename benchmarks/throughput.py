"""Training throughput of the full model at the paper preset's sizes: utterances per second and model FLOP
utilisation (MFU), fine-tuning steps on synthetic batches of paper-like size.

What one step is: ``train.train_epoch`` over one batch — host-to-device copy, MFCC + spectrogram computed on the
device by ``AcousticFeatures`` (the dataset has no feature columns), forward, joint loss (eq. 9), backward,
gradient clipping, Adam step — under the preset's precision (``paper``: bf16 autocast on CUDA, via
``train.autocast``; fp32 on CPU). The model is ``SERModel(config.model, pretrained=False)``: roberta-large and
wav2vec2-base built from their published configs (``KNOWN_TEXT_CONFIGS`` / ``KNOWN_SPEECH_CONFIGS``), randomly
initialised, no download; encoders fine-tuned as in the paper.

Batches (seeded, made once and cycled so that making them is not timed): ``--batch-size`` utterances (paper:
32) of audio around ``--audio-seconds`` (±0.5 s uniform; IEMOCAP's mean is ~4.5 s) and 24-64 random tokens
between ``<s>`` and ``</s>``; labels balanced over the 4 classes, so the triplet loss has triplets.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one whole step (matmuls, convolutions, attention:
the ops it has formulas for; element-wise ops, the STFT and the optimizer are not counted, as MFU usually
leaves them out). MFU = FLOPs per step / median step time / the GPU's peak dense bf16 FLOP/s from
``PEAK_BF16_DENSE`` (NVIDIA's datasheets; they print the with-sparsity figure, twice these). On a CPU no peak
is known, so no MFU is printed.

    python benchmarks/throughput.py                  # paper sizes, batch 32, ~4.5 s, bf16 on CUDA (GPU run)
    python benchmarks/throughput.py --small          # CPU smoke test: tiny encoders, batch 8, 1 s, 2 steps
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ser_platform.tracking import git_commit  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name(); first match
# wins, so the more specific names come first. Sources: NVIDIA H100 and H200 datasheets ("BF16 Tensor Core
# 1,979 TFLOPS" with sparsity for SXM, 1,513 for H100 PCIe / NVL), A100 datasheet (312), L4 datasheet (242 with
# sparsity), L40S datasheet (733 with sparsity).
PEAK_BF16_DENSE = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)
SMALL = {
    "model.text.name": "tiny", "model.speech.name": "tiny", "model.speech.cnn_channels": 8,
    "model.speech.lstm_hidden": 8, "model.embedding_dim": 16, "train.precision": "fp32",
}


def cpu_attention_flops() -> dict:
    """FlopCounterMode formulas for the CPU's fused attention kernel, which torch's registry lacks (it counts
    the CUDA flash / memory-efficient / cuDNN kernels): the same formulas as for the CUDA flash kernel."""
    from torch.utils import flop_counter

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return f"CPU ({os.cpu_count()} logical CPUs)", None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_DENSE:
        if key in name:
            return name, peak
    return name, None


def make_batches(count: int, *, batch_size: int, audio_seconds: float, vocab_size: int, seed: int = 0) -> list[dict]:
    """Collated batches in the loader's form (``SERCollate``), with no feature columns (computed on device)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        samples = (torch.rand(batch_size, generator=generator) - 0.5 + audio_seconds).mul(16000).long().clamp(min=8000)
        audio = torch.randn(batch_size, int(samples.max()), generator=generator) * 0.1
        audio *= torch.arange(audio.shape[1])[None, :] < samples[:, None]
        tokens = torch.randint(24, 65, (batch_size,), generator=generator)
        input_ids = torch.full((batch_size, int(tokens.max())), 1, dtype=torch.long)  # <pad> = 1
        for b, n in enumerate(tokens.tolist()):
            input_ids[b, 0], input_ids[b, n - 1] = 0, 2  # <s> ... </s>
            input_ids[b, 1:n - 1] = torch.randint(5, vocab_size, (n - 2,), generator=generator)
        labels = torch.arange(batch_size) % 4
        batches.append({
            "input_values": audio.pin_memory() if torch.cuda.is_available() else audio,
            "audio_lengths": samples, "input_ids": input_ids, "attention_mask": input_ids != 1,
            "labels": labels[torch.randperm(batch_size, generator=generator)],
            "ids": [f"u{i}" for i in range(batch_size)], "mode": ["improvised"] * batch_size,
            "mfcc": None, "spectrogram": None, "feature_lengths": None,
        })
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", "--tiny", action="store_true",
                        help="CPU smoke test: tiny encoders, batch 8, 1 s of audio, fp32, 2 timed steps")
    parser.add_argument("--device", help="default: cuda when there is one, else cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--audio-seconds", type=float)
    parser.add_argument("--steps", type=int, help="timed steps (default 20; --small 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; --small 1)")
    parser.add_argument("--attn-implementation", choices=["eager", "sdpa", "flex_attention"])
    args = parser.parse_args()

    from torch.utils.flop_counter import FlopCounterMode

    from ser_platform.config import load_config
    from ser_platform.data.features import AcousticFeatures, FeatureParams
    from ser_platform.losses import JointLoss
    from ser_platform.models.ser_model import SERModel, parameter_counts
    from ser_platform.models.text import build_text_encoder_config
    from ser_platform.train import autocast, model_inputs, seed_everything, to_device, train_epoch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = dict(SMALL) if args.small else {}
    if args.attn_implementation:
        overrides["model.attn_implementation"] = args.attn_implementation
    config = load_config("paper", overrides=overrides)
    batch_size = args.batch_size or (8 if args.small else config.train.batch_size)
    audio_seconds = args.audio_seconds or (1.0 if args.small else 4.5)
    steps = args.steps or (2 if args.small else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 3)
    if device.type == "cpu":
        config = config.replace({"train.precision": "fp32"})  # bf16 autocast is a CUDA path (train.autocast)

    seed_everything(0)
    started = time.perf_counter()
    with torch.device(device):
        model = SERModel(config.model, pretrained=False)
    build_s = time.perf_counter() - started
    loss_fn = JointLoss(config.loss).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.train.lr)
    features = AcousticFeatures(FeatureParams.from_speech_config(config.model.speech, config.data.sample_rate))
    features = features.to(device)
    vocab = int(build_text_encoder_config(config.model.text, pretrained=False).vocab_size)
    batches = make_batches(4, batch_size=batch_size, audio_seconds=audio_seconds, vocab_size=vocab)

    def step(batch) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        train_epoch(model, loss_fn, optimizer, [batch], config=config, features=features, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - tick

    for i in range(warmup):
        step(batches[i % len(batches)])
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flops()) as counter:
        step(batches[0])
    flops = counter.get_total_flops()
    # Shares of the forward alone: FlopCounterMode attributes forward FLOPs to modules reliably, backward ones not.
    with torch.no_grad(), autocast(config, device), \
            FlopCounterMode(display=False, custom_mapping=cpu_attention_flops()) as forward_counter:
        model(**model_inputs(to_device(batches[0], device), features))
    forward_flops = forward_counter.get_total_flops()
    by_module = forward_counter.get_flop_counts()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [step(batches[i % len(batches)]) for i in range(steps)]
    step_s = statistics.median(times)
    name, peak = peak_flops(device)

    def share(prefix: str) -> float:
        return sum(by_module.get(prefix, {}).values()) / forward_flops if forward_flops else float("nan")

    counts = parameter_counts(model)
    print(f"device: {name}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, git {git_commit()}")
    print(f"model: text {config.model.text.name}, speech {config.model.speech.name}, encoders "
          f"{config.model.encoders}, {counts['total'][0] / 1e6:.1f}M parameters ({counts['total'][1] / 1e6:.1f}M "
          f"trainable), attention {config.model.attn_implementation}, precision {config.train.precision}; "
          f"built in {build_s:.1f} s")
    lengths = [int(n) for b in batches for n in b["audio_lengths"]]
    tokens = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    print(f"batches: {batch_size} utterances, audio {min(lengths) / 16000:.2f}-{max(lengths) / 16000:.2f} s "
          f"(mean {statistics.mean(lengths) / 16000:.2f}), text {min(tokens)}-{max(tokens)} tokens; MFCC and "
          f"spectrogram computed on {device.type}")
    print(f"steps: {warmup} warm-up, {steps} timed; step time median {step_s * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
    print(f"FLOPs per step (FlopCounterMode, fwd + bwd): {flops / 1e9:,.1f} GFLOP; of the forward "
          f"({forward_flops / 1e9:,.1f} GFLOP): text encoder {share('SERModel.text_encoder'):.0%}, wav2vec2 "
          f"{share('SERModel.speech_encoder.ssl'):.0%}, the rest "
          f"{1 - share('SERModel.text_encoder') - share('SERModel.speech_encoder.ssl'):.0%}")
    if device.type == "cuda":
        print(f"peak memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"throughput: {batch_size / step_s:.1f} utterances/s")
    if peak:
        print(f"MFU: {flops / step_s / peak:.1%} of {peak / 1e12:.0f} TFLOP/s (dense bf16 peak of {name})")
    else:
        print("MFU: n/a (no peak FLOP/s known for this device)")


if __name__ == "__main__":
    main()
