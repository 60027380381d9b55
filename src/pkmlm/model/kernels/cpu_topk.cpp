// pkmlm_cpu::topk(x, k): the k largest entries of each row of a CPU tensor (last dim), sorted by
// descending value, with their indices: the same values AND indices as torch.topk(x, k, dim=-1,
// largest=True, sorted=True), bit for bit, ties and NaNs included (pkmlm/model/kernels/cpu_topk.py
// builds this file once and says why a row takes which path).
//
// Why: ATen's CPU top-k (ATen/native/TopKImpl.h, topk_impl_loop) copies every row into a vector of
// (value, index) pairs, then std::nth_element + std::sort of the first k-1 (or std::partial_sort
// when k * 64 <= n): ~2.7 us for a top-16 of 128 on the 2-core EPYC of docs/benchmarks.md, half of
// the memory layer's forward+backward there (issue 21). Here a row is one pass that keeps the k best
// in a sorted buffer (k ln(n / k) insertions on average), then a check that the answer is unique.
//
// Exactness: when the k best values are pairwise distinct and no other entry equals the k-th, the
// answer (sorted values and their indices) is unique, so every correct algorithm returns ATen's.
// Otherwise (a tie that touches the k best, a NaN anywhere in the row) the row runs ATen's own
// algorithm below, copied from TopKImpl.h (largest=true, sorted=true): the same libstdc++
// nth_element / sort / partial_sort with the same comparator on the same (acc value, index) pairs,
// so ties come out in ATen's order (tests/unit/test_cpu_topk.py checks tie-heavy rows against
// torch.topk). Rows are independent: the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_slots.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace {

// ATen's topk_impl_loop for one row, largest=true, sorted=true.
template <typename acc_t>
void topk_row_aten(const acc_t* row, int64_t n, int64_t k, std::vector<std::pair<acc_t, int64_t>>& queue,
                   acc_t* best_v, int64_t* best_i) {
  using elem_t = std::pair<acc_t, int64_t>;
  for (int64_t j = 0; j < n; ++j) {
    queue[j].first = row[j];
    queue[j].second = j;
  }
  // NaN sorts as the largest value (numpy's convention, ATen's comparator).
  auto comp = [](const elem_t& x, const elem_t& y) -> bool {
    return ((at::_isnan<acc_t>(x.first) && !at::_isnan<acc_t>(y.first)) || (x.first > y.first));
  };
  if (k * 64 <= n) {
    std::partial_sort(queue.begin(), queue.begin() + k, queue.end(), comp);
  } else {
    std::nth_element(queue.begin(), queue.begin() + k - 1, queue.end(), comp);
    std::sort(queue.begin(), queue.begin() + k - 1, comp);
  }
  for (int64_t j = 0; j < k; ++j) {
    best_v[j] = queue[j].first;
    best_i[j] = queue[j].second;
  }
}

// A lower bound of the k-th largest of v[0..m): split the entries into k lanes (positions j with
// j % k == lane, over the first floor(m / k) * k entries); the smallest lane maximum is <= the
// k-th largest value (the k lane maxima are k entries at least that large). Needs m >= k.
template <typename acc_t>
acc_t kth_lower_bound(const acc_t* v, int64_t m, int64_t k, acc_t* lane_max) {
  for (int64_t lane = 0; lane < k; ++lane) lane_max[lane] = v[lane];
  for (int64_t c = 1; c < m / k; ++c) {
    const acc_t* chunk = v + c * k;
    for (int64_t lane = 0; lane < k; ++lane) lane_max[lane] = std::max(lane_max[lane], chunk[lane]);
  }
  acc_t bound = lane_max[0];
  for (int64_t lane = 1; lane < k; ++lane) bound = std::min(bound, lane_max[lane]);
  return bound;
}

// A usually tighter bound: mean + z * std of the row, z chosen (`normal_z`) so that ~1.3 k of n
// normal entries lie above it. A lower bound of the k-th largest only when at least k entries are
// >= it, which the caller counts (vectorised) before it trusts it: exactness never rests on the
// rows being normal, only the speed does (sub-key scores are sums of P products: near normal).
template <typename acc_t>
acc_t z_bound(const acc_t* v, int64_t n, acc_t z) {
  acc_t sum = 0, squares = 0;
  for (int64_t j = 0; j < n; ++j) {
    sum += v[j];
    squares += v[j] * v[j];
  }
  const acc_t mean = sum / acc_t(n);
  return mean + z * std::sqrt(std::max(acc_t(0), squares / acc_t(n) - mean * mean));
}

// z with P(Z > z) = 1.3 k / n for a standard normal Z (bisection on erfc, once per scratch); NaN
// where that fraction is >= 1/2 (few entries per winner: `kth_lower_bound` alone does well there).
inline double normal_z(int64_t n, int64_t k) {
  const double tail = 1.3 * static_cast<double>(k) / static_cast<double>(n);
  if (tail >= 0.5) return std::numeric_limits<double>::quiet_NaN();
  double lo = 0.0, hi = 8.0;
  for (int it = 0; it < 60; ++it) {
    const double mid = 0.5 * (lo + hi);
    (0.5 * std::erfc(mid / std::sqrt(2.0)) > tail ? lo : hi) = mid;
  }
  return lo;
}

// The k best of a row when they are unique, branch-free (the loops vectorise):
// 1. candidates: the entries >= a lower bound of the k-th largest, `z_bound` where it holds (~21 of
//    128 for k=16 on the memory's rows; issue 21: ~20% faster than the lanes' bound alone), else
//    `kth_lower_bound` (~43 of 128), compacted with their indices, and filtered again by
//    `kth_lower_bound` while it still has two or more chunks to work with;
// 2. each candidate's rank = how many candidates beat it; rank < k places it in the output.
// Returns false (the caller then runs ATen's algorithm) when the answer is not unique: a NaN in the
// row, or a tie that touches the k best (every entry equal to one of the k best is a candidate: two
// of them share a rank, which leaves the next rank empty, or places k + 1 at the k-th).
template <typename acc_t>
bool topk_row_fast(const acc_t* row, int64_t n, int64_t k, acc_t z, acc_t* lane_max, acc_t* cand_v, int64_t* cand_i,
                   acc_t* best_v, int64_t* best_i) {
  int32_t nans = 0;
  for (int64_t j = 0; j < n; ++j) nans += row[j] != row[j];
  if (nans != 0) return false;
  acc_t bound = z == z ? z_bound(row, n, z) : acc_t(0);
  int32_t at_least = 0;
  if (z == z) {
    for (int64_t j = 0; j < n; ++j) at_least += row[j] >= bound;
  }
  if (at_least < k) bound = kth_lower_bound(row, n, k, lane_max);  // z unset, or its bound too high
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) {
    cand_v[m] = row[j];
    cand_i[m] = j;
    m += row[j] >= bound;
  }
  while (m >= 2 * k) {  // another round on the candidates, in place
    bound = kth_lower_bound(cand_v, m, k, lane_max);
    int64_t kept = 0;
    for (int64_t j = 0; j < m; ++j) {
      const bool keep = cand_v[j] >= bound;
      cand_v[kept] = cand_v[j];
      cand_i[kept] = cand_i[j];
      kept += keep;
    }
    if (kept == m) break;
    m = kept;
  }
  // Pad to a multiple of 8 with -inf (beats no candidate) so that the rank loop vectorises whole.
  const int64_t padded = (m + 7) / 8 * 8;
  for (int64_t j = m; j < padded; ++j) cand_v[j] = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < k; ++j) best_v[j] = std::numeric_limits<acc_t>::quiet_NaN();
  int64_t placed = 0;
  for (int64_t a = 0; a < m; ++a) {
    const acc_t v = cand_v[a];
    int32_t above = 0;
    for (int64_t b = 0; b < padded; ++b) above += cand_v[b] > v;
    if (above < k) {
      best_v[above] = v;
      best_i[above] = cand_i[a];
      ++placed;
    }
  }
  // A tie among the k best leaves a rank unfilled (NaN) or places more than k; otherwise the k
  // best are distinct and above every other entry.
  if (placed != k) return false;
  for (int64_t j = 0; j + 1 < k; ++j) {
    if (!(best_v[j] > best_v[j + 1])) return false;
  }
  return true;
}

// Per-thread scratch of `topk_row`.
template <typename acc_t>
struct Scratch {
  explicit Scratch(int64_t n, int64_t k)
      : z(static_cast<acc_t>(normal_z(n, k))), lane_max(k), cand_v(n + 8), cand_i(n), queue(n) {}
  acc_t z;
  std::vector<acc_t> lane_max, cand_v;
  std::vector<int64_t> cand_i;
  std::vector<std::pair<acc_t, int64_t>> queue;
};

// torch.topk of one row (sorted, largest): the fast path where the answer is unique, else ATen's.
template <typename acc_t>
void topk_row(const acc_t* row, int64_t n, int64_t k, Scratch<acc_t>& scratch, acc_t* best_v, int64_t* best_i) {
  if (!topk_row_fast(row, n, k, scratch.z, scratch.lane_max.data(), scratch.cand_v.data(), scratch.cand_i.data(), best_v,
                     best_i)) {
    topk_row_aten(row, n, k, scratch.queue, best_v, best_i);
  }
}

// A row of scalar_t as acc_t: the row itself, or converted into `buffer`.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* src, int64_t n, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) buffer[j] = static_cast<acc_t>(src[j]);
    return buffer.data();
  }
}

template <typename scalar_t>
void topk_rows(const scalar_t* in, int64_t rows, int64_t n, int64_t k, scalar_t* out_v, int64_t* out_i) {
  using acc_t = at::opmath_type<scalar_t>;  // ATen compares in this type too (float for bf16/fp16)
  const int64_t grain = std::max<int64_t>(1, 32768 / n);  // ATen's grain for topk (GRAIN_SIZE / n)
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch(n, k);
    std::vector<acc_t> row_acc(n), best_v(k);
    for (int64_t r = begin; r < end; ++r) {
      topk_row(as_acc(in + r * n, n, row_acc), n, k, scratch, best_v.data(), out_i + r * k);
      for (int64_t j = 0; j < k; ++j) out_v[r * k + j] = static_cast<scalar_t>(best_v[j]);
    }
  });
}

// Where row r of the leading dims of a tensor starts (its offset in elements): rows of a (..., 2, S)
// tensor taken in place, whatever the strides of its leading dims (the sub-key scores come out of
// the einsum in (head, half, token) order: reading them where they are saves a 16 MB copy, issue 21).
struct RowOffsets {
  RowOffsets(const at::Tensor& t, int64_t lead) : sizes(t.sizes().begin(), t.sizes().begin() + lead),
                                                  strides(t.strides().begin(), t.strides().begin() + lead) {}
  int64_t operator()(int64_t r) const {
    int64_t offset = 0;
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
      offset += (r % sizes[d]) * strides[d];
      r /= sizes[d];
    }
    return offset;
  }
  std::vector<int64_t> sizes, strides;
};

// The memory's whole product-key search (ProductKeyMemory._product_topk), one (token, head) row at a
// time, and the rest of what the torch ops after the two searches compute, bit for bit:
//   scores[j] = float(top0[a_j]) + float(top1[b_j])   (fp32, the same sums the ranking made)
//   slot[j] = ids0[a_j] * S + ids1[b_j];  i, jj = ids0, ids1 (each half's top-k sub-key ids)
// (the torch path's four gathers of (N, H, K): ~5 ms of small-op overhead a step, issue 21).
template <typename scalar_t>
void product_search_rows(const scalar_t* in, const RowOffsets& row_offset, int64_t half_stride, int64_t rows,
                         int64_t S, int64_t k, const int64_t* pair_a, const int64_t* pair_b, int64_t C,
                         float* out_scores, int64_t* out_slot, int64_t* out_i, int64_t* out_j) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, 32768 / (2 * S + C));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch(S, k);
    Scratch<float> cand_scratch(C, k);
    std::vector<acc_t> row_acc(S), best_v(k);
    std::vector<float> top_f(2 * k), cand(C), best_c(k);
    std::vector<int64_t> ids(2 * k), best(k);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = in + row_offset(r);
      for (int64_t half = 0; half < 2; ++half) {
        topk_row(as_acc(row + half * half_stride, S, row_acc), S, k, scratch, best_v.data(), ids.data() + half * k);
        for (int64_t j = 0; j < k; ++j) {
          top_f[half * k + j] = static_cast<float>(static_cast<scalar_t>(best_v[j]));  // `.float()` of the values
        }
      }
      for (int64_t c = 0; c < C; ++c) cand[c] = top_f[pair_a[c]] + top_f[k + pair_b[c]];
      topk_row(cand.data(), C, k, cand_scratch, best_c.data(), best.data());
      for (int64_t j = 0; j < k; ++j) {
        const int64_t a = pair_a[best[j]], b = pair_b[best[j]];
        out_scores[r * k + j] = top_f[a] + top_f[k + b];
        out_i[r * k + j] = ids[j];
        out_j[r * k + j] = ids[k + j];
        out_slot[r * k + j] = ids[a] * S + ids[k + b];
      }
    }
  });
}

// The gradient of product_search's scores to the sub-key scores s, exactly as the torch path's
// autograd makes it: each score's gradient added (fp32, from +0, in rank order j) to the entry of
// its two sub-keys, slot / S and slot % S (the gathers' scatter_add into zeros), rounded to s's dtype (`.float()`'s
// backward), every other entry +0 (topk's backward: zeros, then scatter). Each row's 2*S entries
// are written once (no separate zero fill of the (N, H, 2, S) gradient).
template <typename scalar_t>
void product_search_backward_rows(const float* grad, const int64_t* slot, int64_t rows, int64_t S, int64_t k,
                                  scalar_t* grad_s) {
  const pkmlm::SlotSplit split(S);
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / (2 * S)), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(2 * S);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const auto [i0, i1] = split(slot[r * k + j]);
        acc[i0] += grad[r * k + j];
        acc[S + i1] += grad[r * k + j];
      }
      scalar_t* out = grad_s + r * 2 * S;
      for (int64_t e = 0; e < 2 * S; ++e) out[e] = static_cast<scalar_t>(acc[e]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), "pkmlm_cpu::topk: a CPU tensor is needed");
  TORCH_CHECK(x.dim() >= 1, "pkmlm_cpu::topk: a tensor of at least one dimension is needed");
  const int64_t n = x.size(-1);
  TORCH_CHECK(k >= 0 && k <= n, "pkmlm_cpu::topk: k must be in [0, ", n, "], got ", k);
  const at::Tensor input = x.contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = k;
  at::Tensor values = at::empty(out_shape, x.options());
  at::Tensor indices = at::empty(out_shape, x.options().dtype(at::kLong));
  const int64_t rows = n == 0 ? 0 : input.numel() / n;
  if (k == 0 || rows == 0) return {values, indices};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pkmlm_cpu_topk", [&] {
    topk_rows<scalar_t>(input.const_data_ptr<scalar_t>(), rows, n, k, values.mutable_data_ptr<scalar_t>(),
                        indices.mutable_data_ptr<int64_t>());
  });
  return {values, indices};
}

// product_search's argument checks: CPU scores (..., 2, S), int64 rank pairs
// (C,) within [0, k), k in [1, min(S, C)]; returns (S, C).
static std::pair<int64_t, int64_t> check_search_args(const at::Tensor& s, const at::Tensor& pair_a,
                                                     const at::Tensor& pair_b, int64_t k) {
  TORCH_CHECK(s.device().is_cpu() && s.dim() >= 2 && s.size(-2) == 2,
              "pkmlm_cpu::product_search: CPU scores (..., 2, S)");
  TORCH_CHECK(pair_a.scalar_type() == at::kLong && pair_b.scalar_type() == at::kLong && pair_a.dim() == 1 &&
                  pair_a.sizes() == pair_b.sizes(),
              "pkmlm_cpu::product_search: int64 rank pairs (C,)");
  const int64_t S = s.size(-1);
  const int64_t C = pair_a.size(0);
  TORCH_CHECK(k >= 1 && k <= S && k <= C, "pkmlm_cpu::product_search: k must be in [1, min(S, C)]");
  TORCH_CHECK(pair_a.min().item<int64_t>() >= 0 && pair_a.max().item<int64_t>() < k &&
                  pair_b.min().item<int64_t>() >= 0 && pair_b.max().item<int64_t>() < k,
              "pkmlm_cpu::product_search: ranks must be in [0, k)");
  return {S, C};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> product_search(const at::Tensor& s,
                                                                         const at::Tensor& pair_a,
                                                                         const at::Tensor& pair_b, int64_t k) {
  int64_t S, C;  // plain variables: the dispatch lambdas capture them (C++17 cannot capture bindings)
  std::tie(S, C) = check_search_args(s, pair_a, pair_b, k);
  const at::Tensor input = s.stride(-1) == 1 ? s : s.contiguous();  // rows read in place, any leading strides
  const at::Tensor pa = pair_a.contiguous(), pb = pair_b.contiguous();
  std::vector<int64_t> shape(s.sizes().begin(), s.sizes().end() - 2);
  shape.push_back(k);
  const auto long_options = s.options().dtype(at::kLong);
  at::Tensor scores = at::empty(shape, s.options().dtype(at::kFloat));
  at::Tensor slot = at::empty(shape, long_options), i = at::empty(shape, long_options);
  at::Tensor j = at::empty(shape, long_options);
  const int64_t rows = s.numel() / (2 * S);
  if (rows == 0) return {scores, slot, i, j};
  const RowOffsets row_offset(input, input.dim() - 2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "pkmlm_cpu_product_search", [&] {
    product_search_rows<scalar_t>(input.const_data_ptr<scalar_t>(), row_offset, input.stride(-2), rows, S, k,
                                  pa.const_data_ptr<int64_t>(), pb.const_data_ptr<int64_t>(), C,
                                  scores.mutable_data_ptr<float>(), slot.mutable_data_ptr<int64_t>(),
                                  i.mutable_data_ptr<int64_t>(), j.mutable_data_ptr<int64_t>());
  });
  return {scores, slot, i, j};
}

at::Tensor product_search_backward(const at::Tensor& grad, const at::Tensor& slot, int64_t S, at::ScalarType dtype) {
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.dim() >= 1 &&
                  slot.sizes() == grad.sizes() && slot.scalar_type() == at::kLong && S >= 1,
              "pkmlm_cpu::product_search_backward: fp32 grad and int64 slot ids of one shape (..., k)");
  const int64_t k = grad.size(-1);
  std::vector<int64_t> shape(grad.sizes().begin(), grad.sizes().end() - 1);
  shape.push_back(2);
  shape.push_back(S);
  at::Tensor grad_s = at::empty(shape, grad.options().dtype(dtype));
  const int64_t rows = k == 0 ? 0 : grad.numel() / k;
  if (rows == 0) return grad_s.zero_();
  const at::Tensor g = grad.contiguous(), sl = slot.contiguous();
  TORCH_CHECK(sl.min().item<int64_t>() >= 0 && sl.max().item<int64_t>() < S * S,
              "pkmlm_cpu::product_search_backward: slot ids must be in [0, S * S)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "pkmlm_cpu_product_search_backward", [&] {
    product_search_backward_rows<scalar_t>(g.const_data_ptr<float>(), sl.const_data_ptr<int64_t>(), rows, S, k,
                                           grad_s.mutable_data_ptr<scalar_t>());
  });
  return grad_s;
}

// How many threads at::parallel_for spreads `rows` rows over (grain 1): torch's thread count where
// the library was built with OpenMP (at::parallel_for's threads are OpenMP's when ATen's backend is
// OpenMP, and without -fopenmp the header runs the whole range on the calling thread: every kernel
// above ran on one thread until the build flags said otherwise); 1 where it was not.
int64_t parallel_threads(int64_t rows) {
  std::vector<char> used(std::max<int64_t>(1, at::get_num_threads()), 0);
  at::parallel_for(0, rows, 1, [&](int64_t, int64_t) { used[at::get_thread_num()] = 1; });
  return std::count(used.begin(), used.end(), 1);
}

}  // namespace

TORCH_LIBRARY(pkmlm_cpu, m) {
  m.def("parallel_threads(int rows) -> int", &parallel_threads);  // no tensor to dispatch on: one kernel
  m.def("topk(Tensor x, int k) -> (Tensor values, Tensor indices)");
  m.def("product_search(Tensor s, Tensor pair_a, Tensor pair_b, int k) -> (Tensor scores, Tensor slot, Tensor i, Tensor j)");
  m.def("product_search_backward(Tensor grad, Tensor slot, int S, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(pkmlm_cpu, CPU, m) {
  m.impl("topk", &topk);
  m.impl("product_search", &product_search);
  m.impl("product_search_backward", &product_search_backward);
}
