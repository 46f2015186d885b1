"""moeforge sweep: planning from a sweep file (budget, matched FLOPs, dense runs, errors),
run-state detection, and the tiny 4-run sweep interrupted, resumed and rerun through
submitit's local executor (slow: those train)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from launch import sweep
from launch.checkpoint_verify import STATE_FILE
from launch.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "sweeps" / "tiny_test.yaml"
SWITCH = REPO / "configs" / "sweeps" / "switch_experts.yaml"


def _plan(path: Path, out: Path) -> list[sweep.PlannedRun]:
    return sweep.plan(sweep.load_spec(path), path, out)


def test_plan_sets_steps_from_the_flops_budget_and_drops_moe_for_dense(tmp_path):
    spec = sweep.load_spec(TINY)
    runs = _plan(TINY, tmp_path)
    assert [r.name for r in runs] == [
        "num_experts=0_seed=0", "num_experts=0_seed=1", "num_experts=2_seed=0",
        "num_experts=2_seed=1",
    ]  # fmt: skip
    budget = spec.budget.flops_per_run
    for run in runs:
        per_step = run.flops_per_token * run.tokens_per_step
        # The steps are the budget's nearest whole number: within half a step of it.
        assert abs(run.steps * per_step - budget) <= per_step / 2, (run.name, run.steps)
        assert run.tokens_per_step == 4 * 32  # micro batch x seq_len, one rank
        assert f"train.steps={run.steps}" in run.overrides
        assert f"train.seed={run.swept['seed']}" in run.overrides
    dense, moe = runs[0], runs[2]
    assert dense.num_experts == 0 and "moe=null" in dense.overrides
    assert not any(o.startswith("moe.") for o in dense.overrides)
    assert moe.num_experts == 2 and moe.params_total > dense.params_total
    # The trainer builds the same config from the same overrides.
    from launch.config import load_config

    config = load_config(moe.base, moe.overrides)
    assert config.moe.num_experts == 2 and config.train.steps == moe.steps
    assert config.train.eval_every == moe.steps // spec.budget.evals_per_run


def test_keep_active_flops_matches_the_dense_twin(tmp_path):
    runs = _plan(SWITCH, tmp_path)
    dense = next(r for r in runs if r.num_experts == 0)
    for run in runs:
        # Matched within 0.1%; unmatched, 16 experts' routers alone add about 0.5%.
        assert run.flops_per_token == pytest.approx(dense.flops_per_token, rel=1e-3), run.name
        assert run.steps * run.flops_per_token * run.tokens_per_step == pytest.approx(
            1.4e13, rel=1e-3
        )
    sixteen = next(r for r in runs if r.num_experts == 16)
    assert "model.d_ff=508" in sixteen.overrides
    assert len(runs) == 10 and {r.swept["seed"] for r in runs} == {0, 1}


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=str)
def test_every_shipped_sweep_file_plans(path, tmp_path):
    # Every derived config passes the trainer's validation; each MoE run is matched in FLOPs
    # per token to its dense twin (the same overrides without the moe section and the scaled
    # width) when the file asks for it, also in files that train no dense run: within half
    # of what one rounding step of the width (multiple_of) changes.
    from launch.config import load_config

    spec = sweep.load_spec(path)
    runs = _plan(path, tmp_path)
    assert runs and all(r.steps >= 1 for r in runs)
    assert len({r.name for r in runs}) == len(runs)
    if spec.budget.keep_active_flops:
        scaled = spec.budget.scale_key + "="
        for run in (r for r in runs if r.num_experts):
            last = max(i for i, o in enumerate(run.overrides) if o.startswith(scaled))
            twin = sweep._dense(run.overrides[:last] + run.overrides[last + 1 :])
            dense = sweep._accounting(load_config(Path(run.base), twin)).training.total
            width = json.loads(run.overrides[last].partition("=")[2])
            wider = run.overrides + [f"{scaled}{width + spec.budget.multiple_of}"]
            step = sweep._accounting(load_config(Path(run.base), wider)).training.total
            step -= run.flops_per_token
            assert abs(run.flops_per_token - dense) <= step / 2 * (1 + 1e-9), run.name


def test_zipped_axes_move_together_and_bad_files_name_the_problem(tmp_path):
    good = tmp_path / "zip.yaml"
    good.write_text(
        f"base: {REPO / 'configs' / 'tiny.yaml'}\n"
        "axes:\n"
        "  - {model.d_model: [64, 128], model.num_heads: [2, 4]}\n"
        "  - moe.num_experts: [0, 4]\n"
        "seeds: [3]\n"
    )
    runs = _plan(good, tmp_path / "out")
    assert [(r.swept["model.d_model"], r.swept["model.num_heads"]) for r in runs] == [
        (64, 2), (64, 2), (128, 4), (128, 4),
    ]  # fmt: skip
    assert [r.num_experts for r in runs] == [0, 4, 0, 4]
    assert runs[0].name == "d_model=64_num_heads=2_num_experts=0_seed=3"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {TINY}\naxes:\n  - {{model.d_model: [64, 128], model.num_heads: [2]}}\n")
    with pytest.raises(UserError, match="equal lengths"):
        sweep.load_spec(bad)
    bad.write_text(f"base: {TINY}\nseed: [1]\n")
    with pytest.raises(UserError, match="'seed'"):
        sweep.load_spec(bad)
    bad.write_text("base: nowhere.yaml\n")
    with pytest.raises(UserError, match="base config 'nowhere.yaml'"):
        _plan(bad, tmp_path)
    bad.write_text(f"base: {REPO / 'configs' / 'tiny.yaml'}\naxes: {{model.d_modl: [64]}}\n")
    with pytest.raises(UserError, match="did you mean 'model.d_model'"):
        _plan(bad, tmp_path)


def test_a_sweep_file_extends_another(tmp_path):
    # The child's keys win; set and budget merge key by key; base stays relative to the
    # parent; name is not inherited. The plan equals the parent's with the changes applied.
    parent = tmp_path / "configs" / "parent.yaml"
    parent.parent.mkdir()
    shutil.copy(REPO / "configs" / "tiny.yaml", tmp_path / "configs" / "tiny.yaml")
    parent.write_text(
        "base: tiny.yaml\nname: parent_dir\nset: {train.eval_batches: 2, train.log_every: 5}\n"
        "axes: {moe.num_experts: [0, 4]}\nseeds: [0, 1]\n"
        "budget: {flops_per_run: 2.0e11, evals_per_run: 2}\n"
    )
    child = tmp_path / "elsewhere" / "child.yaml"
    child.parent.mkdir()
    child.write_text(
        "extends: ../configs/parent.yaml\nset: {train.log_every: 7}\nseeds: [5]\n"
        "budget: {flops_per_run: 4.0e11}\n"
    )
    spec = sweep.load_spec(child)
    assert spec.name is None and spec.seeds == [5]
    assert spec.set == {"train.eval_batches": 2, "train.log_every": 7}
    assert spec.budget.flops_per_run == 4.0e11 and spec.budget.evals_per_run == 2
    runs, parents = _plan(child, tmp_path / "c"), _plan(parent, tmp_path / "p")
    assert [r.num_experts for r in runs] == [0, 4]
    for run, twin in zip(runs, parents[::2]):
        assert run.steps == 2 * twin.steps  # twice the FLOPs, same models
        assert run.flops_per_token == twin.flops_per_token
        assert "train.log_every=7" in run.overrides and "train.seed=5" in run.overrides
    child.write_text("extends: nowhere.yaml\n")
    with pytest.raises(UserError, match=r"nowhere.yaml \(extended by .*child.yaml\) does not"):
        sweep.load_spec(child)
    child.write_text("extends: child.yaml\n")
    with pytest.raises(UserError, match="'extends' makes a cycle"):
        sweep.load_spec(child)


def test_run_state_reads_the_run_directory(tmp_path):
    run = _plan(TINY, tmp_path)[0]
    run_dir = Path(run.run_dir)
    assert sweep.run_state(run) == "new"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    assert sweep.run_state(run) == "dirty"  # metrics, no checkpoint: starts over (--fresh)
    assert sweep.command(run, fresh=True)[-1] == "--fresh"

    def checkpoint_at(step: int) -> None:
        tag = f"step{step:08d}"
        (run_dir / "checkpoints" / tag).mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / tag / STATE_FILE).write_text("x")
        (run_dir / "checkpoints" / "latest").write_text(tag)

    checkpoint_at(2)
    assert sweep.run_state(run) == "partial"
    checkpoint_at(run.steps)
    assert sweep.run_state(run) == "done"

    # The same directory with another budget: a started run is refused, in one line.
    runs = _plan(TINY, tmp_path)
    sweep.check_budget_unchanged(runs, tmp_path)  # no previous plan
    old = [dict(asdict(r), steps=r.steps * 2) for r in runs]
    (tmp_path / "plan.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match=rf"^{run.name} was planned for {run.steps * 2} steps"):
        sweep.main([str(TINY), "--out", str(tmp_path)])
    shutil.rmtree(run_dir)  # nothing started: every run may take the new budget
    sweep.check_budget_unchanged(runs, tmp_path)


# The real thing: 4 tiny runs, each a moeforge train subprocess ---------------------------


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory) -> dict:
    """The tiny sweep stopped after run 3's checkpoint at step 2, then continued."""
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DS_ACCELERATOR", "cpu")
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv(sweep.FAULT_ENV, "3:2")
        assert sweep.main([str(TINY), "--out", str(out)]) == sweep.EXIT_INTERRUPTED
        first = {
            p.name: (sweep.read_record(p), (p / "metrics.jsonl").stat().st_mtime_ns)
            for p in sorted(out.iterdir())
            if p.is_dir()
        }
        env.delenv(sweep.FAULT_ENV)
        assert sweep.main([str(TINY), "--out", str(out)]) == 0
    return {"out": out, "first": first}


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_runs(interrupted_sweep):
    out, first = interrupted_sweep["out"], interrupted_sweep["first"]
    names = ["num_experts=0_seed=0", "num_experts=0_seed=1", "num_experts=2_seed=0"]
    assert sorted(first) == names  # the fourth run never started
    assert first[names[2]][0]["status"] == "partial"
    for name in names[:2]:  # finished: not run again, metrics untouched
        record = sweep.read_record(out / name)
        assert record["attempts"] == 1 and record["status"] == "done"
        assert (out / name / "metrics.jsonl").stat().st_mtime_ns == first[name][1]
    resumed = sweep.read_record(out / names[2])
    assert resumed["attempts"] == 2 and resumed["resumed_from"] == "partial"
    assert "resuming at step 2" in (out / names[2] / "sweep.log").read_text()
    steps = [r["step"] for r in sweep.read_metrics(out / names[2]) if "loss" in r]
    assert steps == list(range(1, steps[-1] + 1))  # one record per step, none twice

    plan = {p["name"]: p for p in json.loads((out / "plan.json").read_text())}
    with (out / "results.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [r["run"] for r in rows] == list(plan)
    for row in rows:
        run = plan[row["run"]]
        records = sweep.read_metrics(Path(row["run_dir"]))
        evals = [r for r in records if "val_loss" in r]
        assert row["status"] == "done" and int(row["steps"]) == run["steps"]
        assert int(row["num_experts"]) == run["num_experts"] == int(row["moe.num_experts"])
        assert int(row["seed"]) == run["swept"]["seed"]
        assert float(row["final_val_loss"]) == evals[-1]["val_loss"]
        assert float(row["best_val_loss"]) == min(r["val_loss"] for r in evals)
        # The trainer's cumulative FLOPs are the plan's: steps x tokens x FLOPs per token.
        expected = run["steps"] * run["tokens_per_step"] * run["flops_per_token"]
        assert float(row["total_flops"]) == pytest.approx(expected, rel=1e-9)
        assert float(row["wall_s"]) > 0


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("submitit") is None,
    reason="submitit is not installed (pip install 'moeforge[slurm]')",
)
def test_submitit_local_executor_runs_the_same_sweep(interrupted_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "tiny"
    args = [str(TINY), "--out", str(out), "--executor", "submitit-local", "--parallel", "2"]
    assert sweep.main(args) == 0
    assert list((out / "submitit").glob("*_result.pkl"))  # the runs went through submitit

    def losses(root: Path) -> dict[str, float]:
        with (root / "results.csv").open() as stream:
            return {r["run"]: float(r["final_val_loss"]) for r in csv.DictReader(stream)}

    # Uninterrupted here, interrupted and resumed there: the same numbers (exact resume).
    reference = losses(interrupted_sweep["out"])
    assert losses(out) == pytest.approx(reference, rel=1e-6)


@pytest.mark.slow
def test_a_run_can_be_multi_process_through_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = tmp_path / "torchrun.yaml"
    spec.write_text(
        TINY.read_text().replace("base: ../tiny.yaml", f"base: {REPO / 'configs' / 'tiny.yaml'}")
        .replace("moe.num_experts: [0, 2]", "moe.num_experts: [2]")
        .replace("seeds: [0, 1]", "seeds: [0]\nlauncher: torchrun\nnproc: 2")
    )  # fmt: skip
    out = tmp_path / "out"
    (run,) = _plan(spec, out)
    assert run.tokens_per_step == 2 * 4 * 32  # two data-parallel ranks
    assert sweep.command(run)[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert sweep.main([str(spec), "--out", str(out)]) == 0
    assert "world size 2" in (Path(run.run_dir) / "sweep.log").read_text()
    with (out / "results.csv").open() as stream:
        (row,) = list(csv.DictReader(stream))
    assert row["status"] == "done" and int(row["tokens"]) == run.steps * run.tokens_per_step
