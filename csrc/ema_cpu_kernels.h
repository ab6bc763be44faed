// Inner loops of the CPU EMA update, written so that GCC and Clang vectorise them at -O3.
//
// ema.cpp includes this file twice: once for the baseline ISA of the build (SSE2 on x86-64) and
// once under `#pragma GCC target("avx2,fma")`, choosing at run time from what the CPU reports.
// That is how a wheel built on any machine still uses 256-bit vectors where they exist, without
// -march=native. There is deliberately no include guard, and SOFLOW_KERNEL_NS names the namespace
// of each copy.
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace soflow::cpu::SOFLOW_KERNEL_NS {

// Elements handled per pass over the decay rates. A block of converted parameters (4 KiB in fp32,
// 8 KiB in fp64) stays in L1 while every EMA buffer of that block is blended against it, so the
// parameter is read from memory once however many decay rates there are.
constexpr int64_t kBlock = 1024;

// bfloat16 is the top half of a float32: widening is a 16-bit shift, which vectorises, unlike a
// call into c10::BFloat16's conversion operator.
inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

template <typename P, typename A>
inline void widen(const P* __restrict src, A* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<P, uint16_t>) {
      dst[i] = static_cast<A>(bf16_bits_to_float(src[i]));
    } else {
      dst[i] = static_cast<A>(src[i]);
    }
  }
}

// The update in the form the authors write it, decay * ema + (1 - decay) * param, rather than
// torch.lerp's ema + w * (param - ema): same value up to rounding, and it keeps fp32 results
// within an ulp of a `mul_().add_()` reference.
template <typename E, typename A>
inline void blend(E* __restrict ema, const A* __restrict x, int64_t n, A decay, A one_minus_decay) {
  for (int64_t i = 0; i < n; ++i) {
    ema[i] = static_cast<E>(decay * static_cast<A>(ema[i]) + one_minus_decay * x[i]);
  }
}

// Updates elements [0, n) of one tensor for every decay rate.
// emas: [num_decays] pointers, each to n elements of E; param: n elements of P (uint16_t = bf16).
template <typename E, typename P, typename A>
void ema_span(E* const* emas, const P* param, int64_t n, int num_decays, const A* decay,
              const A* one_minus_decay) {
  if constexpr (std::is_same_v<P, A>) {
    // Parameters already in the compute type: blend straight from memory. Blocking still keeps
    // the parameter block hot in L1 for the second and later decay rates.
    for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
      const int64_t m = n - i0 < kBlock ? n - i0 : kBlock;
      for (int k = 0; k < num_decays; ++k) {
        blend<E, A>(emas[k] + i0, param + i0, m, decay[k], one_minus_decay[k]);
      }
    }
  } else {
    alignas(64) A buffer[kBlock];
    for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
      const int64_t m = n - i0 < kBlock ? n - i0 : kBlock;
      widen<P, A>(param + i0, buffer, m);
      for (int k = 0; k < num_decays; ++k) {
        blend<E, A>(emas[k] + i0, buffer, m, decay[k], one_minus_decay[k]);
      }
    }
  }
}

}  // namespace soflow::cpu::SOFLOW_KERNEL_NS
