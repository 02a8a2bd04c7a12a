// Materializing routed tasks on CPU: out[t][g, h] = sum_k w[t][g, h, k] * skills[g, h, k], written straight
// into the strided slot storage, one pass over the skill inventory for every task of the call. Float32 or
// bfloat16 tensors (one dtype per call), float32 sums rounded once.
//
// Why a kernel: a cold task is bound by reading the whole inventory (K skills of every module). As torch
// ops it is a batched matmul per shape group and side into a temporary, then a copy into the slot; here
// every source row is read once, in K sequential streams, and the sums land in the slots. Tasks mixed in
// one call share that read: each 64-element chunk of the K skills is summed for every task while it is in
// L1, so a burst of cold tasks (admitted in one step) costs one read of the inventory plus its writes. A
// head block's K skills are one contiguous region and the next block's follows it: the region is
// prefetched one block ahead, at the pace the current one is read, since the hardware prefetcher stops at
// each block's page ends (bfloat16, whose blocks are half as long: a cold task inside serving 1.34 -> 0.98
// ms; float32, bound by the memory's bandwidth, unchanged) (server/engine/inventory.py decides when the op is
// used; docs/engine.md has the measurements).

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

// acc[:n] into rows of C elements (row stride stride_r) from (row, col) on, crossing row ends; (row, col)
// move past what was written.
template <typename T>
inline void store_chunk(T* out, int64_t stride_r, int64_t C, int64_t& row, int64_t& col, const float* acc,
                        int64_t n) {
  for (int64_t i = 0; i < n;) {  // the chunk's pieces of out's rows
    const int64_t m = std::min(C - col, n - i);
    T* o = out + row * stride_r + col;
    int64_t j = 0;
    for (; j + kLanes <= m; j += kLanes) store(o + j, load(acc + i + j));
    for (; j < m; ++j) o[j] = from_float<T>(acc[i + j]);
    i += m, col += m;
    if (col == C) row += 1, col = 0;
  }
}

// One head's block for every task t < n: out[t]'s R rows of C elements (row stride stride_r) = sum_k
// w[t * w_stride + k] * src[k], where src[k] is R * C contiguous elements, summed in k order. The block is
// summed 64 elements at a time, across row boundaries, so short rows (C = a rank, when slots are wider than
// the task) cost no more than long ones; each chunk is read from memory once and summed for every task.
template <typename T>
void mix_block(T* const* out, int64_t n, int64_t stride_r, int64_t C, const T* src, const float* w, int64_t w_stride,
               int64_t K, int64_t L) {
  const T* next = src + K * L;  // the next head block's skills (contiguous with these)
  int64_t row = 0, col = 0;     // where the next chunk lands in every out
  for (int64_t c = 0; c < L; c += kChunk) {
    const int64_t len = std::min(kChunk, L - c);
    for (int64_t e = c * K; e < (c + len) * K; e += kLineBytes / sizeof(T)) __builtin_prefetch(next + e);
    float acc[kChunk];
    int64_t next_row = row, next_col = col;
    for (int64_t t = 0; t < n; ++t) {
      chunk_sum(acc, src + c, w + t * w_stride, K, L, len);
      next_row = row, next_col = col;
      store_chunk(out[t], stride_r, C, next_row, next_col, acc, len);
    }
    row = next_row, col = next_col;
  }
}

// One source's mixing into n outputs: out[t] [G, H, R, C] (any strides, equal for every t, but a contiguous
// last dim) = the sum over k of w[t] [G, H, K] * src [G, H, K, R, C].
template <typename T>
struct Mix {
  std::vector<T*> out;
  const T* src;
  std::vector<float> w;  // the weights as float32, task after task: [n][G * H * K]
  int64_t H, R, C, K, stride_g, stride_h, stride_r;
  int64_t blocks, first;  // G * H head blocks; where the first one starts in the work of the whole call

  Mix(at::TensorList outs, const at::Tensor& s, at::TensorList ws, int64_t begin) {
    const at::Tensor& o = outs[0];
    const int64_t G = o.size(0);
    H = o.size(1), R = o.size(2), C = o.size(3), K = s.size(2);
    src = reinterpret_cast<const T*>(s.const_data_ptr());
    w.resize(outs.size() * G * H * K);
    for (size_t t = 0; t < outs.size(); ++t) {
      out.push_back(reinterpret_cast<T*>(outs[t].data_ptr()));
      const T* wp = reinterpret_cast<const T*>(ws[t].const_data_ptr());
      for (int64_t i = 0; i < G * H * K; ++i) w[t * G * H * K + i] = to_float(wp[i]);
    }
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
    std::vector<T*> block_out(out.size());
    for (int64_t gh = lo; gh < hi; ++gh) {
      const int64_t h = gh % H, g = gh / H;
      for (size_t t = 0; t < out.size(); ++t) block_out[t] = out[t] + g * stride_g + h * stride_h;
      mix_block(block_out.data(), block_out.size(), stride_r, C, src + gh * per_block, w.data() + gh * K,
                blocks * K, K, R * C);
    }
  }
};

void check(const at::Tensor& o, const at::Tensor& s, const at::Tensor& wt, const at::Tensor& first,
           at::ScalarType dtype) {
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
  TORCH_CHECK(o.strides() == first.strides(), "mix_skills: the outs of one src must have the same strides");
}

// Every source's mixes in one parallel pass, split over threads by inventory elements read. Source i's n
// outputs and weights are out[i * n + t] and w[i * n + t], t < n.
template <typename T>
void mix_all(at::TensorList out, at::TensorList src, at::TensorList w) {
  const size_t n = out.size() / src.size();
  std::vector<Mix<T>> mixes;
  int64_t total = 0;
  for (size_t i = 0; i < src.size(); ++i) {
    mixes.emplace_back(out.slice(i * n, n), src[i], w.slice(i * n, n), total);
    total += mixes.back().work();
  }
  at::parallel_for(0, total, kMinFloatsPerThread, [&](int64_t begin, int64_t end) {
    for (const Mix<T>& mix : mixes) mix.run(begin, end);
  });
}

void mix_skills(at::TensorList out, at::TensorList src, at::TensorList w) {
  TORCH_CHECK(out.size() == w.size() && !src.empty() && out.size() % src.size() == 0 && !out.empty(),
              "mix_skills: out and w need one entry per src and task (length a multiple of src's), src at least "
              "one; they differ in length");
  const size_t n = out.size() / src.size();
  const at::ScalarType dtype = out[0].scalar_type();
  for (size_t i = 0; i < out.size(); ++i) check(out[i], src[i / n], w[i], out[i / n * n], dtype);
  if (dtype == at::kFloat) {
    mix_all<float>(out, src, w);
  } else {
    mix_all<bf16>(out, src, w);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mhr_serve, m) { m.def("mix_skills(Tensor(a!)[] out, Tensor[] src, Tensor[] w) -> ()"); }

TORCH_LIBRARY_IMPL(mhr_serve, CPU, m) { m.impl("mix_skills", &mix_skills); }
