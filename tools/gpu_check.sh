#!/usr/bin/env bash
# The prepared device check (docs/gpu.md): run it cold on a fresh machine with one CUDA GPU.
#
#   tools/gpu_check.sh              # or: make gpu-check
#   tools/gpu_check.sh --dry-run    # print the plan (every command, timeout and log), run nothing
#   tools/gpu_check.sh --allow-cpu  # run the same flow without CUDA (gpu tests on the CPU,
#                                   # benches on the CPU): checks this script, not the GPU
#
# 1. setup: a venv ($VENV, default .venv-gpu) made on first use, with $TORCH_SPEC (PyPI's
#    default Linux wheel is a CUDA build) when it has no torch, then `pip install -e .[dev]`
#    when pyproject.toml changed since the last install; a second run reuses all of it.
# 2. environment: GPU, driver, torch/CUDA/cuDNN versions; no CUDA device ends the check.
# 3. gpu tests (`pytest -m gpu`), 4. `moeforge bench moe` and 5. `moeforge bench attention`
#    on CUDA, 6. a short `moeforge train` of configs/tiny.yaml whose log has an MFU line.
# Each part has a timeout (parts 2-6 together at most about 8 minutes; setup, a download of
# a few GB, has its own). Every part runs even when an earlier one failed; $OUT/summary.md
# (default gpu-check/summary.md) gets the results, and the exit status is 1 if any failed.
#
# Settings (environment): VENV, TORCH_SPEC, PYTHON (for the venv, default python3), OUT,
# STEPS (training steps, 100), TRAIN_ARGS (extra `moeforge train` arguments), GPU_TEST_ARGS
# (extra pytest arguments), BENCH_MOE_ARGS, BENCH_ATTENTION_ARGS, and the timeouts in seconds
# T_SETUP, T_ENV, T_TESTS, T_BENCH_MOE, T_BENCH_ATTENTION, T_TRAIN.
set -uo pipefail # no -e: a failed part is recorded and the next one still runs

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

VENV=${VENV:-.venv-gpu}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu-check}
STEPS=${STEPS:-100}
T_SETUP=${T_SETUP:-1200}
T_ENV=${T_ENV:-30}
T_TESTS=${T_TESTS:-180}
T_BENCH_MOE=${T_BENCH_MOE:-80}
T_BENCH_ATTENTION=${T_BENCH_ATTENTION:-80}
T_TRAIN=${T_TRAIN:-110}

DRY_RUN=0
ALLOW_CPU=0
SETUP_ONLY=0
usage() { sed -n '2,/^set /{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while (($#)); do
	case $1 in
	--dry-run) DRY_RUN=1 ;;
	--allow-cpu) ALLOW_CPU=1 ;;
	--setup-only) SETUP_ONLY=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		echo "gpu_check.sh: unknown argument '$1' (try --help)" >&2
		exit 2
		;;
	esac
	shift
done

PY=$VENV/bin/python
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/$VENV/torch_extensions}
export PYTHONUNBUFFERED=1
DEVICE=cuda
# The benches' GPU settings. moe: a size where one GPU is compute-bound (at the CPU table's
# 4096 x 512 every contender is kernel-launch bound); attention: n up to 4096 without the
# memory pass (its second run of every length would not fit the part's 80 s).
MOE_DEFAULT="--tokens 16384 --d-model 1024 --d-ff 4096 --experts 8 64 --dtypes fp32 bf16 --repeats 20"
ATTENTION_DEFAULT="--lengths 1024,2048,4096 --repeats 5 --no-memory"
if ((ALLOW_CPU)); then # the flow on a small CPU: gpu tests on the CPU, tiny benches
	DEVICE=cpu
	export MOEFORGE_TEST_DEVICE=cpu
	MOE_DEFAULT="--tokens 512 --d-model 64 --d-ff 128 --experts 8 --dtypes fp32 --repeats 2"
	ATTENTION_DEFAULT="--methods full,local,performer --lengths 128,256 --repeats 1 --no-memory"
fi
read -r -a TEST_ARGS <<<"${GPU_TEST_ARGS:-}" # extra pytest arguments, e.g. test paths
read -r -a TRAIN_EXTRA <<<"${TRAIN_ARGS:-}" # e.g. --set=train.peak_tflops=989 for a GPU not in the table
BENCH_MOE_ARGS=${BENCH_MOE_ARGS:-$MOE_DEFAULT}
BENCH_ATTENTION_ARGS=${BENCH_ATTENTION_ARGS:-$ATTENTION_DEFAULT}

# -- setup (also `tools/gpu_check.sh --setup-only`) ----------------------------------------
setup() {
	local stamp=$VENV/.gpu-check-installed
	if [[ ! -x $PY ]]; then
		echo "creating $VENV with $PYTHON"
		"$PYTHON" -m venv "$VENV" || {
			echo "cannot create $VENV: install python3-venv (apt-get install python3-venv) or set PYTHON" >&2
			return 1
		}
		echo "*" >"$VENV/.gitignore" # git status stays clean, as for .venv
	fi
	if ! "$PY" -c "import torch" 2>/dev/null; then
		echo "installing $TORCH_SPEC"
		"$PY" -m pip install --upgrade pip || return 1
		"$PY" -m pip install "$TORCH_SPEC" || return 1
	fi
	if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
		"$PY" -m pip install -e ".[dev]" || return 1
		touch "$stamp"
	fi
	"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA build', torch.version.cuda)"
}

if ((SETUP_ONLY)); then
	setup
	exit $?
fi

# -- parts ----------------------------------------------------------------------------------
NAMES=()
RESULTS=()
TIMES=()
LOGS=()
FAILED=0

# record NAME RESULT SECONDS LOG
record() {
	NAMES+=("$1")
	RESULTS+=("$2")
	TIMES+=("$3")
	LOGS+=("$4")
	[[ $2 == pass* || $2 == skip* ]] || FAILED=1
}

# part NAME TIMEOUT LOG COMMAND...: run COMMAND under TIMEOUT seconds, output to $OUT/LOG.
part() {
	local name=$1 limit=$2 log=$3
	shift 3
	if ((DRY_RUN)); then
		printf '%-18s timeout %4ss  %s  > %s\n' "$name" "$limit" "$*" "$OUT/$log"
		return 0
	fi
	echo "== $name (at most ${limit}s, log $OUT/$log)"
	local start=$SECONDS rc
	timeout --kill-after=15 "$limit" "$@" >"$OUT/$log" 2>&1
	rc=$?
	local took=$((SECONDS - start)) result=pass
	if ((rc == 124 || rc == 137)); then
		result="fail (timed out after ${limit}s)"
	elif ((rc != 0)); then
		result="fail (exit $rc)"
	fi
	echo "   $result in ${took}s"
	((rc == 0)) || tail -n 15 "$OUT/$log" | sed 's/^/   | /'
	record "$name" "$result" "$took" "$log"
	return "$rc"
}

# bench NAME TIMEOUT ARGS: a benchmark on $DEVICE (`--device cuda`, or cpu with --allow-cpu;
# without CUDA `--device cuda` exits 2 in one line, so a CPU timing cannot pass as a GPU's).
bench() {
	local name=$1 limit=$2 extra=$3 args
	read -r -a args <<<"$extra"
	part "bench $name" "$limit" "bench_$name.log" \
		"$VENV/bin/moeforge" bench "$name" "${args[@]}" --device "$DEVICE" --markdown "$OUT/bench_$name.md"
}

# check_mfu: the training run reported MFU, in its log or in metrics.jsonl (the trainer
# reports it on CUDA only); the lines go to $OUT/mfu.txt for the summary.
check_mfu() {
	{
		grep -iE "mfu[^0-9a-z]*[0-9][0-9.]*%" "$OUT/train.log" # a figure, not "no MFU: ..."
		"$PY" tools/gpu_mfu.py "$OUT/train_run"
	} >"$OUT/mfu.txt" 2>"$OUT/mfu_errors.log"
	if [[ -s $OUT/mfu.txt ]]; then
		record "train MFU" pass 0 mfu.txt
	elif ((ALLOW_CPU)); then
		record "train MFU" "skip (--allow-cpu: the trainer reports MFU on CUDA only)" 0 ""
	else
		record "train MFU" "fail (no MFU in train.log or train_run/metrics.jsonl)" 0 train.log
	fi
}

if ((DRY_RUN)); then
	echo "plan (nothing runs; output under $OUT/, exit status 1 if a part fails):"
else
	mkdir -p "$OUT"
	[[ -e $OUT/.gitignore ]] || echo "*" >"$OUT/.gitignore"
	rm -f "$OUT"/*.log "$OUT"/*.md "$OUT"/*.xml "$OUT"/*.txt
fi
CHECK_START=$SECONDS

part setup "$T_SETUP" setup.log "${BASH_SOURCE[0]}" --setup-only
SETUP_SECONDS=$((SECONDS - CHECK_START))
ENV_ARGS=()
((ALLOW_CPU)) && ENV_ARGS+=(--allow-cpu)
if part environment "$T_ENV" environment.md "$PY" tools/gpu_env.py "${ENV_ARGS[@]}" || ((DRY_RUN)); then
	part "gpu tests" "$T_TESTS" gpu_tests.log \
		"$PY" -m pytest -q -rs -p no:cacheprovider -m gpu --junitxml="$OUT/gpu_tests.xml" "${TEST_ARGS[@]}"
	bench moe "$T_BENCH_MOE" "$BENCH_MOE_ARGS"
	bench attention "$T_BENCH_ATTENTION" "$BENCH_ATTENTION_ARGS"
	TRAIN_SETS=(
		"train.steps=$STEPS" train.log_every=10 train.eval_every=0 train.eval_batches=4
		checkpoint.every=0 logging.progress=false logging.tensorboard=false
	)
	part train "$T_TRAIN" train.log "$VENV/bin/moeforge" train configs/tiny.yaml \
		--run-dir "$OUT/train_run" --fresh "${TRAIN_SETS[@]/#/--set=}" "${TRAIN_EXTRA[@]}"
	((DRY_RUN)) || check_mfu
else
	echo "no usable CUDA device (see $OUT/environment.md): the other parts are not run"
fi
((DRY_RUN)) && exit 0
CHECK_SECONDS=$((SECONDS - CHECK_START - SETUP_SECONDS))

# -- summary ------------------------------------------------------------------------------
section() { # section TITLE FILE [FALLBACK]: FILE's text under a heading
	printf '\n## %s\n\n' "$1"
	if [[ -s $2 ]]; then cat "$2"; else echo "${3:-not run}"; fi
}
{
	echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
	echo
	echo "Commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)'),"
	echo "\`tools/gpu_check.sh$( ((ALLOW_CPU)) && echo ' --allow-cpu')\`: ${CHECK_SECONDS}s after a ${SETUP_SECONDS}s setup."
	if ((FAILED)); then echo "Result: **FAIL**"; else echo "Result: **PASS**"; fi
	section Environment "$OUT/environment.md"
	printf '\n## Parts\n\n| part | result | seconds | log |\n|---|---|---:|---|\n'
	for i in "${!NAMES[@]}"; do
		echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${TIMES[$i]} | ${LOGS[$i]} |"
	done
	printf '\n## gpu tests\n\n```\n'
	grep -E "^(SKIPPED|FAILED|ERROR)|passed|failed|error|no tests ran" "$OUT/gpu_tests.log" 2>/dev/null | tail -n 40
	printf '```\n'
	section "bench moe" "$OUT/bench_moe.md"
	[[ -s $OUT/bench_moe.md ]] && printf '\n%s\n' "$(grep -m1 "^MoE layer" "$OUT/bench_moe.log")"
	section "bench attention" "$OUT/bench_attention.md"
	printf '\n## Training (configs/tiny.yaml, %s steps)\n\n```\n' "$STEPS"
	grep -iE "mfu|tokens/s|loss|precision" "$OUT/train.log" 2>/dev/null | tail -n 10
	grep "^metrics.jsonl" "$OUT/mfu.txt" 2>/dev/null
	printf '```\n'
} >"$OUT/summary.md"
echo "wrote $OUT/summary.md ($( ((FAILED)) && echo FAIL || echo PASS))"
exit "$FAILED"
