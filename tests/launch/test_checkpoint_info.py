"""``moeforge checkpoint info`` on synthetic checkpoint directories (damage: test_checkpoint_damage)."""

import json

import pytest

from launch.checkpoint_info import describe, main
from launch.checkpoint_verify import describe_files, list_files, write_manifest
from launch.errors import UserError


def write_checkpoint(run_dir, ep: int, portable: bool) -> None:
    directory = run_dir / "checkpoints" / "step00000012"
    directory.mkdir(parents=True)
    (directory / "moeforge.json").write_text(json.dumps({"step": 12, "world_size": 4}))
    (directory / "config.yaml").write_text(
        f"parallel:\n  ep: {ep}\n  tp: 1\n  pp: 1\n  zero_stage: 1\nprecision: bf16\n"
    )
    if portable:
        meta = {"layout": {"dp": 4, "ep": ep, "tp": 1, "pp": 1}, "world_size": 4,
                "zero_stage": 1, "adam_step": 12.0}  # fmt: skip
        (directory / "portable.json").write_text(json.dumps(meta))
    write_manifest(directory, describe_files(directory, list_files(directory)))
    (run_dir / "checkpoints" / "latest").write_text("step00000012")


def test_info_names_step_layout_and_portable_experts(tmp_path, capsys):
    write_checkpoint(tmp_path, ep=2, portable=True)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("step00000012: step 12")
    assert out[1] == (
        "layout: dp=4 x tp=1 x pp=1 (ep=2, each expert on 2 rank(s)) on 4 ranks, ZeRO 1, "
        "precision bf16"
    )
    assert out[2].startswith("experts: saved with dp=4 x tp=1 x pp=1 (ep=2) on 4 ranks")
    assert out[3] == "step00000012: ok"


def test_info_warns_without_portable_file_and_fails_without_checkpoint(tmp_path):
    write_checkpoint(tmp_path / "a", ep=2, portable=False)
    assert "only rank 0's experts" in describe(tmp_path / "a")[2]
    with pytest.raises(UserError, match="no complete checkpoint under"):
        describe(tmp_path / "b")
