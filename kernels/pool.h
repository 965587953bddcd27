// The kernels' worker threads (see Pool).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mlxd {

// True on a thread that mark_background() marked: a stream's thread doing a model load's work.
bool background_thread();
void mark_background();

// MLX's CPU stream runs tasks on one thread; a decode step issues ~200 matmuls of 20-500 us each,
// so workers spin briefly between calls (a futex wake per call would cost as much as the work).
// Work is claimed in chunks: on a busy machine a worker that is not scheduled in time leaves its
// chunks to the caller instead of stalling the call.
class Pool {
 public:
  explicit Pool(int n) {
    resize(n);
  }
  ~Pool() {
    stop_workers();
  }

  int size() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  void resize(int n) {
    std::lock_guard<std::mutex> lock(busy_);
    stop_workers();
    stop_.store(false);
    for (int t = 1; t < std::max(1, n); ++t) {
      workers_.emplace_back([this] { loop(); });
    }
  }

  // Runs f(c) for every chunk c in [0, chunks) on the caller and the workers.
  void run(int chunks, bool parallel, const std::function<void(int)>& f) {
    // One call at a time uses the workers (a second CPU stream's thread runs its call alone);
    // a background thread never does, so it cannot hold them while the OS leaves it waiting.
    std::unique_lock<std::mutex> lock(busy_, std::defer_lock);
    if (parallel && !background_thread()) {
      lock.try_lock();
    }
    if (!parallel || workers_.empty() || chunks < 2 || !lock.owns_lock()) {
      for (int c = 0; c < chunks; ++c) {
        f(c);
      }
      return;
    }
    chunks = std::min(chunks, 0xFFFF);
    job_.store(&f, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & 0xFFFFFFFFu;
    state_.store((gen_ << 32) | (static_cast<uint64_t>(chunks) << 16), std::memory_order_release);
    state_.notify_all();
    work(f, gen_);
    while (done_.load(std::memory_order_acquire) != chunks) {
      relax();
    }
  }

 private:
  static void relax() {
#if defined(__AVX2__) || defined(__AVX512F__)
    _mm_pause();
#elif defined(__aarch64__)
    // `yield` is a no-op on most arm64 cores; `isb` stalls for tens of cycles, pause's role.
    asm volatile("isb" ::: "memory");
#else
    std::this_thread::yield();
#endif
  }

  // Claims chunks of call `gen` until none is left (or a later call has begun).
  void work(const std::function<void(int)>& f, uint64_t gen) {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      uint64_t total = (s >> 16) & 0xFFFF, next = s & 0xFFFF;
      if ((s >> 32) != gen || next >= total) {
        return;
      }
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
        f(static_cast<int>(next));
        done_.fetch_add(1, std::memory_order_acq_rel);
        s = state_.load(std::memory_order_acquire);
      }
    }
  }

  void loop() {
    uint64_t seen = state_.load() >> 32;
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      for (int i = 0; (s >> 32) == seen && i < 20000; ++i) {
        relax();
        s = state_.load(std::memory_order_acquire);
      }
      while ((s >> 32) == seen && !stop_.load()) {
        state_.wait(s, std::memory_order_acquire);
        s = state_.load(std::memory_order_acquire);
      }
      if (stop_.load()) {
        return;
      }
      seen = s >> 32;
      // job_ is read after the generation: a claim only succeeds while that generation is
      // current, and then job_ (written before it was published) is still that call's.
      const auto* f = job_.load(std::memory_order_acquire);
      if (f != nullptr) {
        work(*f, seen);
      }
    }
  }

  void stop_workers() {
    stop_.store(true);
    state_.fetch_add(uint64_t{1} << 32);
    state_.notify_all();
    for (auto& w : workers_) {
      w.join();
    }
    workers_.clear();
    gen_ = state_.load() >> 32;
  }

  std::vector<std::thread> workers_;
  std::mutex busy_;
  std::atomic<uint64_t> state_{0}; // generation:32 | chunks:16 | next chunk:16
  std::atomic<int> done_{0};
  std::atomic<const std::function<void(int)>*> job_{nullptr};
  uint64_t gen_ = 0;
  std::atomic<bool> stop_{false};
};

// The process's pool: MLXD_KERNEL_THREADS threads, else one per core (at most 8).
Pool& pool();

} // namespace mlxd
