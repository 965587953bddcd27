// int8-activation dot products on arm64 with the ARMv8.2 dot-product instructions (see
// qdot_i8.h): SDOT multiplies 16 signed bytes by 16 and adds each 4 products into an int32 lane.
// The activations are the two levels of qdot_i8.h. 8-bit weights are centered in registers
// (q - 128 is q ^ 0x80 as a signed byte); 4-bit ones (0..15) are read as they are and each
// block's -8 * sum(256 * q1 + q2) is added in integers: either way the block's integer sum is
// sum((q - c) * (256 * q1 + q2)), exact, as on VNNI.
#include "qdot_i8.h"

#ifdef MLXD_SDOT
#include <arm_neon.h>

#include <algorithm>
#include <cstring>

namespace mlxd {

namespace {

constexpr int kTile = 4; // rows of x per tile: 2 * 4 accumulators beside 16 weight vectors

inline int8x16_t s8(uint8x16_t v) {
  return vreinterpretq_s8_u8(v);
}

void quantize_block(const float* x, int bits, int8_t* q, float* d, float* sum, int32_t* corr) {
  float32x4_t v[8];
  for (int i = 0; i < 8; ++i) {
    v[i] = vld1q_f32(x + 4 * i);
  }
  float32x4_t mx = vabsq_f32(v[0]), sm = v[0];
  for (int i = 1; i < 8; ++i) {
    mx = vmaxq_f32(mx, vabsq_f32(v[i]));
    sm = vaddq_f32(sm, v[i]);
  }
  const float amax = vmaxvq_f32(mx);
  *sum = vaddvq_f32(sm);
  const float step = amax / 127.0f;
  *d = step / 256.0f; // the unit of 256 * q1 + q2
  if (bits == 4) { // even values first (low nibbles), then odd ones
    float32x4_t e[4], o[4];
    for (int i = 0; i < 4; ++i) {
      e[i] = vuzp1q_f32(v[2 * i], v[2 * i + 1]);
      o[i] = vuzp2q_f32(v[2 * i], v[2 * i + 1]);
    }
    std::copy(e, e + 4, v);
    std::copy(o, o + 4, v + 4);
  }
  // Blocks of (near) zeros quantize to zeros (127 / amax would overflow).
  const float id = amax > 1e-30f ? 127.0f / amax : 0.0f;
  const float32x4_t vid = vdupq_n_f32(id), vid2 = vdupq_n_f32(id * 256.0f);
  const float32x4_t vs = vdupq_n_f32(step);
  int32x4_t l1[8], l2[8];
  for (int i = 0; i < 8; ++i) {
    // q1 = round(x / step), then q2 = round(256 * (x - q1 * step) / step): ~15 bits in all.
    const float32x4_t q1 = vrndnq_f32(vmulq_f32(v[i], vid));
    l1[i] = vcvtnq_s32_f32(q1);
    l2[i] = vcvtnq_s32_f32(vmulq_f32(vfmsq_f32(v[i], q1, vs), vid2));
  }
  int32_t total = 0;
  for (int h = 0; h < 2; ++h) {
    for (int lv = 0; lv < 2; ++lv) {
      const int32x4_t* l = (lv == 0 ? l1 : l2) + 4 * h;
      const int16x8_t a = vcombine_s16(vqmovn_s32(l[0]), vqmovn_s32(l[1]));
      const int16x8_t b = vcombine_s16(vqmovn_s32(l[2]), vqmovn_s32(l[3]));
      const int8x16_t b8 = vcombine_s8(vqmovn_s16(a), vqmovn_s16(b));
      vst1q_s8(q + 32 * lv + 16 * h, b8);
      total += (lv == 0 ? 256 : 1) * static_cast<int32_t>(vaddlvq_s8(b8));
    }
  }
  *corr = bits == 4 ? -8 * total : 0;
}

// A block's weights as two vectors of 16 signed bytes, in the order quantize_block put x in.
template <int BITS>
inline void weights(const uint8_t* row, int g, int8x16_t* w) {
  if constexpr (BITS == 4) {
    const uint8x16_t v = vld1q_u8(row + g * 16);
    w[0] = s8(vandq_u8(v, vdupq_n_u8(0x0F)));
    w[1] = s8(vshrq_n_u8(v, 4));
  } else {
    w[0] = s8(veorq_u8(vld1q_u8(row + g * 32), vdupq_n_u8(0x80)));
    w[1] = s8(veorq_u8(vld1q_u8(row + g * 32 + 16), vdupq_n_u8(0x80)));
  }
}

// ---- 4 blocks a pass, one int32 lane per block -------------------------------------------------
// Summing each block's 4 lanes apart (zeroing its accumulators, pairwise adds) cost as many
// instructions as its 4 SDOTs. So a pass's weights are loaded de-interleaved by LD4 (32-bit
// words): lane l of each vector then comes from one block, and x is laid out the same way by
// quantize_acts, so a block's sums finish in its own lane. 4-bit: vector v (< 8) lane l holds
// dword v of block l (as weights<4> orders a block: 4 low nibbles of a packed dword, then high);
// 8-bit: LD4 of blocks (0, 1) then (2, 3), vector 4p + t lane l holds dword t + 4 (l % 2) of
// block 2p + l / 2 (two lanes a block: one pairwise add finishes them).
inline void pass_lane(int bits, int v, int l, int* blk, int* dw) {
  *blk = bits == 4 ? l : 2 * (v / 4) + l / 2;
  *dw = bits == 4 ? v : v % 4 + 4 * (l % 2);
}

template <int BITS>
inline void pass_weights(const uint8_t* row, int g0, int8x16_t* w) {
  const auto* p = reinterpret_cast<const uint32_t*>(row + static_cast<size_t>(g0) * BITS * 4);
  if constexpr (BITS == 4) {
    const uint32x4x4_t T = vld4q_u32(p);
    for (int t = 0; t < 4; ++t) {
      const uint8x16_t u = vreinterpretq_u8_u32(T.val[t]);
      w[t] = s8(vandq_u8(u, vdupq_n_u8(0x0F)));
      w[4 + t] = s8(vshrq_n_u8(u, 4));
    }
  } else {
    for (int h = 0; h < 2; ++h) {
      const uint32x4x4_t T = vld4q_u32(p + 16 * h);
      for (int t = 0; t < 4; ++t) {
        w[4 * h + t] = s8(veorq_u8(vreinterpretq_u8_u32(T.val[t]), vdupq_n_u8(0x80)));
      }
    }
  }
}

// A level's two pass accumulators as one lane a block.
template <int BITS>
inline int32x4_t finish(int32x4_t a, int32x4_t b) {
  return BITS == 4 ? vaddq_s32(a, b) : vpaddq_s32(a, b);
}

// A block's two int32 lane sums, level 1 and 2 (4 SDOTs in two independent chains).
inline void block_dot(const int8x16_t* w, const int8_t* xb, int32x4_t* a1, int32x4_t* a2) {
  const int32x4_t z = vdupq_n_s32(0);
  *a1 = vdotq_s32(vdotq_s32(z, w[0], vld1q_s8(xb)), w[1], vld1q_s8(xb + 16));
  *a2 = vdotq_s32(vdotq_s32(z, w[0], vld1q_s8(xb + 32)), w[1], vld1q_s8(xb + 48));
}

// A stored row's scales (or biases): 4 from block g as float.
inline float32x4_t load4(const void* p, SType t, int g) {
  if (t == SType::F32) {
    return vld1q_f32(static_cast<const float*>(p) + g);
  }
  const uint16x4_t h = vld1_u16(static_cast<const uint16_t*>(p) + g);
  return t == SType::F16 ? vcvt_f32_f16(vreinterpret_f16_u16(h))
                         : vreinterpretq_f32_u32(vshll_n_u16(h, 16));
}

inline float load1(const void* p, SType t, int g) {
  float f[4];
  if (t == SType::F32) {
    return static_cast<const float*>(p)[g];
  }
  const uint16_t h = static_cast<const uint16_t*>(p)[g];
  const uint16_t hs[4] = {h, 0, 0, 0};
  vst1q_f32(f, load4(hs, t, 0));
  return f[0];
}

struct Rows {
  const uint8_t* w[2];
  const void* s[2];
  const void* b[2];
  SType t;
};

// MT rows of x (from row m) against NR weight rows, 4 blocks a pass (lane l: block g0 + l once
// reduced), one convert and FMA scaling 4 blocks; the blocks past the last pass one by one. The
// same order for a row whatever MT is.
template <int BITS, int MT, int NR>
void tile(const Rows& R, const Acts& a, int m, float* y, int ldy) {
  constexpr float c = BITS == 4 ? 8.0f : 128.0f;
  const int nb = a.K / kGroup, np = nb / 4;
  float32x4_t acc[NR][MT];
  for (int i = 0; i < NR; ++i) {
    for (int r = 0; r < MT; ++r) {
      acc[i][r] = vdupq_n_f32(0.f);
    }
  }
  for (int P = 0; P < np; ++P) {
    const int g0 = P * 4;
    int8x16_t w[NR][8];
    float32x4_t s[NR], bc[NR];
    for (int i = 0; i < NR; ++i) {
      pass_weights<BITS>(R.w[i], g0, w[i]);
      s[i] = load4(R.s[i], R.t, g0);
      bc[i] = vfmaq_f32(load4(R.b[i], R.t, g0), s[i], vdupq_n_f32(c)); // c * s is exact
    }
    for (int r = 0; r < MT; ++r) {
      const size_t row = static_cast<size_t>(m + r), rb = row * nb + g0;
      const int8_t* xp = a.qt.data() + (row * np + P) * 256;
      const float32x4_t d = vld1q_f32(a.d.data() + rb), xs = vld1q_f32(a.sum.data() + rb);
      // Two accumulators a level (vectors 0-3, 4-7); 4-bit: level 2 starts at the corrections.
      int32x4_t a1[NR][2], a2[NR][2];
      for (int i = 0; i < NR; ++i) {
        a1[i][0] = a1[i][1] = a2[i][1] = vdupq_n_s32(0);
        a2[i][0] = BITS == 4 ? vld1q_s32(a.corr.data() + rb) : vdupq_n_s32(0);
      }
      for (int v = 0; v < 8; ++v) {
        const int8x16_t x1 = vld1q_s8(xp + 16 * v), x2 = vld1q_s8(xp + 128 + 16 * v);
        for (int i = 0; i < NR; ++i) {
          a1[i][v / 4] = vdotq_s32(a1[i][v / 4], w[i][v], x1);
          a2[i][v / 4] = vdotq_s32(a2[i][v / 4], w[i][v], x2);
        }
      }
      for (int i = 0; i < NR; ++i) {
        const int32x4_t p1 = finish<BITS>(a1[i][0], a1[i][1]);
        const int32x4_t p2 = finish<BITS>(a2[i][0], a2[i][1]);
        const int32x4_t p = vmlaq_n_s32(p2, p1, 256); // sum((q - c) * (256 * q1 + q2)) a block
        acc[i][r] = vfmaq_f32(acc[i][r], vcvtq_f32_s32(p), vmulq_f32(s[i], d));
        acc[i][r] = vfmaq_f32(acc[i][r], bc[i], xs);
      }
    }
  }
  // The blocks past the last full pass, one by one.
  float part[NR][MT] = {}, bias[NR][MT] = {};
  for (int g = np * 4; g < nb; ++g) {
    int8x16_t w[NR][2];
    float sg[NR], bg[NR];
    for (int i = 0; i < NR; ++i) {
      weights<BITS>(R.w[i], g, w[i]);
      sg[i] = load1(R.s[i], R.t, g);
      bg[i] = load1(R.b[i], R.t, g) + c * sg[i];
    }
    for (int r = 0; r < MT; ++r) {
      const size_t rb = static_cast<size_t>(m + r) * nb + g;
      const float d = a.d[rb], xs = a.sum[rb];
      for (int i = 0; i < NR; ++i) {
        int32x4_t a1, a2;
        block_dot(w[i], a.q.data() + rb * 64, &a1, &a2);
        const int32_t p = vaddvq_s32(vaddq_s32(vshlq_n_s32(a1, 8), a2)) + a.corr[rb];
        part[i][r] += static_cast<float>(p) * (sg[i] * d);
        bias[i][r] += bg[i] * xs;
      }
    }
  }
  for (int i = 0; i < NR; ++i) {
    for (int r = 0; r < MT; ++r) {
      y[static_cast<size_t>(r) * ldy + i] = vaddvq_f32(acc[i][r]) + (part[i][r] + bias[i][r]);
    }
  }
}

// Rows m .. m + MT of x; the last `left` (< kTile) rows pick MT == left.
template <int BITS, int MT, int NR>
inline void rest(const Rows& R, const Acts& a, int m, float* y, int ldy, int left) {
  if constexpr (MT > 0) {
    if (left == MT) {
      tile<BITS, MT, NR>(R, a, m, y, ldy);
    } else {
      rest<BITS, MT - 1, NR>(R, a, m, y, ldy, left);
    }
  }
}

template <int BITS>
void qdot(const QWeight& W, const Acts& a, float* y, int ldy, int n0, int n1) {
  const size_t nb = W.K / kGroup, sbytes = (W.stype == SType::F32 ? 4 : 2) * nb;
  auto rows = [&]<int NR>(int n) {
    Rows R{{}, {}, {}, W.stype};
    for (int i = 0; i < NR; ++i) {
      R.w[i] = W.w + static_cast<size_t>(n + i) * W.K * BITS / 8;
      R.s[i] = static_cast<const char*>(W.scales) + (n + i) * sbytes;
      R.b[i] = static_cast<const char*>(W.biases) + (n + i) * sbytes;
    }
    if (n + (kAhead + 1) * NR <= W.N) {
      prefetch_rows(W, n + kAhead * NR, NR);
    }
    float* yn = y + (n - n0);
    int m = 0;
    for (; m + kTile <= a.M; m += kTile) {
      tile<BITS, kTile, NR>(R, a, m, yn + m * ldy, ldy);
    }
    rest<BITS, kTile - 1, NR>(R, a, m, yn + m * ldy, ldy, a.M - m);
  };
  int n = n0;
  for (; n + 2 <= n1; n += 2) {
    rows.template operator()<2>(n);
  }
  for (; n < n1; ++n) {
    rows.template operator()<1>(n);
  }
}

} // namespace

void quantize_acts(const float* x, int M, int K, int bits, Acts& a) {
  a.x = x;
  a.M = M;
  a.K = K;
  a.bits = bits;
  const size_t blocks = static_cast<size_t>(M) * (K / kGroup);
  a.q.resize(blocks * kGroup * 2);
  a.d.resize(blocks);
  a.sum.resize(blocks);
  a.corr.resize(blocks);
  for (size_t b = 0; b < blocks; ++b) {
    quantize_block(
        x + b * kGroup, bits, a.q.data() + b * kGroup * 2, &a.d[b], &a.sum[b], &a.corr[b]);
  }
  // The full passes' layout (pass_lane): [M, K / 128, 2 levels, 8 vectors, 4 lanes, 4 bytes].
  const int nb = K / kGroup, np = nb / 4;
  a.qt.resize(static_cast<size_t>(M) * np * 256);
  for (int m = 0; m < M; ++m) {
    for (int P = 0; P < np; ++P) {
      int8_t* dst = a.qt.data() + (static_cast<size_t>(m) * np + P) * 256;
      for (int lv = 0; lv < 2; ++lv) {
        for (int v = 0; v < 8; ++v) {
          for (int l = 0; l < 4; ++l) {
            int blk, dw;
            pass_lane(bits, v, l, &blk, &dw);
            const size_t b = static_cast<size_t>(m) * nb + P * 4 + blk;
            const int8_t* src = a.q.data() + b * 64 + lv * 32 + dw * 4;
            std::memcpy(dst + ((lv * 8 + v) * 4 + l) * 4, src, 4);
          }
        }
      }
    }
  }
}

void qdot_rows_i8(const QWeight& W, const Acts& a, float* y, int ldy, int n0, int n1) {
  if (W.bits == 4) {
    qdot<4>(W, a, y, ldy, n0, n1);
  } else {
    qdot<8>(W, a, y, ldy, n0, n1);
  }
}

} // namespace mlxd

#endif
