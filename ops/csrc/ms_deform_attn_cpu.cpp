// CPU kernels of multi-scale deformable attention (float32, float64): entry
// points, parallelization and the choice of instruction set. The loops are in
// cpu_loops.h, the per-sample arithmetic in bilinear.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "bilinear.h"
#include "checks.h"
#include "cpu_isa.h"
#include "cpu_loops.h"

namespace ms_deform_attn {
namespace {

using cpu::Arguments;
using cpu::Tap;

// Multiply-adds (a few hundred microseconds) below which a chunk of tasks is
// not worth waking another thread for: small inputs run serially.
constexpr int64_t kMinimumWorkPerThread = int64_t(1) << 20;

// at::parallel_for grain size for tasks of `work` multiply-adds each.
int64_t grain_for(int64_t work) { return std::max<int64_t>(1, kMinimumWorkPerThread / std::max<int64_t>(1, work)); }

template <typename scalar_t>
void forward_baseline(const Arguments<scalar_t>& a, int64_t begin, int64_t end, scalar_t* slice,
                      Tap<scalar_t>* taps) {
  cpu::forward_tasks(a, begin, end, slice, taps);
}

template <typename scalar_t>
void backward_baseline(const Arguments<scalar_t>& a, int64_t begin, int64_t end, int64_t level_parts,
                       scalar_t* slice, scalar_t* grad_slice) {
  cpu::backward_tasks(a, begin, end, level_parts, slice, grad_slice);
}

#if MSDA_X86
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void forward_avx2(const Arguments<scalar_t>& a, int64_t begin, int64_t end,
                                                      scalar_t* slice, Tap<scalar_t>* taps) {
  cpu::forward_tasks(a, begin, end, slice, taps);
}

template <typename scalar_t>
__attribute__((target("avx2,fma"))) void backward_avx2(const Arguments<scalar_t>& a, int64_t begin, int64_t end,
                                                       int64_t level_parts, scalar_t* slice, scalar_t* grad_slice) {
  cpu::backward_tasks(a, begin, end, level_parts, slice, grad_slice);
}
#endif

// The AVX2 loops wherever the CPU has AVX2 (AVX-512 adds nothing to their 32-byte vectors).
bool use_avx2() { return cpu_isa() != Isa::kBaseline; }

// Whether tasks copy their head's rows into a contiguous slice first (see
// cpu_loops.h): worth it when the samples read each row several times over
// (each sample reads four rows), not for a few hundred decoder queries.
bool use_slices(const Layout& layout) { return layout.queries * layout.levels * layout.points >= layout.tokens; }

// How the levels sit in the S tokens of value.
struct LevelCover {
  bool disjoint;  // no token belongs to two levels
  bool complete;  // every token belongs to a level
};

// The CPU kernel reads spatial_shapes on the host, so it can afford to reject a
// value of another length than the levels', and levels that do not fit in value
// instead of reading out of bounds.
LevelCover check_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, const Layout& layout) {
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  int64_t level_tokens = 0;
  for (int64_t l = 0; l < layout.levels; ++l) {
    level_tokens += shapes[2 * l] * shapes[2 * l + 1];
  }
  // The same ValueError as the Python wrapper and the reference, for direct and compiled calls.
  TORCH_CHECK_VALUE(level_tokens == layout.tokens, "ms_deform_attn: value has S = ", layout.tokens,
                    " tokens (dim 1) but spatial_shapes covers sum_l H_l * W_l = ", level_tokens,
                    "; value must hold exactly the flattened levels of spatial_shapes");
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (int64_t l = 0; l < layout.levels; ++l) {
    TORCH_CHECK(level_fits(shapes[2 * l], shapes[2 * l + 1], starts[l], layout.tokens), "ms_deform_attn: level ", l,
                " (H = ", shapes[2 * l], ", W = ", shapes[2 * l + 1], ", start = ", starts[l],
                ") does not fit in value with S = ", layout.tokens);
    ranges.emplace_back(starts[l], starts[l] + shapes[2 * l] * shapes[2 * l + 1]);
  }
  std::sort(ranges.begin(), ranges.end());
  LevelCover cover{true, true};
  int64_t covered = 0;
  for (const auto& range : ranges) {
    cover.disjoint = cover.disjoint && range.first >= covered;
    cover.complete = cover.complete && range.first == covered;
    covered = std::max(covered, range.second);
  }
  cover.complete = cover.complete && covered == layout.tokens;
  return cover;
}

// The inputs both directions read; the caller adds its outputs.
template <typename scalar_t>
Arguments<scalar_t> input_arguments(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                    const at::Tensor& attention_weights, const Layout& layout) {
  Arguments<scalar_t> a{};
  a.value = value.data_ptr<scalar_t>();
  a.shapes = spatial_shapes.data_ptr<int64_t>();
  a.starts = level_start_index.data_ptr<int64_t>();
  a.locations = sampling_locations.data_ptr<scalar_t>();
  a.weights = attention_weights.data_ptr<scalar_t>();
  a.layout = layout;
  return a;
}

at::Tensor forward_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                       const at::Tensor& level_start_index_in, const at::Tensor& sampling_locations_in,
                       const at::Tensor& attention_weights_in) {
  const Layout layout =
      check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in, attention_weights_in);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const at::Tensor sampling_locations = sampling_locations_in.contiguous();
  const at::Tensor attention_weights = attention_weights_in.contiguous();
  check_levels(spatial_shapes, level_start_index, layout);

  at::Tensor output = at::empty({layout.batch, layout.queries, layout.heads * layout.channels}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    Arguments<scalar_t> a = input_arguments<scalar_t>(value, spatial_shapes, level_start_index,
                                                      sampling_locations, attention_weights, layout);
    a.output = output.data_ptr<scalar_t>();
    const bool avx2 = use_avx2();
    const bool slices = use_slices(layout);
    // Tasks are (n, m, q) with q fastest, so a thread's range covers few heads.
    const int64_t work = 4 * layout.levels * layout.points * layout.channels;
    at::parallel_for(0, layout.groups(), grain_for(work), [&](int64_t begin, int64_t end) {
      std::unique_ptr<scalar_t[]> slice(slices ? new scalar_t[layout.tokens * layout.channels] : nullptr);
      std::vector<Tap<scalar_t>> taps(4 * layout.levels * layout.points);
#if MSDA_X86
      if (avx2) {
        forward_avx2(a, begin, end, slice.get(), taps.data());
        return;
      }
#endif
      forward_baseline(a, begin, end, slice.get(), taps.data());
    });
    (void)avx2;
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& value_in,
                                                            const at::Tensor& spatial_shapes_in,
                                                            const at::Tensor& level_start_index_in,
                                                            const at::Tensor& sampling_locations_in,
                                                            const at::Tensor& attention_weights_in,
                                                            const at::Tensor& grad_output_in) {
  const Layout layout =
      check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in, attention_weights_in);
  check_grad_output(grad_output_in, layout, value_in);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor spatial_shapes = spatial_shapes_in.contiguous();
  const at::Tensor level_start_index = level_start_index_in.contiguous();
  const at::Tensor sampling_locations = sampling_locations_in.contiguous();
  const at::Tensor attention_weights = attention_weights_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();
  const LevelCover cover = check_levels(spatial_shapes, level_start_index, layout);

  // Every sample's location and weight gradient is written once. Working on
  // head slices, each task writes all grad_value rows of its levels, so only
  // rows outside every level need zeros up front; otherwise tasks add into it.
  const bool slices = use_slices(layout);
  at::Tensor grad_value = (slices && cover.complete) ? at::empty_like(value) : at::zeros_like(value);
  at::Tensor grad_locations = at::empty_like(sampling_locations);
  at::Tensor grad_weights = at::empty_like(attention_weights);
  if (grad_weights.numel() == 0 || layout.channels == 0) {
    grad_value.zero_();
    grad_locations.zero_();
    grad_weights.zero_();
    return {grad_value, grad_locations, grad_weights};
  }
  // (n, m) pairs own disjoint rows of grad_value; with fewer pairs than
  // threads, disjoint levels are split as well.
  const int64_t pairs = layout.batch * layout.heads;
  const bool split_levels = pairs < at::get_num_threads() && cover.disjoint && layout.levels > 1;
  const int64_t level_parts = split_levels ? layout.levels : 1;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    Arguments<scalar_t> a = input_arguments<scalar_t>(value, spatial_shapes, level_start_index,
                                                      sampling_locations, attention_weights, layout);
    a.grad_output = grad_output.data_ptr<scalar_t>();
    a.grad_value = grad_value.data_ptr<scalar_t>();
    a.grad_locations = grad_locations.data_ptr<scalar_t>();
    a.grad_weights = grad_weights.data_ptr<scalar_t>();
    const bool avx2 = use_avx2();
    const int64_t work = 8 * layout.queries * (layout.levels / level_parts) * layout.points * layout.channels;
    at::parallel_for(0, pairs * level_parts, grain_for(work), [&](int64_t begin, int64_t end) {
      std::unique_ptr<scalar_t[]> slice(slices ? new scalar_t[layout.tokens * layout.channels] : nullptr);
      std::unique_ptr<scalar_t[]> grad_slice(slices ? new scalar_t[layout.tokens * layout.channels] : nullptr);
#if MSDA_X86
      if (avx2) {
        backward_avx2(a, begin, end, level_parts, slice.get(), grad_slice.get());
        return;
      }
#endif
      backward_baseline(a, begin, end, level_parts, slice.get(), grad_slice.get());
    });
    (void)avx2;
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace
}  // namespace ms_deform_attn

TORCH_LIBRARY_IMPL(deformable_attention, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn::forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn::backward_cpu);
}
