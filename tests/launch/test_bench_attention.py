"""Attention benchmark: exponent fit, table formatting, CLI plumbing (no timing asserts)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from launch import bench_attention as bench
from launch.bench_attention import Result


def test_fit_exponent_is_the_log_log_slope_between_extremes() -> None:
    linear = {1024: 10.0, 2048: 25.0, 8192: 80.0}  # the middle point is ignored
    assert bench.fit_exponent(linear) == pytest.approx(1.0)
    quadratic = {1024: 3.0, 4096: 48.0}
    assert bench.fit_exponent(quadratic) == pytest.approx(2.0)
    assert bench.fit_exponent({1024: 5.0}) is None
    assert bench.fit_exponent({1024: 0.0, 2048: 1.0}) is None
    slope = bench.fit_exponent({100: 7.0, 300: 7.0 * 3**1.2})
    assert math.isclose(slope, 1.2, rel_tol=1e-12)


def test_table_has_ratio_to_full_and_notes() -> None:
    results = [
        Result("full", {1024: 100.0, 8192: 6400.0}, {8192: 12.5}),
        Result("bigbird", {1024: 50.0, 8192: 400.0}, {8192: 3.25}),
        Result("hf_bigbird", note="skipped: not installed (pip install transformers)"),
    ]
    text = bench.format_table(results, [1024, 8192])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["method", "ms", "n=1024"]
    full_row, bigbird_row, skipped_row = lines[2], lines[3], lines[4]
    assert full_row.split()[:6] == ["full", "100.0", "6400.0", "2.00", "1.000", "12.5"]
    assert bigbird_row.split()[:6] == ["bigbird", "50.0", "400.0", "1.00", "0.062", "3.2"]
    assert skipped_row.split()[:6] == ["hf_bigbird", "-", "-", "-", "-", "-"]
    assert skipped_row.endswith("skipped: not installed (pip install transformers)")


def test_markdown_table_shape() -> None:
    results = [Result("full", {256: 1.0, 512: 4.0}), Result("linformer", {256: 1.0, 512: 2.0})]
    text = bench.format_table(results, [256, 512], markdown=True)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[1].startswith("|---|")
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[:5] == ["linformer", "1.0", "2.0", "1.00", "0.500"]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_ratio_missing_reference() -> None:
    assert bench.ratio_to_reference(Result("a", {8: 1.0}), None, 8) is None
    assert bench.ratio_to_reference(Result("a", {8: 1.0}), Result("full", {4: 1.0}), 8) is None


def test_parse_lengths() -> None:
    assert bench.parse_lengths("2048,1024,1024") == [1024, 2048]
    for bad in ("", "0,8", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_lengths(bad)


def test_main_runs_tiny_and_writes_markdown(tmp_path, capsys) -> None:
    path = tmp_path / "bench.md"
    argv = ["--methods", "full,linformer,bigbird", "--lengths", "32,64", "--repeats", "1"]
    assert bench.main([*argv, "--markdown", str(path)]) == 0
    out = capsys.readouterr().out
    assert "linformer" in out and "exponent" in out
    text = path.read_text()
    assert text.startswith("# Attention benchmark") and "| bigbird |" in text


def test_main_causal_skips_encoder_only_and_rejects_unknown(capsys) -> None:
    argv = ["--methods", "full,linformer", "--lengths", "16", "--repeats", "1", "--causal"]
    assert bench.main([*argv, "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "skipped: no causal mode" in out
    with pytest.raises(SystemExit):
        bench.main(["--methods", "no_such_method"])


def test_parse_option_and_bad_option() -> None:
    assert bench.parse_option("bigbird.block_size=128") == ("bigbird", "block_size", 128)
    assert bench.parse_option("bigbird.variant=etc") == ("bigbird", "variant", "etc")
    assert bench.parse_option("linformer.share_kv=true") == ("linformer", "share_kv", True)
    for bad in ("bigbird=3", "block_size", ".k=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_option(bad)


def test_options_reach_the_method() -> None:
    forward = bench.build_registered("linformer", 64, False, {"k": 8})
    assert forward.module.options.k == 8 and forward.module.options.n_max == 64
    results = bench.run(
        ["linformer"],
        [16],
        1,
        False,
        measure_memory=False,
        log=lambda line: None,
        options={"linformer": {"k": 0}},
    )
    assert results[0].note.startswith("error at n=16") and "k" in results[0].note


def test_run_puts_x_and_every_module_on_the_device(monkeypatch) -> None:
    # meta stands in for a GPU: a module or input left on the host fails its step (a note).
    seen: set[str] = set()
    original = bench.step

    def step(forward: bench.Forward, x: torch.Tensor) -> float:
        seen.update({p.device.type for p in forward.module.parameters()} | {x.device.type})
        return original(forward, x)

    monkeypatch.setattr(bench, "step", step)
    results = bench.run(
        ["full", "linformer"], [16], 1, False, False, lambda line: None, device="meta"
    )
    assert [r.note for r in results] == ["", ""] and all(16 in r.times_ms for r in results)
    assert seen == {"meta"}


def test_header_names_the_device() -> None:
    args = argparse.Namespace(causal=False, repeats=3, device="cpu")
    assert bench.header(args).startswith("fwd+bwd on CPU, d_model 256")


def test_device_cuda_without_cuda_is_a_one_line_error(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda", "--methods", "full", "--lengths", "16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--device cuda needs a CUDA GPU and torch.cuda.is_available() is False" in err
    assert "use --device cpu" in err


@pytest.mark.gpu
def test_main_runs_on_the_test_device(tmp_path, capsys) -> None:
    from tests.gpu.device import DEVICE

    path = tmp_path / "bench.md"
    argv = ["--methods", "full,linformer,bigbird,performer", "--lengths", "64,128"]
    assert (
        bench.main([*argv, "--repeats", "2", "--device", DEVICE.type, "--markdown", str(path)]) == 0
    )
    out = capsys.readouterr().out
    assert "error" not in out and "performer" in out
    text = path.read_text()
    assert "| performer |" in text
    if DEVICE.type == "cuda":
        assert "fwd+bwd on CUDA (" in out and "CUDA allocator's peak" in text
