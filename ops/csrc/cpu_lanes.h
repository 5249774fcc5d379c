// Channel vectors of the CPU kernels: 32 bytes of channels (8 floats, 4
// doubles) as one value, with the few operations the loops need, and prefetch
// hints. GCC and Clang keep such a value in one AVX2 or two SSE registers,
// depending on the instruction set of the function it is inlined into.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define MSDA_INLINE inline __attribute__((always_inline))
#define MSDA_RESTRICT __restrict__
#else
#define MSDA_INLINE __forceinline
#define MSDA_RESTRICT __restrict
#endif

#if defined(__GNUC__) && !defined(__clang__)
// The vectors below only live inside force-inlined functions, so the
// calling-convention change GCC warns about never applies.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace ms_deform_attn {
namespace cpu {

// Lanes<scalar_t>::type: 32 bytes of channels as one value; a plain array with
// the same operators where the compiler has no vector extensions.
#if defined(__GNUC__) || defined(__clang__)
template <typename scalar_t>
struct Lanes {
  typedef scalar_t type __attribute__((vector_size(32)));
};
#else
template <typename scalar_t>
struct LaneArray {
  static constexpr int kSize = static_cast<int>(32 / sizeof(scalar_t));
  scalar_t v[kSize];
  scalar_t operator[](int i) const { return v[i]; }
  LaneArray& operator+=(const LaneArray& other) {
    for (int i = 0; i < kSize; ++i) v[i] += other.v[i];
    return *this;
  }
  LaneArray operator+(const LaneArray& other) const { LaneArray r = *this; return r += other; }
  LaneArray operator*(const LaneArray& other) const {
    LaneArray r;
    for (int i = 0; i < kSize; ++i) r.v[i] = v[i] * other.v[i];
    return r;
  }
  LaneArray operator*(scalar_t factor) const {
    LaneArray r;
    for (int i = 0; i < kSize; ++i) r.v[i] = v[i] * factor;
    return r;
  }
};
template <typename scalar_t>
struct Lanes {
  typedef LaneArray<scalar_t> type;
};
#endif

// Asks for the cache line holding `address` ahead of its use. The rows of
// sampling locations, weights and gradients of one head are 1 / M of their
// tensors, strided, which the hardware prefetchers do not follow well.
template <bool kForWrite = false>
MSDA_INLINE void prefetch(const void* address) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(address, kForWrite ? 1 : 0);
#else
  (void)address;
#endif
}

// Prefetches `bytes` bytes from `address`, one call per 64-byte line.
template <bool kForWrite = false>
MSDA_INLINE void prefetch_bytes(const void* address, int64_t bytes) {
  const char* begin = static_cast<const char*>(address);
  for (int64_t offset = 0; offset < bytes; offset += 64) {
    prefetch<kForWrite>(begin + offset);
  }
}

// Channels in one Lanes value.
template <typename scalar_t>
constexpr int64_t lane_count() {
  return static_cast<int64_t>(32 / sizeof(scalar_t));
}

// Unaligned load and store of one Lanes value.
template <typename scalar_t, typename V = typename Lanes<scalar_t>::type>
MSDA_INLINE V load(const scalar_t* source) {
  V v;
  std::memcpy(&v, source, sizeof(V));
  return v;
}

template <typename scalar_t, typename V>
MSDA_INLINE void store(scalar_t* target, const V& v) {
  std::memcpy(target, &v, sizeof(V));
}

// Sum of the lanes, as a tree of independent adds.
template <typename scalar_t, typename V>
MSDA_INLINE scalar_t sum_lanes(const V& v) {
  if constexpr (lane_count<scalar_t>() == 8) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
  } else {
    static_assert(lane_count<scalar_t>() == 4, "32-byte lanes hold 8 floats or 4 doubles");
    return (v[0] + v[2]) + (v[1] + v[3]);
  }
}

}  // namespace cpu
}  // namespace ms_deform_attn

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
