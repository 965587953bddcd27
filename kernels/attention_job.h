// What an attention call computes (attention.cpp's kernels and attention_prefill.cpp's share it).
#pragma once

#include <cstdint>

namespace mlxd {

struct View { // a float32 [B, H, T, D] array with unit last stride
  const float* p;
  int64_t sb, sh, st;
  const float* at(int b, int h, int t) const {
    return p + b * sb + h * sh + t * st;
  }
};

struct Job {
  View q, k, v;
  const bool* mask; // [Bm, Lm, T] with strides (msb, msl, mst); null: every key
  int64_t msb, msl, mst;
  float* out; // [B, Hq, L, Dv] contiguous
  int B, Hq, Hk, L, T, D, Dv;
  float scale;
  bool causal; // position l sees keys t <= T - L + l only
};

} // namespace mlxd
