// pkmlm_cpu::scores_backward_sparse(grad, slot, q, keys): the gradient of the memory's K scores
// score[n, h, k] = q[n, h, 0] . keys[h, 0, i[n, h, k]] + q[n, h, 1] . keys[h, 1, j[n, h, k]] (the
// slot's sub-keys i = slot / S, j = slot % S) to the
// query halves and the sub-keys, for `model.memory.scores_backward=sparse` (kernels/cpu_scores.py):
//
//   grad_q[n, h, 0]    = sum_k grad[n, h, k] * keys[h, 0, i[n, h, k]]                 (N, H, 2, P)
//   grad_keys[h, 0, s] = sum over (n, k) with i[n, h, k] == s of grad[n, h, k] * q[n, h, 0]   (H, 2, S, P)
//   (half 1 the same with j)
//
// Why: the torch path scatters the K scores' gradient into a dense (N, H, 2, S) tensor (zeros but
// for K of S entries per half) and multiplies it by the sub-keys and the queries, two batched
// matmuls of N * H * 2 * S * P multiply-adds each; here N * H * 2 * K * P each (S / K = 8x fewer at
// the knowledge size), no dense gradient written. The sums run in another order than the matmuls',
// so the gradients agree to rounding, not bit for bit (hence the opt-in and tolerance tests).
// Deterministic: grad_q is split over (token, head) rows, grad_keys over heads, each table summed by
// one thread in token order, so the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_slots.h"

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

namespace {

// y[p] += a * x[p] for p < P (restrict: the compiler vectorises without alias checks).
template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* __restrict y, acc_t a, const scalar_t* __restrict x, int64_t P) {
  for (int64_t p = 0; p < P; ++p) y[p] += a * acc_t(x[p]);
}

// grad_q of one (token, head) row r: its K winners' sub-keys of both halves, weighted by their
// scores' gradient. In blocks of kBlock columns whose sums stay in registers over the K reads.
constexpr int64_t kBlock = 16;

template <typename scalar_t, typename acc_t>
inline void grad_query_row(const acc_t* g, const int32_t* sub_key, const scalar_t* table, int64_t K, int64_t P,
                           scalar_t* out) {
  int64_t p0 = 0;
  for (; p0 + kBlock <= P; p0 += kBlock) {
    acc_t acc[kBlock] = {};
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* key = table + sub_key[k] * P + p0;
      for (int64_t p = 0; p < kBlock; ++p) acc[p] += g[k] * acc_t(key[p]);
    }
    for (int64_t p = 0; p < kBlock; ++p) out[p0 + p] = scalar_t(acc[p]);
  }
  for (int64_t p = p0; p < P; ++p) {  // the last P % kBlock columns
    acc_t acc = 0;
    for (int64_t k = 0; k < K; ++k) acc += g[k] * acc_t(table[sub_key[k] * P + p]);
    out[p] = scalar_t(acc);
  }
}

// The distinct sub-keys of each half among one row's K winners, each with the sum of its winners'
// score gradients (in rank order): a few sub-keys win with many partners (the best of half 0 pairs
// with most of half 1's top-K), so the loops below make one multiply-add of a P-row per distinct
// sub-key instead of one per winner, and no chain of updates to one row. Branch-free: `pos[s]` (S
// entries, all -1 between calls) is sub-key s's place in the list while the row is merged.
template <typename acc_t>
int32_t merge_half(const float* grad, const int32_t* ids, int64_t K, int32_t* pos, int32_t* sub, acc_t* g) {
  int32_t count = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t s = ids[k];
    const bool fresh = pos[s] < 0;
    const int32_t e = fresh ? count : pos[s];
    sub[e] = s;
    g[e] = (fresh ? acc_t(0) : g[e]) + acc_t(grad[k]);
    pos[s] = e;
    count += fresh;
  }
  for (int32_t e = 0; e < count; ++e) pos[sub[e]] = -1;
  return count;
}

// Merged lists of every (token, head) row: `sub` and `g` (N * H, 2, K) with `count` (N * H, 2) used
// entries per half; written by `merge_rows`, read by both gradients.
template <typename acc_t>
struct Merged {
  Merged(int64_t rows, int64_t K) : K(K), sub(rows * 2 * K), g(rows * 2 * K), count(rows * 2) {}
  int64_t K;
  std::vector<int32_t> sub;
  std::vector<acc_t> g;
  std::vector<int32_t> count;
};

template <typename acc_t>
void merge_rows(int64_t r0, int64_t r1, const float* grad, const int64_t* slot, int64_t S, Merged<acc_t>& merged) {
  const int64_t K = merged.K;
  const pkmlm::SlotSplit split(S);
  std::vector<int32_t> pos(S, -1), ids(2 * K);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t k = 0; k < K; ++k) {
      const auto [i, j] = split(slot[r * K + k]);
      ids[k] = static_cast<int32_t>(i);
      ids[K + k] = static_cast<int32_t>(j);
    }
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t at = (r * 2 + half) * K;
      merged.count[r * 2 + half] =
          merge_half(grad + r * K, ids.data() + half * K, K, pos.data(), merged.sub.data() + at, merged.g.data() + at);
    }
  }
}

// The two loops below are compiled twice, for AVX2 and the baseline, chosen when the library loads
// (GCC's target_clones): 8-wide where the CPU has it (results may differ in the last bit between
// the two, as any sum order may: this path is equal to rounding by contract).
// grad_q of rows [r0, r1): each (token, head) row gathers its winners' sub-keys of both halves.
template <typename scalar_t>
__attribute__((target_clones("avx2", "default"))) void grad_query_rows(
    int64_t r0, int64_t r1, const Merged<at::opmath_type<scalar_t>>& merged, const scalar_t* keys, int64_t H,
    int64_t S, int64_t P, scalar_t* grad_q) {
  const int64_t K = merged.K;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* table = keys + (r % H) * 2 * S * P;  // head h's two sub-key tables
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t at = (r * 2 + half) * K;
      grad_query_row(merged.g.data() + at, merged.sub.data() + at, table + half * S * P,
                     merged.count[r * 2 + half], P, grad_q + (r * 2 + half) * P);
    }
  }
}

// grad_keys of head h: its reads summed in token order into `acc`, an fp32 / fp64 copy of the head's
// two tables (2 * S * P entries, cache-resident), then written out.
template <typename scalar_t>
__attribute__((target_clones("avx2", "default"))) void grad_keys_head(
    int64_t h, const Merged<at::opmath_type<scalar_t>>& merged, const scalar_t* q, int64_t N, int64_t H, int64_t S,
    int64_t P, at::opmath_type<scalar_t>* acc, scalar_t* grad_keys) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = merged.K;
  std::fill(acc, acc + 2 * S * P, acc_t(0));
  for (int64_t n = 0; n < N; ++n) {
    const int64_t r = n * H + h;
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t at = (r * 2 + half) * K;
      const scalar_t* q_half = q + (r * 2 + half) * P;
      acc_t* table = acc + half * S * P;
      for (int32_t e = 0; e < merged.count[r * 2 + half]; ++e) {
        axpy(table + merged.sub[at + e] * P, merged.g[at + e], q_half, P);
      }
    }
  }
  scalar_t* out = grad_keys + h * 2 * S * P;
  for (int64_t e = 0; e < 2 * S * P; ++e) out[e] = scalar_t(acc[e]);
}

template <typename scalar_t>
void scores_backward_sparse_impl(const float* grad, const int64_t* slot, const scalar_t* q, const scalar_t* keys,
                                 int64_t N, int64_t H, int64_t K, int64_t S, int64_t P, scalar_t* grad_q,
                                 scalar_t* grad_keys) {
  Merged<at::opmath_type<scalar_t>> merged(N * H, K);
  at::parallel_for(0, N * H, 64, [&](int64_t r0, int64_t r1) {
    merge_rows(r0, r1, grad, slot, S, merged);
    grad_query_rows(r0, r1, merged, keys, H, S, P, grad_q);
  });
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<at::opmath_type<scalar_t>> acc(2 * S * P);
    for (int64_t h = h0; h < h1; ++h) grad_keys_head(h, merged, q, N, H, S, P, acc.data(), grad_keys);
  });
}

std::tuple<at::Tensor, at::Tensor> scores_backward_sparse(const at::Tensor& grad, const at::Tensor& slot,
                                                          const at::Tensor& q, const at::Tensor& keys) {
  TORCH_CHECK(grad.device().is_cpu() && q.device().is_cpu() && keys.device().is_cpu(),
              "pkmlm_cpu::scores_backward_sparse: CPU tensors");
  TORCH_CHECK(grad.dim() == 3 && grad.scalar_type() == at::kFloat && slot.sizes() == grad.sizes() &&
                  slot.scalar_type() == at::kLong,
              "pkmlm_cpu::scores_backward_sparse: fp32 grad and int64 slot ids of shape (N, H, K)");
  const int64_t N = grad.size(0), H = grad.size(1), K = grad.size(2);
  TORCH_CHECK(keys.dim() == 4 && keys.size(0) == H && keys.size(1) == 2 && q.dim() == 4 && q.size(0) == N &&
                  q.size(1) == H && q.size(2) == 2 && q.size(3) == keys.size(3) && q.scalar_type() == keys.scalar_type(),
              "pkmlm_cpu::scores_backward_sparse: q (N, H, 2, P) and keys (H, 2, S, P) of one dtype");
  const int64_t S = keys.size(2), P = keys.size(3);
  const at::Tensor g = grad.contiguous(), sl = slot.contiguous(), qc = q.contiguous(), kc = keys.contiguous();
  if (N * H * K > 0) {
    TORCH_CHECK(sl.min().item<int64_t>() >= 0 && sl.max().item<int64_t>() < S * S,
                "pkmlm_cpu::scores_backward_sparse: slot ids must be in [0, S * S)");
  }
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_keys = at::empty(keys.sizes(), keys.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "pkmlm_cpu_scores_backward_sparse", [&] {
    scores_backward_sparse_impl<scalar_t>(g.const_data_ptr<float>(), sl.const_data_ptr<int64_t>(),
                                          qc.const_data_ptr<scalar_t>(),
                                          kc.const_data_ptr<scalar_t>(), N, H, K, S, P,
                                          grad_q.mutable_data_ptr<scalar_t>(), grad_keys.mutable_data_ptr<scalar_t>());
  });
  return {grad_q, grad_keys};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pkmlm_cpu, m) {
  m.def("scores_backward_sparse(Tensor grad, Tensor slot, Tensor q, Tensor keys) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pkmlm_cpu, CPU, m) { m.impl("scores_backward_sparse", &scores_backward_sparse); }
