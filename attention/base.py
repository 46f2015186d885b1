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

Tensor parallelism (Megatron style): every linear a method owns is made by ``make_linear``,
which records how it is cut over the TP group: ``"column"`` (output features are heads, so
rank r keeps the rows of its heads; ``parts`` > 1 for fused projections such as q|k|v, each
part cut separately), ``"row"`` (the output projection: input features are heads, the partial
products are all-reduced) or ``None`` (replicated). ``parallelize(group)`` swaps those layers
for their shards in place and leaves ``num_local_heads = num_heads / tp`` heads on this rank;
the module still maps the replicated x [B, n, D] to the replicated y [B, n, D].
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from parallel.collectives import COLLECTIVE_TIMEOUT
from parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_region,
    group_size_and_rank,
    mark_tensor_parallel,
)

Split = Literal["column", "row"] | None


class AttentionOptions(BaseModel):
    """Typed options of one attention method; each method subclasses this."""

    model_config = ConfigDict(extra="forbid")

    dropout: float = 0.0


def make_linear(
    in_features: int, out_features: int, *, bias: bool = True, split: Split = None, parts: int = 1
) -> HeadLinear:
    """The one factory of every linear in an attention method (see the module docstring).

    ``split``: "column" (output features are ``parts`` blocks of heads), "row" (input
    features are heads; the output projection) or None (replicated under tensor parallelism).
    """
    return HeadLinear(in_features, out_features, bias=bias, split=split, parts=parts)


class HeadLinear(nn.Linear):
    """An ``nn.Linear`` that knows how tensor parallelism cuts it; identical to it at tp=1.

    Same parameters and state-dict keys as ``nn.Linear`` (and drawn from the RNG the same
    way), so checkpoints and seeds do not depend on whether a run is tensor-parallel.
    """

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, split: Split, parts: int
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if split not in ("column", "row", None):
            raise ValueError(f"split must be 'column', 'row' or None, got {split!r}")
        if out_features % parts != 0:
            raise ValueError(f"out_features ({out_features}) must be divisible by parts ({parts})")
        self.split, self.parts = split, parts

    def forward_part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Part ``index`` of the fused output, x [..., d_in] -> [..., d_out / parts]."""
        weight = self.weight.chunk(self.parts, dim=0)[index]
        bias = None if self.bias is None else self.bias.chunk(self.parts)[index]
        return F.linear(x, weight, bias)

    def shard(self, group: Any, timeout: timedelta) -> nn.Module:
        """This rank's tensor-parallel replacement of the layer (``split`` must be set)."""
        if self.split == "row":
            return RowParallelLinear.from_linear(
                self, group, input_is_parallel=True, timeout=timeout
            )
        if self.split == "column" and self.parts == 1:
            return ColumnParallelLinear.from_linear(
                self, group, gather_output=False, timeout=timeout
            )
        if self.split == "column":
            return PartedColumnParallelLinear(self, group, timeout=timeout)
        raise ValueError("a replicated HeadLinear (split=None) has no shard")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, split={self.split}, parts={self.parts}"


class PartedColumnParallelLinear(nn.Module):
    """A fused column projection (q|k|v, ...) cut part by part over the TP group.

    Cutting the fused weight [parts * d_out, d_in] in one piece would hand rank 0 all the
    queries and rank 1 the keys; cutting each part keeps every rank's heads together. Rank r
    holds one strided shard, the rows of block r of every part, [part 0 block r | part 1
    block r | ...], so the output [..., parts * d_out / tp] still splits into the parts of
    the local heads with ``chunk(parts)``. The shard keeps the fused layer's names
    (``weight``, ``bias``) and is tagged ``partition_stride = parts`` (Megatron's convention,
    which the layout-free checkpoint joins and cuts), so a checkpoint holds the tp=1 tensor.
    One input all-reduce in the backward serves every part.
    """

    def __init__(self, linear: HeadLinear, group: Any, *, timeout: timedelta) -> None:
        super().__init__()
        self.tp, self.tp_rank = group_size_and_rank(group)
        self.group, self.timeout = group, timeout
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.parts = linear.parts
        width = linear.out_features // linear.parts
        if width % self.tp != 0:
            raise ValueError(
                f"each of the {self.parts} parts ({width} features) of a fused projection must "
                f"be divisible by the tensor-parallel size tp ({self.tp})"
            )
        shard = width // self.tp
        rows = torch.cat(
            [
                torch.arange(
                    i * width + self.tp_rank * shard, i * width + (self.tp_rank + 1) * shard
                )
                for i in range(self.parts)
            ]
        ).to(linear.weight.device)
        self.weight = nn.Parameter(linear.weight.detach()[rows].clone())
        self.bias: nn.Parameter | None = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach()[rows].clone())
        for param in (self.weight, self.bias):
            if param is not None:
                mark_tensor_parallel(param, partition_dim=0)
                param.partition_stride = self.parts

    def forward_part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Part ``index`` for the local heads: x [..., d_in] -> [..., d_out / (parts * tp)]."""
        weight = self.weight.chunk(self.parts, dim=0)[index]
        bias = None if self.bias is None else self.bias.chunk(self.parts)[index]
        return F.linear(copy_to_region(x, self.group, self.timeout), weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> [..., parts * d_out / tp] (the parts' local shards side by side)."""
        return F.linear(copy_to_region(x, self.group, self.timeout), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, tp={self.tp}, "
            f"parts={self.parts}, bias={self.bias is not None}"
        )


def tensor_parallel_error(
    name: str, supported: bool, obstacle: str, num_heads: int, tp: int
) -> str | None:
    """Why attention ``name`` with ``num_heads`` heads cannot run at tensor-parallel size tp."""
    if tp < 1:
        return f"parallel.tp ({tp}) must be >= 1"
    if tp == 1:
        return None
    if not supported:
        return (
            f"attention '{name}' does not support tensor parallelism ({obstacle}); "
            "use parallel.tp=1 or another method"
        )
    if num_heads % tp != 0:
        return f"model.num_heads ({num_heads}) must be divisible by parallel.tp ({tp})"
    return None


class Attention(nn.Module):
    """Base class of every registered attention method.

    Subclasses set ``name``, the capability flags and ``Options``. A head-split method makes
    its projections with ``make_linear`` (usually ``make_qkv_projections``) and implements
    ``attend`` on q, k, v [B, H_local, n, d]; the base ``forward`` does project -> split heads
    -> attend -> merge -> out. Methods with other projections override ``forward`` and use
    the same helpers. ``layer_idx`` is given so that methods with random structure can seed
    it per layer; ``shared`` is the module returned by ``build_shared`` (one per model), for
    methods that share parameters across layers (DeBERTa's relative position table).

    Tensor parallelism: ``supports_tensor_parallel`` is True when heads are independent;
    ``parallelize(group)`` then cuts the projections and, through ``shard_heads``, the
    method's own per-head parameters. ``tensor_parallel_obstacle`` says why not otherwise.
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
    supports_tensor_parallel: ClassVar[bool] = False
    tensor_parallel_obstacle: ClassVar[str] = "its heads are not independent"
    # False for single-head units that split another width (GAU/FLASH's expanded width):
    # num_heads is then not checked against tp.
    splits_heads: ClassVar[bool] = True
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
        # Tensor parallelism; ``parallelize`` changes these. This rank runs heads
        # [tp_rank * num_local_heads, (tp_rank + 1) * num_local_heads).
        self.tp, self.tp_rank, self.tp_group = 1, 0, None
        self.tp_timeout: timedelta = COLLECTIVE_TIMEOUT
        self.num_local_heads = num_heads

    @classmethod
    def build_shared(
        cls, d_model: int, num_heads: int, options: AttentionOptions
    ) -> nn.Module | None:
        """A module shared by every layer of this method in one model, or None."""
        return None

    @classmethod
    def check_tensor_parallel(cls, num_heads: int, tp: int) -> None:
        """Raise a one-line ValueError when this method cannot split num_heads heads over tp."""
        error = tensor_parallel_error(
            cls.name,
            cls.supports_tensor_parallel,
            cls.tensor_parallel_obstacle,
            num_heads if cls.splits_heads else tp,
            tp,
        )
        if error is not None:
            raise ValueError(error)

    # Projections ------------------------------------------------------------------------

    def make_linear(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        split: Split = None,
        parts: int = 1,
    ) -> HeadLinear:
        """A linear layer of this method; ``split`` says how tensor parallelism cuts it."""
        return make_linear(in_features, out_features, bias=bias, split=split, parts=parts)

    def make_qkv_projections(self, bias: bool) -> None:
        """The usual projections: ``qkv`` D -> 3D (q | k | v, heads split) and ``out`` D -> D."""
        self.qkv = self.make_linear(
            self.d_model, 3 * self.d_model, bias=bias, split="column", parts=3
        )
        self.out = self.make_linear(self.d_model, self.d_model, bias=bias, split="row")

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, n, D] -> q, k, v [B, H_local, n, d] through ``qkv``."""
        q, k, v = (self.split_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        return q, k, v

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        """y [B, H_local, n, d] -> [B, n, D] through ``out`` (all-reduced under TP)."""
        return self.out(self.merge_heads(y))

    # Forward ----------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        state: Any = None,
    ) -> tuple[torch.Tensor, Any]:
        """x [B, n, D], key_padding_mask bool [B, n] -> (y [B, n, D], new state or None)."""
        check_padding_mask(x, key_padding_mask)
        q, k, v = self.project_qkv(x)
        y, new_state = self.attend(q, k, v, key_padding_mask=key_padding_mask, state=state)
        return zero_padded_queries(self.project_out(y), key_padding_mask), new_state

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None,
        state: Any,
    ) -> tuple[torch.Tensor, Any]:
        """How the method attends: q, k, v [B, H_local, n, d] -> ([B, H_local, n, d], state)."""
        raise NotImplementedError(f"attention '{self.name}' must implement attend or forward")

    # Tensor parallelism -----------------------------------------------------------------

    def parallelize(self, group: Any, *, timeout: timedelta = COLLECTIVE_TIMEOUT) -> None:
        """Cut this module over the TP ``group`` in place; None or one member: no-op.

        Column-split linears keep the rows of this rank's heads, the output projection the
        matching columns (its partial products are all-reduced), per-head parameters their
        local heads (``shard_heads``). Everything else stays replicated. Every rank must
        have built the module from the same seed, so tp > 1 starts from the tp=1 weights.
        """
        tp, rank = group_size_and_rank(group)
        if tp == 1:
            return
        self.check_tensor_parallel(self.num_heads, tp)
        if self.tp != 1:
            raise RuntimeError(f"attention '{self.name}' is already parallelized (tp={self.tp})")
        self.tp, self.tp_rank, self.tp_group, self.tp_timeout = tp, rank, group, timeout
        if self.splits_heads:
            self.num_local_heads = self.num_heads // tp
        for name, module in list(self.named_modules()):
            if isinstance(module, HeadLinear) and module.split is not None:
                parent_name, _, child = name.rpartition(".")
                setattr(self.get_submodule(parent_name), child, module.shard(group, timeout))
        self.shard_heads()

    def shard_heads(self) -> None:
        """Cut the method's own per-head parameters and buffers to the local heads (hook).

        Called by ``parallelize`` after the linears are cut, with ``tp``, ``tp_rank`` and
        ``num_local_heads`` set. Use ``shard_head_tensor`` for each tensor sized by num_heads.
        """

    def enter_parallel_region(self, t: torch.Tensor) -> torch.Tensor:
        """t, replicated, read by this rank's share of the work: the identity forward, and its
        gradient summed over the TP group backward (so what computed t gets the full one)."""
        return copy_to_region(t, self.tp_group, self.tp_timeout)

    def local_head_slice(self) -> slice:
        """The global indices of this rank's heads."""
        start = self.tp_rank * self.num_local_heads
        return slice(start, start + self.num_local_heads)

    def shard_head_tensor(self, name: str, dim: int) -> None:
        """Replace parameter or buffer ``name`` by its local heads along ``dim``.

        A parameter is tagged tensor-parallel with partition_dim ``dim`` (each rank's grad
        is the slice of the full one); a buffer is just sliced.
        """
        tensor = getattr(self, name)
        heads = self.local_head_slice()
        if tensor.shape[dim] != self.num_heads:
            raise ValueError(
                f"{name} has {tensor.shape[dim]} entries along dim {dim}, expected num_heads "
                f"({self.num_heads})"
            )
        local = tensor.detach().narrow(dim, heads.start, self.num_local_heads).clone()
        if isinstance(tensor, nn.Parameter):
            param = nn.Parameter(local, requires_grad=tensor.requires_grad)
            mark_tensor_parallel(param, partition_dim=dim)
            setattr(self, name, param)
        else:
            setattr(self, name, local)

    # Helpers shared by subclasses -------------------------------------------------------

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, n, H_local * d] -> [B, H_local, n, d]."""
        b, n, _ = t.shape
        return t.view(b, n, -1, self.head_dim).transpose(1, 2)

    def merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, n, d] -> [B, n, H * d]."""
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
