// A batch KV cache's decode update as one op. mlx-lm's BatchKVCache.update_and_fetch is six graph
// nodes a layer a step (the offset's add and its broadcast, two slice updates, two slices), each
// paying MLX's dispatch; this writes the new keys and values in place and hands back the views.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlxd {

namespace mx = mlx::core;

// keys [B, H, C, D] and values [B, H, C, Dv] (a cache's buffers, one dtype), offset int32 [B],
// k [B, H, L, D] and v [B, H, L, Dv] of the buffers' dtype; idx + L <= C. Returns
//   [keys with k written at positions [idx, idx + L), values likewise, offset + L,
//    those keys' first idx + L positions, those values' first idx + L positions]:
// mlx-lm's `offset += L; keys[..., idx:idx + L, :] = k; ...; return keys[..., :idx + L, :], ...`
// in one op. The buffers are written in place when MLX may donate them (nothing else holds
// them), else copied first, as MLX's slice update does; the last two are views of the first two.
std::vector<mx::array> kv_update(
    const mx::array& keys,
    const mx::array& values,
    const mx::array& offset,
    const mx::array& k,
    const mx::array& v,
    int idx);

// The start of a multi-output op's eval_cpu that writes input buffers in place: registers the
// inputs with the CPU encoder and drops the other outputs' copies of them (every output of a
// multi-output primitive holds its own, and MLX's is_donatable counts them), so a buffer
// nothing else holds can be donated.
void encode_donatable_inputs(
    mx::Stream s,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs);

class KvUpdate : public mx::Primitive {
 public:
  KvUpdate(mx::Stream s, int idx) : mx::Primitive(s), idx_(idx) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxdKvUpdate";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return idx_ == static_cast<const KvUpdate&>(other).idx_;
  }

 private:
  int idx_;
};

} // namespace mlxd
