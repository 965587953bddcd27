#include "fused.h"
#include "packed.h"
#include "pool.h"
#include "rows.h"
#include "vexp.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlxd {

namespace {

mx::Stream cpu_stream() {
  return mx::default_stream(mx::Device::cpu);
}

// y = silu(g) * u = g / (1 + exp(-g)) * u over n values: full vectors, then the scalar exp.
void swiglu_span(const float* g, const float* u, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 e = vexp::exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
    _mm512_storeu_ps(y + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
  }
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = vexp::exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
#elif defined(__aarch64__) && defined(__ARM_NEON)
  const float32x4_t one = vdupq_n_f32(1.f);
  for (; i + 4 <= n; i += 4) {
    const float32x4_t gv = vld1q_f32(g + i);
    const float32x4_t s = vdivq_f32(gv, vaddq_f32(one, vexp::exp4(vnegq_f32(gv))));
    vst1q_f32(y + i, vmulq_f32(s, vld1q_f32(u + i)));
  }
#endif
  for (; i < n; ++i) {
    y[i] = g[i] / (1.f + vexp::exp1(-g[i])) * u[i];
  }
}


} // namespace

mx::array swiglu(const mx::array& g, const mx::array& u) {
  if (g.dtype() != mx::float32 || u.dtype() != mx::float32 || g.shape() != u.shape()) {
    throw std::invalid_argument("swiglu: float32 g and u of one shape");
  }
  return mx::array(g.shape(), mx::float32, std::make_shared<SwiGlu>(cpu_stream()), {g, u});
}

void SwiGlu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(inputs[0]);
  enc.set_input_array(inputs[1]);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  enc.set_output_array(out);
  enc.dispatch([ga = mx::array::unsafe_weak_copy(inputs[0]),
                ua = mx::array::unsafe_weak_copy(inputs[1]),
                y = out.data<float>()]() {
    std::vector<char> tg, tu;
    const auto* g = ga.flags().row_contiguous ? ga.data<float>()
                                              : reinterpret_cast<const float*>((tg = packed_copy(ga)).data());
    const auto* u = ua.flags().row_contiguous ? ua.data<float>()
                                              : reinterpret_cast<const float*>((tu = packed_copy(ua)).data());
    // Chunks of 16k values: a prefill's [L, F] splits over the pool, a decode row stays on the
    // caller.
    constexpr int64_t kChunk = 16384;
    const int64_t n = static_cast<int64_t>(ga.size());
    pool().run(static_cast<int>((n + kChunk - 1) / kChunk), n >= 2 * kChunk, [&](int c) {
      const int64_t i = c * kChunk;
      swiglu_span(g + i, u + i, y + i, std::min(kChunk, n - i));
    });
  });
}

void SwiGlu::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MlxdSwiGlu runs on the CPU only");
}

mx::array rms_norm(const mx::array& x, const mx::array& w, float eps) {
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32 || w.ndim() != 1 || x.ndim() < 1 ||
      x.shape(-1) != w.shape(0)) {
    throw std::invalid_argument("rms_norm: float32 x [..., D] and w [D]");
  }
  auto s = cpu_stream();
  return mx::array(
      x.shape(), mx::float32, std::make_shared<RmsNorm>(s, eps), {x, w});
}

void RmsNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(inputs[0]);
  enc.set_input_array(inputs[1]);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  enc.set_output_array(out);
  const float* w = inputs[1].data<float>();
  float* y = out.data<float>();
  const int d = inputs[0].shape(-1);
  const size_t rows = inputs[0].size() / d;
  const float eps = eps_;
  enc.dispatch([xa = mx::array::unsafe_weak_copy(inputs[0]), w, y, d, rows, eps]() {
    std::vector<char> tmp;
    if (!xa.flags().row_contiguous) {
      tmp = packed_copy(xa);
    }
    const float* x = tmp.empty() ? xa.data<float>() : reinterpret_cast<const float*>(tmp.data());
    for (size_t r = 0; r < rows; ++r) {
      rms_norm_row(x + r * d, w, y + r * d, d, eps);
    }
  });
}

void RmsNorm::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MlxdRmsNorm runs on the CPU only");
}

mx::array rope(
    const mx::array& x,
    const mx::array& offset,
    int dims,
    bool traditional,
    float base,
    float scale) {
  if (x.dtype() != mx::float32 || x.ndim() != 4 || dims % 2 || dims > x.shape(-1) ||
      (offset.size() != 1 && offset.size() != static_cast<size_t>(x.shape(0)))) {
    throw std::invalid_argument("rope: float32 x [B, H, L, D], offset [B] or [1], even dims <= D");
  }
  auto s = cpu_stream();
  auto off = mx::astype(mx::reshape(offset, {-1}, s), mx::int32, s);
  return mx::array(
      x.shape(),
      mx::float32,
      std::make_shared<Rope>(s, dims, traditional, base, scale),
      {x, off});
}

void Rope::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(inputs[0]);
  enc.set_input_array(inputs[1]);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  enc.set_output_array(out);
  const int32_t* off = inputs[1].data<int32_t>();
  const bool per_row = inputs[1].size() > 1;
  float* y = out.data<float>();
  const int B = inputs[0].shape(0), H = inputs[0].shape(1), L = inputs[0].shape(2);
  const int D = inputs[0].shape(3);
  const int dims = dims_, half = dims_ / 2;
  const bool trad = traditional_;
  const float base = base_, scale = scale_;
  enc.dispatch([=, xa = mx::array::unsafe_weak_copy(inputs[0])]() {
    std::vector<char> tmp;
    if (!xa.flags().row_contiguous) {
      tmp = packed_copy(xa);
    }
    const float* x = tmp.empty() ? xa.data<float>() : reinterpret_cast<const float*>(tmp.data());
    const std::vector<float> inv = rope_inv_freqs(base, dims);
    std::vector<float> cs(half), sn(half);
    for (int b = 0; b < B; ++b) {
      const int o = off[per_row ? b : 0];
      for (int l = 0; l < L; ++l) {
        rope_angles(static_cast<float>(o + l) * scale, inv, cs.data(), sn.data());
        for (int h = 0; h < H; ++h) {
          const size_t row = ((static_cast<size_t>(b) * H + h) * L + l) * D;
          rope_head(x + row, y + row, cs.data(), sn.data(), dims, D, trad);
        }
      }
    }
  });
}

void Rope::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MlxdRope runs on the CPU only");
}

} // namespace mlxd
