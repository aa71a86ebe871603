// GroupNorm (+ emb, + SiLU) for channels_last groups too large for one CTA, by pixel rows.
//
// In channels_last a group is a run of Cg channels every C elements: 8 bytes at the VAE's
// 128-channel levels (Cg = 4, fp16), 20 bytes at the U-Net's 320. A kernel that walks one group
// uses a fraction of every 32-byte sector it touches, and the rest crosses from L2 again for the
// CTAs of the neighbouring groups. These two kernels read whole rows of C channels instead, each
// thread a fixed 16-byte column of channels, consecutive threads on consecutive bytes:
//  * stats: CTA (n, k) owns the pixels [k * per, (k + 1) * per) of sample n. Each thread sums its
//           column over its pixels; the CTA merges per channel, then per group, and writes one
//           Welford per (n, k, g) to the workspace.
//  * apply: CTA (n, k) merges the K partials of every group of sample n, then re-reads its pixels
//           last first (what the stats pass read last is the likeliest still in L2) and writes y
//           evict-first.
// x is read twice, y written once; every merge runs in a fixed order (bit-identical results).
#include <type_traits>

#include "common.cuh"
#include "group_norm_silu.cuh"

namespace ldmfast::cuda::detail {
namespace {

constexpr int kRowThreads = 512;  // threads per CTA at most
constexpr int kRowUnroll = 4;     // pixel rows loaded before the first is used
constexpr int kMaxApplySmem = 48 * 1024;
constexpr int kWarpMergeMinRows = 8;  // the stats' per-channel merge: a warp per channel from here

struct RowShape {
  int V = 1;        // elements per 16-byte column
  int tpr = 0;      // threads per pixel row (C / V)
  int rows = 0;     // pixel rows a CTA covers at once
  int64_t K = 0;    // chunks per sample
  int64_t per = 0;  // pixels per chunk
};

int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }

template <class T, int V>
__global__ void __launch_bounds__(kRowThreads)
    rows_stats_kernel(const GnArgs a, const int tpr, const int64_t per, const int64_t K, Welford* part);
template <class T, class P, int V>
__global__ void __launch_bounds__(kRowThreads)
    rows_apply_kernel(const GnArgs a, const int tpr, const int64_t per, const int64_t K, const Welford* part);

size_t stats_smem_bytes(const RowShape& r, int64_t C) {
  return (r.rows + static_cast<size_t>(r.rows) * (2 * C + 1)) * sizeof(float);
}
size_t apply_smem_bytes(int64_t G) { return 2 * static_cast<size_t>(G) * sizeof(float); }

// CTAs of both kernels that fit on one SM at once (at least 1).
template <class T, class P>
int occupancy(const RowShape& r, int64_t C, int64_t G) {
  constexpr int V = kVec16<T>;
  const int threads = r.rows * r.tpr;
  const int s = blocks_per_sm(rows_stats_kernel<T, V>, threads, stats_smem_bytes(r, C));
  const int ap = blocks_per_sm(rows_apply_kernel<T, P, V>, threads, apply_smem_bytes(G));
  return s < ap ? s : ap;
}

int ctas_per_sm(const GroupNormSiluParams& p, const RowShape& r) {
  const bool p32 = p.param_dtype == DType::kFloat32;
  switch (p.dtype) {
    case DType::kFloat32: return occupancy<float, float>(r, p.C, p.G);
    case DType::kFloat16: return p32 ? occupancy<__half, float>(r, p.C, p.G) : occupancy<__half, __half>(r, p.C, p.G);
    case DType::kBFloat16:
      return p32 ? occupancy<__nv_bfloat16, float>(r, p.C, p.G) : occupancy<__nv_bfloat16, __nv_bfloat16>(r, p.C, p.G);
  }
  return 1;
}

// Zero tpr when the shape is not one the kernels take.
RowShape row_shape(const GroupNormSiluParams& p) {
  RowShape r;
  r.V = 16 / dtype_size(p.dtype);
  if (p.C % r.V != 0) return r;
  const int64_t tpr = p.C / r.V;
  if (tpr > kRowThreads) return r;
  r.tpr = static_cast<int>(tpr);
  // Whole warps: rows a multiple of 32 / gcd(tpr, 32) (the merges use full-warp shuffles).
  const int q = 32 / gcd(r.tpr, 32);
  r.rows = (kRowThreads / r.tpr) / q * q;
  if (r.rows == 0) {
    r.tpr = 0;
    return r;
  }
  // One wave of CTAs over the batch (as many as fit on the device at once), each with at least
  // four rounds of rows: a second wave would find the first one's data evicted from L2.
  const int64_t target = ceil_div(ctas_per_sm(p, r) * static_cast<int64_t>(sm_count()), p.N);
  int64_t K = imin(target, p.S / (4 * static_cast<int64_t>(r.rows)));
  if (K < 1) K = 1;
  r.per = ceil_div(p.S, K);
  r.K = ceil_div(p.S, r.per);
  return r;
}

// One warp merges the statistics src(0), ..., src(m - 1): lane l takes l, l + 32, ... in turn,
// then the warp tree. A fixed order: the same bits every run. Valid in lane 0.
template <class F>
__device__ __forceinline__ Welford warp_merge(int64_t m, F src) {
  Welford acc;
  for (int64_t i = threadIdx.x & 31; i < m; i += 32) acc = welford_merge(acc, src(i));
  return warp_welford(acc);
}

template <class T, int V>
__global__ void __launch_bounds__(kRowThreads)
    rows_stats_kernel(const GnArgs a, const int tpr, const int64_t per, const int64_t K, Welford* part) {
  // cnt[rows], then (mean, m2) of every (row, channel), rows 2C + 1 floats apart (a warp's lanes
  // read one channel of 32 rows: an even stride would put them in one bank); row 0 later holds
  // the per-channel merge.
  extern __shared__ float sm[];
  const int rows = blockDim.x / tpr;
  const int64_t ld = 2 * a.C + 1;
  float* cnt = sm;
  float* mm = sm + rows;
  const int64_t n = blockIdx.x / K, k = blockIdx.x - n * K;
  const int r = threadIdx.x / tpr, col = threadIdx.x - r * tpr;
  const int64_t c0 = static_cast<int64_t>(col) * V;
  const int64_t s_begin = k * per, s_end = imin(s_begin + per, a.S);
  const T* x = static_cast<const T*>(a.x) + n * a.CS + c0;

  float e[V] = {};
  if (a.emb != nullptr) load_vec<T, V>(static_cast<const T*>(a.emb) + n * a.C + c0, e);
  // Sums of (v - shift), shift = this thread's first value of each channel, so that the sums
  // and sq - sum^2 / n stay small even when the mean is large against the spread (or the group's
  // first element lies far out); the mean is then stored about the group's first element.
  float shift[V] = {}, gshift[V], sum[V] = {}, sq[V] = {};
#pragma unroll
  for (int j = 0; j < V; ++j) gshift[j] = cl_group_shift<T>(a, n, c0 + j);
  const int64_t first = s_begin + r;
  if (first < s_end) {
    load_vec<T, V>(x + first * a.C, shift);
#pragma unroll
    for (int j = 0; j < V; ++j) shift[j] += e[j];
  }
  for (int64_t s = first; s < s_end; s += kRowUnroll * rows) {
    float v[kRowUnroll][V];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u)
      if (s + u * rows < s_end) load_vec<T, V>(x + (s + u * rows) * a.C, v[u]);
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      if (s + u * rows >= s_end) break;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = v[u][j] + e[j] - shift[j];
        sum[j] += d;
        sq[j] += d * d;
      }
    }
  }
  const int64_t mine = first < s_end ? ceil_div(s_end - first, rows) : 0;
  const float fn = static_cast<float>(mine);
  if (col == 0) cnt[r] = fn;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    float* o = mm + r * ld + 2 * (c0 + j);
    o[0] = mine > 0 ? (shift[j] - gshift[j]) + sum[j] / fn : 0.0f;  // about the group's first element
    o[1] = mine > 0 ? fmaxf(sq[j] - sum[j] * (sum[j] / fn), 0.0f) : 0.0f;
  }
  __syncthreads();

  // Per channel over the rows; row 0 takes the result. Few rows (wide C: 1 row at C = 2560 fp16)
  // are merged by one thread per channel in row order; a warp per channel would take C / nwarps
  // turns of a 5-level shuffle tree for it (256 at 2x2560x16x16, most of the 352 us the H100
  // took there at 3ca7a93). Many rows (narrow C: 32 rows at C = 128) keep the warp per channel.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  auto row_stat = [&](int64_t i, int64_t c) {
    Welford t;
    t.n = cnt[i];
    t.mean = mm[i * ld + 2 * c];
    t.m2 = mm[i * ld + 2 * c + 1];
    return t;
  };
  if (rows < kWarpMergeMinRows) {
    for (int64_t c = threadIdx.x; c < a.C; c += blockDim.x) {  // only this thread touches channel c
      Welford w;
      for (int i = 0; i < rows; ++i) w = welford_merge(w, row_stat(i, c));
      mm[2 * c] = w.mean;
      mm[2 * c + 1] = w.m2;
    }
  } else {
    for (int64_t c = warp; c < a.C; c += nwarps) {
      const Welford w = warp_merge(rows, [&](int64_t i) { return row_stat(i, c); });
      if (lane == 0) {  // the only lane that read row 0 of channel c (i = 0)
        mm[2 * c] = w.mean;
        mm[2 * c + 1] = w.m2;
      }
    }
  }
  __syncthreads();
  // Per group over its channels (every channel has the same count), one warp per group.
  const float chunk_n = static_cast<float>(s_end - s_begin);
  for (int64_t g = warp; g < a.G; g += nwarps) {
    const Welford w = warp_merge(a.Cg, [&](int64_t i) {
      Welford t;
      t.n = chunk_n;
      t.mean = mm[2 * (g * a.Cg + i)];
      t.m2 = mm[2 * (g * a.Cg + i) + 1];
      return t;
    });
    if (lane == 0) part[(n * K + k) * a.G + g] = w;
  }
}

template <class T, class P, int V>
__global__ void __launch_bounds__(kRowThreads)
    rows_apply_kernel(const GnArgs a, const int tpr, const int64_t per, const int64_t K, const Welford* part) {
  extern __shared__ float st[];  // mean[G], rstd[G]
  const int rows = blockDim.x / tpr;
  // Chunks in the reverse of the stats launch: the last wave of stats CTAs read the data most
  // likely still in L2, and the first wave of apply CTAs reads it.
  const int64_t b = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t n = b / K, k = b - n * K;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t g = warp; g < a.G; g += nwarps) {
    const Welford w = warp_merge(K, [&](int64_t i) { return part[(n * K + i) * a.G + g]; });
    if (lane == 0) {
      st[g] = w.mean;
      st[a.G + g] = 1.0f / sqrtf(w.m2 / w.n + a.eps);
    }
  }
  __syncthreads();

  const int r = threadIdx.x / tpr, col = threadIdx.x - r * tpr;
  const int64_t c0 = static_cast<int64_t>(col) * V;
  float e[V] = {}, shift[V], mean[V], scale[V], bias[V];
  if (a.emb != nullptr) load_vec<T, V>(static_cast<const T*>(a.emb) + n * a.C + c0, e);
  load_vec<P, V>(static_cast<const P*>(a.w) + c0, scale);
  load_vec<P, V>(static_cast<const P*>(a.b) + c0, bias);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int64_t g = (c0 + j) / a.Cg;
    shift[j] = cl_group_shift<T>(a, n, c0 + j);
    mean[j] = st[g];  // about shift
    scale[j] *= st[a.G + g];
  }
  const int64_t s_begin = k * per, s_end = imin(s_begin + per, a.S);
  const int64_t first = s_begin + r;
  if (first >= s_end) return;
  const int64_t last = first + (s_end - 1 - first) / rows * rows;
  const T* x = static_cast<const T*>(a.x) + n * a.CS + c0;
  T* y = static_cast<T*>(a.y) + n * a.CS + c0;
  // One copy of the loop per store kind, so the branch is not in it (fp32 spilled otherwise).
  auto walk = [&](auto evict_first) {
    for (int64_t s = last; s >= first; s -= kRowUnroll * rows) {
      float v[kRowUnroll][V];
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u)
        if (s - u * rows >= first) load_vec<T, V>(x + (s - u * rows) * a.C, v[u]);
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        if (s - u * rows < first) break;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          float t = ((v[u][j] + e[j] - shift[j]) - mean[j]) * scale[j] + bias[j];
          if (a.silu) t = t / (1.0f + expf(-t));
          v[u][j] = t;
        }
        store_vec<T, V, decltype(evict_first)::value>(y + (s - u * rows) * a.C, v[u]);
      }
    }
  };
  if (a.evict_first) {
    walk(std::true_type{});
  } else {
    walk(std::false_type{});
  }
}

template <class T, class P>
int launch_rows(const GnArgs& a, int64_t N, const RowShape& r, Welford* part, cudaStream_t stream) {
  constexpr int V = kVec16<T>;
  const int64_t grid = N * r.K;
  if (grid > INT32_MAX) return static_cast<int>(cudaErrorInvalidConfiguration);
  const unsigned threads = static_cast<unsigned>(r.rows * r.tpr);
  const size_t stats_smem = stats_smem_bytes(r, a.C), apply_smem = apply_smem_bytes(a.G);
  rows_stats_kernel<T, V><<<static_cast<unsigned>(grid), threads, stats_smem, stream>>>(a, r.tpr, r.per, r.K, part);
  const int err = launch_status();
  if (err != 0) return err;
  rows_apply_kernel<T, P, V><<<static_cast<unsigned>(grid), threads, apply_smem, stream>>>(a, r.tpr, r.per, r.K, part);
  return launch_status();
}

}  // namespace

bool rows_supported(const GroupNormSiluParams& p) {
  if (p.param_dtype != DType::kFloat32 && p.param_dtype != p.dtype) return false;
  const RowShape r = row_shape(p);
  if (r.tpr == 0) return false;
  const int pbytes = r.V * dtype_size(p.param_dtype);
  // Stats scratch: at most rows * (2C + 1) + rows floats, rows * C <= 512 threads * 8: 37 KB.
  return aligned16(p.x) && aligned16(p.y) && (p.emb == nullptr || aligned16(p.emb)) &&
         aligned_for(p.weight, pbytes) && aligned_for(p.bias, pbytes) &&
         2 * p.G * static_cast<int64_t>(sizeof(float)) <= kMaxApplySmem;
}

int64_t rows_workspace_bytes(const GroupNormSiluParams& p) {
  return p.N * row_shape(p).K * p.G * static_cast<int64_t>(sizeof(Welford));
}

int group_norm_silu_rows(const GroupNormSiluParams& p, const GnArgs& a, void* workspace, cudaStream_t stream) {
  const RowShape r = row_shape(p);
  Welford* part = static_cast<Welford*>(workspace);
  const bool p32 = p.param_dtype == DType::kFloat32;
  switch (p.dtype) {
    case DType::kFloat32: return launch_rows<float, float>(a, p.N, r, part, stream);
    case DType::kFloat16:
      return p32 ? launch_rows<__half, float>(a, p.N, r, part, stream)
                 : launch_rows<__half, __half>(a, p.N, r, part, stream);
    case DType::kBFloat16:
      return p32 ? launch_rows<__nv_bfloat16, float>(a, p.N, r, part, stream)
                 : launch_rows<__nv_bfloat16, __nv_bfloat16>(a, p.N, r, part, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace ldmfast::cuda::detail
