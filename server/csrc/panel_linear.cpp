// The backbone's linear layers on CPU: y = x @ W^T + b with W stored once, at load, as column panels
// [P, K, 32] (panel p holds output columns 32p..32p+31 of every input row, contiguous). Float32 only.
//
// Why a kernel: at decode a linear multiplies a few rows (one token per running sequence) by a large
// frozen matrix, so it is bound by reading the matrix, which CPU BLAS does at ~8 GB/s at these shapes,
// well under what the memory delivers (docs/engine.md). Packed once, each panel is one sequential
// stream. Rows are multiplied in tiles of 8 (16 vector accumulators). Up to 64 rows (decode), every tile
// goes over one 8 KiB part of a panel while it is in L1, and the tiles share prefetching the next part,
// so that the weights are read once and memory keeps streaming while any tile computes; more rows
// (prefill) take a few panels at a time against every row tile, within ~10 % of BLAS. Every output element
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
constexpr int kRows = kLanes == 16 ? 8 : 3;  // rows per tile: 8 x 2 accumulators, or 3 x 4 in 16 AVX2 registers
constexpr int kVecs = kPanel / kLanes;
constexpr int64_t kPrefetchFloats = 2048;       // how far ahead (8 KiB) many rows' first tile prefetches
constexpr int64_t kLineFloats = 16;             // floats per 64-byte cache line
constexpr int64_t kMinFloatsPerThread = 32768;  // weight floats a thread should read to be worth waking
constexpr int64_t kPanelBlock = 4;              // panels multiplied together by every row tile (many rows)
constexpr int64_t kChunk = 64;                  // inputs per part of a panel (8 KiB) when few rows
constexpr int64_t kMaxChunkedRows = 64;         // up to this many rows, panels are taken in parts

// Rows [t0, t0 + NT) of one panel over inputs [k0, k1): acc = init (bias, or what an earlier part of K
// left in the scratch tile), then += x[t, k] * panel[k] for k in order; written to y (cols columns) once
// k1 == K, else back to the scratch tile. Meanwhile `prefetch_lines` cache lines from `prefetch` on are
// requested, spread evenly over the k steps, so that memory keeps streaming while the tile computes.
// panel [K, kPanel].
template <int NT>
void panel_tile(const float* x, int64_t K, int64_t k0, int64_t k1, const float* panel, const float* init,
                int64_t init_ld, float* out, int64_t out_ld, int cols, const float* prefetch, int64_t prefetch_lines) {
  vec acc[NT][kVecs];
  for (int t = 0; t < NT; ++t) {
    for (int c = 0; c < kVecs; ++c) acc[t][c] = init ? load(init + t * init_ld + c * kLanes) : vec{};
  }
  int64_t credit = 0;  // prefetch_lines per (k1 - k0) steps, as a running remainder
  for (int64_t k = k0; k < k1; ++k) {
    for (credit += prefetch_lines; credit >= k1 - k0; credit -= k1 - k0, prefetch += kLineFloats) {
      __builtin_prefetch(prefetch);
    }
    const float* w = panel + k * kPanel;
    vec wv[kVecs];
    for (int c = 0; c < kVecs; ++c) wv[c] = load(w + c * kLanes);
    for (int t = 0; t < NT; ++t) {
      const float xs = x[t * K + k];  // a scalar operand: one broadcast load feeds the row's FMAs
      for (int c = 0; c < kVecs; ++c) acc[t][c] += xs * wv[c];
    }
  }
  for (int t = 0; t < NT; ++t) {
    if (cols == kPanel) {
      for (int c = 0; c < kVecs; ++c) store(out + t * out_ld + c * kLanes, acc[t][c]);
    } else {
      float full[kPanel];
      for (int c = 0; c < kVecs; ++c) store(full + c * kLanes, acc[t][c]);
      std::copy(full, full + cols, out + t * out_ld);
    }
  }
}

using TileFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, const float*, int64_t, float*, int64_t,
                        int, const float*, int64_t);

// panel_tile for 1..kRows rows, indexed by rows - 1: a short last tile (or a batch of one) computes only
// its own rows.
template <int... I>
constexpr std::array<TileFn, kRows> tile_table(std::integer_sequence<int, I...>) {
  return {&panel_tile<I + 1>...};
}
constexpr auto kTiles = tile_table(std::make_integer_sequence<int, kRows>{});

// Few rows (decode): each panel in parts of kChunk inputs (8 KiB), every row tile over a part while it
// is in L1, so that the panels are read from memory once, as one stream, whatever the number of rows (the
// tiles keep their sums in `scratch` between parts). The tiles of a part share the prefetching of the
// next part (of this panel or the next: they are contiguous), so that memory streams while any of them
// computes, not only the first. Each output still sums over k = 0..K-1 in order.
void few_rows(const float* x, int64_t M, int64_t K, int64_t N, const float* panels, const float* bias, float* y,
              int64_t begin, int64_t end) {
  float scratch[kMaxChunkedRows * kPanel];
  const int64_t tiles = (M + kRows - 1) / kRows;
  for (int64_t p = begin; p < end; ++p) {
    const float* panel = panels + p * K * kPanel;
    const float* b = bias ? bias + p * kPanel : nullptr;
    const int cols = static_cast<int>(std::min<int64_t>(kPanel, N - p * kPanel));
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t k1 = std::min(K, k0 + kChunk);
      const bool last = k1 == K;
      const int64_t lines = kChunk * kPanel / kLineFloats, share = (lines + tiles - 1) / tiles;
      for (int64_t i = 0; i < tiles; ++i) {
        const int64_t t0 = i * kRows;
        float* part = scratch + t0 * kPanel;
        kTiles[std::min<int64_t>(kRows, M - t0) - 1](
            x + t0 * K, K, k0, k1, panel, k0 == 0 ? b : part, k0 == 0 ? 0 : kPanel,
            last ? y + t0 * N + p * kPanel : part, last ? N : kPanel, last ? cols : kPanel,
            panel + k1 * kPanel + i * share * kLineFloats, std::min(share, lines - i * share));
      }
    }
  }
}

// Many rows (prefill): a few panels at a time (they stay in L2) against every row tile (each stays in L1
// across them), so that the rows' inputs are not re-read once per panel. The first row tile prefetches.
void many_rows(const float* x, int64_t M, int64_t K, int64_t N, const float* panels, const float* bias, float* y,
               int64_t begin, int64_t end) {
  for (int64_t first = begin; first < end; first += kPanelBlock) {
    const int64_t last = std::min(end, first + kPanelBlock);
    for (int64_t t0 = 0; t0 < M; t0 += kRows) {
      const TileFn tile = kTiles[std::min<int64_t>(kRows, M - t0) - 1];
      for (int64_t p = first; p < last; ++p) {
        const float* panel = panels + p * K * kPanel;
        const int cols = static_cast<int>(std::min<int64_t>(kPanel, N - p * kPanel));
        tile(x + t0 * K, K, 0, K, panel, bias ? bias + p * kPanel : nullptr, 0, y + t0 * N + p * kPanel, N, cols,
             panel + kPrefetchFloats, t0 == 0 ? K * kPanel / kLineFloats : 0);
      }
    }
  }
}

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
    (M <= kMaxChunkedRows ? few_rows : many_rows)(xp, M, K, N, wp, bp, yp, begin, end);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mhr_serve, m) {
  m.def("panel_linear(Tensor(a!) y, Tensor x, Tensor panels, Tensor bias) -> ()");
}

TORCH_LIBRARY_IMPL(mhr_serve, CPU, m) { m.impl("panel_linear", &panel_linear); }
