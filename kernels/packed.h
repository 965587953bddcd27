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

// Weak copies of a primitive's inputs, for its dispatched task (MLX keeps the data alive).
inline std::vector<mlx::core::array> weak_copies(const std::vector<mlx::core::array>& inputs) {
  std::vector<mlx::core::array> out;
  for (const auto& a : inputs) {
    out.push_back(mlx::core::array::unsafe_weak_copy(a));
  }
  return out;
}

// Each array's data as row-major: contiguous ones in place, strided ones packed into `tmp`.
// Run on the stream's thread, once the data is ready.
inline std::vector<const void*> row_major(
    const std::vector<mlx::core::array>& arrs,
    std::vector<std::vector<char>>& tmp) {
  std::vector<const void*> ptrs;
  tmp.resize(arrs.size());
  for (size_t i = 0; i < arrs.size(); ++i) {
    if (arrs[i].flags().row_contiguous) {
      ptrs.push_back(arrs[i].data<void>());
    } else {
      tmp[i] = packed_copy(arrs[i]);
      ptrs.push_back(tmp[i].data());
    }
  }
  return ptrs;
}

} // namespace mlxd
