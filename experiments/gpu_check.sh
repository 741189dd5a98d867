#!/usr/bin/env bash
# The GPU checks of graphed execution in one run that cannot lose its minutes.
#
#   bash experiments/gpu_check.sh OUT            # everything, at most 7 minutes
#   bash experiments/gpu_check.sh --quick OUT    # the CUDA tests and the batch-1 28-step rows, at most 3 minutes
#
# From a plain checkout: the checkout is put on PYTHONPATH, nothing is installed. Where the
# project's wheels travel with the checkout (.whl/, from pip download ... -d .whl: docs/performance.md)
# and a module is missing, they are unpacked into $TMPDIR/catlab-site first (no network needed).
# Everything lands in OUT as it happens: one log per part (the whole pytest log among them),
# bench rows appended to OUT/bench*.jsonl as each is measured, OUT/parts.tsv (part, status,
# seconds); each part has its own time limit inside the overall one, and a part that runs out
# of time leaves what it finished. The summary (OUT/summary.md) is printed last.
# Exit status: 0 every part passed; 1 a part failed or ran out of time; 2 no CUDA device;
# 3 modules missing (named, one line each).
# For a dry run of the script itself on a CPU (its test does this): GPU_CHECK_ALLOW_CPU=1 skips the
# CUDA check and GPU_CHECK_BENCH_ARGS (e.g. "--device cpu --tiny") is added to every bench command.
set -uo pipefail
quick=0
if [[ ${1:-} == --quick ]]; then quick=1; shift; fi
if [[ $# -ne 1 || $1 == -* ]]; then
  echo "usage: bash experiments/gpu_check.sh [--quick] OUT   (OUT: the folder every result is written to)" >&2
  exit 64
fi
out=$1
py=${PYTHON:-python3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root" || exit 1
[[ ${GPU_CHECK_ALLOW_CPU:-0} == 1 ]] || "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || { echo "gpu_check.sh: no CUDA device here (torch.cuda.is_available() is false or torch is missing); the CPU checks are: python -m pytest -q" >&2; exit 2; }

mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
total=$(( quick ? 180 : 420 ))
start=$SECONDS
printf 'part\tstatus\tseconds\tlog\n' > "$out/parts.tsv"

# part NAME LIMIT CMD...: runs CMD with its output in OUT/NAME.log (and on the screen), within LIMIT
# seconds and what is left of the overall limit; records how it ended.
failed=0
part() {
  local name=$1 limit=$2; shift 2
  local left=$(( total - (SECONDS - start) - 5 ))
  if (( left < 20 )); then
    printf '%s\tskipped (no time left)\t0\t-\n' "$name" >> "$out/parts.tsv"; failed=1; return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (at most ${limit} s)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > >(tee "$out/$name.log") 2>&1
  local rc=$?
  local status=passed
  if (( rc == 124 || rc == 137 )); then status="ran out of time (${limit} s)"; failed=1
  elif (( rc != 0 )); then status="failed (exit $rc)"; failed=1; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" $(( SECONDS - t0 )) "$name.log" >> "$out/parts.tsv"
}

# 0. every module the run imports, named at once if missing (the wheels unpacked first where they are here)
if ! "$py" experiments/gpu_preflight.py > "$out/preflight.log" 2>&1; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    site=${TMPDIR:-/tmp}/catlab-site
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl >> "$out/preflight.log" 2>&1
    export PYTHONPATH="$PYTHONPATH:$site"
  fi
  if ! "$py" experiments/gpu_preflight.py > "$out/preflight.log" 2>&1; then
    cat "$out/preflight.log" >&2
    exit 3
  fi
fi
cat "$out/preflight.log"

# 1. the machine
{ "$py" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers',
diffusers.__version__, 'on', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

# 2. the CUDA tests: capture + replay equals eager for every selector, replays counted, host-sync guard on
part cuda_tests $(( quick ? 100 : 150 )) "$py" -m pytest -q -p no:cacheprovider -rs tests/test_graphs.py -k cuda \
  --junitxml "$out/cuda_tests.xml"

read -r -a extra <<< "${GPU_CHECK_BENCH_ARGS:-}"
bench=("$py" experiments/gpu_bench.py --repeats 2 "${extra[@]}")
# 3. batch 1, 28 steps, eager and graphed, both families (the rows the quick mode is for); cat's selection
#    share with its clustering on the device (the default) and with scikit-learn on the host
part bench_28 150 "${bench[@]}" --modes eager,graphed --steps 28 --batch 1 \
  --strategies cat,cat_sklearn,sequential,taylorseer,schedule --jsonl "$out/bench.jsonl"
if (( ! quick )); then
  # 4. 50 steps; 5. the wide batch (full against cat); 6. compiled inside the graphs; 7. host operators per generation
  part bench_50 120 "${bench[@]}" --modes eager,graphed --steps 50 --batch 1 --jsonl "$out/bench.jsonl"
  part bench_batch4 80 "${bench[@]}" --modes eager,graphed --steps 28 --batch 4 --strategies cat --jsonl "$out/bench.jsonl"
  part bench_compiled 120 "${bench[@]}" --modes compiled+graphed --steps 28 --batch 1 --strategies cat,schedule \
    --jsonl "$out/bench.jsonl"
  part count_ops 120 "$py" experiments/gpu_bench.py --count-ops --steps 28 "${extra[@]}" --jsonl "$out/ops.jsonl"
fi

# the summary, last: how each part ended, then every row measured
{
  echo "# gpu_check $([[ $quick == 1 ]] && echo '--quick ')($(( SECONDS - start )) s)"
  echo
  head -n 1 "$out/machine.txt"
  echo
  echo '| part | status | seconds | log |'
  echo '| --- | --- | --- | --- |'
  tail -n +2 "$out/parts.tsv" | awk -F'\t' '{print "| " $1 " | " $2 " | " $3 " | " $4 " |"}'
  echo
  "$py" experiments/gpu_bench.py --summarize "$out/bench.jsonl" 2>&1
} > "$out/summary.md"
cat "$out/summary.md"
exit $failed
