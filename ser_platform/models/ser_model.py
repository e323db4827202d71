"""The full model of Figure 1: text and speech embedding networks -> crossmodal fusion with focus attention ->
pooled, concatenated -> FC -> embedding F(x) -> 4-class classifier.

``SEROutput`` exposes the three embedding spaces of Table 3 for the metric loss:

* ``embedding``: F(x), the fused speech + text embedding (§2.3 calls it "the output of the last FC layer"; ours
  is the FC layer before the classifier, whose logits would leave the metric loss no embedding of its own);
* ``speech_embedding``: the speech embedding sequence X_A *before* it enters the crossmodal transformers (§3.3);
* ``text_embedding``: the text embedding sequence X_L, likewise before fusion.

Pooling: every sequence is summarised by its **masked mean** over valid positions only (padding never counts),
not by a last step as MulT does: the crossmodal outputs have no causal order, and a padded batch's "last step"
is padding. The text mean includes ``<s>`` and ``</s>``, which are valid tokens to RoBERTa.

With ``model.encoders="frozen"``, nothing trainable lies below the text embedding (it is RoBERTa's output), so
a metric loss on the ``text`` space is a constant there; it needs fine-tuned encoders. The paper does not say
whether it fine-tunes, but its Table 3 reports a metric loss on the text embedding that changes the result,
which a frozen RoBERTa could not give.

``model.fusion`` picks the baselines of Table 4 with every other part unchanged (same encoders, pooling, dropout,
F(x) and classifier; only what sits between the pooled embeddings and F(x) differs):

* ``"crossmodal"``: the paper's model (with ``focus_attention=False``: crossmodal without FA);
* ``"early"``: no crossmodal transformer; [masked mean of X_A ; masked mean of X_L] -> FC -> F(x);
* ``"speech_only"`` / ``"text_only"``: the other embedding network is not built (its inputs are ignored and
  its embedding is ``None``); masked mean of X_A (or X_L) -> FC -> F(x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ser_platform.config import ModelConfig
from ser_platform.models.crossmodal import CrossmodalFusion
from ser_platform.models.speech import SpeechEncoder
from ser_platform.models.text import TextEncoder

__all__ = ["FOCAL_PARAMETER_NAMES", "SERModel", "SEROutput", "masked_mean", "model_summary", "parameter_counts"]

FOCAL_PARAMETER_NAMES = frozenset({"w_p", "w_g", "u_c", "u_d"})  # eq. (1)-(2), in every FocusAttention


# Where the encoders' own weights sit in SERModel's state dict.
ENCODER_WEIGHT_PREFIXES = ("text_encoder.encoder.", "speech_encoder.ssl.encoder.")


def rebuilt_weight_keys(keys: Iterable[str], model_config: ModelConfig) -> list[str]:
    """The keys among ``keys`` (a state dict's) whose weights the config rebuilds exactly, so a stored model need
    not hold them: frozen encoders' (``model.encoders="frozen"``: a pretrained checkpoint, or a "tiny" encoder
    drawn from its ``tiny_seed``). Not a frozen part of a fine-tuned encoder (wav2vec2's feature encoder under
    ``freeze_feature_encoder``): a fine-tuned model is rebuilt from its architecture alone."""
    if model_config.encoders != "frozen":
        return []
    return [k for k in keys if k.startswith(ENCODER_WEIGHT_PREFIXES)]


def reads_speech(model_config: ModelConfig) -> bool:
    """Whether the model has a speech network, i.e. reads audio and acoustic features (not ``text_only``)."""
    return model_config.fusion != "text_only"


def masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    """Mean over the valid steps of each sample: (B, T, D), mask (B, T) bool -> (B, D); an empty sample gives 0."""
    keep = mask.to(states.dtype)
    # (B, 1, T) @ (B, T, D) -> (B, 1, D): the masked sum without a (B, T, D) temporary.
    total = torch.bmm(keep.unsqueeze(1), states).squeeze(1)
    return total / keep.sum(dim=1, keepdim=True).clamp(min=1.0)


@dataclass
class SEROutput:
    logits: Tensor  # (B, num_classes)
    embedding: Tensor  # (B, embedding_dim): F(x), fused
    speech_embedding: Optional[Tensor]  # (B, D_s): masked mean of X_A before fusion; None if text_only
    text_embedding: Optional[Tensor]  # (B, D_t): masked mean of X_L before fusion; None if speech_only


class SERModel(nn.Module):
    """Crossmodal speech emotion recogniser of the paper, built from ``config.model`` alone.

    ``model_config.gradient_checkpointing``: activation checkpointing in the trained text and speech encoders
    (:meth:`gradient_checkpointing_enable`).
    ``pretrained``: load named checkpoints' weights (False builds the same architecture randomly initialised,
    from ``KNOWN_*_CONFIGS`` when the name is known, e.g. on the meta device for ``model_summary``).
    ``cached_encoder_states``: the frozen encoders' states always come with the batch (``text_states``,
    ``speech_ssl_states``, from ``data.encoder_cache``), so RoBERTa and wav2vec2 are not built at all.
    """

    def __init__(self, model_config: ModelConfig, *, pretrained: bool = True,
                 cached_encoder_states: bool = False) -> None:
        super().__init__()
        self.config = model_config
        mode = model_config.fusion
        frozen = model_config.encoders == "frozen"
        # Absent parts are None (not built: no parameters, no compute), so state dicts say what a baseline has.
        self.text_encoder: Optional[TextEncoder] = None
        self.speech_encoder: Optional[SpeechEncoder] = None
        self.fusion: Optional[CrossmodalFusion] = None
        if mode != "speech_only":
            self.text_encoder = TextEncoder(model_config.text, frozen=frozen, pretrained=pretrained,
                                            cached=cached_encoder_states)
        if reads_speech(model_config):
            self.speech_encoder = SpeechEncoder(model_config, pretrained=pretrained, cached=cached_encoder_states)
        if mode == "crossmodal":
            self.fusion = CrossmodalFusion(model_config, self.text_encoder.output_dim, self.speech_encoder.output_dim)
            pooled_dim = 2 * model_config.embed_dim
        else:
            pooled_dim = sum(part.output_dim for part in (self.speech_encoder, self.text_encoder) if part is not None)
        self.dropout = nn.Dropout(model_config.dropout)
        self.embedding_layer = nn.Linear(pooled_dim, model_config.embedding_dim)  # F(x)
        self.classifier = nn.Linear(model_config.embedding_dim, model_config.num_classes)
        if model_config.gradient_checkpointing:
            self.gradient_checkpointing_enable()

    def gradient_checkpointing_enable(self) -> None:
        """Hugging Face activation checkpointing in the text and speech encoders that are trained (frozen or
        cached ones keep no activations for backward anyway); the fusion and heads are small and left alone."""
        for encoder in (self.text_encoder, self.speech_encoder.ssl if self.speech_encoder is not None else None):
            if encoder is not None:
                encoder.gradient_checkpointing_enable()

    def forward(self, input_values: Optional[Tensor], audio_lengths: Tensor, mfcc: Tensor, spectrogram: Tensor,
                feature_lengths: Tensor, input_ids: Optional[Tensor], attention_mask: Tensor,
                text_states: Optional[Tensor] = None, speech_ssl_states: Optional[Tensor] = None) -> SEROutput:
        """Shapes: input_values (B, S) zero-padded 16 kHz audio, audio_lengths (B,) valid samples; mfcc
        (B, T, n_mfcc), spectrogram (B, T, n_freq), feature_lengths (B,) valid frames (10 ms hop); input_ids and
        attention_mask (B, T_L) (True/1 = keep). ``text_states`` (B, T_L, D_t) / ``speech_ssl_states``
        (B, T_w, D_w): precomputed frozen-encoder outputs that replace running RoBERTa / wav2vec2."""
        text_embedding = speech_embedding = None
        if self.text_encoder is not None:
            if text_states is None:
                if input_ids is None:
                    raise ValueError("SERModel needs input_ids unless text_states are given")
                text_states, text_mask = self.text_encoder(input_ids, attention_mask)
            else:
                text_mask = attention_mask.bool()
                text_states = text_states * text_mask.unsqueeze(-1).to(text_states.dtype)
            text_embedding = masked_mean(text_states, text_mask)
        if self.speech_encoder is not None:
            speech = self.speech_encoder(input_values, audio_lengths, mfcc, spectrogram, feature_lengths,
                                         ssl_states=speech_ssl_states)
            speech_embedding = masked_mean(speech.states, speech.mask)
        if self.fusion is not None:
            fused = self.fusion(text_states, text_mask, speech.states, speech.mask)
            pooled = torch.cat((masked_mean(fused.audio_from_text, speech.mask),
                                masked_mean(fused.text_from_audio, text_mask)), dim=-1)  # (B, 2·embed_dim)
        else:  # early fusion or one modality: the pooled embeddings themselves, (B, D_s + D_t) / (B, D_s) / (B, D_t)
            pooled = torch.cat([e for e in (speech_embedding, text_embedding) if e is not None], dim=-1)
        embedding = self.embedding_layer(self.dropout(pooled))
        logits = self.classifier(self.dropout(F.relu(embedding)))
        return SEROutput(logits=logits, embedding=embedding, speech_embedding=speech_embedding,
                         text_embedding=text_embedding)


def _count(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def parameter_counts(model: SERModel) -> dict[str, tuple[int, int]]:
    """(total, trainable) parameters per part of the model, the parts adding up to the whole; parts that a
    baseline (``model.fusion``) does not build are left out."""
    parts: dict[str, tuple[int, int]] = {}
    if model.text_encoder is not None:
        parts["text encoder"] = _count(model.text_encoder)
    speech = model.speech_encoder
    if speech is not None:
        parts.update({
            "speech: wav2vec2": _count(speech.ssl),
            "speech: MFCC encoder": _count(speech.mfcc_encoder),
            "speech: spectrogram encoder": _count(speech.spectrogram_encoder),
            "speech: guided attention": tuple(a + b for a, b in zip(_count(speech.acoustic_projection),
                                                                     _count(speech.guided_attention))),
        })
    if model.fusion is not None:
        focal = [p for name, p in model.fusion.named_parameters() if FOCAL_PARAMETER_NAMES & set(name.split("."))]
        parts["crossmodal fusion"] = _count(model.fusion)
        parts["  of which focus attention"] = (sum(p.numel() for p in focal),
                                               sum(p.numel() for p in focal if p.requires_grad))
    parts["head (F(x) + classifier)"] = tuple(a + b for a, b in zip(_count(model.embedding_layer),
                                                                     _count(model.classifier)))
    parts["total"] = _count(model)
    return parts


def model_summary(model_config: ModelConfig) -> str:
    """Parameters (total and trainable) per part of the model ``model_config`` describes.

    Built on the meta device without weights (named encoders from their published sizes in
    ``KNOWN_TEXT_CONFIGS`` / ``KNOWN_SPEECH_CONFIGS``), so the ~457M-parameter paper model costs no memory,
    no download and well under a second.
    """
    with torch.device("meta"):
        model = SERModel(model_config, pretrained=False)
    counts = parameter_counts(model)
    width = max(len(name) for name in counts)
    encoders = [f"{kind} encoder: {name} ({part.output_dim}-d)" for kind, name, part in (
        ("text", model_config.text.name, model.text_encoder), ("speech", model_config.speech.name,
                                                               model.speech_encoder)) if part is not None]
    if model_config.fusion == "crossmodal":
        focus = f"on ({model_config.focal_reading})" if model_config.focus_attention else "off"
        fusion = (f"crossmodal: {model_config.num_layers} layers x 2 directions, {model_config.embed_dim}-d, "
                  f"{model_config.num_heads} heads, focus attention {focus}, {model_config.attn_implementation}")
        if model_config.self_attention_layers:
            fusion += f"; then {model_config.self_attention_layers} self-attention layers per direction"
    else:
        fusion = {"early": "early fusion: pooled speech and text embeddings concatenated",
                  "speech_only": "speech only (no text encoder)",
                  "text_only": "text only (no speech encoder)"}[model_config.fusion]
    lines = [
        "; ".join(encoders) + f"; encoders {model_config.encoders}",
        f"{fusion}; F(x) {model_config.embedding_dim}-d -> {model_config.num_classes} classes",
        "",
        f"{'part':<{width}}  {'parameters':>14}  {'trainable':>14}",
    ]
    for name, (total, trainable) in counts.items():
        if name == "total":
            lines.append("-" * (width + 32))
        lines.append(f"{name:<{width}}  {total:>14,}  {trainable:>14,}")
    return "\n".join(lines)
