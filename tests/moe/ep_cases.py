"""Shared cases for expert-parallel tests: one rank's run and the one-process reference.

Conventions (how a distributed run matches one process): rank r of a run with N data-parallel ranks
holds rows ``x[offset_r : offset_r + T_r]`` and computes
    loss_r = (sum(out_r * upstream_r) + AUX * aux_r + Z * z_r) / N,
so that the run's loss is the mean over ranks. Gradients are compared summed over the ranks
that share a parameter (router: every rank; expert e: the replicas of e), i.e. as the
gradient of the mean loss, which is what a data-parallel all-reduce of the mean produces.
The reference runs the plain single-process MoELayer on each rank's rows (per_rank scope) or
on each EP group's rows (global scope, losses still per rank's rows).
"""

from __future__ import annotations

from typing import Any

import torch

from moe import MoELayer

D, FF, E = 8, 16, 4
AUX, Z = 0.3, 0.05

# name -> layer keyword arguments (beyond D, FF, E) and the capacity scope.
CASES: dict[str, dict[str, Any]] = {
    "top1_drop": dict(top_k=1, capacity_factor=1.0),
    "top2_drop": dict(top_k=2, capacity_factor=1.0, activation="swiglu"),
    "top1_dropless": dict(top_k=1, capacity_factor=None),
    "top2_dropless": dict(top_k=2, capacity_factor=0.0),
    "top2_drop_buffer": dict(top_k=2, capacity_factor=1.0, expert_layout="buffer"),
    "top1_drop_global": dict(top_k=1, capacity_factor=1.0, capacity_scope="global"),
    "top2_drop_global_prob": dict(
        top_k=2, capacity_factor=1.0, capacity_scope="global", priority="probability"
    ),
    "top2_dropless_global": dict(top_k=2, capacity_factor=None, capacity_scope="global"),
}


def make_layer(seed: int = 0, **kwargs: Any) -> MoELayer:
    """A layer with sharp routing (real drops) in which expert 3 never receives a token."""
    torch.manual_seed(seed)
    layer = MoELayer(D, FF, E, min_capacity=1, **kwargs)
    with torch.no_grad():
        layer.router.weight.mul_(20.0)
        layer.router.weight[3] = 0.0
        layer.router.weight[3, 0] = -100.0
    return layer


def make_batch(sizes: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Input rows [sum(sizes), D] with x[:, 0] > 0 (so expert 3 is empty) and upstream grads."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), D, generator=generator)
    x[:, 0] = x[:, 0].abs() + 1.0
    return x, torch.randn(sum(sizes), D, generator=generator)


def full_state(layer: MoELayer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in layer.state_dict().items()}


def load_local_state(layer: MoELayer, state: dict[str, torch.Tensor]) -> None:
    """Load a full (E-expert) state into a layer holding experts [offset, offset + E_l)."""
    local = layer.experts.num_experts
    offset = layer.expert_offset
    sliced = {
        name: value[offset : offset + local] if name.startswith("experts.") else value
        for name, value in state.items()
    }
    layer.load_state_dict(sliced)


def rank_rows(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def reference(
    kwargs: dict[str, Any], state: dict[str, torch.Tensor], sizes: list[int], ep: int
) -> dict[str, Any]:
    """Outputs, mean losses and gradients of the whole run, computed in one process."""
    options = {k: v for k, v in kwargs.items() if k != "capacity_scope"}
    scope = kwargs.get("capacity_scope", "per_rank")
    layer = MoELayer(D, FF, E, min_capacity=1, **options)
    layer.load_state_dict(state)
    x, upstream = make_batch(sizes)
    x.requires_grad_(True)
    num_ranks = len(sizes)
    outputs, aux, z, kept = [], [], [], []
    for rank in range(num_ranks):
        rows = x[rank_rows(sizes, rank)]
        own = layer(rows)
        aux.append(own.aux_loss)
        z.append(own.z_loss)
        if scope == "per_rank":
            outputs.append(own.output)
            kept.append(layer.router(rows.detach()).slot >= 0)
    if scope == "global":
        for first in range(0, num_ranks, ep):
            block = slice(sum(sizes[:first]), sum(sizes[: first + ep]))
            outputs.append(layer(x[block]).output)
            kept.append(layer.router(x[block].detach()).slot >= 0)
    output = torch.cat(outputs)
    loss = (output * upstream).sum() / num_ranks
    loss = loss + AUX * torch.stack(aux).mean() + Z * torch.stack(z).mean()
    loss.backward()
    return {
        "output": output.detach(),
        "aux": torch.stack(aux).mean().item(),
        "z": torch.stack(z).mean().item(),
        "kept": torch.cat(kept),
        "grad_x": x.grad,
        "grads": {n: p.grad.clone() for n, p in layer.named_parameters()},
    }


def run_rank(
    kwargs: dict[str, Any],
    state: dict[str, torch.Tensor],
    sizes: list[int],
    rank: int,
    ep_group: Any,
    equal_tokens: bool = False,
) -> dict[str, Any]:
    """One real rank: forward and backward of its rows through an AllToAllDispatcher layer."""
    layer = MoELayer(
        D, FF, E, min_capacity=1, ep_group=ep_group, equal_tokens=equal_tokens, **kwargs
    )
    load_local_state(layer, state)
    x, upstream = make_batch(sizes)
    rows = x[rank_rows(sizes, rank)].clone().requires_grad_(True)
    out = layer(rows)
    num_ranks = len(sizes)
    loss = ((out.output * upstream[rank_rows(sizes, rank)]).sum() + AUX * out.aux_loss) / num_ranks
    (loss + Z * out.z_loss / num_ranks).backward()
    with torch.no_grad():
        routing = layer.dispatcher.route(layer.router, rows.detach())
    return {
        "output": out.output.detach(),
        "aux": out.aux_loss.item(),
        "z": out.z_loss.item(),
        "kept": routing.slot >= 0,
        "grad_x": rows.grad,
        "grads": {n: p.grad.clone() for n, p in layer.named_parameters()},
        "expert_offset": layer.expert_offset,
    }


def gather_ranks(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine per-rank results into the reference's form (gradients summed over sharers)."""
    grads: dict[str, torch.Tensor] = {}
    for result in results:
        for name, grad in result["grads"].items():
            if name.startswith("experts."):
                full = grads.setdefault(name, torch.zeros((E, *grad.shape[1:])))
                offset = result["expert_offset"]
                full[offset : offset + grad.shape[0]] += grad
            else:
                grads[name] = grads.get(name, torch.zeros_like(grad)) + grad
    return {
        "output": torch.cat([r["output"] for r in results]),
        "aux": sum(r["aux"] for r in results) / len(results),
        "z": sum(r["z"] for r in results) / len(results),
        "kept": torch.cat([r["kept"] for r in results]),
        "grad_x": torch.cat([r["grad_x"] for r in results]),
        "grads": grads,
    }


def assert_same_run(actual: dict[str, Any], expected: dict[str, Any], label: str) -> None:
    """Equal drops exactly; outputs, losses and gradients to fp32 rounding (atol 1e-5)."""
    tol = dict(rtol=1e-5, atol=1e-5)
    assert torch.equal(actual["kept"], expected["kept"]), f"{label}: different drops"
    torch.testing.assert_close(actual["output"], expected["output"], **tol, msg=label)
    assert abs(actual["aux"] - expected["aux"]) < 1e-5, (label, actual["aux"], expected["aux"])
    assert abs(actual["z"] - expected["z"]) < 1e-4, (label, actual["z"], expected["z"])
    torch.testing.assert_close(actual["grad_x"], expected["grad_x"], **tol, msg=label)
    assert actual["grads"].keys() == expected["grads"].keys(), label
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(actual["grads"][name], grad, **tol, msg=f"{label}: {name}")


def simulated(
    kwargs: dict[str, Any], state: dict[str, torch.Tensor], sizes: list[int], ep: int
) -> dict[str, Any]:
    """The whole run in one process through SimulatedDispatcher (len(sizes) virtual ranks)."""
    from moe.simulate import SimulatedDispatcher

    layer = MoELayer(D, FF, E, min_capacity=1, **kwargs)
    layer.load_state_dict(state)
    layer.dispatcher = SimulatedDispatcher(
        len(sizes),
        capacity_scope=kwargs.get("capacity_scope", "per_rank"),
        ep=ep,
        tokens_per_rank=sizes,
    )
    x, upstream = make_batch(sizes)
    x.requires_grad_(True)
    out = layer(x)
    loss = (out.output * upstream).sum() / len(sizes) + AUX * out.aux_loss + Z * out.z_loss
    loss.backward()
    with torch.no_grad():
        routing = layer.dispatcher.route(layer.router, x.detach())
    return {
        "output": out.output.detach(),
        "aux": out.aux_loss.item(),
        "z": out.z_loss.item(),
        "kept": routing.slot >= 0,
        "grad_x": x.grad,
        "grads": {n: p.grad.clone() for n, p in layer.named_parameters()},
    }
