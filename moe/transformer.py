"""The Switch-style transformer: a flat list of layers (input embedding, blocks, head).

Shape letters: B batch, n sequence length, D model width, V vocabulary, C classes, E experts.

    model = Transformer(ModelConfig(), MoEConfig(num_experts=8), AttentionConfig())
    out = model(input_ids, targets=targets)   # input_ids [B, n] int64 -> ModelOutput

Modes (``model.mode``):
* ``causal_lm``: decoder-only language model, tied output head; targets [B, n] are the next
  tokens (-100 = ignore).
* ``masked_lm``: bidirectional encoder with a masked-LM head (dense, gelu, norm, tied
  decoder); targets [B, n] hold the original token at masked positions, -100 elsewhere.
* ``classify``: bidirectional encoder; the final features are mean-pooled over real tokens
  (or the first, CLS, position is taken) and a linear head gives [B, C]; targets [B].

MoE placement (Switch Transformer, Fedus et al. 2021, "every other FFN layer"): block i
(0-based) has an MoE FFN when ``(i + 1) % moe.every == 0``, so with every=2 blocks 1, 3, ...
are MoE and blocks 0, 2, ... dense; every=1 makes every block MoE. ``moe=None`` builds a
dense model. A block whose attention method replaces the FFN (GAU/FLASH) has no FFN at all.

Loss = cross-entropy + moe.aux_loss_coef * sum(aux) + moe.z_loss_coef * sum(z), each part
returned in its own field.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

import attention
from moe.blocks import (
    Activations,
    EmbeddingLayer,
    RoutingStats,
    TransformerBlock,
    build_input,
    input_names,
)
from moe.config import MoEConfig
from moe.experts import DenseFFN
from moe.layer import MoELayer
from moe.vision import ImageConfig  # also registers model.input "patches"
from parallel.markers import is_expert

IGNORE_INDEX = -100


class LayerAttentionConfig(BaseModel):
    """The attention of one layer: a registered method name and its options."""

    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class AttentionConfig(BaseModel):
    """A default attention method plus per-layer overrides keyed by block index ("3")."""

    model_config = ConfigDict(extra="forbid")

    name: str = "full"
    options: dict[str, Any] = Field(default_factory=dict)
    layers: dict[str, LayerAttentionConfig] = Field(default_factory=dict)

    def for_layer(self, index: int) -> LayerAttentionConfig:
        """The method and options block ``index`` uses."""
        override = self.layers.get(str(index))
        if override is not None:
            return override
        return LayerAttentionConfig(name=self.name, options=self.options)


class ModelConfig(BaseModel):
    """Shape and mode of the transformer (the ``model:`` section of a run config)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["causal_lm", "masked_lm", "classify"] = "causal_lm"
    input: str = "tokens"
    vocab_size: int | None = Field(
        default=None, ge=2, description="None: the tokenizer's size (bytes + specials)"
    )
    d_model: int = Field(default=128, ge=1)
    num_layers: int = Field(default=4, ge=1)
    num_heads: int = Field(default=4, ge=1)
    d_ff: int = Field(default=512, ge=1)
    max_seq_len: int = Field(default=256, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    norm_eps: float = Field(default=1e-5, gt=0.0, allow_inf_nan=False)
    num_classes: int = Field(default=2, ge=2)
    pooling: Literal["mean", "cls"] = "mean"
    image: ImageConfig | None = Field(
        default=None, description="model.input patches: image size, patch size, channels"
    )


class ModelOutput(NamedTuple):
    """Everything one forward returns; losses are fp32 0-dim tensors (None without targets).

    ``logits``: [B, n, V] for the LM modes, [B, C] for classify. ``routing``: one
    RoutingStats per MoE layer, in block order.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    ce_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    routing: tuple[RoutingStats, ...]


def layer_options(model: ModelConfig, choice: LayerAttentionConfig) -> dict[str, Any]:
    """The options block's method is built with: the config's, plus the method's length
    option (Linformer's ``n_max``) set to ``model.max_seq_len`` when the config leaves it
    out, so that its length-sized parameters cover exactly the model's context."""
    options = dict(choice.options)
    length = attention.get(choice.name).length_option
    if length is not None and options.get(length) is None:
        options[length] = model.max_seq_len
    return options


def check_attention(model: ModelConfig, attn: AttentionConfig) -> None:
    """Raise a one-line ValueError for an attention choice the model cannot honour."""
    for key in attn.layers:
        if not key.isdigit() or int(key) >= model.num_layers:
            raise ValueError(
                f"attention.layers.{key}: layer index must be an integer in "
                f"[0, {model.num_layers - 1}] (model.num_layers={model.num_layers})"
            )
    if model.input not in input_names():
        raise ValueError(
            f"model.input '{model.input}' is unknown; available: {', '.join(input_names())}"
        )
    if (model.input == "patches") != (model.image is not None):
        raise ValueError(
            f"model.image is {'unset' if model.image is None else 'set'} with model.input "
            f"'{model.input}'; model.image (image_size, patch_size, channels) goes with "
            "model.input patches only"
        )
    if model.d_model % model.num_heads != 0:
        raise ValueError(
            f"model.d_model ({model.d_model}) must be divisible by model.num_heads "
            f"({model.num_heads}); change one of them"
        )
    for index in range(model.num_layers):
        choice = attn.for_layer(index)
        where = f"attention.layers.{index}" if str(index) in attn.layers else "attention"
        try:
            cls = attention.get(choice.name)
            attention.parse_options(choice.name, layer_options(model, choice))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if model.mode == "causal_lm" and not cls.supports_causal:
            raise ValueError(
                f"{where}.name: layer {index} uses '{choice.name}', which does not support "
                "causal attention; set model.mode to masked_lm or classify, or pick a causal method"
            )


def is_moe_block(index: int, moe: MoEConfig | None) -> bool:
    """Whether block ``index`` (0-based) gets an MoE FFN: (index + 1) % moe.every == 0."""
    return moe is not None and (index + 1) % moe.every == 0


class LanguageModelHead(nn.Module):
    """Final norm and output projection [B, n, D] -> [B, n, V], tied to the embedding."""

    def __init__(
        self, d_model: int, vocab_size: int, tied: nn.Parameter | None, *, norm, masked: bool
    ):
        super().__init__()
        self.norm = norm(d_model)
        # BERT-style transform before the tied decoder, for the masked-LM head.
        self.transform = (
            nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), norm(d_model)) if masked else None
        )
        self.decoder = nn.Linear(d_model, vocab_size, bias=False)
        if tied is not None:
            self.decoder.weight = tied

    def forward(self, acts: Activations) -> torch.Tensor:
        hidden = self.norm(acts.hidden)
        if self.transform is not None:
            hidden = self.transform(hidden)
        return self.decoder(hidden)


class ClassificationHead(nn.Module):
    """Final norm, pooling (mean over real tokens or the CLS position) and a linear [B, C]."""

    def __init__(self, d_model: int, num_classes: int, pooling: str, *, norm) -> None:
        super().__init__()
        self.norm = norm(d_model)
        self.pooling = pooling
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, acts: Activations) -> torch.Tensor:
        hidden = self.norm(acts.hidden)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif acts.padding_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = acts.padding_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.classifier(pooled)


def default_norm(eps: float):
    """LayerNorm factory: apex's fused one when importable (CUDA), torch's otherwise."""
    try:  # optional accelerator; never required (DESIGN.md "Devices")
        from apex.normalization import FusedLayerNorm  # type: ignore[import-not-found]

        if torch.cuda.is_available():
            return lambda width: FusedLayerNorm(width, eps=eps)
    except ImportError:
        pass
    return lambda width: nn.LayerNorm(width, eps=eps)


class Transformer(nn.Module):
    """Embedding, blocks and head held in one flat ``layers`` list (pipeline-ready).

    Methods sharing a module across layers get it from ``cls.build_shared`` once per method
    name, registered under ``shared_attention``; cross-layer state flows between the layers
    of the same method through ``Activations.attention_states``.
    """

    def __init__(
        self,
        config: ModelConfig,
        moe: MoEConfig | None,
        attn: AttentionConfig | None = None,
        *,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        attn = attn or AttentionConfig()
        check_attention(config, attn)
        vocab = config.vocab_size or vocab_size
        if vocab is None and config.input == "tokens":
            raise ValueError("model.vocab_size is not set and no tokenizer size was given")
        self.config, self.moe_config, self.vocab_size = config, moe, vocab
        norm = default_norm(config.norm_eps)
        causal = config.mode == "causal_lm"

        self.shared_attention = nn.ModuleDict()
        for index in range(config.num_layers):
            choice = attn.for_layer(index)
            if choice.name in self.shared_attention:
                continue
            cls = attention.get(choice.name)
            opts = attention.parse_options(choice.name, layer_options(config, choice))
            shared = cls.build_shared(config.d_model, config.num_heads, opts)
            if shared is not None:
                self.shared_attention[choice.name] = shared

        # Images (moe/vision.py): the patch grid and a class token when pooling reads CLS.
        image_options = (
            {"image": config.image, "class_token": config.pooling == "cls"}
            if config.input == "patches"
            else {}
        )
        embed = build_input(
            config.input,
            d_model=config.d_model,
            vocab_size=vocab,
            max_seq_len=config.max_seq_len,
            **image_options,
        )
        layers: list[nn.Module] = [EmbeddingLayer(embed, config.dropout)]
        for index in range(config.num_layers):
            choice = attn.for_layer(index)
            cls = attention.get(choice.name)
            module = attention.build(
                choice.name,
                d_model=config.d_model,
                num_heads=config.num_heads,
                causal=causal,
                layer_idx=index,
                shared=self.shared_attention[choice.name]
                if choice.name in self.shared_attention
                else None,
                **layer_options(config, choice),
            )
            ffn: nn.Module | None
            if cls.replaces_ffn:
                ffn = None
            elif is_moe_block(index, moe):
                ffn = MoELayer(config.d_model, config.d_ff, **moe.layer_kwargs())
            else:
                activation = moe.activation if moe is not None else "relu"
                ffn = DenseFFN(config.d_model, config.d_ff, activation)
            layers.append(
                TransformerBlock(config.d_model, module, ffn, norm=norm, dropout=config.dropout)
            )
        tied = getattr(embed, "tied_weight", None)
        if config.mode == "classify":
            layers.append(
                ClassificationHead(config.d_model, config.num_classes, config.pooling, norm=norm)
            )
        else:
            if vocab is None:
                raise ValueError(
                    f"model.mode {config.mode} needs a token vocabulary (model.input=tokens)"
                )
            layers.append(
                LanguageModelHead(
                    config.d_model, vocab, tied, norm=norm, masked=config.mode == "masked_lm"
                )
            )
        self.layers = nn.ModuleList(layers)

    @property
    def blocks(self) -> list[TransformerBlock]:
        """The transformer blocks, in order (layers without the embedding and the head)."""
        return list(self.layers[1:-1])

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """inputs [B, n] token ids (or images [B, C, H, W] with model.input patches) -> ModelOutput.

        targets [B, n] (LM) or [B] (classify).
        """
        acts = self.layers[0](inputs, padding_mask)
        for layer in self.layers[1:-1]:
            acts = layer(acts)
        logits = self.layers[-1](acts)
        loss = ce_loss = None
        if targets is not None:
            ce_loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            loss = ce_loss
            if self.moe_config is not None:
                loss = (
                    loss
                    + self.moe_config.aux_loss_coef * acts.aux_loss
                    + self.moe_config.z_loss_coef * acts.z_loss
                )
        return ModelOutput(
            logits=logits,
            loss=loss,
            ce_loss=ce_loss,
            aux_loss=acts.aux_loss,
            z_loss=acts.z_loss,
            routing=acts.routing,
        )


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, expert and active-per-token parameter counts of a Transformer."""
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.parameters() if is_expert(p))
    active = total
    moe = getattr(model, "moe_config", None)
    if moe is not None and moe.num_experts > 0:
        active = total - expert + expert * moe.top_k // moe.num_experts
    return {"total": total, "expert": expert, "active": active}
