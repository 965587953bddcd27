// A decoder layer's whole decode step as one primitive on the CPU: attn_in (RMSNorm, q/k/v
// projections, qwen2's biases, qwen3's q/k norms, RoPE), the KV cache's write, attention,
// o_proj with the residual add, and the MLP with its norm and residual add. As five ops a layer
// (attn_in, kv_update, decode_attention, qmm_add, mlp_residual) a SmolLM2 step was 150 graph
// nodes and 120 kernel calls from Python, each paying MLX's dispatch and the bindings; this is
// one of each a layer, running the same computations (parts.h), so it gives their bits.
#pragma once

#include <optional>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlxd {

namespace mx = mlx::core;

struct DecoderParams {
  int bits[4]; // q/k/v, o, gate/up, down
  float eps1, eps2;
  int dims;
  bool traditional;
  float base, rope_scale, attn_scale;
  int idx;
  bool mask, norms, bias; // which optional inputs follow the fixed ones
  bool operator==(const DecoderParams&) const = default;
};

// A layer's weights and settings, checked once: a decode step passes only what changes.
struct LayerPlan {
  std::vector<mx::array> weights; // the 23 arrays below
  std::vector<mx::array> extras; // the q/k norm weights, the q/k/v biases (those given)
  DecoderParams params; // idx and mask set per step
  int K, Hk, D, Dv;
};

// weights, 23 arrays: the input norm's weight [K] float32; q, k, v, o (weight, scales, biases
// each, group 32); the post-attention norm's weight [K]; gate, up, down. bits: q/k/v's, o's,
// gate/up's, down's. eps: the two norms'. rope: as attn_in's (dims, traditional, base, scale);
// attn_scale the attention's. q_norm_w, k_norm_w, q_bias, k_bias, v_bias: as attn_in's.
LayerPlan layer_plan(
    const std::vector<mx::array>& weights,
    const std::vector<int>& bits,
    float eps1,
    float eps2,
    int n_heads,
    int dims,
    bool traditional,
    float base,
    float rope_scale,
    float attn_scale,
    const std::optional<mx::array>& q_norm_w = std::nullopt,
    const std::optional<mx::array>& k_norm_w = std::nullopt,
    const std::optional<mx::array>& q_bias = std::nullopt,
    const std::optional<mx::array>& k_bias = std::nullopt,
    const std::optional<mx::array>& v_bias = std::nullopt);

// x [B, 1, K] float32; keys [B, Hk, C, D] and values [B, Hk, C, Dv]: a cache's float32 buffers,
// offset int32 [B] its rows' positions, idx < C the position written. mask: bool
// [B or 1, 1, 1, idx + 1] (false: a key not attended) or none.
// Returns [y [B, 1, K], keys and values with the new k, v at position idx, offset + 1]; the
// buffers are written in place when MLX may donate them (as kv_update does), else copied.
std::vector<mx::array> decoder_layer(
    const LayerPlan& plan,
    const mx::array& x,
    const mx::array& keys,
    const mx::array& values,
    const mx::array& offset,
    int idx,
    const std::optional<mx::array>& mask);

class DecoderLayer : public mx::Primitive {
 public:
  DecoderLayer(mx::Stream s, const DecoderParams& p) : mx::Primitive(s), p_(p) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxdDecoderLayer";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return p_ == static_cast<const DecoderLayer&>(other).p_;
  }

 private:
  DecoderParams p_;
};

} // namespace mlxd
