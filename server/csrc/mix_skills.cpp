// Materializing a routed task on CPU: out[g, h] = sum_k w[g, h, k] * skills[g, h, k], written straight
// into the strided slot storage, one pass over the skill inventory. Float32 only.
//
// Why a kernel: a cold task is bound by reading the whole inventory (K skills of every module). As torch
// ops it is a batched matmul per shape group and side into a temporary, then a copy into the slot; here
// every source row is read once, in K sequential streams prefetched ahead, and the sum lands in the slot
// (server/inventory.py decides when it is used; docs/engine.md has the measurements).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace {

constexpr int64_t kChunk = 64;                  // floats summed in registers at a time (four AVX-512 vectors)
constexpr int64_t kPrefetchFloats = 512;        // how far ahead (2 KiB) each skill stream is prefetched
constexpr int64_t kMinFloatsPerThread = 32768;  // inventory floats a thread should read to be worth waking

// out[c] = sum_k w[k] * src[k * stride + c] for c < n, summed in k order.
inline void mix_row(float* out, const float* src, int64_t stride, const float* w, int64_t K, int64_t n) {
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t len = std::min(kChunk, n - c);
    float acc[kChunk];
    for (int64_t k = 0; k < K; ++k) {
      const float wk = w[k];
      const float* s = src + k * stride + c;
      for (int64_t line = 0; line < kChunk; line += 16) __builtin_prefetch(s + kPrefetchFloats + line);
      if (k == 0) {
        for (int64_t i = 0; i < len; ++i) acc[i] = wk * s[i];
      } else {
        for (int64_t i = 0; i < len; ++i) acc[i] += wk * s[i];
      }
    }
    std::copy(acc, acc + len, out + c);
  }
}

// out [G, H, R, C] (any strides but a contiguous last dim) = sum over k of w [G, H, K] * src [G, H, K, R, C].
void mix_skills(at::Tensor out, const at::Tensor& src, const at::Tensor& w) {
  TORCH_CHECK(out.dim() == 4 && src.dim() == 5 && w.dim() == 3,
              "mix_skills: expected out [G, H, R, C], src [G, H, K, R, C], w [G, H, K]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && src.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "mix_skills: float32 tensors only");
  const int64_t G = out.size(0), H = out.size(1), R = out.size(2), C = out.size(3), K = src.size(2);
  TORCH_CHECK(src.size(0) == G && src.size(1) == H && src.size(3) == R && src.size(4) == C && w.size(0) == G &&
                  w.size(1) == H && w.size(2) == K && K > 0,
              "mix_skills: shapes do not match");
  TORCH_CHECK(src.is_contiguous() && w.is_contiguous() && out.stride(3) == 1,
              "mix_skills: src and w must be contiguous, out's rows contiguous");
  const float* sp = src.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t stride_g = out.stride(0), stride_h = out.stride(1), stride_r = out.stride(2);
  const int64_t grain = std::max<int64_t>(1, kMinFloatsPerThread / (K * C));
  at::parallel_for(0, G * H * R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t r = row % R, gh = row / R, h = gh % H, g = gh / H;
      mix_row(op + g * stride_g + h * stride_h + r * stride_r, sp + (gh * K * R + r) * C, R * C, wp + gh * K, K, C);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mhr_serve, m) { m.def("mix_skills(Tensor(a!) out, Tensor src, Tensor w) -> ()"); }

TORCH_LIBRARY_IMPL(mhr_serve, CPU, m) { m.impl("mix_skills", &mix_skills); }
