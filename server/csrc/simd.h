// The vector type the CPU kernels compute with: one register of floats (AVX-512: 16, else 8; GCC and
// Clang vector extensions, so the same code builds for any target `-march=native` names), with
// unaligned loads and stores.
#pragma once

#include <cstring>

namespace mhr_simd {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, const vec& v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace mhr_simd
