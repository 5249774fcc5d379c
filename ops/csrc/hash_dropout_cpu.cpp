// CPU kernels of the hash_dropout library (schemas in library.cpp).
//
// hash_dropout::dropout: dropout whose keep/drop decision for element i of the
// (contiguous) input is a hash of (seed, i), so that
//   output[i] = input[i] / (1 - p)  where keep(seed, i), 0 elsewhere.
// Nothing is stored for the backward: the gradient is the same function of the
// output gradient under the same seed. PyTorch's CPU dropout draws a Bernoulli
// mask element by element and makes three passes over memory; this is one pass.
//
// keep(seed, i): element 2k takes the low and element 2k+1 the high 32 bits of
// SplitMix64's output function at counter k (seed + (k + 1) * golden gamma,
// then two xor-shift-multiply rounds), and is kept when those bits are
// >= round(p * 2^32). ops/hash_dropout.py has the same function in PyTorch.
//
// hash_dropout::relu_dropout, for a feed-forward network's hidden layer, is the
// same dropout of relu(input + bias) (bias over the last dimension, or none) in one
// pass. Its backward takes the output: an element passes its gradient, scaled
// by 1 / (1 - p), exactly when its output is positive.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "cpu_isa.h"

// Inlined into each instruction-set variant below, so that each vectorizes it for its own set.
#if defined(__GNUC__) || defined(__clang__)
#define HASH_DROPOUT_INLINE inline __attribute__((always_inline))
#else
#define HASH_DROPOUT_INLINE __forceinline
#endif

namespace hash_dropout {
namespace {

using ms_deform_attn::cpu_isa;
using ms_deform_attn::Isa;

// Pairs of elements per parallel task: large enough that waking a thread pays.
constexpr int64_t kGrainPairs = int64_t(1) << 15;

HASH_DROPOUT_INLINE uint64_t mix(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + (counter + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// f(x) / (1 - p), f being ReLU (kRelu) or the identity. ReLU is written "x < 0 ? 0 : x" so that
// a NaN stays NaN, as in torch.relu.
template <bool kRelu, typename acc_t>
HASH_DROPOUT_INLINE acc_t scaled(acc_t x, acc_t scale) {
  return (kRelu && x < acc_t(0) ? acc_t(0) : x) * scale;
}

// Elements [2 * begin, 2 * end) of n: output = keep ? f(input + bias) / (1 - p) : 0, f being ReLU
// (kRelu) or the identity, the bias (kBias) restarting every row of 2 * half_row elements (the
// last dimension), so that the inner loop is a plain vectorizable loop; without a bias one row
// spans the tensor. acc_t: the type the sum and scaling are computed in.
template <bool kRelu, bool kBias, typename scalar_t, typename acc_t>
HASH_DROPOUT_INLINE void pairs(const scalar_t* input, const scalar_t* bias, scalar_t* output, int64_t begin,
                               int64_t end, int64_t n, int64_t half_row, uint64_t seed, uint32_t threshold,
                               acc_t scale) {
  const int64_t full_end = std::min(end, n / 2);
  for (int64_t k = begin; k < full_end;) {
    const int64_t row_start = (k / half_row) * half_row;
    const int64_t stop = std::min(full_end, row_start + half_row);
    const scalar_t* row_bias = kBias ? bias + 2 * (k - row_start) : nullptr;
    const scalar_t* in = input + 2 * k;
    scalar_t* out = output + 2 * k;
    const int64_t count = stop - k;
    for (int64_t j = 0; j < count; ++j) {
      const uint64_t bits = mix(seed, static_cast<uint64_t>(k + j));
      const uint32_t low = static_cast<uint32_t>(bits);
      const uint32_t high = static_cast<uint32_t>(bits >> 32);
      acc_t a = static_cast<acc_t>(in[2 * j]);
      acc_t b = static_cast<acc_t>(in[2 * j + 1]);
      if (kBias) {
        a += static_cast<acc_t>(row_bias[2 * j]);
        b += static_cast<acc_t>(row_bias[2 * j + 1]);
      }
      out[2 * j] = static_cast<scalar_t>(low >= threshold ? scaled<kRelu>(a, scale) : acc_t(0));
      out[2 * j + 1] = static_cast<scalar_t>(high >= threshold ? scaled<kRelu>(b, scale) : acc_t(0));
    }
    k = stop;
  }
  if (end > full_end && (n & 1)) {  // the last, unpaired element (never with a bias: rows are even)
    const int64_t k = n / 2;
    const uint32_t low = static_cast<uint32_t>(mix(seed, static_cast<uint64_t>(k)));
    output[2 * k] = static_cast<scalar_t>(low >= threshold ? scaled<kRelu>(static_cast<acc_t>(input[2 * k]), scale) : acc_t(0));
  }
}

// The gradient of relu_dropout from its output: grad / (1 - p) where output > 0, else 0.
// "output <= 0" (not "!(output > 0)") lets a NaN output pass the gradient, as threshold_backward does.
template <typename scalar_t, typename acc_t>
HASH_DROPOUT_INLINE void relu_backward_range(const scalar_t* grad, const scalar_t* output, scalar_t* grad_input,
                                             int64_t begin, int64_t end, acc_t scale) {
  for (int64_t i = begin; i < end; ++i) {
    const acc_t g = static_cast<acc_t>(grad[i]) * scale;
    grad_input[i] = static_cast<scalar_t>(output[i] <= scalar_t(0) ? acc_t(0) : g);
  }
}

// The same loops compiled for AVX2 and for AVX-512 (whose native 64-bit multiplies hash faster
// than AVX2's emulated ones: docs/benchmarks.md, Design measurements), picked by cpu_isa().
#if MSDA_X86
template <bool kRelu, bool kBias, typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void pairs_avx2(const scalar_t* input, const scalar_t* bias, scalar_t* output,
                                                    int64_t begin, int64_t end, int64_t n, int64_t half_row,
                                                    uint64_t seed, uint32_t threshold, acc_t scale) {
  pairs<kRelu, kBias>(input, bias, output, begin, end, n, half_row, seed, threshold, scale);
}

template <bool kRelu, bool kBias, typename scalar_t, typename acc_t>
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))) void pairs_avx512(
    const scalar_t* input, const scalar_t* bias, scalar_t* output, int64_t begin, int64_t end, int64_t n,
    int64_t half_row, uint64_t seed, uint32_t threshold, acc_t scale) {
  pairs<kRelu, kBias>(input, bias, output, begin, end, n, half_row, seed, threshold, scale);
}

template <typename scalar_t, typename acc_t>
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))) void relu_backward_avx512(
    const scalar_t* grad, const scalar_t* output, scalar_t* grad_input, int64_t begin, int64_t end, acc_t scale) {
  relu_backward_range(grad, output, grad_input, begin, end, scale);
}
#endif

void check_arguments(const char* name, const at::Tensor& input, const at::Tensor& seed, double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, name, ": p must be in [0, 1], got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), name,
              ": seed must be one int64 CPU value, got ", seed.scalar_type(), " ", seed.sizes());
  TORCH_CHECK(input.is_floating_point(), name, ": input must be floating point, got ", input.scalar_type());
}

// The forward of both operators: ``bias`` undefined for none (then any n), else (C,) with C the
// input's last dimension, even. Returns a new contiguous tensor shaped like the input.
template <bool kRelu>
at::Tensor dropout_forward(const at::Tensor& input, const at::Tensor& bias, const at::Tensor& seed,
                           double p) {
  const at::Tensor source = input.contiguous();
  at::Tensor output = at::empty(source.sizes(), source.options());
  const int64_t n = source.numel();
  // keep when the 32 hash bits are >= threshold: P(keep) = 1 - threshold / 2^32; a p within
  // 2^-33 of 1 rounds to 2^32, which no 32 bits reach
  const int64_t rounded = std::llround(p * 4294967296.0);
  if (rounded >= (int64_t(1) << 32)) {
    return output.zero_();
  }
  if (n == 0) {
    return output;
  }
  const uint32_t threshold = static_cast<uint32_t>(rounded);
  const bool has_bias = bias.defined();
  const int64_t half_row = has_bias ? source.size(-1) / 2 : std::max<int64_t>(n / 2, 1);
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  const Isa chosen = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, source.scalar_type(), "hash_dropout::dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
    const scalar_t* in = source.const_data_ptr<scalar_t>();
    const scalar_t* b = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    const auto run = [&](auto with_bias) {
      constexpr bool kBias = decltype(with_bias)::value;
      at::parallel_for(0, (n + 1) / 2, kGrainPairs, [&](int64_t begin, int64_t end) {
#if MSDA_X86
        if (chosen == Isa::kAvx512) {
          pairs_avx512<kRelu, kBias, scalar_t, acc_t>(in, b, out, begin, end, n, half_row, key, threshold, scale);
          return;
        }
        if (chosen == Isa::kAvx2) {
          pairs_avx2<kRelu, kBias, scalar_t, acc_t>(in, b, out, begin, end, n, half_row, key, threshold, scale);
          return;
        }
#endif
        pairs<kRelu, kBias, scalar_t, acc_t>(in, b, out, begin, end, n, half_row, key, threshold, scale);
      });
    };
    if (has_bias) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
    (void)chosen;
  });
  return output;
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& seed, double p) {
  check_arguments("hash_dropout::dropout", input, seed, p);
  return dropout_forward<false>(input, at::Tensor(), seed, p);
}

at::Tensor relu_forward_cpu(const at::Tensor& input, const std::optional<at::Tensor>& bias, const at::Tensor& seed,
                            double p) {
  check_arguments("hash_dropout::relu_dropout", input, seed, p);
  if (!bias.has_value() || !bias->defined()) {
    return dropout_forward<true>(input, at::Tensor(), seed, p);
  }
  TORCH_CHECK(input.dim() >= 1 && bias->dim() == 1 && bias->size(0) == input.size(-1),
              "hash_dropout::relu_dropout: bias must have shape (C,) for an input (..., C); got ", bias->sizes(), " and ",
              input.sizes());
  TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "hash_dropout::relu_dropout: bias dtype ", bias->scalar_type(),
              " differs from the input's ", input.scalar_type());
  TORCH_CHECK(bias->device().is_cpu(), "hash_dropout::relu_dropout: bias must be a CPU tensor");
  TORCH_CHECK(input.size(-1) % 2 == 0, "hash_dropout::relu_dropout: a bias needs an even last dimension, got ",
              input.size(-1));
  return dropout_forward<true>(input, bias->contiguous(), seed, p);
}

at::Tensor relu_backward_cpu(const at::Tensor& grad_output, const at::Tensor& output, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "hash_dropout::relu_dropout_backward: p must be in [0, 1), got ", p);
  TORCH_CHECK(grad_output.sizes() == output.sizes() && grad_output.scalar_type() == output.scalar_type(),
              "hash_dropout::relu_dropout_backward: grad_output ", grad_output.sizes(), " ", grad_output.scalar_type(),
              " does not match the output ", output.sizes(), " ", output.scalar_type());
  const at::Tensor grad = grad_output.contiguous();
  const at::Tensor kept = output.contiguous();
  at::Tensor grad_input = at::empty(grad.sizes(), grad.options());
  const int64_t n = grad.numel();
  const Isa chosen = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "hash_dropout::relu_dropout_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* o = kept.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 2 * kGrainPairs, [&](int64_t begin, int64_t end) {
#if MSDA_X86
      if (chosen == Isa::kAvx512) {
        relu_backward_avx512<scalar_t, acc_t>(g, o, gi, begin, end, scale);
        return;
      }
#endif
      relu_backward_range<scalar_t, acc_t>(g, o, gi, begin, end, scale);
    });
    (void)chosen;
  });
  return grad_input;
}

}  // namespace
}  // namespace hash_dropout

TORCH_LIBRARY_IMPL(hash_dropout, CPU, m) {
  m.impl("dropout", &hash_dropout::forward_cpu);
  m.impl("relu_dropout", &hash_dropout::relu_forward_cpu);
  m.impl("relu_dropout_backward", &hash_dropout::relu_backward_cpu);
}
