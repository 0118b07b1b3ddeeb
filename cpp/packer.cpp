// Pair packing algorithms; see packer.h for the contract. The pure-Python twin
// in adadpo_megatron/packing.py must reach the same plan by the same rules.
//
// Pipeline: validate (no allocation) -> placement order with each step's
// footprint -> a packing loop that overwrites each step's footprint with its
// pack id -> assembly of the plan. Memory traffic, not arithmetic, dominates at
// a million pairs (fresh pages cost microseconds each in a VM), so the loops
// keep to a few arrays.
#include "packer.h"

#include <algorithm>
#include <climits>
#include <cstddef>
#include <functional>
#include <set>
#include <stdexcept>
#include <utility>

#include "trees.h"

namespace adadpo_packer {
namespace {

using trees::FirstFitTree;
using trees::SuccessorSet;

constexpr int64_t kMaxCapacity = int64_t{1} << 60;  // keeps round-ups and sums inside int64
constexpr int64_t kDenseMaxCapacity = int64_t{1} << 20;

inline int64_t RoundUp(int64_t length, int64_t align) {
  return align == 1 ? length : (length + align - 1) / align * align;  // skip the division
}

inline int64_t Footprint(int64_t chosen, int64_t rejected, int64_t align) {
  return RoundUp(chosen, align) + RoundUp(rejected, align);
}

// Throws std::invalid_argument for the first pair that is malformed or cannot fit.
void ValidatePairs(const int64_t* chosen, const int64_t* rejected, int64_t n, int64_t capacity,
                   int64_t align) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = chosen[i];
    const int64_t r = rejected[i];
    if (c < 1 || r < 1) {
      throw std::invalid_argument("pair " + std::to_string(i) +
                                  ": lengths must be >= 1, got chosen=" + std::to_string(c) +
                                  ", rejected=" + std::to_string(r));
    }
    // Checked before rounding so that huge lengths cannot overflow the sum;
    // up to 2^60 each, the footprint (< 2^62) is exact.
    if (c > capacity || r > capacity || Footprint(c, r, align) > capacity) {
      const std::string size = c > kMaxCapacity || r > kMaxCapacity
                                   ? "lengths " + std::to_string(c) + " + " + std::to_string(r)
                                   : "footprint " + std::to_string(Footprint(c, r, align));
      throw std::invalid_argument("pair " + std::to_string(i) + " does not fit: " + size +
                                  " > capacity " + std::to_string(capacity));
    }
  }
}

// Small capacities take the bucketed code paths: memory O(capacity).
bool UseDense(int64_t capacity, int64_t n) {
  return capacity <= std::min(kDenseMaxCapacity, 4 * n + 65536);
}

// order[k]: the pair placed at step k; sizes[k]: its footprint, replaced by
// its pack id once packed. Int is int32_t whenever pair ids, footprints and
// pack ids all fit, halving the memory the passes below stream through.
template <typename Int>
struct Placement {
  Buffer<Int> order;
  Buffer<Int> sizes;
};

// Pair ids by footprint descending, ties by id ascending. This is a total
// order, so the counting sort and the comparison sort give the same sequence.
template <typename Int>
Placement<Int> DecreasingOrder(const int64_t* chosen, const int64_t* rejected, int64_t n,
                               int64_t capacity, int64_t align) {
  Placement<Int> out;
  out.order = Buffer<Int>(static_cast<size_t>(n));
  out.sizes = Buffer<Int>(static_cast<size_t>(n));
  if (UseDense(capacity, n)) {
    // start[capacity - f + 1] counts footprint f, so prefix sums give each
    // footprint's first slot with larger footprints first.
    std::vector<int64_t> start(static_cast<size_t>(capacity) + 2, 0);
    for (int64_t i = 0; i < n; ++i) {
      ++start[static_cast<size_t>(capacity - Footprint(chosen[i], rejected[i], align) + 1)];
    }
    for (size_t k = 1; k < start.size(); ++k) start[k] += start[k - 1];
    for (size_t bucket = 0; bucket + 1 < start.size(); ++bucket) {
      std::fill(out.sizes.begin() + start[bucket], out.sizes.begin() + start[bucket + 1],
                static_cast<Int>(capacity - static_cast<int64_t>(bucket)));
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t f = Footprint(chosen[i], rejected[i], align);
      out.order[static_cast<size_t>(start[static_cast<size_t>(capacity - f)]++)] =
          static_cast<Int>(i);
    }
    return out;
  }
  auto keyed = Buffer<std::pair<int64_t, int64_t>>(static_cast<size_t>(n));  // (-f, id)
  for (int64_t i = 0; i < n; ++i) {
    keyed[static_cast<size_t>(i)] = {-Footprint(chosen[i], rejected[i], align), i};
  }
  std::sort(keyed.begin(), keyed.end());
  for (size_t k = 0; k < keyed.size(); ++k) {
    out.sizes[k] = static_cast<Int>(-keyed[k].first);
    out.order[k] = static_cast<Int>(keyed[k].second);
  }
  return out;
}

// Fisher-Yates over 0..n-1 (see ShuffledIndices in packer.h).
template <typename Int>
Buffer<Int> Shuffle(int64_t n, uint64_t seed) {
  Buffer<Int> a(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i) a[static_cast<size_t>(i)] = static_cast<Int>(i);
  SplitMix64 rng(seed);
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<size_t>(rng.Below(static_cast<uint64_t>(i) + 1));
    std::swap(a[static_cast<size_t>(i)], a[j]);
  }
  return a;
}

template <typename Int>
Placement<Int> ShuffledOrder(const int64_t* chosen, const int64_t* rejected, int64_t n,
                             int64_t align, uint64_t seed) {
  Placement<Int> out;
  out.order = Shuffle<Int>(n, seed);
  out.sizes = Buffer<Int>(static_cast<size_t>(n));
  // A separate gather pass: independent loads the CPU overlaps, unlike loads
  // inside the packing loop, which wait behind its unpredictable branches.
  for (size_t k = 0; k < out.order.size(); ++k) {
    const auto i = static_cast<size_t>(out.order[k]);
    out.sizes[k] = static_cast<Int>(Footprint(chosen[i], rejected[i], align));
  }
  return out;
}

// Upper bound on the packs first fit opens: at most one pack ends at most half
// full (the first pair of a second such pack would have fitted in the first),
// so P <= floor(2 * total / capacity) + 1; and P <= n. total is kept as
// q * capacity + r so that it cannot overflow.
template <typename Int>
size_t FirstFitMaxPacks(const Buffer<Int>& sizes, int64_t capacity) {
  int64_t q = 0;
  int64_t r = 0;
  for (const int64_t f : sizes) {
    r += f;
    if (r >= capacity) {
      r -= capacity;
      ++q;
    }
  }
  const int64_t bound = 2 * q + (2 * r >= capacity ? 1 : 0) + 1;
  return static_cast<size_t>(std::min(bound, static_cast<int64_t>(sizes.size())));
}

// Each Pack* routine replaces sizes[k] by the pack of step k and returns the
// fill of each pack (pack ids count up in order of opening).
template <typename Room, typename Int>
Buffer<int64_t> PackFirstFit(Buffer<Int>& sizes, int64_t capacity) {
  FirstFitTree<Room> tree(FirstFitMaxPacks(sizes, capacity), static_cast<Room>(capacity));
  for (Int& slot : sizes) slot = static_cast<Int>(tree.Place(static_cast<Room>(slot)));
  return tree.Fill();
}

// Best fit, any capacity: an ordered set of (room, pack); lower_bound({f, 0})
// is the pack with the least room >= f, ties to the lowest pack id. Packs left
// with less room than the smallest footprint can never be chosen and are dropped.
template <typename Int>
Buffer<int64_t> PackBestFitOrderedSet(Buffer<Int>& sizes, int64_t capacity, int64_t min_size) {
  std::set<std::pair<int64_t, int64_t>> open;
  Buffer<int64_t> fill;
  fill.reserve(FirstFitMaxPacks(sizes, capacity));  // the bound holds for any-fit rules
  for (Int& slot : sizes) {
    const int64_t f = slot;
    auto it = open.lower_bound({f, 0});
    int64_t pack;
    int64_t room;
    if (it == open.end()) {
      pack = static_cast<int64_t>(fill.size());
      fill.push_back(0);
      room = capacity - f;
    } else {
      pack = it->second;
      room = it->first - f;
      open.erase(it);
    }
    if (room >= min_size) open.emplace(room, pack);
    fill[static_cast<size_t>(pack)] += f;
    slot = static_cast<Int>(pack);
  }
  return fill;
}

// Best fit, small capacities: the same choice as PackBestFitOrderedSet with the
// open packs bucketed by room: a successor query over non-empty rooms finds the
// least room >= f, and a min-heap per room gives its lowest pack id.
template <typename Int>
Buffer<int64_t> PackBestFitBuckets(Buffer<Int>& sizes, int64_t capacity, int64_t min_size) {
  SuccessorSet rooms(capacity + 1);
  std::vector<std::vector<Int>> packs_by_room(static_cast<size_t>(capacity) + 1);
  const std::greater<Int> min_heap;
  Buffer<int64_t> fill;
  fill.reserve(FirstFitMaxPacks(sizes, capacity));  // the bound holds for any-fit rules
  for (Int& slot : sizes) {
    const int64_t f = slot;
    int64_t room = rooms.Successor(f);
    int64_t pack;
    if (room < 0) {
      pack = static_cast<int64_t>(fill.size());
      fill.push_back(0);
      room = capacity - f;
    } else {
      std::vector<Int>& heap = packs_by_room[static_cast<size_t>(room)];
      std::pop_heap(heap.begin(), heap.end(), min_heap);
      pack = heap.back();
      heap.pop_back();
      if (heap.empty()) rooms.Erase(room);
      room -= f;
    }
    if (room >= min_size) {
      std::vector<Int>& heap = packs_by_room[static_cast<size_t>(room)];
      if (heap.empty()) rooms.Insert(room);
      heap.push_back(static_cast<Int>(pack));
      std::push_heap(heap.begin(), heap.end(), min_heap);
    }
    fill[static_cast<size_t>(pack)] += f;
    slot = static_cast<Int>(pack);
  }
  return fill;
}

template <typename Int>
PackPlan AssemblePlan(const Buffer<Int>& order, const Buffer<Int>& pack_of_step,
                      Buffer<int64_t>&& fill) {
  const size_t n = order.size();
  PackPlan plan;
  plan.pack_tokens = std::move(fill);
  plan.pack_offsets.assign(plan.pack_tokens.size() + 1, 0);
  for (const Int p : pack_of_step) ++plan.pack_offsets[static_cast<size_t>(p) + 1];
  for (size_t p = 1; p < plan.pack_offsets.size(); ++p) {
    plan.pack_offsets[p] += plan.pack_offsets[p - 1];
  }
  // Stable bucketing by pack keeps placement order inside each pack.
  std::vector<int64_t> cursor(plan.pack_offsets.begin(), plan.pack_offsets.end() - 1);
  plan.pair_order = Buffer<int64_t>(n);
  for (size_t step = 0; step < n; ++step) {
    plan.pair_order[static_cast<size_t>(cursor[static_cast<size_t>(pack_of_step[step])]++)] =
        order[step];
  }
  plan.pack_of_pair = Buffer<int64_t>(n);
  for (size_t step = 0; step < n; ++step) {
    plan.pack_of_pair[static_cast<size_t>(order[step])] = pack_of_step[step];
  }
  return plan;
}

template <typename Int>
PackPlan PackValidated(const int64_t* chosen, const int64_t* rejected, int64_t n, int64_t capacity,
                       Algorithm algorithm, uint64_t seed, int64_t align) {
  Placement<Int> placed = algorithm == Algorithm::kFirstFitShuffle
                              ? ShuffledOrder<Int>(chosen, rejected, n, align, seed)
                              : DecreasingOrder<Int>(chosen, rejected, n, capacity, align);
  Buffer<int64_t> fill;
  if (algorithm == Algorithm::kBestFitDecreasing) {
    const int64_t min_size = placed.sizes.empty() ? 0 : placed.sizes.back();
    fill = UseDense(capacity, n) ? PackBestFitBuckets(placed.sizes, capacity, min_size)
                                 : PackBestFitOrderedSet(placed.sizes, capacity, min_size);
  } else if (capacity <= INT16_MAX) {  // 32 rooms per node: one level fewer, native max
    fill = PackFirstFit<int16_t>(placed.sizes, capacity);
  } else {
    fill = PackFirstFit<Int>(placed.sizes, capacity);
  }
  return AssemblePlan(placed.order, placed.sizes, std::move(fill));
}

}  // namespace

Algorithm ParseAlgorithm(const std::string& name) {
  if (name == "ffd") return Algorithm::kFirstFitDecreasing;
  if (name == "first_fit_shuffle") return Algorithm::kFirstFitShuffle;
  if (name == "bfd") return Algorithm::kBestFitDecreasing;
  throw std::invalid_argument("unknown packing algorithm '" + name +
                              "'; valid: ffd, first_fit_shuffle, bfd");
}

uint64_t SplitMix64::Next() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t SplitMix64::Below(uint64_t bound) {
  const uint64_t threshold = (0 - bound) % bound;  // == 2^64 mod bound
  uint64_t x = Next();
  while (x < threshold) x = Next();
  return x % bound;
}

Buffer<int64_t> ShuffledIndices(int64_t n, uint64_t seed) { return Shuffle<int64_t>(n, seed); }

PackPlan PackPairs(const int64_t* chosen, const int64_t* rejected, int64_t n, int64_t capacity,
                   Algorithm algorithm, uint64_t seed, int64_t align) {
  if (n < 0) throw std::invalid_argument("number of pairs must be >= 0, got " + std::to_string(n));
  if (capacity < 1 || capacity > kMaxCapacity) {
    throw std::invalid_argument("capacity must be in [1, 2^60], got " + std::to_string(capacity));
  }
  if (align < 1 || align > kMaxCapacity) {
    throw std::invalid_argument("align must be in [1, 2^60], got " + std::to_string(align));
  }
  ValidatePairs(chosen, rejected, n, capacity, align);
  if (n <= INT32_MAX && capacity <= INT32_MAX) {
    return PackValidated<int32_t>(chosen, rejected, n, capacity, algorithm, seed, align);
  }
  return PackValidated<int64_t>(chosen, rejected, n, capacity, algorithm, seed, align);
}

}  // namespace adadpo_packer
