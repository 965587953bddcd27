#include "pool.h"

#include <cstdlib>

#if defined(__linux__)
#include <sched.h>
#endif

#include "mlx/scheduler.h"
#include "qmm.h"

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

thread_local bool background = false;

bool background_thread() {
  return background;
}

void mark_background() {
  background = true;
}

void background_stream(mx::Stream s) {
  pool(); // its workers start here: made on the background thread, they would inherit its class
  mx::scheduler::enqueue(s, [] {
    mark_background();
#if defined(__linux__)
    // The idle class runs this thread only on a core nothing else wants; the priority can
    // never be raised again unprivileged, which suits a thread that only ever loads.
    sched_param none{};
    sched_setscheduler(0, SCHED_IDLE, &none);
#endif
  });
}

Pool& pool() {
  static Pool p(default_threads());
  return p;
}

} // namespace mlxd
