// Pair packing for preference training: place (chosen, rejected) pairs into
// fixed-capacity packs without ever splitting a pair.
//
// Torch-free and Python-free: plain arrays in, plain vectors out. The Python
// face (adadpo_megatron/packing.py) validates the inputs, calls this through
// the pybind11 module adadpo_megatron._packer, and holds a pure-Python twin of
// every algorithm here that must produce the identical plan; any change to an
// ordering or tie-break rule below has to be made in both places.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace adadpo_packer {

// Allocator for the large arrays of a plan: allocations of 2 MiB or more are
// 2 MiB-aligned and marked for transparent huge pages (Linux). A fresh 4 KiB
// page costs microseconds to fault in under a hypervisor, which at a million
// pairs outweighs the packing itself; numpy hints huge pages for its large
// arrays the same way. madvise is only a hint; elsewhere this is malloc.
template <typename T>
struct HugePageAllocator {
  using value_type = T;
  static constexpr size_t kHugePage = size_t{1} << 21;

  HugePageAllocator() = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) {}  // NOLINT: rebinding must be implicit

  T* allocate(size_t n) {
    size_t bytes = n * sizeof(T);
    void* p = nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= kHugePage) {
      bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
      p = std::aligned_alloc(kHugePage, bytes);
      if (p != nullptr) madvise(p, bytes, MADV_HUGEPAGE);
    } else {
      p = std::malloc(bytes);
    }
#else
    p = std::malloc(bytes);
#endif
    if (p == nullptr && bytes != 0) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }

  // Default-initialise (no zeroing): every buffer is written in full before
  // it is read, and zeroing would be one more pass over the memory.
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

template <typename T, typename U>
bool operator==(const HugePageAllocator<T>&, const HugePageAllocator<U>&) {
  return true;
}
template <typename T, typename U>
bool operator!=(const HugePageAllocator<T>&, const HugePageAllocator<U>&) {
  return false;
}

template <typename T>
using Buffer = std::vector<T, HugePageAllocator<T>>;

enum class Algorithm {
  kFirstFitDecreasing,  // "ffd"
  kFirstFitShuffle,     // "first_fit_shuffle"
  kBestFitDecreasing,   // "bfd"
};

// Maps "ffd" | "first_fit_shuffle" | "bfd" to an Algorithm; throws
// std::invalid_argument for any other name.
Algorithm ParseAlgorithm(const std::string& name);

// The result of packing N pairs into P packs (all int64, like the numpy side).
struct PackPlan {
  Buffer<int64_t> pack_of_pair;  // [N] pack id of each pair
  Buffer<int64_t> pair_order;    // [N] pair ids grouped by pack, in placement order
  Buffer<int64_t> pack_offsets;  // [P+1] pack p is pair_order[offsets[p]:offsets[p+1]]
  Buffer<int64_t> pack_tokens;   // [P] sum of the footprints placed in each pack
};

// SplitMix64 (Steele, Lea, Flood 2014): the seeded generator behind
// first_fit_shuffle. Chosen because it is tiny and trivially reproducible in
// Python with 64-bit masking.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next();
  // Uniform integer in [0, bound) for bound >= 1, by rejection sampling (no
  // modulo bias): draws below (2^64 - bound) mod bound are discarded.
  uint64_t Below(uint64_t bound);

 private:
  uint64_t state_;
};

// Fisher-Yates permutation of 0..n-1: for i = n-1 down to 1, swap a[i] with
// a[Below(i + 1)]. Bit-identical to packing._shuffled_indices in Python.
Buffer<int64_t> ShuffledIndices(int64_t n, uint64_t seed);

// Packs n pairs. footprint[i] = round_up(chosen[i], align) + round_up(rejected[i], align).
// Order of placement: ffd and bfd take pairs by footprint descending, ties by
// pair index ascending; first_fit_shuffle takes them in ShuffledIndices(n, seed)
// order. First fit puts a pair into the lowest-numbered pack with room (a
// 16-ary max tree over packs, O(log n) per pair); best fit into the pack with
// the least room that still fits, ties to the lowest pack id (an ordered set of
// (room, pack), or for small capacities rooms bucketed under a bit-tree
// successor query; O(log n) per pair either way). A new pack is opened when
// none fits; pack ids count up in order of opening. Sorting is a counting sort
// for small capacities, else a comparison sort: O(n log n) overall. "Small"
// is capacity <= min(2^20, 4n + 65536): both paths give identical plans.
// Throws std::invalid_argument on lengths < 1, capacity or align outside
// [1, 2^60], or a pair whose footprint exceeds capacity (naming the pair).
// Thread-safe; touches no Python state (run it without the GIL).
PackPlan PackPairs(const int64_t* chosen, const int64_t* rejected, int64_t n, int64_t capacity,
                   Algorithm algorithm, uint64_t seed, int64_t align);

}  // namespace adadpo_packer
