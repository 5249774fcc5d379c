// Per-sample arithmetic of multi-scale deformable attention, shared by the CPU
// and CUDA kernels so that the CPU tests exercise the exact arithmetic the GPU runs.
//
// Legend: N batch, S = sum_l H_l * W_l value tokens, M heads, D channels per head,
// Lq queries, L levels, P sampling points per level and head. A "group" is one
// (n, q, m) triple: it owns one output row of D channels and L * P samples.
#pragma once

#include <cmath>
#include <cstdint>

// Force-inlined: the CPU kernels compile these once per instruction set, into
// each caller (cpu_loops.h).
#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define MSDA_HOST_DEVICE inline __attribute__((always_inline))
#else
#define MSDA_HOST_DEVICE __forceinline
#endif

namespace ms_deform_attn {

// Flat offsets into contiguous tensors:
//   value (N, S, M, D), output (N, Lq, M, D),
//   sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P).
struct Layout {
  int64_t batch;     // N
  int64_t tokens;    // S
  int64_t heads;     // M
  int64_t channels;  // D
  int64_t queries;   // Lq
  int64_t levels;    // L
  int64_t points;    // P

  MSDA_HOST_DEVICE int64_t groups() const { return batch * queries * heads; }
  MSDA_HOST_DEVICE int64_t group_batch(int64_t group) const { return group / (queries * heads); }
  MSDA_HOST_DEVICE int64_t group_head(int64_t group) const { return group % heads; }
  // Neighbouring pixels of one head are this many elements apart in value.
  MSDA_HOST_DEVICE int64_t pixel_stride() const { return heads * channels; }
  // Channel 0 of value[n, token, m].
  MSDA_HOST_DEVICE int64_t value_offset(int64_t n, int64_t token, int64_t m) const {
    return ((n * tokens + token) * heads + m) * channels;
  }
  // Channel 0 of the output row of a group.
  MSDA_HOST_DEVICE int64_t output_offset(int64_t group) const { return group * channels; }
  // Index of attention_weights[n, q, m, l, p]; sampling_locations holds (x, y) at 2 * index.
  MSDA_HOST_DEVICE int64_t sample_index(int64_t group, int64_t level, int64_t point) const {
    return (group * levels + level) * points + point;
  }
};

// A level is read only if it lies inside value; the CPU entry point rejects
// such inputs, the CUDA kernels (which cannot check without a host sync) read
// the level as zeros instead of reading out of bounds.
MSDA_HOST_DEVICE bool level_fits(int64_t height, int64_t width, int64_t start, int64_t tokens) {
  return height > 0 && width > 0 && start >= 0 && start + height * width <= tokens;
}

MSDA_HOST_DEVICE float floor_value(float x) { return floorf(x); }
MSDA_HOST_DEVICE double floor_value(double x) { return floor(x); }

// The four pixels around a sampling location, ordered top-left, top-right,
// bottom-left, bottom-right, with their bilinear weights.
template <typename acc_t>
struct Bilinear {
  int64_t pixel[4];  // h * W + w inside the level; meaningful only where valid
  acc_t weight[4];   // interpolation weight, 0 where not valid
  bool valid[4];     // the pixel lies inside the level (zero padding elsewhere)
  acc_t frac_x;      // distance from the left column, in pixels
  acc_t frac_y;      // distance from the top row, in pixels
  acc_t width;       // W, to turn pixel gradients into normalized-coordinate gradients
  acc_t height;      // H
};

// Fills `b` for the normalized location (x, y) on an H x W level and returns
// whether any of the four pixels is inside. Matches grid_sample with
// align_corners=False and zero padding: pixel centres sit at (i + 0.5) / size.
template <typename acc_t>
MSDA_HOST_DEVICE bool bilinear_setup(acc_t x, acc_t y, int64_t height, int64_t width, Bilinear<acc_t>& b) {
  const acc_t w_im = x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  const acc_t h_im = y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  b.width = static_cast<acc_t>(width);
  b.height = static_cast<acc_t>(height);
  // Written so that NaN fails it; it also keeps the floor below in integer range.
  // The lower bounds are inclusive: at exactly -1 the only inside pixel has
  // weight 0 but a nonzero location gradient, as in grid_sample.
  const bool near = h_im >= static_cast<acc_t>(-1) && h_im < static_cast<acc_t>(height) &&
                    w_im >= static_cast<acc_t>(-1) && w_im < static_cast<acc_t>(width);
  if (!near) {
    for (int c = 0; c < 4; ++c) {
      b.pixel[c] = 0;
      b.weight[c] = static_cast<acc_t>(0);
      b.valid[c] = false;
    }
    b.frac_x = static_cast<acc_t>(0);
    b.frac_y = static_cast<acc_t>(0);
    return false;
  }
  const acc_t h_floor = floor_value(h_im);
  const acc_t w_floor = floor_value(w_im);
  const int64_t top = static_cast<int64_t>(h_floor);
  const int64_t left = static_cast<int64_t>(w_floor);
  const acc_t frac_y = h_im - h_floor;
  const acc_t frac_x = w_im - w_floor;
  const acc_t rest_y = static_cast<acc_t>(1) - frac_y;
  const acc_t rest_x = static_cast<acc_t>(1) - frac_x;

  const bool top_in = top >= 0;
  const bool bottom_in = top + 1 < height;
  const bool left_in = left >= 0;
  const bool right_in = left + 1 < width;
  b.valid[0] = top_in && left_in;
  b.valid[1] = top_in && right_in;
  b.valid[2] = bottom_in && left_in;
  b.valid[3] = bottom_in && right_in;
  b.pixel[0] = top * width + left;
  b.pixel[1] = b.pixel[0] + 1;
  b.pixel[2] = b.pixel[0] + width;
  b.pixel[3] = b.pixel[2] + 1;
  b.weight[0] = b.valid[0] ? rest_y * rest_x : static_cast<acc_t>(0);
  b.weight[1] = b.valid[1] ? rest_y * frac_x : static_cast<acc_t>(0);
  b.weight[2] = b.valid[2] ? frac_y * rest_x : static_cast<acc_t>(0);
  b.weight[3] = b.valid[3] ? frac_y * frac_x : static_cast<acc_t>(0);
  b.frac_x = frac_x;
  b.frac_y = frac_y;
  return b.valid[0] || b.valid[1] || b.valid[2] || b.valid[3];
}

// Gradients of one sample from dot[c] = sum_d grad_output[d] * value_c[d]
// (0 where the pixel is not valid). Everything here is linear in `dot`, so a
// caller holding only part of the channels may apply it to partial dots and
// sum the results afterwards.
//   grad_attention: d loss / d attention_weight
//   grad_x, grad_y: d loss / d sampling_location (normalized x and y)
template <typename acc_t>
MSDA_HOST_DEVICE void bilinear_backward(const Bilinear<acc_t>& b, const acc_t dot[4], acc_t attention,
                                        acc_t& grad_attention, acc_t& grad_x, acc_t& grad_y) {
  grad_attention = b.weight[0] * dot[0] + b.weight[1] * dot[1] + b.weight[2] * dot[2] + b.weight[3] * dot[3];
  const acc_t rest_y = static_cast<acc_t>(1) - b.frac_y;
  const acc_t rest_x = static_cast<acc_t>(1) - b.frac_x;
  // Derivatives of the interpolated value along the pixel axes.
  const acc_t along_x = rest_y * (dot[1] - dot[0]) + b.frac_y * (dot[3] - dot[2]);
  const acc_t along_y = rest_x * (dot[2] - dot[0]) + b.frac_x * (dot[3] - dot[1]);
  grad_x = attention * along_x * b.width;
  grad_y = attention * along_y * b.height;
}

}  // namespace ms_deform_attn
