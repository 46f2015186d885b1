"""Transformer-MGK: reductions to softmax attention, float64 oracle, E-step, probes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import attention
from attention.mgk import mgk_attention
from tests.attention.probes import (
    causality_probe,
    dense_softmax_oracle,
    padding_probe,
    train_tiny_model,
)


def build(causal: bool = False, **options) -> torch.nn.Module:
    return attention.build("mgk", d_model=16, num_heads=2, causal=causal, **options)


def paper_oracle(module, x, key_padding_mask=None) -> torch.Tensor:
    """float64 MGK straight from the paper: sum_r pi N(q; k_r) / normaliser, 0-mask, renormalise.

    Uses explicit differences (no expansion, no log space) on small, well-scaled inputs.
    """
    m = module.num_components
    with torch.no_grad():
        projected = module.qkv(x).double().chunk(2 + m, dim=-1)
        q = module.split_heads(projected[0])
        keys = [module.split_heads(t) for t in projected[1:-1]]
        v = module.split_heads(projected[-1])
        n = x.shape[1]
        weights = 0.0
        for r, k in enumerate(keys):
            sq_dist = ((q[:, :, :, None, :] - k[:, :, None, :, :]) ** 2).sum(-1)
            kernel = torch.exp(-sq_dist / (2.0 * module.variances[r].double()))
            if module.options.prior == "hard_em":
                weights = kernel if r == 0 else torch.maximum(weights, kernel)
                continue
            prior = module.prior[r].double()
            if module.options.prior == "learned":
                prior = prior.clamp(1e-6, 1.0)
            prior = (
                prior[:, :n].reshape(1, -1, 1, n) if prior.dim() == 2 else prior.view(1, -1, 1, 1)
            )
            weights = weights + prior * kernel
        keep = torch.ones(1, 1, n, n, dtype=torch.bool)
        if module.causal:
            keep = keep & torch.ones(n, n, dtype=torch.bool).tril()
        if key_padding_mask is not None:
            keep = keep & key_padding_mask[:, None, None, :]
        weights = weights * keep
        probs = weights / weights.sum(-1, keepdim=True)
        y = module.out(module.merge_heads(probs @ v).to(x.dtype))
    if key_padding_mask is not None:
        y = y * key_padding_mask[..., None]
    return y


def test_one_component_equal_norm_keys_is_softmax_attention():
    generator = torch.Generator().manual_seed(0)
    d = 8
    q = torch.randn(2, 3, 10, d, generator=generator, dtype=torch.float64)
    k = torch.randn(2, 3, 10, d, generator=generator, dtype=torch.float64)
    k = 2.5 * k / k.norm(dim=-1, keepdim=True)  # equal norms
    v = torch.randn(2, 3, 10, d, generator=generator, dtype=torch.float64)
    log_prior = torch.zeros(1, 1, 3, 1, 1, dtype=torch.float64)
    variances = torch.tensor([math.sqrt(d)], dtype=torch.float64)
    out = mgk_attention(q, k[None], v, variances=variances, log_prior=log_prior)
    assert torch.allclose(out, dense_softmax_oracle(q, k, v), atol=1e-10, rtol=0)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    out = mgk_attention(q, k[None], v, variances=variances, log_prior=log_prior, allowed=causal)
    assert torch.allclose(out, dense_softmax_oracle(q, k, v, allowed=causal), atol=1e-10, rtol=0)


@pytest.mark.parametrize("per_position", [False, True])
def test_duplicated_components_equal_single_gaussian(per_position):
    torch.manual_seed(1)
    single = build(num_components=1, prior_per_position=per_position, max_len=16).double()
    double = build(num_components=2, prior_per_position=per_position, max_len=16).double()
    with torch.no_grad():
        w, b = single.qkv.weight, single.qkv.bias  # rows: q, k, v
        double.qkv.weight.copy_(torch.cat([w[:16], w[16:32], w[16:32], w[32:]]))
        double.qkv.bias.copy_(torch.cat([b[:16], b[16:32], b[16:32], b[32:]]))
        double.out.load_state_dict(single.out.state_dict())
        double.prior[0].fill_(0.3)
        double.prior[1].fill_(0.7)  # pi sums to 1 over components
        single.prior.fill_(1.0)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    assert torch.allclose(double(x)[0], single(x)[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("prior", ["learned", "soft_em", "hard_em"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_float64_paper_oracle(prior, causal):
    torch.manual_seed(2)
    module = build(causal, prior=prior, num_components=3, variance_multipliers=[1.0, 0.5, 2.0])
    module = module.double().eval()
    if module.prior is not None:
        with torch.no_grad():
            module.prior.copy_(torch.rand_like(module.prior) * 0.9 + 0.05)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    y, state = module(x, key_padding_mask=mask)
    assert state is None
    assert torch.allclose(y, paper_oracle(module, x, mask), atol=1e-10, rtol=0)


def test_per_position_priors_match_oracle_and_reject_long_inputs():
    torch.manual_seed(3)
    module = build(prior_per_position=True, max_len=12).double().eval()
    with torch.no_grad():
        module.prior.copy_(torch.rand_like(module.prior) * 0.9 + 0.05)
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    assert torch.allclose(module(x)[0], paper_oracle(module, x), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="max_len"):
        module(torch.randn(1, 13, 16, dtype=torch.float64))


def test_fp32_matches_oracle_and_rows_sum_to_one():
    torch.manual_seed(4)
    module = build(causal=True).eval()
    x = torch.randn(2, 11, 16)
    expected = paper_oracle(copy.deepcopy(module).double(), x.double()).float()
    assert torch.allclose(module(x)[0], expected, atol=1e-5, rtol=1e-4)
    q, v = torch.randn(1, 2, 5, 4), torch.ones(1, 2, 5, 4)
    keys = torch.randn(2, 1, 2, 5, 4)
    out = mgk_attention(
        q, keys, v, variances=torch.tensor([1.0, 3.0]), log_prior=torch.zeros(2, 1, 2, 1, 1)
    )
    assert torch.allclose(out, torch.ones_like(out), atol=1e-6)


def test_log_space_is_stable_for_large_norms():
    """The reference's exp-without-max underflows here; log space stays finite and exact."""
    generator = torch.Generator().manual_seed(5)
    q = 40.0 * torch.randn(1, 1, 6, 8, generator=generator)
    keys = 40.0 * torch.randn(2, 1, 1, 6, 8, generator=generator)
    v = torch.randn(1, 1, 6, 8, generator=generator)
    variances = torch.tensor([2.0, 2.0])
    log_prior = torch.log(torch.tensor([0.4, 0.6])).view(2, 1, 1, 1, 1)
    out = mgk_attention(q, keys, v, variances=variances, log_prior=log_prior)
    assert bool(torch.isfinite(out).all())
    scores = -((q.double()[:, :, :, None] - keys.double()[:, :, :, None, :]) ** 2).sum(-1) / 4.0
    logits = torch.logsumexp(scores + log_prior.double(), dim=0)
    expected = torch.softmax(logits, dim=-1) @ v.double()
    assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("prior", ["learned", "soft_em", "hard_em"])
def test_causality_probe(prior):
    torch.manual_seed(6)
    module = build(causal=True, prior=prior).double()
    causality_probe(module, torch.randn(2, 10, 16, dtype=torch.float64), t=4)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_probe(causal):
    torch.manual_seed(7)
    module = build(causal, prior="soft_em", prior_per_position=True, max_len=32).double()
    padding_probe(module, torch.randn(2, 14, 16, dtype=torch.float64), length=9)


@pytest.mark.parametrize("causal,padded", [(False, True), (True, False), (False, False)])
def test_soft_em_step_is_mean_responsibility_and_deferred(causal, padded):
    torch.manual_seed(8)
    module = build(causal, prior="soft_em").double().train()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = not padded
    initial = module.prior.clone()
    y_train, _ = module(x, key_padding_mask=mask if padded else None)
    assert torch.equal(module.prior, initial), "forward t must use the old prior"
    # Expected E-step: mean over real (query, key) pairs of each component's posterior.
    with torch.no_grad():
        projected = module.qkv(x).chunk(4, dim=-1)
        q = module.split_heads(projected[0])
        ks = [module.split_heads(t) for t in projected[1:3]]
        terms = [
            0.5 * torch.exp(-((q[:, :, :, None] - k[:, :, None]) ** 2).sum(-1) / (2 * math.sqrt(8)))
            for k in ks
        ]
        responsibility = terms[0] / (terms[0] + terms[1])
        pairs = mask[:, None, :, None] & mask[:, None, None, :]
        if causal:
            pairs = pairs & torch.ones(7, 7, dtype=torch.bool).tril()
        pairs = pairs.double()
        expected = (responsibility * pairs).sum(dim=(0, 2, 3)) / pairs.sum(dim=(0, 2, 3))
    assert torch.allclose(module.prior_pending[0], expected, atol=1e-12)
    assert torch.allclose(module.prior_pending.sum(0), torch.ones(2, dtype=torch.float64))
    module.eval()
    y_eval, _ = module(x, key_padding_mask=mask if padded else None)
    assert torch.allclose(module.prior[0], expected, atol=1e-12), "applied on the next forward"
    assert not torch.allclose(y_eval, y_train)
    before = module.prior.clone()
    module(x)
    assert torch.equal(module.prior, before), "eval forwards never run the E-step"


def test_soft_em_under_activation_checkpoint_updates_once_with_same_gradients():
    torch.manual_seed(9)
    plain = build(prior="soft_em").double().train()
    recomputed = build(prior="soft_em").double().train()
    recomputed.load_state_dict(plain.state_dict())
    calls = []
    e_step = recomputed._e_step
    recomputed._e_step = lambda *args: calls.append(1) or e_step(*args)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    for step in range(2):  # the second step uses the prior the first one produced
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        plain(xa)[0].square().sum().backward()
        checkpoint(lambda t: recomputed(t)[0], xb, use_reentrant=False).square().sum().backward()
        assert torch.allclose(xa.grad, xb.grad, atol=1e-12), f"step {step}"
        assert torch.equal(plain.prior, recomputed.prior)
        assert torch.equal(plain.prior_pending, recomputed.prior_pending)
        assert len(calls) == step + 1, "the E-step must not run again in the recompute"
        for a, b in zip(plain.parameters(), recomputed.parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_gradcheck_float64():
    torch.manual_seed(10)
    module = build(causal=True, variance_multipliers=[1.0, 0.25]).double()
    x = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: module(t)[0], (x,))
    q, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    keys = torch.randn(2, 1, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    log_prior = torch.log(torch.rand(2, 1, 2, 1, 6, dtype=torch.float64)).requires_grad_(True)
    variances = torch.tensor([2.0, 0.7], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b, c, p: mgk_attention(a, b, c, variances=variances, log_prior=p),
        (q, keys, v, log_prior),
    )


def test_learned_prior_receives_gradient():
    module = build(prior_per_position=True, max_len=8)
    module(torch.randn(1, 8, 16))[0].sum().backward()
    assert module.prior.grad is not None and bool((module.prior.grad != 0).any())


def test_bf16_runs_and_is_close_to_fp32():
    torch.manual_seed(11)
    module = build(causal=True).eval()
    x = torch.randn(2, 16, 16)
    reference, _ = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = module(x)
    rel = (low.float() - reference).norm() / reference.norm()
    assert rel < 3e-2, f"bf16 relative error {rel}"


def test_option_validation():
    with pytest.raises(ValueError, match="variance_multipliers"):
        build(num_components=2, variance_multipliers=[1.0])
    with pytest.raises(ValueError, match="variance_multipliers"):
        build(num_components=2, variance_multipliers=[1.0, -1.0])
    with pytest.raises(ValueError, match="num_components"):
        build(num_components=0)
    with pytest.raises(ValueError, match="prior"):
        build(prior="bayes")


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["learned", "soft_em"])
def test_trains_in_tiny_moe_model(prior):
    losses = train_tiny_model("mgk", "causal_lm", prior=prior)
    assert losses[-1] < 0.3 * losses[0], f"loss did not fall: {losses[0]} -> {losses[-1]}"
