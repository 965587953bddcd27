#include "embed.h"
#include "packed.h"
#include "qdot.h"
#include "qmm.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/types/half_types.h"

namespace mlxd {

namespace {

// One row: (q * s) + b with each step rounded to T, as MLX's dequantize runs it in the scales'
// dtype (two ops, so two roundings), then widened to float32.
template <typename T>
void dequant_row(const uint8_t* w, const T* s, const T* b, int K, int bits, float* y) {
  for (int g = 0; g < K / kGroup; ++g) {
    const float sf = static_cast<float>(s[g]), bf = static_cast<float>(b[g]);
    for (int j = 0; j < kGroup; ++j) {
      const int i = g * kGroup + j;
      const int q = bits == 8 ? w[i] : (w[i / 2] >> (4 * (i % 2))) & 0xF;
      const T prod = static_cast<T>(static_cast<float>(static_cast<T>(q)) * sf);
      y[i] = static_cast<float>(static_cast<T>(static_cast<float>(prod) + bf));
    }
  }
}

int64_t row_of(const mx::array& ids, size_t i, const void* data, int64_t N) {
  int64_t r = 0;
  switch (ids.dtype()) {
    case mx::int32:
      r = static_cast<const int32_t*>(data)[i];
      break;
    case mx::uint32:
      r = static_cast<const uint32_t*>(data)[i];
      break;
    case mx::int64:
      r = static_cast<const int64_t*>(data)[i];
      break;
    default:
      r = static_cast<int64_t>(static_cast<const uint64_t*>(data)[i]);
  }
  if (r < 0) {
    r += N;
  }
  return std::clamp<int64_t>(r, 0, N - 1);
}

} // namespace

mx::array embed_rows(
    const mx::array& ids,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits) {
  const int K = check_weight("embed_rows", w, scales, biases, bits);
  const auto t = ids.dtype();
  if (t != mx::int32 && t != mx::uint32 && t != mx::int64 && t != mx::uint64) {
    throw std::invalid_argument("embed_rows: ids must be int32, uint32, int64 or uint64");
  }
  if (w.shape(0) < 1) {
    throw std::invalid_argument("embed_rows: an empty table");
  }
  auto shape = ids.shape();
  shape.push_back(K);
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array(
      std::move(shape), mx::float32, std::make_shared<EmbedRows>(s, bits), {ids, w, scales, biases});
}

void EmbedRows::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) {
    enc.set_input_array(a);
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
  enc.set_output_array(out);
  const int bits = bits_;
  const int K = out.shape(-1);
  enc.dispatch([=, y = out.data<float>(), arrs = weak_copies(inputs)]() {
    std::vector<std::vector<char>> tmp;
    const auto p = row_major(arrs, tmp);
    const auto& w = arrs[1];
    const int64_t N = w.shape(0);
    const int64_t wrow = w.shape(1) * 4, srow = arrs[2].shape(1);
    const auto* wd = static_cast<const uint8_t*>(p[1]);
    for (size_t i = 0; i < arrs[0].size(); ++i) {
      const int64_t r = row_of(arrs[0], i, p[0], N);
      float* yi = y + i * K;
      switch (arrs[2].dtype()) {
        case mx::float32:
          dequant_row(wd + r * wrow, static_cast<const float*>(p[2]) + r * srow,
                      static_cast<const float*>(p[3]) + r * srow, K, bits, yi);
          break;
        case mx::float16:
          dequant_row(wd + r * wrow, static_cast<const mx::float16_t*>(p[2]) + r * srow,
                      static_cast<const mx::float16_t*>(p[3]) + r * srow, K, bits, yi);
          break;
        default:
          dequant_row(wd + r * wrow, static_cast<const mx::bfloat16_t*>(p[2]) + r * srow,
                      static_cast<const mx::bfloat16_t*>(p[3]) + r * srow, K, bits, yi);
      }
    }
  });
}

void EmbedRows::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("MlxdEmbedRows runs on the CPU only");
}

} // namespace mlxd
