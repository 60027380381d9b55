// pkmlm_cpu::read_backward(grad_out, values, indices, weights): the backward of the memory's weighted
// read out[n] = sum_r weights[n, r] * values[indices[n, r]] (kernels/reference.py has the formulas)
// in one C++ pass, for `model.memory.read_impl=cpp` (pkmlm/model/kernels/cpu_read.py):
//
//   grad_values[m]     = sum over reads (n, r) of slot m of weights[n, r] * grad_out[n]   (M, V)
//   grad_weights[n, r] = grad_out[n] . values[indices[n, r]]                              (N, R)
//
// Why: embedding_bag's CPU backward (issue 21, docs/benchmarks.md) sorts the N*R slot ids, zero-fills
// the whole (M, V) gradient, then runs one BLAS axpy per read, and its per-sample-weight backward one
// BLAS dot per read: small calls whose overhead dominates at V = 64. Here:
// 1. a counting sort of the reads by slot (stable: each slot's reads in read order), serial, O(NR + M);
// 2. the value gradient partitioned by row (at::parallel_for over slots): each row is written once,
//    the sum of its reads in read order, or zeros for a row nobody read (no separate zero fill);
// 3. the weight gradient, one dot per read (16 interleaved partial sums), partitioned by token.
// Sums accumulate in float (opmath) for bf16; fp32 / fp64 in their own type. The result does not
// depend on the thread count (each row / read is summed by one thread in a fixed order), but the
// order differs from embedding_bag's, so the bits may (hence the opt-in and tolerance tests).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace {

// x . y with kLanes interleaved partial sums (lane j sums the entries v with v % kLanes == j), then
// the lanes in order: a plain loop `dot += x[v] * y[v]` is one serial chain of adds (the compiler may
// not reorder float sums), latency-bound at ~4 cycles an entry; interleaved lanes vectorise.
constexpr int64_t kLanes = 16;

template <typename scalar_t>
at::opmath_type<scalar_t> dot(const scalar_t* x, const scalar_t* y, int64_t V) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t lane[kLanes] = {};
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += acc_t(x[v + j]) * acc_t(y[v + j]);
  }
  for (int64_t j = 0; v < V; ++v, ++j) lane[j] += acc_t(x[v]) * acc_t(y[v]);
  acc_t sum = acc_t(0);
  for (int64_t j = 0; j < kLanes; ++j) sum += lane[j];
  return sum;
}

template <typename scalar_t>
void read_backward_impl(const scalar_t* g, const scalar_t* values, const int64_t* idx, const scalar_t* w, int64_t N,
                        int64_t R, int64_t M, int64_t V, scalar_t* grad_values, scalar_t* grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t reads = N * R;
  // 1. Counting sort by slot: start[m]..start[m+1] index `order`, the reads of slot m in read order.
  std::vector<int64_t> start(M + 1, 0);
  for (int64_t i = 0; i < reads; ++i) ++start[idx[i] + 1];
  for (int64_t m = 0; m < M; ++m) start[m + 1] += start[m];
  std::vector<int64_t> order(reads);
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < reads; ++i) order[next[idx[i]]++] = i;
  }
  // 2. Value gradient, one row per slot (grain: enough rows that a task is not just overhead).
  at::parallel_for(0, M, 256, [&](int64_t m0, int64_t m1) {
    std::vector<acc_t> acc(V);
    for (int64_t m = m0; m < m1; ++m) {
      scalar_t* out = grad_values + m * V;
      const int64_t b = start[m], e = start[m + 1];
      if (b == e) {
        for (int64_t v = 0; v < V; ++v) out[v] = scalar_t(0);
        continue;
      }
      for (int64_t v = 0; v < V; ++v) acc[v] = acc_t(0);
      for (int64_t j = b; j < e; ++j) {
        const int64_t i = order[j];
        const acc_t wi = acc_t(w[i]);
        const scalar_t* gi = g + (i / R) * V;
        for (int64_t v = 0; v < V; ++v) acc[v] += wi * acc_t(gi[v]);
      }
      for (int64_t v = 0; v < V; ++v) out[v] = scalar_t(acc[v]);
    }
  });
  // 3. Weight gradient, one dot per read.
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* gn = g + n * V;
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* row = values + idx[n * R + r] * V;
        grad_weights[n * R + r] = scalar_t(dot<scalar_t>(gn, row, V));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> read_backward(const at::Tensor& grad_out, const at::Tensor& values,
                                                 const at::Tensor& indices, const at::Tensor& weights) {
  TORCH_CHECK(grad_out.device().is_cpu() && values.device().is_cpu() && indices.device().is_cpu() &&
                  weights.device().is_cpu(),
              "pkmlm_cpu::read_backward: CPU tensors");
  TORCH_CHECK(values.dim() == 2 && indices.dim() == 2 && weights.sizes() == indices.sizes() && grad_out.dim() == 2 &&
                  grad_out.size(0) == indices.size(0) && grad_out.size(1) == values.size(1),
              "pkmlm_cpu::read_backward: grad_out (N, V), values (M, V), indices and weights (N, R)");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "pkmlm_cpu::read_backward: int64 indices");
  TORCH_CHECK(grad_out.scalar_type() == values.scalar_type() && weights.scalar_type() == values.scalar_type(),
              "pkmlm_cpu::read_backward: grad_out, values and weights of one dtype");
  const int64_t N = indices.size(0), R = indices.size(1), M = values.size(0), V = values.size(1);
  const at::Tensor g = grad_out.contiguous(), val = values.contiguous(), idx = indices.contiguous(),
                   w = weights.contiguous();
  if (N * R > 0) {
    TORCH_CHECK(idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < M,
                "pkmlm_cpu::read_backward: indices must be in [0, M)");
  }
  at::Tensor grad_values = at::empty({M, V}, values.options());
  at::Tensor grad_weights = at::empty({N, R}, weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "pkmlm_cpu_read_backward", [&] {
    read_backward_impl<scalar_t>(g.const_data_ptr<scalar_t>(), val.const_data_ptr<scalar_t>(),
                                 idx.const_data_ptr<int64_t>(), w.const_data_ptr<scalar_t>(), N, R, M, V,
                                 grad_values.mutable_data_ptr<scalar_t>(), grad_weights.mutable_data_ptr<scalar_t>());
  });
  return {grad_values, grad_weights};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pkmlm_cpu, m) {
  m.def("read_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor weights) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pkmlm_cpu, CPU, m) { m.impl("read_backward", &read_backward); }
