#!/bin/bash
# Builds the CPU emulation of the CUDA kernels with g++ (no GPU, no nvcc needed; the CUDA headers
# are) and runs the parity checks. Usage: csrc/cuda/emu/run.sh [all|gn|ddim|attn|mma|short]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(dirname "$HERE")
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
OUT=${LDMFAST_EMU_DIR:-${TMPDIR:-/tmp}/ldmfast-emu}
mkdir -p "$OUT"
pids=()
INC="-I$HERE/include -I$CUDA_INC -I$SRC/../include -I$SRC"
for f in group_norm_silu group_norm_silu_rows ddim_step attention attention_mma attention_short; do
  python3 "$HERE/transform.py" "$SRC/$f.cu" "$OUT/$f.emu.cpp"
  g++ -std=c++20 -O2 -Wall -Wno-unknown-pragmas -include emu_prelude.h -DLDMFAST_EMU $INC -x c++ -c "$OUT/$f.emu.cpp" -o "$OUT/$f.o" &
  pids+=($!)
done
g++ -std=c++20 -O2 -Wall $INC -c "$HERE/test_main.cpp" -o "$OUT/test_main.o" &
pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
g++ "$OUT"/*.o -o "$OUT/emu_test" -lpthread
"$OUT/emu_test" "${1:-all}"
