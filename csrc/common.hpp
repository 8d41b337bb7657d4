// Errors and a small parallel loop shared by the streaming reader's sources.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace scidiff {

// Bad file content or bad arguments: surfaces in Python as ValueError.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A stored column index outside the matrix: surfaces in Python as ColumnIndexError (a
// ValueError), which the Python reader turns into a message naming the file, array and cell.
struct ColumnIndexError : FormatError {
  using FormatError::FormatError;
};

// The operating system refused a read: surfaces in Python as OSError.
struct IOFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Run fn(task, worker) for task in [0, n_tasks) on up to n_threads threads (the caller is one of
// them). The first exception thrown by any task is rethrown here after every thread has joined;
// remaining tasks are skipped once a task has failed.
template <class Fn>
void parallel_for(int64_t n_tasks, int n_threads, Fn&& fn) {
  if (n_tasks <= 0) return;
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_tasks)));
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_lock;
  auto body = [&](int worker) {
    for (;;) {
      const int64_t task = next.fetch_add(1);
      if (task >= n_tasks || failed.load()) return;
      try {
        fn(task, worker);
      } catch (...) {
        std::lock_guard<std::mutex> guard(error_lock);
        if (!error) error = std::current_exception();
        failed.store(true);
        return;
      }
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) threads.emplace_back(body, w);
  body(0);
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

// a * b with an overflow check (sizes computed from file metadata).
inline uint64_t checked_mul(uint64_t a, uint64_t b, const std::string& what) {
  if (a != 0 && b > UINT64_MAX / a) throw FormatError(what + ": size overflows 64 bits");
  return a * b;
}

inline uint64_t checked_add(uint64_t a, uint64_t b, const std::string& what) {
  if (b > UINT64_MAX - a) throw FormatError(what + ": offset overflows 64 bits");
  return a + b;
}

}  // namespace scidiff
