// GroupNorm (+ emb, + SiLU) for channels_last tensors that the CTAs resident at once can hold in
// registers and shared memory: x is read once and y written once, the least memory traffic there
// is.
//
// In channels_last every pixel row holds every group, so no output can be written before all of
// a sample has been read. The other channels_last paths therefore read x twice (rows: two
// launches meeting in a workspace; groups: a cluster per group, reading its narrow runs of
// channels strided C apart, most of each 32-byte sector unused). This kernel is one cooperative
// launch of at most the resident CTAs: CTA (n, k) loads its chunk of pixel rows of sample n (16-
// byte columns, all loads in flight at once), writes the chunk's statistics per group to the
// workspace, waits at a grid barrier, merges the K chunks of each group of its sample, and writes
// y from what it holds.
// 512 threads x 14 items x 16 bytes = 112 KB a CTA in registers, plus up to kHeldSlots more
// items a thread in shared memory (192 KB), one CTA per SM: 41 MB on an H100's 132 SMs, every
// U-Net level of SD at 512 x 512 (2 x 960 x 64 x 64 fp16 is 15.7 MB) and the VAE's up to
// 256 x 256 x 256. Past that, a thread's further items are streamed: prefetched to L2 with the
// others, folded into its statistics one by one, and read again (first, while they are the most
// recently used lines in L2) after the barrier. That takes x up to the held part plus L2's size
// (the VAE's 67 MB levels, 128 x 512 x 512 and 512 x 256 x 256 in fp16): x is then read from
// DRAM at most once plus what L2 loses of the streamed part, where the rows kernels read it twice
// (less what L2 keeps). Larger tensors take the rows or groups kernels.
// Every merge runs in a fixed order: results are bit-identical from run to run.
#include <cooperative_groups.h>

#include <type_traits>

#include "common.cuh"
#include "group_norm_silu.cuh"
#include "mma.cuh"  // cp_async16

namespace ldmfast::cuda::detail {
namespace {

constexpr int kHeldThreads = 512;  // threads per CTA at most
// 16-byte columns a thread holds in registers: 14 keeps every instance within the 128 registers
// of the 512-thread bound without spills (16 spilled 80 bytes in the 16-bit ones, ptxas sm_90a).
constexpr int kHeldItems = 14;
constexpr int kHeldSlots = 24;     // ... and at most this many in shared memory
constexpr size_t kHeldMaxSmem = 227 * 1024;  // an H100's most per CTA (the kernel has no static part)

struct HeldShape {
  int tpr = 0;      // threads per pixel row (C / V); 0: p is not held
  int rows = 0;     // pixel rows a CTA covers at once
  int64_t K = 0;    // chunks (CTAs) per sample
  int64_t per = 0;  // pixels per chunk
  int slots = 0;    // items a thread keeps in shared memory
};

// Statistics written by other CTAs before the grid barrier: read at L2, past this SM's L1.
__device__ __forceinline__ Welford load_l2(const Welford* p) {
#if defined(__CUDA_ARCH__)
  Welford w;
  w.n = __ldcg(&p->n);
  w.mean = __ldcg(&p->mean);
  w.m2 = __ldcg(&p->m2);
  return w;
#else
  return *p;  // the CPU emulator
#endif
}

// Dynamic shared memory: cnt[rows], then the mean and m2 of every (row, channel) as two
// rows x C planes (a thread's V channels are contiguous in each), then mean[G] and rstd[G]; from
// the next 16 bytes the item slots, `slots` a thread (slot j of thread t at j * threads + t, so a
// warp's 32 are 512 contiguous bytes).
__host__ __device__ inline size_t held_stats_floats(int rows, int64_t C, int64_t G) {
  return (static_cast<size_t>(rows) * (1 + 2 * C) + 2 * static_cast<size_t>(G) + 3) / 4 * 4;
}
size_t held_smem_bytes(int rows, int64_t C, int64_t G, int threads, int slots) {
  return held_stats_floats(rows, C, G) * sizeof(float) + static_cast<size_t>(threads) * slots * sizeof(uint4);
}

template <class T, class P, int V>
__global__ void __launch_bounds__(kHeldThreads, 1)
    held_kernel(const GnArgs a, const int tpr, const int64_t per, const int64_t K, Welford* part, const int slots) {
  extern __shared__ float sm[];
  const int rows = blockDim.x / tpr;
  // Shared-memory indices in 32 bits: rows * C is at most the 512 threads' 16 bytes of channels.
  const int C = static_cast<int>(a.C), G = static_cast<int>(a.G), Cg = static_cast<int>(a.Cg);
  float* cnt = sm;
  float* mu = sm + rows;
  float* sq = mu + rows * C;
  float* st = sq + rows * C;
  uint4* my_slots = reinterpret_cast<uint4*>(sm + held_stats_floats(rows, C, G)) + threadIdx.x;
  const int64_t n = blockIdx.x / K, k = blockIdx.x - n * K;
  const int r = threadIdx.x / tpr, col = threadIdx.x - r * tpr;
  const int64_t c0 = static_cast<int64_t>(col) * V;
  const int64_t s_begin = k * per, s_end = imin(s_begin + per, a.S);
  const int64_t first = s_begin + r;
  // Pixels first, first + rows, ...: item i < kHeldItems in registers, then `slots` in shared
  // memory, then the streamed ones.
  const int m = first < s_end ? static_cast<int>(ceil_div(s_end - first, rows)) : 0;
  const int ms = m > kHeldItems ? static_cast<int>(imin(m - kHeldItems, slots)) : 0;
  const int held = static_cast<int>(imin(m, kHeldItems)) + ms;
  const T* x = static_cast<const T*>(a.x) + n * a.CS + c0;
  auto at = [&](int i) { return x + (first + static_cast<int64_t>(i) * rows) * a.C; };

  // Every load is issued before any value is used: the shared-memory items' copies first, then
  // the registers' (kHeldItems x 16 bytes), then the streamed items' L2 prefetches.
  for (int j = 0; j < ms; ++j) cp_async16(my_slots + j * blockDim.x, at(kHeldItems + j), true);
  cp_async_commit();
  uint4 raw[kHeldItems];
#pragma unroll
  for (int i = 0; i < kHeldItems; ++i)
    raw[i] = i < m ? *reinterpret_cast<const uint4*>(at(i)) : make_uint4(0u, 0u, 0u, 0u);
  for (int i = held; i < m; ++i) prefetch_l2(at(i));
  // v + emb - (the group's first element) as v - shift: one constant per channel.
  float shift[V] = {};
  if (a.emb != nullptr) load_vec<T, V>(static_cast<const T*>(a.emb) + n * a.C + c0, shift);
#pragma unroll
  for (int j = 0; j < V; ++j) shift[j] = cl_group_shift<T>(a, n, c0 + j) - shift[j];

  // This thread's statistics per channel, in two exact passes over its held items, about the
  // group's first element (the mean stays small when the data's is large); then the streamed
  // items one by one (Welford's update, continuing from the two passes' count, mean and m2).
  float mean[V] = {}, m2[V] = {};
  auto sum = [&](const uint4& item) {
    float v[V];
    unpack16<T>(item, v);
#pragma unroll
    for (int j = 0; j < V; ++j) mean[j] += v[j] - shift[j];
  };
  auto sum_sq = [&](const uint4& item) {
    float v[V];
    unpack16<T>(item, v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float d = (v[j] - shift[j]) - mean[j];
      m2[j] += d * d;
    }
  };
#pragma unroll
  for (int i = 0; i < kHeldItems; ++i) {
    if (i >= m) break;
    sum(raw[i]);
  }
  cp_async_wait_all();  // this thread's copies: only it reads its slots
  for (int j = 0; j < ms; ++j) sum(my_slots[j * blockDim.x]);
  const float inv_held = held > 0 ? 1.0f / static_cast<float>(held) : 0.0f;
#pragma unroll
  for (int j = 0; j < V; ++j) mean[j] *= inv_held;
#pragma unroll
  for (int i = 0; i < kHeldItems; ++i) {
    if (i >= m) break;
    sum_sq(raw[i]);
  }
  for (int j = 0; j < ms; ++j) sum_sq(my_slots[j * blockDim.x]);
  // Unrolled so that a few of the streamed loads (L2 hits, after the prefetch) are in flight.
#pragma unroll 4
  for (int i = held; i < m; ++i) {
    float v[V];
    unpack16<T>(*reinterpret_cast<const uint4*>(at(i)), v);
    const float inv = 1.0f / static_cast<float>(i + 1);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float d = (v[j] - shift[j]) - mean[j];
      mean[j] = fmaf(d, inv, mean[j]);
      m2[j] = fmaf(d, (v[j] - shift[j]) - mean[j], m2[j]);
    }
  }

  // Per channel over the CTA's rows: a tree in shared memory, row r taking row r + h. At each
  // step the rows written (r < h) and the rows read (r >= h) are disjoint, and every channel of a
  // row has the row's count, so one division serves the thread's V channels.
  float na = static_cast<float>(m);
  auto publish = [&] {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      mu[r * C + col * V + j] = mean[j];
      sq[r * C + col * V + j] = m2[j];
    }
    if (col == 0) cnt[r] = na;
  };
  publish();
  int h = 1;
  while (h < rows) h <<= 1;
  for (h >>= 1; h >= 1; h >>= 1) {
    __syncthreads();
    if (r < h && r + h < rows) {
      const float nb = cnt[r + h];
      if (nb > 0.0f) {
        const float nt = __fadd_rn(na, nb);
        const float wb = __fdiv_rn(nb, nt);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float delta = __fsub_rn(mu[(r + h) * C + col * V + j], mean[j]);
          const float q = sq[(r + h) * C + col * V + j];
          mean[j] = __fmaf_rn(delta, wb, mean[j]);
          m2[j] = __fadd_rn(__fadd_rn(m2[j], q), __fmul_rn(__fmul_rn(__fmul_rn(delta, delta), na), wb));
        }
        na = nt;
        publish();
      }
    }
  }
  __syncthreads();

  // Per group over its channels, which share the chunk's count: a warp per group, two passes.
  // Sums are taken about the group's first channel (then the first chunk's) mean: those means sit
  // far from 0 when the group's first element lies far out, and a plain sum of them rounds away
  // the digits the output needs (3e-5 at a 3000-sigma first element in the emulator).
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const float chunk = static_cast<float>(s_end - s_begin);
  const float inv_cg = 1.0f / static_cast<float>(Cg);
  for (int g = warp; g < G; g += nwarps) {
    const float ref = mu[g * Cg];
    float s = 0.0f;
    for (int i = lane; i < Cg; i += 32) s += mu[g * Cg + i] - ref;
    const float mg = ref + warp_sum(s) * inv_cg;
    float q = 0.0f;
    for (int i = lane; i < Cg; i += 32) {
      const float d = mu[g * Cg + i] - mg;
      q += sq[g * Cg + i] + chunk * d * d;
    }
    q = warp_sum(q);
    if (lane == 0) part[(n * K + k) * G + g] = Welford{chunk * static_cast<float>(Cg), mg, q};
  }

  // Every chunk's statistics are written (the barrier fences memory).
  cooperative_groups::this_grid().sync();

  // The K chunks of each group of sample n, a warp per group, in two passes: the mean weighted by
  // the counts, then the m2s plus each chunk's offset from it.
  for (int g = warp; g < G; g += nwarps) {
    const float ref = load_l2(part + n * K * G + g).mean;
    float cn = 0.0f, s = 0.0f;
    for (int64_t i = lane; i < K; i += 32) {
      const Welford w = load_l2(part + (n * K + i) * G + g);
      cn += w.n;
      s += w.n * (w.mean - ref);
    }
    const float total = warp_sum(cn);
    const float mg = ref + warp_sum(s) / total;
    float q = 0.0f;
    for (int64_t i = lane; i < K; i += 32) {
      const Welford w = load_l2(part + (n * K + i) * G + g);
      const float d = w.mean - mg;
      q += w.m2 + w.n * d * d;
    }
    q = warp_sum(q);
    if (lane == 0) {
      st[g] = mg;  // about the group's first element
      st[G + g] = 1.0f / sqrtf(q / total + a.eps);
    }
  }
  __syncthreads();

  float scale[V], bias[V], gmean[V];
  load_vec<P, V>(static_cast<const P*>(a.w) + c0, scale);
  load_vec<P, V>(static_cast<const P*>(a.b) + c0, bias);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int g = (col * V + j) / Cg;
    gmean[j] = st[g];
    scale[j] *= st[G + g];
  }
  T* y = static_cast<T*>(a.y) + n * a.CS + c0;
  auto put = [&](int i, const uint4& item, auto evict_first) {
    float v[V];
    unpack16<T>(item, v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float t = ((v[j] - shift[j]) - gmean[j]) * scale[j] + bias[j];
      if (a.silu) t = t / (1.0f + expf(-t));
      v[j] = t;
    }
    store_vec<T, V, decltype(evict_first)::value>(y + (first + static_cast<int64_t>(i) * rows) * a.C, v);
  };
  // The streamed items first, read again while L2 likely still has them; their y evict-first,
  // so as not to push out those still to be read.
#pragma unroll 4
  for (int i = m - 1; i >= held; --i) put(i, *reinterpret_cast<const uint4*>(at(i)), std::true_type{});
  for (int j = 0; j < ms; ++j) put(kHeldItems + j, my_slots[j * blockDim.x], std::false_type{});
#pragma unroll
  for (int i = 0; i < kHeldItems; ++i) {
    if (i >= m) break;
    put(i, raw[i], std::false_type{});
  }
}

// The held launch for p, with the kernel instance it would run; tpr == 0 where p is not held.
template <class T, class P>
HeldShape held_shape_for(const GroupNormSiluParams& p) {
  constexpr int V = kVec16<T>;
  HeldShape h;
  if (p.C % V != 0 || p.C / V > kHeldThreads) return h;
  const int tpr = static_cast<int>(p.C / V);
  // Whole warps (the group merges use full-warp sums): rows a multiple of 32 / gcd(tpr, 32).
  int gcd = tpr, b = 32;
  while (b != 0) {
    const int t = gcd % b;
    gcd = b;
    b = t;
  }
  const int q = 32 / gcd;
  const int rows = (kHeldThreads / tpr) / q * q;
  if (rows == 0) return h;
  const int threads = rows * tpr;
  const size_t stats = held_smem_bytes(rows, p.C, p.G, threads, 0);
  auto kernel = held_kernel<T, P, V>;
  // Past 48 KB the kernel needs the opt-in, asked once for the most any shape takes
  // (allow_dynamic_smem keeps one size per kernel); without it, what fits in 48 KB.
  size_t limit = kHeldMaxSmem;
  if (held_smem_bytes(rows, p.C, p.G, threads, kHeldSlots) > 48 * 1024 && allow_dynamic_smem(kernel, kHeldMaxSmem) != 0)
    limit = 48 * 1024;
  if (stats > limit) return h;
  const int max_slots = static_cast<int>(imin(kHeldSlots, (limit - stats) / (threads * sizeof(uint4))));
  const size_t max_smem = held_smem_bytes(rows, p.C, p.G, threads, max_slots);
  // As many CTAs per sample as are resident at once (more loads in flight), none without a row;
  // resident at `smem` bytes each (a CTA that takes less stays resident too).
  auto split = [&](size_t smem) {
    const int64_t resident = static_cast<int64_t>(blocks_per_sm(kernel, threads, smem)) * sm_count();
    h.K = imin(resident / p.N, ceil_div(p.S, rows));
    h.per = h.K < 1 ? 0 : ceil_div(p.S, h.K);
    return h.K >= 1;
  };
  h.tpr = tpr;
  h.rows = rows;
  // Registers alone where they hold the chunk, else with shared-memory slots (at the launch's
  // residency with all of them), else streaming the rest while L2 could hold it.
  if (!split(stats)) return {};
  if (h.per > static_cast<int64_t>(rows) * kHeldItems) {
    if (max_slots == 0 || !split(max_smem)) return {};
    const int64_t items = ceil_div(h.per, rows);  // a thread's, at most
    h.slots = static_cast<int>(imin(items - kHeldItems, max_slots));
    const int64_t streamed = p.N * h.K * threads * (items - kHeldItems - h.slots) * static_cast<int64_t>(sizeof(uint4));
    if (streamed > l2_bytes()) return {};
  }
  h.K = ceil_div(p.S, h.per);
  return h;
}

HeldShape held_shape(const GroupNormSiluParams& p) {
  if (!p.channels_last || device_attribute(cudaDevAttrCooperativeLaunch, 0) == 0) return {};
  const bool p32 = p.param_dtype == DType::kFloat32;
  if (!p32 && p.param_dtype != p.dtype) return {};
  switch (p.dtype) {
    case DType::kFloat32: return held_shape_for<float, float>(p);
    case DType::kFloat16: return p32 ? held_shape_for<__half, float>(p) : held_shape_for<__half, __half>(p);
    case DType::kBFloat16:
      return p32 ? held_shape_for<__nv_bfloat16, float>(p) : held_shape_for<__nv_bfloat16, __nv_bfloat16>(p);
  }
  return {};
}

template <class T, class P>
int launch_held(const GnArgs& a, int64_t N, const HeldShape& h, Welford* part, cudaStream_t stream) {
  constexpr int V = kVec16<T>;
  const int64_t grid = N * h.K;  // at most the resident CTAs (held_shape_for): well within int
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(static_cast<unsigned>(h.rows * h.tpr));
  cfg.dynamicSmemBytes = held_smem_bytes(h.rows, a.C, a.G, h.rows * h.tpr, h.slots);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, held_kernel<T, P, V>, a, h.tpr, h.per, h.K, part, h.slots);
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // nothing ran: the caller takes another kernel
    return static_cast<int>(err);
  }
  const int last = launch_status();
  return err != cudaSuccess ? static_cast<int>(err) : last;
}

}  // namespace

bool held_supported(const GroupNormSiluParams& p) {
  if (held_shape(p).tpr == 0) return false;
  const int pbytes = 16 / dtype_size(p.dtype) * dtype_size(p.param_dtype);
  return aligned16(p.x) && aligned16(p.y) && (p.emb == nullptr || aligned16(p.emb)) &&
         aligned_for(p.weight, pbytes) && aligned_for(p.bias, pbytes);
}

int64_t held_workspace_bytes(const GroupNormSiluParams& p) {
  return p.N * held_shape(p).K * p.G * static_cast<int64_t>(sizeof(Welford));
}

int group_norm_silu_held(const GroupNormSiluParams& p, const GnArgs& a, void* workspace, cudaStream_t stream) {
  const HeldShape h = held_shape(p);
  Welford* part = static_cast<Welford*>(workspace);
  const bool p32 = p.param_dtype == DType::kFloat32;
  switch (p.dtype) {
    case DType::kFloat32: return launch_held<float, float>(a, p.N, h, part, stream);
    case DType::kFloat16:
      return p32 ? launch_held<__half, float>(a, p.N, h, part, stream) : launch_held<__half, __half>(a, p.N, h, part, stream);
    case DType::kBFloat16:
      return p32 ? launch_held<__nv_bfloat16, float>(a, p.N, h, part, stream)
                 : launch_held<__nv_bfloat16, __nv_bfloat16>(a, p.N, h, part, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace ldmfast::cuda::detail
