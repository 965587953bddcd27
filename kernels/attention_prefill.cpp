// Tiled attention for long prefill chunks (see attention_prefill.h). A tile is kQ query
// vectors (consecutive (position, query head of the GQA group) pairs of one row and kv head);
// keys are transposed once per (row, kv head) into groups of kLanes, so a tile's scores against
// kLanes keys are kQ vectors of FMAs over the head dimension (no horizontal sums), and each
// value row is read once per pair of query vectors. The online softmax runs over blocks of kKeys
// keys counted from the first, so a query's sums do not depend on the tile it falls in.
#include "attention_prefill.h"
#include "pool.h"
#include "simd.h"
#include "vexp.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace mlxd {

#if defined(MLXD_SIMD)
namespace {

constexpr int kQ = 8; // query vectors a tile (kQ score accumulators in registers)
constexpr int kKeys = 64; // keys per online-softmax block
constexpr int kVecs = 4; // value vectors a pass at most (2 x kVecs accumulators)
static_assert(kKeys % kLanes == 0 && kQ % 2 == 0);

struct Tiles {
  const Job& j;
  int R; // query heads per kv head
  int groups; // key groups of kLanes (T rounded up)
  const float* kt; // [B, Hk, groups, D, kLanes], zero past T
};

void transpose_keys(const Job& j, int b, int g, int groups, float* kt) {
  for (int G = 0; G < groups; ++G) {
    float* dst = kt + static_cast<size_t>(G) * j.D * kLanes;
    for (int l = 0; l < kLanes; ++l) {
      const int t = G * kLanes + l;
      const float* src = t < j.T ? j.k.at(b, g, t) : nullptr;
      for (int d = 0; d < j.D; ++d) {
        dst[d * kLanes + l] = src ? src[d] : 0.f;
      }
    }
  }
}

// s[i * kKeys + c] = qs[i] . key (t0 + c) for c < n (rounded up to kLanes).
void scores(const Tiles& a, const float* kt, const float* qs, int t0, int n, float* s) {
  const int D = a.j.D;
  for (int c = 0; c < n; c += kLanes) {
    const float* kb = kt + static_cast<size_t>((t0 + c) / kLanes) * D * kLanes;
    vec acc[kQ];
    for (int i = 0; i < kQ; ++i) {
      acc[i] = vzero();
    }
    for (int d = 0; d < D; ++d) {
      const vec kv = vload(kb + d * kLanes);
      for (int i = 0; i < kQ; ++i) {
        acc[i] = vfma(vset(qs[i * D + d]), kv, acc[i]);
      }
    }
    for (int i = 0; i < kQ; ++i) {
      vstore(s + i * kKeys + c, acc[i]);
    }
  }
}

// acc[i] = acc[i] * alpha[i] + sum over c < n of p[i][c] * value (t0 + c) for value vectors
// d0 / kLanes .. + NV, two queries a pass.
template <int NV>
void accumulate_part(const Tiles& a, int b, int g, const float* p, const float* alpha, int t0,
                     int n, int d0, float* acc) {
  const int Dv = a.j.Dv;
  for (int i = 0; i < kQ; i += 2) {
    float* y0 = acc + i * Dv + d0;
    float* y1 = y0 + Dv;
    vec u[2][NV];
    for (int e = 0; e < NV; ++e) {
      u[0][e] = vmul(vload(y0 + e * kLanes), vset(alpha[i]));
      u[1][e] = vmul(vload(y1 + e * kLanes), vset(alpha[i + 1]));
    }
    const float* p0 = p + i * kKeys;
    const float* p1 = p0 + kKeys;
    for (int c = 0; c < n; ++c) {
      const float* vt = a.j.v.at(b, g, t0 + c) + d0;
      const vec w0 = vset(p0[c]), w1 = vset(p1[c]);
      for (int e = 0; e < NV; ++e) {
        const vec x = vload(vt + e * kLanes);
        u[0][e] = vfma(w0, x, u[0][e]);
        u[1][e] = vfma(w1, x, u[1][e]);
      }
    }
    for (int e = 0; e < NV; ++e) {
      vstore(y0 + e * kLanes, u[0][e]);
      vstore(y1 + e * kLanes, u[1][e]);
    }
  }
}

void accumulate(const Tiles& a, int b, int g, const float* p, const float* alpha, int t0, int n,
                float* acc) {
  for (int d0 = 0; d0 < a.j.Dv; d0 += kVecs * kLanes) {
    switch (std::min(kVecs, (a.j.Dv - d0) / kLanes)) {
      case 4:
        accumulate_part<4>(a, b, g, p, alpha, t0, n, d0, acc);
        break;
      case 3:
        accumulate_part<3>(a, b, g, p, alpha, t0, n, d0, acc);
        break;
      case 2:
        accumulate_part<2>(a, b, g, p, alpha, t0, n, d0, acc);
        break;
      default:
        accumulate_part<1>(a, b, g, p, alpha, t0, n, d0, acc);
    }
  }
}

// Query vectors f0 .. f0 + kQ (f = position * R + r) of row b, kv head g.
void tile(const Tiles& a, int b, int g, int f0) {
  const Job& j = a.j;
  const int D = j.D, Dv = j.Dv, nf = j.L * a.R;
  thread_local std::vector<float> qs, s, acc;
  qs.assign(static_cast<size_t>(kQ) * D, 0.f);
  s.resize(static_cast<size_t>(kQ) * kKeys);
  acc.assign(static_cast<size_t>(kQ) * Dv, 0.f);
  int last[kQ]; // a query's last attended key (-1: none)
  const bool* mrow[kQ]; // its key mask row (null: none)
  float m[kQ], l[kQ], alpha[kQ];
  int kmax = 0;
  for (int i = 0; i < kQ; ++i) {
    const int f = std::min(f0 + i, nf - 1); // past the chunk's end: a copy, not written
    const int pos = f / a.R, head = g * a.R + f % a.R;
    const float* q = j.q.at(b, head, pos);
    for (int d = 0; d < D; ++d) {
      qs[i * D + d] = q[d] * j.scale; // scaled first, as MLX's SDPA does
    }
    mrow[i] = j.mask == nullptr ? nullptr : j.mask + b * j.msb + pos * j.msl;
    last[i] = j.causal ? j.T - j.L + pos : j.T - 1;
    while (mrow[i] != nullptr && last[i] >= 0 && !mrow[i][last[i] * j.mst]) {
      --last[i]; // keys past the last one the mask lets through are never read
    }
    kmax = std::max(kmax, last[i] + 1);
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0.f;
  }
  const float* kt = a.kt + (static_cast<size_t>(b) * j.Hk + g) * a.groups * D * kLanes;
  for (int t0 = 0; t0 < kmax; t0 += kKeys) {
    const int n = std::min(kKeys, kmax - t0);
    scores(a, kt, qs.data(), t0, (n + kLanes - 1) / kLanes * kLanes, s.data());
    for (int i = 0; i < kQ; ++i) {
      // The softmax reads this query's own keys of the block only (its sums then do not depend
      // on the tile's other queries); the weights of the rest are 0 for the accumulation.
      float* si = s.data() + i * kKeys;
      const int own = std::clamp(last[i] + 1 - t0, 0, n);
      if (mrow[i] != nullptr) {
        for (int c = 0; c < own; ++c) {
          if (!mrow[i][(t0 + c) * j.mst]) {
            si[c] = -std::numeric_limits<float>::infinity();
          }
        }
      }
      const float top = own ? *std::max_element(si, si + own) : -std::numeric_limits<float>::infinity();
      if (top == -std::numeric_limits<float>::infinity()) {
        alpha[i] = 1.f; // no key of this block attended
        std::fill(si, si + n, 0.f);
        continue;
      }
      const float mn = std::max(m[i], top);
      alpha[i] = m[i] == -std::numeric_limits<float>::infinity() ? 0.f : vexp::exp1(m[i] - mn);
      m[i] = mn;
      l[i] = l[i] * alpha[i] + vexp::exp_shifted_sum(si, own, mn);
      std::fill(si + own, si + n, 0.f);
    }
    accumulate(a, b, g, s.data(), alpha, t0, n, acc.data());
  }
  for (int i = 0; i < kQ && f0 + i < nf; ++i) {
    const int pos = (f0 + i) / a.R, head = g * a.R + (f0 + i) % a.R;
    float* o = j.out + ((static_cast<size_t>(b) * j.Hq + head) * j.L + pos) * Dv;
    if (l[i] == 0.f) { // nothing attended: MLX's masked softmax is uniform over every key
      std::fill(o, o + Dv, 0.f);
      for (int t = 0; t < j.T; ++t) {
        const float* vt = j.v.at(b, g, t);
        for (int d = 0; d < Dv; ++d) {
          o[d] += vt[d];
        }
      }
      for (int d = 0; d < Dv; ++d) {
        o[d] /= static_cast<float>(j.T);
      }
      continue;
    }
    const float inv = 1.f / l[i];
    for (int d = 0; d < Dv; ++d) {
      o[d] = acc[i * Dv + d] * inv;
    }
  }
}

} // namespace

bool prefill_attention(const Job& j) {
  if (j.L < kPrefillPositions || j.Dv % kLanes) {
    return false;
  }
  const int R = j.Hq / j.Hk, groups = (j.T + kLanes - 1) / kLanes;
  std::vector<float> kt(static_cast<size_t>(j.B) * j.Hk * groups * j.D * kLanes);
  pool().run(j.B * j.Hk, true, [&](int c) {
    const size_t off = static_cast<size_t>(c) * groups * j.D * kLanes;
    transpose_keys(j, c / j.Hk, c % j.Hk, groups, kt.data() + off);
  });
  const Tiles a{j, R, groups, kt.data()};
  // Later tiles attend more keys: they go first, so the last chunks claimed are short ones.
  const int tiles = (j.L * R + kQ - 1) / kQ;
  const int64_t units = static_cast<int64_t>(j.B) * j.Hk * tiles;
  const int span = static_cast<int>(std::max<int64_t>(1, (units + 4095) / 4096));
  const int chunks = static_cast<int>((units + span - 1) / span);
  pool().run(chunks, true, [&](int c) {
    for (int64_t u = static_cast<int64_t>(c) * span; u < std::min(units, (c + 1) * int64_t{span});
         ++u) {
      const int t = static_cast<int>(tiles - 1 - u % tiles), bg = static_cast<int>(u / tiles);
      tile(a, bg / j.Hk, bg % j.Hk, t * kQ);
    }
  });
  return true;
}

#else

bool prefill_attention(const Job&) {
  return false;
}

#endif

} // namespace mlxd
