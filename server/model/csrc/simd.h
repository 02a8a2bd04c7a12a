// The vector type the CPU kernels compute with: one register of floats (AVX-512: 16, else 8; GCC and
// Clang vector extensions, so the same code builds for any target `-march=native` names), with
// unaligned loads and stores, from and to float32 or bfloat16 storage (bfloat16 held as its 16 bits:
// a float's high half; stores round to nearest even, NaN stays NaN). Sums are always float32.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace mhr_simd {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint32_t words __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t halves __attribute__((vector_size(kLanes * sizeof(uint16_t))));

using bf16 = uint16_t;  // a bfloat16's bits

// N floats from N float32 or bfloat16 values at p, as a vector of N lanes (a vec when N = kLanes). A vector
// type cannot be a template argument (its size is lost), so the types are declared here for each N.
template <int N, typename T>
inline auto load_n(const T* p) {
  typedef float floats __attribute__((vector_size(N * sizeof(float))));
  typedef T stored __attribute__((vector_size(N * sizeof(T))));
  stored s;
  std::memcpy(&s, p, sizeof(s));
  floats v;
  if constexpr (std::is_same_v<T, float>) {
    v = s;
  } else {  // bfloat16: its bits are the float's high half
    typedef uint32_t bits __attribute__((vector_size(N * sizeof(uint32_t))));
    const bits w = __builtin_convertvector(s, bits) << 16;
    std::memcpy(&v, &w, sizeof(v));
  }
  return v;
}

inline vec load(const float* p) { return load_n<kLanes>(p); }

inline vec load(const bf16* p) { return load_n<kLanes>(p); }

inline void store(float* p, const vec& v) { std::memcpy(p, &v, sizeof(v)); }

inline void store(bf16* p, const vec& v) {
  words w;
  std::memcpy(&w, &v, sizeof(w));
  const words rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
  const words nan = (w & 0x7FFFFFFFu) > 0x7F800000u;  // all ones where v is NaN
  const halves h = __builtin_convertvector((nan & 0x7FC0u) | (~nan & rounded), halves);
  std::memcpy(p, &h, sizeof(h));
}

inline float to_float(float x) { return x; }

inline float to_float(bf16 x) {
  const uint32_t w = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

template <typename T>
inline T from_float(float f);

template <>
inline float from_float<float>(float f) {
  return f;
}

template <>
inline bf16 from_float<bf16>(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof(w));
  if ((w & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<bf16>((w + 0x7FFFu + ((w >> 16) & 1u)) >> 16);
}

}  // namespace mhr_simd
