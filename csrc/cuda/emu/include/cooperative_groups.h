// Stand-in for the real header: the cluster and grid groups of the emulator (see emu.h).
#pragma once
#include "emu.h"

namespace cooperative_groups {
struct cluster_group {
  void sync() const {
    if (emu::t_block->cluster_bar == nullptr) emu::fail("cluster.sync in a cooperative launch (not emulated)");
    emu::t_block->cluster_bar->arrive_and_wait();
  }
  // The same shared variable in the CTA of cluster rank r.
  template <class T> T* map_shared_rank(T* p, unsigned r) const {
    const auto off = reinterpret_cast<unsigned char*>(p) - emu::t_block->arena.data();
    return reinterpret_cast<T*>(emu::t_block->cluster[r]->arena.data() + off);
  }
};
inline cluster_group this_cluster() { return {}; }
// grid.sync: only in a cooperative launch (on a GPU it fails otherwise too).
struct grid_group {
  void sync() const {
    if (emu::t_block->grid_bar == nullptr) emu::fail("grid.sync outside a cooperative launch");
    emu::t_block->grid_bar->arrive_and_wait();
  }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups
