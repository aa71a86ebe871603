// GroupNorm (+ per-(n, c) emb added before it, + SiLU after it) for NCHW and channels_last.
//
// Two kernels here own whole groups, so that no statistics travel through device memory:
//  * fused:  one CTA per (n, g) when the group fits in 47 KB of shared memory as float. The
//            group is read once into shared memory, the mean and the variance are computed in
//            two exact passes over it, and the output is written from it.
//  * stream: for larger groups. A cluster of K CTAs (K = 1 below sm_90) per (n, g), each CTA a
//            contiguous chunk of the group: pass 1 merges per-thread Welford statistics, the
//            cluster merges the K block results through distributed shared memory in rank order,
//            and pass 2 writes the output. NCHW with 16-byte items: where a thread's share of the
//            chunk fits kHoldItems registers plus kSmemHoldItems shared-memory slots (320 KB a
//            group at K = 1, 2.5 MB at K = 8: every SD U-Net and VAE group in fp16 but those of
//            the VAE's 256 x 512 x 512 level), pass 1 keeps it there and x is read once; else
//            pass 2 re-reads the chunk backwards.
// Large channels_last groups go by default to the held kernel (group_norm_silu_held.cu: x read
// once into the registers of one cooperative grid) where the resident CTAs can hold x, else from
// 256 x 256 pixels to the rows kernels (group_norm_silu_rows.cu: x read coalesced twice, meeting
// through a workspace), else to the stream kernel here.
// All reductions combine in a fixed order: results are bit-identical from run to run.
#include <cooperative_groups.h>

#include "common.cuh"
#include "group_norm_silu.cuh"
#include "mma.cuh"  // cp_async16

namespace ldmfast::cuda {
namespace {

using namespace detail;

constexpr int kFusedThreads = 256;
constexpr int kStreamThreads = 512;
constexpr int kUnroll = 4;                   // items loaded before the first is used
constexpr int kMaxCluster = 8;               // portable cluster size
constexpr int kHoldItems = 16;               // stream kernel, NCHW: 16-byte items a thread may hold
constexpr int kSmemHoldItems = 24;           // ... and more in shared memory (192 KB at 512 threads)
constexpr size_t kHoldMaxSmem = static_cast<size_t>(kSmemHoldItems) * kStreamThreads * 16;

// Walks the elements of one group in "group order" i = ch * S + s (NCHW) or i = s * Cg + ch
// (channels_last), where the memory of the group is contiguous (NCHW) or Cg-long runs C apart.
// Advancing by a fixed step needs no division.
template <bool CL>
struct Cursor {
  int64_t major, minor, step_major, step_minor, extent;
  __host__ __device__ Cursor(const GnArgs& a, int64_t i0, int64_t step) {
    extent = CL ? a.Cg : a.S;
    major = i0 / extent;
    minor = i0 - major * extent;
    step_major = step / extent;
    step_minor = step - step_major * extent;
  }
  __host__ __device__ __forceinline__ void advance() {
    minor += step_minor;
    major += step_major;
    if (minor >= extent) {
      minor -= extent;
      ++major;
    }
  }
  __host__ __device__ __forceinline__ void retreat() {
    minor -= step_minor;
    major -= step_major;
    if (minor < 0) {
      minor += extent;
      --major;
    }
  }
  // Offset of the element in x / y, and its channel. For a vector item (V > 1) the host made
  // sure that the item lies in one channel (NCHW: S % V == 0) or in one run (CL: Cg % V == 0).
  __host__ __device__ __forceinline__ int64_t offset(const GnArgs& a, int64_t n, int64_t g) const {
    return CL ? n * a.CS + major * a.C + g * a.Cg + minor : n * a.CS + g * a.E + major * a.S + minor;
  }
  __host__ __device__ __forceinline__ int64_t channel(const GnArgs& a, int64_t g) const {
    return g * a.Cg + (CL ? minor : major);
  }
};

// x (+ emb) of the V elements at `off`, channels c.. (CL) or channel c (NCHW).
template <class T, int V, bool CL>
__device__ __forceinline__ void load_item(const GnArgs& a, int64_t n, int64_t off, int64_t c, float (&v)[V]) {
  load_vec<T, V>(static_cast<const T*>(a.x) + off, v);
  if (a.emb != nullptr) {
    const T* emb = static_cast<const T*>(a.emb) + n * a.C + c;
    if constexpr (CL) {
      float e[V];
      load_vec<T, V>(emb, e);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] += e[j];
    } else {
      const float e = to_float(*emb);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] += e;
    }
  }
}

// The group's first element (after the emb add): the statistics are taken about it. Against a
// large mean (1000 + N(0, 1)) v - shift is exact, and the mean about it is small, so it keeps the
// digits a float mean near 1000 would round away (6e-5, half an ulp, in every output).
template <class T, bool CL>
__device__ __forceinline__ float group_shift(const GnArgs& a, int64_t n, int64_t g) {
  Cursor<CL> c0(a, 0, 1);
  float v0[1];
  load_item<T, 1, CL>(a, n, c0.offset(a, n, g), c0.channel(a, g), v0);
  return v0[0];
}

// y = silu?((v - shift - mean) * rstd * w + b) for the V elements at `off`, mean taken about
// shift; kStream stores evict-first.
template <class T, class P, int V, bool CL, bool kStream = false>
__device__ __forceinline__ void store_item(const GnArgs& a, int64_t off, int64_t c, float shift, float mean,
                                           float rstd, float (&v)[V]) {
  float w[V], b[V];
  if constexpr (CL) {
    load_vec<P, V>(static_cast<const P*>(a.w) + c, w);
    load_vec<P, V>(static_cast<const P*>(a.b) + c, b);
  } else {
    const float w0 = to_float(static_cast<const P*>(a.w)[c]);
    const float b0 = to_float(static_cast<const P*>(a.b)[c]);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      w[j] = w0;
      b[j] = b0;
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    float t = ((v[j] - shift) - mean) * (rstd * w[j]) + b[j];
    if (a.silu) t = t / (1.0f + expf(-t));
    v[j] = t;
  }
  store_vec<T, V, kStream>(static_cast<T*>(a.y) + off, v);
}

template <int V>
__device__ __forceinline__ Welford item_welford(const float (&v)[V]) {
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < V; ++j) s += v[j];
  Welford w;
  w.n = static_cast<float>(V);
  w.mean = s * (1.0f / V);
  float m2 = 0.0f;
#pragma unroll
  for (int j = 0; j < V; ++j) m2 += (v[j] - w.mean) * (v[j] - w.mean);
  w.m2 = m2;
  return w;
}

template <class T, class P, int V, bool CL>
__global__ void __launch_bounds__(kFusedThreads) group_norm_silu_fused_kernel(const GnArgs a) {
  // The group after the emb add, item-major per lane position: element j of item k at
  // j * items + k, so that a warp's accesses hit consecutive words (no bank conflicts).
  extern __shared__ float vals[];
  __shared__ float red[32];
  static_assert((kFusedMaxElems + 32) * sizeof(float) <= 48 * 1024,
                "the fused kernel's shared memory must fit the 48 KB a launch gets without opting in");
  const int64_t n = blockIdx.x / a.G, g = blockIdx.x - n * a.G;
  const int64_t items = a.E / V;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;

  // Sum of (v - shift): it stays small even when the mean is large against the spread.
  const float shift = group_shift<T, CL>(a, n, g);
  float sum = 0.0f;
  Cursor<CL> cur(a, static_cast<int64_t>(threadIdx.x) * V, step);
  for (int64_t k = threadIdx.x; k < items; k += blockDim.x, cur.advance()) {
    float v[V];
    load_item<T, V, CL>(a, n, cur.offset(a, n, g), cur.channel(a, g), v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      vals[j * items + k] = v[j];
      sum += v[j] - shift;
    }
  }
  const float inv_e = 1.0f / static_cast<float>(a.E);
  const float mean = block_sum(sum, red) * inv_e;  // about shift
  float m2 = 0.0f;
  for (int64_t k = threadIdx.x; k < items; k += blockDim.x) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float d = (vals[j * items + k] - shift) - mean;
      m2 += d * d;
    }
  }
  const float rstd = 1.0f / sqrtf(block_sum(m2, red) * inv_e + a.eps);
  // Each thread reads back only the items it wrote: no barrier needed beyond block_sum's.
  Cursor<CL> out(a, static_cast<int64_t>(threadIdx.x) * V, step);
  for (int64_t k = threadIdx.x; k < items; k += blockDim.x, out.advance()) {
    float v[V];
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = vals[j * items + k];
    store_item<T, P, V, CL>(a, out.offset(a, n, g), out.channel(a, g), shift, mean, rstd, v);
  }
}

// NCHW held item: the 16-byte item at element i of group g (one channel: S % V == 0) as floats,
// plus the channel's emb.
template <class T, int V>
__device__ __forceinline__ void unpack_held(const GnArgs& a, int64_t n, int64_t g, int64_t i, const uint4& raw,
                                            float (&v)[V]) {
  static_assert(V == kVec16<T>, "a 16-byte item");
  unpack16<T>(raw, v);
  if (a.emb != nullptr) {
    const float e = to_float(static_cast<const T*>(a.emb)[n * a.C + g * a.Cg + i / a.S]);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] += e;
  }
}

// kHold (NCHW, 16-byte items, at most kHoldItems + kSmemHoldItems a thread): pass 1 keeps its
// items in registers, those past kHoldItems in dynamic shared memory (the host sizes it), and
// pass 2 writes from them, so x is read once.
template <class T, class P, int V, bool CL, bool kHold = false>
__global__ void __launch_bounds__(kStreamThreads) group_norm_silu_stream_kernel(const GnArgs a, const int K) {
  static_assert(!kHold || (!CL && V * sizeof(T) == 16), "held items are NCHW 16-byte vectors");
  // kHold: the thread's item kHoldItems + j at slot j * blockDim.x + threadIdx.x (a warp's 32
  // slots are 512 contiguous bytes).
  extern __shared__ uint4 held_slots[];
  uint4* const my_slots = held_slots + threadIdx.x;
  __shared__ Welford red[32];
  __shared__ float stats[2];
  const int64_t rank = blockIdx.x % K, ng = blockIdx.x / K;
  const int64_t n = ng / a.G, g = ng - n * a.G;
  const int64_t items = a.E / V;
  const int64_t per = ceil_div(items, K);
  const int64_t begin = imin(rank * per, items) * V, end = imin((rank + 1) * per, items) * V;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  const int64_t first = begin + static_cast<int64_t>(threadIdx.x) * V;
  const float shift = group_shift<T, CL>(a, n, g);  // the same element in every CTA of a cluster

  Welford acc;  // of v - shift
  // kHold: this thread's items, at first + u * step for u < held (an NCHW group is contiguous).
  uint4 raw[kHold ? kHoldItems : 1];
  const int held = kHold && first < end ? static_cast<int>(ceil_div(end - first, step)) : 0;
  if constexpr (kHold) {
    const T* xg = static_cast<const T*>(a.x) + n * a.CS + g * a.E;
    // Every load in flight before any is used: the shared-memory items' copies first (they land
    // while the register items are summed), then the register items.
    for (int u = kHoldItems; u < held; ++u)
      cp_async16(my_slots + (u - kHoldItems) * blockDim.x, xg + first + u * step, true);
    cp_async_commit();
#pragma unroll
    for (int u = 0; u < kHoldItems; ++u)
      raw[u] = u < held ? *reinterpret_cast<const uint4*>(xg + first + u * step) : make_uint4(0u, 0u, 0u, 0u);
    auto add = [&](int u, const uint4& item) {
      float v[V];
      unpack_held<T, V>(a, n, g, first + u * step, item, v);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] -= shift;
      acc = welford_merge(acc, item_welford<V>(v));
    };
#pragma unroll
    for (int u = 0; u < kHoldItems; ++u) {
      if (u >= held) break;
      add(u, raw[u]);
    }
    cp_async_wait_all();  // this thread's copies: only it reads its slots
    for (int u = kHoldItems; u < held; ++u) add(u, my_slots[(u - kHoldItems) * blockDim.x]);
  } else {
    Cursor<CL> cur(a, first, step);
    for (int64_t i = first; i < end; i += kUnroll * step) {
      float v[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * step < end) load_item<T, V, CL>(a, n, cur.offset(a, n, g), cur.channel(a, g), v[u]);
        cur.advance();
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * step >= end) break;
#pragma unroll
        for (int j = 0; j < V; ++j) v[u][j] -= shift;
        acc = welford_merge(acc, item_welford<V>(v[u]));
      }
    }
  }
  acc = block_welford(acc, red);  // valid in thread 0
  if (K > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    __shared__ Welford pub;  // this CTA's statistics, read by the cluster's peers
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0) pub = acc;
    cluster.sync();
    if (threadIdx.x == 0) {
      // Every CTA of the cluster merges the same K values in the same (rank) order.
      Welford t;
      for (int r = 0; r < K; ++r) t = welford_merge(t, *cluster.map_shared_rank(&pub, r));
      acc = t;
    }
    cluster.sync();  // no CTA exits while a peer may still read its `pub`
#else
    __trap();  // unreachable: the host launches clusters only for sm_90+ code
#endif
  }
  if (threadIdx.x == 0) {
    stats[0] = acc.mean;
    stats[1] = 1.0f / sqrtf(acc.m2 / acc.n + a.eps);
  }
  __syncthreads();
  const float mean = stats[0], rstd = stats[1];

  // Pass 2 walks the chunk backwards: what pass 1 read last is the likeliest still in L2 when the
  // tensor is larger than L2 (the VAE's 512x512 levels); then y is stored evict-first so that it
  // does not push that part of x out.
  if (first >= end) return;
  if constexpr (kHold) {  // nothing is re-read: plain stores
    auto put = [&](int u, const uint4& item) {
      const int64_t i = first + u * step;
      float v[V];
      unpack_held<T, V>(a, n, g, i, item, v);
      store_item<T, P, V, CL>(a, n * a.CS + g * a.E + i, g * a.Cg + i / a.S, shift, mean, rstd, v);
    };
#pragma unroll
    for (int u = 0; u < kHoldItems; ++u) {
      if (u >= held) break;
      put(u, raw[u]);
    }
    for (int u = kHoldItems; u < held; ++u) put(u, my_slots[(u - kHoldItems) * blockDim.x]);
    return;
  }
  const int64_t last = first + (end - 1 - first) / step * step;
  Cursor<CL> cur(a, last, step);
  for (int64_t i = last; i >= first; i -= kUnroll * step) {
    float v[kUnroll][V];
    int64_t off[kUnroll], ch[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      off[u] = cur.offset(a, n, g);
      ch[u] = cur.channel(a, g);
      if (i - u * step >= first) load_item<T, V, CL>(a, n, off[u], ch[u], v[u]);
      cur.retreat();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i - u * step >= first) {
        if (a.evict_first) {
          store_item<T, P, V, CL, true>(a, off[u], ch[u], shift, mean, rstd, v[u]);
        } else {
          store_item<T, P, V, CL, false>(a, off[u], ch[u], shift, mean, rstd, v[u]);
        }
      }
  }
}

// Whether the stream kernel instance may be launched as a cluster: an sm_90+ device running code
// compiled for sm_90+ (PTX for an older arch JIT-compiled on Hopper has the cluster path cut out).
template <class Kernel>
bool cluster_capable(Kernel kernel) {
  return cached_query(Query::kClusterCapable, reinterpret_cast<const void*>(kernel), 0, 0, [&] {
    if (device_attribute(cudaDevAttrComputeCapabilityMajor, 0) < 9) return 0;
    cudaFuncAttributes attr{};
    return call_ok(cudaFuncGetAttributes(&attr, kernel)) && attr.ptxVersion >= 90 ? 1 : 0;
  }) != 0;
}

// need_cluster (GroupNormKernel::kCluster): the groups kernel split over a cluster of at least
// two CTAs, cudaErrorNotSupported where no such launch is possible.
template <class T, class P, int V, bool CL>
int launch(const GnArgs& a, int64_t N, cudaStream_t stream, bool need_cluster) {
  const int64_t ng = N * a.G;
  if (a.E <= kFusedMaxElems) {
    if (need_cluster) return static_cast<int>(cudaErrorNotSupported);
    if (ng > INT32_MAX) return static_cast<int>(cudaErrorInvalidConfiguration);
    const size_t smem = static_cast<size_t>(a.E) * sizeof(float);
    group_norm_silu_fused_kernel<T, P, V, CL><<<static_cast<unsigned>(ng), kFusedThreads, smem, stream>>>(a);
    return launch_status();
  }
  auto kernel = group_norm_silu_stream_kernel<T, P, V, CL>;
  // Split a group over a cluster while the grid stays within one wave (as many CTAs as are
  // resident at once: one per SM for the vector kernels at 79-114 registers, ptxas sm_90a, two
  // for the scalar ones at 64) and each CTA keeps at least two items per thread. One wave, not
  // "while short of one": doubling a grid of 128 to 256 on 132 SMs made two waves, each with its
  // own passes and cluster barrier; on the H100 (3ca7a93, fp16 NCHW) groups of 20480 and 30720
  // elements (K = 2, 128 CTAs) took 11-12.5 us, those of 40960 (K = 4) 30 us.
  int K = 1;
  const bool clusters = cluster_capable(kernel);
  if (clusters) {
    const int64_t target = static_cast<int64_t>(blocks_per_sm(kernel, kStreamThreads, 0)) * sm_count();
    const int64_t min_work = static_cast<int64_t>(kStreamThreads) * V * 2;
    while (K < kMaxCluster && ng * K * 2 <= target && a.E / (2 * K) >= min_work) K *= 2;
    if (need_cluster && K == 1 && a.E / 2 >= min_work) K = 2;
  }
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  cfg.blockDim = dim3(kStreamThreads);
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // Whether a cluster of k CTAs of `kern` with `smem` bytes each fits in one GPC (a MIG slice or
  // a busy MPS share may not offer that).
  auto cluster_fits = [&](auto kern, int k, size_t smem) {
    cfg.gridDim = dim3(static_cast<unsigned>(imin(ng * k, INT32_MAX)));
    cfg.dynamicSmemBytes = smem;
    attr[0].val.clusterDim.x = static_cast<unsigned>(k);
    return cached_query(Query::kActiveClusters, reinterpret_cast<const void*>(kern), k, static_cast<int64_t>(smem), [&] {
             int n = 0;
             return call_ok(cudaOccupancyMaxActiveClusters(&n, kern, &cfg)) ? n : 0;
           }) > 0;
  };
  while (K > 1 && !cluster_fits(kernel, K, 0)) K /= 2;
  if (need_cluster && K == 1) return static_cast<int>(cudaErrorNotSupported);
  // NCHW 16-byte items: where each thread's share of its chunk fits kHoldItems registers and
  // kSmemHoldItems shared-memory slots, the held instance reads x once. Where it does not at the
  // K above, more CTAs per group (up to the cluster limit) give each a smaller share: the grid
  // then takes more than one wave, each reading its part once, where the plain instance would
  // read all of x twice (more than L2 holds at the VAE's 512 x 512 levels).
  size_t smem = 0;
  if constexpr (!CL && V * sizeof(T) == 16) {
    auto held = group_norm_silu_stream_kernel<T, P, V, CL, true>;
    auto per_thread = [&](int k) { return ceil_div(ceil_div(a.E / V, k), kStreamThreads); };
    int kh = K;
    while (per_thread(kh) > kHoldItems + kSmemHoldItems && kh < kMaxCluster && clusters) kh *= 2;
    const int64_t extra = per_thread(kh) - kHoldItems;  // items a thread keeps in shared memory
    if (extra <= kSmemHoldItems) {
      const size_t bytes = extra > 0 ? static_cast<size_t>(extra) * kStreamThreads * sizeof(uint4) : 0;
      // The opt-in asked once at the most any shape takes (allow_dynamic_smem keeps one size).
      const bool smem_ok = bytes <= 48 * 1024 || allow_dynamic_smem(held, kHoldMaxSmem) == 0;
      if (smem_ok && (kh == 1 || cluster_fits(held, kh, bytes))) {
        kernel = held;
        K = kh;
        smem = bytes;
      }
    }
  }
  if (ng * K > INT32_MAX) return static_cast<int>(cudaErrorInvalidConfiguration);
  const unsigned grid = static_cast<unsigned>(ng * K);
  if (K == 1) {
    kernel<<<grid, kStreamThreads, smem, stream>>>(a, 1);
    return launch_status();
  }
  cfg.gridDim = dim3(grid);
  attr[0].val.clusterDim.x = static_cast<unsigned>(K);
  cfg.dynamicSmemBytes = smem;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, a, K);
  const int last = launch_status();
  return err != cudaSuccess ? static_cast<int>(err) : last;
}

// Vector items need pointers aligned for them and an item that stays in one channel (NCHW:
// S % V == 0) or in one run of the group's channels (channels_last: Cg % V == 0; emb, weight and
// bias are then read as vectors too). NCHW takes 16-byte items or scalars; channels_last also 4-
// and 8-byte items, as U-Net and VAE groups are often 4, 10, 20, 30 or 60 channels wide.
template <class T, class P>
int dispatch(const GroupNormSiluParams& p, const GnArgs& a, cudaStream_t stream, bool nc) {
  constexpr int V = kVec16<T>;
  if (p.channels_last) {
    auto fits = [&](int v) {
      const int tb = v * static_cast<int>(sizeof(T)), pb = v * static_cast<int>(sizeof(P));
      return a.Cg % v == 0 && aligned_for(p.x, tb) && aligned_for(p.y, tb) && aligned_for(p.weight, pb) &&
             aligned_for(p.bias, pb) && (p.emb == nullptr || aligned_for(p.emb, tb));
    };
    if (fits(V)) return launch<T, P, V, true>(a, p.N, stream, nc);
    if constexpr (V >= 8) {
      if (fits(V / 2)) return launch<T, P, V / 2, true>(a, p.N, stream, nc);
    }
    if (fits(2)) return launch<T, P, 2, true>(a, p.N, stream, nc);
    return launch<T, P, 1, true>(a, p.N, stream, nc);
  }
  const bool vec = aligned16(p.x) && aligned16(p.y) && a.S % V == 0;
  return vec ? launch<T, P, V, false>(a, p.N, stream, nc) : launch<T, P, 1, false>(a, p.N, stream, nc);
}

template <class T>
int dispatch_param(const GroupNormSiluParams& p, const GnArgs& a, cudaStream_t stream, bool nc) {
  if (p.param_dtype == DType::kFloat32) return dispatch<T, float>(p, a, stream, nc);
  if (p.param_dtype == p.dtype) return dispatch<T, T>(p, a, stream, nc);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

namespace {

// kDefault takes the rows kernels from this many pixels up (where the held kernel cannot hold x).
// Measured on an H100 (fp16, 2026-11-24, commit 3ca7a93; rows vs groups, us): they win at the
// VAE's large levels (1x128x512x512 115 vs 492, 1x256x256x256 90 vs 134, 1x512x256x256 157 vs
// 181) and lose below, badly where C is large and S small (1x512x128x128 88 vs 63, 2x1280x32x32
// 146 vs 32, 2x2560x16x16 352 vs 11).
constexpr int64_t kRowsMinPixels = 256 * 256;

// channels_last groups over the one-CTA limit: the only ones the kernel choice is about.
bool large_cl_groups(const GroupNormSiluParams& p) {
  return p.channels_last && p.G > 0 && p.C % p.G == 0 && (p.C / p.G) * p.S > kFusedMaxElems;
}

// kHeld, or kDefault wherever the held kernel takes p: it reads x once where the others read it
// twice (not yet timed on a GPU; bench_ops_cuda.py times it beside the rows and groups kernels).
bool held_chosen(const GroupNormSiluParams& p, GroupNormKernel kernel, bool have_workspace) {
  if (!large_cl_groups(p)) return false;
  if (kernel == GroupNormKernel::kHeld) return true;
  return kernel == GroupNormKernel::kDefault && have_workspace && held_supported(p);
}

bool rows_chosen(const GroupNormSiluParams& p, GroupNormKernel kernel, bool have_workspace) {
  if (!large_cl_groups(p)) return false;
  if (kernel == GroupNormKernel::kGroups || kernel == GroupNormKernel::kCluster || kernel == GroupNormKernel::kHeld)
    return false;
  if (kernel == GroupNormKernel::kDefault && (!have_workspace || p.S < kRowsMinPixels)) return false;
  return rows_supported(p);
}

}  // namespace

int64_t group_norm_silu_workspace_bytes(const GroupNormSiluParams& p, GroupNormKernel kernel) {
  if (p.N <= 0 || p.C <= 0 || p.S <= 0) return 0;
  if (held_chosen(p, kernel, true)) return held_supported(p) ? held_workspace_bytes(p) : 0;
  return rows_chosen(p, kernel, true) ? rows_workspace_bytes(p) : 0;
}

int group_norm_silu(const GroupNormSiluParams& p, cudaStream_t stream, void* workspace, GroupNormKernel kernel) {
  if (p.N <= 0 || p.C <= 0 || p.S <= 0) return 0;
  if (p.G <= 0 || p.C % p.G != 0) return static_cast<int>(cudaErrorInvalidValue);
  GnArgs a;
  a.x = p.x;
  a.emb = p.emb;
  a.w = p.weight;
  a.b = p.bias;
  a.y = p.y;
  a.C = p.C;
  a.S = p.S;
  a.G = p.G;
  a.Cg = p.C / p.G;
  a.E = a.Cg * p.S;
  a.CS = p.C * p.S;
  a.eps = p.eps;
  a.silu = p.silu;
  // Evict-first stores only help when x does not fit in L2; below that they would only cost the
  // next op its L2 hits on y.
  a.evict_first = p.N * a.CS * dtype_size(p.dtype) > l2_bytes();
  if (held_chosen(p, kernel, workspace != nullptr)) {
    if (!held_supported(p)) return static_cast<int>(cudaErrorNotSupported);  // kHeld only
    if (workspace == nullptr || !aligned16(workspace)) return static_cast<int>(cudaErrorInvalidValue);
    const int err = group_norm_silu_held(p, a, workspace, stream);
    // kDefault: a device that refuses the cooperative grid after all takes the groups kernel.
    if (err != static_cast<int>(cudaErrorCooperativeLaunchTooLarge) || kernel == GroupNormKernel::kHeld) return err;
  } else if (rows_chosen(p, kernel, workspace != nullptr)) {
    if (workspace == nullptr || !aligned16(workspace)) return static_cast<int>(cudaErrorInvalidValue);
    return group_norm_silu_rows(p, a, workspace, stream);
  }
  const bool nc = kernel == GroupNormKernel::kCluster;
  switch (p.dtype) {
    case DType::kFloat32: return dispatch_param<float>(p, a, stream, nc);
    case DType::kFloat16: return dispatch_param<__half>(p, a, stream, nc);
    case DType::kBFloat16: return dispatch_param<__nv_bfloat16>(p, a, stream, nc);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace ldmfast::cuda
