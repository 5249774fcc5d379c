// The instruction set the CPU kernels run: their loops are also compiled for
// AVX2 + FMA and AVX-512 (function attributes, so the rest of the library stays
// baseline x86-64) and picked once per process from what the CPU has.
// MS_DEFORM_ATTN_CPU_ISA=baseline or =avx2 caps the choice, to test the
// narrower loops on a wider machine.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MSDA_X86 1
#else
#define MSDA_X86 0
#endif

namespace ms_deform_attn {

enum class Isa { kBaseline, kAvx2, kAvx512 };

inline Isa cpu_isa() {
  static const Isa chosen = [] {
#if MSDA_X86
    const char* forced = std::getenv("MS_DEFORM_ATTN_CPU_ISA");
    const bool baseline = forced != nullptr && std::strcmp(forced, "baseline") == 0;
    const bool at_most_avx2 = forced != nullptr && std::strcmp(forced, "avx2") == 0;
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vl");
    if (baseline || !avx2) {
      return Isa::kBaseline;
    }
    return (avx512 && !at_most_avx2) ? Isa::kAvx512 : Isa::kAvx2;
#else
    return Isa::kBaseline;
#endif
  }();
  return chosen;
}

}  // namespace ms_deform_attn
