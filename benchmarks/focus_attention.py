"""Cost of focus attention: CrossmodalFusion (both directions) with vs without the focal bias, fwd + bwd.

Both variants are built from the same seed and run on the same padded batch, interleaved (the order flips every
repeat) so machine noise hits both alike; the figures are medians over repeats. Memory: on CUDA the peak of
torch.cuda.max_memory_allocated over one step; on CPU (where no allocator peak is exposed) the bytes of the
tensors autograd saves for backward, counted once per storage through saved_tensors_hooks — the activation
memory a training step holds at its peak.

    python benchmarks/focus_attention.py                 # CPU, ~1-2 min on 2 cores
    python benchmarks/focus_attention.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ser_platform.config import ModelConfig  # noqa: E402
from ser_platform.models.crossmodal import CrossmodalFusion  # noqa: E402
from ser_platform.tracking import git_commit  # noqa: E402


def make_batch(args, device):
    generator = torch.Generator().manual_seed(0)
    # True lengths between half and all of the padded length, as in a length-sorted-free random batch.
    text_lengths = torch.randint(args.text_tokens // 2, args.text_tokens + 1, (args.batch,), generator=generator)
    speech_lengths = torch.randint(args.speech_frames // 2, args.speech_frames + 1, (args.batch,), generator=generator)
    text_lengths[0], speech_lengths[0] = args.text_tokens, args.speech_frames
    text = torch.randn(args.batch, args.text_tokens, args.text_dim, generator=generator)
    speech = torch.randn(args.batch, args.speech_frames, args.speech_dim, generator=generator)
    text_mask = torch.arange(args.text_tokens)[None] < text_lengths[:, None]
    speech_mask = torch.arange(args.speech_frames)[None] < speech_lengths[:, None]
    return tuple(t.to(device) for t in (text, text_mask, speech, speech_mask))


def build(args, focus_attention, device):
    torch.manual_seed(0)
    config = ModelConfig(embed_dim=args.embed_dim, num_heads=args.num_heads, num_layers=args.num_layers,
                         attn_dropout=args.attn_dropout, focus_attention=focus_attention,
                         attn_implementation=args.attn_implementation)
    return CrossmodalFusion(config, args.text_dim, args.speech_dim).to(device).train()


def step(model, batch):
    model.zero_grad(set_to_none=True)
    output = model(*batch)
    (output.audio_from_text.sum() + output.text_from_audio.sum()).backward()


def timed_step(model, batch, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(model, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def saved_for_backward_bytes(model, batch) -> int:
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(*batch)
    (output.audio_from_text.sum() + output.text_from_audio.sum()).backward()
    return sum(storages.values())


def cuda_peak_bytes(model, batch) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step(model, batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--speech-frames", type=int, default=600)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--text-dim", type=int, default=1024, help="roberta-large width")
    parser.add_argument("--speech-dim", type=int, default=768, help="wav2vec2-base width")
    parser.add_argument("--embed-dim", type=int, default=40)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--attn-implementation", default="sdpa", choices=["eager", "sdpa", "flex_attention"])
    parser.add_argument("--attn-dropout", type=float, default=0.1, help="MulT's default; 0 changes the CPU kernel")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")

    load_before = os.getloadavg()[0]
    batch = make_batch(args, device)
    models = {"focus": build(args, True, device), "plain": build(args, False, device)}
    for _ in range(args.warmup):
        for model in models.values():
            step(model, batch)
    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(args.repeats):
        order = list(models) if repeat % 2 == 0 else list(models)[::-1]
        for name in order:
            times[name].append(timed_step(models[name], batch, device))

    if device.type == "cuda":
        memory_kind = "torch.cuda.max_memory_allocated over one fwd+bwd step (above the resident model+inputs)"
        memory = {name: cuda_peak_bytes(model, batch) for name, model in models.items()}
        device_name = torch.cuda.get_device_name(device)
    else:
        memory_kind = "bytes of tensors saved for backward (saved_tensors_hooks, one count per storage)"
        memory = {name: saved_for_backward_bytes(model, batch) for name, model in models.items()}
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    median = {name: statistics.median(values) for name, values in times.items()}
    # The one T_q×T_k float tensor focus attention adds per attention call (both directions, every layer).
    bias_bytes = 2 * args.num_layers * args.batch * args.speech_frames * args.text_tokens * 4

    print(f"device: {device_name}; torch {torch.__version__}; commit {git_commit()}; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other jobs share the CPU)")
    print(f"sizes: batch {args.batch}, speech frames {args.speech_frames}, text tokens {args.text_tokens}, "
          f"text_dim {args.text_dim}, speech_dim {args.speech_dim}, embed {args.embed_dim}, heads {args.num_heads}, "
          f"layers {args.num_layers} per direction, both directions, {args.attn_implementation}, "
          f"attn_dropout {args.attn_dropout}, true lengths in [T/2, T], train mode")
    print(f"fwd+bwd median over {args.repeats} interleaved repeats (after {args.warmup} warm-up): "
          f"with FA {median['focus'] * 1e3:.1f} ms, without FA {median['plain'] * 1e3:.1f} ms")
    print(f"time ratio (with / without FA): {median['focus'] / median['plain']:.3f}  (goal <= 1.15)")
    print(f"memory [{memory_kind}]: with FA {memory['focus'] / 2**20:.1f} MiB, without FA "
          f"{memory['plain'] / 2**20:.1f} MiB, ratio {memory['focus'] / memory['plain']:.3f}")
    print(f"focal bias tensors (B×T_A×T_L fp32 per attention call, {2 * args.num_layers} calls): "
          f"{bias_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
