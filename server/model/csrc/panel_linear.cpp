// The backbone's linear layers on CPU: y = x @ W^T + b with W stored once, at load, as column panels
// [P, K, 32] (panel p holds output columns 32p..32p+31 of every input row, contiguous), and for adapted
// layers each token's own LoRA added in the same pass: + (x[t] @ A[s]) @ B[s], s the token's slot.
// Float32 or bfloat16 tensors (one dtype per call), float32 sums.
//
// Why a kernel: at decode a linear multiplies a few rows (one token per running sequence) by a large
// frozen matrix, so it is bound by reading the matrix, which CPU BLAS does at ~8 GB/s at these shapes,
// well under what the memory delivers (docs/engine.md). Packed once, each panel is one sequential
// stream. Rows are multiplied in tiles of 8 (16 vector accumulators). Up to 64 rows (decode), every tile
// goes over one 8 KiB part of a panel while it is in L1, and the tiles share prefetching the next part,
// so that the weights are read once and memory keeps streaming while any tile computes; more rows
// (prefill) take a few panels at a time against every row tile, within ~10 % of BLAS. The adapters ride
// along in the same call: z = x[t] @ A[s] first (r numbers a token), then each thread, once its panels
// are done, adds z @ B[s] to their columns, streaming each token's B rows (sequential reads it can
// prefetch: added inside the tiles instead, B's scattered lines stalled them, 16 tasks 1-2 % slower).
// Every output element sums in the same order whatever the other rows are (the frozen weight over
// k = 0..K-1, then the adapter over its ranks), so a row's result does not depend on its batch
// (server/model/layers.py `PanelLinear` calls it).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"

namespace {

using mhr_simd::bf16, mhr_simd::from_float, mhr_simd::kLanes, mhr_simd::load, mhr_simd::store, mhr_simd::to_float,
    mhr_simd::vec;

constexpr int kPanel = 32;                   // output columns per panel (fixed: it is the stored layout)
constexpr int kRows = kLanes == 16 ? 8 : 3;  // rows per tile: 8 x 2 accumulators, or 3 x 4 in 16 AVX2 registers
constexpr int kVecs = kPanel / kLanes;
constexpr int64_t kPrefetchBytes = 8192;        // how far ahead many rows' first tile prefetches
constexpr int64_t kLineBytes = 64;
constexpr int64_t kMinFloatsPerThread = 32768;  // weights a thread should read to be worth waking
constexpr int64_t kPanelBlock = 4;              // panels multiplied together by every row tile (many rows)
constexpr int64_t kChunk = 64;                  // inputs per part of a panel (8 KiB in float32) when few rows
constexpr int64_t kMaxChunkedRows = 64;         // up to this many rows, panels are taken in parts
constexpr int64_t kUpPrefetchBytes = 2048;      // how far ahead each row of an adapter's B is prefetched

// One call's operands, stored as T (float or bf16); x as float (a bfloat16 x is converted once). `B` is
// null when the layer adds no adapter; else B[t] is token t's slot's B [r, N] (null for slot 0: nothing
// added) and z [M, r] holds x[t] @ A[slot].
template <typename T>
struct Call {
  const float* x;
  int64_t M, K, N;
  const T* panels;
  const T* bias;  // [P * 32] or null
  T* y;
  const T* const* B;
  const float* z;
  int64_t r;
};

template <typename T>
constexpr int64_t kLine = kLineBytes / sizeof(T);  // elements per cache line

// Rows [t0, t0 + NT) of panel p over inputs [k0, k1): acc = the bias (k0 == 0) or what an earlier part
// of K left in `scratch`, then += x[t, k] * part[k - k0] for k in order, `part` being those inputs' rows
// of the panel (as stored, or widened to float32 once for all tiles); written to y once k1 == K, else
// back to `scratch` (NT x kPanel). Meanwhile `prefetch_lines` cache lines from `prefetch` on are
// requested, spread evenly over the k steps, so that memory keeps streaming while the tile computes.
template <typename T, typename W, int NT>
void panel_tile(const Call<T>& call, int64_t t0, int64_t p, int64_t k0, int64_t k1, const W* part, float* scratch,
                const T* prefetch, int64_t prefetch_lines) {
  const int64_t K = call.K, N = call.N, col0 = p * kPanel;
  const float* x = call.x + t0 * K;
  vec acc[NT][kVecs];
  for (int t = 0; t < NT; ++t) {
    for (int c = 0; c < kVecs; ++c) {
      acc[t][c] = k0 > 0       ? load(scratch + t * kPanel + c * kLanes)
                  : call.bias ? load(call.bias + col0 + c * kLanes)
                              : vec{};
    }
  }
  int64_t credit = 0;  // prefetch_lines per (k1 - k0) steps, as a running remainder
  for (int64_t k = k0; k < k1; ++k) {
    for (credit += prefetch_lines; credit >= k1 - k0; credit -= k1 - k0, prefetch += kLine<T>) {
      __builtin_prefetch(prefetch);
    }
    const W* w = part + (k - k0) * kPanel;
    vec wv[kVecs];
    for (int c = 0; c < kVecs; ++c) wv[c] = load(w + c * kLanes);
    for (int t = 0; t < NT; ++t) {
      const float xs = x[t * K + k];  // a scalar operand: one broadcast load feeds the row's FMAs
      for (int c = 0; c < kVecs; ++c) acc[t][c] += xs * wv[c];
    }
  }
  if (k1 < K) {
    for (int t = 0; t < NT; ++t) {
      for (int c = 0; c < kVecs; ++c) store(scratch + t * kPanel + c * kLanes, acc[t][c]);
    }
    return;
  }
  const int cols = static_cast<int>(std::min<int64_t>(kPanel, N - col0));
  for (int t = 0; t < NT; ++t) {
    T* out = call.y + (t0 + t) * N + col0;
    if (cols == kPanel) {
      for (int c = 0; c < kVecs; ++c) store(out + c * kLanes, acc[t][c]);
    } else {
      T full[kPanel];
      for (int c = 0; c < kVecs; ++c) store(full + c * kLanes, acc[t][c]);
      std::copy(full, full + cols, out);
    }
  }
}

template <typename T, typename W>
using TileFn = void (*)(const Call<T>&, int64_t, int64_t, int64_t, int64_t, const W*, float*, const T*, int64_t);

// panel_tile for 1..kRows rows, indexed by rows - 1: a short last tile (or a batch of one) computes only
// its own rows.
template <typename T, typename W, int... I>
constexpr std::array<TileFn<T, W>, kRows> tile_table(std::integer_sequence<int, I...>) {
  return {&panel_tile<T, W, I + 1>...};
}
template <typename T, typename W>
constexpr auto kTiles = tile_table<T, W>(std::make_integer_sequence<int, kRows>{});

// The tiles read float32 weights: bfloat16 panels are widened once per part or block, for all row tiles,
// rather than in every tile (compute-bound beyond a few rows, the widening cost more than its bytes saved).
template <typename T>
const float* widened(const T* src, int64_t n, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    buffer.resize(n);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) store(buffer.data() + i, load(src + i));
    for (; i < n; ++i) buffer[i] = to_float(src[i]);
    return buffer.data();
  }
}

// Few rows (decode): each panel in parts of kChunk inputs, every row tile over a part while it
// is in L1, so that the panels are read from memory once, as one stream, whatever the number of rows (the
// tiles keep their sums in `scratch` between parts). The tiles of a part share the prefetching of the
// next part (of this panel or the next: they are contiguous), so that memory streams while any of them
// computes, not only the first. Each output still sums over k = 0..K-1 in order.
template <typename T>
void few_rows(const Call<T>& call, int64_t begin, int64_t end) {
  float scratch[kMaxChunkedRows * kPanel];
  std::vector<float> buffer;
  const int64_t M = call.M, K = call.K, tiles = (M + kRows - 1) / kRows;
  const int64_t lines = kChunk * kPanel / kLine<T>, share = (lines + tiles - 1) / tiles;
  for (int64_t p = begin; p < end; ++p) {
    const T* panel = call.panels + p * K * kPanel;
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t k1 = std::min(K, k0 + kChunk);
      const T* next = panel + k1 * kPanel;
      if (tiles == 1) {  // one tile reads the part as stored (widening first would only add a pass)
        kTiles<T, T>[M - 1](call, 0, p, k0, k1, panel + k0 * kPanel, scratch, next, lines);
        continue;
      }
      const float* part = widened(panel + k0 * kPanel, (k1 - k0) * kPanel, buffer);
      for (int64_t i = 0; i < tiles; ++i) {
        const int64_t t0 = i * kRows;
        kTiles<T, float>[std::min<int64_t>(kRows, M - t0) - 1](call, t0, p, k0, k1, part, scratch + t0 * kPanel,
                                                               next + i * share * kLine<T>,
                                                               std::min(share, lines - i * share));
      }
    }
  }
}

// Many rows (prefill): a few panels at a time (they stay in L2) against every row tile (each stays in L1
// across them), so that the rows' inputs are not re-read once per panel. The first row tile prefetches.
template <typename T>
void many_rows(const Call<T>& call, int64_t begin, int64_t end) {
  std::vector<float> buffer;
  const int64_t M = call.M, K = call.K;
  for (int64_t first = begin; first < end; first += kPanelBlock) {
    const int64_t last = std::min(end, first + kPanelBlock);
    const float* block = widened(call.panels + first * K * kPanel, (last - first) * K * kPanel, buffer);
    for (int64_t t0 = 0; t0 < M; t0 += kRows) {
      const TileFn<T, float> tile = kTiles<T, float>[std::min<int64_t>(kRows, M - t0) - 1];
      for (int64_t p = first; p < last; ++p) {
        tile(call, t0, p, 0, K, block + (p - first) * K * kPanel, nullptr,
             call.panels + p * K * kPanel + kPrefetchBytes / sizeof(T), t0 == 0 ? K * kPanel / kLine<T> : 0);
      }
    }
  }
}

// f(std::integral_constant<int, R>) for the ranks compiled as vector code (4, 8, 16, 32, 64), else f at
// R = 0, the loops for any rank.
template <typename F>
void by_rank(int64_t r, F&& f) {
  switch (r) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// z = x @ A for one token; A [d_in, R] contiguous, R known at compile time: z's R columns are one vector,
// four independent sums over d keep the FMA units busy.
template <int R, typename T>
void token_down(const float* x, const T* A, float* z, int64_t d_in) {
  typedef float row __attribute__((vector_size(R * sizeof(float))));
  const auto load_row = [](const T* p) { return mhr_simd::load_n<R>(p); };
  row acc[4] = {};
  int64_t d = 0;
  for (; d + 4 <= d_in; d += 4) {
    for (int u = 0; u < 4; ++u) acc[u] += x[d + u] * load_row(A + (d + u) * R);
  }
  for (; d < d_in; ++d) acc[0] += x[d] * load_row(A + d * R);
  const row sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  std::memcpy(z, &sum, sizeof(sum));
}

// The same for any rank.
template <typename T>
void token_down_any(const float* x, const T* A, float* z, int64_t d_in, int64_t r) {
  std::fill(z, z + r, 0.f);
  for (int64_t d = 0; d < d_in; ++d) {
    for (int64_t j = 0; j < r; ++j) z[j] += x[d] * to_float(A[d * r + j]);
  }
}

// y[c_begin:c_end] += z @ B[:, c_begin:c_end] for one token, z [r], B [r, N], any rank: per column, the
// ranks summed in order.
template <typename T>
void token_up_any(const float* z, const T* B, T* y, int64_t N, int64_t c_begin, int64_t c_end, int64_t r) {
  for (int64_t c = c_begin; c < c_end; ++c) {
    float out = to_float(y[c]);
    for (int64_t j = 0; j < r; ++j) out += z[j] * to_float(B[j * N + c]);
    y[c] = from_float<T>(out);
  }
}

// The same for R known at compile time: 64 columns at a time with all R rows of B summed in registers (y
// read and written once), each B row prefetched ahead; the last columns as above, in the same order.
template <int R, typename T>
void token_up(const float* z, const T* B, T* y, int64_t N, int64_t c_begin, int64_t c_end) {
  int64_t c = c_begin;
  for (; c + 4 * kLanes <= c_end; c += 4 * kLanes) {
    vec out[4];
    for (int i = 0; i < 4; ++i) out[i] = load(y + c + i * kLanes);
    for (int j = 0; j < R; ++j) {
      const T* b = B + j * N + c;
      __builtin_prefetch(b + kUpPrefetchBytes / sizeof(T));
      for (int i = 0; i < 4; ++i) out[i] += z[j] * load(b + i * kLanes);
    }
    for (int i = 0; i < 4; ++i) store(y + c + i * kLanes, out[i]);
  }
  for (; c + kLanes <= c_end; c += kLanes) {
    vec out = load(y + c);
    for (int j = 0; j < R; ++j) out += z[j] * load(B + j * N + c);
    store(y + c, out);
  }
  token_up_any(z, B, y, N, c, c_end, R);
}

// Every token's adapter added to y's columns [c_begin, c_end).
template <typename T>
void add_adapters(const Call<T>& call, int64_t c_begin, int64_t c_end) {
  for (int64_t t = 0; t < call.M; ++t) {
    const T* B = call.B[t];
    if (!B) continue;
    const float* z = call.z + t * call.r;
    T* y = call.y + t * call.N;
    by_rank(call.r, [&](auto R) {
      if constexpr (R == 0) {
        token_up_any(z, B, y, call.N, c_begin, c_end, call.r);
      } else {
        token_up<R>(z, B, y, call.N, c_begin, c_end);
      }
    });
  }
}

template <typename T>
const T* data(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

// The adapter operands of a call: A [S, K, r], B [S, r, N] (each slot's a contiguous matrix), slots [n]
// with the M tokens n rows of M / n; fills z and the per-token B pointers.
template <typename T>
void prepare_adapters(Call<T>& call, const at::Tensor& A, const at::Tensor& B, const at::Tensor& slots,
                      std::vector<float>& z, std::vector<const T*>& B_of) {
  const int64_t M = call.M, K = call.K, N = call.N, r = A.size(2), n = slots.size(0);
  TORCH_CHECK(A.dim() == 3 && B.dim() == 3 && slots.dim() == 1 && A.size(1) == K && B.size(1) == r &&
                  B.size(2) == N && A.size(0) == B.size(0),
              "panel_linear: adapter shapes do not match: A ", A.sizes(), ", B ", B.sizes(), " for x [", M, ", ", K,
              "], y [", M, ", ", N, "]");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "panel_linear: slots must be int64");
  TORCH_CHECK(A.stride(2) == 1 && A.stride(1) == r && B.stride(2) == 1 && B.stride(1) == N,
              "panel_linear: each slot's A and B must be a contiguous matrix");
  TORCH_CHECK(n > 0 && M % n == 0, "panel_linear: ", M, " tokens cannot be split into ", n, " rows");
  const at::Tensor slots_c = slots.contiguous();
  const int64_t* slot = slots_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(slot[i] >= 0 && slot[i] < A.size(0), "panel_linear: slot ", slot[i], " out of range");
  }
  z.resize(M * r), B_of.assign(M, nullptr);
  const T *Ap = data<T>(A), *Bp = data<T>(B);
  const int64_t per_row = M / n;
  const int64_t grain = std::max<int64_t>(1, kMinFloatsPerThread / (K * r));  // small layers: one thread
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slot[t / per_row];
      if (s == 0) continue;
      const float* xt = call.x + t * K;
      const T* a = Ap + s * A.stride(0);
      float* zt = z.data() + t * r;
      by_rank(r, [&](auto R) {
        if constexpr (R == 0) {
          token_down_any(xt, a, zt, K, r);
        } else {
          token_down<R>(xt, a, zt, K);
        }
      });
      B_of[t] = Bp + s * B.stride(0);
    }
  });
  call.B = B_of.data(), call.z = z.data(), call.r = r;
}

template <typename T>
void run(at::Tensor& y, const at::Tensor& x, const at::Tensor& panels, const at::Tensor& bias,
         const std::optional<at::Tensor>& A, const std::optional<at::Tensor>& B,
         const std::optional<at::Tensor>& slots) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), P = panels.size(0);
  std::vector<float> x_float;  // a bfloat16 x, converted once (the tiles broadcast its elements)
  Call<T> call{widened(data<T>(x), M * K, x_float), M, K, N, data<T>(panels),
               bias.numel() > 0 ? data<T>(bias) : nullptr,
               reinterpret_cast<T*>(y.data_ptr()), nullptr, nullptr, 0};
  std::vector<float> z;
  std::vector<const T*> B_of;
  if (A.has_value()) prepare_adapters(call, *A, *B, *slots, z, B_of);
  const int64_t grain = std::max<int64_t>(1, kMinFloatsPerThread / (K * kPanel));
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    (M <= kMaxChunkedRows ? few_rows<T> : many_rows<T>)(call, begin, end);
    if (call.B) add_adapters(call, begin * kPanel, std::min(end * kPanel, N));
  });
}

// y [M, N] = x [M, K] @ panels (+ bias) (+ each token's adapter); panels [P, K, 32] with P = ceil(N / 32)
// (columns past N are zeros), bias empty or [P * 32]; A, B and slots all given or none (see above). Every
// tensor but slots float32, or every one bfloat16.
void panel_linear(at::Tensor y, const at::Tensor& x, const at::Tensor& panels, const at::Tensor& bias,
                  const std::optional<at::Tensor>& A, const std::optional<at::Tensor>& B,
                  const std::optional<at::Tensor>& slots) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && panels.dim() == 3,
              "panel_linear: expected y [M, N], x [M, K], panels [P, K, 32]");
  const at::ScalarType dtype = panels.scalar_type();
  bool same = x.scalar_type() == dtype && y.scalar_type() == dtype;
  same = same && (bias.numel() == 0 || bias.scalar_type() == dtype);
  if (A.has_value() && B.has_value()) same = same && A->scalar_type() == dtype && B->scalar_type() == dtype;
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && same,
              "panel_linear: float32 or bfloat16 only, the same for y, x, panels, bias, A and B");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && panels.is_contiguous(),
              "panel_linear: y, x and panels must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), P = panels.size(0);
  TORCH_CHECK(y.size(0) == M && panels.size(1) == K && panels.size(2) == kPanel && P == (N + kPanel - 1) / kPanel,
              "panel_linear: shapes do not match: y ", y.sizes(), ", x ", x.sizes(), ", panels ", panels.sizes());
  TORCH_CHECK(bias.numel() == 0 || (bias.is_contiguous() && bias.numel() == P * kPanel),
              "panel_linear: bias must be contiguous, [P * 32]");
  TORCH_CHECK(A.has_value() == B.has_value() && A.has_value() == slots.has_value(),
              "panel_linear: give A, B and slots together, or none of them");
  if (M == 0) return;
  if (dtype == at::kFloat) {
    run<float>(y, x, panels, bias, A, B, slots);
  } else {
    run<bf16>(y, x, panels, bias, A, B, slots);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mhr_serve, m) {
  m.def("panel_linear(Tensor(a!) y, Tensor x, Tensor panels, Tensor bias, Tensor? A=None, Tensor? B=None, "
        "Tensor? slots=None) -> ()");
}

TORCH_LIBRARY_IMPL(mhr_serve, CPU, m) { m.impl("panel_linear", &panel_linear); }
