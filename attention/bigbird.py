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

from attention.base import (
    Attention,
    AttentionOptions,
    default_scale,
    pad_to_multiple,
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


# Elements of one gathered K (or V) chunk of local rows: 2^21 floats = 8 MiB in fp32.
LOCAL_CHUNK_ELEMENTS = 2**21


@dataclass(frozen=True)
class RowChunk:
    """Local rows [start, stop): ``flat`` long [Kb*H*rows] source block ids (offset by
    head * S) for index_select, ``allowed`` bool [1, H*rows, b*Kb] structural key mask."""

    start: int
    stop: int
    flat: torch.Tensor
    allowed: torch.Tensor


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
    first_head: int = 0,
) -> BlockPlan:
    """Window blocks plus ``num_random_blocks`` distinct random blocks outside the window.

    Heads ``first_head .. first_head + num_heads - 1``: a head's plan depends on its global
    index only, so a tensor-parallel rank draws exactly the plans of its own heads.

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
    for head in range(first_head, first_head + num_heads):
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
    supports_tensor_parallel = True  # the random plan is per (global) head
    Options = BigBirdOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        self.make_qkv_projections(self.options.bias)
        # Caches of the random plan (per nl, on CPU) and of the gather indices derived from it
        # (per nl, layout and device). Both are deterministic functions of their keys, so
        # they carry no state from one call to the next.
        self._plans: dict[int, BlockPlan] = {}
        self._gather_plans: dict[tuple[int, int, int, str], list[RowChunk]] = {}

    def plan(self, num_local_blocks: int) -> BlockPlan:
        """The (cached, deterministic) random plan for ``num_local_blocks`` local blocks."""
        if num_local_blocks not in self._plans:
            o = self.options
            self._plans[num_local_blocks] = make_block_plan(
                num_local_blocks,
                self.num_local_heads,
                o.num_window_blocks,
                o.num_random_blocks,
                o.seed,
                self.layer_idx,
                first_head=self.local_head_slice().start,
            )
        return self._plans[num_local_blocks]

    def shard_heads(self) -> None:
        # Cached plans were drawn for every head; the local heads draw theirs again.
        self._plans.clear()
        self._gather_plans.clear()

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
        """The equivalent bool mask [H_local, n, n] (True = attend) for a padded length n."""
        prefix, suffix, padded = self.layout(n)
        if padded != n:
            raise ValueError(f"dense_mask needs a padded length, got n={n} (padded {padded})")
        b, num_heads = self.options.block_size, self.num_local_heads
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

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None,
        state: Any,
    ) -> tuple[torch.Tensor, None]:
        """q, k, v [B, H, n, d], key_padding_mask bool [B, n] -> ([B, H, n, d], None).

        The sequence is right-padded to whole blocks (after the ETC prefix); padded keys are
        masked and padded queries dropped, so zero padding of q, k, v is as good as
        projecting zeros.
        """
        n_in = q.shape[2]
        prefix, suffix, padded = self.layout(n_in)
        if padded != n_in:
            etc_prefix = prefix if self.options.variant == "etc" else 0
            mask, tensors = key_padding_mask, []
            for t in (q, k, v):  # pad_layout pads dim 1: lay the tensors out [B, n, H, d]
                t, mask = pad_layout(
                    t.transpose(1, 2), key_padding_mask, etc_prefix, self.options.block_size
                )
                tensors.append(t.transpose(1, 2))
            q, k, v = tensors
            key_padding_mask = mask
        y = self.attend_blocks(q, k, v, key_padding_mask, prefix, suffix)
        return y[:, :, :n_in], None

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Multiply-adds per token of one forward: (projections, scores).

        The module pads n = ``seq_len`` to P (``layout``: whole blocks of b after the ETC
        prefix) and cuts it into g = prefix + suffix global tokens and nl local blocks. Each
        local block of b queries attends Kb blocks of b keys: the global blocks (ETC's
        prefix rounded up to whole blocks), w window and min(r, nl) random blocks:

            projections = 4 D^2
            scores      = 2 D (g P + nl b Kb b) / n

        (Q K^T and the weighted sum of V: g global rows over all P keys, local rows over
        their gathered keys.) What the module computes: window slots past the local range
        and random slots it could not fill are gathered and masked, not skipped, so this is
        above the paper's count of distinct keys; and at n <= 2 b (one or two blocks, all
        global) it is dense attention over P >= n keys.
        """
        o = self.options
        b = o.block_size
        prefix, suffix, padded = self.layout(seq_len)
        num_local = (padded - prefix - suffix) // b
        global_blocks = -(-prefix // b) + suffix // b
        key_blocks = global_blocks + o.num_window_blocks + min(o.num_random_blocks, num_local)
        rows = (prefix + suffix) * padded + num_local * b * key_blocks * b
        return 4.0 * self.d_model * self.d_model, 2.0 * self.d_model * rows / seq_len

    def gather_plan(
        self, nl: int, prefix: int, suffix: int, device: torch.device
    ) -> list[RowChunk]:
        """Which source blocks each local row gathers, cut into chunks of rows.

        The source is the key sequence cut into S blocks of b tokens: [prefix globals | nl
        local blocks | suffix globals], the prefix padded up to whole blocks (ETC). Each
        local row gathers its Kb = (global + window + random) blocks.
        """
        key = (nl, prefix, suffix, str(device))
        if key not in self._gather_plans:
            b, num_heads = self.options.block_size, self.num_local_heads
            plan = self.plan(nl)
            num_prefix, num_suffix = -(-prefix // b), suffix // b
            num_source = num_prefix + nl + num_suffix
            global_ids = list(range(num_prefix)) + list(range(num_source - num_suffix, num_source))
            global_ids = torch.tensor(global_ids, dtype=torch.long).expand(num_heads, nl, -1)
            index = torch.cat([global_ids, plan.index + num_prefix], dim=-1)  # [H, nl, Kb]
            index = index + torch.arange(num_heads)[:, None, None] * num_source
            prefix_slots = torch.arange(num_prefix * b) < prefix  # padding inside the prefix
            global_slots = torch.cat([prefix_slots, torch.ones(num_suffix * b, dtype=torch.bool)])
            slots = torch.cat(
                [global_slots.expand(num_heads, nl, -1), plan.valid.repeat_interleave(b, dim=-1)],
                dim=-1,
            )  # [H, nl, Kb*b], (block, token) order
            num_blocks = index.shape[-1]
            # Rows per chunk: keep each gathered K or V chunk near LOCAL_CHUNK_ELEMENTS.
            rows = max(1, LOCAL_CHUNK_ELEMENTS // (num_heads * num_blocks * b * self.head_dim))
            chunks = []
            for start in range(0, nl, rows):
                stop = min(start + rows, nl)
                # Ordered (block slot, head, row): the gather lands in [.., Kb, H*rows, ..].
                flat = index[:, start:stop].permute(2, 0, 1).reshape(-1)
                allowed = slots[:, start:stop].reshape(num_heads, stop - start, num_blocks, b)
                allowed = allowed.transpose(-1, -2).reshape(1, -1, b * num_blocks)
                chunks.append(RowChunk(start, stop, flat.to(device), allowed.to(device)))
            self._gather_plans[key] = chunks
        return self._gather_plans[key]

    def attend_blocks(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        prefix: int,
        suffix: int,
    ) -> torch.Tensor:
        """Block-sparse softmax attention: q, k, v [B, H, n, d] -> [B, H, n, d]."""
        batch, num_heads, n, d = q.shape
        b = self.options.block_size
        dropout = self.options.dropout if self.training else 0.0
        length = n - prefix - suffix
        nl = length // b
        # torch.split (not slicing) so that the backward concatenates instead of zero-filling
        # a full-size gradient per slice.
        q_head, q_local, q_tail = q.split([prefix, length, suffix], dim=2)
        # Global query rows: dense over every key. Masks are finite additive biases (not
        # -inf), so that a fully padded row gives no NaN; padded query rows are zeroed later.
        key_bias = None
        if key_padding_mask is not None:
            key_bias = additive_bias(key_padding_mask, q.dtype)[:, None, None, :]
        y_global = F.scaled_dot_product_attention(
            torch.cat([q_head, q_tail], dim=2),
            k,
            v,
            attn_mask=key_bias,
            dropout_p=dropout,
            scale=default_scale(d),
        )
        if nl == 0:
            return y_global
        # Local rows gather their Kb key blocks from the block-cut sequence with index_select.
        # Tensors are laid out [B, tokens, H*rows, d] and handed to SDPA transposed, the
        # layout of its fused CPU kernel, so that its gradients come back with no copy.
        # Keys inside a row are ordered (token in block, block); the bias follows that order.
        # Rows go in chunks of a few MiB, which the allocator reuses: fresh 100+ MiB buffers
        # pay page faults on first touch (filling one took 4x as long as reused 8 MiB ones
        # here; chunking saved about 5% of the step at n = 8192).
        pad = -prefix % b  # ETC: the global prefix padded up to whole blocks

        def source_blocks(t: torch.Tensor) -> torch.Tensor:
            # [B, H, n, c] -> [B, b, H*S, c]
            if pad:
                zeros = t.new_zeros(*t.shape[:2], pad, t.shape[3])
                t = torch.cat([t[:, :, :prefix], zeros, t[:, :, prefix:]], dim=2)
            blocks = t.reshape(batch, num_heads, -1, b, t.shape[3]).permute(0, 3, 1, 2, 4)
            return blocks.reshape(batch, b, -1, t.shape[3])

        source_k, source_v = source_blocks(k), source_blocks(v)
        source_ok = None
        if key_padding_mask is not None:
            source_ok = source_blocks(
                key_padding_mask[:, None, :, None].expand(-1, num_heads, -1, 1)
            )
        q_blocks = q_local.reshape(batch, num_heads, nl, b, d)
        outputs = []
        for chunk in self.gather_plan(nl, prefix, suffix, q.device):
            rows = num_heads * (chunk.stop - chunk.start)

            allowed = chunk.allowed
            if source_ok is not None:
                allowed = allowed & gather_rows(source_ok, chunk.flat, rows)[..., 0]
            q_rows = q_blocks[:, :, chunk.start : chunk.stop].permute(0, 3, 1, 2, 4)
            q_rows = q_rows.reshape(batch, b, rows, d).transpose(1, 2)  # [B, H*rows, b, d]
            y = F.scaled_dot_product_attention(
                q_rows,
                gather_rows(source_k, chunk.flat, rows),
                gather_rows(source_v, chunk.flat, rows),
                attn_mask=additive_bias(allowed, q.dtype)[:, :, None, :],
                dropout_p=dropout,
                scale=default_scale(d),
            )
            outputs.append(y.reshape(batch, num_heads, chunk.stop - chunk.start, b, d))
        y_local = torch.cat(outputs, dim=2).view(batch, num_heads, length, d)
        y_head, y_tail = y_global.split([prefix, suffix], dim=2)
        return torch.cat([y_head, y_local, y_tail], dim=2)


def gather_rows(source: torch.Tensor, flat: torch.Tensor, rows: int) -> torch.Tensor:
    """Gather key blocks: source [B, b, H*S, c] -> [B, rows, b*Kb, c] (a transposed view)."""
    gathered = source.index_select(2, flat)
    return gathered.view(source.shape[0], -1, rows, source.shape[3]).transpose(1, 2)


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (True = attend) -> 0 / dtype-minimum additive bias (finite: no NaN rows)."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


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
