// A pool of helper threads in which the caller never waits for a helper that has not started.
//
// OpenMP's fork-join ends every parallel region at a barrier of the whole team: on a machine shared with other
// work, a helper the OS has not yet run holds the caller there for a scheduler slice, at every one of a decode
// step's ~360 kernel calls. Here the caller claims tasks from a shared counter like any helper and then waits
// only for tasks already claimed: a helper that wakes late finds nothing left and goes back to sleep. Which
// thread runs a task never changes its arithmetic (every output element belongs to one task).
//
// Waking a sleeping thread takes tens of microseconds, as long as a whole decode-step linear call (64 rows x 576
// columns: ~170 us). So a helper that finishes a job spins for SPIN before it sleeps, and the caller spins for
// the helpers' last tasks before it sleeps: back-to-back kernel calls find both awake. The spin is bounded,
// so an idle engine's threads still sleep.
#include <immintrin.h>
#include <omp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels.h"

namespace bd {
namespace {

constexpr auto SPIN = std::chrono::microseconds(200);

// spin until done() or SPIN has passed; true when done() became true
template <typename Done>
bool spin_until(Done done) {
  const auto end = std::chrono::steady_clock::now() + SPIN;
  for (int i = 0;; ++i) {
    if (done()) return true;
    _mm_pause();
    if (i % 64 == 63 && std::chrono::steady_clock::now() >= end) return done();
  }
}

class Pool {
 public:
  void run(int64_t tasks, const std::function<void(int64_t)>& fn, int threads) {
    ensure_helpers(threads - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      tasks_ = tasks;
      next_ = 0;
      done_ = 0;
      ++generation_;
    }
    wake_.notify_all();
    work();
    spin_until([&] { return done_.load(std::memory_order_acquire) == tasks; });
    std::unique_lock<std::mutex> lock(mutex_);
    finished_.wait(lock, [&] { return done_ == tasks_; });
    fn_ = nullptr;
  }

 private:
  void ensure_helpers(int count) {
    while (int(helpers_.size()) < count) helpers_.emplace_back([this] { helper(); });
  }

  // claim and run tasks of the current job until none is left
  void work() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (fn_ != nullptr && next_ < tasks_) {
      int64_t task = next_++;
      const std::function<void(int64_t)>* fn = fn_;
      lock.unlock();
      (*fn)(task);
      lock.lock();
      if (++done_ == tasks_) finished_.notify_all();
    }
  }

  void helper() {
    uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
      }
      work();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, finished_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t tasks_ = 0, next_ = 0;
  std::atomic<int64_t> done_{0};         // written under mutex_, also read by the caller's spin
  std::atomic<uint64_t> generation_{0};  // written under mutex_, also read by the helpers' spin
  std::vector<std::thread> helpers_;
};

thread_local int pool_threads = 0;  // the calling thread's, as OpenMP's own thread count is

}  // namespace

void set_pool_threads(int threads) { pool_threads = threads; }

int threads_for_kernels() { return pool_threads > 0 ? pool_threads : omp_get_max_threads(); }

void parallel_tasks(int64_t tasks, bool parallel, const std::function<void(int64_t)>& fn) {
  static std::mutex one_caller;  // one job at a time (kernels are called from one Python thread at a time)
  int threads = threads_for_kernels();
  if (!parallel || threads < 2 || tasks < 2) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  static Pool* pool = new Pool();  // never destroyed: its helpers sleep until the process exits
  std::lock_guard<std::mutex> lock(one_caller);
  pool->run(tasks, fn, threads);
}

}  // namespace bd
