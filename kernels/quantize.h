// 8-bit group-32 affine quantization of float weights as one multithreaded pass. MLX's CPU
// quantize is a scalar loop on one thread, after a cast to float32 that is another pass: ~1.4 s
// for gemma3's 262144 x 640 float16 embedding, most of its load.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlxd {

namespace mx = mlx::core;

// w float32, float16 or bfloat16 [..., K] (K a multiple of 32). Returns what
// mx.quantize(w.astype(float32), group_size=32, bits=8) returns, bit for bit: uint32 [..., K / 4]
// and float32 scales and biases [..., K / 32].
std::vector<mx::array> quantize8(const mx::array& w);

class Quantize8 : public mx::Primitive {
 public:
  explicit Quantize8(mx::Stream s) : mx::Primitive(s) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxdQuantize8";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

} // namespace mlxd
