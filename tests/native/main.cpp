// Runs the kernels' native checks; prints the SIMD path, each failure, and the counts. Exit 1 on
// any failure.
#include "check.h"
#include "qdot.h"

int main() {
  std::printf("simd: %s\n", mlxd::simd_path());
  check::qdot_checks();
  check::attention_checks();
  const auto& c = check::count();
  std::printf("%d passed, %d failed\n", c.passed, c.failed);
  return c.failed == 0 && c.passed > 0 ? 0 : 1;
}
