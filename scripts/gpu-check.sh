#!/usr/bin/env bash
# scripts/gpu-check.sh [OUT_DIR]: everything to run when a GPU is at hand, in one command, in
# under 10 minutes on a datacenter GPU. It:
#   1. builds (cargo build --release), or uses $WGPT_BIN / target/release/wgpt where there is no cargo;
#   2. runs the CUDA and wgpu device tests (cargo test: tests/cuda.rs, wgpu_kernels.rs, nccl.rs);
#   3. runs `wgpt verify` on the tiny fixture on cuda and on wgpu;
#   4. profiles one GPT-2 124M training step at B=4, T=1024 on cuda and on wgpu (bench --profile);
#   5. runs the matmul micro-benchmarks at GPT-2 124M's shapes;
#   6. prints one table: tokens/s, the fraction of the roofline per kernel family, and comparison
#      lines (the roofline's bound for this GPU, llm.c's published figures).
# Every command's output and JSON go to OUT_DIR (default gpu-check-out). A step that fails is
# reported and the script goes on; the exit status is non-zero if any failed.
set -u
out=${1:-gpu-check-out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
failed=()
step() { # step NAME LIMIT_S CMD...: run CMD with a time limit, output to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local t0=$SECONDS
    if timeout "$limit" "$@" >"$out/$name.log" 2>&1; then
        echo "   ok ($((SECONDS - t0)) s)"
    else
        echo "   FAILED ($((SECONDS - t0)) s, exit $?): see $out/$name.log"
        tail -n 5 "$out/$name.log" | sed 's/^/   | /'
        failed+=("$name")
    fi
}

if command -v cargo >/dev/null; then
    step build 400 cargo build --release
    wgpt=target/release/wgpt
else
    wgpt=${WGPT_BIN:-target/release/wgpt}
    echo "== no cargo here: using $wgpt, and the cargo tests are skipped"
fi
[ -x "$wgpt" ] || { echo "no wgpt binary at $wgpt"; exit 1; }
step info 60 "$wgpt" info
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/gpu.txt" 2>&1 || true

if command -v cargo >/dev/null; then
    # the device tests: CUDA on the real GPU (no emulator), wgpu on its adapter, NCCL
    step test-cuda 300 cargo test --release --test cuda -- --nocapture
    step test-wgpu 300 cargo test --release --test wgpu_kernels --test conformance -- --nocapture
    step test-nccl 120 cargo test --release --test nccl -- --nocapture
fi

tiny=(--model tests/data/tiny/model.bin --state tests/data/tiny/debug_state.bin --steps 10 --json)
step verify-cuda 120 "$wgpt" verify --backend cuda "${tiny[@]}"
step verify-wgpu 120 "$wgpt" verify --backend wgpu "${tiny[@]}"

shape=(--model d12 --batch 4 --seq-len 1024 --steps 3 --warmup 1 --json)
step profile-cuda 240 "$wgpt" bench --profile --backend cuda "${shape[@]}"
step profile-cuda-tf32 240 "$wgpt" bench --profile --backend cuda --tf32 "${shape[@]}"
step profile-wgpu 240 "$wgpt" bench --profile --backend wgpu "${shape[@]}"

# GPT-2 124M's matmuls at B·T = 4096 rows: qkv, fc, fcproj, the classifier
for be in cuda wgpu; do
    for mkn in "4096 768 2304" "4096 768 3072" "4096 3072 768" "4096 768 50304"; do
        set -- $mkn
        step "matmul-$be-$1x$2x$3" 120 "$wgpt" bench --backend "$be" --kernel matmul --m "$1" --k "$2" --n "$3" --json
    done
done

gpu=$(head -n 1 "$out/gpu.txt" 2>/dev/null | cut -d, -f1)
step plan 60 "$wgpt" plan --model d12 --batch 4 --seq-len 1024 --roofline "${gpu:-h200}" --json
step plan-tf32 60 "$wgpt" plan --model d12 --batch 4 --seq-len 1024 --roofline "${gpu:-h200}" --tf32 --json

echo
echo "== summary ($(date -u +%F), GPU: ${gpu:-unknown})"
if command -v python3 >/dev/null; then
    python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
def last_json(name):
    try:
        lines = [l for l in open(os.path.join(out, name + ".log")) if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None
print(f"{'run':<22} {'tokens/s':>10} {'step ms':>9} {'bound ms':>9}  roofline fraction per family")
for name in ["profile-cuda", "profile-cuda-tf32", "profile-wgpu"]:
    r = last_json(name)
    if not r:
        print(f"{name:<22} {'(failed)':>10}")
        continue
    fams = " ".join(f"{f['family']} {100 * f['roofline_fraction']:.0f}%" for f in r["families"][:6])
    print(f"{name:<22} {r['tokens_per_s']:>10.0f} {r['step_ms']:>9.1f} {r['bound_ms']:>9.1f}  {fams}")
for name in sorted(n[:-4] for n in os.listdir(out) if n.startswith("matmul-")):
    r = last_json(name)
    print(f"{name:<22} " + (f"{r.get('gflops', r.get('tflops', 0) * 1e3):>10.0f} GFLOP/s" if r else "(failed)"))
for name, what in [("plan", "fp32"), ("plan-tf32", "TF32 matmuls")]:
    p = last_json(name)
    if p and p.get("roofline"):
        rf = p["roofline"]
        print(f"roofline bound ({what}) on {rf['peaks']['name']}: {rf['bound_ms']:.1f} ms/step = at most {rf['tokens_per_s']:.0f} tokens/s")
print("llm.c, published: train_gpt2_fp32.cu (TF32 matmuls) about 52-56K tokens/s on an A100 at B=4, T=1024")
print("targets (issue 12): wgpu f32 matmul >= 40% of the f32 peak; the wgpu step >= llm.c's fp32 tokens/s; CUDA >= 1.2x that")
EOF
else
    grep -h "tokens/s" "$out"/profile-*.log
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
