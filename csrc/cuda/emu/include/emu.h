// A CPU emulator for the ldmfast CUDA kernels, for machines without a GPU. Every CUDA thread is
// a fiber (ucontext) with its own stack, and one scheduler on the calling thread runs the fibers
// of a cluster's CTAs in turn, each until it waits at a barrier (__syncthreads, __syncwarp,
// cluster.sync, named barriers, and the lane exchanges behind shuffles and mma), arrives at a
// named barrier (bar.arrive), or ends. The schedule is
// deterministic, and a barrier that part of a block never reaches aborts instead of hanging.
// Static __shared__ variables live in a per-CTA arena (transform.py rewrites their
// declarations), so map_shared_rank works. Built with -fsanitize=thread (run.sh with
// EMU_TSAN=1), the fibers are ThreadSanitizer fibers whose only synchronisation is the barriers,
// so two accesses to shared or global memory by threads of one cluster (of one CTA, for
// launches without clusters) that no barrier orders (a missing __syncthreads) are reported as a
// data race, whatever order the scheduler ran them in. Clusters run one after another, so
// races between them are not seen; a cooperative launch runs its whole grid together, so
// grid.sync works and orders the CTAs' accesses as the barrier it is. Code the fibers run must not hold dynamically initialised
// function-local statics: their guard is an ordering TSan would see. It checks
// indexing, tails, reductions, layouts and barriers, and a launch's limits (threads, shared
// memory, grid, cluster, __launch_bounds__: check_launch); not timing, registers, or inline PTX
// other than the named barriers here, the ldmatrix / mma.sync / cp.async of emu_mma.h and the
// wgmma (and setmaxnreg's operand rules) of emu_wgmma.h.
#pragma once
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <typeindex>
#include <typeinfo>
#include <vector>
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define EMU_TSAN 1
extern "C" void __tsan_ignore_thread_begin();  // in libtsan, not in GCC 12's header
extern "C" void __tsan_ignore_thread_end();
#endif

inline uint3 threadIdx, blockIdx;  // of the running fiber, set by the scheduler
inline dim3 blockDim, gridDim;

namespace emu {
// The emulator's own bookkeeping, hidden from ThreadSanitizer while in scope.
struct TsanIgnore {
#ifdef EMU_TSAN
  TsanIgnore() { __tsan_ignore_thread_begin(); }
  ~TsanIgnore() { __tsan_ignore_thread_end(); }
#else
  TsanIgnore() {}  // user-provided: a scope guard, not an unused variable (-Wall)
#endif
};
struct Barrier;
struct Block;
// This thread's cp.async copies not yet landed (emu_mma.h).
struct PendingCopy { void* dst; unsigned char bytes[16]; };
// Under ThreadSanitizer the scheduler switches to a fiber with synchronisation (the fiber sees
// what the launch set up) and back without, and its own memory accesses while it runs the
// fibers are ignored (it only hands over threadIdx and the like; the fields below that fibers
// write are read only there). The barrier counters fibers share are atomic (relaxed: no order
// between fibers).
// A fiber's stack, with an inaccessible page below it: an overflow faults at once instead of
// writing over whatever lies below.
struct Stack {
  char* base = nullptr;  // the guard page; the stack proper follows it
  size_t guard = 0, bytes = 0;
  explicit Stack(size_t n) : guard(static_cast<size_t>(sysconf(_SC_PAGESIZE))), bytes(n) {
    void* m = mmap(nullptr, guard + bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED || mprotect(m, guard, PROT_NONE) != 0) {
      perror("emu: fiber stack");
      std::abort();
    }
    base = static_cast<char*>(m);
  }
  ~Stack() { munmap(base, guard + bytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* top_region() const { return base + guard; }
};
struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<Stack> stack;
  Block* block = nullptr;
  uint3 tid{}, bid{};
  const Barrier* waits_on = nullptr;  // while waiting: the barrier, and the phase that must end
  uint64_t wait_phase = 0;
  bool done = false;
  std::vector<PendingCopy> pending;  // oldest first
  std::vector<size_t> groups;        // committed groups not landed: their ends in `pending`, oldest first
  std::shared_ptr<void> wgmma;  // this thread's wgmma.mma_async state (emu_wgmma.h), reset per launch
  std::vector<size_t> unfenced;  // dynamic shared-memory chunks it wrote since its last fence.proxy.async
  void* tsan = nullptr;
};
inline Fiber* g_fiber = nullptr;  // the running fiber
inline ucontext_t g_sched;        // the scheduler's context
inline void* g_sched_tsan = nullptr;
inline std::atomic<uint64_t> g_events{0};  // barrier arrivals and fiber ends: the scheduler's progress
inline const std::function<void()>* g_body = nullptr;
inline char g_end_sync;  // ThreadSanitizer: the fibers' writes -> the code after the cluster
constexpr auto kRelaxed = std::memory_order_relaxed;

inline void to_scheduler() {
#ifdef EMU_TSAN
  __tsan_switch_to_fiber(g_sched_tsan, __tsan_switch_to_fiber_no_sync);
#endif
  swapcontext(&g_fiber->ctx, &g_sched);
}

struct Barrier {
  const unsigned expected;
  std::atomic<unsigned> arrived{0};
  std::atomic<uint64_t> phase{0};
  char sync[2] = {};  // ThreadSanitizer sync objects, one per phase parity
  explicit Barrier(unsigned n) : expected(n) {}
  // order: the barrier orders the memory accesses before it and after it (for ThreadSanitizer).
  void arrive_and_wait(bool order = true) {
    const uint64_t my = phase.load(kRelaxed);
    g_events.fetch_add(1, kRelaxed);
#ifdef EMU_TSAN
    if (order) __tsan_release(&sync[my & 1]);
#endif
    if (arrived.fetch_add(1, kRelaxed) + 1 == expected) {
      arrived.store(0, kRelaxed);
      phase.store(my + 1, kRelaxed);
    } else {
      g_fiber->wait_phase = my;
      g_fiber->waits_on = this;
      to_scheduler();
    }
#ifdef EMU_TSAN
    // Releases for phase my + 2 reuse this object, but only after every fiber arrived for
    // phase my + 1, so after this acquire: it sees exactly the writes made before phase my ended.
    if (order) __tsan_acquire(&sync[my & 1]);
#endif
  }
  // mbarrier.try_wait.parity in a loop: returns once the phase of that parity has ended (at
  // once when the current phase has the other parity: the one before it ended). Only the parity
  // is known, as on the hardware: a waiter one phase behind passes, and one two phases behind
  // waits for the current phase (the protocol must keep waiters within one phase).
  void wait_parity(unsigned parity) {
    const uint64_t my = phase.load(kRelaxed);
    if ((my & 1) == parity) {
      g_fiber->wait_phase = my;
      g_fiber->waits_on = this;
      to_scheduler();
    }
#ifdef EMU_TSAN
    __tsan_acquire(&sync[parity]);
#endif
  }
  // bar.arrive: counts this thread and goes on; its accesses before are ordered before those of
  // the threads that wait for this phase (their acquire above). A thread that arrives again
  // before the phase ends would count twice: named_barrier() refuses that, which also keeps a
  // release for phase p + 2 after every acquire of phase p. The fiber then lets the others run
  // (it stays runnable): what the arrival allowed them happens before this thread goes on, so
  // a hand-over made too early (a buffer released before its last read) shows up in the data.
  void arrive() {
    const uint64_t my = phase.load(kRelaxed);
    g_events.fetch_add(1, kRelaxed);
#ifdef EMU_TSAN
    __tsan_release(&sync[my & 1]);
#endif
    if (arrived.fetch_add(1, kRelaxed) + 1 == expected) {
      arrived.store(0, kRelaxed);
      phase.store(my + 1, kRelaxed);
    }
    to_scheduler();
  }
};
// A named barrier (bar.sync / bar.arrive with an id and a thread count).
struct NamedBarrier {
  std::unique_ptr<Barrier> bar;        // made at first use, with that use's count
  std::vector<uint64_t> arrived_in;  // per thread: 1 + the phase it last arrived in, 0 for none
  std::vector<char> members;         // the threads of its first phase
};

struct Block {
  std::unique_ptr<Barrier> bar;
  std::vector<std::unique_ptr<Barrier>> warp_bar;
  std::vector<double> xbuf;  // shuffle exchange, 32 per warp
  std::vector<unsigned char> dsmem;
  std::vector<uint32_t> wx;  // warp exchange for the mma emulation, 32 lanes x 16 words per warp
  std::vector<unsigned char> arena;  // static __shared__ variables
  std::vector<Block*> cluster;       // the CTAs of this CTA's cluster, by rank
  Barrier* cluster_bar = nullptr;
  Barrier* grid_bar = nullptr;       // a cooperative launch's grid barrier (grid.sync), else none
  std::shared_ptr<void> wgmma;       // the wgmma operands each warpgroup issued (emu_wgmma.h)
  NamedBarrier named[16];            // 0 unused: __syncthreads is `bar`
  std::map<const void*, std::unique_ptr<Barrier>> mbar;  // by shared-memory address (mbarrier_init)
  // Per 16-byte chunk of dynamic shared memory: 1 + the thread whose generic-proxy write (a store,
  // a landed cp.async) its own fence.proxy.async has not yet covered, 0 when none; wgmma (the
  // async proxy) refuses to read such a chunk (emu_wgmma.h).
  std::vector<uint32_t> unfenced_by;
};
inline Block* t_block = nullptr;  // the running fiber's CTA
constexpr size_t kArenaBytes = 256 * 1024;
constexpr size_t kStackBytes = 256 * 1024;

// Offsets of the static __shared__ variables in every CTA's arena, assigned on first use within
// one launch (all its CTAs share the table); keyed by declaration and type, since template
// instances of one declaration differ in size.
struct SharedTable {
  std::map<std::pair<int, std::type_index>, size_t> offsets;
  size_t next = 0;
};
inline SharedTable g_shared;
inline void reset_shared_table() {
  g_shared.offsets.clear();
  g_shared.next = 0;
}
inline size_t shared_offset(int id, std::type_index type, size_t bytes) {
  TsanIgnore hide;  // every CUDA thread looks the table up, the first one inserts
  auto it = g_shared.offsets.find({id, type});
  if (it != g_shared.offsets.end()) return it->second;
  g_shared.next = (g_shared.next + 15) & ~size_t(15);
  const size_t off = g_shared.next;
  g_shared.next += bytes;
  if (g_shared.next > kArenaBytes) {
    fprintf(stderr, "emu: static shared memory over %zu bytes\n", kArenaBytes);
    std::abort();
  }
  g_shared.offsets[{id, type}] = off;
  return off;
}
// An H100's launch limits, which a real launch breaking them fails on (the emulator's memory
// has none): threads per block, shared memory per block (static at most 48 KB; dynamic at most
// what cudaFuncSetAttribute(MaxDynamicSharedMemorySize) allowed, by default 48 KB less the
// static part; both together at most 227 KB), grid size, portable cluster size, and the
// kernel's __launch_bounds__ (transform.py makes each kernel call check_launch_bounds).
constexpr unsigned kMaxBlockThreads = 1024;
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kMaxSmem = 227 * 1024;
constexpr unsigned kMaxPortableCluster = 8;
inline std::map<const void*, int> g_dyn_smem_attr;  // set by cudaFuncSetAttribute
[[noreturn]] inline void fail(const char* what) {
  fprintf(stderr, "emu: %s\n", what);
  std::abort();
}
[[noreturn]] inline void launch_error(const char* what, size_t got, size_t limit) {
  fprintf(stderr, "emu: invalid launch: %s %zu over the limit %zu\n", what, got, limit);
  std::abort();
}
inline void check_launch(const void* kernel, dim3 grid, dim3 block, size_t dyn, unsigned csize, bool cooperative) {
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxBlockThreads) launch_error("threads per block", threads, kMaxBlockThreads);
  if (grid.x == 0 || grid.x > 0x7fffffffu) launch_error("grid.x", grid.x, 0x7fffffffu);
  if (grid.y == 0 || grid.y > 65535 || grid.z == 0 || grid.z > 65535) launch_error("grid.y or grid.z", grid.y > grid.z ? grid.y : grid.z, 65535);
  if (!cooperative && csize > kMaxPortableCluster) launch_error("cluster size", csize, kMaxPortableCluster);
  const auto it = g_dyn_smem_attr.find(kernel);
  const size_t allowed = it != g_dyn_smem_attr.end() ? static_cast<size_t>(it->second) : kDefaultSmem;
  if (dyn > allowed) launch_error("dynamic shared memory (see cudaFuncSetAttribute)", dyn, allowed);
}
// After a launch: the static part is known once the kernel has run.
inline void check_static_smem(const void* kernel, size_t dyn) {
  const size_t stat = g_shared.next;
  if (stat > kDefaultSmem) launch_error("static shared memory", stat, kDefaultSmem);
  if (stat + dyn > kMaxSmem) launch_error("static + dynamic shared memory", stat + dyn, kMaxSmem);
  if (g_dyn_smem_attr.find(kernel) == g_dyn_smem_attr.end() && stat + dyn > kDefaultSmem)
    launch_error("static + dynamic shared memory without cudaFuncSetAttribute", stat + dyn, kDefaultSmem);
}
inline void check_launch_bounds(unsigned max_threads) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  if (threads > max_threads) launch_error("threads per block, past the kernel's __launch_bounds__", threads, max_threads);
}
template <class T> T& shared_var(int id) {
  return *reinterpret_cast<T*>(t_block->arena.data() + shared_offset(id, std::type_index(typeid(T)), sizeof(T)));
}
}  // namespace emu

inline void __syncthreads() { emu::t_block->bar->arrive_and_wait(); }
namespace emu {
// The named barrier `id` for this thread's arrival: the rules a real one relies on, checked.
// One count per id for the whole launch (a real barrier may change it between phases; these
// kernels never do). A phase's threads must be whole warps (the hardware counts a warp's
// arrival once, for all its lanes) and the same threads every phase (which the release /
// acquire pairs of Barrier::arrive rely on, and these kernels keep).
inline Barrier& named_barrier(int id, int threads) {
  TsanIgnore hide;
  const unsigned block_threads = blockDim.x * blockDim.y * blockDim.z;
  if (id < 1 || id > 15 || threads <= 0 || threads % 32 != 0 || static_cast<unsigned>(threads) > block_threads) {
    fprintf(stderr, "emu: named barrier %d for %d threads: ids are 1..15 and counts whole warps of the %u-thread block\n",
            id, threads, block_threads);
    std::abort();
  }
  NamedBarrier& nb = t_block->named[id];
  if (!nb.bar) {
    nb.bar = std::make_unique<Barrier>(static_cast<unsigned>(threads));
    nb.arrived_in.assign(block_threads, 0);
  } else if (nb.bar->expected != static_cast<unsigned>(threads)) {
    fprintf(stderr, "emu: named barrier %d used with %d threads and with %u\n", id, threads, nb.bar->expected);
    std::abort();
  }
  const uint64_t phase = nb.bar->phase.load(kRelaxed) + 1;
  if (nb.arrived_in[threadIdx.x] == phase) {
    fprintf(stderr, "emu: thread %u of block %u arrives twice at named barrier %d before its phase ends\n",
            threadIdx.x, blockIdx.x, id);
    std::abort();
  }
  nb.arrived_in[threadIdx.x] = phase;
  if (nb.bar->arrived.load(kRelaxed) + 1 == nb.bar->expected) {  // this arrival ends the phase
    std::vector<char> in(block_threads);
    for (unsigned t = 0; t < block_threads; ++t) in[t] = nb.arrived_in[t] == phase;
    for (unsigned w = 0; w * 32 < block_threads; ++w) {
      const unsigned lanes = block_threads - w * 32 < 32 ? block_threads - w * 32 : 32;
      unsigned n = 0;
      for (unsigned l = 0; l < lanes; ++l) n += in[w * 32 + l];
      if (n != 0 && n != lanes) {
        fprintf(stderr, "emu: named barrier %d: %u of the %u lanes of warp %u arrived in one phase\n", id, n, lanes, w);
        std::abort();
      }
    }
    if (nb.members.empty()) nb.members = in;
    if (in != nb.members) {
      fprintf(stderr, "emu: named barrier %d: phase %llu has other threads than its first\n", id,
              static_cast<unsigned long long>(phase - 1));
      std::abort();
    }
  }
  return *nb.bar;
}
// A CTA that ends with arrivals at a named barrier whose phase never completed used it unevenly.
inline void check_named_barriers(const Block& b) {
  for (int id = 1; id < 16; ++id) {
    const Barrier* bar = b.named[id].bar.get();
    if (bar != nullptr && bar->arrived.load(kRelaxed) != 0) {
      fprintf(stderr, "emu: a CTA ended with %u of %u threads arrived at named barrier %d\n",
              bar->arrived.load(kRelaxed), bar->expected, id);
      std::abort();
    }
  }
}

// mbarriers: a Barrier per shared-memory word that mbarrier_init made one, counting thread
// arrivals (not warps). init writes a mark into the word and every use reads it back, so data
// stored over a live barrier aborts, and ThreadSanitizer sees init as a write and the uses as
// reads: a use that no barrier orders after the init is a race. A CTA may end with a phase
// part-arrived (legal on the hardware, unlike a named barrier).
constexpr uint64_t kMbarMark = 0x6d62617272696572ull;
inline void mbarrier_check_word(const uint64_t* addr, const char* what) {
  if (reinterpret_cast<uintptr_t>(addr) % 8 != 0) {
    fprintf(stderr, "emu: %s at %p: an mbarrier is 8-byte aligned\n", what, static_cast<const void*>(addr));
    std::abort();
  }
}
inline void mbarrier_init(uint64_t* addr, unsigned count) {
  mbarrier_check_word(addr, "mbarrier_init");
  {
    TsanIgnore hide;
    if (count == 0 || count >= (1u << 20)) {
      fprintf(stderr, "emu: mbarrier_init with count %u: 1 .. 2^20 - 1\n", count);
      std::abort();
    }
    if (t_block->mbar.count(addr) != 0) {
      fprintf(stderr, "emu: mbarrier at %p initialised twice in one CTA\n", static_cast<const void*>(addr));
      std::abort();
    }
    t_block->mbar[addr] = std::make_unique<Barrier>(count);
  }
  std::memcpy(addr, &kMbarMark, 8);
}
inline Barrier& mbarrier(const uint64_t* addr, const char* what) {
  mbarrier_check_word(addr, what);
  uint64_t word;
  std::memcpy(&word, addr, 8);
  TsanIgnore hide;
  const auto it = t_block->mbar.find(addr);
  if (it == t_block->mbar.end() || word != kMbarMark) {
    fprintf(stderr, "emu: %s (block %u, thread %u) at %p: %s\n", what, blockIdx.x, threadIdx.x,
            static_cast<const void*>(addr), it == t_block->mbar.end() ? "no mbarrier_init made it a barrier"
                                                                         : "the barrier was overwritten");
    std::abort();
  }
  return *it->second;
}
}  // namespace emu
namespace ldmfast::cuda::detail {
inline void bar_sync(int id, int threads) { emu::named_barrier(id, threads).arrive_and_wait(); }
inline void bar_arrive(int id, int threads) { emu::named_barrier(id, threads).arrive(); }
}  // namespace ldmfast::cuda::detail
inline void __syncwarp(unsigned = 0xffffffffu) { emu::t_block->warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
// The lanes' meeting in a warp-collective instruction (shuffle, ldmatrix, mma.sync): unlike
// __syncwarp (bar.warp.sync) these promise no memory ordering between the lanes, so the meeting
// orders nothing for ThreadSanitizer, and their exchange buffers are hidden from it.
inline void emu_warp_meet() { emu::t_block->warp_bar[threadIdx.x / 32]->arrive_and_wait(false); }
template <class T> inline T emu_shfl(T v, int src_fn(int, int), int arg) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  double* buf = &emu::t_block->xbuf[w * 32];
  emu::TsanIgnore hide;
  std::memcpy(&buf[lane], &v, sizeof(T));
  emu_warp_meet();
  const int src = src_fn(lane, arg);
  T r = v;
  if (src >= 0 && src < 32) std::memcpy(&r, &buf[src], sizeof(T));
  emu_warp_meet();
  return r;
}
inline int emu_xor(int l, int o) { return l ^ o; }
inline int emu_down(int l, int o) { return l + o; }
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return emu_shfl(v, emu_xor, o); }
template <class T> inline T __shfl_down_sync(unsigned, T v, int o) { return emu_shfl(v, emu_down, o); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
// CUDA's scaled complementary error function exp(x^2) erfc(x), which <cmath> lacks; in double
// it is exact enough for the kernels' arguments (0 <= x <= 15; exp(x^2) overflows past 26).
inline float erfcxf(float x) { const double d = x; return static_cast<float>(std::exp(d * d) * std::erfc(d)); }
[[noreturn]] inline void __trap() { std::abort(); }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

namespace emu {
inline void poison(std::vector<unsigned char>& v) {
  for (size_t i = 0; i + 4 <= v.size(); i += 4) { float nan = NAN; std::memcpy(&v[i], &nan, 4); }
}
inline std::unique_ptr<Block> make_block(unsigned nthreads, size_t smem) {
  auto b = std::make_unique<Block>();
  b->bar = std::make_unique<Barrier>(nthreads);
  for (unsigned w = 0; w < (nthreads + 31) / 32; ++w) b->warp_bar.push_back(std::make_unique<Barrier>(32));
  b->xbuf.assign(((nthreads + 31) / 32) * 32, 0.0);
  b->wx.assign(((nthreads + 31) / 32) * 32 * 16, 0u);
  // Shared memory starts as NaN floats, so reads of words nothing wrote show up.
  b->dsmem.resize(smem + 16);
  poison(b->dsmem);
  b->unfenced_by.assign((smem + 16 + 15) / 16, 0u);
  b->arena.resize(kArenaBytes);
  poison(b->arena);
  return b;
}

// The proxies of shared memory: threads write it through the generic proxy (stores, cp.async),
// wgmma reads it through the async proxy, and a write is visible to those reads only after the
// writing thread's fence.proxy.async (then a barrier hands it over). Without the fence the tensor
// cores may read stale bytes on the hardware; here the read aborts instead.
inline uint32_t linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline void note_generic_write(const void* p, size_t bytes) {
  TsanIgnore hide;  // bookkeeping shared by the block's fibers
  Block& b = *t_block;
  const auto at = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(b.dsmem.data());
  if (at < base || at + bytes > base + b.dsmem.size()) return;  // static shared memory: no wgmma operand
  for (size_t c = (at - base) / 16; c <= (at - base + bytes - 1) / 16; ++c) {
    b.unfenced_by[c] = linear_tid() + 1;
    g_fiber->unfenced.push_back(c);
  }
}
inline void fence_proxy_async() {
  TsanIgnore hide;
  const uint32_t me = linear_tid() + 1;
  for (size_t c : g_fiber->unfenced)
    if (t_block->unfenced_by[c] == me) t_block->unfenced_by[c] = 0;  // not since rewritten by another
  g_fiber->unfenced.clear();
}
// 1 + the thread whose unfenced generic write holds dynamic shared byte `offset`, or 0.
inline uint32_t unfenced_writer(size_t offset) {
  TsanIgnore hide;
  return t_block->unfenced_by[offset / 16];
}
// Fibers live as long as the process and every cluster reuses them (a ThreadSanitizer fiber
// costs a memory mapping): one per CUDA thread of the largest cluster so far. A fiber's
// history then spans clusters, which the launch orders anyway (cluster by cluster).
inline std::vector<std::unique_ptr<Fiber>> g_pool;
inline Fiber& pooled_fiber(size_t i) {
  while (g_pool.size() <= i) {
    auto f = std::make_unique<Fiber>();
    f->stack = std::make_unique<Stack>(kStackBytes);
#ifdef EMU_TSAN
    f->tsan = __tsan_create_fiber(0);
#endif
    g_pool.push_back(std::move(f));
  }
  return *g_pool[i];
}
inline void fiber_main() {
  (*g_body)();
  g_fiber->done = true;
  g_events.fetch_add(1, kRelaxed);
#ifdef EMU_TSAN
  __tsan_release(&g_end_sync);
#endif
  to_scheduler();  // never resumed
}
// Runs the fibers until all have ended: a round over them resumes each whose barrier phase has
// ended; a round that resumes none means some barrier waits for threads that never come.
inline void run_fibers(const std::vector<Fiber*>& fibers) {
#ifdef EMU_TSAN
  __tsan_ignore_thread_begin();
  g_sched_tsan = __tsan_get_current_fiber();
#endif
  size_t left = fibers.size();
  while (left > 0) {
    const uint64_t before = g_events.load(kRelaxed);
    for (Fiber* fp : fibers) {
      Fiber& f = *fp;
      if (f.done || (f.waits_on != nullptr && f.waits_on->phase.load(kRelaxed) == f.wait_phase)) continue;
      f.waits_on = nullptr;
      g_fiber = &f;
      t_block = f.block;
      threadIdx = f.tid;
      blockIdx = f.bid;
#ifdef EMU_TSAN
      __tsan_switch_to_fiber(f.tsan, 0);
#endif
      swapcontext(&g_sched, &f.ctx);
      if (f.done) --left;
    }
    if (left > 0 && g_events.load(kRelaxed) == before) {
      fprintf(stderr, "emu: deadlock in the cluster of block %u: %zu threads wait at a barrier the others never reach\n", blockIdx.x, left);
      std::abort();
    }
  }
#ifdef EMU_TSAN
  __tsan_ignore_thread_end();
  __tsan_acquire(&g_end_sync);  // the launching code reads what the fibers wrote
#endif
}
// Runs the grid cluster by cluster; the CTAs of one cluster run together (their fibers take
// turns), so cluster.sync and map_shared_rank work. A cooperative launch runs the whole grid
// together as one such unit (csize = grid.x), and its barrier is grid.sync's.
template <class K, class... Args>
void launch_clusters(K kernel, dim3 grid, dim3 block, size_t smem, unsigned csize, bool cooperative, Args... args) {
  check_launch(reinterpret_cast<const void*>(kernel), grid, block, smem, csize, cooperative);
  const unsigned nthreads = block.x * block.y * block.z;
  if (getenv("EMU_TRACE")) fprintf(stderr, "launch grid=%u block=%u cluster=%u smem=%zu\n", grid.x, nthreads, csize, smem);
  reset_shared_table();
  const std::function<void()> body = [&] { kernel(args...); };
  g_body = &body;
  blockDim = block;
  gridDim = grid;
  for (unsigned c0 = 0; c0 < grid.x; c0 += csize) {
    std::vector<std::unique_ptr<Block>> blocks;
    std::vector<Block*> ranks;
    for (unsigned r = 0; r < csize; ++r) { blocks.push_back(make_block(nthreads, smem)); ranks.push_back(blocks.back().get()); }
    Barrier cbar(csize * nthreads);
    for (auto* b : ranks) {
      b->cluster = ranks;
      b->cluster_bar = cooperative ? nullptr : &cbar;
      b->grid_bar = cooperative ? &cbar : nullptr;
    }
    std::vector<Fiber*> fibers;
    for (unsigned r = 0; r < csize; ++r)
      for (unsigned t = 0; t < nthreads; ++t) {
        Fiber& f = pooled_fiber(fibers.size());
        f.block = ranks[r];
        f.tid = make_uint3(t, 0, 0);
        f.bid = make_uint3(c0 + r, 0, 0);
        f.waits_on = nullptr;
        f.done = false;
        f.pending.clear();
        f.groups.clear();
        f.unfenced.clear();  // chunk indices of the block this fiber ran before
        f.wgmma.reset();
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack->top_region();
        f.ctx.uc_stack.ss_size = kStackBytes;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_main, 0);
        fibers.push_back(&f);
      }
    run_fibers(fibers);
    for (auto* b : ranks) check_named_barriers(*b);
  }
  check_static_smem(reinterpret_cast<const void*>(kernel), smem);
  g_body = nullptr;
}
template <class K, class... Args>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  launch_clusters(kernel, grid, block, smem, 1u, false, args...);
}
template <class K, class... Args>
cudaError_t launch_ex(const cudaLaunchConfig_t* cfg, K kernel, Args... args) {
  unsigned csize = 1;
  bool cooperative = false;
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) csize = cfg->attrs[i].val.clusterDim.x;
    if (cfg->attrs[i].id == cudaLaunchAttributeCooperative) cooperative = cfg->attrs[i].val.cooperative != 0;
  }
  if (cfg->gridDim.x % csize != 0) return cudaErrorInvalidConfiguration;
  if (cooperative && csize > 1) return cudaErrorNotSupported;  // not emulated (nor used)
  if (cooperative) csize = cfg->gridDim.x;
  launch_clusters(kernel, cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, csize, cooperative, args...);
  return cudaSuccess;
}
template <class T> T* dyn_smem() { return reinterpret_cast<T*>(t_block->dsmem.data()); }
}  // namespace emu
template <class T> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, T* f) {
  return cudaFuncGetAttributes(a, reinterpret_cast<const void*>(f));
}
template <class T> cudaError_t cudaFuncSetAttribute(T* f, cudaFuncAttribute a, int v) {
  const cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(f), a, v);
  if (err == cudaSuccess && a == cudaFuncAttributeMaxDynamicSharedMemorySize)
    emu::g_dyn_smem_attr[reinterpret_cast<const void*>(f)] = v;
  return err;
}
template <class T> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, T* f, int threads, size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, reinterpret_cast<const void*>(f), threads, smem);
}
