"""Predicted peak GPU memory of one training step of the paper preset, per GPU type, measured on the CPU.

The model is ``SERModel(preset("paper").model, pretrained=False)``: roberta-large (24 layers, 1024-d, 16 heads,
4096 intermediate) and wav2vec2-base built from their published configs (``KNOWN_TEXT_CONFIGS`` /
``KNOWN_SPEECH_CONFIGS``), random weights, encoders fine-tuned as in the paper, Adam, train mode (dropout on).

What is counted, per training step at batch B, audio padded to A seconds and text to T tokens:

* parameters (fp32), gradients (fp32, trainable parameters only), Adam's two moments (fp32, trainable only):
  ``numel * 4`` bytes each, counted from the module;
* inputs: the padded waveform, the MFCC and spectrogram (computed on the device from it) and the token ids;
* activations: every tensor autograd saves for backward during the forward, found through
  ``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage; parameters and inputs are left out
  (counted above). The forward runs in three parts that add up to the model: RoBERTa alone on the tokens,
  wav2vec2 alone on the audio, and the rest of ``SERModel.forward`` (MFCC/spectrogram encoders, guided attention,
  crossmodal fusion, heads) fed with those two parts' states as ``text_states`` / ``speech_ssl_states``.

Extrapolation from small batches: each part is measured at batch 1 and batch 2 at every length; saved bytes
are linear in the batch (a per-sample slope plus a batch-independent intercept, e.g. autocast's bf16 copies of
the weights), so bytes(B) = bytes(1) + (B - 1) * (bytes(2) - bytes(1)). ``tests/unit/test_memory_benchmark.py``
checks that line against a direct measurement at a larger batch.

Measured without doing the arithmetic: matmuls, convolutions and fused attention run as "shape only" (their
result is a zero tensor of the shape, dtype and strides their meta kernel gives), so roberta-large at 512 tokens
costs no FLOPs here; the saved tensors are the same tensors as in a real step (the unit test compares both).

Where a CPU step differs from a CUDA step, the counting follows CUDA:

* attention: CUDA's fused SDPA kernels (memory-efficient, flash) save q, k, v, the mask or bias, the output and
  the log-sum-exp, never the T_q x T_k probabilities nor a dropout mask; on the CPU, attention dropout or a bias
  that needs a gradient (focus attention's) sends SDPA to the math kernel, which saves both. SDPA is therefore
  counted as the CPU's fused kernel saves it (dropout 0, the bias detached): what the CUDA kernels keep.
* bf16: the CPU's autocast has other op lists than CUDA's (CUDA runs layer_norm, group_norm, softmax in fp32),
  and bf16 matmuls are very slow on this CPU, so ``CudaBf16Autocast`` applies CUDA's policy (PyTorch's AMP page,
  "CUDA Ops that can autocast to float16" / "... to float32") at the function level, caching the bf16 copies
  of the weights as autocast does.

Peak of a step, an upper bound: backward starts with every activation alive and ends with every gradient
allocated, so peak = parameters + Adam + inputs + activations + gradients + the largest single activation (its
gradient lives beside it during backward) + with checkpointing the largest checkpointed layer's activations
(recomputed in backward); the optimizer step's own peak (PyTorch's foreach Adam allocates one temporary the size
of the trainable parameters) is taken when it is larger. A GPU fits when that peak is at most 85 % of its memory
less ``CONTEXT_GIB`` (CUDA context, cuBLAS workspace): at least 15 % headroom.

Switches, each as real SER fine-tuning uses it, set directly on the modules:

* ``frozen FE``: wav2vec2's convolutional feature encoder frozen (Hugging Face's ``freeze_feature_encoder()``);
* ``checkpointing``: activation (gradient) checkpointing on both encoders (Hugging Face's
  ``activation_checkpointing_enable()``, which transformers 5 names the deprecated ``gradient_checkpointing_enable``);
* ``bf16``: autocast to bfloat16 (the paper preset's ``train.precision``);
* length bucketing: a batch of B is B x the longest utterance in it, and with a fixed batch size the longest
  bucket still holds B utterances near the crop length, so bucketing does not lower the peak (it lowers the
  mean padding, hence time): the table's lengths are what a batch is padded to.

    python benchmarks/memory.py            # paper sizes, ~23 min on 2 CPU cores
    python benchmarks/memory.py --small    # tiny encoders, seconds (the unit test runs it)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map_only

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ser_platform.config import ModelConfig, preset  # noqa: E402
from ser_platform.models.ser_model import SERModel  # noqa: E402
from ser_platform.models.speech import spectrogram_bins  # noqa: E402
from ser_platform.tracking import git_commit  # noqa: E402

GIB = 2**30
SAMPLE_RATE = 16_000
FEATURE_HOP = 160  # 10 ms at 16 kHz: the MFCC/spectrogram frame rate (data/features.py)
HEADROOM = 0.15
CONTEXT_GIB = 0.5
# Memory per GPU as sold (decimal GB), the list; gpu_check.sh prints a real card's total to compare.
GPUS = (("L4", 24), ("A10G", 24), ("L40S", 48), ("A100-40GB", 40), ("A100-80GB", 80), ("H100-80GB", 80))
SMALL = {"model.text.name": "tiny", "model.speech.name": "tiny", "model.speech.cnn_channels": 8,
         "model.speech.lstm_hidden": 8, "model.embedding_dim": 16, "model.num_layers": 1}

PARTS = ("text encoder", "wav2vec2", "rest")

aten = torch.ops.aten
# The FLOP-heavy ops: run as shape only (their outputs' values never change what autograd saves).
SHAPE_ONLY_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                  aten.convolution.default, aten._scaled_dot_product_flash_attention_for_cpu.default}
# CUDA autocast's lists (PyTorch's AMP page), by function name; the rest runs in whatever dtype it is given.
CUDA_LOWER_PRECISION = {"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm",
                        "conv1d", "conv2d", "conv_transpose1d", "einsum", "prelu", "scaled_dot_product_attention",
                        "lstm"}  # cuDNN's RNN autocasts too (weights cast and re-flattened)
CUDA_FP32 = {"layer_norm", "group_norm", "softmax", "log_softmax", "cross_entropy", "nll_loss", "normalize",
             "cdist", "exp", "log", "pow", "__pow__", "rsqrt", "reciprocal", "norm", "cumsum", "logsumexp"}


class ShapeOnly(TorchDispatchMode):
    """Below autograd: the ops of ``SHAPE_ONLY_OPS`` return zeros shaped by their meta kernel, the rest runs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in SHAPE_ONLY_OPS:
            return func(*args, **kwargs)
        meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        result = func(*meta_args, **meta_kwargs)
        return tree_map_only(torch.Tensor, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).zero_(),
                             result)


class CudaPolicy(TorchFunctionMode):
    """Above autograd: SDPA saves what CUDA's fused kernels save (see the module docstring); with ``bf16``, CUDA
    autocast's policy besides, with autocast's cache of bf16 weight copies."""

    def __init__(self, bf16: bool = False, replay: bool = True) -> None:
        super().__init__()
        self.bf16, self.replay = bf16, replay
        self.weight_cache: dict[int, torch.Tensor] = {}

    def cast(self, value, dtype):
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()) or value.dtype == dtype:
            return value
        if value.is_leaf and value.requires_grad:  # a parameter: autocast casts it once per forward
            key = (id(value), dtype)
            if key not in self.weight_cache:
                self.weight_cache[key] = value.to(dtype)
            return self.weight_cache[key]
        return value.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        bias = kwargs.get("attn_mask")
        if name == "scaled_dot_product_attention":
            kwargs["dropout_p"] = 0.0
            if isinstance(bias, torch.Tensor):
                kwargs["attn_mask"] = bias.detach()
        if self.bf16 and (name in CUDA_LOWER_PRECISION or (name in CUDA_FP32 and kwargs.get("dtype") is None)):
            dtype = torch.bfloat16 if name in CUDA_LOWER_PRECISION else torch.float32
            args, kwargs = tree_map_only(torch.Tensor, lambda t: self.cast(t, dtype), (args, kwargs))
        if name == "lstm" and self.replay:
            return replay_lstm(func, args, kwargs)
        if name == "scaled_dot_product_attention" and isinstance(bias, torch.Tensor) and bias.requires_grad:
            # The bias's own graph (focus attention's parameters) stays alive, as the CUDA kernel's gradient keeps it.
            return KeepGraph.apply(func(*args, **kwargs), bias)
        return func(*args, **kwargs)


class KeepGraph(torch.autograd.Function):
    """Returns ``output`` and holds ``source``'s graph in its own, saving nothing."""

    @staticmethod
    def forward(ctx, output, source):
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# nn.LSTM steps through time at ~5 ms a step on this CPU (and below a dispatch mode one small op at a time), while
# what it saves depends on shapes alone: each distinct call runs natively once, in fp32, recording its saves.
LSTM_SAVES: dict[tuple, tuple[list, list]] = {}


def replay_lstm(func, args, kwargs):
    """``torch.lstm`` as its saves and output shapes, through ``ReplaySaves``, recorded once per shape. A save is
    one of the call's inputs, one of its outputs or a storage of its own (bytes; floating ones in the dtype of the
    call's input: bf16 under autocast, as cuDNN's autocast RNN saves); views of one storage stay one storage."""
    flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
    options = tuple(a for a in tree_flatten(args)[0] if not isinstance(a, torch.Tensor))
    key = (tuple(tuple(t.shape) for t in flat), options)
    if key not in LSTM_SAVES:
        copies = {id(t): t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t
                  for t in flat}
        recorded: list[torch.Tensor] = []

        def record(tensor):
            recorded.append(tensor.detach())  # not the tensor itself: see count_saved
            return recorded[-1]

        native_args, native_kwargs = tree_map_only(torch.Tensor, lambda t: copies[id(t)], (args, kwargs))
        with torch.autograd.graph.saved_tensors_hooks(record, lambda packed: packed), _disable_current_modes():
            outputs = func(*native_args, **native_kwargs)
        where = {copies[id(t)].untyped_storage().data_ptr(): ("input", i) for i, t in enumerate(flat)}
        where.update({o.untyped_storage().data_ptr(): ("output", k) for k, o in enumerate(outputs)})
        saves = []
        for tensor in recorded:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in where:
                where[storage.data_ptr()] = ("own", storage.nbytes(), tensor.is_floating_point(), len(where))
            saves.append(where[storage.data_ptr()])
        LSTM_SAVES[key] = (saves, [(tuple(o.shape), o.dtype) for o in outputs])
    saves, outputs = LSTM_SAVES[key]
    return ReplaySaves.apply(saves, outputs, args[0].dtype, *flat)


class ReplaySaves(torch.autograd.Function):
    """Saves for backward what a recorded op saved and returns zeros of its output shapes. Counting only: its
    backward never runs."""

    @staticmethod
    def forward(ctx, saves, outputs, dtype, *inputs):
        results = tuple(torch.zeros(shape, dtype=dtype if recorded.is_floating_point else recorded)
                        for shape, recorded in outputs)
        own: dict[int, torch.Tensor] = {}
        for entry in saves:
            if entry[0] == "own" and entry[3] not in own:
                nbytes = entry[1] * dtype.itemsize // 4 if entry[2] else entry[1]  # recorded in fp32
                own[entry[3]] = torch.empty(nbytes, dtype=torch.uint8)
        ctx.save_for_backward(*(inputs[e[1]] if e[0] == "input" else results[e[1]] if e[0] == "output" else own[e[3]]
                                for e in saves))
        return results

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("benchmarks/memory.py counts saved tensors; it never runs backward")


@dataclass
class Saved:
    """Bytes autograd holds for backward once a forward has returned (one count per storage), the largest
    storage, and the most any one checkpointable layer (Hugging Face's ``GradientCheckpointingLayer``) holds."""

    total: int = 0
    largest: int = 0
    largest_layer: int = 0


def count_saved(model: torch.nn.Module, run, *, bf16: bool, exclude: tuple[torch.Tensor, ...] = (),
                shape_only: bool = True, replay: bool = True) -> Saved:
    """Run ``run()`` (a forward), keep its output, and count what autograd still holds for backward: a save
    whose graph was dropped during the forward (a checkpointed frozen layer's inputs, say) does not count. The
    storages of the model's parameters and of ``exclude`` (the inputs) are left out. ``shape_only`` / ``replay``
    off: the FLOPs and the LSTM run for real (the unit test's reference)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    known = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *exclude)}
    saves: list[tuple] = []  # (weak reference to what the graph holds, storage address, bytes, layer call)
    running: list[int] = []  # the checkpointable layer calls now running, innermost last
    calls = itertools.count()

    def pack(tensor):
        # Not the tensor itself: an op's saved output would then hold its own grad_fn, a cycle that never frees.
        packed = tensor.detach()
        storage = tensor.untyped_storage()
        saves.append((weakref.ref(packed), storage.data_ptr(), storage.nbytes(), running[-1] if running else None))
        return packed

    def enter(module, args) -> None:
        running.append(next(calls))

    def leave(module, args, output) -> None:  # returns None: a forward hook's result would replace the output
        running.pop()

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    handles = [h for m in layers for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda packed: packed), \
                ShapeOnly() if shape_only else contextlib.nullcontext(), CudaPolicy(bf16=bf16, replay=replay):
            output = run()
        alive: dict[int, int] = {}
        per_layer: dict[int, int] = collections.Counter()
        for reference, address, nbytes, layer in saves:
            if nbytes and address not in known and address not in alive and reference() is not None:
                alive[address] = nbytes
                if layer is not None:
                    per_layer[layer] += nbytes
        del output
    finally:
        for handle in handles:
            handle.remove()
    return Saved(total=sum(alive.values()), largest=max(alive.values(), default=0),
                 largest_layer=max(per_layer.values(), default=0))


def build_model(model_config: ModelConfig, *, frozen_fe: bool = False, checkpointing: bool = False) -> SERModel:
    """The model of the preset (random weights, train mode) with exactly these switches: the config keys
    ``model.speech.freeze_feature_encoder`` and ``model.gradient_checkpointing`` set as given, whatever the preset
    says (the paper preset has both on: the variants measure each)."""
    model_config = dataclasses.replace(
        model_config, gradient_checkpointing=checkpointing,
        speech=dataclasses.replace(model_config.speech, freeze_feature_encoder=frozen_fe))
    torch.manual_seed(0)
    return SERModel(model_config, pretrained=False).train()


def state_bytes(model: torch.nn.Module) -> dict[str, int]:
    """fp32 parameters, gradients of the trainable ones, and Adam's exp_avg + exp_avg_sq of the trainable ones."""
    total = sum(p.numel() for p in model.parameters()) * 4
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    return {"parameters": total, "gradients": trainable, "adam": 2 * trainable}


def audio_inputs(model: SERModel, batch: int, seconds: float) -> dict[str, torch.Tensor]:
    samples = int(seconds * SAMPLE_RATE)
    frames = 1 + samples // FEATURE_HOP
    speech = model.config.speech
    return {"input_values": torch.randn(batch, samples) * 0.1,
            "audio_lengths": torch.full((batch,), samples),
            "mfcc": torch.randn(batch, frames, speech.n_mfcc),
            "spectrogram": torch.randn(batch, frames, spectrogram_bins(speech)),
            "feature_lengths": torch.full((batch,), frames)}


def text_inputs(batch: int, tokens: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(5, 250, (batch, tokens)),
            "attention_mask": torch.ones(batch, tokens, dtype=torch.bool)}


def measure_parts(model: SERModel, batch: int, seconds: float, tokens: int, *, bf16: bool,
                  parts: tuple[str, ...] = PARTS) -> dict[str, Saved]:
    """Saved bytes of the three parts whose sum is one forward of the whole model (or of those in ``parts``)."""
    audio, text = audio_inputs(model, batch, seconds), text_inputs(batch, tokens)
    frames = int(model.speech_encoder.ssl.frame_lengths(audio["audio_lengths"]).max())
    text_states = torch.randn(batch, tokens, model.text_encoder.output_dim, requires_grad=True)
    ssl_states = torch.randn(batch, frames, model.speech_encoder.ssl.output_dim, requires_grad=True)
    inputs = (*audio.values(), *text.values(), text_states, ssl_states)
    runs = {
        "text encoder": lambda: model.text_encoder(text["input_ids"], text["attention_mask"]),
        "wav2vec2": lambda: model.speech_encoder.ssl(audio["input_values"], audio["audio_lengths"]),
        "rest": lambda: model(**audio, **text, text_states=text_states, speech_ssl_states=ssl_states),
    }
    return {name: count_saved(model, runs[name], bf16=bf16, exclude=inputs) for name in parts}


def linear_in_batch(at_1: float, at_2: float, batch: int) -> float:
    """bytes(B) from bytes(1) and bytes(2): an intercept (batch-independent) plus a per-sample slope."""
    return at_1 + (batch - 1) * (at_2 - at_1)


def input_bytes(model: SERModel, batch: int, seconds: float, tokens: int) -> int:
    tensors = (*audio_inputs(model, 1, seconds).values(), *text_inputs(1, tokens).values())
    return batch * sum(t.numel() * t.element_size() for t in tensors)


class Predictor:
    """Activation bytes of each part at ``batch``, extrapolated from batches 1 and 2. RoBERTa's depend on the
    tokens alone and wav2vec2's on the audio alone, so each is measured once per length."""

    def __init__(self, model: SERModel, batch: int, *, bf16: bool) -> None:
        self.model, self.batch, self.bf16 = model, batch, bf16
        self.memo: dict[tuple, dict[str, float]] = {}

    def part(self, name: str, seconds: float, tokens: int) -> dict[str, float]:
        key = (name, seconds if name != "text encoder" else None, tokens if name != "wav2vec2" else None)
        if key not in self.memo:
            one, two = (measure_parts(self.model, b, seconds, tokens, bf16=self.bf16, parts=(name,))[name]
                        for b in (1, 2))
            self.memo[key] = {k: linear_in_batch(getattr(one, k), getattr(two, k), self.batch)
                              for k in ("total", "largest", "largest_layer")}
        return self.memo[key]

    def terms(self, seconds: float, tokens: int) -> dict:
        """The terms of the predicted peak (bytes), without the recomputed layer (see ``run``)."""
        parts = {name: self.part(name, seconds, tokens) for name in PARTS}
        return {**state_bytes(self.model), "inputs": input_bytes(self.model, self.batch, seconds, tokens),
                "activations": sum(p["total"] for p in parts.values()),
                "largest activation": max(p["largest"] for p in parts.values()),
                "largest layer": max(p["largest_layer"] for p in parts.values()),
                "parts": {name: p["total"] for name, p in parts.items()}}


def peak(terms: dict, recomputed_layer: float) -> float:
    """Upper bound of a step's peak (module docstring): the backward's or the optimizer step's, the larger."""
    backward = sum(terms[k] for k in ("parameters", "gradients", "adam", "inputs", "activations",
                                      "largest activation")) + recomputed_layer
    step = terms["parameters"] + terms["adam"] + 2 * terms["gradients"]  # + foreach Adam's temporary
    return max(backward, step)


def usable_gib(gigabytes: float) -> float:
    return gigabytes * 1e9 / GIB - CONTEXT_GIB


def fits(peak_bytes: float, gigabytes: float) -> bool:
    return peak_bytes / GIB <= (1 - HEADROOM) * usable_gib(gigabytes)


VARIANTS = (  # (label, frozen FE, checkpointing, bf16): fp32 first, then bf16 and its switches
    ("fp32", False, False, False),
    ("bf16", False, False, True),
    ("bf16 + frozen FE", True, False, True),
    ("bf16 + checkpointing", False, True, True),
    ("bf16 + frozen FE + checkpointing", True, True, True),
)


def run(model_config: ModelConfig, batch: int, seconds: list[float], tokens: list[int],
        variants: tuple = VARIANTS) -> list[dict]:
    """One row per (variant, audio length, token count). With checkpointing, backward recomputes one layer at a
    time: its activations are the largest layer's of the same variant without checkpointing (which ``variants``
    must then hold, earlier)."""
    rows: list[dict] = []
    for label, frozen_fe, checkpointing, bf16 in variants:
        predictor = Predictor(build_model(model_config, frozen_fe=frozen_fe, checkpointing=checkpointing), batch,
                              bf16=bf16)
        for audio in seconds:
            for text in tokens:
                terms = predictor.terms(audio, text)
                recomputed = 0.0
                if checkpointing:
                    recomputed = next(r["largest layer"] for r in rows if (r["frozen FE"], r["bf16"], r["seconds"],
                                      r["tokens"], r["checkpointing"]) == (frozen_fe, bf16, audio, text, False))
                rows.append({"variant": label, "batch": batch, "frozen FE": frozen_fe,
                             "checkpointing": checkpointing, "bf16": bf16,
                             "seconds": audio, "tokens": text, **terms, "recomputed layer": recomputed,
                             "peak": peak(terms, recomputed)})
    return rows


def print_report(rows: list[dict], batch: int, model_config: ModelConfig, elapsed: float, paper: str) -> None:
    print(f"device: CPU ({os.cpu_count()} logical CPUs), measuring only; torch {torch.__version__}, "
          f"python {platform.python_version()}, git {git_commit()}; {elapsed:.0f} s")
    print(f"model: text {model_config.text.name}, speech {model_config.speech.name}, encoders "
          f"{model_config.encoders}, attention {model_config.attn_implementation}; batch {batch} (extrapolated "
          "from batches 1 and 2); GiB = 2^30 bytes")
    print(f"the paper preset's own switches: {paper}")
    print("\nstate (GiB): " + "; ".join(
        f"{r['variant']}: parameters {r['parameters'] / GIB:.2f}, gradients {r['gradients'] / GIB:.2f}, "
        f"Adam {r['adam'] / GIB:.2f}" for r in rows if r is first_of(rows, r["variant"])))
    tokens = sorted({r["tokens"] for r in rows})
    print(f"\nactivations at batch {batch}, GiB (text encoder + wav2vec2 + rest), by tokens:\n")
    print("| variant | audio s | " + " | ".join(f"{t} tok" for t in tokens) + " |")
    print("|---|---:|" + "---:|" * len(tokens))
    for variant, audio in unique((r["variant"], r["seconds"]) for r in rows):
        cells = [r for r in rows if r["variant"] == variant and r["seconds"] == audio]
        print(f"| {variant} | {audio:g} | " + " | ".join(
            "{:.1f} ({:.1f} + {:.1f} + {:.1f})".format(r["activations"] / GIB, *(v / GIB for v in r["parts"].values()))
            for r in cells) + " |")
    print(f"\npredicted peak per step at batch {batch}, GiB; per GPU the headroom left (fits: >= {HEADROOM:.0%} of "
          f"its memory less {CONTEXT_GIB} GiB of CUDA context):\n")
    print("| variant | audio s | tokens | peak GiB | " + " | ".join(f"{name} ({gb} GB)" for name, gb in GPUS) + " |")
    print("|---|---:|---:|---:|" + "---|" * len(GPUS))
    for r in rows:
        cells = [f"{1 - r['peak'] / GIB / usable_gib(gb):+.0%} {'fits' if fits(r['peak'], gb) else 'no'}"
                 for _, gb in GPUS]
        print(f"| {r['variant']} | {r['seconds']:g} | {r['tokens']} | {r['peak'] / GIB:.1f} | "
              + " | ".join(cells) + " |")


def paper_variant(config) -> str:
    """The label of the variant whose switches are the paper preset's own (read from the preset, so the label
    follows the preset when its switches change)."""
    switches = (config.model.speech.freeze_feature_encoder, config.model.gradient_checkpointing,
                config.train.precision == "bf16")
    return next(label for label, *rest in VARIANTS if tuple(rest) == switches)


def first_of(rows: list[dict], variant: str) -> dict:
    return next(r for r in rows if r["variant"] == variant)


def unique(items):
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true",
                        help="tiny encoders, one crossmodal layer, 1 s of audio, 8 tokens: seconds")
    parser.add_argument("--batch", type=int, default=32, help="batch size to predict for (paper: 32)")
    parser.add_argument("--seconds", help="comma-separated audio lengths a batch is padded to (default 5,10,15)")
    parser.add_argument("--tokens", help="comma-separated token counts (default 64,128,256,512)")
    parser.add_argument("--variant", choices=[v[0] for v in VARIANTS] + ["paper"],
                        help="only this variant (default: all); paper: the paper preset's own switches")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON (benchmarks/gpu_check.sh)")
    args = parser.parse_args(argv)
    config = preset("paper")
    paper = paper_variant(config)
    if args.variant == "paper":
        args.variant = paper
    if args.small:
        config = config.replace(SMALL)
    seconds = [float(s) for s in (args.seconds or ("1" if args.small else "5,10,15")).split(",")]
    tokens = [int(t) for t in (args.tokens or ("8" if args.small else "64,128,256,512")).split(",")]
    started = time.perf_counter()
    variants = VARIANTS
    if args.variant:
        chosen = next(v for v in VARIANTS if v[0] == args.variant)
        # A checkpointing variant needs its own without checkpointing (the recomputed layer), measured first.
        variants = tuple(v for v in VARIANTS if v == chosen or (chosen[2] and v[1:] == (chosen[1], False, chosen[3])))
    rows = run(config.model, args.batch, seconds, tokens, variants)
    print_report(rows, args.batch, config.model, time.perf_counter() - started, paper)
    if args.json:
        chosen_rows = [r for r in rows if not args.variant or r["variant"] == args.variant]
        Path(args.json).write_text(json.dumps(chosen_rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
