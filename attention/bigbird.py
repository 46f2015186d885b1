"""BigBird block-sparse attention (Zaheer et al., NeurIPS 2020): window + global + random.

Shape letters: B batch, n (padded) sequence length, D model width, H heads, d head width,
b block size, nl number of local (non-global) blocks, L key blocks per local row
(window + random), g number of global tokens.

Layout of the (padded) sequence, for both variants::

    [ prefix global tokens | nl local blocks of b tokens | suffix global tokens ]

* ITC (default): the first and last blocks are global (``num_global_blocks=2`` puts
  ceil(2/2) blocks in front and floor(2/2) at the end). Window and random blocks are drawn
  among the local blocks only; a window that reaches past the local range would land on a
  global block, which every row attends anyway, so those window slots are simply invalid.
  That reproduces the official ITC mask with one softmax over the union and no duplicates.
* ETC (``variant="etc"``): the first ``num_global_tokens`` positions of x are the global
  tokens (the caller prepends its question / CLS tokens); the rest is blocked. Paper
  setting: no random blocks (set ``num_random_blocks=0``).

Global query rows attend all n keys (dense); local query rows attend the global tokens,
their window and their random blocks. The random plan is a pure function of
(seed, layer_idx, head, nl), drawn with a dedicated ``torch.Generator`` (spec §2 pitfalls):
the same on every rank, call and activation-checkpoint recompute, and it never touches
the global RNG. Causal attention is not supported (the paper's kernel is encoder-only).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from attention.base import (
    Attention,
    AttentionOptions,
    check_padding_mask,
    default_scale,
    pad_to_multiple,
    zero_padded_queries,
)
from attention.registry import register


class BigBirdOptions(AttentionOptions):
    """BigBird options; defaults are the paper's ITC setting (b=64, g=2b, w=3b, r=3b)."""

    variant: Literal["itc", "etc"] = "itc"
    block_size: int = Field(64, ge=1)
    num_window_blocks: int = Field(3, ge=1)
    num_random_blocks: int = Field(3, ge=0)
    num_global_blocks: int = Field(2, ge=0)
    num_global_tokens: int = Field(0, ge=0)
    seed: int = Field(0, ge=0)
    bias: bool = True

    @model_validator(mode="after")
    def _check(self) -> BigBirdOptions:
        if self.num_window_blocks % 2 != 1:
            raise ValueError(
                f"num_window_blocks ({self.num_window_blocks}) must be odd (a symmetric window)"
            )
        if self.variant == "itc" and self.num_global_tokens != 0:
            raise ValueError(
                f"num_global_tokens ({self.num_global_tokens}) is for variant='etc'; "
                "ITC uses num_global_blocks"
            )
        if self.variant == "etc" and self.num_global_tokens < 1:
            raise ValueError("variant='etc' needs num_global_tokens >= 1")
        return self


@dataclass(frozen=True)
class BlockPlan:
    """Which local key blocks each local query block attends, per head.

    ``index`` long [H, nl, L] (local block ids, window first then random) and ``valid``
    bool [H, nl, L] (False for window slots outside the local range and for random slots
    that could not be filled because too few blocks were left).
    """

    index: torch.Tensor
    valid: torch.Tensor


def head_generator(seed: int, layer_idx: int, head: int) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, layer_idx, head); independent of global RNG."""
    digest = hashlib.sha256(f"bigbird:{seed}:{layer_idx}:{head}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


def make_block_plan(
    num_local_blocks: int,
    num_heads: int,
    num_window_blocks: int,
    num_random_blocks: int,
    seed: int,
    layer_idx: int,
) -> BlockPlan:
    """Window blocks plus ``num_random_blocks`` distinct random blocks outside the window.

    Random blocks are drawn uniformly from the local blocks outside the row's window (the
    corrected rule of spec §2; global blocks are never candidates since they are not local).
    """
    nl, half = num_local_blocks, num_window_blocks // 2
    rows = torch.arange(nl)
    window = rows[:, None] + torch.arange(-half, half + 1)[None, :]  # [nl, w]
    window_valid = (window >= 0) & (window < nl)
    window = window.clamp(0, max(nl - 1, 0))
    in_window = (rows[None, :] - rows[:, None]).abs() <= half  # [nl, nl]: column in row's window
    indices, valids = [], []
    for head in range(num_heads):
        generator = head_generator(seed, layer_idx, head)
        keys = torch.rand(nl, nl, generator=generator)
        keys = keys.masked_fill(in_window, 2.0)  # candidates have keys in [0, 1)
        order = keys.argsort(dim=-1, stable=True)[:, :num_random_blocks]
        order = order.sort(dim=-1).values if num_random_blocks else order
        random_valid = keys.gather(1, order) < 1.5
        indices.append(torch.cat([window, order], dim=1))
        valids.append(torch.cat([window_valid, random_valid], dim=1))
    return BlockPlan(torch.stack(indices), torch.stack(valids))


def global_token_counts(options: BigBirdOptions, num_blocks: int) -> tuple[int, int]:
    """Numbers of (prefix, suffix) global tokens for a padded length of num_blocks * b."""
    if options.variant == "etc":
        return options.num_global_tokens, 0
    global_blocks = min(options.num_global_blocks, num_blocks)
    prefix_blocks = (global_blocks + 1) // 2
    return prefix_blocks * options.block_size, (global_blocks - prefix_blocks) * options.block_size


@register
class BigBirdAttention(Attention):
    """BigBird ITC/ETC block-sparse self-attention; encoder-only (no causal).

    Defaults (paper ITC, official code): block_size 64, window 3 blocks, 2 global blocks
    (first and last), 3 random blocks, seed 0. Sequences are right-padded to a multiple of
    the block size and the outputs of padded queries are zero.
    """

    name = "bigbird"
    supports_causal = False
    supports_padding = True
    stochastic_structure = True
    Options = BigBirdOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=self.options.bias)
        self.out = nn.Linear(d_model, d_model, bias=self.options.bias)
        # Cache of plans per (nl, device); each is a deterministic function of nl, so this
        # holds no state between calls.
        self._plans: dict[tuple[int, str], BlockPlan] = {}

    def plan(self, num_local_blocks: int, device: torch.device | str = "cpu") -> BlockPlan:
        """The (cached, deterministic) random plan for ``num_local_blocks`` local blocks."""
        key = (num_local_blocks, str(device))
        if key not in self._plans:
            o = self.options
            plan = make_block_plan(
                num_local_blocks,
                self.num_heads,
                o.num_window_blocks,
                o.num_random_blocks,
                o.seed,
                self.layer_idx,
            )
            self._plans[key] = BlockPlan(plan.index.to(device), plan.valid.to(device))
        return self._plans[key]

    def layout(self, n: int) -> tuple[int, int, int]:
        """(prefix globals, suffix globals, padded length) for an input of length n."""
        b = self.options.block_size
        if self.options.variant == "etc":
            g = self.options.num_global_tokens
            if n < g:
                raise ValueError(
                    f"sequence length ({n}) must be at least num_global_tokens ({g}) for ETC"
                )
            return g, 0, g + -(-(n - g) // b) * b
        padded = -(-n // b) * b
        prefix, suffix = global_token_counts(self.options, padded // b)
        return prefix, suffix, padded

    def dense_mask(self, n: int) -> torch.Tensor:
        """The equivalent bool mask [H, n, n] (True = attend) for a padded length n; the oracle."""
        prefix, suffix, padded = self.layout(n)
        if padded != n:
            raise ValueError(f"dense_mask needs a padded length, got n={n} (padded {padded})")
        b, num_heads = self.options.block_size, self.num_heads
        nl = (n - prefix - suffix) // b
        mask = torch.zeros(num_heads, n, n, dtype=torch.bool)
        is_global = torch.zeros(n, dtype=torch.bool)
        is_global[:prefix] = True
        is_global[n - suffix :] = True
        mask[:, is_global, :] = True
        mask[:, :, is_global] = True
        if nl > 0:
            plan = self.plan(nl)
            # Invalid slots go to a spare column nl, dropped afterwards.
            blocks = torch.zeros(num_heads, nl, nl + 1, dtype=torch.bool)
            blocks.scatter_(2, plan.index.masked_fill(~plan.valid, nl), True)
            local = blocks[:, :, :nl].repeat_interleave(b, dim=1).repeat_interleave(b, dim=2)
            mask[:, prefix : n - suffix, prefix : n - suffix] = local
        return mask

    def forward(self, x, *, key_padding_mask=None, state=None):
        check_padding_mask(x, key_padding_mask)
        n_in = x.shape[1]
        prefix, suffix, padded = self.layout(n_in)
        if padded != n_in:
            etc_prefix = prefix if self.options.variant == "etc" else 0
            x, key_padding_mask = pad_layout(
                x, key_padding_mask, etc_prefix, self.options.block_size
            )
        q, k, v = (self.split_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        y = self.attend(q, k, v, key_padding_mask, prefix, suffix)
        y = zero_padded_queries(self.out(self.merge_heads(y)), key_padding_mask)
        return y[:, :n_in], None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        prefix: int,
        suffix: int,
    ) -> torch.Tensor:
        """Block-sparse softmax attention: q, k, v [B, H, n, d] -> [B, H, n, d]."""
        n, d = q.shape[2], q.shape[3]
        dropout = self.options.dropout if self.training else 0.0
        sizes = [prefix, n - prefix - suffix, suffix]
        # torch.split (not slicing) so that the backward concatenates instead of zero-filling
        # a full-size gradient per slice.
        (q_head, q_local, q_tail), (k_head, k_local, k_tail), (v_head, v_local, v_tail) = (
            t.split(sizes, dim=2) for t in (q, k, v)
        )
        masks = key_padding_mask.split(sizes, dim=1) if key_padding_mask is not None else None
        key_bias = None
        if key_padding_mask is not None:  # finite, so a fully padded sequence gives no NaN
            key_bias = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
            key_bias = key_bias.masked_fill(~key_padding_mask, torch.finfo(q.dtype).min)
            key_bias = key_bias[:, None, None, :]
        # Global query rows: dense over every key.
        y_global = F.scaled_dot_product_attention(
            torch.cat([q_head, q_tail], dim=2),
            k,
            v,
            attn_mask=key_bias,
            dropout_p=dropout,
            scale=default_scale(d),
        )
        if sizes[1] == 0:
            return y_global
        k_global = torch.cat([k_head, k_tail], dim=2)  # [B, H, g, d]
        v_global = torch.cat([v_head, v_tail], dim=2)
        mask_global = torch.cat([masks[0], masks[2]], dim=1) if masks is not None else None
        mask_local = masks[1] if masks is not None else None
        y_local = self.attend_local(
            q_local, k_local, v_local, k_global, v_global, mask_local, mask_global, dropout
        )
        y_head, y_tail = y_global.split([prefix, suffix], dim=2)
        return torch.cat([y_head, y_local, y_tail], dim=2)

    def attend_local(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_global: torch.Tensor,
        v_global: torch.Tensor,
        mask_local: torch.Tensor | None,
        mask_global: torch.Tensor | None,
        dropout: float,
    ) -> torch.Tensor:
        """Local rows over [global tokens | window + random blocks].

        q, k, v [B, H, nl*b, d] (local part), k_global and v_global [B, H, g, d], masks bool
        [B, nl*b] and [B, g] (True = real token) or None. Returns [B, H, nl*b, d].
        """
        batch, num_heads, length, d = q.shape
        b = self.options.block_size
        nl, num_global = length // b, k_global.shape[2]
        plan = self.plan(nl, q.device)
        width = plan.index.shape[-1]  # L
        heads = torch.arange(num_heads, device=q.device)[:, None, None]
        flat = (plan.index + nl * heads).reshape(-1)

        def gather_blocks(t: torch.Tensor) -> torch.Tensor:
            # [B, H, nl*b, ...] -> [B, H, nl, L*b, ...]; index_select's backward is index_add.
            blocks = t.reshape(batch, num_heads * nl, b, *t.shape[3:])
            gathered = blocks.index_select(1, flat)
            return gathered.view(batch, num_heads, nl, width * b, *t.shape[3:])

        # Allowed keys per local row [B or 1, H, nl, g + L*b], as a finite additive bias (not
        # -inf) so that a fully padded row cannot give NaN; such a row is a padded query,
        # zeroed by the caller.
        valid = plan.valid.repeat_interleave(b, dim=-1)  # [H, nl, L*b]
        ones = torch.ones(num_heads, nl, num_global, dtype=torch.bool, device=q.device)
        allowed = torch.cat([ones, valid], dim=-1)[None]
        if mask_local is not None:
            local_ok = gather_blocks(mask_local[:, None, :].expand(-1, num_heads, -1))
            global_ok = mask_global[:, None, None, :].expand(-1, num_heads, nl, -1)
            allowed = allowed & torch.cat([global_ok, local_ok], dim=-1)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~allowed, torch.finfo(q.dtype).min)[:, :, :, None, :]
        # Keys of each local row: [global tokens | its L gathered blocks]. The 4-D shape
        # [B, H*nl, ., d] lets SDPA take its fused CPU kernel (no [.., b, g + L*b] score
        # tensor kept for the backward); a 5-D call falls back to the math backend.
        expand = (-1, -1, nl, -1, -1)
        keys = torch.cat([k_global[:, :, None].expand(*expand), gather_blocks(k)], dim=3)
        values = torch.cat([v_global[:, :, None].expand(*expand), gather_blocks(v)], dim=3)
        y = F.scaled_dot_product_attention(
            q.reshape(batch, num_heads * nl, b, d),
            keys.view(batch, num_heads * nl, -1, d),
            values.view(batch, num_heads * nl, -1, d),
            attn_mask=bias.view(bias.shape[0], num_heads * nl, 1, -1),
            dropout_p=dropout,
            scale=default_scale(d),
        )
        return y.view(batch, num_heads, length, d)


def pad_layout(
    x: torch.Tensor, key_padding_mask: torch.Tensor | None, prefix: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad x [B, n, D] so that n - prefix is a multiple of block_size (mask updated)."""
    if prefix == 0:
        x, key_padding_mask, _ = pad_to_multiple(x, key_padding_mask, block_size)
        return x, key_padding_mask
    head_mask = key_padding_mask[:, :prefix] if key_padding_mask is not None else None
    tail_mask = key_padding_mask[:, prefix:] if key_padding_mask is not None else None
    tail, tail_mask, _ = pad_to_multiple(x[:, prefix:], tail_mask, block_size)
    x = torch.cat([x[:, :prefix], tail], dim=1)
    if tail_mask is not None:
        if head_mask is None:
            head_mask = torch.ones(x.shape[0], prefix, dtype=torch.bool, device=x.device)
        key_padding_mask = torch.cat([head_mask, tail_mask], dim=1)
    return x, key_padding_mask
