// Self-test of the emulator's wgmma (include/emu_wgmma.h), transformed and built like the kernels
// (run.sh). One or two warpgroups stage A (64 x K) and B (K x N) in shared memory in CUTLASS's
// no-swizzle canonical layouts (cute/atom/mma_traits_sm90_gmma.hpp, make_gmma_desc; T = 8
// elements of 16 bits):
//   K-major  ((8,m),(T,2)):((1T,SBO),(1,LBO))     A, and B of the SS form (B stored n-major rows of k);
//   MN-major ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)) B of the RS form (stored k rows of n);
// with the 8 x 8 core matrices ordered k-first or rows-first and padded, so LBO != SBO and a
// decode that swapped them reads the NaN padding. The RS form takes A from registers in the
// ALayout_64x16 fragment. K / 16 k-steps of m64nNk16 later, D is compared with a float64 matmul.
// emu_wgmma_check() returns the number of failed cases.
//
// By hand, not in CI: EMU_WGMMA_MUTATE=<name> breaks the kernel in one way, and the run must fail
// (checks or an emulator abort): early_read (d stored before the wait), no_wait, no_commit,
// no_fence, overwrite (B zeroed, with a barrier, between issue and wait), warp_desc (each warp
// points A's descriptor at its own rows), swap (LBO and SBO exchanged); and two that only
// ThreadSanitizer reports (EMU_TSAN=1): no_barrier (staging not ordered before the issue), reuse
// (B rewritten after the wait with no barrier, while other warps may still be reading it).
// no_proxy_fence (staging not followed by fence.proxy.async: the emulator aborts) runs in CI
// (tests/test_cuda_emulator.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "wgmma.cuh"

namespace {
using namespace ldmfast::cuda::detail;

enum Mutation { kNone, kEarlyRead, kNoWait, kNoCommit, kNoFence, kOverwrite, kNoBarrier, kWarpDesc, kSwap, kReuse, kNoProxyFence };
enum Mode { kPlain, kGroups, kStepWait };  // see the kernel

// A (rows x K) operand tile in shared memory: element (r, k) at `base` + (r / 8) sbo + (k / 8) lbo
// + its place in the 8 x 8 core matrix (K-major: row r % 8 of 16 bytes; MN-major: k-row k % 8).
struct Tile {
  uint32_t base, lbo, sbo;
  bool mn;
  __host__ __device__ uint32_t at(int r, int k) const {
    const uint32_t core = mn ? (r % 8) * 2 + (k % 8) * 16 : (r % 8) * 16 + (k % 8) * 2;
    return base + (r / 8) * sbo + (k / 8) * lbo + core;
  }
};
// Core matrices k-first (LBO 128) or rows-first (SBO 128), `pad` bytes after each run of them.
Tile make_tile(uint32_t base, int rows, int K, bool mn, bool kfirst, uint32_t pad) {
  if (kfirst) return {base, 128, uint32_t(K / 8) * 128 + pad, mn};
  return {base, uint32_t(rows / 8) * 128 + pad, 128, mn};
}
uint32_t tile_bytes(int rows, int K, const Tile& t) { return t.at(rows - 1, K - 1) + 2 - t.base; }

struct Params {
  const void* A;   // groups x 64 x K, row-major
  const void* B;   // groups x K x N, row-major
  const float* C;  // groups x 64 x N: the starting accumulators when use_c
  float* D;        // groups x 64 x N: the result
  float* D2;       // kGroups: the second accumulator after wait<1> (its values at issue) ...
  float* D3;       // ... and after wait<0>
  int K;
  Tile ta, tb;      // warpgroup 0's tiles; warpgroup g's lie g * region bytes further
  uint32_t region;
  bool use_c;
  int mode, mutate;
};

template <class T> uint16_t bits(T v) { uint16_t u; std::memcpy(&u, &v, 2); return u; }
// One staged element: a generic-proxy store the emulator tracks until this thread's proxy fence.
template <class T> void stage(unsigned char* dst, const T* src) {
  std::memcpy(dst, src, 2);
  emu::note_generic_write(dst, 2);
}

// One warpgroup per 128 threads; each computes its own D = (C +) A B.
constexpr int kMaxKSteps = 8;  // K up to 128 (run_case checks)

template <class T, int N, bool kRS>
__global__ void __launch_bounds__(256) wgmma_check_kernel(Params p) {
  extern __shared__ uint4 smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(smem_raw);
  const int g = threadIdx.x / 128, t = threadIdx.x % 128, w = t / 32, lane = t % 32, K = p.K;
  const T* A = static_cast<const T*>(p.A) + size_t(g) * 64 * K;
  const T* B = static_cast<const T*>(p.B) + size_t(g) * K * N;
  Tile ta = p.ta, tb = p.tb;
  ta.base += g * p.region;
  tb.base += g * p.region;
  // Stage with plain stores, then the proxy fence and a barrier before any wgmma reads them.
  if (!kRS)
    for (int i = t; i < 64 * K; i += 128) stage(smem + ta.at(i / K, i % K), &A[i]);
  for (int i = t; i < K * N; i += 128) stage(smem + tb.at(i % N, i / N), &B[i]);  // B[k][n]: row n of the operand
  if (p.mutate != kNoProxyFence) fence_proxy_async();
  if (p.mutate != kNoBarrier) __syncthreads();

  // Accumulator v of this thread: row 16 w + lane / 4 + 8 ((v >> 1) & 1), column 8 (v >> 2) + 2 (lane % 4) + (v & 1).
  auto row = [&](int v) { return 64 * g + 16 * w + lane / 4 + 8 * ((v >> 1) & 1); };
  auto col = [&](int v) { return 8 * (v >> 2) + 2 * (lane % 4) + (v & 1); };
  float d1[N / 2], d2[N / 2];
  for (int v = 0; v < N / 2; ++v) {
    d1[v] = p.use_c ? p.C[row(v) * N + col(v)] : NAN;  // NaN: accumulate = false must ignore it
    d2[v] = p.C[row(v) * N + col(v)];
  }
  auto desc = [&](const Tile& tile, int r0, int s) {  // rows r0.., k-step s
    const uint32_t addr = smem_addr(smem + tile.at(r0, 16 * s));
    return p.mutate == kSwap ? gmma_desc(addr, tile.sbo, tile.lbo) : gmma_desc(addr, tile.lbo, tile.sbo);
  };
  // RS: each k-step's A registers, kept until the wait that completes its op (the tensor core
  // may read them until then; the emulator checks they are not written before).
  uint32_t a_steps[kMaxKSteps][4];
  auto step = [&](float (&d)[N / 2], int s, bool accumulate) {
    const uint64_t db = desc(tb, 0, s);
    if constexpr (kRS) {
      uint32_t(&a)[4] = a_steps[s];  // ALayout_64x16: a[j] = row + 8 (j & 1), k 8 (j >> 1) + 2 (lane % 4) and k + 1
      for (int j = 0; j < 4; ++j) {
        const T* e = &A[(16 * w + lane / 4 + 8 * (j & 1)) * K + 16 * s + 8 * (j >> 1) + 2 * (lane % 4)];
        a[j] = bits(e[0]) | uint32_t(bits(e[1])) << 16;
      }
      WgmmaRS<T, N>::run(d, a, db, accumulate);
    } else {
      WgmmaSS<T, N>::run(d, desc(ta, p.mutate == kWarpDesc ? 16 * w : 0, s), db, accumulate);
    }
  };
  auto store = [&](float* out, const float (&d)[N / 2]) {
    for (int v = 0; v < N / 2; ++v) out[row(v) * N + col(v)] = d[v];
  };

  if (p.mutate != kNoFence) wgmma_fence();
  if (p.mode == kStepWait) {  // one op at a time: issue, wait, the next starts from the result
    for (int s = 0; s < K / 16; ++s) {
      if (s > 0 && p.mutate != kNoFence) wgmma_fence();
      step(d1, s, p.use_c || s > 0);
      if (p.mutate != kNoCommit) wgmma_commit();
      if (p.mutate != kNoWait) wgmma_wait<0>();
    }
    store(p.D, d1);
    return;
  }
  for (int s = 0; s < K / 16; ++s) step(d1, s, p.use_c || s > 0);
  if (p.mutate != kNoCommit) wgmma_commit();
  if (p.mode == kGroups) {  // a second group on d2 (starting from C) stays pending through wait<1>
    for (int s = 0; s < K / 16; ++s) step(d2, s, true);
    wgmma_commit();
  }
  if (p.mutate == kEarlyRead) store(p.D, d1);
  const uint16_t zero = 0;  // memcpy, not memset: GCC 12 leaves a small constant memset uninstrumented by TSan
  if (p.mutate == kOverwrite) {
    for (int i = t; i < K * N; i += 128) std::memcpy(smem + tb.at(i % N, i / N), &zero, 2);
    __syncthreads();
  }
  if (p.mode == kGroups) {
    wgmma_wait<1>();
    store(p.D, d1);
    store(p.D2, d2);  // still C: its group is not complete
    wgmma_wait<0>();
    store(p.D3, d2);
    return;
  }
  if (p.mutate != kNoWait) wgmma_wait<0>();
  if (p.mutate != kEarlyRead) store(p.D, d1);
  if (p.mutate == kReuse)
    for (int i = t; i < K * N; i += 128) std::memcpy(smem + tb.at(i % N, i / N), &zero, 2);
}

std::mt19937 rng(4321);

template <class T, int N, bool kRS>
bool run_case(int K, int groups, bool use_c, bool a_kfirst, bool b_kfirst, int mode, int mutate) {
  if (K % 16 != 0 || K / 16 > kMaxKSteps) {
    fprintf(stderr, "wgmma_check: K=%d: a multiple of 16 up to %d\n", K, 16 * kMaxKSteps);
    std::abort();
  }
  auto to_t = [](double x) { if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(x)); else return __float2bfloat16_rn(float(x)); };
  auto to_d = [](T x) { if constexpr (std::is_same_v<T, __half>) return double(__half2float(x)); else return double(__bfloat162float(x)); };
  std::uniform_real_distribution<double> u(-1, 1);
  std::vector<T> A(size_t(groups) * 64 * K), B(size_t(groups) * K * N);
  std::vector<float> C(size_t(groups) * 64 * N), D(C.size(), NAN), D2(C.size(), NAN), D3(C.size(), NAN);
  for (auto& x : A) x = to_t(u(rng));
  for (auto& x : B) x = to_t(u(rng));
  for (auto& x : C) x = float(u(rng));
  Params p{};
  p.A = A.data(); p.B = B.data(); p.C = C.data(); p.D = D.data(); p.D2 = D2.data(); p.D3 = D3.data();
  p.K = K; p.use_c = use_c; p.mode = mode; p.mutate = mutate;
  p.ta = make_tile(0, 64, K, false, a_kfirst, 32);
  const uint32_t a_bytes = kRS ? 0 : (tile_bytes(64, K, p.ta) + 127) / 128 * 128;
  p.tb = make_tile(a_bytes, N, K, kRS, b_kfirst, 48);
  p.region = (a_bytes + tile_bytes(N, K, p.tb) + 127) / 128 * 128;
  const size_t smem = size_t(groups) * p.region;
  wgmma_check_kernel<T, N, kRS><<<1, 128 * groups, smem>>>(p);

  // float64 reference; kGroups also checks d2 before (C) and after (C + A B) its wait.
  double err = 0, err2 = 0, err3 = 0;
  bool nan = false;
  for (int g = 0; g < groups; ++g)
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < N; ++n) {
        double ab = 0;
        for (int k = 0; k < K; ++k) ab += to_d(A[(size_t(g) * 64 + m) * K + k]) * to_d(B[(size_t(g) * K + k) * N + n]);
        const size_t i = (size_t(g) * 64 + m) * N + n;
        const double want = ab + (use_c ? C[i] : 0.0);
        nan |= std::isnan(D[i]);
        err = std::fmax(err, std::fabs(D[i] - want) / (1 + std::fabs(want)));
        if (mode == kGroups) {
          nan |= std::isnan(D2[i]) || std::isnan(D3[i]);
          err2 = std::fmax(err2, std::fabs(D2[i] - C[i]));
          err3 = std::fmax(err3, std::fabs(D3[i] - (ab + C[i])) / (1 + std::fabs(ab + C[i])));
        }
      }
  const bool ok = !nan && err <= 1e-5 && err2 == 0 && err3 <= 1e-5;
  if (!ok || getenv("VERBOSE"))
    printf("%s wgmma %s %s N=%d K=%d warpgroups=%d use_c=%d a_kfirst=%d b_kfirst=%d mode=%d err=%.3g d2_at_wait1=%.3g d2_final=%.3g nan=%d\n",
           ok ? "ok" : "FAIL", kRS ? "RS" : "SS", std::is_same_v<T, __half> ? "f16" : "bf16", N, K, groups, use_c, a_kfirst,
           b_kfirst, mode, err, err2, err3, nan);
  return ok;
}

int parse_mutation() {
  const char* e = getenv("EMU_WGMMA_MUTATE");
  if (e == nullptr || *e == 0) return kNone;
  const char* names[] = {"", "early_read", "no_wait", "no_commit", "no_fence", "overwrite", "no_barrier", "warp_desc", "swap", "reuse",
                         "no_proxy_fence"};
  for (int i = 1; i < 11; ++i)
    if (std::strcmp(e, names[i]) == 0) return i;
  fprintf(stderr, "EMU_WGMMA_MUTATE=%s: unknown\n", e);
  std::exit(2);
}
}  // namespace

int emu_wgmma_check() {
  const int x = parse_mutation();
  int failed = 0;
  // SS: A and B K-major. N from 8 to 256, both core-matrix orders, with and without C, two warpgroups.
  failed += !run_case<__half, 64, false>(64, 1, false, true, false, kPlain, x);
  failed += !run_case<__nv_bfloat16, 8, false>(16, 1, true, false, true, kPlain, x);
  failed += !run_case<__half, 256, false>(32, 1, true, false, true, kPlain, x);
  failed += !run_case<__nv_bfloat16, 40, false>(48, 2, false, true, true, kPlain, x);
  // RS: A from registers, B MN-major.
  failed += !run_case<__half, 64, true>(64, 1, false, false, false, kPlain, x);
  failed += !run_case<__nv_bfloat16, 40, true>(32, 2, true, false, true, kPlain, x);
  failed += !run_case<__half, 256, true>(16, 1, false, true, false, kPlain, x);
  // wait<1> completes the older group only; one op at a time (issue, wait, check, next).
  failed += !run_case<__half, 32, false>(32, 1, false, true, false, kGroups, x);
  failed += !run_case<__nv_bfloat16, 24, true>(32, 2, true, false, true, kGroups, x);
  failed += !run_case<__nv_bfloat16, 16, true>(48, 1, false, true, true, kStepWait, x);
  failed += !run_case<__half, 16, false>(16, 1, true, false, false, kStepWait, x);
  return failed;
}
