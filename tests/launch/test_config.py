"""The run config: strict YAML, dotted overrides, cross-cutting validation, DeepSpeed JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launch.cli import main
from launch.config import (
    DEFAULT_CONFIG,
    RunConfig,
    UserError,
    config_from_dict,
    deepspeed_config,
    incompatible_fields,
    load_config,
    validate,
)


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_config_loads_and_is_the_tiny_one():
    config = load_config()
    assert DEFAULT_CONFIG.name == "tiny.yaml"
    assert config.moe.num_experts == 8 and config.moe.every == 2 and config.model.num_layers == 4
    assert config.precision == "auto" and validate(config, world_size=1) == 1


def test_unknown_key_names_dotted_path_and_closest_name(tmp_path):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, {"moe": {"num_expert": 4}}))
    assert str(err.value) == "unknown config key 'moe.num_expert'; did you mean 'moe.num_experts'?"
    with pytest.raises(UserError, match=r"^unknown config key 'trian'; did you mean 'train'\?$"):
        config_from_dict({"trian": {}})
    with pytest.raises(
        UserError,
        match=r"^unknown config key 'attention\.layers\.1\.nme'; did you mean 'attention\.layers\.1\.name'\?$",
    ):
        config_from_dict({"attention": {"layers": {"1": {"name": "full", "nme": 1}}}})


def test_wrong_type_names_expected_and_given():
    with pytest.raises(UserError) as err:
        config_from_dict({"train": {"steps": "many"}})
    message = str(err.value)
    assert message.startswith("config key 'train.steps': Input should be a valid integer")
    assert "(got str 'many')" in message and "\n" not in message
    with pytest.raises(
        UserError,
        match=r"^config key 'moe\.num_experts': Input should be greater than or equal to 1",
    ):
        config_from_dict({"moe": {"num_experts": 0}})
    with pytest.raises(
        UserError,
        match=r"^config key 'precision': Input should be 'auto', 'bf16', 'bf16-params' or 'fp32'",
    ):
        config_from_dict({"precision": "fp8"})


def test_dotted_overrides_parse_yaml_values(tmp_path):
    path = write(tmp_path, {"train": {"steps": 5}})
    config = load_config(
        path,
        ["moe.num_experts=16", "optimizer.lr=3e-4", "optimizer.betas=[0.8, 0.9]", "moe.capacity_factor=null",
         "attention.layers.1.name=full", "logging.progress=false"],
    )  # fmt: skip
    assert config.moe.num_experts == 16 and config.optimizer.lr == 3e-4
    assert config.optimizer.betas == (0.8, 0.9) and config.moe.capacity_factor is None
    assert config.attention.layers["1"].name == "full" and config.logging.progress is False
    assert load_config(path, ["moe=null"]).moe is None
    with pytest.raises(UserError, match=r"^--set 'steps' must look like section\.key=value"):
        load_config(path, ["steps"])
    with pytest.raises(
        UserError, match=r"^--set train\.steps\.x: train\.steps is a value, not a section"
    ):
        load_config(path, ["train.steps.x=1"])


def test_validate_cross_cutting_rules():
    base = {"moe": {"num_experts": 6}, "parallel": {"ep": 4}}
    with pytest.raises(
        UserError,
        match=r"^moe\.num_experts \(6\) must be divisible by parallel\.ep \(4\); change one of them$",
    ):
        validate(config_from_dict(base), world_size=4)
    with pytest.raises(UserError, match=r"^parallel\.ep \(4\) must divide dp x tp \(2 x 1 = 2"):
        validate(config_from_dict({"moe": {"num_experts": 8}, "parallel": {"ep": 4}}), world_size=2)
    with pytest.raises(
        UserError,
        match=r"^parallel\.zero_stage \(3\) is refused for MoE models.*use parallel\.zero_stage 0, 1 or 2$",
    ):
        validate(config_from_dict({"parallel": {"zero_stage": 3}}), world_size=1)
    assert validate(config_from_dict({"moe": None, "parallel": {"zero_stage": 3}}), 1) == 1
    with pytest.raises(
        UserError, match=r"^data\.seq_len \(300\) exceeds model\.max_seq_len \(256\)"
    ):
        validate(config_from_dict({"data": {"seq_len": 300}}), world_size=1)
    with pytest.raises(UserError, match=r"^attention: unknown attention 'nope'"):
        validate(config_from_dict({"attention": {"name": "nope"}}), world_size=1)
    with pytest.raises(UserError, match=r"^model\.mode classify needs data\.label_field"):
        validate(config_from_dict({"model": {"mode": "classify"}}), world_size=1)
    assert validate(config_from_dict({"moe": {"num_experts": 8}, "parallel": {"ep": 2}}), 4) == 4


@pytest.mark.parametrize("precision", ["bf16", "bf16-params", "fp32"])
def test_deepspeed_json_from_config(tmp_path, precision):
    config = config_from_dict(
        {"precision": precision, "train": {"micro_batch": 3, "grad_accum": 2, "steps": 50},
         "parallel": {"zero_stage": 2}, "optimizer": {"lr": 1e-3, "grad_clip": 0.5},
         "schedule": {"warmup_steps": 5, "min_lr_ratio": 0.2}}
    )  # fmt: skip
    ds = deepspeed_config(config, tmp_path)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"] == {"stage": 2}
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 1e-3
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert (
        ds["scheduler"]["params"]["total_num_steps"] == 50
        and ds["scheduler"]["params"]["cos_min_ratio"] == 0.2
    )
    assert ds["tensorboard"]["enabled"] and ds["csv_monitor"]["enabled"]
    autocast = ds.get("torch_autocast", {})
    assert autocast.get("enabled", False) == (precision == "bf16")
    assert ds.get("bf16", {}).get("enabled", False) == (precision == "bf16-params")


def test_user_deepspeed_json_overrides_keys(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {"zero_optimization": {"stage": 1, "overlap_comm": True}, "gradient_clipping": 2.0}
        )
    )
    ds = deepspeed_config(RunConfig(), tmp_path, user)
    assert (
        ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}
        and ds["gradient_clipping"] == 2.0
    )
    assert ds["optimizer"]["type"] == "AdamW"  # untouched keys stay
    with pytest.raises(UserError, match=r"^--deepspeed-config .*missing\.json does not exist"):
        deepspeed_config(RunConfig(), tmp_path, tmp_path / "missing.json")


def test_incompatible_fields_for_resume():
    saved = RunConfig().model_dump(mode="json")
    assert (
        incompatible_fields(
            saved, config_from_dict({"train": {"steps": 5000}, "checkpoint": {"every": 7}})
        )
        == []
    )
    changed = incompatible_fields(saved, config_from_dict({"model": {"d_model": 64}}))
    assert changed == ["model.d_model (128 -> 64)"]


def test_cli_config_errors_print_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--set", "moe.num_expert=4"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "moeforge: error: unknown config key 'moe.num_expert'; did you mean 'moe.num_experts'?\n"
    )
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["train", "--set", "train.steps=abc"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("moeforge: error: config key 'train.steps': Input should be a valid integer")
        and err.count("\n") == 1
    )
    assert main(["bench", "nothing"]) == 2
    assert capsys.readouterr().err.startswith(
        "moeforge: error: unknown benchmark 'nothing'; available:"
    )
    assert main(["fly"]) == 2


def test_validate_refuses_simulated_with_real_ep_and_global_scope_with_expert_choice():
    both = {"moe": {"num_experts": 8, "simulate_ep": 2}, "parallel": {"ep": 2}}
    with pytest.raises(UserError, match=r"moe.simulate_ep \(2\) .* parallel.ep \(2\); set one"):
        validate(config_from_dict(both), world_size=2)
    assert validate(config_from_dict({"moe": {"num_experts": 8, "simulate_ep": 2}}), 1) == 1
    scope = {"moe": {"num_experts": 8, "capacity_scope": "global", "router": "expert_choice"}}
    with pytest.raises(UserError, match="capacity_scope global applies to token-choice"):
        validate(config_from_dict(scope), world_size=1)
