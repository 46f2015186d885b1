"""precision: auto resolves by the hardware's bf16 support; explicit names keep their meaning."""

from __future__ import annotations

import pytest
import torch

from launch import precision as precision_module
from launch.config import config_from_dict, deepspeed_config
from launch.precision import emulated_bf16_warning, resolve_precision


@pytest.fixture
def bf16_support(monkeypatch):
    """Force the hardware answer: ``bf16_support(False)`` is an AVX2-only CPU."""

    def force(native: bool) -> None:
        monkeypatch.setattr(precision_module, "native_bf16", lambda device: native)

    return force


def test_auto_is_fp32_without_native_bf16_and_says_why(bf16_support):
    bf16_support(False)
    chosen = resolve_precision("auto", torch.device("cpu"))
    assert chosen.name == "fp32" and not chosen.bf16
    assert chosen.describe() == "auto -> fp32: this CPU has no native bf16"


def test_auto_is_bf16_autocast_with_native_bf16(bf16_support):
    bf16_support(True)
    chosen = resolve_precision("auto", torch.device("cpu"))
    assert chosen.name == "bf16" and chosen.bf16
    assert chosen.describe() == "auto -> bf16: native bf16 on this CPU"


@pytest.mark.parametrize("name", ["bf16", "bf16-params", "fp32"])
@pytest.mark.parametrize("native", [False, True])
def test_explicit_names_keep_their_meaning(bf16_support, name, native):
    bf16_support(native)
    chosen = resolve_precision(name, torch.device("cpu"))
    assert chosen.name == name and chosen.describe() == name


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_the_measured_slowdown(
    bf16_support, monkeypatch
):
    bf16_support(False)
    monkeypatch.setattr(precision_module, "bf16_slowdown", lambda device: 42.0)
    line = emulated_bf16_warning(resolve_precision("bf16"), torch.device("cpu"))
    assert line is not None and "\n" not in line
    assert "emulated (42x slower than fp32" in line and "precision auto or fp32" in line
    assert emulated_bf16_warning(resolve_precision("fp32"), torch.device("cpu")) is None
    bf16_support(True)
    assert emulated_bf16_warning(resolve_precision("bf16"), torch.device("cpu")) is None


def test_the_slowdown_probe_measures_a_ratio():
    assert precision_module.bf16_slowdown(torch.device("cpu"), size=32) > 0.0


@pytest.mark.parametrize("native", [False, True])
def test_deepspeed_json_follows_the_resolved_precision(bf16_support, tmp_path, native):
    bf16_support(native)
    config = config_from_dict({"logging": {"tensorboard": False, "csv": False}})
    assert config.precision == "auto"  # the default
    ds = deepspeed_config(config, tmp_path)
    assert ds.get("torch_autocast", {}).get("enabled", False) == native
    assert "bf16" not in ds


def test_tiny_yaml_takes_auto_precision_and_layout():
    from launch.config import load_config

    config = load_config()
    assert config.precision == "auto" and config.moe.expert_layout == "auto"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8")
