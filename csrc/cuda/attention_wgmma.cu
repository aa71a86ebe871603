// Flash attention on Hopper's warpgroup MMA (wgmma.mma_async, sm_90a) for float16 / bfloat16.
//
// Parity tests passed on an H100 (2026-11-24). attention.cu dispatches here for kDefault's
// larger self-attention and for AttentionKernel::kWgmma, kWgmmaOverlap, kWgmmaPingpong,
// kWgmmaPingpongOverlap and kWgmmaPingpong3 when the device is sm_90 and the library holds
// sm_90a code; anywhere else they run the mma.sync kernel.
//
// Two consumer warpgroups per CTA and (b, h, block of 128 queries), 64 query rows each (three
// and 192 with kWgmmaPingpong3 and kWgmmaPingpong3Overlap). Q stays in shared memory (wgmma reads A from there); K and V tiles of kBlockK keys stream through
// shared-memory stages (Shape::kStages), later tiles' cp.async copies in flight while one is
// used. Per tile and warpgroup: S = Q K^T (m64 n kBlockK k16 steps over the head dim, both
// operands from shared memory), online softmax on the S accumulators in registers (a row sits in
// the 4 lanes of a quad, as with mma.sync), then O += P V with P packed in place from the S
// accumulators as the register A operand (the m64nN accumulator layout of two adjacent 8-key
// column groups is the k16 A layout) and V read MN-major (transposed) by the tensor core. D is
// padded to a multiple of 16 with zeros for the QK^T reduction (D = 40 -> 48); P V uses N = D.
//
// Two ways to feed the warpgroups. Plain: every thread loads (cp.async) the next tile and one
// __syncthreads per tile publishes it, so the two warpgroups run in lockstep. Ping-pong
// (kPingpong, after FlashAttention-3's warp specialisation): one more warpgroup only loads, two
// tiles ahead, and hands tiles over through mbarriers in shared memory (full: producer -> each
// warpgroup, per stage; empty: every warpgroup -> producer), giving most of its registers to
// the consumers (setmaxnreg); turn barriers (named) make the warpgroups issue their products in
// turn, so one's softmax runs while another's products use the tensor cores (three warpgroups:
// the turn goes round, so two softmaxes hide behind one's products). Orthogonal to that, the
// optional overlap of a warpgroup's own P V with its next softmax (kOverlap, FlashAttention-3's
// intra-warpgroup overlap; with three warpgroups, FlashAttention-3's forward configuration for
// head dims up to 64). Which the GPU prefers is for its benchmarks.
#include <cmath>
#include <cstring>
#include <type_traits>

#include "attention_mma.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

namespace ldmfast::cuda {
namespace {

using namespace detail;

// G consumer warpgroups per CTA, 64 query rows each: 2, or 3 (ping-pong only, head dims up to
// kWgmma3MaxHeadDim, with overlap up to kWgmma3OverlapMaxHeadDim; FlashAttention-3's tile for
// head dims up to 96 is 192 rows).
template <int G>
constexpr int kConsumersOf = G * 128;
template <int G>
constexpr int kBlockQOf = G * 64;
template <bool kPingpong, int G>
constexpr int kThreadsOf = kConsumersOf<G> + (kPingpong ? 128 : 0);  // ping-pong: + the producer warpgroup
// Ping-pong registers per thread: launched at 65536 / threads (rounded down to 8) for every
// warpgroup; the producer keeps kProducerRegsOf and the consumers share out the rest: 2
// warpgroups launched at 168 rise to 224 (the producer keeps 56), 3 launched at 128 rise to 160
// (the producer keeps 32, FlashAttention-3's split; its copy loop peaks near R31).
template <int G>
constexpr int kProducerRegsOf = G == 2 ? 56 : 32;
template <int G>
constexpr int kLaunchRegsOf = 65536 / kThreadsOf<true, G> / 8 * 8;
template <int G>
constexpr int kConsumerRegsOf = (kLaunchRegsOf<G> * (G + 1) - kProducerRegsOf<G>) / G / 8 * 8;
template <int G>
constexpr bool kRegsShareOut = kProducerRegsOf<G> + G * kConsumerRegsOf<G> <= (G + 1) * kLaunchRegsOf<G>;
// setmaxnreg.inc waits until the pool holds the registers: asking for more than the producer
// frees would hang.
static_assert(kRegsShareOut<2> && kRegsShareOut<3> && kConsumerRegsOf<2> == 224 && kConsumerRegsOf<3> == 160,
              "the register file shared out");

// The threads of a turn barrier's phase (named barrier; the ids are in Shape): a warpgroup and
// the one before it. An enum, not a constexpr int: the sm_80 pass (a trap) uses none.
enum NamedBarrierThreads : int { kTurnThreads = 2 * 128 };

template <int D, bool kOverlap, bool kPingpong, int G>
struct Shape {
  static_assert(G == 2 || (G == 3 && kPingpong), "3 warpgroups: ping-pong only");
  static constexpr int kBlockQ = kBlockQOf<G>, kConsumers = kConsumersOf<G>;
  // Stages: the tile in use and the one loading; overlap: + the tile P V still reads; ping-pong:
  // + one, as the producer refills a stage only once every (staggered) warpgroup released it.
  static constexpr int kStages = (kOverlap ? 3 : 2) + (kPingpong ? 1 : 0);
  // Ping-pong's named barrier ids (1 to 15; 0 is __syncthreads): turn, + warpgroup (its turn to
  // issue, the warpgroup before it -> it); done (the consumers, before the output staging reuses
  // shared memory). The stage hand-overs are mbarriers, any number of them: full, + G stage +
  // warpgroup (tile landed: one arrival per producer warp); empty, + stage (stage free: one per
  // consumer warp). Named barriers for those too would need 12 + 4 + 3 ids at 3 warpgroups
  // with overlap, past the 15 there are.
  enum : int { kBarTurn = 1, kBarDone = kBarTurn + G };  // an enum: see above
  enum : int { kMbarFull = 0, kMbarEmpty = G * kStages, kMbars = kPingpong ? kMbarEmpty + kStages : 0 };
  enum : unsigned { kFullArrivals = 4, kEmptyArrivals = 4 * G };  // warps (an enum: see above)
  static constexpr int DPAD = (D + 15) / 16 * 16;  // the QK^T reduction in k16 steps
  static constexpr int kBlockK = D <= 128 ? 128 : 64;  // keys per tile: S is kBlockK / 2 registers
  // Element counts of the shared-memory tiles, all in 8 x 8 core-matrix ("interleaved") order.
  static constexpr int kQ = kBlockQ * DPAD, kK = kBlockK * DPAD, kV = kBlockK * D;
  static constexpr int kStage = kK + kV;
  static constexpr int kOStride = D + 8;  // the output staging rows (+16 bytes: no bank conflicts)
  // Q and the stages, reused by the output staging at the end; then the mbarriers (8 bytes each).
  template <class T>
  static constexpr size_t mbar_offset() {
    const size_t main = static_cast<size_t>(kQ + kStages * kStage) * sizeof(T);
    const size_t out = static_cast<size_t>(kConsumers / 32) * 16 * kOStride * sizeof(T);
    return ((main > out ? main : out) + 15) / 16 * 16;
  }
  template <class T>
  static constexpr size_t smem_bytes() { return mbar_offset<T>() + kMbars * sizeof(uint64_t); }
  static_assert(smem_bytes<uint16_t>() <= 227 * 1024, "an sm_90 CTA has at most 227 KB of shared memory");
};

// Copies ROWS rows (from row0; rows at or past L are zeros) of a (ROWS x C*8) tile into shared
// memory in core-matrix order: 16-byte chunk (r, c) at chunk index ((r / 8) C + c) 8 + r % 8, so
// each core matrix (8 rows x 16 bytes) is contiguous, as the no-swizzle wgmma layout wants.
// Chunks c >= CD (the head dim's padding) are zeros. vec: cp.async copies, committed by the
// caller; else plain stores. Warp `warp` of kWarps takes the row groups warp, warp + kWarps, ...;
// its lane (r8, cp) = (lane % 8, lane / 8) the chunks cp, cp + 4, ... of row r8 of each, so one
// instruction reads 64 contiguous bytes from each of 8 rows and writes 512 contiguous bytes (no
// bank conflicts), and every offset but the row's is a constant: a few instructions a chunk
// (the ping-pong producer issues every copy of the CTA).
template <int ROWS, int C, int CD, int kWarps, class T>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride_l, int64_t row0, int64_t L, bool vec,
                                          int warp, int lane) {
  static_assert(ROWS % (8 * kWarps) == 0, "whole row groups per warp");
  const int r8 = lane & 7, cp = lane >> 3;
  const int r = warp * 8 + r8;  // the first row of this lane in the tile
  // Rows of the tile inside L, so the row tests are 32-bit (the 32-register producer of three
  // warpgroups spilled a 64-bit row index).
  const int rows = L - row0 < ROWS ? static_cast<int>(L - row0) : ROWS;
  const T* s0 = src + (row0 + r) * stride_l + cp * 8;
  T* d0 = dst + ((warp * C + cp) * 8 + r8) * 8;
  auto copy = [&](auto async) {
#pragma unroll 1  // unrolled, the row groups' addresses would crowd the producer's registers
    for (int g = 0; g < ROWS / (8 * kWarps); ++g) {
      const bool row_ok = r + g * 8 * kWarps < rows;
      const T* s = s0 + g * 8 * kWarps * stride_l;
#pragma unroll
      for (int j = 0; j < (C + 3) / 4; ++j) {
        if (C % 4 != 0 && cp + 4 * j >= C) continue;  // the last column step of a C not a multiple of 4
        const bool fill = row_ok && cp + 4 * j < CD;
        T* d = d0 + (g * kWarps * C + 4 * j) * 64;
        if constexpr (decltype(async)::value) {
          cp_async16(d, fill ? s + 32 * j : src, fill);
        } else {
          store_chunk16(d, fill ? read_chunk16(s + 32 * j, false) : make_uint4(0u, 0u, 0u, 0u));
        }
      }
    }
  };
  if (vec) {
    copy(std::true_type{});
  } else {
    copy(std::false_type{});
  }
}

// kOverlap (FlashAttention-3's intra-warpgroup overlap): P V of tile t - 1 runs on the tensor
// cores while the softmax of tile t runs on the other units, at the price of one more
// shared-memory stage (P stays in the S registers as floats until that product is back, then
// goes into the one set of P registers). Otherwise each product is waited for at once.
// kPingpong: the producer warpgroup and the turn barriers described at the top.
template <int D, class T, bool kOverlap, bool kPingpong, int G>
__global__ void __launch_bounds__(kThreadsOf<kPingpong, G>, 1)
    attention_wgmma_kernel(const AttentionParams p, const bool vec, const bool vec_o) {
#if LDMFAST_WGMMA
  using S = Shape<D, kOverlap, kPingpong, G>;
  constexpr int kBlockQ = S::kBlockQ, kConsumers = S::kConsumers;
  constexpr int kBlockK = S::kBlockK, NT = kBlockK / 8, DT = D / 8;
  constexpr int KC = S::DPAD / 16;         // k16 steps of Q K^T
  constexpr int CQ = S::DPAD / 8, CV = DT;  // 16-byte chunks per Q / K row and per V row
  constexpr int kLoadWarps = kPingpong ? 4 : kConsumers / 32;
  extern __shared__ uint4 smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* stage0 = sQ + S::kQ;

  const int64_t nqb = ceil_div(p.Lq, kBlockQ);
  const int64_t qb = blockIdx.x % nqb, bh = blockIdx.x / nqb;
  const int64_t b = bh / p.H, h = bh - b * p.H;
  const int group = threadIdx.x / 128, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quad_col = lane & 3;  // lane >> 2 is quad_row

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
  const int ntiles = static_cast<int>(ceil_div(p.Lk, kBlockK));  // 32-bit tile indices: attention_wgmma checks Lk
  const int load_warp = kPingpong ? warp - kConsumers / 32 : warp;
  auto stage_index = [&](int t) { return t % S::kStages; };

  auto load_q = [&] { load_tile<kBlockQ, CQ, DT, kLoadWarps>(sQ, q, p.q_stride_l, qb * kBlockQ, p.Lq, vec, load_warp, lane); };
  auto load_kv = [&](int t) {
    T* st = stage0 + stage_index(t) * S::kStage;
    // The lane's offsets derived anew each tile: hoisted out of the producer's loop, K's and V's
    // would crowd its 32 registers (a spill at D = 40).
    const int opaque_lane = static_cast<int>(opaque(static_cast<uint32_t>(lane)));
    load_tile<kBlockK, CQ, DT, kLoadWarps>(st, k, p.k_stride_l, static_cast<int64_t>(t) * kBlockK, p.Lk, vec, load_warp, opaque_lane);
    load_tile<kBlockK, CV, DT, kLoadWarps>(st + S::kK, v, p.v_stride_l, static_cast<int64_t>(t) * kBlockK, p.Lk, vec, load_warp, opaque_lane);
  };

  // Ping-pong's mbarriers: full[stage][warpgroup], then empty[stage]. Tile t is the (t / kStages)-th
  // use of its stage, so its hand-over ends the phase of that parity on either barrier.
  uint64_t* const mbar = reinterpret_cast<uint64_t*>(reinterpret_cast<unsigned char*>(smem_raw) + S::template mbar_offset<T>());
  auto full = [&](int t, int g) { return mbar + S::kMbarFull + G * stage_index(t) + g; };
  auto empty = [&](int t) { return mbar + S::kMbarEmpty + stage_index(t); };
  auto parity = [&](int t) { return static_cast<uint32_t>(t / S::kStages) & 1u; };
  if constexpr (kPingpong) {
    if (threadIdx.x < S::kMbars)
      mbar_init(mbar + threadIdx.x, threadIdx.x < S::kMbarEmpty ? S::kFullArrivals : S::kEmptyArrivals);
    __syncthreads();  // initialised before any thread uses them
    if (group == G) {
      // The producer: two tiles ahead (Q with the first), tile t handed to every warpgroup as
      // soon as its copies landed, before waiting for a free stage for tile t + 2. No drain at
      // the end: an mbarrier may be left part-arrived.
      setmaxnreg_dec<kProducerRegsOf<G>>();
      load_q();
      load_kv(0);
      cp_async_commit();
      if (ntiles > 1) load_kv(1);
      cp_async_commit();  // possibly empty: every step waits for all but the newest group
      for (int t = 0; t < ntiles; ++t) {
        cp_async_wait<1>();   // tile t (and Q), this thread's copies
        fence_proxy_async();  // ... made visible to the tensor cores' reads
        __syncwarp();         // ... and the warp's: lane 0's arrival (a release) covers them
#pragma unroll
        for (int g = 0; g < G; ++g) mbar_arrive_lane0(full(t, g), lane);
        if (t + 2 < ntiles) {
          if (t + 2 >= S::kStages) mbar_wait(empty(t + 2), parity(t + 2) ^ 1u);  // tile t + 2 - kStages released
          load_kv(t + 2);
        }
        cp_async_commit();
      }
      return;
    }
  } else {
    load_q();
    load_kv(0);
    cp_async_commit();
  }

  // Descriptors (16-byte units added to the start address for each k16 step). Q and K are
  // K-major: LBO = one core matrix (the second half of a k16 slice), SBO = a row of CQ core
  // matrices (the next 8 rows). V is MN-major: LBO = a row of CV core matrices (the next 8 keys
  // along K), SBO = one core matrix (the next 8 columns of D).
  constexpr uint32_t kCore = 128;
  const uint64_t desc_q = gmma_desc(smem_addr(sQ + group * 64 * S::DPAD), kCore, CQ * kCore);
  const uint64_t desc_k0 = gmma_desc(smem_addr(stage0), kCore, CQ * kCore);
  const uint64_t desc_v0 = gmma_desc(smem_addr(stage0 + S::kK), CV * kCore, kCore);
  constexpr uint32_t kStageUnits = S::kStage * sizeof(T) / 16;

  // Accumulator element 4 j + c of a warp is row quad_row + 8 (c / 2) of its 16, column
  // 8 j + 2 quad_col + c % 2; m[i], l[i]: row quad_row + 8 i (l: this lane's part of the sum).
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float qscale = p.scale * kLog2e;

  // Tile t in shared memory for this warpgroup. Plain: from every thread, with tile t + 1 then
  // sent into the stage tile t + 1 - kStages used (every warpgroup has waited for its last
  // product on it). Ping-pong: the producer's hand-over.
  auto acquire = [&](int t) {
    if constexpr (kPingpong) {
      mbar_wait(full(t, group), parity(t));
    } else {
      cp_async_wait_all();  // tile t (and Q) from this thread
      fence_proxy_async();  // ... made visible to the tensor cores' reads
      __syncthreads();      // ... from every thread; and every warpgroup is done with the stage refilled next
      if (t + 1 < ntiles) {
        load_kv(t + 1);
        cp_async_commit();
      }
    }
  };
  // This warpgroup's products on tile t have completed: ping-pong hands the stage back, one
  // arrival per warp once all its lanes waited for them (the emulator reads a wgmma's shared
  // memory at each thread's wait). Every tile, so no branch sits in the loop (ptxas serialises
  // the wgmma of a loop whose body has one; lane 0's arrival is a predicated instruction).
  auto release = [&](int t) {
    if constexpr (kPingpong) {
      __syncwarp();
      mbar_arrive_lane0(empty(t), lane);
    }
  };
  // Ping-pong: issues this warpgroup's products once the warpgroup before it (round robin)
  // issued its previous ones, then passes the turn on, always (no branch, as above: the turn the
  // last warpgroup passes after its last products is taken by warpgroup 0 at the end).
  auto in_turn = [&](auto&& issue) {
    if constexpr (kPingpong) bar_sync(S::kBarTurn + group, kTurnThreads);
    issue();
    if constexpr (kPingpong) bar_arrive(S::kBarTurn + (group + 1) % G, kTurnThreads);
  };
  if constexpr (kPingpong) {
    setmaxnreg_inc<kConsumerRegsOf<G>>();
    if (group == G - 1) bar_arrive(S::kBarTurn, kTurnThreads);  // warpgroup 0 goes first
  }

  auto stage_of = [&](int t) { return static_cast<uint32_t>(stage_index(t)) * kStageUnits; };
  auto issue_s = [&](float (&s)[kBlockK / 2], int t) {
    pin(s);  // the last softmax wrote them in place
    // Q's per-step descriptors anew each tile (an add each), from Q's plus an opaque 0: hoisted
    // out of the loop they would hold KC registers (spilled at 160 a thread with overlap).
    const uint64_t dq = desc_add(desc_q, opaque(0u));
    wgmma_fence();
#pragma unroll
    for (int kc = 0; kc < KC; ++kc)
      WgmmaSS<T, kBlockK>::run(s, desc_add(dq, 2 * kc * kCore / 16), desc_add(desc_k0, stage_of(t) + 2 * kc * kCore / 16), kc > 0);
    wgmma_commit();
  };
  // P is pinned before the fence with O: the rescale and the packing must not sink past it (a
  // register written between wgmma.fence and the wgmma reading it is undefined).
  auto issue_pv = [&](uint32_t (&pa)[kBlockK / 16][4], int t) {
    pin(o);
    pin(pa);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk)
      WgmmaRS<T, D>::run(o, pa[kk], desc_add(desc_v0, stage_of(t) + 2 * kk * CV * kCore / 16), true);
    wgmma_commit();
  };
  // Online softmax of tile t in place (mma.cuh; the accumulator layout is mma.sync's, n8 tile j
  // being s[4 j ..]).
  auto softmax = [&](float (&s)[kBlockK / 2], int t, float (&alpha)[2]) {
    pin(s);
    softmax_tile(*reinterpret_cast<float(*)[NT][4]>(s), m, l, alpha, static_cast<int64_t>(t) * kBlockK, p.Lk, qscale, quad_col);
  };
  // P as the A operand: key columns 8 j .. 8 j + 7 are the low (j even) or high half of k16 step
  // j / 2; registers 0 and 1 (rows quad_row, quad_row + 8) hold the low half.
  auto pack = [&](const float (&s)[kBlockK / 2], uint32_t (&pa)[kBlockK / 16][4]) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      pa[j / 2][2 * (j & 1)] = Mma<T>::pack(s[4 * j], s[4 * j + 1]);
      pa[j / 2][2 * (j & 1) + 1] = Mma<T>::pack(s[4 * j + 2], s[4 * j + 3]);
    }
  };
  auto rescale_o = [&](const float (&alpha)[2]) {
    pin(o);
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];  // element 4 dt + c is row quad_row + 8 (c / 2)
  };

  float s[kBlockK / 2];
  uint32_t pa[kBlockK / 16][4];
  float alpha[2];
  if constexpr (!kOverlap) {
    for (int t = 0; t < ntiles; ++t) {
      acquire(t);
      in_turn([&] { issue_s(s, t); });
      wgmma_wait<0>();
      softmax(s, t, alpha);
      pack(s, pa);
      rescale_o(alpha);
      issue_pv(pa, t);
      wgmma_wait<0>();
      release(t);
    }
  } else {
    // P V of tile t - 1 goes out right after Q K_t^T and runs during the softmax of tile t, which
    // leaves P in s as floats; once that product is back, tile t's P goes into the registers it
    // read (one set of P registers, as FlashAttention-3) and O is rescaled by tile t's alpha.
    acquire(0);
    in_turn([&] { issue_s(s, 0); });
    wgmma_wait<0>();
    softmax(s, 0, alpha);  // O is still zero: no rescale
    pack(s, pa);
    for (int t = 1; t < ntiles; ++t) {
      acquire(t);
      in_turn([&] {
        issue_s(s, t);
        issue_pv(pa, t - 1);
      });
      wgmma_wait<1>();  // Q K_t^T (groups complete in order); P V_{t-1} may still run
      softmax(s, t, alpha);
      wgmma_wait<0>();  // P V_{t-1}: its P registers and O are free again
      release(t - 1);
      pin(pa);
      pack(s, pa);
      rescale_o(alpha);
    }
    issue_pv(pa, ntiles - 1);
    wgmma_wait<0>();
    release(ntiles - 1);
  }
  pin(o);
  if constexpr (kPingpong) {
    if (group == 0) bar_sync(S::kBarTurn, kTurnThreads);  // the turn the last warpgroup passed after its last products
  }

  // Out through shared memory, 16 rows per warp, for 16-byte stores: over Q and the stages once
  // every warpgroup is done with them (ping-pong: the producer's copies have all been consumed;
  // the mbarriers lie past the staging).
  if constexpr (kPingpong) {
    bar_sync(S::kBarDone, kConsumers);
  } else {
    __syncthreads();
  }
  T* out = static_cast<T*>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
  finish_16rows<D, S::kOStride>(*reinterpret_cast<const float(*)[DT][4]>(o), m, l, sQ + warp * 16 * S::kOStride, out,
                                qb * kBlockQ + warp * 16, p.Lq, p.o_stride_l, vec_o,
                                p.lse == nullptr ? nullptr : p.lse + (b * p.H + h) * p.Lq, lane);
#else
  (void)p, (void)vec, (void)vec_o;
  __trap();  // no sm_90a code in this pass: attention_wgmma_usable() keeps launches away
#endif
}

template <int D, class T, bool kOverlap, bool kPingpong, int G = 2>
int launch_d(const AttentionParams& p, cudaStream_t stream) {
  constexpr size_t smem = Shape<D, kOverlap, kPingpong, G>::template smem_bytes<T>();
  if (const int err = allow_dynamic_smem(attention_wgmma_kernel<D, T, kOverlap, kPingpong, G>, smem)) return err;
  const int64_t blocks = ceil_div(p.Lq, kBlockQOf<G>) * p.B * p.H;
  if (blocks > INT32_MAX) return static_cast<int>(cudaErrorInvalidConfiguration);
  const bool vec = qkv_aligned16(p), vec_o = o_aligned16(p);
  attention_wgmma_kernel<D, T, kOverlap, kPingpong, G>
      <<<static_cast<unsigned>(blocks), kThreadsOf<kPingpong, G>, smem, stream>>>(p, vec, vec_o);
  return launch_status();
}

template <class T, bool kPingpong>
int launch(const AttentionParams& p, cudaStream_t stream, bool overlap) {
  if (overlap) {  // the head dims up to kWgmmaOverlapMaxHeadDim (see attention_mma.cuh)
    switch (p.D) {
      case 32: return launch_d<32, T, true, kPingpong>(p, stream);
      case 40: return launch_d<40, T, true, kPingpong>(p, stream);
      case 64: return launch_d<64, T, true, kPingpong>(p, stream);
      case 80: return launch_d<80, T, true, kPingpong>(p, stream);
    }
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return with_head_dim(p.D, [&](auto d) { return launch_d<decltype(d)::value, T, false, kPingpong>(p, stream); });
}

// Ping-pong with 3 warpgroups: only the head dims whose registers fit in 160 a thread
// (kWgmma3MaxHeadDim; with overlap, kWgmma3OverlapMaxHeadDim).
template <class T>
int launch3(const AttentionParams& p, cudaStream_t stream, bool overlap) {
  if (overlap) {
    switch (p.D) {
      case 32: return launch_d<32, T, true, true, 3>(p, stream);
      case 40: return launch_d<40, T, true, true, 3>(p, stream);
      case 64: return launch_d<64, T, true, true, 3>(p, stream);
    }
    return static_cast<int>(cudaErrorInvalidValue);
  }
  switch (p.D) {
    case 32: return launch_d<32, T, false, true, 3>(p, stream);
    case 40: return launch_d<40, T, false, true, 3>(p, stream);
    case 64: return launch_d<64, T, false, true, 3>(p, stream);
    case 80: return launch_d<80, T, false, true, 3>(p, stream);
    case 96: return launch_d<96, T, false, true, 3>(p, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

template <class T>
int launch(const AttentionParams& p, cudaStream_t stream, bool overlap, bool pingpong, int groups) {
  if (groups == 3) return launch3<T>(p, stream, overlap);
  return pingpong ? launch<T, true>(p, stream, overlap) : launch<T, false>(p, stream, overlap);
}

#if !defined(LDMFAST_EMU)
// Whether `archs` (built_archs(): "80,90a,90-virtual") names the sm_90a SASS target.
bool has_sm90a(const char* archs) {
  for (const char* s = archs; *s != '\0';) {
    const char* e = std::strchr(s, ',');
    const size_t n = e == nullptr ? std::strlen(s) : static_cast<size_t>(e - s);
    if (n == 3 && std::strncmp(s, "90a", 3) == 0) return true;
    s += n + (e != nullptr);
  }
  return false;
}
#endif

}  // namespace

bool attention_wgmma_usable() {
#if defined(LDMFAST_EMU)
  return true;
#else
  return device_compute_capability() == 90 && has_sm90a(built_archs());
#endif
}

int attention_wgmma(const AttentionParams& p, cudaStream_t stream, bool overlap, bool pingpong, int groups) {
  if (!attention_mma_supports(p) || (overlap && p.D > kWgmmaOverlapMaxHeadDim)) return static_cast<int>(cudaErrorInvalidValue);
  if ((groups != 2 && groups != 3) ||
      (groups == 3 && (!pingpong || p.D > (overlap ? kWgmma3OverlapMaxHeadDim : kWgmma3MaxHeadDim))))
    return static_cast<int>(cudaErrorInvalidValue);
  if (p.B <= 0 || p.H <= 0 || p.Lq <= 0) return 0;
  if (p.Lk <= 0 || p.Lk > INT32_MAX) return static_cast<int>(cudaErrorInvalidValue);  // int key tile indices
  return p.dtype == DType::kFloat16 ? launch<__half>(p, stream, overlap, pingpong, groups)
                                    : launch<__nv_bfloat16>(p, stream, overlap, pingpong, groups);
}

}  // namespace ldmfast::cuda
