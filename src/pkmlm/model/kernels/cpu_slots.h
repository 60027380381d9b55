// Shared by the C++ CPU kernels of the memory (cpu_topk.cpp, cpu_scores.cpp): a slot id's two
// sub-key ids.
#pragma once

#include <cstdint>
#include <utility>

namespace pkmlm {

// slot -> (slot / S, slot % S) without a 64-bit division per read (~40 cycles on the EPYC; in the
// sparse score backward, 0.8 M of them took 2/3 of its time): a double reciprocal, then one
// correction step (exact for slot < 2^52).
struct SlotSplit {
  explicit SlotSplit(int64_t S) : S(S), inv(1.0 / static_cast<double>(S)) {}
  std::pair<int64_t, int64_t> operator()(int64_t slot) const {
    int64_t i = static_cast<int64_t>(static_cast<double>(slot) * inv);
    int64_t j = slot - i * S;
    if (j < 0) {
      --i;
      j += S;
    } else if (j >= S) {
      ++i;
      j -= S;
    }
    return {i, j};
  }
  int64_t S;
  double inv;
};

}  // namespace pkmlm
