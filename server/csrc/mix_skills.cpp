// Materializing a routed task on CPU: out[g, h] = sum_k w[g, h, k] * skills[g, h, k], written straight
// into the strided slot storage, one pass over the skill inventory. Float32 or bfloat16 tensors (one
// dtype per call), float32 sums rounded once.
//
// Why a kernel: a cold task is bound by reading the whole inventory (K skills of every module). As torch
// ops it is a batched matmul per shape group and side into a temporary, then a copy into the slot; here
// every source row is read once, in K sequential streams, and the sum lands in the slot. A head block's K
// skills are one contiguous region and the next block's follows it: the region is prefetched one block
// ahead, at the pace the current one is read, since the hardware prefetcher stops at each block's page
// ends (bfloat16, whose blocks are half as long: a cold task inside serving 1.34 -> 0.98 ms; float32,
// bound by the memory's bandwidth, unchanged) (server/inventory.py decides when the op is used;
// docs/engine.md has the measurements).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace {

using mhr_simd::bf16, mhr_simd::from_float, mhr_simd::kLanes, mhr_simd::load, mhr_simd::store, mhr_simd::to_float,
    mhr_simd::vec;

constexpr int64_t kChunk = 64;                  // elements summed at a time (four AVX-512 vectors)
constexpr int64_t kMinFloatsPerThread = 32768;  // inventory elements a thread should read to be worth waking
constexpr int64_t kLineBytes = 64;              // a cache line

// acc[:n] = sum_k w[k] * s[k * L :][:n], in k order. A whole chunk (n = kChunk) is summed in vector
// registers: as a loop of variable length the op took 1.15-1.3x as long, and bfloat16 did not vectorize.
template <typename T>
__attribute__((always_inline)) inline void chunk_sum(float* acc, const T* s, const float* w, int64_t K, int64_t L,
                                                     int64_t n) {
  if (n == kChunk) {
    constexpr int kVecs = kChunk / kLanes;
    vec sum[kVecs];
    for (int64_t k = 0; k < K; ++k) {
      const float wk = w[k];
      const T* sk = s + k * L;
      for (int c = 0; c < kVecs; ++c) {
        const vec term = wk * load(sk + c * kLanes);
        sum[c] = k == 0 ? term : sum[c] + term;
      }
    }
    for (int c = 0; c < kVecs; ++c) store(acc + c * kLanes, sum[c]);
    return;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float wk = w[k];
    const T* sk = s + k * L;
    for (int64_t i = 0; i < n; ++i) acc[i] = k == 0 ? wk * to_float(sk[i]) : acc[i] + wk * to_float(sk[i]);
  }
}

// One head's block: out's R rows of C elements (row stride stride_r) = sum_k w[k] * src[k], where src[k]
// is R * C contiguous elements, summed in k order. The block is summed 64 elements at a time, across row
// boundaries, so short rows (C = a rank, when slots are wider than the task) cost no more than long ones.
template <typename T>
void mix_block(T* out, int64_t stride_r, int64_t C, const T* src, const float* w, int64_t K, int64_t L) {
  int64_t row = 0, col = 0;  // where the next chunk lands in out
  const T* next = src + K * L;  // the next head block's skills (contiguous with these)
  for (int64_t c = 0; c < L; c += kChunk) {
    const int64_t len = std::min(kChunk, L - c);
    for (int64_t e = c * K; e < (c + len) * K; e += kLineBytes / sizeof(T)) __builtin_prefetch(next + e);
    float acc[kChunk];
    chunk_sum(acc, src + c, w, K, L, len);
    for (int64_t i = 0; i < len;) {  // the chunk's pieces of out's rows
      const int64_t n = std::min(C - col, len - i);
      T* o = out + row * stride_r + col;
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) store(o + j, load(acc + i + j));
      for (; j < n; ++j) o[j] = from_float<T>(acc[i + j]);
      i += n, col += n;
      if (col == C) row += 1, col = 0;
    }
  }
}

// One output tensor's mixing: out [G, H, R, C] (any strides but a contiguous last dim) = the sum over k
// of w [G, H, K] * src [G, H, K, R, C].
template <typename T>
struct Mix {
  T* out;
  const T* src;
  std::vector<float> w;  // the weights as float32
  int64_t H, R, C, K, stride_g, stride_h, stride_r;
  int64_t blocks, first;  // G * H head blocks; where the first one starts in the work of the whole call

  Mix(at::Tensor& o, const at::Tensor& s, const at::Tensor& wt, int64_t begin) {
    const int64_t G = o.size(0);
    H = o.size(1), R = o.size(2), C = o.size(3), K = s.size(2);
    out = reinterpret_cast<T*>(o.data_ptr()), src = reinterpret_cast<const T*>(s.const_data_ptr());
    const T* wp = reinterpret_cast<const T*>(wt.const_data_ptr());
    w.resize(G * H * K);
    for (int64_t i = 0; i < G * H * K; ++i) w[i] = to_float(wp[i]);
    stride_g = o.stride(0), stride_h = o.stride(1), stride_r = o.stride(2);
    blocks = G * H, first = begin;
    if (stride_r == C) C *= R, R = 1;  // a block's rows are contiguous in out: copy them as one
  }
  int64_t work() const { return blocks * K * R * C; }  // inventory elements read

  // The head blocks whose work starts in [begin, end) of the call's work.
  void run(int64_t begin, int64_t end) const {
    const int64_t per_block = K * R * C;
    const int64_t lo = std::clamp<int64_t>((begin - first + per_block - 1) / per_block, 0, blocks);
    const int64_t hi = std::clamp<int64_t>((end - first + per_block - 1) / per_block, 0, blocks);
    for (int64_t gh = lo; gh < hi; ++gh) {
      const int64_t h = gh % H, g = gh / H;
      mix_block(out + g * stride_g + h * stride_h, stride_r, C, src + gh * per_block, w.data() + gh * K, K, R * C);
    }
  }
};

void check(const at::Tensor& o, const at::Tensor& s, const at::Tensor& wt, at::ScalarType dtype) {
  TORCH_CHECK(o.dim() == 4 && s.dim() == 5 && wt.dim() == 3,
              "mix_skills: expected out [G, H, R, C], src [G, H, K, R, C], w [G, H, K]");
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && o.scalar_type() == dtype &&
                  s.scalar_type() == dtype && wt.scalar_type() == dtype,
              "mix_skills: float32 or bfloat16 tensors only, one dtype for every out, src and w");
  const int64_t G = o.size(0), H = o.size(1), K = s.size(2);
  TORCH_CHECK(s.size(0) == G && s.size(1) == H && s.size(3) == o.size(2) && s.size(4) == o.size(3) &&
                  wt.size(0) == G && wt.size(1) == H && wt.size(2) == K && K > 0,
              "mix_skills: shapes do not match");
  TORCH_CHECK(s.is_contiguous() && wt.is_contiguous() && o.stride(3) == 1,
              "mix_skills: src and w must be contiguous, out's rows contiguous");
}

// Every (out, src, w) triple in one parallel pass, split over threads by inventory elements read.
template <typename T>
void mix_all(at::TensorList out, at::TensorList src, at::TensorList w) {
  std::vector<Mix<T>> mixes;
  int64_t total = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    at::Tensor o = out[i];
    mixes.emplace_back(o, src[i], w[i], total);
    total += mixes.back().work();
  }
  at::parallel_for(0, total, kMinFloatsPerThread, [&](int64_t begin, int64_t end) {
    for (const Mix<T>& mix : mixes) mix.run(begin, end);
  });
}

void mix_skills(at::TensorList out, at::TensorList src, at::TensorList w) {
  TORCH_CHECK(out.size() == src.size() && out.size() == w.size(), "mix_skills: out, src and w differ in length");
  if (out.empty()) return;
  const at::ScalarType dtype = out[0].scalar_type();
  for (size_t i = 0; i < out.size(); ++i) check(out[i], src[i], w[i], dtype);
  if (dtype == at::kFloat) {
    mix_all<float>(out, src, w);
  } else {
    mix_all<bf16>(out, src, w);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mhr_serve, m) { m.def("mix_skills(Tensor(a!)[] out, Tensor[] src, Tensor[] w) -> ()"); }

TORCH_LIBRARY_IMPL(mhr_serve, CPU, m) { m.impl("mix_skills", &mix_skills); }
