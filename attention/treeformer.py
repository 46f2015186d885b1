"""Treeformer (Madaan, Bhojanapalli, Jain, Jain, ICLR 2023; arXiv 2208.09015): tree attention.

Shape letters: B batch, n length, D model width, H heads, d head width, R = B·H rows,
L tree levels (height h, so h + 1 nodes on a root-to-leaf path), q block length (``query_block``),
G query blocks, W keys in a block's window.

Each head owns a binary decision tree. Internal node (level l, index j) holds a hyperplane
(w, b) in the head's d-dim space; a vector goes right when w·x + b > 0. Queries and keys are
routed from the root down to a leaf at depth h.

* **TF-attention** (fine, ``mode="tf"``): query i attends with softmax(q·k/√d) only to the
  keys in its own leaf. Implemented by sorting keys and queries by leaf (ragged leaves,
  no n x n): the sorted queries are cut into blocks of ``query_block``; a block's keys are
  the contiguous run of sorted keys whose leaves the block spans, and one
  ``scaled_dot_product_attention`` call over (block, window) with a same-leaf mask does the
  rest. Blocks are grouped by window length (``window_groups``) so that one big leaf does
  not widen every block's window. Cost O(n·h·d) routing + O(n·(q + leaf size)·d) attention
  for balanced leaves; a degenerate tree (one leaf holding everything) is O(n²d), as the
  method itself is.
* **TC-attention** (coarse, ``mode="tc"``): every node carries an aggregate key and value of
  the keys routed through it; query i takes a softmax over the h + 1 aggregates on its own
  root-to-leaf path (q·K̂/√d) and mixes the aggregate values. Every key feeds the root, so
  gradients are dense. Aggregates cost O(n·d) (leaf sums added up the tree, ``NodeSums``);
  up to 511 nodes (h <= 8) the path scores come from one GEMM of the queries against all
  node keys, O(n·2^(h+1)·d), which on CPU beats gathering [n, h+1, d] path tensors (255
  nodes at n = 8192 with leaf_size 64); deeper trees gather each query's path, O(n·h·d).

Routing is learned with a straight-through estimator (as in dense gradient trees, DGT,
Karthikeyan et al. 2021): the forward pass takes the hard decision; the backward pass uses
the derivative of sigmoid(s/τ) for the step. The top 7 levels (127 nodes) are scored by one
matmul per head; deeper levels gather each token's own hyperplane (O(n·d) per level). So that the loss depends on the decisions at
all, each token carries a path gate g = Π over its path of (step or 1 - step): exactly 1 in
the forward pass (outputs are unchanged, bit for bit), with the surrogate gradient in the
backward pass. TF multiplies each key's value and each query's output by its leaf gate;
TC weights the keys in each node's aggregate and the query's path values by the node gates.

No official code exists, and only the abstract and summaries of the paper were reachable
from this workplace; the method follows attention_spec.md §8. Choices made where the
sources are silent:

* one tree per head, shared by queries and keys (``shared_tree=False``: separate trees);
* hyperplanes with a bias, w ~ N(0, 1/d), b = 0 (the tree starts as random projections);
* TC aggregates are **means** by default (``tc_aggregate="sum"`` gives the sums of the spec):
  a sum makes a node's score grow with its key count, so the root (all n keys) would
  dominate every softmax and outputs would scale with n;
* an empty leaf (TF) or an empty node (TC) contributes nothing; a query whose leaf holds no
  key gets a zero output; padded keys are in no leaf and no aggregate;
* height: ``height`` caps the tree (None = ``max_height``); with ``leaf_size`` set, each
  sequence also uses at most ceil(log2(valid length / leaf_size)) levels, so leaves hold about
  ``leaf_size`` keys and the cost stays ~linear in n (the paper fixes h per task). Height is
  chosen per sequence from its real length, so padding never changes an output. Height 0 is
  one leaf: TF is exact full softmax attention, TC outputs the root aggregate;
* the bootstrapped schedule ("two-level bootstrapped training" in the paper: start from dense
  attention and grow the trees) is ``set_height(h)`` plus, when ``bootstrap_dense_steps`` or
  ``bootstrap_grow_every`` is set, ``set_training_step(step)``: height 0 (dense) for the first
  ``bootstrap_dense_steps`` steps, then one more level every ``bootstrap_grow_every`` steps up
  to the cap. Deeper hyperplanes exist from the start and are trained once in use. The
  model-level half (initialise from a trained dense Transformer) is a checkpoint load: the
  q/k/v/out projections have the same names and shapes as ``full``'s.

Not causal (retrieval over the whole sequence, as in the paper). Defaults: TF, leaf_size 64,
max_height 10 (up to 65536 tokens at 64 per leaf), query_block 32, window_groups 4, τ = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from attention.base import (
    Attention,
    AttentionOptions,
    default_scale,
)
from attention.registry import register

# The top levels (127 nodes) score all of their nodes by one matmul (fast on CPU); deeper
# levels gather each token's own hyperplane, which keeps routing O(n·h·d) for any height.
DENSE_ROUTING_LEVELS = 7
# TC scores queries against every node by one GEMM up to this many nodes (h <= 8), and
# gathers each query's h + 1 path nodes beyond, which keeps TC O(n·h·d) for deep trees.
DENSE_PATH_NODES = 511


class TreeformerOptions(AttentionOptions):
    """Options of Treeformer attention."""

    mode: Literal["tf", "tc"] = "tf"
    height: int | None = Field(None, ge=0, le=16, description="tree height cap; None = max")
    max_height: int = Field(10, ge=0, le=16, description="levels of hyperplanes allocated")
    leaf_size: int | None = Field(64, ge=1, description="target keys per leaf; None = fixed h")
    shared_tree: bool = True
    tc_aggregate: Literal["mean", "sum"] = "mean"
    temperature: float = Field(1.0, gt=0.0, description="τ of the straight-through sigmoid")
    query_block: int = Field(32, ge=1, description="sorted queries per TF block")
    window_groups: int = Field(4, ge=1, description="TF blocks grouped by window length")
    bootstrap_dense_steps: int = Field(0, ge=0, description="steps at height 0 (dense)")
    bootstrap_grow_every: int = Field(0, ge=0, description="steps per added tree level")
    bias: bool = Field(True, description="biases in the q/k/v and output projections")


class StraightThroughStep(torch.autograd.Function):
    """Forward: 1[s > 0]; backward: the derivative of sigmoid(s / τ)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return (scores > 0).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (scores,) = ctx.saved_tensors
        soft = torch.sigmoid(scores / ctx.temperature)
        return grad * soft * (1 - soft) / ctx.temperature, None


@dataclass(frozen=True)
class Routing:
    """Where the tokens of one side (queries or keys) went: codes, nodes and path gates.

    ``leaf`` int64 [R, n]: the leaf code at depth L - 1 (levels past a sequence's height go
    left); ``nodes`` int64 [R, n, L]: heap index of the node at each level (root 0);
    ``gates`` [R, n, L]: path gate of each node (1 in the forward pass); ``heights`` int64
    [R]: the tree height used by each row's sequence.
    """

    leaf: torch.Tensor
    nodes: torch.Tensor
    gates: torch.Tensor
    heights: torch.Tensor

    def path_levels(self) -> torch.Tensor:
        """bool [R, n, L]: which levels are on each token's path (<= its sequence's height)."""
        levels = torch.arange(self.nodes.shape[-1], device=self.nodes.device)
        return (levels <= self.heights[:, None]).unsqueeze(1).expand_as(self.nodes)


class NodeSums(torch.autograd.Function):
    """Per-node sums Σ_j g_jl x_j over the tokens routed through each node of a tree.

    x [R, n, c], gates g [R, n, L] (exactly 1 in the forward pass), nodes int64 [R, n, L]
    (heap index per level; the last level is the leaf) -> [R, 2^L - 1, c]. Since every gate
    is 1, the forward pass sums the leaves once and adds children up the tree (O(n·c), not
    O(n·L·c)); the backward pass gives x the sum of the node gradients down its path and
    gate (j, l) the product x_j · grad(node_l(j)), as the gated sum would.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, gates: torch.Tensor, nodes: torch.Tensor
    ) -> torch.Tensor:
        rows, _, channels = x.shape
        levels = nodes.shape[-1]
        first_leaf = 2 ** (levels - 1) - 1
        leaves = torch.zeros(rows, 2 ** (levels - 1), channels, dtype=x.dtype, device=x.device)
        leaf = (nodes[..., -1] - first_leaf).unsqueeze(-1).expand(-1, -1, channels)
        per_level = [leaves.scatter_add(1, leaf, x)]
        for _ in range(levels - 1):
            per_level.append(per_level[-1].view(rows, -1, 2, channels).sum(2))
        ctx.save_for_backward(x, nodes)
        return torch.cat(per_level[::-1], dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, nodes = ctx.saved_tensors
        rows, _, channels = x.shape
        levels = nodes.shape[-1]
        # Accumulate node gradients from the root down: leaf total = Σ over its path.
        down = grad[:, :1]
        for level in range(1, levels):
            level_grad = grad[:, 2**level - 1 : 2 ** (level + 1) - 1]
            down = level_grad + down.repeat_interleave(2, dim=1)
        leaf = (nodes[..., -1] - (2 ** (levels - 1) - 1)).unsqueeze(-1).expand(-1, -1, channels)
        grad_x = down.gather(1, leaf)
        grad_gates = torch.stack(
            [
                (x * grad.gather(1, nodes[..., level : level + 1].expand(-1, -1, channels))).sum(-1)
                for level in range(levels)
            ],
            dim=-1,
        )
        return grad_x, grad_gates, None


@register
class TreeformerAttention(Attention):
    """Decision-tree attention: TF (same-leaf softmax) or TC (softmax over path aggregates)."""

    name = "treeformer"
    supports_causal = False
    supports_padding = True
    # One tree per head: the hyperplanes are cut by heads with the projections.
    supports_tensor_parallel = True
    Options = TreeformerOptions

    def __init__(self, d_model: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(d_model, num_heads, **kwargs)
        options: TreeformerOptions = self.options  # type: ignore[assignment]
        if options.height is not None and options.height > options.max_height:
            raise ValueError(
                f"height ({options.height}) must be <= max_height ({options.max_height})"
            )
        self.make_qkv_projections(options.bias)
        trees = 1 if options.shared_tree else 2
        internal = 2**options.max_height - 1
        weight = torch.randn(trees, num_heads, max(internal, 1), self.head_dim)
        self.hyperplanes = nn.Parameter(weight / math.sqrt(self.head_dim))
        self.offsets = nn.Parameter(torch.zeros(trees, num_heads, max(internal, 1)))
        self.height: int | None = options.height

    def shard_heads(self) -> None:
        self.shard_head_tensor("hyperplanes", dim=1)
        self.shard_head_tensor("offsets", dim=1)

    # Height and the bootstrapped schedule ----------------------------------------------

    def set_height(self, height: int | None) -> None:
        """Cap the tree height used from now on (0 = dense attention; None = max_height)."""
        if height is not None and not 0 <= height <= self.options.max_height:
            raise ValueError(
                f"height ({height}) must be in [0, max_height={self.options.max_height}] or None"
            )
        self.height = height

    def set_training_step(self, step: int) -> None:
        """Apply the bootstrapped schedule (dense, then one level per grow period) at ``step``."""
        options: TreeformerOptions = self.options  # type: ignore[assignment]
        if options.bootstrap_dense_steps == 0 and options.bootstrap_grow_every == 0:
            return
        target = options.max_height if options.height is None else options.height
        if step < options.bootstrap_dense_steps:
            self.height = 0
        elif options.bootstrap_grow_every == 0:
            self.height = target
        else:
            grown = 1 + (step - options.bootstrap_dense_steps) // options.bootstrap_grow_every
            self.height = min(target, grown)

    def tree_heights(self, key_padding_mask: torch.Tensor | None, n: int, batch: int) -> list[int]:
        """Height used for each sequence of the batch, from its number of real tokens."""
        cap = self.options.max_height if self.height is None else self.height
        lengths = [n] * batch if key_padding_mask is None else key_padding_mask.sum(-1).tolist()
        leaf_size = self.options.leaf_size
        if leaf_size is None:
            return [cap] * batch
        return [
            min(cap, max(0, math.ceil(math.log2(max(length, 1) / leaf_size)))) for length in lengths
        ]

    # Routing ---------------------------------------------------------------------------

    def route(self, x: torch.Tensor, heights: list[int], tree: int) -> Routing:
        """Route x [B, H, n, d] down tree ``tree`` (0: queries / shared, 1: keys)."""
        batch, heads, n, head_dim = x.shape
        levels = max(heights) + 1
        rows = x.reshape(batch * heads, n, head_dim)
        per_row = torch.tensor(heights, device=x.device).repeat_interleave(heads)[:, None]
        # The top levels: every node scored by one matmul, then each token's picked.
        dense_levels = min(levels - 1, DENSE_ROUTING_LEVELS)
        dense_nodes = 2**dense_levels - 1
        weight = self.hyperplanes[tree, :, :dense_nodes]  # [H, m, d]
        bias = self.offsets[tree, :, :dense_nodes].unsqueeze(1)  # [H, 1, m]
        all_scores = (x @ weight.transpose(-1, -2) + bias).reshape(batch * heads, n, dense_nodes)
        # Deeper levels: gather each token's own hyperplane, O(n·d) per level.
        internal = self.hyperplanes.shape[2]
        table = self.hyperplanes[tree].reshape(heads * internal, head_dim)
        offsets = self.offsets[tree].reshape(heads * internal)
        head_base = (torch.arange(heads, device=x.device) * internal).repeat(batch)[:, None]

        node = torch.zeros(batch * heads, n, dtype=torch.long, device=x.device)
        nodes, deep_scores = [node], []
        for level in range(levels - 1):  # decisions only; gradients are taken below
            if level < dense_levels:
                scores = all_scores.detach().gather(-1, node.unsqueeze(-1)).squeeze(-1)
            else:
                index = head_base + node
                deep_scores.append((rows * F.embedding(index, table)).sum(-1) + offsets[index])
                scores = deep_scores[-1].detach()
            node = 2 * node + 1 + ((scores > 0) & (per_row > level)).long()
            nodes.append(node)
        path = torch.stack(nodes, -1)  # [R, n, L]
        scores = all_scores.gather(-1, path[..., :dense_levels])
        if deep_scores:
            scores = torch.cat([scores, torch.stack(deep_scores, -1)], dim=-1)  # [R, n, L-1]
        step = StraightThroughStep.apply(scores, self.options.temperature)
        active = (per_row > torch.arange(levels - 1, device=x.device)).unsqueeze(1)
        gate = torch.where((scores > 0) & active, step, 1 - step)
        gate = torch.where(active, gate, torch.ones_like(gate))
        root = torch.ones(batch * heads, n, 1, dtype=gate.dtype, device=x.device)
        gates = torch.cat([root, torch.cumprod(gate, -1)], dim=-1)
        leaf = node - (2 ** (levels - 1) - 1)
        return Routing(leaf, path, gates, per_row[:, 0])

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, H, n, d] from x [B, n, D]."""
        return self.project_qkv(x)

    def route_queries_keys(
        self, q: torch.Tensor, k: torch.Tensor, heights: list[int]
    ) -> tuple[Routing, Routing]:
        """Routings of the queries and of the keys (same tree unless ``shared_tree=False``)."""
        key_tree = 0 if self.options.shared_tree else 1
        return self.route(q, heights, 0), self.route(k, heights, key_tree)

    # Attention -------------------------------------------------------------------------

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None,
        state: Any,
    ) -> tuple[torch.Tensor, None]:
        """q, k, v [B, H, n, d], key_padding_mask bool [B, n] -> ([B, H, n, d], None)."""
        batch, heads, n, _ = q.shape
        heights = self.tree_heights(key_padding_mask, n, batch)
        query_route, key_route = self.route_queries_keys(q, k, heights)
        valid = key_padding_mask
        if valid is None:
            valid = torch.ones(batch, n, dtype=torch.bool, device=q.device)
        valid = valid.repeat_interleave(heads, dim=0)  # [R, n]
        rows = [t.reshape(batch * heads, n, self.head_dim) for t in (q, k, v)]
        dropout = self.options.dropout if self.training else 0.0
        if self.options.mode == "tf":
            y = self.fine(*rows, query_route, key_route, valid, max(heights), dropout)
        else:
            y = self.coarse(*rows, query_route, key_route, valid, max(heights), dropout)
        return y.view(batch, heads, n, self.head_dim), None

    def fine(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        query_route: Routing,
        key_route: Routing,
        valid: torch.Tensor,
        depth: int,
        dropout: float,
    ) -> torch.Tensor:
        """TF-attention: rows q, k, v [R, n, d] -> [R, n, d], each query over its leaf's keys."""
        rows, n, head_dim = q.shape
        block = min(self.options.query_block, n)
        pad_leaf = 2**depth  # padded keys: a leaf no query has; padded queries: pad_leaf + 1
        key_leaf = torch.where(valid, key_route.leaf, pad_leaf)
        query_leaf = torch.where(valid, query_route.leaf, pad_leaf + 1)
        row_base = torch.arange(rows, device=q.device).unsqueeze(-1) * n
        flat_q, flat_k = q.reshape(rows * n, head_dim), k.reshape(rows * n, head_dim)
        flat_v = (v * key_route.gates[..., -1:]).reshape(rows * n, head_dim)

        # Sort keys and queries by leaf; tensors stay in place, only indices are permuted.
        key_leaf, key_order = torch.sort(key_leaf, dim=1, stable=True)
        key_source = (key_order + row_base).flatten()  # sorted slot -> row of flat_k
        counts = torch.zeros(rows, pad_leaf + 2, dtype=torch.long, device=q.device)
        counts.scatter_add_(1, key_leaf, torch.ones_like(key_leaf))
        ends = counts.cumsum(1)
        starts = ends - counts
        query_leaf, query_order = torch.sort(query_leaf, dim=1, stable=True)
        num_blocks = -(-n // block)
        pad = num_blocks * block - n
        query_source = F.pad(query_order + row_base, (0, pad)).view(rows * num_blocks, block)
        query_leaf = F.pad(query_leaf, (0, pad), value=pad_leaf + 1).view(rows, num_blocks, block)

        # Sorted, so a block's leaves are a contiguous run, and so are their keys. Blocks are
        # handled as one flat batch, grouped by window length so that a few long windows
        # (big leaves) do not pad every block to their width.
        window_start = starts.gather(1, query_leaf[:, :, 0])
        window_len = (ends.gather(1, query_leaf[:, :, -1]) - window_start).flatten()  # [R·G]
        window_start = (window_start + row_base).flatten()  # into the flat sorted keys
        flat_leaf = key_leaf.flatten()
        leaf_blocks = query_leaf.reshape(rows * num_blocks, block)
        blocked = torch.zeros((), dtype=q.dtype, device=q.device)
        masked = torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device)
        by_length = torch.argsort(window_len)
        outputs = []
        for group in by_length.chunk(self.options.window_groups):
            lengths = window_len[group]
            width = max(int(lengths.max().item()), 1)
            offsets = torch.arange(width, device=q.device)
            index = (window_start[group].unsqueeze(-1) + offsets).clamp(max=rows * n - 1)
            in_window = offsets < lengths.unsqueeze(-1)  # [g, W]
            same_leaf = flat_leaf[index].unsqueeze(1) == leaf_blocks[group].unsqueeze(-1)
            same_leaf = same_leaf & in_window.unsqueeze(1)  # [g, q, W]
            source = key_source[index]
            out = F.scaled_dot_product_attention(  # 4-d so that fused kernels apply
                flat_q[query_source[group]].unsqueeze(1),
                flat_k[source].unsqueeze(1),
                flat_v[source].unsqueeze(1),
                attn_mask=torch.where(same_leaf, blocked, masked).unsqueeze(1),
                dropout_p=dropout,
                scale=default_scale(head_dim),
            ).squeeze(1)
            outputs.append(out * same_leaf.any(-1, keepdim=True).to(out.dtype))  # empty -> 0
        out = torch.cat(outputs, 0)[torch.argsort(by_length)]
        out = out.reshape(rows, num_blocks * block, head_dim)[:, :n]
        inverse = torch.argsort(query_order, dim=1)
        out = out.gather(1, inverse.unsqueeze(-1).expand(-1, -1, head_dim))
        return out * query_route.gates[..., -1:]

    def coarse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        query_route: Routing,
        key_route: Routing,
        valid: torch.Tensor,
        depth: int,
        dropout: float,
    ) -> torch.Tensor:
        """TC-attention: rows [R, n, d] -> [R, n, d], softmax over the query's path aggregates."""
        rows, n, head_dim = q.shape
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        keep = valid.unsqueeze(-1).to(compute)  # padded keys are in no aggregate
        gates, nodes = key_route.gates.to(compute), key_route.nodes
        counts = NodeSums.apply(keep, gates, nodes).squeeze(-1)  # [R, nodes]
        key_nodes = NodeSums.apply(k.to(compute) * keep, gates, nodes)
        value_nodes = NodeSums.apply(v.to(compute) * keep, gates, nodes)
        if self.options.tc_aggregate == "mean":
            # Not clamp_min(1): a one-key node must pass the count's (gate) gradient on.
            divisor = torch.where(counts > 0, counts, torch.ones_like(counts)).unsqueeze(-1)
            key_nodes, value_nodes = key_nodes / divisor, value_nodes / divisor

        # The query's path: nodes at levels 0..h of its own sequence, non-empty ones only.
        path = query_route.nodes  # [R, n, L]
        levels = path.shape[-1]
        allowed = query_route.path_levels() & (counts.gather(1, path.flatten(1)).view_as(path) > 0)
        out_dtype, q = q.dtype, q.to(compute)
        num_nodes = key_nodes.shape[1]
        if num_nodes <= DENSE_PATH_NODES:
            # One GEMM against all nodes, then the path's columns: faster on CPU than
            # gathering [R, n, L, d] path tensors while the tree is small.
            scores = (q @ key_nodes.transpose(1, 2)).gather(2, path)
        else:  # O(n·h·d): gather each query's path keys
            path_index = path.reshape(rows, n * levels, 1).expand(-1, -1, head_dim)
            path_keys = key_nodes.gather(1, path_index).view(rows * n, levels, head_dim)
            scores = torch.bmm(path_keys, q.reshape(rows * n, head_dim, 1)).view(rows, n, levels)
        scores = scores * default_scale(head_dim)
        scores = scores.masked_fill(~allowed, torch.finfo(compute).min)
        probs = torch.softmax(scores, dim=-1) * allowed
        if dropout > 0.0:
            probs = F.dropout(probs, p=dropout)
        # The query's path gates (1 forward) weight the node values: the query-side routing grad.
        probs = probs * query_route.gates.to(compute)
        if num_nodes <= DENSE_PATH_NODES:
            dense = torch.zeros(rows, n, num_nodes, dtype=compute, device=q.device)
            out = dense.scatter(2, path, probs) @ value_nodes
        else:
            path_values = value_nodes.gather(1, path_index).view(rows * n, levels, head_dim)
            out = torch.bmm(probs.view(rows * n, 1, levels), path_values).view(rows, n, head_dim)
        return out.to(out_dtype)
