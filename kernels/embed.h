// A quantized embedding lookup as one op: MLX's QuantizedEmbedding gathers the ids' rows of the
// weight, scales and biases and dequantizes them with ~37 graph nodes on the CPU (shifts, masks,
// casts), each paying MLX's dispatch in every decode step.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlxd {

namespace mx = mlx::core;

// ids (integer, any shape); w uint32 [N, K * bits / 32], scales and biases [N, K / 32] (float32,
// float16 or bfloat16), group size 32, 4 or 8 bits. Returns float32 [*ids.shape, K]: the rows
// mx.dequantize(w[ids], scales[ids], biases[ids]) gives, rounded as it rounds (q * s, then + b,
// each in the scales' dtype), then cast to float32. Negative ids count from the end, as MLX's
// take does; ids past either end read the nearest row.
mx::array embed_rows(
    const mx::array& ids,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits);

class EmbedRows : public mx::UnaryPrimitive {
 public:
  EmbedRows(mx::Stream s, int bits) : mx::UnaryPrimitive(s), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxdEmbedRows";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return bits_ == static_cast<const EmbedRows&>(other).bits_;
  }

 private:
  int bits_;
};

} // namespace mlxd
