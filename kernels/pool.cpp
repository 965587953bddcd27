#include "pool.h"

#include <cstdlib>

namespace mlxd {

namespace {

int default_threads() {
  if (const char* env = std::getenv("MLXD_KERNEL_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) {
      return n;
    }
  }
  return std::max(1u, std::min(std::thread::hardware_concurrency(), 8u));
}

} // namespace

Pool& pool() {
  static Pool p(default_threads());
  return p;
}

} // namespace mlxd
