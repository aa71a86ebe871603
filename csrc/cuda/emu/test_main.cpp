// Runs the ldmfast CUDA kernels on the CPU through emu.h and compares them with float64
// references (GEGLU too): every path the host code picks (vector / scalar, fused / stream, NCHW /
// channels_last, SIMT / mma attention), tails and edge shapes. Usage: run.sh [all|gn|ddim|geglu|attn|mma|short|race|held]
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cmath>
#include <string>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <random>
#include <vector>
#include "ldmfast/attention.h"
#include "ldmfast/ddim_step.h"
#include "ldmfast/geglu.h"
#include "ldmfast/group_norm_silu.h"
#include "attention_mma.cuh"

extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  const int major = getenv("EMU_SM90") ? 9 : 8;  // 9: the group_norm_silu cluster path runs
  *v = a == cudaDevAttrMultiProcessorCount ? 4 : a == cudaDevAttrComputeCapabilityMajor ? major : 0;
  if (a == cudaDevAttrCooperativeLaunch) *v = getenv("EMU_NO_COOP") ? 0 : 1;  // a device without it
  if (a == cudaDevAttrL2CacheSize) *v = 1 << 20;  // small, so that tests reach what depends on it
  return cudaSuccess;
}
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void*) { memset(attr, 0, sizeof(*attr)); attr->ptxVersion = getenv("EMU_SM90") ? 90 : 80; return cudaSuccess; }
cudaError_t cudaOccupancyMaxActiveClusters(int* n, const void*, const cudaLaunchConfig_t*) { *n = 1; return cudaSuccess; }
cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t*, const void*, void**) { abort(); }
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int threads, size_t smem) {
  *n = smem > 113 * 1024 ? 1 : smem > 75 * 1024 ? 2 : 4;  // roughly an H100's 227 KB per SM
  // EMU_REGS_PER_THREAD=R: registers bound it too, as on an H100 (64K a SM; 512 threads at 128
  // take them all). Read once per process: the library keeps the answers.
  if (const char* r = getenv("EMU_REGS_PER_THREAD")) *n = std::max(1, std::min(*n, 65536 / (threads * atoi(r))));
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute a, int v) {
  // The emulator's shared memory has no limit; check what the kernel asks for is an H100's.
  return a == cudaFuncAttributeMaxDynamicSharedMemorySize && v > 227 * 1024 ? cudaErrorInvalidValue : cudaSuccess;
}
}

using namespace ldmfast;
static std::mt19937 rng(1234);
static double urand() { return std::uniform_real_distribution<double>(-1, 1)(rng); }
static double nrand() { return std::normal_distribution<double>(0, 1)(rng); }

// Storage of one dtype with an element offset (to test unaligned pointers), values readable as double.
struct Buf {
  DType t; std::vector<unsigned char> raw; int off;
  Buf(DType t_, size_t n, int off_ = 0) : t(t_), raw((n + off_ + 8) * 4 + 64), off(off_) {}
  size_t es() const { return dtype_size(t); }
  void* ptr() { uintptr_t p = reinterpret_cast<uintptr_t>(raw.data()); p = (p + 63) & ~uintptr_t(63); return reinterpret_cast<void*>(p + off * es()); }
  double get(size_t i) { void* p = ptr();
    if (t == DType::kFloat32) return static_cast<float*>(p)[i];
    if (t == DType::kFloat16) return __half2float(static_cast<__half*>(p)[i]);
    return __bfloat162float(static_cast<__nv_bfloat16*>(p)[i]); }
  void set(size_t i, double v) { void* p = ptr();
    if (t == DType::kFloat32) static_cast<float*>(p)[i] = (float)v;
    else if (t == DType::kFloat16) static_cast<__half*>(p)[i] = __float2half_rn((float)v);
    else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn((float)v); }
  void poison(size_t n) { for (size_t i = 0; i < n; ++i) set(i, NAN); }
};
static double tol(DType t) { return t == DType::kFloat32 ? 2e-5 : t == DType::kFloat16 ? 4e-3 : 3e-2; }
static int failures = 0, checks = 0;
static void report(bool ok, const char* what) { ++checks; if (!ok) { ++failures; printf("FAIL %s\n", what); } }

// outlier: added to every group's first element (pixel 0 of its first channel), the point the
// kernels take their statistics about.
static void test_gn(DType dt, bool param32, bool cl, bool emb, bool silu, int64_t N, int64_t C, int64_t S, int64_t G, int off, double mean0,
                    cuda::GroupNormKernel kernel = cuda::GroupNormKernel::kGroups, double outlier = 0) {
  DType pt = param32 ? DType::kFloat32 : dt;
  const int64_t n_el = N * C * S;
  Buf x(dt, n_el, off), e(dt, N * C, off), w(pt, C, off), b(pt, C, off), y(dt, n_el, off);
  for (int64_t i = 0; i < n_el; ++i) x.set(i, mean0 + nrand() * (mean0 != 0 ? 1 : 1));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G && outlier != 0; ++g) {
      const int64_t c = g * (C / G), i = cl ? (n * S) * C + c : (n * C + c) * S;
      x.set(i, x.get(i) + outlier);
    }
  for (int64_t i = 0; i < N * C; ++i) e.set(i, nrand());
  for (int64_t i = 0; i < C; ++i) { w.set(i, 1 + 0.5 * urand()); b.set(i, urand()); }
  y.poison(n_el);
  GroupNormSiluParams p;
  p.x = x.ptr(); p.emb = emb ? e.ptr() : nullptr; p.weight = w.ptr(); p.bias = b.ptr(); p.y = y.ptr();
  p.N = N; p.C = C; p.S = S; p.G = G; p.eps = 1e-5f; p.silu = silu; p.channels_last = cl; p.dtype = dt; p.param_dtype = pt;
  // The workspace starts as NaN, so a partial the kernels read but never wrote shows up.
  const int64_t ws_bytes = cuda::group_norm_silu_workspace_bytes(p, kernel);
  std::vector<float> ws((ws_bytes + 3) / 4 + 4, NAN);
  int rc = cuda::group_norm_silu(p, nullptr, ws_bytes > 0 ? ws.data() : nullptr, kernel);
  const int64_t Cg = C / G;
  double maxerr = 0; bool nan = false;
  auto idx = [&](int64_t n, int64_t c, int64_t s) { return cl ? (n * S + s) * C + c : (n * C + c) * S + s; };
  for (int64_t n = 0; n < N; ++n) for (int64_t g = 0; g < G; ++g) {
    double sum = 0, sq = 0; const double cnt = double(Cg * S);
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) for (int64_t s = 0; s < S; ++s) sum += x.get(idx(n, c, s)) + (emb ? e.get(n * C + c) : 0);
    const double mean = sum / cnt;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) for (int64_t s = 0; s < S; ++s) { double d = x.get(idx(n, c, s)) + (emb ? e.get(n * C + c) : 0) - mean; sq += d * d; }
    const double rstd = 1 / std::sqrt(sq / cnt + 1e-5);
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) for (int64_t s = 0; s < S; ++s) {
      double v = (x.get(idx(n, c, s)) + (emb ? e.get(n * C + c) : 0) - mean) * rstd * w.get(c) + b.get(c);
      if (silu) v = v / (1 + std::exp(-v));
      const double got = y.get(idx(n, c, s));
      if (std::isnan(got)) nan = true;
      maxerr = std::max(maxerr, std::fabs(got - v) / std::max(1.0, std::fabs(v)));
    }
  }
  // x + emb near 1000 rounds by up to 3e-5 in float before any statistics. Without emb, float32
  // must do better than a float mean near 1000 would (1.6e-5 here): the statistics are taken
  // about the group's first element (3e-7).
  double t = tol(dt) * (mean0 != 0 && emb ? 10 : 1);
  if (mean0 != 0 && !emb && dt == DType::kFloat32) t = 2e-6;
  char what[256];
  snprintf(what, sizeof what, "gn dt=%d p32=%d cl=%d emb=%d silu=%d N=%ld C=%ld S=%ld G=%ld off=%d mean=%g kernel=%d ws=%ld rc=%d err=%.3g nan=%d", (int)dt, param32, cl, emb, silu, N, C, S, G, off, mean0, (int)kernel, (long)ws_bytes, rc, maxerr, nan);
  report(rc == 0 && !nan && maxerr <= t, what);
  if (getenv("VERBOSE")) printf("%s\n", what);
}

static void test_ddim(DType dt, int64_t N, int64_t M, int off, bool unc, bool noise, int scalar_mode) {
  const int64_t n_el = N * M;
  Buf x(dt, n_el, off), ep(dt, n_el, off), u(dt, n_el, off), z(dt, n_el, off), xp(dt, n_el, off), px(dt, n_el, off);
  for (int64_t i = 0; i < n_el; ++i) { x.set(i, nrand()); ep.set(i, nrand()); u.set(i, nrand()); z.set(i, nrand()); }
  xp.poison(n_el); px.poison(n_el);
  std::vector<float> at(N), ap(N), sg(N), gs(N);
  for (int64_t n = 0; n < N; ++n) { at[n] = 0.3f + 0.1f * n; ap[n] = 0.5f + 0.1f * n; sg[n] = 0.2f + 0.05f * n; gs[n] = 7.5f - n; }
  DdimStepParams p;
  p.x = x.ptr(); p.eps = ep.ptr(); p.eps_uncond = unc ? u.ptr() : nullptr; p.noise = noise ? z.ptr() : nullptr;
  p.x_prev = xp.ptr(); p.pred_x0 = px.ptr(); p.N = N; p.M = M; p.dtype = dt;
  DdimScalar* sc[4] = {&p.alpha_t, &p.alpha_prev, &p.sigma_t, &p.guidance_scale};
  std::vector<float>* arr[4] = {&at, &ap, &sg, &gs};
  for (int i = 0; i < 4; ++i) {
    if (scalar_mode == 0) { sc[i]->value = (*arr[i])[0]; }
    else if (scalar_mode == 1) { sc[i]->ptr = arr[i]->data(); sc[i]->count = 1; }
    else { sc[i]->ptr = arr[i]->data(); sc[i]->count = N; }
  }
  int rc = cuda::ddim_step(p, nullptr);
  double maxerr = 0; bool nan = false;
  for (int64_t i = 0; i < n_el; ++i) {
    const int64_t n = scalar_mode == 2 ? i / M : 0;
    double a = at[n], a2 = ap[n], s = sg[n], g = gs[n];
    double e = ep.get(i);
    if (unc) e = u.get(i) + g * (e - u.get(i));
    double p0 = (x.get(i) - std::sqrt(1 - a) * e) / std::sqrt(a);
    double xv = std::sqrt(a2) * p0 + std::sqrt(std::max(1 - a2 - s * s, 0.0)) * e + (noise ? s * z.get(i) : 0);
    if (std::isnan(xp.get(i)) || std::isnan(px.get(i))) nan = true;
    if (getenv("DBG") && (std::fabs(xp.get(i) - xv) > 1e-2 || std::fabs(px.get(i) - p0) > 1e-2)) printf("  i=%ld got %g %g want %g %g\n", i, xp.get(i), px.get(i), xv, p0);
    maxerr = std::max({maxerr, std::fabs(xp.get(i) - xv) / std::max(1.0, std::fabs(xv)), std::fabs(px.get(i) - p0) / std::max(1.0, std::fabs(p0))});
  }
  char what[256];
  snprintf(what, sizeof what, "ddim dt=%d N=%ld M=%ld off=%d unc=%d noise=%d mode=%d rc=%d err=%.3g nan=%d", (int)dt, N, M, off, unc, noise, scalar_mode, rc, maxerr, nan);
  report(rc == 0 && !nan && maxerr <= tol(dt), what);
  if (getenv("VERBOSE")) printf("%s\n", what);
}

// The GELU's negative tail, where 1 + erf cancels: a = 1 and gates from -3 down to where the
// exact value leaves float32's normal range, each within 1e-6 relative of g/2 erfc(-g/sqrt 2)
// (the float64 value of the float32 gate).
static void test_geglu_tail() {
  const int64_t n = 4001;
  Buf h(DType::kFloat32, 2 * n, 0), out(DType::kFloat32, n, 0);
  for (int64_t j = 0; j < n; ++j) { h.set(j, 1.0); h.set(n + j, -3.0 - 10.0 * j / (n - 1)); }
  out.poison(n);
  GegluParams p;
  p.h = h.ptr(); p.out = out.ptr(); p.rows = 1; p.n = n; p.h_row_stride = 2 * n; p.dtype = DType::kFloat32;
  const int rc = cuda::geglu(p, nullptr);
  double worst = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double g = h.get(n + j), want = 0.5 * g * std::erfc(-g / std::sqrt(2.0));
    if (std::fabs(want) > 1e-36) worst = std::max(worst, std::fabs(out.get(j) - want) / std::fabs(want));
  }
  char what[96];
  snprintf(what, sizeof what, "geglu negative tail g in [-13, -3] rc=%d max rel err=%.3g", rc, worst);
  report(rc == 0 && worst < 1e-6, what);
  if (getenv("VERBOSE")) printf("%s\n", what);
}

// rows x n outputs from rows of h `stride` elements apart (>= 2n); off shifts both pointers.
static void test_geglu(DType dt, int64_t rows, int64_t n, int64_t stride, int off) {
  Buf h(dt, rows * stride, off), out(dt, rows * n, off);
  for (int64_t i = 0; i < rows * stride; ++i) h.set(i, 2 * nrand());
  out.poison(rows * n);
  GegluParams p;
  p.h = h.ptr(); p.out = out.ptr(); p.rows = rows; p.n = n; p.h_row_stride = stride; p.dtype = dt;
  const int rc = cuda::geglu(p, nullptr);
  double maxerr = 0; bool nan = false;
  for (int64_t r = 0; r < rows; ++r) for (int64_t j = 0; j < n; ++j) {
    const double a = h.get(r * stride + j), g = h.get(r * stride + n + j);
    const double want = a * 0.5 * g * (1 + std::erf(g / std::sqrt(2.0)));
    const double got = out.get(r * n + j);
    if (std::isnan(got)) nan = true;
    maxerr = std::max(maxerr, std::fabs(got - want) / std::max(1.0, std::fabs(want)));
  }
  char what[160];
  snprintf(what, sizeof what, "geglu dt=%d rows=%ld n=%ld stride=%ld off=%d rc=%d err=%.3g nan=%d", (int)dt, rows, n, stride, off, rc, maxerr, nan);
  report(rc == 0 && !nan && maxerr <= tol(dt), what);
  if (getenv("VERBOSE")) printf("%s\n", what);
}

// The attention paths test_attn runs, by its `mma` argument: the label its report carries and the
// call. attention() asked for a kernel falls back where that kernel does not take the head dim
// (wide, overlapped: up to D = 80; three warpgroups: up to 96); the emulator counts as sm_90a.
struct AttnMode {
  const char* label;
  int (*run)(const AttentionParams&);
};
static const AttnMode kAttnModes[] = {
    {"", [](const AttentionParams& p) { return cuda::attention(p, nullptr); }},  // 0: the default path
    {"-mma-pipe", [](const AttentionParams& p) { return cuda::attention_mma(p, nullptr, true); }},
    {"-mma-plain", [](const AttentionParams& p) { return cuda::attention_mma(p, nullptr, false); }},
    {"-short", [](const AttentionParams& p) { return cuda::attention_short(p, nullptr); }},
    {"-mma-wide", [](const AttentionParams& p) { return cuda::attention_mma_wide(p, nullptr); }},
    {"-dispatch-wide", [](const AttentionParams& p) { return cuda::attention(p, nullptr, cuda::AttentionKernel::kMmaWide); }},
    {"-wgmma", [](const AttentionParams& p) { return cuda::attention_wgmma(p, nullptr); }},  // 6
    {"-dispatch-wgmma", [](const AttentionParams& p) { return cuda::attention(p, nullptr, cuda::AttentionKernel::kWgmma); }},
    {"-wgmma-overlap", [](const AttentionParams& p) { return cuda::attention_wgmma(p, nullptr, true); }},
    {"-dispatch-overlap", [](const AttentionParams& p) { return cuda::attention(p, nullptr, cuda::AttentionKernel::kWgmmaOverlap); }},
    {"-wgmma-pingpong", [](const AttentionParams& p) { return cuda::attention_wgmma(p, nullptr, false, true); }},  // 10
    {"-wgmma-pingpong-overlap", [](const AttentionParams& p) { return cuda::attention_wgmma(p, nullptr, true, true); }},
    {"-dispatch-pingpong", [](const AttentionParams& p) { return cuda::attention(p, nullptr, cuda::AttentionKernel::kWgmmaPingpong); }},
    {"-dispatch-pingpong-overlap",
     [](const AttentionParams& p) { return cuda::attention(p, nullptr, cuda::AttentionKernel::kWgmmaPingpongOverlap); }},
    {"-wgmma-pingpong3", [](const AttentionParams& p) { return cuda::attention_wgmma(p, nullptr, false, true, 3); }},  // 14
    {"-dispatch-pingpong3", [](const AttentionParams& p) { return cuda::attention(p, nullptr, cuda::AttentionKernel::kWgmmaPingpong3); }},
    {"-wgmma-pingpong3-overlap", [](const AttentionParams& p) { return cuda::attention_wgmma(p, nullptr, true, true, 3); }},  // 16
    {"-dispatch-pingpong3-overlap",
     [](const AttentionParams& p) { return cuda::attention(p, nullptr, cuda::AttentionKernel::kWgmmaPingpong3Overlap); }},
    {"-short-rows32", [](const AttentionParams& p) {  // 18: two tiles of 16 rows a warp (D <= 80)
       setenv("LDMFAST_ATTENTION_SHORT_ROWS", "32", 1);
       const int rc = cuda::attention_short(p, nullptr);
       unsetenv("LDMFAST_ATTENTION_SHORT_ROWS");
       return rc;
     }},
};

// The softmax scale of test_attn is this times D^-1/2 (negative and zero scales: see main).
static float g_attn_scale = 1.0f;

// q, k, v as views into one (B, L, 3, H, D) buffer when fused, else separate contiguous tensors.
// mma: the index into kAttnModes.
// overflow: lane 0 of every query is 1e20 and of the first ninf keys -1e20 (0 for the others), so
// whole key tiles score -inf in float32 while the later keys are finite (fp32 / bf16 only).
static void test_attn(DType dt, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, bool fused, int off, bool lse, int mma = 0,
                      bool overflow = false, int64_t ninf = 64) {
  const int64_t L = std::max(Lq, Lk);
  Buf qkv(dt, B * L * 3 * H * D, off), q(dt, B * Lq * H * D, off), k(dt, B * Lk * H * D, off), v(dt, B * Lk * H * D, off), o(dt, B * Lq * H * D, off);
  std::vector<float> lsev(B * H * Lq, NAN);
  AttentionParams p;
  if (fused) {
    for (int64_t i = 0; i < B * L * 3 * H * D; ++i) qkv.set(i, nrand());
    char* base = static_cast<char*>(qkv.ptr()); size_t es = qkv.es();
    p.q = base; p.k = base + H * D * es; p.v = base + 2 * H * D * es;
    for (auto* st : {&p.q_stride_b, &p.k_stride_b, &p.v_stride_b}) *st = L * 3 * H * D;
    for (auto* st : {&p.q_stride_l, &p.k_stride_l, &p.v_stride_l}) *st = 3 * H * D;
    for (auto* st : {&p.q_stride_h, &p.k_stride_h, &p.v_stride_h}) *st = D;
  } else {
    for (int64_t i = 0; i < B * Lq * H * D; ++i) q.set(i, nrand());
    for (int64_t i = 0; i < B * Lk * H * D; ++i) { k.set(i, nrand()); v.set(i, nrand()); }
    p.q = q.ptr(); p.k = k.ptr(); p.v = v.ptr();
    p.q_stride_b = Lq * H * D; p.k_stride_b = p.v_stride_b = Lk * H * D;
    p.q_stride_l = p.k_stride_l = p.v_stride_l = H * D;
    p.q_stride_h = p.k_stride_h = p.v_stride_h = D;
    if (overflow) {
      for (int64_t i = 0; i < B * Lq * H; ++i) q.set(i * D, 1e20f);
      for (int64_t b = 0; b < B; ++b) for (int64_t j = 0; j < Lk; ++j) for (int64_t h = 0; h < H; ++h)
        k.set(b * p.k_stride_b + j * p.k_stride_l + h * D, j < ninf ? -1e20f : 0.0f);
    }
  }
  o.poison(B * Lq * H * D);
  p.o = o.ptr(); p.o_stride_b = Lq * H * D; p.o_stride_l = H * D; p.o_stride_h = D;
  p.lse = lse ? lsev.data() : nullptr;
  p.B = B; p.Lq = Lq; p.Lk = Lk; p.H = H; p.D = D; p.scale = g_attn_scale / std::sqrt((float)D); p.dtype = dt;
  if (mma < 0 || mma >= static_cast<int>(std::size(kAttnModes))) {
    fprintf(stderr, "test_attn: no attention mode %d\n", mma);
    abort();
  }
  const int rc = kAttnModes[mma].run(p);
  auto rd = [&](const void* base, int64_t i) {
    if (dt == DType::kFloat32) return (double)static_cast<const float*>(base)[i];
    if (dt == DType::kFloat16) return (double)__half2float(static_cast<const __half*>(base)[i]);
    return (double)__bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]); };
  double maxerr = 0, lerr = 0; bool nan = false;
  for (int64_t b = 0; b < B; ++b) for (int64_t h = 0; h < H; ++h) for (int64_t i = 0; i < Lq; ++i) {
    std::vector<double> s(Lk); double mx = -INFINITY;
    for (int64_t j = 0; j < Lk; ++j) {
      double acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += rd(p.q, b * p.q_stride_b + i * p.q_stride_l + h * p.q_stride_h + d) * rd(p.k, b * p.k_stride_b + j * p.k_stride_l + h * p.k_stride_h + d);
      s[j] = acc * p.scale; mx = std::max(mx, s[j]);
    }
    double sum = 0; for (auto& x : s) { x = std::exp(x - mx); sum += x; }
    for (int64_t d = 0; d < D; ++d) {
      double acc = 0;
      for (int64_t j = 0; j < Lk; ++j) acc += s[j] * rd(p.v, b * p.v_stride_b + j * p.v_stride_l + h * p.v_stride_h + d);
      acc /= sum;
      double got = o.get(b * p.o_stride_b + i * p.o_stride_l + h * p.o_stride_h + d);
      if (std::isnan(got)) nan = true;
      maxerr = std::max(maxerr, std::fabs(got - acc));
    }
    if (lse) { double l = mx + std::log(sum); double got = lsev[(b * H + h) * Lq + i]; if (std::isnan(got)) nan = true; lerr = std::max(lerr, std::fabs(got - l)); }
  }
  char what[256];
  snprintf(what, sizeof what, "attn%s dt=%d B=%ld H=%ld Lq=%ld Lk=%ld D=%ld fused=%d off=%d lse=%d overflow=%d scale*%g rc=%d err=%.3g lse_err=%.3g nan=%d", kAttnModes[mma].label, (int)dt, B, H, Lq, Lk, D, fused, off, lse, overflow, g_attn_scale, rc, maxerr, lerr, nan);
  report(rc == 0 && !nan && maxerr <= tol(dt) && lerr <= 1e-4, what);
  if (getenv("VERBOSE")) printf("%s\n", what);
}

int emu_wgmma_check();  // wgmma_check.cu: the emulator's wgmma against float64, the failed cases

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "all";
  const DType dts[3] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  if (which == "all" || which == "ddim") {
    for (DType dt : dts) for (int off : {0, 1}) for (int mode : {0, 1, 2}) {
      test_ddim(dt, 3, 64, off, true, true, mode);
      test_ddim(dt, 3, 37, off, mode != 1, mode == 1, mode);
      test_ddim(dt, 1, 1, off, false, false, mode);
    }
  }
  if (which == "all" || which == "geglu") {
    test_geglu_tail();
    for (DType dt : dts) for (int off : {0, 1}) {
      test_geglu(dt, 5, 640, 1280, off);     // vector when off == 0, two column blocks
      test_geglu(dt, 3, 37, 80, off);        // odd n, row stride past 2n: scalar
      test_geglu(dt, 2, 1, 2, off);          // one output
    }
    test_geglu(DType::kFloat16, 2, 1024, 2056, 0);  // stride a multiple of 8 past 2n: vector, 4 blocks
  }
  if (which == "all" || which == "gn") {
    for (DType dt : dts) for (bool cl : {false, true}) for (int off : {0, 1}) {
      bool p32 = (off == 0) != (dt == DType::kFloat32);
      test_gn(dt, p32, cl, true, true, 2, 32, 16, 4, off, 0);          // fused, vector when off == 0
      test_gn(dt, !p32, cl, false, false, 1, 6, 7, 3, off, 0);         // fused, odd sizes
      test_gn(dt, p32, cl, true, true, 1, 16, 1, 1, off, 0);           // S = 1
      test_gn(dt, p32, cl, off == 1, true, 1, 64, 520, 2, off, 0);     // stream (E = 16640)
      test_gn(dt, p32, cl, true, false, 2, 10, 1301, 1, off, 0);       // stream, odd S, one group
    }
    // channels_last groups of 4, 10, 20, 30 channels: 4- and 8-byte items (off 0: widest the
    // group allows, off 2: at most 4 bytes for 16-bit types, off 1: scalars), fused and stream.
    for (DType dt : dts) for (int off : {0, 1, 2}) {
      bool p32 = off != 1;
      test_gn(dt, p32, true, true, true, 2, 40, 130, 4, off, 0);       // Cg 10, fused
      test_gn(dt, !p32, true, off != 2, true, 1, 80, 1301, 4, off, 0); // Cg 20, stream, odd S
      test_gn(dt, p32, true, true, false, 1, 32, 4099, 8, off, 0);     // Cg 4, stream
      test_gn(dt, p32, true, false, true, 2, 60, 700, 2, off, 0);      // Cg 30, stream
    }
    test_gn(DType::kFloat16, true, true, true, true, 1, 128, 1024, 32, 0, 1000.0); // Cg 4, large mean
    // The rows kernels (channels_last groups over the fused limit; off 1 falls back to kGroups).
    const auto rows = cuda::GroupNormKernel::kRows, dflt = cuda::GroupNormKernel::kDefault;
    for (DType dt : dts) for (int off : {0, 1}) {
      bool p32 = (off == 0) != (dt == DType::kFloat32);
      test_gn(dt, p32, true, true, true, 1, 128, 4099, 32, off, 0, rows);   // Cg 4, odd S
      test_gn(dt, !p32, true, off == 0, false, 2, 320, 1301, 32, off, 0, rows); // Cg 10, 40 columns
      test_gn(dt, p32, true, false, true, 3, 64, 3000, 2, off, 0, dflt);    // Cg 32, 3 samples
      test_gn(dt, p32, true, true, true, 1, 24, 1000, 1, off, 0, rows);     // one group, 3 or 6 columns
    }
    test_gn(DType::kFloat16, true, true, true, true, 2, 16, 4000, 4, 0, 0, rows);     // Cg 4, 2 columns
    test_gn(DType::kFloat32, true, true, false, true, 1, 16, 65536, 2, 0, 1000.0, rows); // large mean, 64 pixels a thread
    test_gn(DType::kBFloat16, false, true, true, true, 1, 512, 800, 32, 0, 1000.0, rows); // large mean, Cg 16
    // Wide C, few rows a CTA: the stats' per-channel merge by one thread per channel.
    test_gn(DType::kFloat16, true, true, true, true, 2, 2560, 256, 32, 0, 0, rows);    // 1 row (U-Net 16x16)
    test_gn(DType::kFloat16, false, true, false, true, 1, 1280, 401, 32, 0, 0, rows);  // 3 rows, odd S
    test_gn(DType::kFloat32, true, true, false, true, 1, 640, 800, 32, 0, 1000.0, rows); // 3 rows, large mean
    for (auto k : {rows, cuda::GroupNormKernel::kGroups})  // the first element 3000 sigma out
      for (bool cl : {true, false}) test_gn(DType::kFloat32, true, cl, false, true, 1, 640, 800, 32, 0, 0, k, 3000.0);
    test_gn(DType::kFloat32, true, false, true, true, 1, 32, 64, 4, 0, 1000.0);   // fused, large mean
    test_gn(DType::kFloat32, true, false, false, true, 2, 64, 256, 8, 0, 1000.0); // fused, no emb (NCHW)
    test_gn(DType::kFloat32, true, true, false, true, 2, 64, 256, 8, 0, 1000.0);  // fused, no emb (NHWC)
    test_gn(DType::kFloat32, true, true, false, true, 1, 16, 1024, 1, 0, 1000.0); // stream, large mean
    test_gn(DType::kFloat16, true, false, true, true, 1, 16, 2048, 1, 1, 0);      // stream, K = 8 on "sm_90"
    // NCHW stream kernel with its 16-byte items held in registers (x read once), emb per item.
    for (DType dt : dts) test_gn(dt, dt == DType::kFloat16, false, true, true, 2, 64, 520, 2, 0, 0);
    test_gn(DType::kFloat32, true, false, true, true, 1, 16, 2048, 1, 0, 1000.0);  // 16 items a thread, large mean
    // NCHW stream kernel, 16-byte items past the registers held in shared memory (16 to 40 a
    // thread), and more groups than CTAs fit (held since the hold takes several waves).
    test_gn(DType::kFloat16, true, false, true, true, 1, 8, 16384, 1, 0, 0);     // 32 items a thread (4 at K = 8)
    test_gn(DType::kBFloat16, false, false, true, true, 1, 640, 1024, 32, 0, 0); // 32 groups over 16 CTAs
    test_gn(DType::kFloat32, true, false, true, true, 1, 2, 40000, 1, 0, 1000.0); // 40 items: every slot, large mean
    test_gn(DType::kBFloat16, true, false, false, true, 1, 6, 40000, 2, 0, 0);    // 30 items, Cg 3
    // Past 40 items a thread: the two-read path (K = 1 below "sm_90"); on "sm_90" 16 groups take
    // K = 1, and the hold doubles it to 2 (21 items a thread, two waves of clusters).
    test_gn(DType::kFloat32, true, false, true, true, 1, 2, 41000, 1, 0, 0);      // 41 items a thread
    test_gn(DType::kFloat32, false, false, true, false, 2, 8, 84000, 8, 0, 0);
    test_gn(DType::kBFloat16, false, true, true, true, 1, 16, 2048, 1, 0, 0);
    // kCluster: a split of at least 2 on "sm_90" (many groups: the heuristic alone keeps K = 1),
    // refused below it and for groups that fit one CTA.
    const auto clu = cuda::GroupNormKernel::kCluster;
    auto refused = [&](int64_t S, const char* what) {  // one fp32 group of 16 channels
      GroupNormSiluParams q{};
      q.N = 1; q.C = 16; q.S = S; q.G = 1; q.dtype = q.param_dtype = DType::kFloat32;
      report(cuda::group_norm_silu(q, nullptr, nullptr, clu) == cudaErrorNotSupported, what);
    };
    if (getenv("EMU_SM90")) {
      for (bool cl : {false, true}) test_gn(DType::kFloat16, true, cl, true, true, 2, 32, 8192, 8, 0, 0, clu);
    } else {
      refused(2048, "gn kCluster before sm_90: not supported");
    }
    refused(16, "gn kCluster, a group that fits one CTA");
    // The held kernel (channels_last, one cooperative grid of the resident CTAs: 16 here, 4 "SMs"
    // x 4): each thread up to 16 pixel rows of 16-byte columns; odd S leaves a short last chunk
    // and threads with no row. Every group is over the one-CTA limit (12032 elements), so kHeld
    // runs or fails; never the fused kernel.
    const auto held = cuda::GroupNormKernel::kHeld;
    for (DType dt : dts) {
      const bool p32 = dt != DType::kFloat16;
      test_gn(dt, p32, true, true, true, 1, 320, 1301, 32, 0, 0, held);    // Cg 10, 40 or 80 columns
      test_gn(dt, !p32, true, false, true, 3, 64, 1000, 2, 0, 0, held);    // Cg 32, 3 samples (K = 5)
      test_gn(dt, p32, true, true, false, 1, 128, 3500, 32, 0, 0, held);   // Cg 4, 16 CTAs, odd S
      test_gn(dt, p32, true, false, true, 1, 1280, 250, 16, 0, 0, held);   // 3 rows a CTA, or 1
    }
    test_gn(DType::kFloat16, true, true, true, true, 1, 2560, 160, 32, 0, 0, held);       // 1 row, 320 columns
    test_gn(DType::kFloat32, true, true, false, true, 1, 128, 1000, 8, 0, 1000.0, held);  // large mean
    test_gn(DType::kBFloat16, false, true, true, true, 1, 512, 300, 4, 0, 1000.0, held);  // large mean, emb
    test_gn(DType::kFloat32, true, true, false, true, 1, 640, 200, 8, 0, 0, held, 3000.0); // a far first element
    test_gn(DType::kFloat16, true, true, true, true, 1, 320, 1301, 32, 0, 0, dflt);       // the default's pick
    {
      // Refused: x past what the resident CTAs hold plus L2's size (here 2 x 320 x 2000: 46
      // items a thread streamed, 1.4 MB); unaligned; a device without cooperative launch (where
      // the default takes the groups kernel instead).
      auto refuse = [&](int64_t S, bool aligned, const char* what) {
        Buf x(DType::kFloat16, 2 * 320 * S + 8), w(DType::kFloat32, 320), b(DType::kFloat32, 320);
        GroupNormSiluParams q{};
        q.x = q.y = static_cast<char*>(x.ptr()) + (aligned ? 0 : 2);
        q.weight = w.ptr(); q.bias = b.ptr();
        q.N = 2; q.C = 320; q.S = S; q.G = 32; q.channels_last = true;
        q.dtype = DType::kFloat16; q.param_dtype = DType::kFloat32;
        report(cuda::group_norm_silu_workspace_bytes(q, held) == 0 &&
               cuda::group_norm_silu(q, nullptr, nullptr, held) == cudaErrorNotSupported, what);
      };
      refuse(2000, true, "gn kHeld, x past the held part plus L2: not supported");
      refuse(1301, false, "gn kHeld, unaligned x: not supported");
      setenv("EMU_NO_COOP", "1", 1);
      refuse(1301, true, "gn kHeld without cooperative launch: not supported");
      test_gn(DType::kFloat16, true, true, true, true, 1, 320, 1301, 32, 0, 0, dflt);     // groups then
      unsetenv("EMU_NO_COOP");
    }
  }
  if (which == "held") {
    // Run with EMU_REGS_PER_THREAD=128 (one 512-thread CTA a SM, as on an H100, whatever its
    // shared memory): the held kernel's registers, shared-memory slots and streamed items
    // (fp16, C = 64: 64 rows of 14 + 24 items, 4 CTAs; L2 1 MB).
    const auto held = cuda::GroupNormKernel::kHeld;
    test_gn(DType::kFloat16, true, true, true, true, 1, 64, 3000, 8, 0, 0, held);    // registers only (12 items)
    test_gn(DType::kFloat16, true, true, true, true, 1, 64, 6001, 8, 0, 0, held);    // 24 items: 10 slots
    test_gn(DType::kBFloat16, false, true, false, true, 2, 64, 4000, 2, 0, 0, held); // 2 samples, 32 items
    test_gn(DType::kFloat16, true, true, true, true, 1, 64, 12000, 8, 0, 0, held);   // 47 items: 9 streamed
    test_gn(DType::kFloat32, true, true, false, true, 1, 32, 11000, 4, 0, 1000.0, held); // fp32, 43 items, large mean
    // The first element 100 sigma out. At 1000 (or 3000, as in "gn") every kernel passes 2e-5 at
    // groups of 88000, v - shift rounding at that magnitude (held 2.6e-5, rows 3.2e-5, groups
    // 2.8e-5; at 100: 1.1e-5, 6.8e-6, 8.1e-6).
    test_gn(DType::kFloat32, true, true, false, true, 1, 32, 11000, 4, 0, 0, held, 100.0);
    test_gn(DType::kBFloat16, true, true, true, false, 1, 320, 2500, 32, 0, 0, held); // Cg 10, 12 rows, streamed
    // Past what streaming takes (x beyond the held part plus L2): refused, and the default
    // takes another kernel.
    {
      GroupNormSiluParams q{};
      q.N = 1; q.C = 64; q.S = 40000; q.G = 8; q.channels_last = true;
      q.dtype = q.param_dtype = DType::kFloat16;
      std::vector<uint16_t> buf(16);
      q.y = buf.data();
      q.x = q.weight = q.bias = buf.data();
      report(cuda::group_norm_silu_workspace_bytes(q, held) == 0, "gn kHeld past L2: no workspace");
    }
    test_gn(DType::kFloat16, true, true, true, true, 1, 64, 40000, 8, 0, 0, cuda::GroupNormKernel::kDefault);
  }
  if (which == "all" || which == "attn") {
    const int Ds[7] = {32, 40, 64, 80, 96, 128, 160};
    for (DType dt : dts) for (int D : Ds) {
      test_attn(dt, 1, 2, 33, 70, D, dt != DType::kFloat32, 0, true);
      test_attn(dt, 2, 1, 5, 1, D, false, D == 40 ? 1 : 0, false);   // Lk = 1
    }
    test_attn(DType::kFloat16, 1, 1, 1, 77, 40, true, 1, true);      // one query, unaligned, context 77
    test_attn(DType::kFloat32, 1, 1, 64, 64, 64, false, 1, true);
    test_attn(DType::kFloat32, 1, 2, 9, 130, 64, false, 0, true, 0, true);   // first tiles all -inf
    test_attn(DType::kBFloat16, 1, 1, 9, 130, 40, false, 0, true, 0, true);
  }
  if (which == "all" || which == "mma") {
    const int Ds[7] = {32, 40, 64, 80, 96, 128, 160};
    for (int mode : {1, 2}) {
      for (DType dt : {DType::kFloat16, DType::kBFloat16}) for (int D : Ds) {
        test_attn(dt, 1, 2, 70, 130, D, true, 0, true, mode);    // vector loads, fused QKV strides, tails
        test_attn(dt, 1, 1, 5, 1, D, false, 1, true, mode);      // Lk = 1, scalar loads
      }
      test_attn(DType::kFloat16, 2, 1, 64, 77, 40, false, 0, true, mode);  // context 77
      test_attn(DType::kBFloat16, 1, 1, 3, 200, 64, false, 0, false, mode);  // 4 key tiles, one query
      test_attn(DType::kBFloat16, 1, 2, 17, 130, 64, false, 0, true, mode, true);  // first tile all -inf
    }
    // wide: 128 query rows a CTA, so Q and O pass through both tile buffers.
    for (DType dt : {DType::kFloat16, DType::kBFloat16}) for (int D : {32, 40, 64, 80}) {
      test_attn(dt, 1, 2, 200, 130, D, true, 0, true, 4);      // 2 query blocks, the last of 72 rows
      test_attn(dt, 1, 1, 5, 1, D, false, 1, true, 4);         // Lk = 1, scalar loads
    }
    test_attn(DType::kFloat16, 2, 1, 128, 77, 40, false, 0, true, 4);    // one full block, context 77
    test_attn(DType::kBFloat16, 1, 2, 17, 130, 64, false, 0, true, 4, true);  // first tile all -inf
    test_attn(DType::kFloat16, 1, 1, 129, 64, 80, true, 0, true, 4);     // one key tile, 1 row in block 2
    test_attn(DType::kFloat16, 1, 2, 150, 100, 40, false, 0, true, 5);   // through attention(): wide
    test_attn(DType::kBFloat16, 1, 2, 70, 100, 96, false, 0, true, 5);   // D = 96: attention() runs mma
  }
  if (which == "all" || which == "mma") {
    // wgmma (mode 6; 7 through attention()): 128 query rows a CTA (2 warpgroups), 128-key tiles
    // (64 at D = 160) in two stages.
    const int Ds[7] = {32, 40, 64, 80, 96, 128, 160};
    for (DType dt : {DType::kFloat16, DType::kBFloat16}) for (int D : Ds) {
      test_attn(dt, 1, 2, 200, 300, D, true, 0, true, 6);   // 2 query blocks (the last of 72 rows), a partial key tile
      test_attn(dt, 1, 1, 5, 1, D, false, 1, true, 6);      // Lk = 1, scalar loads and stores
    }
    test_attn(DType::kFloat16, 2, 1, 128, 77, 40, false, 0, true, 6);      // one full block, context 77
    test_attn(DType::kBFloat16, 1, 2, 17, 200, 160, false, 0, true, 6, true);  // first tile (64 keys) all -inf
    test_attn(DType::kFloat16, 1, 1, 64, 256, 64, false, 0, false, 6);     // 2 full key tiles, no lse
    test_attn(DType::kBFloat16, 1, 1, 9, 300, 64, false, 0, true, 6, true, 128);  // first tile all -inf
    test_attn(DType::kFloat16, 1, 2, 70, 100, 80, false, 0, true, 7);      // through attention()
    // Overlapped: P V of tile t - 1 in flight during tile t's softmax, three stages.
    for (DType dt : {DType::kFloat16, DType::kBFloat16}) for (int D : {32, 40, 64, 80}) {
      test_attn(dt, 1, 2, 200, 600, D, true, 0, true, 8);   // 5 key tiles (stages 0 1 2 0 1), the last partial
      test_attn(dt, 1, 1, 5, 1, D, false, 1, true, 8);      // one tile: only the last P V
    }
    test_attn(DType::kFloat16, 1, 1, 64, 256, 64, false, 0, false, 8);     // 2 full key tiles
    test_attn(DType::kBFloat16, 1, 2, 17, 300, 40, false, 0, true, 8, true, 128);  // first tile (128 keys) all -inf
    test_attn(DType::kFloat16, 1, 2, 70, 300, 40, false, 0, true, 9);      // through attention()
    test_attn(DType::kBFloat16, 1, 1, 30, 200, 96, false, 0, true, 9);     // D = 96: plain wgmma
    // Ping-pong: a producer warpgroup two tiles ahead, 3 stages (4 overlapped), so from 4 (5) tiles on
    // it waits for stages both warpgroups released; the warpgroups take turns issuing.
    for (DType dt : {DType::kFloat16, DType::kBFloat16}) for (int D : Ds) {
      test_attn(dt, 1, 2, 200, D > 128 ? 300 : 600, D, true, 0, true, 10);  // 5 key tiles, the last partial
      test_attn(dt, 1, 1, 5, 1, D, false, 1, true, 10);                      // one tile, scalar loads
    }
    for (DType dt : {DType::kFloat16, DType::kBFloat16}) for (int D : {32, 40, 64, 80}) {
      test_attn(dt, 1, 2, 200, 900, D, true, 0, true, 11);  // 8 key tiles: stages 0-3 twice, the last partial
      test_attn(dt, 1, 1, 5, 1, D, false, 1, true, 11);     // one tile
    }
    // 1 to 7 key tiles (the last partial), plain stores (unaligned): every stage count the
    // producer and the consumers' releases meet, both variants.
    for (int n = 1; n <= 7; ++n) {
      test_attn(DType::kFloat16, 1, 1, 70, 128 * n - 3, 64, false, 1, true, 10);
      test_attn(DType::kBFloat16, 1, 1, 70, 128 * n - 3, 40, false, 1, true, 11);
    }
    test_attn(DType::kFloat16, 1, 1, 64, 256, 64, false, 0, false, 10);     // 2 full key tiles
    test_attn(DType::kFloat16, 1, 1, 64, 384, 64, false, 0, false, 11);     // 3 tiles: no stage reused
    test_attn(DType::kBFloat16, 1, 1, 20, 250, 160, false, 1, true, 10);   // 4 tiles of 64 keys, plain stores
    test_attn(DType::kBFloat16, 1, 2, 17, 600, 64, false, 0, true, 10, true, 128);  // first tile all -inf
    test_attn(DType::kBFloat16, 1, 2, 17, 600, 40, false, 0, true, 11, true, 128);
    test_attn(DType::kFloat16, 1, 2, 70, 300, 40, false, 0, true, 12);     // through attention()
    test_attn(DType::kFloat16, 1, 2, 70, 300, 80, false, 0, true, 13);
    test_attn(DType::kBFloat16, 1, 1, 30, 200, 96, false, 0, true, 13);    // D = 96: ping-pong, not overlapped
    // Ping-pong with 3 warpgroups (192 query rows a CTA; 3 stages), the turn going round all three.
    for (DType dt : {DType::kFloat16, DType::kBFloat16}) for (int D : {32, 40, 64, 80, 96}) {
      test_attn(dt, 1, 2, 250, 600, D, true, 0, true, 14);  // 2 query blocks (the last of 58 rows), 5 key tiles
      test_attn(dt, 1, 1, 5, 1, D, false, 1, true, 14);     // one tile, scalar loads; warpgroups 1, 2 past Lq
    }
    // Every stage count, plain stores (so a stage released early changes an operand under a wgmma
    // in the plain run, as cp.async copies land only at the wait); rows in all three warpgroups.
    for (int n = 1; n <= 7; ++n)
      test_attn(n % 2 ? DType::kFloat16 : DType::kBFloat16, 1, 1, 150, 128 * n - 3, n % 2 ? 64 : 40, false, 1, true, 14);
    test_attn(DType::kFloat16, 1, 1, 192, 384, 64, false, 0, false, 14);   // one full block, 3 full tiles
    test_attn(DType::kFloat16, 1, 2, 200, 300, 80, false, 0, true, 15);    // through attention()
    test_attn(DType::kBFloat16, 1, 1, 30, 200, 128, false, 0, true, 15);   // D = 128: 2 warpgroups
    // The same overlapped (4 stages; FlashAttention-3's configuration for head dims up to 64).
    for (DType dt : {DType::kFloat16, DType::kBFloat16}) for (int D : {32, 40, 64}) {
      test_attn(dt, 1, 2, 250, 900, D, true, 0, true, 16);  // 2 query blocks, 8 key tiles: stages 0-3 twice
      test_attn(dt, 1, 1, 5, 1, D, false, 1, true, 16);     // one tile: only the last P V
    }
    for (int n = 1; n <= 9; ++n)  // every stage count, plain stores, rows in all three warpgroups
      test_attn(n % 2 ? DType::kBFloat16 : DType::kFloat16, 1, 1, 150, 128 * n - 3, n % 3 ? 40 : 64, false, 1, true, 16);
    test_attn(DType::kFloat16, 1, 1, 192, 512, 32, false, 0, false, 16);   // one full block, 4 full tiles
    for (int mode : {14, 16}) {  // both 3-warpgroup kernels
      test_attn(DType::kFloat16, 1, 1, 70, 600, 64, false, 1, true, mode);     // warpgroup 2 wholly past Lq
      test_attn(DType::kBFloat16, 1, 2, 17, 600, 64, false, 0, true, mode, true, 128);  // first tile all -inf
      test_attn(DType::kFloat16, 2, 1, 400, 77, 40, false, 0, true, mode);     // context 77
    }
    test_attn(DType::kFloat16, 1, 2, 200, 300, 64, false, 0, true, 17);    // through attention()
    test_attn(DType::kBFloat16, 1, 1, 30, 200, 80, false, 0, true, 17);    // D = 80: not overlapped
    test_attn(DType::kBFloat16, 1, 1, 30, 200, 160, false, 0, true, 17);   // D = 160: 2 warpgroups
    // The tensor-core softmax takes the largest scaled score from the largest raw one and keeps
    // a masked key's -inf through the scale, so it needs a scale > 0: a negative or zero one
    // (uniform weights) goes to the SIMT kernel through attention().
    for (float sc : {-2.0f, 0.0f}) {
      g_attn_scale = sc;
      for (int mode : {5, 7, 15, 17}) test_attn(DType::kFloat16, 1, 2, 70, 300, 64, false, 0, true, mode);
    }
    g_attn_scale = 1.0f;
  }
  if (which == "all" || which == "short") {
    const int Ds[7] = {32, 40, 64, 80, 96, 128, 160};
    for (DType dt : {DType::kFloat16, DType::kBFloat16}) for (int D : Ds) {
      // 8 (b, h) on the emulator's 4 "SMs": 2 CTAs per (b, h), so each warp walks 2-3 blocks of
      // 16 rows with the Q prefetch; a last block of 12 rows; context 77 (5 key chunks, 3 padded).
      test_attn(dt, 2, 4, 300, 77, D, true, 0, true, 3);
      test_attn(dt, 1, 1, 5, 1, D, false, 1, true, 3);         // Lk = 1, scalar loads and stores
    }
    test_attn(DType::kFloat16, 1, 2, 64, 80, 40, false, 0, false, 3);   // the largest context
    test_attn(DType::kBFloat16, 1, 1, 33, 16, 64, false, 0, true, 3);   // one full key chunk
    test_attn(DType::kFloat16, 3, 1, 17, 17, 160, true, 1, true, 3);    // one key past a chunk, unaligned
    // Two tiles a warp: 300 rows are 10 blocks of 32, the last one's second tile past Lq; 48 rows
    // end on a block's first tile; Lk = 1 and unaligned; D = 160 falls back to one tile.
    for (DType dt : {DType::kFloat16, DType::kBFloat16}) for (int D : {32, 40, 64, 80}) {
      test_attn(dt, 2, 4, 300, 77, D, true, 0, true, 18);
      test_attn(dt, 1, 2, 48, 33, D, false, 1, true, 18);
    }
    test_attn(DType::kFloat16, 1, 1, 5, 1, 40, false, 1, true, 18);
    test_attn(DType::kBFloat16, 3, 1, 17, 17, 160, true, 1, true, 18);
  }
  if (which == "all" || which == "wgmma") {
    const int failed = emu_wgmma_check();
    char what[96];
    snprintf(what, sizeof what, "wgmma emulator self-test: %d cases failed", failed);
    report(failed == 0, what);
  }
  if (which == "race") {
    // One or two cases per kernel path, small enough for a ThreadSanitizer build (run.sh with
    // EMU_TSAN=1), which reports accesses that no barrier orders.
    const auto rows = cuda::GroupNormKernel::kRows, dflt = cuda::GroupNormKernel::kDefault;
    for (bool cl : {false, true}) {
      test_gn(DType::kFloat16, true, cl, true, true, 2, 32, 16, 4, 0, 0);     // fused
      test_gn(DType::kBFloat16, false, cl, false, true, 1, 64, 520, 2, 0, 0); // stream
    }
    test_gn(DType::kFloat16, true, true, true, true, 1, 128, 4099, 32, 0, 0, rows);
    test_gn(DType::kFloat32, true, true, false, true, 3, 64, 3000, 2, 0, 0, dflt);
    test_gn(DType::kFloat16, true, true, true, true, 1, 64, 300, 1, 0, 0, cuda::GroupNormKernel::kHeld);  // 5 CTAs
    test_gn(DType::kFloat16, true, false, true, true, 1, 2, 37000, 1, 0, 0);  // NCHW, 2 items a thread in shared memory
    test_geglu(DType::kFloat16, 5, 640, 1280, 0);                      // geglu, vector and scalar
    test_geglu(DType::kFloat32, 3, 37, 80, 1);
    test_attn(DType::kFloat16, 1, 2, 33, 70, 64, true, 0, true);        // SIMT
    test_attn(DType::kFloat32, 1, 1, 9, 130, 40, false, 0, true, 0, true);
    for (int mode : {1, 2}) {                                           // mma, pipelined and not
      test_attn(DType::kFloat16, 1, 2, 70, 130, 40, true, 0, true, mode);
      test_attn(DType::kBFloat16, 1, 1, 3, 200, 64, false, 0, false, mode);
    }
    test_attn(DType::kFloat16, 1, 1, 140, 130, 40, true, 0, true, 4);  // mma wide, a partial block
    test_attn(DType::kFloat16, 2, 4, 300, 77, 40, true, 0, true, 3);   // short, 2-3 Q blocks a warp
    test_attn(DType::kBFloat16, 1, 1, 33, 16, 64, false, 0, true, 3);
    test_attn(DType::kFloat16, 2, 4, 300, 77, 40, true, 0, true, 18);  // short, two tiles a warp
    test_attn(DType::kFloat16, 1, 1, 140, 300, 40, true, 0, true, 6);  // wgmma: 2 blocks, 3 key tiles (2 stages)
    test_attn(DType::kFloat16, 1, 1, 140, 500, 64, true, 0, true, 8);  // wgmma overlapped: 4 key tiles (3 stages)
    test_attn(DType::kFloat16, 1, 1, 140, 600, 40, true, 0, true, 10); // ping-pong: 5 key tiles (3 stages)
    test_attn(DType::kBFloat16, 1, 1, 70, 700, 64, true, 0, true, 11); // ping-pong overlapped: 6 key tiles (4 stages)
    test_attn(DType::kFloat16, 1, 1, 250, 600, 40, true, 0, true, 14); // ping-pong, 3 warpgroups: 2 blocks, 5 tiles
    test_attn(DType::kBFloat16, 1, 1, 250, 700, 64, true, 0, true, 16); // the same overlapped: 6 tiles (4 stages)
  }
  printf("%d/%d checks passed\n", checks - failures, checks);
  return failures != 0;
}
