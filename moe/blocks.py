"""The layers of the transformer: input embeddings, blocks and the activations they pass on.

Shape letters: B batch, n sequence length, D model width, F FFN width, V vocabulary, E experts.

Every layer maps an ``Activations`` record to the next one, so the model is a flat list of
layers (embedding, blocks, head) that a pipeline can cut anywhere: the MoE auxiliary losses,
the key padding mask and the cross-layer attention state ride along with the hidden states
in named fields (STYLE.md: no positional tuples).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from attention import Attention
from moe.layer import MoELayer


@dataclass(frozen=True)
class RoutingStats:
    """What one MoE layer reports besides its output; tensors detached from the graph."""

    tokens_per_expert: torch.Tensor  # [E] int
    dropped_fraction: torch.Tensor  # 0-dim fp32
    router_entropy: torch.Tensor  # 0-dim fp32
    capacity: int = 0  # slots per expert the layer used (0: unknown)


@dataclass(frozen=True)
class Activations:
    """The record passed from layer to layer.

    ``hidden`` [B, n, D]; ``padding_mask`` bool [B, n] (True = real token) or None;
    ``aux_loss`` and ``z_loss`` fp32 0-dim sums over the MoE layers seen so far;
    ``attention_states`` maps a method name to the state its previous layer returned;
    ``routing`` holds one RoutingStats per MoE layer seen so far.
    """

    hidden: torch.Tensor
    padding_mask: torch.Tensor | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    attention_states: dict[str, Any] = field(default_factory=dict)
    routing: tuple[RoutingStats, ...] = ()


# Input embeddings ---------------------------------------------------------------------------

InputFactory = Callable[..., nn.Module]
_INPUTS: dict[str, InputFactory] = {}


def register_input(name: str) -> Callable[[InputFactory], InputFactory]:
    """Register an input embedding factory ``(d_model, vocab_size, max_seq_len) -> module``.

    The module maps the model input (token ids [B, n] for "tokens";
    images -> [B, N, D] for "patches") to hidden states [B, n, D]. ``model.input`` picks one.
    """

    def decorator(factory: InputFactory) -> InputFactory:
        _INPUTS[name] = factory
        return factory

    return decorator


def input_names() -> list[str]:
    """Sorted names of the registered input embeddings."""
    return sorted(_INPUTS)


def build_input(name: str, **kwargs: Any) -> nn.Module:
    """Build the input embedding registered as ``name``."""
    if name not in _INPUTS:
        raise ValueError(f"model.input '{name}' is unknown; available: {', '.join(input_names())}")
    return _INPUTS[name](**kwargs)


class TokenEmbedding(nn.Module):
    """Token ids [B, n] int64 -> token + learned position embeddings [B, n, D]."""

    def __init__(self, d_model: int, vocab_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_seq_len, d_model)
        self.max_seq_len = max_seq_len
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    @property
    def tied_weight(self) -> nn.Parameter:
        """The [V, D] matrix an output head may share."""
        return self.token.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds model.max_seq_len ({self.max_seq_len}); "
                "raise model.max_seq_len or shorten data.seq_len"
            )
        positions = torch.arange(seq_len, device=input_ids.device)
        return self.token(input_ids) + self.position(positions)


@register_input("tokens")
def _token_input(d_model: int, vocab_size: int, max_seq_len: int) -> nn.Module:
    return TokenEmbedding(d_model, vocab_size, max_seq_len)


class EmbeddingLayer(nn.Module):
    """The first layer: model input -> Activations with zero auxiliary losses."""

    def __init__(self, embed: nn.Module, dropout: float) -> None:
        super().__init__()
        self.embed = embed
        self.dropout = nn.Dropout(dropout)

    def forward(self, inputs: torch.Tensor, padding_mask: torch.Tensor | None) -> Activations:
        hidden = self.dropout(self.embed(inputs))
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        return Activations(hidden=hidden, padding_mask=padding_mask, aux_loss=zero, z_loss=zero)


# Blocks -------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)) with a dense or MoE FFN.

    With an attention method whose class sets ``replaces_ffn`` (GAU, FLASH) the block is
    x + attn(norm(x)) only, as in the FLASH paper: ``ffn`` must then be None.
    """

    def __init__(
        self,
        d_model: int,
        attention: Attention,
        ffn: nn.Module | None,
        *,
        norm: Callable[[int], nn.Module],
        dropout: float,
    ) -> None:
        super().__init__()
        self.attention_name = type(attention).name
        self.carries_state = bool(type(attention).needs_cross_layer_state)
        self.norm1 = norm(d_model)
        self.attention = attention
        self.norm2 = norm(d_model) if ffn is not None else None
        self.ffn = ffn
        self.is_moe = isinstance(ffn, MoELayer)
        self.dropout = nn.Dropout(dropout)

    def forward(self, acts: Activations) -> Activations:
        state = acts.attention_states.get(self.attention_name) if self.carries_state else None
        attended, new_state = self.attention(
            self.norm1(acts.hidden), key_padding_mask=acts.padding_mask, state=state
        )
        hidden = acts.hidden + self.dropout(attended)
        states = acts.attention_states
        if self.carries_state:
            states = {**states, self.attention_name: new_state}
        aux_loss, z_loss, routing = acts.aux_loss, acts.z_loss, acts.routing
        if self.ffn is not None:
            if self.is_moe:
                out = self.ffn(self.norm2(hidden))
                ffn_out = out.output
                aux_loss = aux_loss + out.aux_loss.float()
                z_loss = z_loss + out.z_loss.float()
                stats = RoutingStats(
                    tokens_per_expert=out.tokens_per_expert.detach(),
                    dropped_fraction=out.dropped_fraction.detach().float(),
                    router_entropy=out.router_entropy.detach().float(),
                    capacity=int(out.capacity),
                )
                routing = (*routing, stats)
            else:
                ffn_out = self.ffn(self.norm2(hidden))
            hidden = hidden + self.dropout(ffn_out)
        return replace(
            acts,
            hidden=hidden,
            aux_loss=aux_loss,
            z_loss=z_loss,
            attention_states=states,
            routing=routing,
        )
