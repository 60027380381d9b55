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

template <typename scalar_t>
void scores_backward_sparse_impl(const float* grad, const int64_t* slot, const scalar_t* q, const scalar_t* keys,
                                 int64_t N, int64_t H, int64_t K, int64_t S, int64_t P, scalar_t* grad_q,
                                 scalar_t* grad_keys) {
  using acc_t = at::opmath_type<scalar_t>;
  const pkmlm::SlotSplit split(S);
  // grad_q: each (token, head) row gathers its K winners' sub-keys of both halves.
  at::parallel_for(0, N * H, 64, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(2 * P);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* table = keys + (r % H) * 2 * S * P;  // head h's two sub-key tables
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const acc_t g = acc_t(grad[r * K + k]);
        const auto [i, j] = split(slot[r * K + k]);
        axpy(acc.data(), g, table + i * P, P);
        axpy(acc.data() + P, g, table + (S + j) * P, P);
      }
      for (int64_t p = 0; p < 2 * P; ++p) grad_q[r * 2 * P + p] = scalar_t(acc[p]);
    }
  });
  // grad_keys: one head's two tables per task, its reads summed in token order (in an fp32 / fp64
  // copy of the tables: 2 * S * P entries, cache-resident).
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<acc_t> acc(2 * S * P);
    for (int64_t h = h0; h < h1; ++h) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t n = 0; n < N; ++n) {
        const int64_t r = n * H + h;
        const scalar_t* q0 = q + r * 2 * P;
        for (int64_t k = 0; k < K; ++k) {
          const acc_t g = acc_t(grad[r * K + k]);
          const auto [i, j] = split(slot[r * K + k]);
          axpy(acc.data() + i * P, g, q0, P);
          axpy(acc.data() + (S + j) * P, g, q0 + P, P);
        }
      }
      scalar_t* out = grad_keys + h * 2 * S * P;
      for (int64_t e = 0; e < 2 * S * P; ++e) out[e] = scalar_t(acc[e]);
    }
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
