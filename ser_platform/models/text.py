"""Text embedding network (paper §2.1.1): a RoBERTa-style encoder -> token states with a padding mask.

Paper: the transcript is tokenised with RoBERTa's GPT-2 byte-level BPE and fed to roberta-large (1024-d
states, at most 512 tokens). Any Hugging Face encoder checkpoint name or local path works the same way
(``AutoModel`` / ``AutoTokenizer``); it is loaded only when named, never in tests or the demo.

``name="tiny"`` builds everything offline from config classes, with no download and no data:

* tokenizer: RoBERTa's own scheme (byte-level BPE, GPT-2's 256-symbol byte alphabet, the special tokens
  ``<s> <pad> </s> <unk> <mask>`` at ids 0-4, ``<s> ... </s>`` around each text) but with **no merges**, so
  every UTF-8 byte is one token. It is deterministic and has learnt nothing from any corpus — in particular
  nothing from test transcripts, which a tokenizer trained on the dataset would have seen.
* encoder: a randomly initialised ``RobertaModel`` of ``tiny_*`` sizes over that 261-symbol vocabulary.

``KNOWN_TEXT_CONFIGS`` holds the published sizes of the checkpoints we cite, so the paper's model can be built
without weights (``pretrained=False``: model summary, benchmarks, meta device) on a machine that cannot reach
the Hub.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ser_platform.config import TINY_ENCODER, TextEncoderConfig

__all__ = [
    "KNOWN_TEXT_CONFIGS",
    "ROBERTA_SPECIAL_TOKENS",
    "TextEncoder",
    "build_text_encoder_config",
    "build_tokenizer",
    "byte_level_tokenizer",
    "check_layer",
    "enable_activation_checkpointing",
]

# RoBERTa's special tokens in RoBERTa's id order (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4).
ROBERTA_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
MAX_TEXT_TOKENS = 512  # RoBERTa's limit (§2.1.1); positions 0..1 are reserved for padding, hence 514 below

# Published sizes (the checkpoints' config.json) for building the architecture without a download.
KNOWN_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "roberta-large": dict(
        vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
        eos_token_id=2,
    ),
    "roberta-base": dict(
        vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
        eos_token_id=2,
    ),
}
KNOWN_TEXT_CONFIGS["FacebookAI/roberta-large"] = KNOWN_TEXT_CONFIGS["roberta-large"]
KNOWN_TEXT_CONFIGS["FacebookAI/roberta-base"] = KNOWN_TEXT_CONFIGS["roberta-base"]


def byte_level_tokenizer(max_length: int = MAX_TEXT_TOKENS):
    """The offline "tiny" tokenizer: RoBERTa's byte-level BPE scheme with no merges (one token per byte).

    Returns a ``transformers.PreTrainedTokenizerFast`` of 261 symbols: ids 0-4 RoBERTa's special tokens, then
    GPT-2's byte alphabet in sorted order. Built from nothing but those symbols, so it is identical on every
    machine and has seen no transcript.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(ROBERTA_SPECIAL_TOKENS + tuple(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # <s> text </s>, exactly as RoBERTa's tokenizer frames a single sequence.
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]), trim_offsets=True, add_prefix_space=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>", model_max_length=max_length, padding_side="right",
    )


def build_tokenizer(text_config: TextEncoderConfig):
    """The tokenizer of ``text_config.name``: the offline byte-level one for "tiny", else the checkpoint's own
    (``AutoTokenizer.from_pretrained``; for roberta-large that is RoBERTa's GPT-2 BPE, §2.1.1)."""
    if text_config.name == TINY_ENCODER:
        return byte_level_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text_config.name)


def build_text_encoder_config(text_config: TextEncoderConfig, *, pretrained: bool = True):
    """The Hugging Face config of the text encoder.

    "tiny": a ``RobertaConfig`` of the ``tiny_*`` sizes over the byte-level vocabulary. A name in
    ``KNOWN_TEXT_CONFIGS`` with ``pretrained=False``: the published sizes, no network. Otherwise
    ``AutoConfig.from_pretrained(name)`` (a download or a local path).
    """
    from transformers import AutoConfig, RobertaConfig

    if text_config.name == TINY_ENCODER:
        hidden = text_config.tiny_hidden_size  # a multiple of tiny_num_heads (config.TextEncoderConfig checks)
        return RobertaConfig(
            vocab_size=len(ROBERTA_SPECIAL_TOKENS) + 256, hidden_size=hidden,
            num_hidden_layers=text_config.tiny_num_layers, num_attention_heads=text_config.tiny_num_heads,
            intermediate_size=4 * hidden, max_position_embeddings=MAX_TEXT_TOKENS + 2, type_vocab_size=1,
            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            hidden_dropout_prob=text_config.tiny_dropout, attention_probs_dropout_prob=text_config.tiny_dropout,
        )
    if not pretrained and text_config.name in KNOWN_TEXT_CONFIGS:
        return RobertaConfig(**KNOWN_TEXT_CONFIGS[text_config.name])
    return AutoConfig.from_pretrained(text_config.name)


class PretrainedEncoder(nn.Module):
    """What the Hugging Face encoders (RoBERTa here, wav2vec2 in ``speech.SSLSpeechEncoder``) share: ``encoder``
    (None when cached states replace it) and ``frozen`` (a fixed feature extractor: no gradients, no dropout)."""

    encoder: nn.Module | None
    frozen: bool
    num_layers: int

    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing in the encoder's layers (Hugging Face), when it is trained; a frozen encoder
        runs without autograd and a cached one is not built: nothing to do."""
        if self.encoder is not None and not self.frozen:
            enable_activation_checkpointing(self.encoder)

    def check_runnable(self, layers: Sequence[int], what: str, states_argument: str) -> None:
        """Before a pass: an encoder to run (not one served from the cache), and ``layers`` it has."""
        if self.encoder is None:
            raise ValueError(f"this {type(self).__name__} serves states from the encoder cache (data.encoder_cache) "
                             f"and has no encoder to run: pass {states_argument}")
        for layer in layers:
            check_layer(layer, self.num_layers, what)

    def train(self, mode: bool = True) -> "PretrainedEncoder":
        super().train(mode)
        if self.frozen and self.encoder is not None:
            self.encoder.eval()  # a frozen encoder is a fixed feature extractor: no dropout, ever
        return self


class TextEncoder(PretrainedEncoder):
    """Token states of a Hugging Face encoder: ``forward(input_ids, attention_mask) -> (states, mask)``.

    input_ids, attention_mask: (B, T_L), attention_mask bool or 0/1, True = keep (RoBERTa's right padding).
    Returns states (B, T_L, output_dim) — zero at padded tokens — and the bool mask (B, T_L). The states are
    layer ``text_config.layer`` (-1 = the encoder's output ``last_hidden_state``; L = ``hidden_states[L]``,
    0 = the embeddings); :meth:`layer_states` gives several layers from one pass.

    ``pretrained``: load the checkpoint's weights (real names only; "tiny" is always random).
    ``frozen``: requires_grad False, kept in eval mode (dropout off) whatever ``.train()`` says, and run under
    ``torch.no_grad()``; then its states can as well come from a cache (``SERModel(text_states=...)``). Random
    weights of a frozen encoder (name "tiny", or ``pretrained=False``) are drawn from ``text_config.tiny_seed``
    alone, not from the caller's RNG: a frozen random encoder is a fixed feature extractor, the same in every
    fold, so its states can be cached (``ser cache``) like a checkpoint's.
    ``cached``: the states come from the frozen-encoder cache (``data.encoder_cache``), so no encoder is built
    (only its config is read, for ``output_dim``); ``forward`` then raises. Requires ``frozen``.
    """

    def __init__(self, text_config: TextEncoderConfig, *, frozen: bool = False, pretrained: bool = True,
                 cached: bool = False) -> None:
        super().__init__()
        from transformers import AutoModel

        if cached and not frozen:
            raise ValueError("a TextEncoder served from the encoder cache must be frozen (model.encoders='frozen')")
        self.frozen = frozen
        self.layer = int(text_config.layer)
        hf_config = build_text_encoder_config(text_config, pretrained=pretrained)
        self.num_layers = int(hf_config.num_hidden_layers)
        check_layer(self.layer, self.num_layers, "model.text.layer")
        load = pretrained and text_config.name != TINY_ENCODER
        # No pooler: it is unused here, and DDP refuses parameters that get no gradient.
        extra = {"add_pooling_layer": False} if hf_config.model_type in ("roberta", "bert", "xlm-roberta") else {}
        self.encoder: nn.Module | None = None
        if cached:
            pass
        elif load:
            self.encoder = AutoModel.from_pretrained(text_config.name, **extra)
        elif frozen:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(text_config.tiny_seed)
                self.encoder = AutoModel.from_config(hf_config, **extra)
        else:
            self.encoder = AutoModel.from_config(hf_config, **extra)
        self.output_dim = int(hf_config.hidden_size)
        if self.encoder is not None and frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def layer_states(self, input_ids: Tensor, attention_mask: Tensor,
                     layers: Sequence[int]) -> tuple[list[Tensor], Tensor]:
        """The states of each of ``layers`` (see the class docstring) from one pass, zero at padding; the mask."""
        self.check_runnable(layers, "text layer", "text_states")
        mask = attention_mask.bool()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.encoder(input_ids=input_ids, attention_mask=mask.long(),
                               output_hidden_states=any(layer != -1 for layer in layers))
        keep = mask.unsqueeze(-1)
        states = [out.last_hidden_state if layer == -1 else out.hidden_states[layer] for layer in layers]
        return [s * keep.to(s.dtype) for s in states], mask

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        states, mask = self.layer_states(input_ids, attention_mask, [self.layer])
        return states[0], mask


def check_layer(layer: int, num_layers: int, key: str) -> None:
    """-1 (the encoder's output) or a hidden-state index 0..num_layers (0 = embeddings); else ValueError."""
    if not -1 <= int(layer) <= num_layers:
        raise ValueError(f"{key}={layer!r}: expected -1 (the encoder's output) or a hidden-state index 0..{num_layers} "
                         f"(0 = embeddings; this encoder has {num_layers} layers)")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Hugging Face's activation checkpointing on ``model``, non-reentrant: each layer's activations are
    recomputed in backward instead of kept, with the same loss and gradients. ``activation_checkpointing_enable``
    where the installed transformers has it (5.25 does, and warns that ``gradient_checkpointing_enable`` is
    deprecated), else ``gradient_checkpointing_enable``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
