// A long prefill chunk's attention in tiles (attention.cpp's one-position-at-a-time kernel
// reduces every score across lanes and reads each key once per query position: at 2048 tokens
// a prefill's attention took as long as all its matmuls, 2026-11-30).
#pragma once

#include "attention_job.h"

namespace mlxd {

// Runs j when it is a chunk of at least kPrefillPositions positions (causal, under a key mask,
// or both: a batch's prompts prefilled together) and a value size of whole SIMD vectors (and
// this build has the SIMD path); returns false, computing nothing, otherwise.
bool prefill_attention(const Job& j);

// Shorter chunks (a verify pass's drafts, short prompts) keep attention.cpp's kernel, whose
// positions get the bits of a decode step.
constexpr int kPrefillPositions = 64;

} // namespace mlxd
