#include "fused.h"
#include "packed.h"
#include "rows.h"

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


} // namespace

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
