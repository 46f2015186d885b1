"""The interface every attention method implements, and helpers they share.

Shape letters: B batch, n sequence length, D model width, H heads, d = D / H head width.

Contract (see ../shared/attention_spec.md §0.2):

    module = attention.build(name, d_model=D, num_heads=H, causal=False, **options)
    y, new_state = module(x, key_padding_mask=mask, state=state)

* ``x``: [B, n, D]; ``y``: [B, n, D] in the dtype of ``x``.
* ``key_padding_mask``: bool [B, n], **True = real token** (SDPA polarity), or None.
* ``state``: whatever the previous layer of a cross-layer method returned (evolving
  attention's logits), or None. Methods without cross-layer state return None.

Capability flags are class attributes, checked when the model is built so that a config
asking for a mode a method does not support fails early and never falls back silently.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn


class AttentionOptions(BaseModel):
    """Typed options of one attention method; each method subclasses this."""

    model_config = ConfigDict(extra="forbid")

    dropout: float = 0.0


class Attention(nn.Module):
    """Base class of every registered attention method.

    Subclasses set ``name``, the capability flags and ``Options``, and implement
    ``forward``. ``layer_idx`` is given so that methods with random structure can seed it
    per layer; ``shared`` is the module returned by ``build_shared`` (one per model), for
    methods that share parameters across layers (DeBERTa's relative position table).
    """

    name: ClassVar[str] = ""
    supports_causal: ClassVar[bool] = False
    supports_padding: ClassVar[bool] = True
    needs_fixed_max_len: ClassVar[bool] = False
    # The option that bounds the sequence length (parameters sized for it); a model fills it
    # with its context length when the config leaves it unset.
    length_option: ClassVar[str | None] = None
    replaces_ffn: ClassVar[bool] = False
    needs_cross_layer_state: ClassVar[bool] = False
    stochastic_structure: ClassVar[bool] = False
    Options: ClassVar[type[AttentionOptions]] = AttentionOptions

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        causal: bool = False,
        options: AttentionOptions | None = None,
        layer_idx: int = 0,
        shared: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by num_heads ({num_heads}); "
                "change one of them"
            )
        if causal and not self.supports_causal:
            raise ValueError(
                f"attention '{self.name}' does not support causal=True; "
                "use it in encoder mode or pick a causal method"
            )
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.causal = causal
        self.options = options if options is not None else self.Options()
        self.layer_idx = layer_idx

    @classmethod
    def build_shared(
        cls, d_model: int, num_heads: int, options: AttentionOptions
    ) -> nn.Module | None:
        """A module shared by every layer of this method in one model, or None."""
        return None

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        state: Any = None,
    ) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    # Helpers shared by subclasses -------------------------------------------------------

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, n, D] -> [B, H, n, d]."""
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, n, d] -> [B, n, D]."""
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)


def check_padding_mask(x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> None:
    """Raise a ValueError when a padding mask does not fit x [B, n, D]."""
    if key_padding_mask is None:
        return
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}"
        )
    if tuple(key_padding_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"key_padding_mask shape {tuple(key_padding_mask.shape)} must be [B, n] = "
            f"{tuple(x.shape[:2])}"
        )


def pad_to_multiple(
    x: torch.Tensor, key_padding_mask: torch.Tensor | None, multiple: int
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Right-pad x [B, n, ...] along n to a multiple of ``multiple``.

    Returns the padded x, a mask with the new positions marked False (a mask is made when
    padding is needed and none was given), and the original length n.
    """
    n = x.shape[1]
    pad = (-n) % multiple
    if pad == 0:
        return x, key_padding_mask, n
    if key_padding_mask is None:
        key_padding_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    pad_spec = [0, 0] * (x.dim() - 2) + [0, pad]
    x = F.pad(x, pad_spec)
    key_padding_mask = F.pad(key_padding_mask, [0, pad], value=False)
    return x, key_padding_mask, n


def zero_padded_queries(y: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the outputs y [B, n, D] at padded positions (they have no valid meaning)."""
    if key_padding_mask is None:
        return y
    return y * key_padding_mask.unsqueeze(-1).to(y.dtype)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """t in fp32 when it is in a half type (fp16/bf16); fp32 and fp64 are kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def fp32_region(x: torch.Tensor) -> torch.autocast:
    """A context in which autocast is off, so the math inside really runs in fp32."""
    return torch.autocast(device_type=x.device.type, enabled=False)
