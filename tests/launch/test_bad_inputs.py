"""Bad input, everywhere: one line naming the field and the fix, exit status 2, before any
data loads and before DeepSpeed starts (in-process), as a real ``moeforge`` process, and
under ``torchrun`` (one line, status 2, no launcher traceback). docs/bad_inputs.md lists
every case below with its exact message; ``test_docs_table_matches_the_cases`` keeps the two
in step (regenerate the table with ``MOEFORGE_WRITE_DOCS=1 pytest -k docs_table``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import cli, preflight, trainer
from launch.config import config_from_dict
from launch.data import (
    Data,
    DataConfig,
    DataError,
    Split,
    check_hub_name,
    check_loaded_batches,
    check_source,
    load_records,
)
from launch.torchrun_plugin import (
    USER_ERROR_DIR_ENV,
    handler_generator,
    is_moeforge_agent,
    report_user_error,
)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCS = REPO / "docs" / "bad_inputs.md"

# (argv after "moeforge", the field or option the line must name, a setup the case needs).
# DATA is a folder of bad files made by ``make_bad_data``; RUN a scratch folder.
CASES: list[tuple[list[str], str, str | None]] = [
    (["train", "--set", "moe.top_k=9"], "moe.top_k", None),
    (["train", "--set", "moe.capacity_factor=-1"], "moe.capacity_factor", None),
    (["train", "--set", "moe.eval_capacity_factor=.nan"], "moe.eval_capacity_factor", None),
    (["train", "--set", "moe.num_experts=0"], "moe.num_experts", None),
    (
        ["train", "--set", "moe.router=expert_choice", "--set", "moe.capacity_factor=0"],
        "moe.capacity_factor",
        None,
    ),
    (["train", "--set", "moe.jitter_eps=1.5"], "moe.jitter_eps", None),
    (["train", "--set", "moe.activation=tanh"], "moe.activation", None),
    (["train", "--set", "moe.min_capacity=-1"], "moe.min_capacity", None),
    (["train", "--set", "moe.num_expert=4"], "moe.num_experts", None),
    (["train", "--set", "moe.capacity_factor=9"], "moe.capacity_factor", None),
    (["train", "--set", "moe.min_capacity=100000"], "moe.min_capacity", None),
    (["train", "--set", "moe.simulate_ep=100000"], "moe.simulate_ep", None),
    (["train", "--set", "parallel.ep=3"], "parallel.ep", None),
    (["train", "--set", "parallel.ep=2"], "parallel.ep", None),
    (["train", "--set", "parallel.tp=2"], "parallel.tp", None),
    (["train", "--set", "parallel.tp=2"], "parallel.tp", "world3"),
    (["train", "--set", "parallel.tp=4", "--set", "model.num_heads=2"], "parallel.tp", "world4"),
    (["train", "--set", "parallel.tp=4", "--set", "model.d_ff=130"], "parallel.tp", "world4"),
    (["train", "--set", "parallel.tp=2", "--set", "parallel.ep=4"], "parallel.ep", "world2"),
    (["train", "--set", "parallel.tp=2", "--set", "parallel.ep=3"], "parallel.ep", "world6"),
    (
        ["train", "--set", "parallel.tp=2", "--set", "moe.router=expert_choice"],
        "moe.router",
        "world2",
    ),
    (
        [
            "train",
            "--set",
            "parallel.tp=2",
            "--set",
            "train.micro_batch=1",
            "--set",
            "data.seq_len=127",
        ],
        "parallel.tp",
        "world2",
    ),  # fmt: skip
    (
        ["train", "--set", "parallel.pp=2", "--set", "parallel.zero_stage=2"],
        "parallel.zero_stage",
        "world2",
    ),
    (
        [
            "train",
            "--set",
            "parallel.pp=2",
            "--set",
            "parallel.zero_stage=1",
            "--set",
            "parallel.pp_partition=[1,3]",
        ],
        "pipeline stages [0]",
        "world2",
    ),
    (
        ["train", "--set", "parallel.pp=2", "--set", "parallel.pp_partition=[1,2]"],
        "parallel.pp_partition",
        "world2",
    ),
    (["train", "--set", "parallel.pp=2", "--set", "attention.name=evolving"], "evolving", "world2"),
    (["train", "--set", "parallel.pp=2", "--set", "model.num_layers=1"], "parallel.pp", "world2"),
    (
        ["train", "--set", "parallel.micro_batches=4", "--set", "train.grad_accum=2"],
        "parallel.micro_batches",
        None,
    ),
    (["train", "--set", "parallel.tp=2", "--set", "attention.name=evolving"], "evolving", "world2"),
    (["train", "--set", "parallel.zero_stage=3"], "parallel.zero_stage", None),
    (["train", "--set", "parallel.zero_stage=4"], "parallel.zero_stage", None),
    (["train", "--set", "parallel.backend=mpi"], "parallel.backend", None),
    (["train", "--set", "parallel.backend=nccl"], "parallel.backend", "cpu"),
    (["train", "--set", "parallel.timeout_s=.inf"], "parallel.timeout_s", None),
    (["train", "--set", "model.d_model=130"], "model.d_model", None),
    (["train", "--set", "model.num_heads=0"], "model.num_heads", None),
    (["train", "--set", "model.mode=generate"], "model.mode", None),
    (["train", "--set", "model.dropout=1.0"], "model.dropout", None),
    (["train", "--set", "model.vocab_size=100"], "model.vocab_size", None),
    (["train", "--set", "model.input=pixels"], "model.input", "builtin"),
    (["train", "--set", "model.input=patches"], "model.image", None),
    (["train", "--set", "model.norm_eps=0"], "model.norm_eps", None),
    (
        ["train", "--set", "model.d_model=4096", "--set", "model.d_ff=16384"],
        "model.d_model",
        "memory",
    ),
    (["train", "--set", "model.num_layers=1000000000000"], "model.num_layers", "memory"),
    (["train", "--set", "data.seq_len=300"], "data.seq_len", None),
    (["train", "--set", "data.seq_len=1"], "data.seq_len", None),
    (["train", "--set", "data.val_fraction=0.6"], "data.val_fraction", None),
    (["train", "--set", "data.tokenizer=wordpiece"], "data.tokenizer", None),
    (["train", "--set", "data.label_field=label"], "data.label_field", None),
    (["train", "--set", "model.mode=classify"], "data.label_field", None),
    (["train", "--set", "data.path=DATA/missing.txt"], "data.path", None),
    (["train", "--set", "data.path=DATA/garbage.txt"], "data.path", None),
    (["train", "--set", "data.path=DATA/latin1.txt"], "data.path", None),
    (["train", "--set", "data.path=DATA/garbage.jsonl"], "data.path", None),
    (["train", "--set", "data.path=DATA/latin1.jsonl"], "data.path", None),
    (["train", "--set", "data.path=DATA/notjson.jsonl"], "data.path", None),
    (["train", "--set", "data.path=DATA/garbage.parquet"], "data.path", None),
    (["train", "--set", "data.path=DATA/body.jsonl"], "data.text_field", None),
    (["train", "--set", "data.path=DATA/empty"], "data.path", None),
    (["train", "--set", "data.path=DATA/blank.txt"], "data.path", None),
    (["train", "--set", "data.path=DATA/tiny.txt"], "data.seq_len", None),
    (["train", "--set", "data.path=DATA/mixed"], "data.path", None),
    (["train", "--set", "data.path=mydata"], "data.path", "offline"),
    (["train", "--set", "data.path=mydata"], "data.path", "unreachable"),
    (["train", "--set", "optimizer.lr=0"], "optimizer.lr", None),
    (["train", "--set", "optimizer.lr=.inf"], "optimizer.lr", None),
    (["train", "--set", "optimizer.betas=[0.9,1.0]"], "optimizer.betas", None),
    (["train", "--set", "optimizer.weight_decay=-0.1"], "optimizer.weight_decay", None),
    (["train", "--set", "schedule.min_lr_ratio=2"], "schedule.min_lr_ratio", None),
    (["train", "--set", "train.steps=0"], "train.steps", None),
    (["train", "--set", "train.steps=abc"], "train.steps", None),
    (["train", "--set", "train.seed=-1"], "train.seed", None),
    (["train", "--set", "data.split_seed=-1"], "data.split_seed", None),
    (["train", "--set", "train.micro_batch=0"], "train.micro_batch", None),
    (
        ["train", "--set", "data.path=DATA/small.jsonl", "--set", "train.micro_batch=64"],
        "train.micro_batch",
        None,
    ),
    (["train", "--set", "train.mlm_probability=1"], "train.mlm_probability", None),
    (["train", "--set", "checkpoint.keep_last=0"], "checkpoint.keep_last", None),
    (["train", "--set", "precision=fp8"], "precision", None),
    (["train", "--set", "attention.name=nope"], "attention", "builtin"),
    (["train", "--set", "attention.name=linformer"], "attention.name", None),
    (
        ["train", "--set", "model.mode=masked_lm", "--set", "attention.name=linformer"]
        + ["--set", "attention.options.n_max=64"],
        "attention.options.n_max",
        None,
    ),
    (["train", "--set", "attention.options.bogus=1"], "attention", None),
    (["train", "--set", "attention.layers.9.name=full"], "attention.layers.9", None),
    (["train", "--set", "steps"], "--set", None),
    (["train", "--set", "train.steps.x=1"], "--set", None),
    (["train", "DATA/missing.yaml"], "config file", None),
    (["train", "DATA/bad.yaml"], "config file", None),
    (["train", "--deepspeed-config", "DATA/missing.json"], "--deepspeed-config", None),
    (["train", "--deepspeed-config", "DATA/bad.json"], "--deepspeed-config", None),
    (["train", "--run-dir", "DATA/file"], "--run-dir", None),
    (["train", "--run-dir", "DATA/file/run"], "--run-dir", None),
    (["train", "--run-dir", "DATA/locked/run"], "--run-dir", "unwritable"),
    (["train", "--resum"], "--resum", None),
    (["train", "--sett", "train.steps=1"], "--sett", None),
    (["bench", "train", "--stps", "3"], "--stps", None),
    (["bench", "nothing"], "benchmark", None),
    (["checkpoint"], "checkpoint", None),
    (["checkpoint", "info"], "run", None),
    (["plot-experts"], "run", None),
    (["fly"], "command", None),
]


def case_id(case: tuple[list[str], str, str | None]) -> str:
    argv, _, setup = case
    return " ".join(argv) + (f" [{setup}]" if setup else "")


def make_bad_data(root: Path) -> Path:
    """Bad files of every kind the data loader meets, under root/DATA."""
    data = root / "DATA"
    data.mkdir()
    garbage = bytes(range(256)) * 16  # binary: NUL bytes and invalid UTF-8
    latin1 = "crème brûlée, façade, naïve\n".encode("latin-1") * 20
    for name in ("garbage.txt", "garbage.jsonl", "garbage.parquet"):
        (data / name).write_bytes(garbage)
    (data / "latin1.txt").write_bytes(latin1)
    (data / "latin1.jsonl").write_bytes(b'{"text": "' + latin1.strip() + b'"}\n')
    (data / "notjson.jsonl").write_text("this is not json\n")
    (data / "body.jsonl").write_text('{"body": "text under another key"}\n')
    line = '{"text": "document %d: the quick brown fox jumps over the lazy dog, again"}\n'
    (data / "small.jsonl").write_text("".join(line % i for i in range(400)))
    (data / "empty").mkdir()
    (data / "blank.txt").write_text("\n \n")
    (data / "tiny.txt").write_text("too short for one sequence\n")
    (data / "mixed").mkdir()
    (data / "mixed" / "a.txt").write_text("text\n")
    (data / "mixed" / "b.jsonl").write_text('{"text": "json"}\n')
    (data / "file").write_text("a file, not a directory\n")
    (data / "locked").mkdir()
    (data / "bad.yaml").write_text("model: [unclosed\n")
    (data / "bad.json").write_text('{"zero_optimization": \n')
    return data


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    return make_bad_data(tmp_path_factory.mktemp("bad"))


@pytest.fixture(autouse=True)
def nothing_heavy_starts(monkeypatch):
    """Fail loudly if a case reaches the data load or DeepSpeed; keep the environment that
    ``discover_environment`` fills from leaking into other tests."""

    def reached(*args, **kwargs):
        raise AssertionError("reached data loading or DeepSpeed before refusing the input")

    monkeypatch.setattr(trainer, "_build_data", reached)
    monkeypatch.setattr(trainer.bridge, "init_distributed", reached)
    monkeypatch.setattr(trainer.bridge, "import_deepspeed", reached)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that the value set in the test is undone
        monkeypatch.delenv(key)
    for key in (USER_ERROR_DIR_ENV, "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def apply_setup(setup: str | None, data: Path, monkeypatch) -> None:
    if setup == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif setup == "unreachable":
        monkeypatch.setattr("launch.data.hub_reachable", lambda: False)
    elif setup == "memory":  # the same answer on every host: 16 GiB available
        monkeypatch.setattr(preflight, "available_memory", lambda: 16 * 2**30)
        monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: False)
    elif setup == "builtin":  # the lists of methods and inputs without those tests register
        import attention.registry as registry
        import moe.blocks as blocks

        for module, name in ((registry, "_REGISTRY"), (blocks, "_INPUTS")):
            found = getattr(module, name)
            builtin = {k: v for k, v in found.items() if not k.startswith("test_")}
            monkeypatch.setattr(module, name, builtin)
    elif setup is not None and setup.startswith("world"):  # as one rank of a larger launch
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", setup[len("world") :])
    elif setup == "cpu":  # the same answer on a machine with GPUs
        monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: False)
    elif setup == "unwritable":  # root may write anywhere: deny the folder by hand
        real = os.access
        locked = str(data / "locked")
        monkeypatch.setattr(
            os, "access", lambda path, mode: False if str(path) == locked else real(path, mode)
        )


def run_case(case, data: Path, monkeypatch, capsys) -> tuple[int, list[str], float]:
    """Run one case in-process: (exit status, non-empty stderr lines, seconds)."""
    argv, _, setup = case
    apply_setup(setup, data, monkeypatch)
    argv = [a.replace("DATA", str(data)) for a in argv]
    if argv[0] == "train" and "--run-dir" not in argv:
        argv += ["--run-dir", str(data.parent / "RUN")]
    capsys.readouterr()
    started = time.perf_counter()
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's errors exit (status 2) after printing their line
        status = exit_.code
    seconds = time.perf_counter() - started
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return status, [line.replace(str(data), "DATA") for line in lines], seconds


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_is_one_line_status_2_before_data(case, bad_data, monkeypatch, capsys):
    status, lines, seconds = run_case(case, bad_data, monkeypatch, capsys)
    assert status == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("moeforge: error: ") and case[1] in lines[0], lines
    assert seconds < 5.0, f"{seconds:.1f} s: refused too late"
    assert not (bad_data.parent / "RUN").exists()  # nothing written for a refused run


def table_rows(data: Path, monkeypatch, capsys) -> list[str]:
    """The markdown rows of docs/bad_inputs.md, from running every case."""
    rows = []
    for index, case in enumerate(CASES, start=1):
        with monkeypatch.context() as patch:
            status, lines, _ = run_case(case, data, patch, capsys)
        command = "moeforge " + " ".join(case[0])
        note = {
            "offline": " (HF_HUB_OFFLINE=1)",
            "unreachable": " (no network)",
            "memory": " (16 GiB free)",
            "cpu": " (no GPU)",
            "builtin": "",
            "unwritable": " (DATA/locked read-only)",
        }.get(case[2] or "", "")
        if (case[2] or "").startswith("world"):
            note = f" (as one of {case[2][len('world') :]} ranks)"
        message = lines[0].removeprefix("moeforge: error: ").replace("|", "\\|")
        rows.append(f"| {index} | `{command}`{note} | `{message}` | {status} |")
    return rows


def test_docs_table_matches_the_cases(bad_data, monkeypatch, capsys):
    rows = table_rows(bad_data, monkeypatch, capsys)
    text = DOCS.read_text()
    if os.environ.get("MOEFORGE_WRITE_DOCS"):  # regenerate: MOEFORGE_WRITE_DOCS=1 pytest -k docs
        head, _, rest = text.partition("| # |")
        _, _, tail = rest.partition("<!-- end of table -->")
        table = "| # | command | message | exit |\n|---|---|---|---|\n" + "\n".join(rows)
        DOCS.write_text(f"{head}{table}\n\n<!-- end of table -->{tail}")
        text = DOCS.read_text()
    documented = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    assert documented == rows


# Warnings: options that do nothing, or get capped, say so in one line ---------------------


def test_moe_every_beyond_the_layers_warns_once(bad_data, monkeypatch):
    config = config_from_dict({"moe": {"num_experts": 4, "every": 10}})
    lines = preflight.inert_option_warnings(config, preflight.build_on_meta(config))
    assert lines == [
        "moe.every (10) is larger than model.num_layers (4): no block gets an MoE FFN and the "
        "model trains dense; set moe.every <= 4 or moe: null"
    ]
    normal = config_from_dict({"moe": {"num_experts": 4, "every": 2}})
    assert preflight.inert_option_warnings(normal, preflight.build_on_meta(normal)) == []
    # Through the CLI the warning is one logged line, and the run goes on to its data.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("moeforge").addHandler(handler)
    try:
        with pytest.raises(AssertionError, match="reached data loading"):
            run = ["train", "--set", "moe.every=10", "--run-dir", str(bad_data.parent / "R2")]
            cli.main(run)
    finally:
        logging.getLogger("moeforge").removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("moe.every (10)")


def test_stop_at_at_or_after_the_last_step_warns():
    config = config_from_dict({"train": {"steps": 10, "stop_at": 12}})
    assert preflight.inert_option_warnings(config, None) == [
        "train.stop_at (12) is not before train.steps (10): the run ends at step 10 anyway; "
        "lower train.stop_at or remove it"
    ]
    early = config_from_dict({"train": {"steps": 10, "stop_at": 5}})
    assert preflight.inert_option_warnings(early, None) == []


def _data(num_val: int) -> Data:
    tokens = torch.zeros(num_val, 9, dtype=torch.int64)
    return Data(train=Split(tokens), val=Split(tokens), tokenizer=None, num_documents=1)


def test_eval_batches_beyond_the_split_warn_and_a_micro_batch_too_big_is_refused():
    assert check_loaded_batches(_data(40), micro_batch=4, num_eval_batches=8, dp_size=1) is None
    line = check_loaded_batches(_data(40), micro_batch=4, num_eval_batches=100000, dp_size=2)
    assert line == (
        "train.eval_batches (100000) is more than the 5 batch(es) of train.micro_batch x ranks "
        "= 8 sequences the validation split holds (40 sequences); evaluating on 5"
    )
    with pytest.raises(DataError, match=r"^train\.micro_batch \(64\) x 1 .*<= 40 or add data$"):
        check_loaded_batches(_data(40), micro_batch=64, num_eval_batches=1, dp_size=1)


def test_a_bad_file_past_the_sniffed_head_is_one_line(tmp_path, capfd):
    deep_text = tmp_path / "deep.txt"
    deep_text.write_bytes(b"hello world\n" * 7000 + "caf\xe9".encode("latin-1"))
    deep_json = tmp_path / "deep.jsonl"
    deep_json.write_text('{"text": "fine"}\n' * 5000 + '{"text": broken\n')
    for path, reader in ((deep_text, "text"), (deep_json, "json")):
        config = DataConfig(path=str(path))
        check_source(config)  # the first 64 KiB are fine
        with pytest.raises(DataError, match=rf"^data\.path {path} could not be read as {reader}"):
            load_records(config)
    assert capfd.readouterr().err == ""  # the loader's own error log is not shown


def test_a_cached_hub_dataset_loads_offline_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(key, raising=False)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "")  # recorded, so that check_hub_name's setting is undone
    monkeypatch.setattr("launch.data.hub_reachable", lambda: False)
    with pytest.raises(DataError, match="cannot be reached"):
        check_hub_name("owner/name")
    (tmp_path / "hub" / "datasets--owner--name").mkdir(parents=True)
    check_hub_name("owner/name")
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_unwritable_run_dir_for_real(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; the in-process case denies the folder by hand")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(preflight.UserError, match="not writable"):
        preflight.check_run_dir(locked / "run")


# torchrun plugin: pure parts --------------------------------------------------------------


def test_plugin_recognises_only_torchrun_launching_moeforge():
    assert is_moeforge_agent(["/v/bin/torchrun", "--nproc_per_node=2", "-m", "launch.cli"])
    assert is_moeforge_agent(["/x/torch/distributed/run.py", "/v/bin/moeforge", "train"])
    assert not is_moeforge_agent(["/v/bin/torchrun", "train.py"])
    assert not is_moeforge_agent(["/v/launch/cli.py", "train"])  # a worker, not the agent
    before = sys.excepthook
    creator = handler_generator()  # pytest's argv: installs nothing
    assert sys.excepthook is before and USER_ERROR_DIR_ENV not in os.environ
    with pytest.raises(ValueError, match="not a rendezvous backend"):
        creator(None)


def test_first_rank_to_fail_reports(tmp_path, monkeypatch):
    assert report_user_error() is None  # no agent watching: rank 0 reports
    monkeypatch.setenv(USER_ERROR_DIR_ENV, str(tmp_path))
    assert report_user_error() is True
    assert report_user_error() is False


# Real processes ---------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.pop("OMP_NUM_THREADS", None)  # torchrun's banner must not show either
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return env


def _run_all(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Start every command at once (they mostly wait on imports), then collect them."""
    procs = [
        subprocess.Popen(
            c, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c in commands
    ]
    done = []
    for command, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=240)
        done.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return done


@pytest.mark.slow
def test_moeforge_processes_print_one_line_and_exit_2(bad_data):
    run = str(bad_data.parent / "RUN")
    cases = [
        ["train", "--set", "moe.top_k=9", "--run-dir", run],
        ["train", "--set", f"data.path={bad_data}/garbage.parquet", "--run-dir", run],
        ["train", "--set", f"data.path={bad_data}/latin1.txt", "--run-dir", run],
        ["train", "--set", "data.path=mydata", "--run-dir", run],
        ["train", "--run-dir", f"{bad_data}/file"],
        ["train", "--resum"],
    ]
    results = _run_all([[str(BIN / "moeforge"), *c] for c in cases], REPO)
    for result in results:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, (result.args, result.stderr)
        assert lines[0].startswith("moeforge: error: ")


@pytest.mark.slow
def test_torchrun_shows_only_the_line_and_exits_2(bad_data):
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node=2"]
    cases = [
        [*torchrun, "-m", "launch.cli", "train", "--set", "moe.top_k=9"],
        [*torchrun, "-m", "launch.cli", "train", "--set", f"data.path={bad_data}/garbage.txt"],
        # a layout the model cannot take: refused on both ranks before any collective
        [
            *torchrun,
            "-m",
            "launch.cli",
            "train",
            "--set",
            "parallel.tp=2",
            "--set",
            "parallel.ep=4",
        ],
        [
            *torchrun,
            "-m",
            "launch.cli",
            "train",
            "--set",
            "parallel.tp=2",
            "--set",
            "model.num_heads=1",
            "--set",
            "model.d_model=64",
        ],
        # a user error is not retried: the same config fails the same way
        [*torchrun, "--max-restarts=1", "-m", "launch.cli", "train", "--resum"],
    ]
    for result in _run_all(cases, REPO):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, (result.args, result.stderr)
        assert lines[0].startswith("moeforge: error: ")
