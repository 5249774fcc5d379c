// Argument checks of the C++ entry points (host code only). The Python wrapper
// checks the same things first and raises ValueError; these keep direct calls of
// torch.ops.deformable_attention.* from reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include "bilinear.h"

namespace ms_deform_attn {

// Checks ranks, shapes, dtypes and devices, and returns the sizes.
inline Layout check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                           const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                           const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6, "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got ",
              attention_weights.sizes());
  Layout layout;
  layout.batch = value.size(0);
  layout.tokens = value.size(1);
  layout.heads = value.size(2);
  layout.channels = value.size(3);
  layout.queries = sampling_locations.size(1);
  layout.levels = spatial_shapes.size(0);
  layout.points = sampling_locations.size(4);

  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == layout.levels,
              "ms_deform_attn: level_start_index must be (L,) with L = ", layout.levels, ", got ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_locations.size(0) == layout.batch && sampling_locations.size(2) == layout.heads &&
                  sampling_locations.size(3) == layout.levels && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2) with N = ", layout.batch,
              ", M = ", layout.heads, ", L = ", layout.levels, ", got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = ", sampling_locations.sizes().slice(0, 5),
              ", got ", attention_weights.sizes());

  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share a dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ", attention_weights.scalar_type());
  const auto device = value.device();
  TORCH_CHECK(spatial_shapes.device() == device && level_start_index.device() == device &&
                  sampling_locations.device() == device && attention_weights.device() == device,
              "ms_deform_attn: all inputs must be on ", device);
  return layout;
}

inline void check_grad_output(const at::Tensor& grad_output, const Layout& layout, const at::Tensor& value) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == layout.batch &&
                  grad_output.size(1) == layout.queries && grad_output.size(2) == layout.heads * layout.channels,
              "ms_deform_attn: grad_output must be (N, Lq, M * D) = (", layout.batch, ", ", layout.queries, ", ",
              layout.heads * layout.channels, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() && grad_output.device() == value.device(),
              "ms_deform_attn: grad_output must match value's dtype and device");
}

}  // namespace ms_deform_attn
