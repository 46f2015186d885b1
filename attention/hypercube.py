"""Hypercube attention (NIP; Wang et al., ICML 2022): each unit attends to its cube neighbours.

Shape letters: B batch, n sequence length, D model width, H heads, d = D / H head width,
b block (unit) size, U = n / b units, k = ceil(log2 U) cube dimension, S = k + 1 slots
(self and the k neighbours).

Sequence units (blocks of ``block_size`` tokens; ``block_size=1`` is the token-level
graph) sit on the vertices of a k-dimensional hypercube through the reflected Gray code
``g(i) = i XOR (i >> 1)``. Unit i attends to itself and to ``g^-1(g(i) XOR 2^j)`` for
j = 0..k-1; neighbours outside [0, U) are dropped (attention_spec.md §7). The graph is
symmetric, keeps i ~ i +- 1 (a Gray code is a Hamiltonian path) and has diameter k, so
information reaches every token after ceil(log2 U) layers.

The kernel gathers the S neighbour blocks of every query block (O(n (k + 1) b d) time and
memory); the n x n mask is never built outside ``dense_hypercube_mask``, which exists for
tests. Causal use is not in the paper and is refused; padded keys are masked.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from attention.base import (
    Attention,
    AttentionOptions,
    pad_to_multiple,
)
from attention.registry import register


class HypercubeOptions(AttentionOptions):
    """Hypercube options; ``block_size=16`` is the official LRA/BERT layout."""

    block_size: int = Field(default=16, ge=1, le=4096)
    bias: bool = True


def cube_dimension(num_units: int) -> int:
    """k = ceil(log2 num_units), 0 for a single unit."""
    if num_units < 1:
        raise ValueError(f"num_units must be >= 1, got {num_units}")
    return (num_units - 1).bit_length()


def gray_code(index: torch.Tensor) -> torch.Tensor:
    """Reflected binary Gray code g(i) = i XOR (i >> 1) of an int64 tensor."""
    return index ^ (index >> 1)


def gray_code_inverse(code: torch.Tensor) -> torch.Tensor:
    """The index i with g(i) = code: the prefix XOR of the bits of ``code``."""
    result = code.clone()
    shifted = code >> 1
    while bool((shifted != 0).any()):
        result ^= shifted
        shifted = shifted >> 1
    return result


@lru_cache(maxsize=64)
def _neighbour_table_cpu(num_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    units = torch.arange(num_units, dtype=torch.int64)
    codes = gray_code(units)
    columns = [units]
    valid = [torch.ones(num_units, dtype=torch.bool)]
    for bit in range(cube_dimension(num_units)):
        neighbour = gray_code_inverse(codes ^ (1 << bit))
        inside = neighbour < num_units
        # A dropped neighbour points at the unit itself and is masked (the official code
        # maps it to self; masking avoids counting the diagonal block twice).
        columns.append(torch.where(inside, neighbour, units))
        valid.append(inside)
    return torch.stack(columns, dim=1), torch.stack(valid, dim=1)


def hypercube_neighbours(
    num_units: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour table int64 [U, S] (slot 0 = self) and its validity bool [U, S]."""
    table, valid = _neighbour_table_cpu(num_units)
    return table.to(device), valid.to(device)


def dense_hypercube_mask(n: int, block_size: int = 1) -> torch.Tensor:
    """The token-level n x n bool mask (True = may attend); for tests and analysis only."""
    num_units = math.ceil(n / block_size)
    table, valid = hypercube_neighbours(num_units)
    unit_mask = torch.zeros(num_units, num_units, dtype=torch.bool)
    rows = torch.arange(num_units).unsqueeze(1).expand_as(table)
    unit_mask[rows[valid], table[valid]] = True
    unit_of_token = torch.arange(n) // block_size
    return unit_mask[unit_of_token][:, unit_of_token]


def hypercube_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    key_padding_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Block-sparse softmax attention over the hypercube graph.

    q, k, v [B, H, n, d] with n a multiple of ``block_size``; key_padding_mask bool [B, n]
    (True = real) or None; ``dropout`` is applied to the probabilities. Returns [B, H, n, d]. Padded query rows see every gathered key
    (their outputs are meaningless and are zeroed by the caller) so no row is empty.
    """
    batch, heads, n, head_dim = q.shape
    if n % block_size != 0:
        raise ValueError(f"sequence length {n} must be a multiple of block_size {block_size}")
    num_units = n // block_size
    table, slot_valid = hypercube_neighbours(num_units, q.device)
    num_slots = table.shape[1]
    flat_table = table.reshape(-1)

    def gather(t: torch.Tensor) -> torch.Tensor:
        blocks = t.reshape(batch, heads, num_units, block_size, head_dim)
        gathered = blocks.index_select(2, flat_table)
        return gathered.reshape(batch, heads, num_units, num_slots * block_size, head_dim)

    q_blocks = q.reshape(batch, heads, num_units, block_size, head_dim)
    k_near, v_near = gather(k), gather(v)
    # The softmax runs in fp32 at least (bf16 under autocast), fp64 stays fp64.
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q_blocks @ k_near.transpose(-1, -2)).to(compute_dtype) / math.sqrt(head_dim)

    allowed = None  # [B or 1, 1, U, b or 1, S * b]
    if not bool(slot_valid.all()):
        allowed = slot_valid[:, :, None].expand(num_units, num_slots, block_size)
        allowed = allowed.reshape(1, 1, num_units, 1, num_slots * block_size)
    if key_padding_mask is not None:
        key_ok = key_padding_mask.reshape(batch, num_units, block_size)
        key_ok = key_ok.index_select(1, flat_table).reshape(batch, 1, num_units, 1, -1)
        allowed = key_ok if allowed is None else allowed & key_ok
        query_pad = ~key_padding_mask.reshape(batch, 1, num_units, block_size, 1)
        allowed = allowed | query_pad
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout)
    out = probs @ v_near
    return out.reshape(batch, heads, n, head_dim)


@register
class HypercubeAttention(Attention):
    """Hypercube (NIP) attention: Gray-code cube graph over blocks, O(n log n).

    Defaults: ``block_size=16`` (official LRA/BERT runs), scale 1/sqrt(d). Encoder only;
    padding by key mask, the sequence is right-padded to a multiple of the block.
    """

    name = "hypercube"
    supports_causal = False
    supports_padding = True
    supports_tensor_parallel = True
    Options = HypercubeOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        self.make_qkv_projections(self.options.bias)

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

        The sequence is right-padded to a multiple of the block; padded keys are masked and
        padded queries dropped, so zero padding of q, k, v is as good as projecting zeros.
        """
        n, block = q.shape[2], self.options.block_size
        padded, mask = [], key_padding_mask
        for t in (q, k, v):  # pad_to_multiple pads dim 1: lay the tensors out [B, n, H, d]
            t_padded, mask, _ = pad_to_multiple(t.transpose(1, 2), key_padding_mask, block)
            padded.append(t_padded.transpose(1, 2))
        dropout = self.options.dropout if self.training else 0.0
        y = hypercube_attention(*padded, block, mask, dropout)
        return y[:, :, :n], None
