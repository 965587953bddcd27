#include "quantize.h"
#include "packed.h"
#include "pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/types/half_types.h"

namespace mlxd {

namespace {

constexpr int kGroup = 32;
constexpr float kBins = 255.0f;
constexpr float kEps = 1e-7f;

// One group of 32 values, as MLX's affine quantize computes it in float32: the scale spans
// [min, max] in 255 steps, then is adjusted so that the edge with the larger magnitude is
// exactly representable (bias = that edge, unless it rounds to level 0).
template <typename T>
void quantize_group(const T* w, uint32_t* q, float* scale_out, float* bias_out) {
  float v[kGroup];
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (int j = 0; j < kGroup; ++j) {
    v[j] = static_cast<float>(w[j]);
    hi = std::max(hi, v[j]);
    lo = std::min(lo, v[j]);
  }
  const bool low_edge = std::abs(lo) > std::abs(hi);
  float scale = std::max((hi - lo) / kBins, kEps);
  scale = low_edge ? scale : -scale;
  const float edge = low_edge ? lo : hi;
  const float q0 = std::rint(edge / scale);
  float bias = 0.0f;
  if (q0 != 0.0f) {
    scale = edge / q0;
    bias = edge;
  }
  for (int j = 0; j < kGroup; j += 4) {
    uint32_t packed = 0;
    for (int k = 0; k < 4; ++k) {
      const float level = std::min(std::max(std::rint((v[j + k] - bias) / scale), 0.0f), kBins);
      packed |= static_cast<uint32_t>(level) << (8 * k);
    }
    q[j / 4] = packed;
  }
  *scale_out = scale;
  *bias_out = bias;
}

template <typename T>
void quantize_rows(const T* w, int64_t rows, int64_t K, uint32_t* q, float* s, float* b) {
  const int64_t groups = K / kGroup;
  // Chunks of rows over the pool (a background stream's thread runs them all itself).
  const int64_t per = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(K, 1));
  const int chunks = static_cast<int>(std::min<int64_t>((rows + per - 1) / per, 1 << 15));
  const int64_t step = (rows + chunks - 1) / chunks;
  pool().run(chunks, rows * K >= (1 << 16), [&](int c) {
    const int64_t r1 = std::min(rows, (c + 1) * step);
    for (int64_t r = c * step; r < r1; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t i = r * groups + g;
        quantize_group(w + i * kGroup, q + i * (kGroup / 4), s + i, b + i);
      }
    }
  });
}

} // namespace

std::vector<mx::array> quantize8(const mx::array& w) {
  const auto t = w.dtype();
  if (t != mx::float32 && t != mx::float16 && t != mx::bfloat16) {
    throw std::invalid_argument("quantize8: float32, float16 or bfloat16 weights");
  }
  if (w.ndim() < 1 || w.shape(-1) % kGroup != 0 || w.shape(-1) == 0) {
    throw std::invalid_argument("quantize8: the last dimension must be a multiple of 32");
  }
  auto qshape = w.shape(), gshape = w.shape();
  qshape.back() = w.shape(-1) / 4;
  gshape.back() = w.shape(-1) / kGroup;
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array::make_arrays(
      {qshape, gshape, gshape},
      {mx::uint32, mx::float32, mx::float32},
      std::make_shared<Quantize8>(s),
      {w});
}

void Quantize8::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(inputs[0]);
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
    enc.set_output_array(o);
  }
  enc.dispatch([arrs = weak_copies(inputs),
                q = outputs[0].data<uint32_t>(),
                sc = outputs[1].data<float>(),
                bi = outputs[2].data<float>()]() {
    std::vector<std::vector<char>> tmp;
    const auto p = row_major(arrs, tmp);
    const auto& w = arrs[0];
    const int64_t K = w.shape(-1), rows = static_cast<int64_t>(w.size()) / K;
    switch (w.dtype()) {
      case mx::float32:
        quantize_rows(static_cast<const float*>(p[0]), rows, K, q, sc, bi);
        break;
      case mx::float16:
        quantize_rows(static_cast<const mx::float16_t*>(p[0]), rows, K, q, sc, bi);
        break;
      default:
        quantize_rows(static_cast<const mx::bfloat16_t*>(p[0]), rows, K, q, sc, bi);
    }
  });
}

void Quantize8::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("MlxdQuantize8 runs on the CPU only");
}

} // namespace mlxd
