// A row-major copy of a strided array, for kernels that read rows (inputs are usually
// contiguous already: weights are, and activations are unless they come from a transpose).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "mlx/array.h"

namespace mlxd {

inline std::vector<char> packed_copy(const mlx::core::array& a) {
  const size_t sz = a.itemsize();
  std::vector<char> out(a.size() * sz);
  if (a.size() == 0) {
    return out;
  }
  const char* src = a.data<char>();
  const int nd = a.ndim();
  const int64_t inner = nd ? a.shape(nd - 1) : 1;
  const int64_t step = nd ? a.strides()[nd - 1] : 1;
  std::vector<int64_t> idx(std::max(nd - 1, 0), 0);
  // One row (the last axis) at a time: a memcpy when its elements are adjacent.
  for (size_t r = 0; r < a.size() / inner; ++r) {
    int64_t off = 0;
    for (int d = 0; d < nd - 1; ++d) {
      off += idx[d] * a.strides()[d];
    }
    char* dst = out.data() + r * inner * sz;
    if (step == 1) {
      std::memcpy(dst, src + off * static_cast<int64_t>(sz), inner * sz);
    } else {
      for (int64_t i = 0; i < inner; ++i) {
        std::memcpy(dst + i * sz, src + (off + i * step) * static_cast<int64_t>(sz), sz);
      }
    }
    for (int d = nd - 2; d >= 0; --d) {
      if (++idx[d] < a.shape(d)) {
        break;
      }
      idx[d] = 0;
    }
  }
  return out;
}

} // namespace mlxd
