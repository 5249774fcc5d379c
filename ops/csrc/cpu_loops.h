// Loops of the CPU kernels. ms_deform_attn_cpu.cpp compiles them twice, for
// the baseline instruction set and (on x86-64) for AVX2 + FMA, picked at run
// time; everything here is force-inlined into those two callers, so each copy
// is compiled entirely for its own instruction set.
//
// A task works on one head of one batch element, whose rows are 1 / M of
// value, interleaved with the other heads. When the samples read each row
// many times over (encoder layers), it first copies them into a contiguous
// per-thread slice (S, D), so that the rows it gathers from are dense in cache
// and in the TLB; otherwise it reads value in place. Per sample, the four
// pixel offsets and weights are computed once (bilinear.h); the D channels of
// a row form the innermost loop.
#pragma once

#include <cstdint>
#include <cstring>

#include "bilinear.h"
#include "cpu_lanes.h"

#if defined(__GNUC__) && !defined(__clang__)
// As in cpu_lanes.h: the vectors passed around here never cross a call.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace ms_deform_attn {
namespace cpu {

template <typename scalar_t>
struct Arguments {
  const scalar_t* value;           // (N, S, M, D)
  const int64_t* shapes;           // (L, 2)
  const int64_t* starts;           // (L,)
  const scalar_t* locations;       // (N, Lq, M, L, P, 2)
  const scalar_t* weights;         // (N, Lq, M, L, P)
  scalar_t* output;                // (N, Lq, M, D), forward only
  const scalar_t* grad_output;     // (N, Lq, M, D), backward only
  scalar_t* grad_value;            // (N, S, M, D), backward only
  scalar_t* grad_locations;        // (N, Lq, M, L, P, 2), backward only
  scalar_t* grad_weights;          // (N, Lq, M, L, P), backward only
  Layout layout;
};

// Queries ahead that prefetch() fetches for.
constexpr int64_t kPrefetchQueries = 2;

// Prefetches the per-query rows of group `group`: its sampling locations and
// attention weights, and `row` (the output or its gradient, D channels).
template <typename scalar_t>
MSDA_INLINE void prefetch_query(const Arguments<scalar_t>& a, int64_t group, const scalar_t* row) {
  const int64_t samples = a.layout.levels * a.layout.points;
  prefetch_bytes(a.locations + 2 * group * samples, 2 * samples * static_cast<int64_t>(sizeof(scalar_t)));
  prefetch_bytes(a.weights + group * samples, samples * static_cast<int64_t>(sizeof(scalar_t)));
  prefetch_bytes(row, a.layout.channels * static_cast<int64_t>(sizeof(scalar_t)));
}

// Prefetches, for writing, the location and weight gradients of group `group`.
template <typename scalar_t>
MSDA_INLINE void prefetch_query_gradients(const Arguments<scalar_t>& a, int64_t group) {
  const int64_t samples = a.layout.levels * a.layout.points;
  prefetch_bytes<true>(a.grad_locations + 2 * group * samples, 2 * samples * static_cast<int64_t>(sizeof(scalar_t)));
  prefetch_bytes<true>(a.grad_weights + group * samples, samples * static_cast<int64_t>(sizeof(scalar_t)));
}

// One valid pixel of one sample: where its channels start in value and the
// factor (attention weight times bilinear weight) it is added with.
template <typename scalar_t>
struct Tap {
  int64_t offset;
  scalar_t coefficient;
};

// out[d] = sum_k taps[k].coefficient * value[taps[k].offset + d] for d < channels.
// Four lanes at a time (32 floats, a whole head in the usual configuration)
// so that the taps are walked once and each row is read in one go.
template <typename scalar_t>
MSDA_INLINE void gather(const scalar_t* MSDA_RESTRICT value, const Tap<scalar_t>* MSDA_RESTRICT taps, int64_t count,
                        int64_t channels, scalar_t* MSDA_RESTRICT out) {
  using V = typename Lanes<scalar_t>::type;
  constexpr int64_t kLanes = lane_count<scalar_t>();
  int64_t begin = 0;
  for (; begin + 4 * kLanes <= channels; begin += 4 * kLanes) {
    V sum0 = {}, sum1 = {}, sum2 = {}, sum3 = {};
    for (int64_t k = 0; k < count; ++k) {
      const scalar_t* row = value + taps[k].offset + begin;
      const scalar_t coefficient = taps[k].coefficient;
      sum0 += load(row) * coefficient;
      sum1 += load(row + kLanes) * coefficient;
      sum2 += load(row + 2 * kLanes) * coefficient;
      sum3 += load(row + 3 * kLanes) * coefficient;
    }
    store(out + begin, sum0);
    store(out + begin + kLanes, sum1);
    store(out + begin + 2 * kLanes, sum2);
    store(out + begin + 3 * kLanes, sum3);
  }
  for (; begin + kLanes <= channels; begin += kLanes) {
    V sum = {};
    for (int64_t k = 0; k < count; ++k) {
      sum += load(value + taps[k].offset + begin) * taps[k].coefficient;
    }
    store(out + begin, sum);
  }
  for (; begin < channels; ++begin) {
    scalar_t sum = 0;
    for (int64_t k = 0; k < count; ++k) {
      sum += value[taps[k].offset + begin] * taps[k].coefficient;
    }
    out[begin] = sum;
  }
}

// target[d] += coefficient * grad_row[d], and returns sum_d grad_row[d] * row[d];
// one pass, as both walk the same grad_row.
template <typename scalar_t>
MSDA_INLINE scalar_t dot_and_scatter(scalar_t* MSDA_RESTRICT target, const scalar_t* MSDA_RESTRICT row,
                                     const scalar_t* MSDA_RESTRICT grad_row, scalar_t coefficient,
                                     int64_t channels) {
  using V = typename Lanes<scalar_t>::type;
  constexpr int64_t kLanes = lane_count<scalar_t>();
  V dot = {};
  int64_t begin = 0;
  for (; begin + kLanes <= channels; begin += kLanes) {
    const V grad = load(grad_row + begin);
    dot += grad * load(row + begin);
    store(target + begin, load(target + begin) + grad * coefficient);
  }
  scalar_t total = sum_lanes<scalar_t>(dot);
  for (; begin < channels; ++begin) {
    total += grad_row[begin] * row[begin];
    target[begin] += coefficient * grad_row[begin];
  }
  return total;
}

// dot_and_scatter for the four pixels of a sample at once, all inside: one
// pass over grad_row, with the four dot products in separate accumulators.
template <typename scalar_t>
MSDA_INLINE void dot_and_scatter_four(scalar_t* grad_rows, const scalar_t* rows, const int64_t offset[4],
                                      const scalar_t coefficient[4], const scalar_t* MSDA_RESTRICT grad_row,
                                      int64_t channels, scalar_t dot[4]) {
  using V = typename Lanes<scalar_t>::type;
  constexpr int64_t kLanes = lane_count<scalar_t>();
  const scalar_t* row0 = rows + offset[0];
  const scalar_t* row1 = rows + offset[1];
  const scalar_t* row2 = rows + offset[2];
  const scalar_t* row3 = rows + offset[3];
  scalar_t* target0 = grad_rows + offset[0];
  scalar_t* target1 = grad_rows + offset[1];
  scalar_t* target2 = grad_rows + offset[2];
  scalar_t* target3 = grad_rows + offset[3];
  V dot0 = {}, dot1 = {}, dot2 = {}, dot3 = {};
  int64_t begin = 0;
  for (; begin + kLanes <= channels; begin += kLanes) {
    const V grad = load(grad_row + begin);
    dot0 += grad * load(row0 + begin);
    dot1 += grad * load(row1 + begin);
    dot2 += grad * load(row2 + begin);
    dot3 += grad * load(row3 + begin);
    store(target0 + begin, load(target0 + begin) + grad * coefficient[0]);
    store(target1 + begin, load(target1 + begin) + grad * coefficient[1]);
    store(target2 + begin, load(target2 + begin) + grad * coefficient[2]);
    store(target3 + begin, load(target3 + begin) + grad * coefficient[3]);
  }
  dot[0] = sum_lanes<scalar_t>(dot0);
  dot[1] = sum_lanes<scalar_t>(dot1);
  dot[2] = sum_lanes<scalar_t>(dot2);
  dot[3] = sum_lanes<scalar_t>(dot3);
  for (; begin < channels; ++begin) {
    const scalar_t grad = grad_row[begin];
    dot[0] += grad * row0[begin];
    dot[1] += grad * row1[begin];
    dot[2] += grad * row2[begin];
    dot[3] += grad * row3[begin];
    target0[begin] += coefficient[0] * grad;
    target1[begin] += coefficient[1] * grad;
    target2[begin] += coefficient[2] * grad;
    target3[begin] += coefficient[3] * grad;
  }
}

// Copies the rows of head m of batch n, tokens [first, last), into slice (S, D).
template <typename scalar_t>
MSDA_INLINE void load_slice(const Arguments<scalar_t>& a, int64_t n, int64_t m, int64_t first, int64_t last,
                            scalar_t* MSDA_RESTRICT slice) {
  const int64_t channels = a.layout.channels;
  for (int64_t token = first; token < last; ++token) {
    std::memcpy(slice + token * channels, a.value + a.layout.value_offset(n, token, m), channels * sizeof(scalar_t));
  }
}

// Where a task reads the rows of its head: a contiguous copy (`slice` not
// null, rows D apart) or value itself (rows M * D apart).
template <typename scalar_t>
struct HeadRows {
  const scalar_t* rows;  // row of token 0
  int64_t stride;        // elements from one token's row to the next
};

// Output rows of tasks [begin, end), where task t enumerates (n, m, q) with q
// fastest, so that consecutive tasks share a head. With `slice` (S * D
// elements), the head's rows are first copied there; `taps` holds 4 * L * P entries.
template <typename scalar_t>
MSDA_INLINE void forward_tasks(const Arguments<scalar_t>& a, int64_t begin, int64_t end, scalar_t* slice,
                               Tap<scalar_t>* taps) {
  const Layout& layout = a.layout;
  int64_t loaded = -1;  // n * M + m of the head in `head`
  HeadRows<scalar_t> head{nullptr, 0};
  for (int64_t task = begin; task < end; ++task) {
    const int64_t q = task % layout.queries;
    const int64_t pair = task / layout.queries;
    const int64_t m = pair % layout.heads;
    const int64_t n = pair / layout.heads;
    if (pair != loaded) {
      if (slice != nullptr) {
        load_slice(a, n, m, 0, layout.tokens, slice);
        head = {slice, layout.channels};
      } else {
        head = {a.value + layout.value_offset(n, 0, m), layout.pixel_stride()};
      }
      loaded = pair;
    }
    const int64_t group = (n * layout.queries + q) * layout.heads + m;
    if (q + kPrefetchQueries < layout.queries) {
      const int64_t ahead = group + kPrefetchQueries * layout.heads;
      prefetch_query(a, ahead, a.output + layout.output_offset(ahead));
    }
    int64_t count = 0;
    for (int64_t l = 0; l < layout.levels; ++l) {
      const int64_t height = a.shapes[2 * l];
      const int64_t width = a.shapes[2 * l + 1];
      const int64_t start = a.starts[l];
      for (int64_t p = 0; p < layout.points; ++p) {
        const int64_t s = layout.sample_index(group, l, p);
        Bilinear<scalar_t> b;
        if (!bilinear_setup<scalar_t>(a.locations[2 * s], a.locations[2 * s + 1], height, width, b)) {
          continue;
        }
        const scalar_t attention = a.weights[s];
        for (int c = 0; c < 4; ++c) {
          if (b.valid[c]) {
            taps[count].offset = (start + b.pixel[c]) * head.stride;
            taps[count].coefficient = attention * b.weight[c];
            ++count;
          }
        }
      }
    }
    gather(head.rows, taps, count, layout.channels, a.output + layout.output_offset(group));
  }
}

// Gradients of tasks [begin, end), where task t enumerates (n, m, part) with
// the levels split into `level_parts` equal parts (1, or L when the levels are
// disjoint). A task owns the grad_value rows of head m of batch n in its
// levels, so tasks never write the same element. With `slice` and
// `grad_slice` (S * D elements each), it reads the head's rows from a copy and
// sums their gradients in grad_slice, which it copies out at the end (rows of
// grad_value outside every level are left alone); without, it works on value
// and grad_value (zero on entry) directly. Sampling locations and weights are
// read as contiguous rows.
template <typename scalar_t>
MSDA_INLINE void backward_tasks(const Arguments<scalar_t>& a, int64_t begin, int64_t end, int64_t level_parts,
                                scalar_t* slice, scalar_t* grad_slice) {
  const Layout& layout = a.layout;
  const int64_t channels = layout.channels;
  const int64_t levels_per_part = layout.levels / level_parts;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t part = task % level_parts;
    const int64_t m = (task / level_parts) % layout.heads;
    const int64_t n = task / (level_parts * layout.heads);
    const int64_t level_begin = part * levels_per_part;
    const int64_t level_end = level_begin + levels_per_part;
    const scalar_t* rows = a.value + layout.value_offset(n, 0, m);
    scalar_t* grad_rows = a.grad_value + layout.value_offset(n, 0, m);
    int64_t stride = layout.pixel_stride();
    if (slice != nullptr) {
      for (int64_t l = level_begin; l < level_end; ++l) {
        const int64_t first = a.starts[l];
        const int64_t last = first + a.shapes[2 * l] * a.shapes[2 * l + 1];
        load_slice(a, n, m, first, last, slice);
        std::memset(grad_slice + first * channels, 0, (last - first) * channels * sizeof(scalar_t));
      }
      rows = slice;
      grad_rows = grad_slice;
      stride = channels;
    }
    for (int64_t q = 0; q < layout.queries; ++q) {
      const int64_t group = (n * layout.queries + q) * layout.heads + m;
      const scalar_t* grad_row = a.grad_output + layout.output_offset(group);
      if (q + kPrefetchQueries < layout.queries) {
        const int64_t ahead = group + kPrefetchQueries * layout.heads;
        prefetch_query(a, ahead, a.grad_output + layout.output_offset(ahead));
        prefetch_query_gradients(a, ahead);
      }
      for (int64_t l = level_begin; l < level_end; ++l) {
        const int64_t height = a.shapes[2 * l];
        const int64_t width = a.shapes[2 * l + 1];
        const int64_t start = a.starts[l];
        for (int64_t p = 0; p < layout.points; ++p) {
          const int64_t s = layout.sample_index(group, l, p);
          Bilinear<scalar_t> b;
          scalar_t grad_attention = 0, grad_x = 0, grad_y = 0;
          if (bilinear_setup<scalar_t>(a.locations[2 * s], a.locations[2 * s + 1], height, width, b)) {
            const scalar_t attention = a.weights[s];
            scalar_t dot[4] = {0, 0, 0, 0};
            if (b.valid[0] && b.valid[1] && b.valid[2] && b.valid[3]) {
              const int64_t offset[4] = {(start + b.pixel[0]) * stride, (start + b.pixel[1]) * stride,
                                         (start + b.pixel[2]) * stride, (start + b.pixel[3]) * stride};
              const scalar_t coefficient[4] = {attention * b.weight[0], attention * b.weight[1],
                                               attention * b.weight[2], attention * b.weight[3]};
              dot_and_scatter_four(grad_rows, rows, offset, coefficient, grad_row, channels, dot);
            } else {
              for (int c = 0; c < 4; ++c) {
                if (b.valid[c]) {
                  const int64_t offset = (start + b.pixel[c]) * stride;
                  dot[c] = dot_and_scatter(grad_rows + offset, rows + offset, grad_row, attention * b.weight[c],
                                           channels);
                }
              }
            }
            bilinear_backward<scalar_t>(b, dot, attention, grad_attention, grad_x, grad_y);
          }
          a.grad_weights[s] = grad_attention;
          a.grad_locations[2 * s] = grad_x;
          a.grad_locations[2 * s + 1] = grad_y;
        }
      }
    }
    if (slice != nullptr) {
      for (int64_t l = level_begin; l < level_end; ++l) {
        const int64_t first = a.starts[l];
        const int64_t last = first + a.shapes[2 * l] * a.shapes[2 * l + 1];
        for (int64_t token = first; token < last; ++token) {
          std::memcpy(a.grad_value + layout.value_offset(n, token, m), grad_slice + token * channels,
                      channels * sizeof(scalar_t));
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace ms_deform_attn

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
