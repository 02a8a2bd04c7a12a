// The backbone's linear layers on CPU: y = x @ W^T + b with W stored once, at load, as column panels
// [P, K, 32] (panel p holds output columns 32p..32p+31 of every input row, contiguous). Float32 only.
//
// Why a kernel: at decode a linear multiplies a few rows (one token per running sequence) by a large
// frozen matrix, so it is bound by reading the matrix, which CPU BLAS does at ~8 GB/s at these shapes,
// well under what the memory delivers (docs/engine.md). Packed once, each panel is one sequential
// stream: 8 rows are multiplied per pass with the panel's next lines prefetched, and the panel stays in
// L2 for the next 8 rows, so large batches (prefill) run within ~10 % of BLAS too. Every output element
// sums over K in the same order whatever the other rows are, so a row's result does not depend on its
// batch (server/model.py `PanelLinear` calls it).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <utility>

#include "simd.h"

namespace {

using mhr_simd::kLanes, mhr_simd::load, mhr_simd::store, mhr_simd::vec;

constexpr int kPanel = 32;                   // output columns per panel (fixed: it is the stored layout)
constexpr int kRows = kLanes == 16 ? 8 : 3;  // rows per pass: 8 x 2 accumulators, or 3 x 4 in 16 AVX2 registers
constexpr int kVecs = kPanel / kLanes;
constexpr int64_t kPrefetchFloats = 2048;       // how far ahead (8 KiB) a panel's first pass prefetches
constexpr int64_t kMinFloatsPerThread = 32768;  // weight floats a thread should read to be worth waking
constexpr int64_t kPanelBlock = 4;              // panels multiplied together by every row tile

// y[t, :cols] = x[t] @ panel (+ bias) for NT <= kRows rows; panel [K, kPanel]. The first pass over a
// panel reads it from memory (prefetching ahead); later passes find it in cache.
template <bool kFirstPass, int NT>
void panel_rows(const float* x, int64_t K, const float* panel, const float* bias, float* y, int64_t ldy, int cols) {
  vec acc[NT][kVecs];
  for (int c = 0; c < kVecs; ++c) {
    const vec b = bias ? load(bias + c * kLanes) : vec{};
    for (int t = 0; t < NT; ++t) acc[t][c] = b;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * kPanel;
    vec wv[kVecs];
    for (int c = 0; c < kVecs; ++c) {
      if (kFirstPass) __builtin_prefetch(w + kPrefetchFloats + c * kLanes);
      wv[c] = load(w + c * kLanes);
    }
    for (int t = 0; t < NT; ++t) {
      const float xs = x[t * K + k];  // a scalar operand: one broadcast load feeds the row's FMAs
      for (int c = 0; c < kVecs; ++c) acc[t][c] += xs * wv[c];
    }
  }
  for (int t = 0; t < NT; ++t) {
    if (cols == kPanel) {
      for (int c = 0; c < kVecs; ++c) store(y + t * ldy + c * kLanes, acc[t][c]);
    } else {
      float full[kPanel];
      for (int c = 0; c < kVecs; ++c) store(full + c * kLanes, acc[t][c]);
      std::copy(full, full + cols, y + t * ldy);
    }
  }
}

using RowsFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int);

// panel_rows for 1..kRows rows, indexed by rows - 1: a short last pass (or a batch of one) computes only
// its own rows.
template <bool kFirstPass, int... I>
constexpr std::array<RowsFn, kRows> rows_table(std::integer_sequence<int, I...>) {
  return {&panel_rows<kFirstPass, I + 1>...};
}
constexpr auto kFirstRows = rows_table<true>(std::make_integer_sequence<int, kRows>{});
constexpr auto kLaterRows = rows_table<false>(std::make_integer_sequence<int, kRows>{});

// y [M, N] = x [M, K] @ panels (+ bias); panels [P, K, 32] with P = ceil(N / 32) (columns past N are
// zeros), bias empty or [P * 32].
void panel_linear(at::Tensor y, const at::Tensor& x, const at::Tensor& panels, const at::Tensor& bias) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && panels.dim() == 3,
              "panel_linear: expected y [M, N], x [M, K], panels [P, K, 32]");
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && panels.scalar_type() == at::kFloat,
              "panel_linear: float32 only");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && panels.is_contiguous(),
              "panel_linear: y, x and panels must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), P = panels.size(0);
  TORCH_CHECK(y.size(0) == M && panels.size(1) == K && panels.size(2) == kPanel && P == (N + kPanel - 1) / kPanel,
              "panel_linear: shapes do not match: y ", y.sizes(), ", x ", x.sizes(), ", panels ", panels.sizes());
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == P * kPanel),
              "panel_linear: bias must be float32, contiguous, [P * 32]");
  if (M == 0) return;
  const float *xp = x.data_ptr<float>(), *wp = panels.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kMinFloatsPerThread / (K * kPanel));
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    // A few panels at a time (they stay in L2) against every row tile (each stays in L1 across them), so
    // that many rows (prefill) do not re-read their inputs once per panel.
    for (int64_t first = begin; first < end; first += kPanelBlock) {
      const int64_t last = std::min(end, first + kPanelBlock);
      for (int64_t t0 = 0; t0 < M; t0 += kRows) {
        const int nt = static_cast<int>(std::min<int64_t>(kRows, M - t0));
        const RowsFn rows = (t0 == 0 ? kFirstRows : kLaterRows)[nt - 1];
        for (int64_t p = first; p < last; ++p) {
          const int cols = static_cast<int>(std::min<int64_t>(kPanel, N - p * kPanel));
          rows(xp + t0 * K, K, wp + p * K * kPanel, bp ? bp + p * kPanel : nullptr, yp + t0 * N + p * kPanel, N,
               cols);
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mhr_serve, m) {
  m.def("panel_linear(Tensor(a!) y, Tensor x, Tensor panels, Tensor bias) -> ()");
}

TORCH_LIBRARY_IMPL(mhr_serve, CPU, m) { m.impl("panel_linear", &panel_linear); }
