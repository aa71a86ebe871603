#!/usr/bin/env bash
# Run on the lent GPU machine (through the device tool) from the repo root, with .whl carried
# (see ../shared/GPU.md):
#   bash scripts/gpu_check.sh [STAGE ...]     STAGE: build test sass sanitize bench throughput breakdown
#                                             profile, or all (every stage but profile)
# A device command may run 10 minutes, so a session takes the stages in a few calls, e.g.
#   1. build test sass       (build for sm_90a, pytest -m cuda: each attention kernel apart, then the
#                            rest; HMMA count of the attention kernels)
#   2. sanitize              (compute-sanitizer memcheck, racecheck, synccheck on the kernel tests)
#   3. bench                 (benchmarks/bench_ops_cuda.py: every kernel beside its peers)
#   4. throughput            (benchmarks/throughput.py: SD-1.5 at 512x512, fp16)
#      breakdown             (benchmarks/profile_step.py: the U-Net step's and the decode's kernel
#                            time by kind of work and the largest kernels)
#   5. profile               (ncu on the targets' kernels and their peers: benchmarks/profile_kernels.py,
#                            one ncu per op group of PROFILE_OPS, default "attn gn ddim,geglu")
# BENCH_ARGS, THROUGHPUT_ARGS, BREAKDOWN_ARGS and PROFILE_ARGS pass options on (e.g. BENCH_ARGS="--ops attn --dtypes
# fp16", PROFILE_OPS=attn PROFILE_ARGS=--variants).
#
# What comes back: the device tool returns at most 8 files from $OUT, so the script leaves five:
#   console.txt     everything printed here
#   logs.tar.gz     every log (repacked after each stage, so a killed call keeps the finished ones)
#   build.tar.gz    the built extension and its source stamp, when this call built it
#   bench_ops_cuda.csv, throughput.csv   results
# Put build.tar.gz in .gpu_build/ here and carry it (carry: [".whl", ".gpu_build"]): a fresh
# machine then skips the build while csrc/, setup.py, CMakeLists.txt, torch and nvcc are the same.
#
# The commit: the device's copy of the tree carries the .git of the session's start, so pass
# LDMFAST_GIT_SHA=<the commit of a clean tree> for the results' git_sha column.
#
# Time: the tool kills a command at its limit, and then nothing more is written, so the whole
# script keeps to DEADLINE seconds (default 570) and every stage's time limit (STAGE_TIMEOUT,
# default 540 s) is cut to what is left.
set -uo pipefail
OUT=${OUT:-/tmp/ldmfast-gpu}
mkdir -p "$OUT"
LOGS=$(mktemp -d /tmp/ldmfast-logs.XXXXXX)
export PYTHONUNBUFFERED=1
start=$SECONDS
deadline=${DEADLINE:-570}
limit=${STAGE_TIMEOUT:-540}
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
# The repo root first: with a carried build there is no editable install to find the package.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
export LDMFAST_CUDA=1 LDMFAST_CUDA_ARCHS=${LDMFAST_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16}

# Seconds a step may take: at most $1, and no more than is left before the deadline (less 15 s
# to pack the logs).
budget() {
  local left=$((deadline - (SECONDS - start) - 15))
  [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"
}

pack() {
  tar -czf "$OUT/logs.tar.tmp" -C "$LOGS" . && mv "$OUT/logs.tar.tmp" "$OUT/logs.tar.gz"
}

# What the extension is built from: its sources, the torch and nvcc it builds against, the archs.
source_stamp() {
  local nvcc
  nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  {
    python3 -c "import sys, torch; print(sys.version, torch.__version__, torch.version.cuda)"
    "$nvcc" --version | tail -2
    echo "$LDMFAST_CUDA_ARCHS"
    find csrc setup.py CMakeLists.txt -type f ! -path 'csrc/cuda/emu/*' | LC_ALL=C sort | xargs sha256sum
  } | sha256sum | cut -c1-16
}

# Whether the library $1 links libstdc++ as a shared library: the op libraries throw exceptions
# that torch catches, which needs the one runtime torch uses. The GPU image's CXX (/opt/gcc) links
# it statically, and the first error raised from _C_cuda then crashed the process.
shares_libstdcxx() {
  readelf -d "$1" 2>/dev/null | grep -q 'NEEDED.*libstdc++'
}

# A C++ compiler whose shared libraries pass shares_libstdcxx.
pick_cxx() {
  local d c
  d=$(mktemp -d)
  printf '#include <stdexcept>\nvoid f() { throw std::runtime_error("x"); }\n' > "$d/t.cpp"
  for c in ${CXX:-} c++ g++ /usr/bin/g++; do
    command -v "$c" > /dev/null || continue
    if "$c" -shared -fPIC "$d/t.cpp" -o "$d/t.so" 2> /dev/null && shares_libstdcxx "$d/t.so"; then
      [ -z "${CXX:-}" ] || [ "$c" = "$CXX" ] || echo "(CXX='$CXX' does not link the shared libstdc++; building with $c)" >&2
      rm -rf "$d"; echo "$c"; return 0
    fi
  done
  rm -rf "$d"; echo "${CXX:-c++}"
}

build() {
  local want so
  want=$(source_stamp)
  so=$(ls ldmfast/_C_cuda*.so 2>/dev/null | head -1)
  if [ -n "$so" ] && [ "$(cat ldmfast/.build_stamp 2>/dev/null)" = "$want" ]; then
    echo "== build: up to date ($want)"
  elif [ -f .gpu_build/build.tar.gz ] && [ "$(tar -xzOf .gpu_build/build.tar.gz ldmfast/.build_stamp 2>/dev/null)" = "$want" ]; then
    tar -xzf .gpu_build/build.tar.gz && echo "== build: the carried .gpu_build/build.tar.gz ($want)"
  else
    echo "== build ($want)"
    local t0=$SECONDS
    export CXX CUDAHOSTCXX
    CXX=$(pick_cxx)
    CUDAHOSTCXX=${CUDAHOSTCXX:-$CXX}  # nvcc's host compiler; CMake takes its -L dirs into the link
    if ! timeout "$(budget 480)" python3 -m pip install --no-build-isolation --no-deps -e . > "$LOGS/build.log" 2>&1; then
      tail -50 "$LOGS/build.log"; return 1
    fi
    echo "built in $((SECONDS - t0)) s"
    echo "$want" > ldmfast/.build_stamp
    tar -czf "$OUT/build.tar.gz" ldmfast/_C*.so ldmfast/.build_stamp
  fi
  python3 -c "import ldmfast.ops as o; assert o.cuda_available(), 'CUDA kernels not loaded'; print('cuda ops loaded')"
  local lib
  for lib in ldmfast/_C.so ldmfast/_C_cuda.so; do
    shares_libstdcxx "$lib" || { echo "$lib does not link the shared libstdc++ (LDFLAGS='${LDFLAGS:-}')"; return 1; }
  done
}

stage_test() {
  # Each attention kernel in a process of its own with a time limit, all at once, so a kernel that
  # hangs costs KERNEL_TIMEOUT seconds and names itself (-v writes each test's id as it starts)
  # instead of taking the whole stage; then every other CUDA test in one run.
  local kt kernels k rc log
  kt=$(budget "${KERNEL_TIMEOUT:-150}")
  kernels=""
  [ "${KERNEL_TESTS:-1}" = 0 ] || kernels=$(python3 -m pytest --collect-only -q tests/test_attention.py -k test_cuda_kernel_choice 2>/dev/null \
    | sed -n 's/.*test_cuda_kernel_choice\[\([a-z0-9_]*\)-.*/\1/p' | uniq)
  echo "== pytest -m cuda: each attention kernel, side by side (limit ${kt} s each)"
  for k in $kernels; do
    ( timeout -k 10 "$kt" python3 -m pytest -v -m cuda tests/test_attention.py -k "test_cuda_kernel_choice and [$k-" \
        > "$LOGS/pytest_cuda_$k.log" 2>&1
      echo $? > "$LOGS/pytest_cuda_$k.rc" ) &
  done
  wait
  for k in $kernels; do
    log="$LOGS/pytest_cuda_$k.log"; rc=$(cat "$LOGS/pytest_cuda_$k.rc")
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      printf "  %-24s HANG or too slow: killed after %s s; running: %s\n" "$k" "$kt" \
        "$(grep -o 'test_cuda_kernel_choice[a-z_]*\[[^]]*\]' "$log" | tail -1)"
    else
      printf "  %-24s %s\n" "$k" "$(tail -1 "$log" | tr -d '=')"
      grep -E "^(FAILED|ERROR)" "$log" | head -5 | sed 's/^/      /'
    fi
  done
  pack
  echo "== pytest -m cuda: the rest"
  # A test that crashes the process (a signal) is named, deselected, and the run goes on from the
  # start without it (up to 3 crashes); -p no:cacheprovider keeps the runs from reordering.
  local deselect=() crashed n=0
  while :; do
    log="$LOGS/pytest_cuda${n/#0/}.log"
    timeout -k 10 "$(budget "$limit")" python3 -m pytest -v -p no:cacheprovider -m cuda tests \
      -k "not test_cuda_kernel_choice[ and not test_cuda_kernel_choice_nonpositive_scale[" "${deselect[@]}" \
      > "$log" 2>&1
    rc=$?
    echo "pytest exit code $rc"
    [ "$rc" -gt 128 ] && [ "$rc" != 137 ] || break
    # After pytest's summary line the crash is at exit, not in a test: nothing to deselect.
    if grep -qE "^=+ .*(passed|failed|error).* in [0-9.]+s" "$log"; then echo "crashed at exit (signal $((rc - 128)))"; break; fi
    crashed=$(grep -o '^tests/[^ ]*::[^ ]*' "$log" | tail -1)
    echo "CRASHED (signal $((rc - 128))): $crashed"
    n=$((n + 1))
    [ -n "$crashed" ] && [ "$n" -le 3 ] && [ $((deadline - (SECONDS - start))) -gt 60 ] || break
    deselect+=(--deselect "$crashed")
  done
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "time limit; the test running then: $(grep -o 'tests/[^ ]*::[^ ]*' "$log" | tail -1)"
  fi
  grep -E "^(FAILED|ERROR)" "$log" | head -30; tail -1 "$log"
}

stage_sass() {
  echo "== SASS: tensor-core (HMMA, HGMMA) instructions in the attention kernels"
  local so cuobjdump
  so=$(ls ldmfast/_C_cuda*.so 2>/dev/null | head -1)
  cuobjdump=$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)
  if [ -z "$so" ] || [ ! -x "$cuobjdump" ]; then echo "no _C_cuda library or cuobjdump found"; return 0; fi
  # The whole listing stays on the machine (tens of MB); the per-kernel counts go in the logs.
  "$cuobjdump" -sass "$so" > /tmp/ldmfast-sass.txt 2>&1
  # Per kernel function (mangled name): count of HMMA (mma.sync) and HGMMA (wgmma) lines; the mma
  # and short kernels need HMMA, the wgmma kernel HGMMA.
  awk '/Function :/ {f = $3; n[f] += 0; g[f] += 0} /HMMA/ {n[f]++} /HGMMA/ {g[f]++}
       END {for (k in n) print n[k], g[k], k}' /tmp/ldmfast-sass.txt \
    | grep -E "attention_(mma|short|simt|wgmma)_kernel" | sort -k3 > "$LOGS/sass_hmma.txt"
  awk '{split($3, a, "attention_"); sub(/_kernel.*/, "", a[2]); c[a[2]] += ($1 > 0); w[a[2]] += ($2 > 0); t[a[2]]++}
       END {for (k in t) printf "  %-6s %d of %d instantiations use HMMA, %d HGMMA\n", k, c[k], t[k], w[k]}' "$LOGS/sass_hmma.txt"
}

stage_sanitize() {
  local cs tool t f name
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [ ! -x "$cs" ]; then echo "compute-sanitizer not found"; return 0; fi
  # memcheck, racecheck and synccheck (barriers reached by part of a block, bad warp-sync masks),
  # each tool on each kernel's test file in a process of its own, all side by side (one process
  # per tool ran out of 200 s at 60-80%); big CUDA cases are skipped under the sanitizer
  # (tests/conftest.py).
  local tools=(${SANITIZE_TOOLS:-memcheck racecheck synccheck})
  local files=(tests/test_group_norm_silu.py tests/test_attention.py tests/test_ddim_step.py tests/test_geglu.py)
  # Where the tool filters kernels by name, only ldmfast's are checked: the tests' references
  # run torch's kernels, which would otherwise take most of the time. No -x: a failing test must
  # not keep the tool from the tests after it.
  local filter=()
  "$cs" --help 2>/dev/null | grep -q -- "--kernel-name " && filter=(--kernel-name kns=ldmfast)
  t=$(budget "$limit")
  echo "== compute-sanitizer ${tools[*]} x ${#files[@]} test files, side by side (limit $t s each; ${filter[*]:-every kernel})"
  for tool in "${tools[@]}"; do
    for f in "${files[@]}"; do
      name=sanitizer_${tool}_$(basename "$f" .py)
      ( LDMFAST_SANITIZER_SHAPES=1 timeout -k 10 "$t" "$cs" --tool "$tool" "${filter[@]}" --error-exitcode 9 \
          python3 -m pytest -q -m cuda "$f" > "$LOGS/$name.log" 2>&1
        echo $? > "$LOGS/$name.rc" ) &
    done
  done
  wait
  echo "exit codes (0: clean and passed, 1: a test failed, 9: the tool found errors, 124: time limit):"
  for tool in "${tools[@]}"; do
    for f in "${files[@]}"; do
      name=sanitizer_${tool}_$(basename "$f" .py)
      printf "  %-10s %-28s %s  %s\n" "$tool" "$(basename "$f")" "$(cat "$LOGS/$name.rc")" \
        "$(grep -E "ERROR SUMMARY|passed|failed" "$LOGS/$name.log" | tail -2 | tr '\n' ' ')"
    done
  done
}

stage_bench() {
  local b name csv rc
  for b in benchmarks/bench_*_cuda.py; do
    name=$(basename "$b" .py); csv="$OUT/$name.csv"
    echo "== $b"
    timeout "$(budget "$limit")" python3 "$b" --csv "$csv" ${BENCH_ARGS:-} > "$LOGS/$name.log" 2>&1
    rc=$?
    echo "exit code $rc"; tail -60 "$LOGS/$name.log"
    # Cut by the time limit: the targets on what it measured (a finished run prints them last).
    if [ "$rc" = 124 ] && [ -s "$csv" ]; then python3 "$b" --judge "$csv"; fi
  done
}

stage_throughput() {
  echo "== benchmarks/throughput.py"
  timeout "$(budget "$limit")" python3 benchmarks/throughput.py --csv "$OUT/throughput.csv" ${THROUGHPUT_ARGS:-} \
    > "$LOGS/throughput.log" 2>&1
  echo "exit code $?"; tail -40 "$LOGS/throughput.log"
}

stage_breakdown() {
  echo "== benchmarks/profile_step.py"
  timeout "$(budget "$limit")" python3 benchmarks/profile_step.py ${BREAKDOWN_ARGS:-} > "$LOGS/profile_step.log" 2>&1
  echo "exit code $?"; grep -v "^USDT\|profiler_st" "$LOGS/profile_step.log" | tail -80
}

stage_profile() {
  # Nsight Compute on the issue targets' kernels, each beside its peer (benchmarks/profile_kernels.py
  # marks the profiled range, so warm-up calls are not profiled); clocks left as they are
  # (METHOD.md). ncu prints its details page when the program ends, so each op runs under an ncu
  # of its own: a time limit loses one op's report, not all. One line per kernel here, the full
  # details in the logs; the case lines (printed by the profiled run) give the kernels' order.
  local ncu t ops
  ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  if [ ! -x "$ncu" ]; then echo "ncu not found"; return 0; fi
  for ops in ${PROFILE_OPS:-attn gn ddim,geglu}; do
    t=$(budget "$limit")
    echo "== ncu: benchmarks/profile_kernels.py --cases $ops ${PROFILE_ARGS:-} (limit $t s)"
    timeout -k 10 "$t" "$ncu" --profile-from-start off --clock-control none --target-processes all \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      --section ComputeWorkloadAnalysis --section WarpStateStats --csv --page details \
      --log-file "$LOGS/ncu_$ops.csv" python3 benchmarks/profile_kernels.py --cases "$ops" ${PROFILE_ARGS:-} \
      > "$LOGS/profile_$ops.log" 2>&1
    echo "ncu exit code $? (124: time limit)"
    grep "^case " "$LOGS/profile_$ops.log"; grep -v "^case " "$LOGS/profile_$ops.log" | tail -3
    python3 benchmarks/profile_kernels.py --summarize "$LOGS/ncu_$ops.csv" || head -20 "$LOGS/ncu_$ops.csv"
    pack
  done
}

main() {
  local stages=("$@") s t0
  [ ${#stages[@]} -eq 0 ] || [ "${stages[0]}" = all ] && stages=(build test sass sanitize bench throughput breakdown)
  [ "${stages[0]:-}" = stamp ] && { source_stamp; return 0; }  # what a carried build must match
  for s in "${stages[@]}"; do
    case "$s" in
      build|test|sass|sanitize|bench|throughput|breakdown|profile) ;;
      *) echo "unknown stage '$s' (build test sass sanitize bench throughput breakdown profile all)"; return 2 ;;
    esac
  done
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "(nvidia-smi failed)"
  [ -n "${LDMFAST_GIT_SHA:-}" ] || echo "(LDMFAST_GIT_SHA not set: the results name the commit git finds here)"
  build || { pack; return 1; }
  pack
  for s in "${stages[@]}"; do
    [ "$s" = build ] && continue
    if [ $((deadline - (SECONDS - start))) -lt 30 ]; then echo "(deadline: stage $s not started)"; continue; fi
    t0=$SECONDS; "stage_$s"; echo "($s: $((SECONDS - t0)) s)"
    pack
  done
  echo "(all: $((SECONDS - start)) s)"
}

main "$@" 2>&1 | tee "$OUT/console.txt"
exit "${PIPESTATUS[0]}"
