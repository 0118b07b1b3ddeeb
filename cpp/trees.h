// Search trees behind the pair packer (internal to cpp/packer.cpp): a max
// tree over pack rooms for first fit, and a successor set over room values for
// best fit. Plain C++17 with SSE2 fast paths on x86-64.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define ADADPO_PACKER_SSE2 1
#endif
#if defined(_MSC_VER)
#include <intrin.h>
#endif

namespace adadpo_packer {
namespace trees {

inline int CountTrailingZeros(uint64_t x) {  // x != 0
#if defined(_MSC_VER)
  unsigned long index;
  _BitScanForward64(&index, x);
  return static_cast<int>(index);
#else
  return __builtin_ctzll(x);
#endif
}

// First fit: a tree over the rooms of the open packs (leaves exact, inner
// nodes upper bounds of the largest room below), with one 64-byte node per
// group of children (32 int16, 16 int32 or 8 int64), so a query reads about
// log_16(P) cache lines instead of the log_2(P) of a binary segment tree.
// Slots of packs not yet opened hold 0 and never match (footprints >= 2); a
// pair larger than every open room opens the next pack without a descent.
template <typename Room>
class FirstFitTree {
 public:
  static constexpr size_t kFan = 64 / sizeof(Room);

  FirstFitTree(size_t max_packs, Room capacity) : capacity_(capacity), max_packs_(max_packs) {
    size_t count = std::max<size_t>(max_packs, 1);
    while (true) {
      offsets_.push_back(nodes_.size());
      nodes_.resize(nodes_.size() + (count + kFan - 1) / kFan * kFan, Room{0});
      if (count <= kFan) break;
      count = (count + kFan - 1) / kFan;
    }
  }

  // The slots used in each pack opened so far: capacity minus its room.
  Buffer<int64_t> Fill() const {
    Buffer<int64_t> fill(opened_);
    for (size_t p = 0; p < opened_; ++p) fill[p] = int64_t{capacity_} - nodes_[p];
    return fill;
  }

  // Takes f slots from the lowest-numbered pack with room >= f, opening a new
  // pack if none has; returns the pack.
  //
  // Inner nodes hold upper bounds of their subtree's largest room, not exact
  // maxima: a shrinking room is written to its leaf only. A node whose bound
  // proved stale (no child of it reaches f) is repaired on the way and the
  // search resumes one level up, to the right of it. The answer is the same
  // leftmost leaf, since a bound below f always means no room below it, while
  // most shrinks never need the max of a node recomputed.
  size_t Place(Room f) {
    if (top_max_ < f) return Open(f);
    const size_t top = offsets_.size() - 1;
    size_t level = top;
    size_t group = 0;
    size_t child;
    while (true) {
      child = FirstAtLeast(&nodes_[offsets_[level] + group * kFan], f);
      if (child < kFan) {
        if (level == 0) break;
        group = group * kFan + child;
        --level;
        continue;
      }
      const Room repaired = MaxOf(&nodes_[offsets_[level] + group * kFan]);
      if (level == top) {  // nothing open has room
        top_max_ = repaired;
        return Open(f);
      }
      nodes_[offsets_[level + 1] + group] = repaired;  // < f: the parent now skips it
      group /= kFan;
      ++level;
    }
    const size_t index = group * kFan + child;
    nodes_[index] -= f;
    return index;
  }

 private:
  size_t Open(Room f) {
    if (opened_ == max_packs_)
      throw std::logic_error("first fit opened too many packs: packer bug");
    const size_t index = opened_++;
    const Room room = capacity_ - f;
    nodes_[index] = room;
    size_t child = index;
    for (size_t level = 1; level < offsets_.size(); ++level) {  // raise the maxima above
      child /= kFan;
      Room& node = nodes_[offsets_[level] + child];
      if (node >= room) break;
      node = room;
    }
    top_max_ = std::max(top_max_, room);
    return index;
  }

  // The largest of the kFan slots of one node.
  static Room MaxOf(const Room* slots) {
#if defined(ADADPO_PACKER_SSE2)
    if constexpr (sizeof(Room) == 2) {
      __m128i m = _mm_loadu_si128(reinterpret_cast<const __m128i*>(slots));
      for (size_t k = 8; k < kFan; k += 8) {
        m = _mm_max_epi16(m, _mm_loadu_si128(reinterpret_cast<const __m128i*>(slots + k)));
      }
      m = _mm_max_epi16(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
      m = _mm_max_epi16(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
      m = _mm_max_epi16(m, _mm_shufflelo_epi16(m, _MM_SHUFFLE(2, 3, 0, 1)));
      return static_cast<Room>(_mm_extract_epi16(m, 0));
    }
    if constexpr (sizeof(Room) == 4) {  // SSE2 has no max_epi32: select by a compare
      const auto max4 = [](__m128i a, __m128i b) {
        const __m128i a_wins = _mm_cmpgt_epi32(a, b);
        return _mm_or_si128(_mm_and_si128(a_wins, a), _mm_andnot_si128(a_wins, b));
      };
      __m128i m = _mm_loadu_si128(reinterpret_cast<const __m128i*>(slots));
      for (size_t k = 4; k < kFan; k += 4) {
        m = max4(m, _mm_loadu_si128(reinterpret_cast<const __m128i*>(slots + k)));
      }
      m = max4(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
      m = max4(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
      return static_cast<Room>(_mm_cvtsi128_si32(m));
    }
#endif
    Room best = slots[0];
    for (size_t j = 1; j < kFan; ++j) best = slots[j] > best ? slots[j] : best;
    return best;
  }

  // The first of the kFan slots of one node holding >= f, or kFan if none does.
  static size_t FirstAtLeast(const Room* slots, Room f) {
    uint64_t mask = 0;
#if defined(ADADPO_PACKER_SSE2)
    if constexpr (sizeof(Room) == 2) {
      const __m128i below = _mm_set1_epi16(static_cast<int16_t>(f - 1));  // >= f  <=>  > f - 1
      for (size_t k = 0; k < kFan; k += 16) {
        const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(slots + k));
        const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(slots + k + 8));
        // Saturating pack keeps each 16-bit compare result (0 or -1) as one byte.
        const __m128i bytes =
            _mm_packs_epi16(_mm_cmpgt_epi16(lo, below), _mm_cmpgt_epi16(hi, below));
        mask |= static_cast<uint64_t>(static_cast<uint32_t>(_mm_movemask_epi8(bytes))) << k;
      }
    } else if constexpr (sizeof(Room) == 4) {
      const __m128i below = _mm_set1_epi32(static_cast<int32_t>(f - 1));  // >= f  <=>  > f - 1
      for (size_t k = 0; k < kFan; k += 4) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(slots + k));
        const int bits = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(v, below)));
        mask |= static_cast<uint64_t>(bits) << k;
      }
    } else
#endif
    {
      for (size_t j = 0; j < kFan; ++j) mask |= static_cast<uint64_t>(slots[j] >= f) << j;
    }
    return mask == 0 ? kFan : static_cast<size_t>(CountTrailingZeros(mask));
  }

  Room capacity_;
  size_t max_packs_;
  size_t opened_ = 0;
  Room top_max_ = 0;             // >= the largest room of any open pack
  std::vector<Room> nodes_;      // all levels, leaves (one per pack) first
  std::vector<size_t> offsets_;  // where each level starts in nodes_
};

// A set of integers in [0, universe) with successor queries: a 64-ary tree of
// bit words (level 0 holds the members, each level above marks non-empty words
// below). Every operation touches one word per level.
class SuccessorSet {
 public:
  explicit SuccessorSet(int64_t universe) {
    auto words = static_cast<size_t>((universe + 63) / 64);
    while (true) {
      levels_.emplace_back(std::max<size_t>(words, 1), 0);
      if (words <= 1) break;
      words = (words + 63) / 64;
    }
  }

  void Insert(int64_t x) {
    auto i = static_cast<uint64_t>(x);
    for (auto& words : levels_) {
      const bool was_empty = words[i >> 6] == 0;
      words[i >> 6] |= uint64_t{1} << (i & 63);
      if (!was_empty) return;
      i >>= 6;
    }
  }

  void Erase(int64_t x) {
    auto i = static_cast<uint64_t>(x);
    for (auto& words : levels_) {
      words[i >> 6] &= ~(uint64_t{1} << (i & 63));
      if (words[i >> 6] != 0) return;
      i >>= 6;
    }
  }

  // The smallest member >= x, or -1 if there is none.
  int64_t Successor(int64_t x) const {
    auto i = static_cast<uint64_t>(x);
    size_t level = 0;
    while (true) {  // climb until a word holds a member at or after i
      if (level == levels_.size() || (i >> 6) >= levels_[level].size()) return -1;
      const uint64_t bits = levels_[level][i >> 6] & (~uint64_t{0} << (i & 63));
      if (bits != 0) {
        i = (i & ~uint64_t{63}) + static_cast<uint64_t>(CountTrailingZeros(bits));
        break;
      }
      i = (i >> 6) + 1;
      ++level;
    }
    while (level > 0) {  // descend along the lowest set bits
      --level;
      i = (i << 6) + static_cast<uint64_t>(CountTrailingZeros(levels_[level][i]));
    }
    return static_cast<int64_t>(i);
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

}  // namespace trees
}  // namespace adadpo_packer
