#!/usr/bin/env bash
# The whole GPU benchmark run, sized for one 10-minute call: the attention sweep
# (--quick), decode, plots, and the short tables printed last.
#
#   bash bench/run_all.sh OUT_DIR            (from anywhere; OUT_DIR defaults to bench/out)
#   bash bench/run_all.sh OUT_DIR --smoke    (the same steps on tiny shapes: a CPU check)
#
# Each step has its own time limit, so a hang in one keeps the results of the
# others; each benchmark also stops starting new cases at its own budget. Rows
# are written as they come (OUT_DIR/*.jsonl), logs to OUT_DIR/*.log. Worst case
# 400 + 130 + 15 + 30 = 575 s; expected about 7-8 minutes, the attention step
# ending near its budget (cases past it are written as skipped, least telling last).
set -u

out="${1:-bench/out}"
mode="${2:---quick}"
case "$mode" in
    --quick) decode_args=() ;;
    --smoke) decode_args=(--smoke) ;;
    *) echo "usage: $0 [OUT_DIR] [--quick|--smoke]" >&2; exit 2 ;;
esac
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."

py="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
# the autotuner's choices and timings come back with the rows
export ATTN_COMPILER_CACHE_DIR="${ATTN_COMPILER_CACHE_DIR:-$out/attn_compiler_cache}"

# step NAME LIMIT_S COMMAND...: run with a time limit, output to OUT_DIR/NAME.log
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s$([ "$rc" -eq 124 ] && echo ", killed at its $limit s limit")"
    if [ "$rc" -ne 0 ]; then
        tail -n 15 "$out/$name.log"
    fi
}

"$py" - <<'EOF' | tee "$out/environment.txt"
import torch, triton
print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}; "
      f"torch {torch.__version__}; triton {triton.__version__}")
EOF

step attention 400 "$py" bench/bench_attention.py "$mode" --budget-s 340 --out "$out"
step decode 130 "$py" bench/bench_decode.py ${decode_args[@]+"${decode_args[@]}"} --budget-s 100 --out "$out"
step autotune_report 15 "$py" -m attn_compiler report
step plot 30 "$py" bench/plot.py "$out"
cat "$out/plot.log"
