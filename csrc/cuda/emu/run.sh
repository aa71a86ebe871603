#!/bin/bash
# Builds the CPU emulation of the CUDA kernels with g++ (no GPU, no nvcc needed; the CUDA headers
# are) and runs the parity checks. Usage: csrc/cuda/emu/run.sh [all|gn|ddim|geglu|attn|mma|short|wgmma|race]
# EMU_TSAN=1 builds with ThreadSanitizer (emu.h): a race between the CUDA threads fails the run.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(dirname "$HERE")
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
FLAGS="-O2" SUFFIX=""
if [ "${EMU_TSAN:-0}" = 1 ]; then FLAGS="-O1 -g -fsanitize=thread" SUFFIX="-tsan"; fi
OUT=${LDMFAST_EMU_DIR:-${TMPDIR:-/tmp}/ldmfast-emu$SUFFIX}
mkdir -p "$OUT"
pids=()
INC="-I$HERE/include -I$CUDA_INC -I$SRC/../include -I$SRC"
# Sources under csrc/cuda (emu/wgmma_check: the emulator's own wgmma self-test).
for f in group_norm_silu group_norm_silu_rows group_norm_silu_held ddim_step geglu attention attention_mma attention_short attention_wgmma emu/wgmma_check; do
  n=$(basename "$f")
  python3 "$HERE/transform.py" "$SRC/$f.cu" "$OUT/$n.emu.cpp"
  g++ -std=c++20 $FLAGS -Wall -Wno-unknown-pragmas -include emu_prelude.h -DLDMFAST_EMU $INC -x c++ -c "$OUT/$n.emu.cpp" -o "$OUT/$n.o" &
  pids+=($!)
done
# The float64 references are not instrumented: ThreadSanitizer watches the kernels only.
g++ -std=c++20 -O2 -Wall $INC -c "$HERE/test_main.cpp" -o "$OUT/test_main.o" &
pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
g++ $FLAGS "$OUT"/*.o -o "$OUT/emu_test"
# halt_on_error: the first race ends the run with its report (and exit code 66).
TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1} "$OUT/emu_test" "${1:-all}"
