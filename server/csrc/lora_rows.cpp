// Multi-adapter LoRA for decode batches on CPU: y[i] += x[i] @ A[slot(i)] @ B[slot(i)], one token per
// row or a few, each row's adapter read once, straight from its slot. Float32 only.
//
// Why a kernel: a decode step multiplies one token per row by that row's own small adapter. Expressed
// as torch ops this is a gather, two batched matmuls and a scatter per layer, each a separate pass and
// call; here it is one pass that streams each adapter's bytes at memory speed (server/lora_ops.py
// decides when it is used; docs/engine.md has the measurements).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

using mhr_simd::kLanes, mhr_simd::load, mhr_simd::store, mhr_simd::vec;

constexpr int64_t kPrefetchFloats = 512;       // how far ahead (2 KiB) each stream is prefetched
constexpr int64_t kMinFloatsPerThread = 32768;  // adapter floats a thread should read to be worth waking

inline void prefetch(const float* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p);
#endif
}

// y += (x @ A) @ B for one token; A [d_in, R], B [R, d_out] contiguous, R known at compile time. Written
// with explicit vectors: z's R columns are one vector (four independent sums over d keep the FMA units
// busy), and y is updated 64 columns at a time with all R rows of B summed into registers, so y is read
// and written once, not once per rank column.
template <int R>
void token_lora(const float* x, const float* A, const float* B, float* y, int64_t d_in, int64_t d_out) {
  typedef float row __attribute__((vector_size(R * sizeof(float))));
  const auto load_row = [](const float* p) {  // (a vector type cannot be a template argument: its size is lost)
    row v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  };
  row acc[4] = {};
  int64_t d = 0;
  for (; d + 4 <= d_in; d += 4) {
    const float* a = A + d * R;
    for (int line = 0; line < 4 * R; line += 16) prefetch(a + kPrefetchFloats + line);
    for (int u = 0; u < 4; ++u) acc[u] += x[d + u] * load_row(a + u * R);
  }
  for (; d < d_in; ++d) acc[0] += x[d] * load_row(A + d * R);
  const row zv = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  float z[R];
  std::memcpy(z, &zv, sizeof(z));
  int64_t c = 0;
  for (; c + 4 * kLanes <= d_out; c += 4 * kLanes) {
    vec out[4];
    for (int i = 0; i < 4; ++i) out[i] = load(y + c + i * kLanes);
    for (int j = 0; j < R; ++j) {
      const float* b = B + j * d_out + c;
      prefetch(b + kPrefetchFloats);
      for (int i = 0; i < 4; ++i) out[i] += z[j] * load(b + i * kLanes);
    }
    for (int i = 0; i < 4; ++i) store(y + c + i * kLanes, out[i]);
  }
  for (; c < d_out; ++c) {  // the last columns, summed in the same order
    float out = y[c];
    for (int j = 0; j < R; ++j) out += z[j] * B[j * d_out + c];
    y[c] = out;
  }
}

// The same for any rank.
void token_lora_any(const float* x, const float* A, const float* B, float* y, int64_t d_in, int64_t d_out,
                    int64_t r) {
  std::vector<float> z(r, 0.f);
  for (int64_t d = 0; d < d_in; ++d) {
    for (int64_t j = 0; j < r; ++j) z[j] += x[d] * A[d * r + j];
  }
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t c = 0; c < d_out; ++c) y[c] += z[j] * B[j * d_out + c];
  }
}

// y [M, d_out] += x [M, d_in] @ A[slot] @ B[slot] where the M tokens are N rows of M / N tokens and
// row n reads slot slots[n]; slot 0 rows are skipped (left exactly as they are).
void add_lora_rows(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& slots) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && A.dim() == 3 && B.dim() == 3 && slots.dim() == 1,
              "add_lora_rows: expected y [M, d_out], x [M, d_in], A [S, d_in, r], B [S, r, d_out], slots [N]");
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && A.scalar_type() == at::kFloat &&
                  B.scalar_type() == at::kFloat && slots.scalar_type() == at::kLong,
              "add_lora_rows: float32 y, x, A, B and int64 slots only");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous(), "add_lora_rows: y and x must be contiguous");
  const int64_t m = x.size(0), d_in = x.size(1), d_out = y.size(1), r = A.size(2), n = slots.size(0);
  TORCH_CHECK(y.size(0) == m && A.size(1) == d_in && B.size(1) == r && B.size(2) == d_out && A.size(0) == B.size(0),
              "add_lora_rows: shapes do not match");
  TORCH_CHECK(n > 0 && m % n == 0, "add_lora_rows: ", m, " tokens cannot be split into ", n, " rows");
  TORCH_CHECK(A.stride(2) == 1 && A.stride(1) == r && B.stride(2) == 1 && B.stride(1) == d_out,
              "add_lora_rows: each slot's A and B must be a contiguous matrix");
  const at::Tensor slots_c = slots.contiguous();
  const int64_t* slot = slots_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(slot[i] >= 0 && slot[i] < A.size(0), "add_lora_rows: slot ", slot[i], " out of range");
  }
  const float* xp = x.data_ptr<float>();
  const float* Ap = A.data_ptr<float>();
  const float* Bp = B.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t per_row = m / n, stride_A = A.stride(0), stride_B = B.stride(0);
  // Tokens per thread: at least ~128 KiB of adapter reads each, so small layers stay on one thread
  // (waking a second one costs more than it saves there).
  const int64_t grain = std::max<int64_t>(1, kMinFloatsPerThread / (d_in * r + r * d_out));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slot[t / per_row];
      if (s == 0) continue;
      const float *xt = xp + t * d_in, *a = Ap + s * stride_A, *b = Bp + s * stride_B;
      float* yt = yp + t * d_out;
      switch (r) {
        case 4: token_lora<4>(xt, a, b, yt, d_in, d_out); break;
        case 8: token_lora<8>(xt, a, b, yt, d_in, d_out); break;
        case 16: token_lora<16>(xt, a, b, yt, d_in, d_out); break;
        case 32: token_lora<32>(xt, a, b, yt, d_in, d_out); break;
        case 64: token_lora<64>(xt, a, b, yt, d_in, d_out); break;
        default: token_lora_any(xt, a, b, yt, d_in, d_out, r);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mhr_serve, m) {
  m.def("add_lora_rows(Tensor(a!) y, Tensor x, Tensor A, Tensor B, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(mhr_serve, CPU, m) { m.impl("add_lora_rows", &add_lora_rows); }
