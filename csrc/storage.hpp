// Reading rows of HDF5 datasets straight from the file: pread of the byte ranges given by the
// dataset's storage map (contiguous offset, or the chunk table), inflating deflate chunks and
// undoing the byte shuffle. HDF5 itself is never called: h5py supplies the map at open.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace scidiff {

// An open file, read with pread from any thread.
class File {
 public:
  explicit File(const std::string& path);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  // Read exactly n bytes at offset into dst; a short read (truncated file) is a FormatError.
  void read_exact(uint64_t offset, size_t n, void* dst, const std::string& what) const;
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  uint64_t size_ = 0;
  std::string path_;
};

enum Filter : int { kFilterDeflate = 1, kFilterShuffle = 2 };

// The storage map of one dataset, as h5py reports it. A 1-D dataset has cols == 1.
struct ArrayLayout {
  std::string name;
  size_t elem_size = 0;
  int64_t rows = 0, cols = 1;
  bool chunked = false;
  uint64_t offset = 0;                      // contiguous datasets
  int64_t chunk_rows = 0, chunk_cols = 1;   // chunked datasets
  std::vector<int64_t> chunk_row0, chunk_col0;
  std::vector<uint64_t> chunk_addr, chunk_bytes;
  std::vector<uint32_t> chunk_mask;         // bit i set: filter i was skipped for this chunk
  std::vector<int> filters;                 // pipeline order (as written)
  std::vector<uint8_t> fill;                // one element: the value of unallocated chunks
};

struct Scratch;  // per-thread buffers and inflate state

// One dataset whose rows can be read in parallel. The layout is validated against the file at
// construction: every byte range must lie inside the file.
class Array {
 public:
  Array(std::shared_ptr<File> file, ArrayLayout layout);

  const ArrayLayout& layout() const { return layout_; }
  const File& file() const { return *file_; }
  size_t row_bytes() const { return static_cast<size_t>(layout_.cols) * layout_.elem_size; }

  // One unit of work: a contiguous byte range, or one chunk and the row pieces taken from it.
  struct Piece {
    int64_t row0, row1;  // rows of the array
    uint8_t* dst;        // where row0 goes (rows are row_bytes() apart)
  };
  struct Task {
    const Array* array;
    int64_t chunk;  // index into the chunk table; -1: contiguous; -2: unallocated (fill value)
    int64_t grid_row, grid_col;
    std::vector<Piece> pieces;
  };

  // Append the tasks that copy rows [starts[i], stops[i]) of this array, one range after the
  // other, into out (out_bytes long). Ranges and sizes are checked before anything is planned.
  void plan(const int64_t* starts, const int64_t* stops, size_t n_ranges, uint8_t* out, size_t out_bytes,
            std::vector<Task>& tasks) const;
  void run(const Task& task, Scratch& scratch) const;

  // Whether rows can be read without decoding (contiguous, or chunks without filters).
  bool unfiltered() const { return !layout_.chunked || layout_.filters.empty(); }
  // Read rows [r0, r1) of an unfiltered array into out, on the calling thread.
  void read_inline(int64_t r0, int64_t r1, uint8_t* out) const;

 private:
  // Copy rows of piece p out of a decoded chunk (or part of one) whose first row is src_row0.
  void copy_rows(const uint8_t* src, int64_t src_row0, int64_t grid_col, const Piece& p) const;
  // Read and decode one filtered chunk; the result lives in one of scratch's buffers.
  const std::vector<uint8_t>& decode_chunk(int64_t chunk, Scratch& scratch) const;

  std::shared_ptr<File> file_;
  ArrayLayout layout_;
  int64_t grid_rows_ = 0, grid_cols_ = 0;
  std::vector<int64_t> grid_;  // grid cell -> chunk index or -1
  uint64_t chunk_nbytes_ = 0;  // decoded bytes of one chunk
};

// Run all tasks on n_threads threads (the GIL must already be released).
void run_tasks(const std::vector<Array::Task>& tasks, int n_threads);

bool have_deflate();
const char* deflate_library();

}  // namespace scidiff
