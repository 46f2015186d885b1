"""BigBird: block-sparse kernel vs the dense-mask oracle, reductions, structure, seeding."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import attention
from attention import bigbird
from attention.bigbird import make_block_plan
from tests.attention.probes import dense_softmax_oracle, padding_probe

D, H = 8, 2  # tiny model width and heads (head width 4)


def build(**options) -> attention.Attention:
    return attention.build("bigbird", d_model=D, num_heads=H, **options).double().eval()


def oracle(module, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """float64 dense attention with the module's own mask; x [B, n, D] with n already padded."""
    q, k, v = (module.split_heads(t) for t in module.qkv(x).chunk(3, dim=-1))
    allowed = module.dense_mask(x.shape[1])[None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    y = module.out(module.merge_heads(dense_softmax_oracle(q, k, v, allowed=allowed)))
    if key_padding_mask is not None:
        y = y * key_padding_mask[..., None]
    return y


def right_padding(batch: int, n: int, lengths: list[int]) -> torch.Tensor:
    mask = torch.zeros(batch, n, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, :length] = True
    return mask


@pytest.mark.parametrize(
    ("options", "n"),
    [
        ({"block_size": 2, "num_random_blocks": 0}, 10),
        ({"block_size": 2, "num_random_blocks": 1}, 16),
        ({"block_size": 4, "num_random_blocks": 3}, 48),
        ({"block_size": 3, "num_random_blocks": 2, "num_window_blocks": 5}, 36),
        ({"variant": "etc", "num_global_tokens": 3, "block_size": 4, "num_random_blocks": 0}, 31),
        ({"variant": "etc", "num_global_tokens": 2, "block_size": 2, "num_random_blocks": 2}, 22),
    ],
)
@pytest.mark.parametrize("padded", [False, True])
def test_matches_dense_mask_oracle_fp64(options: dict, n: int, padded: bool) -> None:
    torch.manual_seed(0)
    module = build(**options)
    x = torch.randn(2, n, D, dtype=torch.float64)
    mask = right_padding(2, n, [n - 5, n - 1]) if padded else None
    if padded:  # also a hole in the middle: masks are not only right padding
        mask[0, 3] = False
    y, state = module(x, key_padding_mask=mask)
    assert state is None and y.shape == x.shape
    torch.testing.assert_close(y, oracle(module, x, mask), atol=1e-10, rtol=0)


@pytest.mark.parametrize("variant", ["itc", "etc"])
def test_row_chunks_match_oracle(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Local rows processed in several chunks (one or three rows each) give the same result."""
    torch.manual_seed(8)
    options = {"block_size": 2, "num_random_blocks": 2}
    if variant == "etc":
        options.update(variant="etc", num_global_tokens=3)
    x = torch.randn(2, 27, D, dtype=torch.float64)
    mask = right_padding(2, 27, [27, 20])
    for elements in (1, 3 * H * 7 * 2 * (D // H)):  # 1 row, then 3 rows per chunk (Kb = 7)
        monkeypatch.setattr(bigbird, "LOCAL_CHUNK_ELEMENTS", elements)
        module = build(**options)
        prefix, suffix, padded = module.layout(27)
        x_padded = torch.cat([x, x.new_zeros(2, padded - 27, D)], dim=1)
        mask_padded = torch.cat([mask, mask.new_zeros(2, padded - 27)], dim=1)
        expected = oracle(module, x_padded, mask_padded)[:, :27]
        y, _ = module(x, key_padding_mask=mask)
        nl = (padded - prefix - suffix) // 2
        assert len(module.gather_plan(nl, prefix, suffix, x.device)) > 1
        torch.testing.assert_close(y, expected, atol=1e-10, rtol=0)


def test_pads_length_to_block_multiple_and_zeroes_padded_queries() -> None:
    torch.manual_seed(1)
    module = build(block_size=4, num_random_blocks=1)
    x = torch.randn(2, 30, D, dtype=torch.float64)  # padded internally to 32
    y, _ = module(x)
    x_padded = torch.cat([x, torch.zeros(2, 2, D, dtype=torch.float64)], dim=1)
    mask = right_padding(2, 32, [30, 30])
    torch.testing.assert_close(y, oracle(module, x_padded, mask)[:, :30], atol=1e-10, rtol=0)
    mask = right_padding(2, 30, [25, 30])
    y, _ = module(x, key_padding_mask=mask)
    assert torch.all(y[0, 25:] == 0)


def test_fp32_matches_oracle() -> None:
    torch.manual_seed(2)
    module = build(block_size=4, num_random_blocks=2)
    x = torch.randn(2, 40, D, dtype=torch.float64)
    expected = oracle(module, x, None)
    y, _ = module.float()(x.float())
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-4)


def full_reference(module, x: torch.Tensor) -> torch.Tensor:
    """The same projections through plain SDPA (FullAttention with copied weights)."""
    full = attention.build("full", d_model=D, num_heads=H).double().eval()
    full.load_state_dict(module.state_dict())
    return full(x)[0]


@pytest.mark.parametrize(
    "options",
    [
        {"block_size": 2, "num_window_blocks": 15, "num_random_blocks": 2},  # window covers all
        {"block_size": 4, "num_random_blocks": 0},  # nb = 4: ITC mask is already full
        {"block_size": 8, "num_random_blocks": 3},  # nb = 2: every block global
    ],
)
def test_reduces_to_full_attention(options: dict) -> None:
    torch.manual_seed(3)
    module = build(**options)
    x = torch.randn(2, 16, D, dtype=torch.float64)
    assert module.dense_mask(16).all()
    torch.testing.assert_close(module(x)[0], full_reference(module, x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("num_random", [0, 1, 3])
def test_mask_structure_itc(num_random: int) -> None:
    b, nb = 2, 12
    n = b * nb
    module = build(block_size=b, num_random_blocks=num_random, seed=7)
    mask = module.dense_mask(n)  # [H, n, n]
    # Global rows and columns (first and last block) are full.
    for block in (0, nb - 1):
        assert mask[:, block * b : (block + 1) * b, :].all()
        assert mask[:, :, block * b : (block + 1) * b].all()
    blocks = mask[:, ::b, ::b]  # block-level mask (blocks are uniform)
    assert torch.equal(mask, blocks.repeat_interleave(b, 1).repeat_interleave(b, 2))
    for row in range(2, nb - 2):  # middle rows: not next to a global block
        assert (mask[:, row * b].sum(-1) == (3 + num_random + 2) * b).all()
    for head in range(H):
        for row in range(1, nb - 1):
            window = {row - 1, row, row + 1}
            chosen = set(torch.nonzero(blocks[head, row]).flatten().tolist())
            random_blocks = chosen - window - {0, nb - 1}
            assert len(random_blocks) == num_random
            assert all(1 <= r <= nb - 2 and abs(r - row) > 1 for r in random_blocks)


def test_mask_structure_etc() -> None:
    g, b = 3, 2
    module = build(variant="etc", num_global_tokens=g, block_size=b, num_random_blocks=0)
    n = g + 6 * b
    mask = module.dense_mask(n)
    assert mask[:, :g].all() and mask[:, :, :g].all()
    local = mask[:, g:, g:]
    band = torch.zeros(6, 6, dtype=torch.bool)
    for row in range(6):
        band[row, max(row - 1, 0) : row + 2] = True
    expected = band.repeat_interleave(b, 0).repeat_interleave(b, 1)
    assert torch.equal(local, expected.expand(H, -1, -1))


def test_random_plan_is_a_pure_function_of_seed_layer_head() -> None:
    state = torch.get_rng_state()
    first = make_block_plan(20, 3, 3, 3, seed=5, layer_idx=2)
    second = make_block_plan(20, 3, 3, 3, seed=5, layer_idx=2)
    assert torch.equal(torch.get_rng_state(), state), "the plan must not touch the global RNG"
    assert torch.equal(first.index, second.index) and torch.equal(first.valid, second.valid)
    assert not torch.equal(first.index[0], first.index[1]), "heads share one random plan"
    other_layer = make_block_plan(20, 3, 3, 3, seed=5, layer_idx=3)
    other_seed = make_block_plan(20, 3, 3, 3, seed=6, layer_idx=2)
    assert not torch.equal(first.index, other_layer.index)
    assert not torch.equal(first.index, other_seed.index)
    # Two independently built modules (two ranks) with the same seed and layer agree.
    a = attention.build("bigbird", d_model=D, num_heads=H, block_size=2, layer_idx=4)
    torch.manual_seed(123)  # a different global RNG state must not matter
    b = attention.build("bigbird", d_model=D, num_heads=H, block_size=2, layer_idx=4)
    assert torch.equal(a.dense_mask(40), b.dense_mask(40))


def test_checkpoint_recompute_gives_same_gradients() -> None:
    torch.manual_seed(4)
    module = build(block_size=2, num_random_blocks=2)
    x = torch.randn(2, 24, D, dtype=torch.float64, requires_grad=True)
    module(x)[0].square().sum().backward()
    plain = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    x.grad = None
    module.zero_grad()
    checkpoint(lambda t: module(t)[0], x, use_reentrant=False).square().sum().backward()
    recomputed = [x.grad] + [p.grad for p in module.parameters()]
    for expected, got in zip(plain, recomputed):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_padding_probe() -> None:
    torch.manual_seed(5)
    module = build(block_size=4, num_random_blocks=1)
    # 21 and 24 tokens both make 6 blocks, so the block structure is the same (spec §2:
    # the ITC structure depends on the padded block count; see the module docstring).
    padding_probe(module, torch.randn(2, 24, D, dtype=torch.float64), length=21)
    etc = build(variant="etc", num_global_tokens=2, block_size=4, num_random_blocks=1)
    padding_probe(etc, torch.randn(2, 26, D, dtype=torch.float64), length=23)


def test_gradcheck() -> None:
    torch.manual_seed(6)
    module = build(block_size=2, num_random_blocks=1)
    x = torch.randn(2, 12, D, dtype=torch.float64, requires_grad=True)
    mask = right_padding(2, 12, [12, 9])
    assert torch.autograd.gradcheck(lambda t: module(t, key_padding_mask=mask)[0], (x,))


def test_bf16_close_to_fp32() -> None:
    torch.manual_seed(7)
    module = attention.build("bigbird", d_model=32, num_heads=2, block_size=4).eval()
    x = torch.randn(2, 64, 32)
    expected = module(x)[0]
    got = module.to(torch.bfloat16)(x.to(torch.bfloat16))[0].float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    relative = (got - expected).norm() / expected.norm()
    assert relative < 3e-2, f"bf16 relative error {relative:.3g}"


def test_flags_and_invalid_configs() -> None:
    cls = attention.get("bigbird")
    assert not cls.supports_causal and cls.supports_padding and cls.stochastic_structure
    with pytest.raises(ValueError, match="causal"):
        attention.build("bigbird", d_model=D, num_heads=H, causal=True)
    with pytest.raises(ValueError, match="num_window_blocks"):
        attention.build("bigbird", d_model=D, num_heads=H, num_window_blocks=4)
    with pytest.raises(ValueError, match="num_global_tokens"):
        attention.build("bigbird", d_model=D, num_heads=H, variant="etc")
    with pytest.raises(ValueError, match="block_size"):
        attention.build("bigbird", d_model=D, num_heads=H, block_size=0)
    etc = build(variant="etc", num_global_tokens=4)
    with pytest.raises(ValueError, match="num_global_tokens"):
        etc(torch.randn(1, 3, D, dtype=torch.float64))
