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
#include <vector>

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

// One output tensor's mixing: out [G, H, R, C] (any strides but a contiguous last dim) = the sum over k
// of w [G, H, K] * src [G, H, K, R, C].
struct Mix {
  float* out;
  const float* src;
  const float* w;
  int64_t H, R, C, K, stride_g, stride_h, stride_r;
  int64_t rows, first;  // G * H * R rows; where its first row starts in the work of the whole call

  Mix(at::Tensor& o, const at::Tensor& s, const at::Tensor& wt, int64_t begin) {
    TORCH_CHECK(o.dim() == 4 && s.dim() == 5 && wt.dim() == 3,
                "mix_skills: expected out [G, H, R, C], src [G, H, K, R, C], w [G, H, K]");
    TORCH_CHECK(o.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat && wt.scalar_type() == at::kFloat,
                "mix_skills: float32 tensors only");
    const int64_t G = o.size(0);
    H = o.size(1), R = o.size(2), C = o.size(3), K = s.size(2);
    TORCH_CHECK(s.size(0) == G && s.size(1) == H && s.size(3) == R && s.size(4) == C && wt.size(0) == G &&
                    wt.size(1) == H && wt.size(2) == K && K > 0,
                "mix_skills: shapes do not match");
    TORCH_CHECK(s.is_contiguous() && wt.is_contiguous() && o.stride(3) == 1,
                "mix_skills: src and w must be contiguous, out's rows contiguous");
    out = o.data_ptr<float>(), src = s.data_ptr<float>(), w = wt.data_ptr<float>();
    stride_g = o.stride(0), stride_h = o.stride(1), stride_r = o.stride(2);
    rows = G * H * R, first = begin;
  }
  int64_t work() const { return rows * K * C; }  // inventory floats read

  // The rows whose work starts in [begin, end) of the call's work.
  void run(int64_t begin, int64_t end) const {
    const int64_t per_row = K * C;
    const int64_t lo = std::clamp<int64_t>((begin - first + per_row - 1) / per_row, 0, rows);
    const int64_t hi = std::clamp<int64_t>((end - first + per_row - 1) / per_row, 0, rows);
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t r = row % R, gh = row / R, h = gh % H, g = gh / H;
      mix_row(out + g * stride_g + h * stride_h + r * stride_r, src + (gh * K * R + r) * C, R * C, w + gh * K, K, C);
    }
  }
};

// Every (out, src, w) triple in one parallel pass, split over threads by inventory floats read.
void mix_skills(at::TensorList out, at::TensorList src, at::TensorList w) {
  TORCH_CHECK(out.size() == src.size() && out.size() == w.size(), "mix_skills: out, src and w differ in length");
  std::vector<Mix> mixes;
  int64_t total = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    at::Tensor o = out[i];
    mixes.emplace_back(o, src[i], w[i], total);
    total += mixes.back().work();
  }
  at::parallel_for(0, total, kMinFloatsPerThread, [&](int64_t begin, int64_t end) {
    for (const Mix& mix : mixes) mix.run(begin, end);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mhr_serve, m) { m.def("mix_skills(Tensor(a!)[] out, Tensor[] src, Tensor[] w) -> ()"); }

TORCH_LIBRARY_IMPL(mhr_serve, CPU, m) { m.impl("mix_skills", &mix_skills); }
