#include "kv_cache.h"
#include "packed.h"
#include "parts.h"

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlxd {

// Rows [t0, t0 + src.shape(2)) of the row-major 4-d buffer dst (T positions) from src (any
// strides, last axis contiguous or not), element by element of `sz` bytes.
void write_rows(const mx::array& src, char* dst, int64_t T, int64_t t0) {
  const int64_t B = src.shape(0), H = src.shape(1), L = src.shape(2), D = src.shape(3);
  const size_t sz = src.itemsize();
  const auto& st = src.strides();
  const char* s = src.data<char>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t l = 0; l < L; ++l) {
        char* d = dst + (((b * H + h) * T + t0 + l) * D) * sz;
        const char* r = s + (b * st[0] + h * st[1] + l * st[2]) * static_cast<int64_t>(sz);
        if (st[3] == 1 || D == 1) {
          std::memcpy(d, r, D * sz);
        } else {
          for (int64_t i = 0; i < D; ++i) {
            std::memcpy(d + i * sz, r + i * st[3] * static_cast<int64_t>(sz), sz);
          }
        }
      }
    }
  }
}

namespace {

// out (idx + L positions) as a view of the buffer buf's first positions.
void view_of_buffer(const mx::array& buf, mx::array& out) {
  const auto& st = buf.strides();
  size_t extent = 1;
  for (int d = 0; d < out.ndim(); ++d) {
    extent += static_cast<size_t>(out.shape(d) - 1) * st[d];
  }
  auto [no_bsx_size, row, col] = mx::check_contiguity(out.shape(), st);
  auto flags = buf.flags();
  flags.row_contiguous = row;
  flags.col_contiguous = col;
  flags.contiguous = no_bsx_size == extent;
  out.copy_shared_buffer(buf, st, flags, extent);
}

} // namespace

std::vector<mx::array> kv_update(
    const mx::array& keys,
    const mx::array& values,
    const mx::array& offset,
    const mx::array& k,
    const mx::array& v,
    int idx) {
  for (const auto* a : {&keys, &values, &k, &v}) {
    if (a->ndim() != 4 || a->dtype() != keys.dtype()) {
      throw std::invalid_argument("kv_update: keys, values, k and v of 4 dims and one dtype");
    }
  }
  const int B = keys.shape(0), H = keys.shape(1), C = keys.shape(2), L = k.shape(2);
  if (values.shape(0) != B || values.shape(1) != H || values.shape(2) != C ||
      k.shape(0) != B || k.shape(1) != H || k.shape(3) != keys.shape(3) || v.shape(0) != B ||
      v.shape(1) != H || v.shape(2) != L || v.shape(3) != values.shape(3)) {
    throw std::invalid_argument(
        "kv_update: keys [B, H, C, D], values [B, H, C, Dv], k [B, H, L, D], v [B, H, L, Dv]");
  }
  if (idx < 0 || L < 1 || idx + L > C) {
    throw std::invalid_argument("kv_update: positions [idx, idx + L) must lie in the buffers");
  }
  if (offset.dtype() != mx::int32 || offset.ndim() != 1 || offset.shape(0) != B) {
    throw std::invalid_argument("kv_update: int32 offset [B]");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  const int T = idx + L;
  return mx::array::make_arrays(
      {keys.shape(), values.shape(), offset.shape(), {B, H, T, keys.shape(3)},
       {B, H, T, values.shape(3)}},
      {keys.dtype(), keys.dtype(), mx::int32, keys.dtype(), keys.dtype()},
      std::make_shared<KvUpdate>(s, idx),
      {keys, values, offset, k, v});
}

void encode_donatable_inputs(
    mx::Stream s,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& enc = mx::cpu::get_command_encoder(s);
  for (const auto& a : inputs) {
    enc.set_input_array(a);
  }
  for (auto& o : outputs) {
    if (&o.inputs() != &inputs) { // `inputs` is the evaluated output's own copy: it stays
      o.inputs().clear();
    }
  }
}

void KvUpdate::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  encode_donatable_inputs(stream(), inputs, outputs);
  auto& enc = mx::cpu::get_command_encoder(stream());
  // A buffer nothing else holds is written in place (as MLX's slice update donates it).
  bool copy[2];
  for (int i = 0; i < 2; ++i) {
    const auto& in = inputs[i];
    copy[i] = !(in.is_donatable() && in.flags().row_contiguous);
    if (copy[i]) {
      outputs[i].set_data(mx::allocator::malloc(outputs[i].nbytes()));
    } else {
      outputs[i].copy_shared_buffer(in);
    }
    enc.set_output_array(outputs[i]);
  }
  outputs[2].set_data(mx::allocator::malloc(outputs[2].nbytes()));
  enc.set_output_array(outputs[2]);
  for (int i = 0; i < 2; ++i) {
    view_of_buffer(outputs[i], outputs[3 + i]);
  }
  const int idx = idx_;
  char* bufs[2] = {outputs[0].data<char>(), outputs[1].data<char>()};
  int32_t* off = outputs[2].data<int32_t>();
  enc.dispatch([=, arrs = weak_copies(inputs)]() {
    const int64_t C = arrs[0].shape(2);
    for (int i = 0; i < 2; ++i) {
      if (copy[i]) {
        write_rows(arrs[i], bufs[i], C, 0);
      }
      write_rows(arrs[3 + i], bufs[i], C, idx);
    }
    const auto& o = arrs[2];
    const int32_t* src = o.data<int32_t>();
    const int L = arrs[3].shape(2);
    for (int b = 0; b < o.shape(0); ++b) {
      off[b] = src[b * o.strides()[0]] + L;
    }
  });
}

void KvUpdate::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("MlxdKvUpdate runs on the CPU only");
}

} // namespace mlxd
