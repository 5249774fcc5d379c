// CUDA kernels of multi-scale deformable attention (float32, float64, float16,
// bfloat16; half types accumulate in float32).
//
// Forward: one thread per (group, chunk of kVec channels), where a group is an
// output row (n, q, m). The thread computes each sample's pixels and weights
// once (bilinear.h) and reuses them for its kVec channels, read with one
// vector load per pixel.
//
// Backward: a group is handled by `lanes` consecutive threads of one warp
// (lanes = the power of two >= D / kVec, at most 32); each thread owns every
// lanes-th chunk of channels. Value gradients are scattered with atomics
// (into a float32 buffer for half types); the location and attention-weight
// gradients of a sample are sums over channels, reduced with warp shuffles and
// written once by the group's first lane, so they need neither atomics nor
// zero-filling.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "bilinear.h"
#include "checks.h"

namespace ms_deform_attn {
namespace {

constexpr int kThreads = 256;  // a multiple of the warp size, so groups of lanes never straddle warps
constexpr int kWarp = 32;
constexpr int64_t kMaxBlocks = int64_t(1) << 30;  // grid-stride loops cover the rest

template <typename scalar_t>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};

// kVec consecutive elements read or written with one instruction.
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Packet {
  scalar_t v[kVec];
};

// Channels per thread of the forward: 16-byte accesses.
template <typename scalar_t>
constexpr int forward_vector() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

// Channels per thread of the backward: at most 4, as each one costs registers
// for four pixels and four atomics.
template <typename scalar_t>
constexpr int backward_vector() {
  return forward_vector<scalar_t>() < 4 ? forward_vector<scalar_t>() : 4;
}

// The forward vector loads need 16-byte alignment, the backward ones at most that.
bool aligned_16(const void* pointer) { return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0; }

template <typename scalar_t, int kVec, typename acc_t>
__device__ __forceinline__ void load_channels(const scalar_t* __restrict__ source, acc_t (&out)[kVec]) {
  const Packet<scalar_t, kVec> packet = *reinterpret_cast<const Packet<scalar_t, kVec>*>(source);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    out[k] = static_cast<acc_t>(packet.v[k]);
  }
}

template <typename scalar_t, int kVec, typename acc_t>
__device__ __forceinline__ void store_channels(scalar_t* __restrict__ target, const acc_t (&in)[kVec]) {
  Packet<scalar_t, kVec> packet;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    packet.v[k] = static_cast<scalar_t>(in[k]);
  }
  *reinterpret_cast<Packet<scalar_t, kVec>*>(target) = packet;
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const scalar_t* __restrict__ locations,
                   const scalar_t* __restrict__ weights, scalar_t* __restrict__ output, const Layout layout) {
  using acc_t = typename Accumulate<scalar_t>::type;
  const int64_t chunks = layout.channels / kVec;  // threads per group
  const int64_t total = layout.groups() * chunks;
  const int64_t pixel_stride = layout.pixel_stride();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t group = i / chunks;
    const int64_t channel = (i - group * chunks) * kVec;
    const int64_t n = layout.group_batch(group);
    const int64_t m = layout.group_head(group);
    acc_t sum[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      sum[k] = static_cast<acc_t>(0);
    }
    for (int64_t l = 0; l < layout.levels; ++l) {
      const int64_t height = shapes[2 * l];
      const int64_t width = shapes[2 * l + 1];
      const int64_t start = starts[l];
      if (!level_fits(height, width, start, layout.tokens)) {
        continue;
      }
      const scalar_t* value_level = value + layout.value_offset(n, start, m) + channel;
      for (int64_t p = 0; p < layout.points; ++p) {
        const int64_t s = layout.sample_index(group, l, p);
        Bilinear<acc_t> b;
        if (!bilinear_setup<acc_t>(static_cast<acc_t>(locations[2 * s]), static_cast<acc_t>(locations[2 * s + 1]),
                                   height, width, b)) {
          continue;
        }
        const acc_t attention = static_cast<acc_t>(weights[s]);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (b.valid[c]) {
            acc_t pixel[kVec];
            load_channels<scalar_t, kVec>(value_level + b.pixel[c] * pixel_stride, pixel);
            const acc_t coefficient = attention * b.weight[c];
#pragma unroll
            for (int k = 0; k < kVec; ++k) {
              sum[k] += coefficient * pixel[k];
            }
          }
        }
      }
    }
    store_channels<scalar_t, kVec>(output + layout.output_offset(group) + channel, sum);
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, const scalar_t* __restrict__ locations,
                    const scalar_t* __restrict__ weights, const scalar_t* __restrict__ grad_output,
                    typename Accumulate<scalar_t>::type* __restrict__ grad_value,
                    scalar_t* __restrict__ grad_locations, scalar_t* __restrict__ grad_weights,
                    const Layout layout, const int lanes) {
  using acc_t = typename Accumulate<scalar_t>::type;
  const int64_t chunks = layout.channels / kVec;
  const int64_t total = layout.groups() * lanes;
  const int64_t pixel_stride = layout.pixel_stride();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // `base` is the same for the whole block, so every lane of a warp runs the
  // same iterations and reaches the shuffles below; lanes past the end only
  // contribute zeros.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < total; base += stride) {
    const int64_t i = base + threadIdx.x;
    const bool active = i < total;
    const int64_t group = i / lanes;
    const int lane = static_cast<int>(threadIdx.x) % lanes;  // base is a multiple of lanes
    const int64_t n = layout.group_batch(group);
    const int64_t m = layout.group_head(group);
    const scalar_t* grad_row = grad_output + layout.output_offset(group);

    for (int64_t l = 0; l < layout.levels; ++l) {
      const int64_t height = shapes[2 * l];
      const int64_t width = shapes[2 * l + 1];
      const int64_t start = starts[l];
      const bool fits = level_fits(height, width, start, layout.tokens);
      const int64_t level_offset = layout.value_offset(n, start, m);
      for (int64_t p = 0; p < layout.points; ++p) {
        const int64_t s = layout.sample_index(group, l, p);
        acc_t grad_attention = static_cast<acc_t>(0);
        acc_t grad_x = static_cast<acc_t>(0);
        acc_t grad_y = static_cast<acc_t>(0);
        Bilinear<acc_t> b;
        if (active && fits &&
            bilinear_setup<acc_t>(static_cast<acc_t>(locations[2 * s]), static_cast<acc_t>(locations[2 * s + 1]),
                                  height, width, b)) {
          const acc_t attention = static_cast<acc_t>(weights[s]);
          acc_t dot[4] = {static_cast<acc_t>(0), static_cast<acc_t>(0), static_cast<acc_t>(0),
                          static_cast<acc_t>(0)};
          for (int64_t chunk = lane; chunk < chunks; chunk += lanes) {
            const int64_t channel = chunk * kVec;
            // Re-read for every sample rather than held in registers: it stays in L1.
            acc_t grad[kVec];
            load_channels<scalar_t, kVec>(grad_row + channel, grad);
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              if (b.valid[c]) {
                const int64_t offset = level_offset + b.pixel[c] * pixel_stride + channel;
                acc_t pixel[kVec];
                load_channels<scalar_t, kVec>(value + offset, pixel);
                const acc_t coefficient = attention * b.weight[c];
#pragma unroll
                for (int k = 0; k < kVec; ++k) {
                  dot[c] += grad[k] * pixel[k];
                  atomicAdd(grad_value + offset + k, coefficient * grad[k]);
                }
              }
            }
          }
          // Linear in dot, so partial dots give partial gradients.
          bilinear_backward<acc_t>(b, dot, attention, grad_attention, grad_x, grad_y);
        }
        for (int offset = lanes / 2; offset > 0; offset /= 2) {
          grad_attention += __shfl_xor_sync(0xffffffffu, grad_attention, offset);
          grad_x += __shfl_xor_sync(0xffffffffu, grad_x, offset);
          grad_y += __shfl_xor_sync(0xffffffffu, grad_y, offset);
        }
        if (active && lane == 0) {
          grad_weights[s] = static_cast<scalar_t>(grad_attention);
          grad_locations[2 * s] = static_cast<scalar_t>(grad_x);
          grad_locations[2 * s + 1] = static_cast<scalar_t>(grad_y);
        }
      }
    }
  }
}

int64_t block_count(int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>((threads + kThreads - 1) / kThreads, kMaxBlocks));
}

// Smallest power of two >= chunks, at most a warp.
int lanes_for(int64_t chunks) {
  int lanes = 1;
  while (lanes < chunks && lanes < kWarp) {
    lanes *= 2;
  }
  return lanes;
}

template <typename scalar_t, int kVec>
void launch_forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, at::Tensor& output,
                    const Layout& layout) {
  const int64_t threads = layout.groups() * (layout.channels / kVec);
  forward_kernel<scalar_t, kVec><<<block_count(threads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
      sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
      layout);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int kVec>
void launch_backward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                     const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                     const at::Tensor& grad_output, at::Tensor& grad_value, at::Tensor& grad_locations,
                     at::Tensor& grad_weights, const Layout& layout) {
  using acc_t = typename Accumulate<scalar_t>::type;
  const int lanes = lanes_for(layout.channels / kVec);
  const int64_t threads = layout.groups() * lanes;
  backward_kernel<scalar_t, kVec><<<block_count(threads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
      sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
      grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<acc_t>(), grad_locations.data_ptr<scalar_t>(),
      grad_weights.data_ptr<scalar_t>(), layout, lanes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor forward_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                        const at::Tensor& level_start_index_in, const at::Tensor& sampling_locations_in,
                        const at::Tensor& attention_weights_in) {
  const Layout layout =
      check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in, attention_weights_in);
  const c10::cuda::CUDAGuard device_guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const at::Tensor sampling_locations = sampling_locations_in.contiguous();
  const at::Tensor attention_weights = attention_weights_in.contiguous();

  at::Tensor output = at::empty({layout.batch, layout.queries, layout.heads * layout.channels}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    constexpr int kWide = forward_vector<scalar_t>();
    if (layout.channels % kWide == 0 && aligned_16(value.data_ptr()) && aligned_16(output.data_ptr())) {
      launch_forward<scalar_t, kWide>(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights, output, layout);
    } else {
      launch_forward<scalar_t, 1>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                  output, layout);
    }
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& value_in,
                                                             const at::Tensor& spatial_shapes_in,
                                                             const at::Tensor& level_start_index_in,
                                                             const at::Tensor& sampling_locations_in,
                                                             const at::Tensor& attention_weights_in,
                                                             const at::Tensor& grad_output_in) {
  const Layout layout =
      check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in, attention_weights_in);
  check_grad_output(grad_output_in, layout, value_in);
  // Value gradients are summed with atomics, in no fixed order.
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  const c10::cuda::CUDAGuard device_guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const at::Tensor sampling_locations = sampling_locations_in.contiguous();
  const at::Tensor attention_weights = attention_weights_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();

  // Value gradients are scattered with atomics, in float32 for half types.
  const bool half_type = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  const at::ScalarType sum_type = half_type ? at::kFloat : value.scalar_type();
  at::Tensor grad_value_sum = at::zeros(value.sizes(), value.options().dtype(sum_type));
  at::Tensor grad_locations = at::empty_like(sampling_locations);
  at::Tensor grad_weights = at::empty_like(attention_weights);
  if (grad_weights.numel() == 0 || layout.channels == 0) {
    grad_locations.zero_();
    grad_weights.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      constexpr int kWide = backward_vector<scalar_t>();
      if (layout.channels % kWide == 0 && aligned_16(value.data_ptr()) && aligned_16(grad_output.data_ptr())) {
        launch_backward<scalar_t, kWide>(value, spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights, grad_output, grad_value_sum, grad_locations, grad_weights,
                                         layout);
      } else {
        launch_backward<scalar_t, 1>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                     grad_output, grad_value_sum, grad_locations, grad_weights, layout);
      }
    });
  }
  at::Tensor grad_value = half_type ? grad_value_sum.to(value.scalar_type()) : grad_value_sum;
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace
}  // namespace ms_deform_attn

TORCH_LIBRARY_IMPL(deformable_attention, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn::forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn::backward_cuda);
}
