#!/usr/bin/env bash
# Run on the lent GPU machine (through the device tool) from the repo root, with .whl carried
# (see ../shared/GPU.md):
#   bash scripts/gpu_check.sh [STAGE ...]     STAGE: build test sass sanitize bench throughput, or all
# A device command may run 10 minutes, so a session takes the stages in a few calls, e.g.
#   1. build test sass       (build for sm_90a, pytest -m cuda: each attention kernel apart, then the
#                            rest; HMMA count of the attention kernels)
#   2. sanitize              (compute-sanitizer memcheck, racecheck, synccheck on the kernel tests)
#   3. bench                 (benchmarks/bench_ops_cuda.py: every kernel beside its peers)
#   4. throughput            (benchmarks/throughput.py: SD-1.5 at 512x512, fp16)
# Every stage builds first if csrc/ changed since the last build (the machine keeps the build
# while it stays warm). Each stage has its own time limit (STAGE_TIMEOUT, default 540 s), so a
# stage that runs long still leaves its logs and results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/ldmfast-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
limit=${STAGE_TIMEOUT:-540}
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
export LDMFAST_CUDA=1 LDMFAST_CUDA_ARCHS=${LDMFAST_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16}

build() {
  local so
  so=$(ls ldmfast/_C_cuda*.so 2>/dev/null | head -1)
  if [ -n "$so" ] && [ -z "$(find csrc setup.py CMakeLists.txt -newer "$so" -type f | head -1)" ]; then
    echo "== build: up to date"; return 0
  fi
  echo "== build"
  local t0=$SECONDS
  if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -50 "$OUT/build.log"; return 1
  fi
  echo "built in $((SECONDS - t0)) s"
  python3 -c "import ldmfast.ops as o; assert o.cuda_available(), 'CUDA kernels not loaded'; print('cuda ops loaded')"
}

stage_test() {
  # Each attention kernel in a process of its own with a short limit, so a kernel that hangs costs
  # KERNEL_TIMEOUT seconds and names itself (-v writes each test's id as it starts) instead of
  # taking the whole stage; then every other CUDA test in one run.
  local t0=$SECONDS kt=${KERNEL_TIMEOUT:-60} kernels k rc log
  kernels=$(python3 -m pytest --collect-only -q tests/test_attention.py -k test_cuda_kernel_choice 2>/dev/null \
    | sed -n 's/.*test_cuda_kernel_choice\[\([a-z0-9_]*\)-.*/\1/p' | uniq)
  echo "== pytest -m cuda: each attention kernel (limit ${kt} s each)"
  for k in $kernels; do
    log="$OUT/pytest_cuda_$k.log"
    timeout -k 10 "$kt" python3 -m pytest -v -m cuda tests/test_attention.py -k "test_cuda_kernel_choice and [$k-" > "$log" 2>&1
    rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      printf "  %-24s HANG or too slow: killed after %s s; running: %s\n" "$k" "$kt" \
        "$(grep -o 'test_cuda_kernel_choice[a-z_]*\[[^]]*\]' "$log" | tail -1)"
    else
      printf "  %-24s %s\n" "$k" "$(tail -1 "$log" | tr -d '=')"
      grep -E "^(FAILED|ERROR)" "$log" | head -5 | sed 's/^/      /'
    fi
  done
  echo "== pytest -m cuda: the rest"
  timeout -k 10 $((limit - (SECONDS - t0) > 60 ? limit - (SECONDS - t0) : 60)) \
    python3 -m pytest -v -m cuda tests -k "not test_cuda_kernel_choice[ and not test_cuda_kernel_choice_nonpositive_scale[" \
    > "$OUT/pytest_cuda.log" 2>&1
  rc=$?
  echo "pytest exit code $rc"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "time limit; the test running then: $(grep -o 'tests/[^ ]*::[^ ]*' "$OUT/pytest_cuda.log" | tail -1)"
  fi
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_cuda.log" | head -30; tail -1 "$OUT/pytest_cuda.log"
}

stage_sass() {
  echo "== SASS: tensor-core (HMMA, HGMMA) instructions in the attention kernels"
  local so cuobjdump
  so=$(ls ldmfast/_C_cuda*.so 2>/dev/null | head -1)
  cuobjdump=$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)
  if [ -z "$so" ] || [ ! -x "$cuobjdump" ]; then echo "no _C_cuda library or cuobjdump found"; return 0; fi
  "$cuobjdump" -sass "$so" > "$OUT/sass.txt" 2>&1
  # Per kernel function (mangled name): count of HMMA (mma.sync) and HGMMA (wgmma) lines; the mma
  # and short kernels need HMMA, the wgmma kernel HGMMA.
  awk '/Function :/ {f = $3; n[f] += 0; g[f] += 0} /HMMA/ {n[f]++} /HGMMA/ {g[f]++}
       END {for (k in n) print n[k], g[k], k}' "$OUT/sass.txt" \
    | grep -E "attention_(mma|short|simt|wgmma)_kernel" | sort -k3 > "$OUT/sass_hmma.txt"
  awk '{split($3, a, "attention_"); sub(/_kernel.*/, "", a[2]); c[a[2]] += ($1 > 0); w[a[2]] += ($2 > 0); t[a[2]]++}
       END {for (k in t) printf "  %-6s %d of %d instantiations use HMMA, %d HGMMA\n", k, c[k], t[k], w[k]}' "$OUT/sass_hmma.txt"
}

stage_sanitize() {
  local cs
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [ ! -x "$cs" ]; then echo "compute-sanitizer not found"; return 0; fi
  # synccheck: barriers reached by only part of a block, and invalid warp-sync masks.
  # SANITIZE_TOOLS=memcheck gives one tool the whole stage limit.
  local tools=(${SANITIZE_TOOLS:-memcheck racecheck synccheck})
  for tool in "${tools[@]}"; do
    echo "== compute-sanitizer $tool"
    # Big CUDA cases are skipped under the sanitizer (tests/conftest.py); the limit is shared.
    LDMFAST_SANITIZER_SHAPES=1 timeout $((limit / ${#tools[@]})) "$cs" --tool "$tool" --error-exitcode 9 \
      python3 -m pytest -q -x -m cuda tests/test_group_norm_silu.py tests/test_attention.py tests/test_ddim_step.py \
      > "$OUT/sanitizer_$tool.log" 2>&1
    echo "$tool exit code $? (124: time limit; log: sanitizer_$tool.log)"; tail -3 "$OUT/sanitizer_$tool.log"
  done
}

stage_bench() {
  for b in benchmarks/bench_*_cuda.py; do
    echo "== $b"
    local csv="$OUT/$(basename "$b" .py).csv" rc
    timeout "$limit" python3 "$b" --csv "$csv" > "$OUT/$(basename "$b" .py).log" 2>&1
    rc=$?
    echo "exit code $rc"; tail -60 "$OUT/$(basename "$b" .py).log"
    # Cut by the time limit: the targets on what it measured (a finished run prints them last).
    if [ "$rc" = 124 ] && [ -s "$csv" ]; then python3 "$b" --judge "$csv"; fi
  done
}

stage_throughput() {
  echo "== benchmarks/throughput.py"
  timeout "$limit" python3 benchmarks/throughput.py --csv "$OUT/throughput.csv" > "$OUT/throughput.log" 2>&1
  echo "exit code $?"; tail -40 "$OUT/throughput.log"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] || [ "${stages[0]}" = all ] && stages=(build test sass sanitize bench throughput)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
build || exit 1
for s in "${stages[@]}"; do
  case "$s" in
    build) ;;
    test|sass|sanitize|bench|throughput) t0=$SECONDS; "stage_$s"; echo "($s: $((SECONDS - t0)) s)" ;;
    *) echo "unknown stage '$s' (build test sass sanitize bench throughput all)"; exit 2 ;;
  esac
done
