#!/usr/bin/env bash
# Run on the lent GPU machine (through the device tool) from the repo root:
#   bash scripts/gpu_check.sh            (with .whl carried: see ../shared/GPU.md)
# Builds ldmfast with its CUDA kernels for sm_90a, runs the CUDA tests, compute-sanitizer on the
# kernel tests and the kernel benchmarks; logs and results go under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/ldmfast-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export LDMFAST_CUDA=1 LDMFAST_CUDA_ARCHS=${LDMFAST_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
echo "== build"
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -50 "$OUT/build.log"; exit 1
fi
python3 -c "import ldmfast.ops as o; assert o.cuda_available(), 'CUDA kernels not loaded'; print('cuda ops loaded')"
echo "== pytest -m cuda"
python3 -m pytest -q -m cuda tests 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25
if command -v compute-sanitizer >/dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool"
    LDMFAST_SANITIZER_SHAPES=1 "$cs" --tool "$tool" --error-exitcode 9 \
      python3 -m pytest -q -x -m cuda tests/test_group_norm_silu.py tests/test_attention.py tests/test_ddim_step.py \
      > "$OUT/sanitizer_$tool.log" 2>&1
    echo "$tool exit code $? (log: sanitizer_$tool.log)"; tail -3 "$OUT/sanitizer_$tool.log"
  done
fi
echo "== SASS: tensor-core (HMMA) instructions in the attention kernels"
so=$(ls ldmfast/_C_cuda*.so 2>/dev/null | head -1)
cuobjdump=$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)
if [ -n "$so" ] && [ -x "$cuobjdump" ]; then
  "$cuobjdump" -sass "$so" > "$OUT/sass.txt" 2>&1
  # Per kernel function: count of HMMA lines; the mma and short kernels must have some.
  awk '/Function :/ {f = $3; n[f] += 0} /HMMA/ {n[f]++} END {for (k in n) print n[k], k}' "$OUT/sass.txt" \
    | grep -E "attention_(mma|short|simt)_kernel" | sort -k2 > "$OUT/sass_hmma.txt"
  awk '{split($2, a, "attention_"); sub(/_kernel.*/, "", a[2]); c[a[2]] += ($1 > 0); t[a[2]]++}
       END {for (k in t) printf "  %-6s %d of %d instantiations use HMMA\n", k, c[k], t[k]}' "$OUT/sass_hmma.txt"
else
  echo "no _C_cuda library or cuobjdump found"
fi
for b in benchmarks/bench_*_cuda.py; do
  [ -e "$b" ] || continue
  echo "== $b"
  python3 "$b" --csv "$OUT/$(basename "$b" .py).csv" 2>&1 | tee "$OUT/$(basename "$b" .py).log" | tail -40
done
