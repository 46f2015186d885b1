"""The table logic of `moeforge bench attention_train` on fake run directories (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import attention
from launch import bench_attention_train as bench
from launch.bench_attention_train import Job


def _fake_run(
    out: Path,
    job: Job,
    losses: list[float],
    vals: list[float],
    seconds: float = 12.0,
    error: str | None = None,
) -> None:
    """A run dir with a metrics.jsonl (train every 10 steps, val at the end) and a result."""
    run_dir = out / job.key
    run_dir.mkdir(parents=True)
    lines = [
        json.dumps({"step": 10 * (i + 1), "loss": v + 0.1, "ce_loss": v})
        for i, v in enumerate(losses)
    ]
    for i, v in enumerate(vals):
        lines.append(
            json.dumps(
                {
                    "step": 10 * len(losses) * (i + 1) // len(vals),
                    "val_loss": v,
                    "val_bpb": v / 0.6931,
                }
            )
        )
    lines.append("{not json")  # a torn last line (killed run) is skipped
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    record = {"method": job.method, "mode": job.mode, "error": error, "seconds": seconds}
    (run_dir / bench.RESULT_FILE).write_text(json.dumps(record))


def test_plan_modes_follow_capabilities_and_full_runs_in_both():
    jobs = bench.plan(["full", "bigbird", "performer"])
    assert [job.key for job in jobs] == [
        "full-causal_lm",
        "full-masked_lm",
        "bigbird-masked_lm",
        "performer-causal_lm",
    ]
    for job in bench.plan(attention.available()):
        causal = attention.get(job.method).supports_causal
        assert job.mode == ("causal_lm" if causal and job.key != "full-masked_lm" else "masked_lm")


def test_overrides_carry_method_options_and_user_sets_last():
    items = bench.overrides_for(Job("linformer", "masked_lm"), 200, ["train.micro_batch=8"])
    assert "attention.name=linformer" in items and "model.mode=masked_lm" in items
    assert "train.steps=200" in items and "attention.options.n_max=128" in items
    assert items[-1] == "train.micro_batch=8"


def test_overrides_build_valid_configs_for_every_method():
    from launch.config import load_config

    for job in bench.plan(attention.available()):
        config = load_config(None, bench.overrides_for(job, 300, []))
        assert config.attention.name == job.method and config.model.mode == job.mode
        assert config.train.steps == 300


def test_summarize_reads_first_and_last_and_ratio_uses_same_mode(tmp_path):
    jobs = [
        Job("full", "causal_lm"),
        Job("full", "masked_lm"),
        Job("performer", "causal_lm"),
        Job("bigbird", "masked_lm"),
    ]
    _fake_run(tmp_path, jobs[0], [5.0, 3.0, 2.0], [2.5, 2.0])
    _fake_run(tmp_path, jobs[1], [5.5, 4.0, 3.0], [3.5, 3.2])
    _fake_run(tmp_path, jobs[2], [5.1, 3.3, 2.4], [2.6, 2.2], seconds=30.0)
    _fake_run(tmp_path, jobs[3], [5.4, 4.1, 3.1], [3.6, 4.0])
    rows = bench.with_ratios([bench.summarize(job, tmp_path / job.key) for job in jobs])
    performer, bigbird = rows[2], rows[3]
    assert (performer.first_loss, performer.final_loss, performer.steps) == (5.1, 2.4, 30)
    assert performer.val_loss == 2.2 and performer.val_bpb == pytest.approx(2.2 / 0.6931)
    assert performer.ratio == pytest.approx(2.2 / 2.0)  # against full causal_lm
    assert bigbird.ratio == pytest.approx(4.0 / 3.2)  # against full masked_lm
    assert rows[0].ratio == pytest.approx(1.0) and performer.seconds == 30.0
    assert performer.note == ""
    keys = [(r.method, r.mode) for r in bench.ordered(rows[::-1])]
    assert keys == [
        ("full", "causal_lm"),
        ("performer", "causal_lm"),
        ("full", "masked_lm"),
        ("bigbird", "masked_lm"),
    ]


def test_failed_and_missing_runs_are_rows_not_crashes(tmp_path):
    failed, missing = Job("linformer", "masked_lm"), Job("gau", "causal_lm")
    _fake_run(tmp_path, failed, [], [], error="ValueError: sequence length 256 > n_max 128")
    rows = bench.with_ratios(
        [bench.summarize(failed, tmp_path / failed.key), bench.summarize(missing, tmp_path / "x")]
    )
    assert rows[0].note == "failed: ValueError: sequence length 256 > n_max 128"
    assert rows[0].final_loss is None and rows[0].ratio is None  # no full baseline either
    assert rows[1].note.startswith("not run") and "replaces the FFN" in rows[1].note
    lines = bench.table_lines(rows)
    assert len(lines) == 4 and lines[0].startswith("| method | mode |")
    assert all(line.count("|") == len(bench.HEADER) + 1 for line in lines)
    assert "| `linformer` | masked_lm | - | - |" in lines[2]


def test_table_only_writes_markdown_with_command(tmp_path, capsys):
    job = Job("full", "causal_lm")
    _fake_run(tmp_path, job, [5.0, 2.0], [2.1])
    markdown = tmp_path / "docs" / "results.md"
    argv = [
        "--methods",
        "full",
        "--table-only",
        "--out",
        str(tmp_path),
        "--markdown",
        str(markdown),
    ]
    assert bench.main(argv + ["--note", "Ran in two shards."]) == 0
    text = markdown.read_text()
    assert "\nRan in two shards.\n" in text and "--note" not in text
    assert "moeforge bench attention_train --methods full --table-only" in text
    assert "| `full` | causal_lm | 20 | 5.000 | 2.000 | 2.100 |" in text
    assert "| `full` | masked_lm | - |" in text and "not run" in text
    assert "wrote" in capsys.readouterr().out


def test_unknown_method_fails_with_the_list(tmp_path):
    with pytest.raises(ValueError, match="unknown attention 'nope'; available: .*full"):
        bench.main(["--methods", "nope", "--table-only", "--out", str(tmp_path)])


def test_run_job_records_a_config_error_and_replaces_an_old_run(tmp_path):
    job = Job("full", "causal_lm")
    _fake_run(tmp_path, job, [5.0, 2.0], [2.1])
    bench.run_job(job, 5, ["train.no_such_key=1"], None, tmp_path)  # fails in load_config
    assert not (tmp_path / job.key / "metrics.jsonl").exists()  # the old run is gone
    row = bench.summarize(job, tmp_path / job.key)
    assert (
        row.note.startswith("failed: UserError: ")
        and "no_such_key" in row.note
        and "\n" not in row.note
    )
    assert row.final_loss is None and row.seconds is not None
    assert (tmp_path / job.key / "traceback.txt").is_file()
