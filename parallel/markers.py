"""The one mark that says "this parameter is an expert weight", set by the expert module.

Expert weights differ from every other parameter in how they are reduced (over the
expert-data-parallel group), partitioned (ZeRO within that group), clipped and checkpointed
(by global expert id). Every consumer asks ``is_expert`` instead of matching names, so a
renamed module or a new expert layout cannot silently turn experts into dense weights.

    mark_expert(param)                    # the expert module, for each weight it creates
    is_expert(param)                      # DeepSpeed tagging, checkpoints, parameter counts
    expert_names(model)                   # names of the marked parameters, in module order

A parameter replaced by a new ``nn.Parameter`` (sharding over EP) must be marked again: the
mark is an attribute of the tensor object.
"""

from __future__ import annotations

from torch import nn

EXPERT_ATTRIBUTE = "moeforge_expert"


def mark_expert(param: nn.Parameter) -> nn.Parameter:
    """Mark ``param`` as an expert weight; returns it."""
    setattr(param, EXPERT_ATTRIBUTE, True)
    return param


def is_expert(param: nn.Parameter) -> bool:
    """Whether ``param`` was marked by ``mark_expert``."""
    return bool(getattr(param, EXPERT_ATTRIBUTE, False))


def expert_names(model: nn.Module) -> list[str]:
    """Names of the marked parameters of ``model``, in ``named_parameters`` order."""
    return [name for name, param in model.named_parameters() if is_expert(param)]
