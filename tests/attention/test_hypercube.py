"""Hypercube (NIP) attention: graph properties, block-sparse kernel = dense oracle, probes."""

from __future__ import annotations

import math

import pytest
import torch

import attention
from attention.hypercube import (
    HypercubeAttention,
    cube_dimension,
    dense_hypercube_mask,
    gray_code,
    gray_code_inverse,
    hypercube_attention,
    hypercube_neighbours,
)
from tests.attention.probes import dense_softmax_oracle, padding_probe, train_tiny_model

UNIT_COUNTS = [1, 2, 3, 4, 5, 8, 12, 16, 31, 64, 100]


def reflected_gray_sequence(bits: int) -> list[int]:
    """Gray codes built by reflection (prefix 0 to G(k-1), prefix 1 to reversed G(k-1))."""
    codes = [0]
    for bit in range(bits):
        codes = codes + [c | (1 << bit) for c in reversed(codes)]
    return codes


def bfs_distances(adjacency: torch.Tensor, source: int) -> list[int]:
    n = adjacency.shape[0]
    dist = [-1] * n
    dist[source] = 0
    frontier = [source]
    while frontier:
        nxt = []
        for u in frontier:
            for w in torch.nonzero(adjacency[u]).flatten().tolist():
                if dist[w] < 0:
                    dist[w] = dist[u] + 1
                    nxt.append(w)
        frontier = nxt
    return dist


def test_gray_code_matches_reflection_and_inverts():
    for bits in range(0, 8):
        index = torch.arange(2**bits)
        assert gray_code(index).tolist() == reflected_gray_sequence(bits)
        assert torch.equal(gray_code_inverse(gray_code(index)), index)


@pytest.mark.parametrize("num_units", UNIT_COUNTS)
def test_mask_properties(num_units):
    mask = dense_hypercube_mask(num_units, block_size=1)
    k = cube_dimension(num_units)
    assert torch.equal(mask, mask.T), "the cube graph must be symmetric"
    assert bool(mask.diagonal().all()), "every unit attends to itself"
    counts = mask.sum(dim=1)
    if num_units & (num_units - 1) == 0:
        assert bool((counts == k + 1).all()), f"rows must have log2(n)+1 = {k + 1} entries"
    else:
        assert int(counts.max()) <= k + 1
    i = torch.arange(num_units - 1)
    assert bool(mask[i, i + 1].all()) and bool(mask[i + 1, i].all()), "i ~ i+1 must hold"
    # Every edge flips exactly one bit of the Gray code.
    rows, cols = torch.nonzero(mask & ~torch.eye(num_units, dtype=torch.bool), as_tuple=True)
    flipped = gray_code(rows) ^ gray_code(cols)
    assert bool((flipped & (flipped - 1) == 0).all()) and bool((flipped > 0).all())
    adjacency = mask & ~torch.eye(num_units, dtype=torch.bool)
    diameter = max(max(bfs_distances(adjacency, s)) for s in range(num_units))
    assert diameter == math.ceil(math.log2(num_units)) if num_units > 1 else diameter == 0


def official_style_mask(num_units: int) -> torch.Tensor:
    """The reference's layout, rebuilt: a reflected Gray sequence grown at the low bit.

    Each reflection appends the reversed sequence, shifts every code left and sets the low
    bit in the second half (a bit-reversed Gray order); unit i attends to itself and to the
    units whose code differs in one bit, dropped (mapped to self) when outside the range.
    """
    bits = cube_dimension(num_units)
    codes = [0, 1]
    while len(codes) < 2**bits:
        codes = codes + codes[::-1]
        half = len(codes) // 2
        codes = [(c << 1) | (1 if i >= half else 0) for i, c in enumerate(codes)]
    codes = codes[: max(2**bits, 1)]
    position = {code: index for index, code in enumerate(codes)}
    mask = torch.zeros(num_units, num_units, dtype=torch.bool)
    for i in range(num_units):
        mask[i, i] = True
        for bit in range(bits):
            neighbour = position[codes[i] ^ (1 << bit)]
            mask[i, neighbour if neighbour < num_units else i] = True
    return mask


@pytest.mark.parametrize("num_units", [2, 4, 8, 16, 12, 100])
def test_mask_equals_official_construction(num_units):
    assert torch.equal(dense_hypercube_mask(num_units), official_style_mask(num_units))


def test_neighbour_table_has_self_first_and_k_plus_one_slots():
    table, valid = hypercube_neighbours(16)
    assert table.shape == (16, 5) and bool(valid.all())
    assert torch.equal(table[:, 0], torch.arange(16))
    table, valid = hypercube_neighbours(12)
    assert table.shape == (12, 5) and not bool(valid.all())
    assert bool((table < 12).all())


def test_block_layout_mask_is_unit_mask_expanded():
    unit = dense_hypercube_mask(6, block_size=1)
    tokens = dense_hypercube_mask(22, block_size=4)  # 6 units, the last one partial
    unit_of = torch.arange(22) // 4
    assert torch.equal(tokens, unit[unit_of][:, unit_of])


@pytest.mark.parametrize("n,block_size", [(16, 1), (24, 2), (48, 4), (36, 4)])
@pytest.mark.parametrize("with_padding", [False, True])
def test_block_sparse_kernel_equals_dense_mask_oracle(n, block_size, with_padding):
    generator = torch.Generator().manual_seed(n + block_size)
    q, k, v = (torch.randn(2, 3, n, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    mask = None
    allowed = dense_hypercube_mask(n, block_size)[None, None]
    if with_padding:
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[0, n - 5 :] = False
        mask[1, 3] = False
        allowed = allowed & mask[:, None, None, :]
    out = hypercube_attention(q, k, v, block_size, mask)
    expected = dense_softmax_oracle(q, k, v, allowed=allowed)
    if mask is not None:  # padded query rows are free (zeroed by the module)
        out = out * mask[:, None, :, None]
        expected = expected * mask[:, None, :, None]
    assert torch.allclose(out, expected, atol=1e-10, rtol=0)


def test_module_matches_dense_oracle_fp32_with_length_padding():
    torch.manual_seed(0)
    module = attention.build("hypercube", d_model=16, num_heads=2, block_size=4)
    module.eval()
    x = torch.randn(2, 30, 16)  # 30 is not a multiple of 4: the module pads to 32
    y, state = module(x)
    assert state is None and y.shape == x.shape
    with torch.no_grad():
        q, k, v = (module.split_heads(t) for t in module.qkv(x).chunk(3, dim=-1))
        allowed = dense_hypercube_mask(30, 4)
        expected = dense_softmax_oracle(q, k, v, allowed=allowed).float()
        expected = module.out(module.merge_heads(expected))
    assert torch.allclose(y, expected, atol=1e-5, rtol=1e-4)


def test_padding_probe():
    torch.manual_seed(1)
    module = attention.build("hypercube", d_model=16, num_heads=2, block_size=2).double()
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    padding_probe(module, x, length=13)
    assert HypercubeAttention.supports_padding


def _stack_jacobian_support(num_layers: int, n: int) -> torch.Tensor:
    torch.manual_seed(2)
    layers = [
        attention.build("hypercube", d_model=8, num_heads=2, block_size=1, layer_idx=i).double()
        for i in range(num_layers)
    ]

    def stack(x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            x = layer(x)[0]
        return x

    x = torch.randn(1, n, 8, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(stack, x)  # [1, n, 8, 1, n, 8]
    return jac[0, :, :, 0].abs().sum(dim=(1, 3)) > 0  # [n, n]: does y_i depend on x_j


@pytest.mark.parametrize("n", [16, 12])
def test_full_receptive_field_after_log_n_layers(n):
    depth = math.ceil(math.log2(n))
    assert bool(_stack_jacobian_support(depth, n).all()), f"{depth} layers must reach all"
    assert not bool(_stack_jacobian_support(depth - 1, n).all()), (
        f"{depth - 1} layers must leave some pair unreachable"
    )


def test_gradcheck_float64():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    assert torch.autograd.gradcheck(
        lambda a, b, c: hypercube_attention(a, b, c, 2, mask), (q, k, v)
    )


def test_bf16_close_to_fp32():
    torch.manual_seed(4)
    module = attention.build("hypercube", d_model=32, num_heads=2, block_size=4).eval()
    x = torch.randn(2, 64, 32)
    reference, _ = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = module(x)
    rel = (low.float() - reference).norm() / reference.norm()
    assert rel < 3e-2, f"bf16 relative error {rel}"


def test_refuses_causal_and_bad_options():
    with pytest.raises(ValueError, match="causal"):
        attention.build("hypercube", d_model=16, num_heads=2, causal=True)
    with pytest.raises(ValueError, match="block_size"):
        attention.build("hypercube", d_model=16, num_heads=2, block_size=0)


@pytest.mark.slow
def test_trains_in_tiny_moe_model():
    losses = train_tiny_model("hypercube", "masked_lm", block_size=4)
    assert losses[-1] < 0.3 * losses[0], f"loss did not fall: {losses[0]} -> {losses[-1]}"
