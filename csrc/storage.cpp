#include "storage.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <unordered_map>
#include <utility>

#include "common.hpp"

#if defined(SCIDIFF_HAVE_LIBDEFLATE)
#include <libdeflate.h>
#endif
#if defined(SCIDIFF_HAVE_ZLIB)
#include <zlib.h>
#endif

namespace scidiff {

// -- File ------------------------------------------------------------------------------------------

File::File(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw IOFailure(path + ": cannot open: " + std::strerror(errno));
  struct stat st;
  if (::fstat(fd_, &st) != 0) {
    const int err = errno;
    ::close(fd_);
    throw IOFailure(path + ": cannot stat: " + std::strerror(err));
  }
  size_ = static_cast<uint64_t>(st.st_size);
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

void File::read_exact(uint64_t offset, size_t n, void* dst, const std::string& what) const {
  auto* p = static_cast<uint8_t*>(dst);
  size_t done = 0;
  while (done < n) {
    const ssize_t got = ::pread(fd_, p + done, n - done, static_cast<off_t>(offset + done));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw IOFailure(path_ + ": reading " + what + " at byte " + std::to_string(offset + done) +
                      " failed: " + std::strerror(errno));
    }
    if (got == 0)
      throw FormatError(path_ + ": " + what + " needs bytes up to " + std::to_string(offset + n) +
                        " but the file ends at byte " + std::to_string(offset + done) + " (truncated file)");
    done += static_cast<size_t>(got);
  }
}

// -- per-thread decode state ---------------------------------------------------------------------

struct Scratch {
  std::vector<uint8_t> raw, a, b;
#if defined(SCIDIFF_HAVE_LIBDEFLATE)
  libdeflate_decompressor* inflater = nullptr;
#elif defined(SCIDIFF_HAVE_ZLIB)
  z_stream z{};
  bool z_ready = false;
#endif
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
#if defined(SCIDIFF_HAVE_LIBDEFLATE)
    if (inflater) libdeflate_free_decompressor(inflater);
#elif defined(SCIDIFF_HAVE_ZLIB)
    if (z_ready) inflateEnd(&z);
#endif
  }
};

bool have_deflate() {
#if defined(SCIDIFF_HAVE_LIBDEFLATE) || defined(SCIDIFF_HAVE_ZLIB)
  return true;
#else
  return false;
#endif
}

const char* deflate_library() {
#if defined(SCIDIFF_HAVE_LIBDEFLATE)
  return "libdeflate";
#elif defined(SCIDIFF_HAVE_ZLIB)
  return "zlib";
#else
  return "";
#endif
}

// Inflate a zlib stream (HDF5's deflate filter) into exactly out.size() bytes.
static void inflate_exact(const std::vector<uint8_t>& in, std::vector<uint8_t>& out, Scratch& s,
                          const std::string& what) {
#if defined(SCIDIFF_HAVE_LIBDEFLATE)
  if (!s.inflater) s.inflater = libdeflate_alloc_decompressor();
  if (!s.inflater) throw std::bad_alloc();
  size_t got = 0;
  const auto rc = libdeflate_zlib_decompress(s.inflater, in.data(), in.size(), out.data(), out.size(), &got);
  if (rc == LIBDEFLATE_INSUFFICIENT_SPACE)
    throw FormatError(what + " failed to inflate: it holds more than the chunk's " + std::to_string(out.size()) +
                      " bytes");
  if (rc != LIBDEFLATE_SUCCESS) throw FormatError(what + " failed to inflate: corrupt deflate data");
  if (got != out.size())
    throw FormatError(what + " failed to inflate: it holds " + std::to_string(got) + " bytes, the chunk needs " +
                      std::to_string(out.size()));
#elif defined(SCIDIFF_HAVE_ZLIB)
  if (!s.z_ready) {
    std::memset(&s.z, 0, sizeof(s.z));
    if (inflateInit(&s.z) != Z_OK) throw std::bad_alloc();
    s.z_ready = true;
  } else if (inflateReset(&s.z) != Z_OK) {
    throw FormatError(what + ": zlib could not reset its state");
  }
  s.z.next_in = const_cast<Bytef*>(in.data());
  s.z.avail_in = static_cast<uInt>(in.size());
  s.z.next_out = out.data();
  s.z.avail_out = static_cast<uInt>(out.size());
  const int rc = inflate(&s.z, Z_FINISH);
  if (rc == Z_STREAM_END) {
    if (s.z.total_out != out.size())
      throw FormatError(what + " failed to inflate: it holds " + std::to_string(s.z.total_out) +
                        " bytes, the chunk needs " + std::to_string(out.size()));
    return;
  }
  if (rc == Z_BUF_ERROR && s.z.avail_out == 0)
    throw FormatError(what + " failed to inflate: it holds more than the chunk's " + std::to_string(out.size()) +
                      " bytes");
  if (rc == Z_BUF_ERROR) throw FormatError(what + " failed to inflate: the deflate stream is cut short");
  throw FormatError(what + " failed to inflate: " + (s.z.msg ? s.z.msg : "corrupt deflate data"));
#else
  (void)in; (void)out; (void)s;
  throw FormatError(what + " is deflate-compressed but this build has no zlib");
#endif
}

// Undo HDF5's byte shuffle (byte k of every element stored together).
static void unshuffle(const std::vector<uint8_t>& in, std::vector<uint8_t>& out, size_t elem) {
  out.resize(in.size());
  const size_t n = in.size() / elem;
  for (size_t k = 0; k < elem; ++k) {
    const uint8_t* src = in.data() + k * n;
    uint8_t* dst = out.data() + k;
    for (size_t i = 0; i < n; ++i) dst[i * elem] = src[i];
  }
  const size_t tail = in.size() - n * elem;  // bytes that did not make a whole element
  if (tail) std::memcpy(out.data() + n * elem, in.data() + n * elem, tail);
}

// -- Array ----------------------------------------------------------------------------------------

Array::Array(std::shared_ptr<File> file, ArrayLayout layout) : file_(std::move(file)), layout_(std::move(layout)) {
  auto& L = layout_;
  const std::string where = file_->path() + ": " + L.name;
  if (!(L.elem_size == 1 || L.elem_size == 2 || L.elem_size == 4 || L.elem_size == 8))
    throw FormatError(where + ": unsupported element size " + std::to_string(L.elem_size));
  if (L.rows < 0 || L.cols < 0) throw FormatError(where + ": negative shape");
  if (L.fill.empty()) L.fill.assign(L.elem_size, 0);
  if (L.fill.size() != L.elem_size) throw FormatError(where + ": fill value has the wrong size");
  const uint64_t total = checked_mul(checked_mul(L.rows, L.cols, where), L.elem_size, where);
  if (!L.chunked) {
    if (total > 0 && checked_add(L.offset, total, where) > file_->size())
      throw FormatError(where + " is stored at bytes " + std::to_string(L.offset) + "-" +
                        std::to_string(L.offset + total) + " but the file has only " +
                        std::to_string(file_->size()) + " bytes (truncated file)");
    return;
  }
  if (L.chunk_rows < 1 || L.chunk_cols < 1) throw FormatError(where + ": chunk shape must be positive");
  chunk_nbytes_ = checked_mul(checked_mul(L.chunk_rows, L.chunk_cols, where), L.elem_size, where);
  grid_rows_ = (L.rows + L.chunk_rows - 1) / L.chunk_rows;
  grid_cols_ = (L.cols + L.chunk_cols - 1) / L.chunk_cols;
  const uint64_t cells = checked_mul(grid_rows_, grid_cols_, where);
  if (cells > (uint64_t{1} << 31)) throw FormatError(where + ": more than 2^31 chunks");
  grid_.assign(cells, -1);
  const size_t n = L.chunk_addr.size();
  if (L.chunk_row0.size() != n || L.chunk_col0.size() != n || L.chunk_bytes.size() != n || L.chunk_mask.size() != n)
    throw FormatError(where + ": chunk table columns differ in length");
  const uint32_t all_filters = L.filters.empty() ? 0u : ((1u << L.filters.size()) - 1u);
  for (int f : L.filters) {
    if (f != kFilterDeflate && f != kFilterShuffle) throw FormatError(where + ": unsupported filter code");
    if (f == kFilterDeflate && !have_deflate()) throw FormatError(where + ": deflate chunks need zlib");
  }
  for (size_t i = 0; i < n; ++i) {
    const std::string chunk = where + ": chunk " + std::to_string(i);
    const int64_t r0 = L.chunk_row0[i], c0 = L.chunk_col0[i];
    if (r0 < 0 || r0 >= L.rows || r0 % L.chunk_rows || c0 < 0 || c0 >= L.cols || c0 % L.chunk_cols)
      throw FormatError(chunk + " starts at element (" + std::to_string(r0) + ", " + std::to_string(c0) +
                        "), outside the dataset or off the chunk grid");
    if (L.chunk_bytes[i] == 0) throw FormatError(chunk + " is stored with 0 bytes");
    if (checked_add(L.chunk_addr[i], L.chunk_bytes[i], chunk) > file_->size())
      throw FormatError(chunk + " is stored at bytes " + std::to_string(L.chunk_addr[i]) + "-" +
                        std::to_string(L.chunk_addr[i] + L.chunk_bytes[i]) + " but the file has only " +
                        std::to_string(file_->size()) + " bytes (truncated file)");
    if ((L.chunk_mask[i] & all_filters) == all_filters && L.chunk_bytes[i] != chunk_nbytes_)
      throw FormatError(chunk + " is unfiltered but stored with " + std::to_string(L.chunk_bytes[i]) +
                        " bytes; a chunk holds " + std::to_string(chunk_nbytes_));
    int64_t& cell = grid_[(r0 / L.chunk_rows) * grid_cols_ + c0 / L.chunk_cols];
    if (cell != -1) throw FormatError(chunk + " repeats the position of chunk " + std::to_string(cell));
    cell = static_cast<int64_t>(i);
  }
}

void Array::plan(const int64_t* starts, const int64_t* stops, size_t n_ranges, uint8_t* out, size_t out_bytes,
                 std::vector<Task>& tasks) const {
  const auto& L = layout_;
  const std::string where = file_->path() + ": " + L.name;
  const uint64_t rb = row_bytes();
  uint64_t total_rows = 0;
  for (size_t i = 0; i < n_ranges; ++i) {
    if (starts[i] < 0 || starts[i] > stops[i] || stops[i] > L.rows)
      throw FormatError(where + ": row range [" + std::to_string(starts[i]) + ", " + std::to_string(stops[i]) +
                        ") is outside [0, " + std::to_string(L.rows) + ")");
    total_rows += static_cast<uint64_t>(stops[i] - starts[i]);
  }
  if (checked_mul(total_rows, rb, where) != out_bytes)
    throw FormatError(where + ": output buffer holds " + std::to_string(out_bytes) + " bytes, the ranges need " +
                      std::to_string(total_rows * rb));
  uint64_t pos = 0;  // output row of the current range's first row
  if (!L.chunked) {
    const int64_t step = std::max<int64_t>(1, static_cast<int64_t>((1u << 20) / std::max<uint64_t>(rb, 1)));
    for (size_t i = 0; i < n_ranges; ++i) {
      for (int64_t r = starts[i]; r < stops[i]; r += step) {
        const int64_t r1 = std::min(stops[i], r + step);
        tasks.push_back({this, -1, 0, 0, {{r, r1, out + (pos + (r - starts[i])) * rb}}});
      }
      pos += static_cast<uint64_t>(stops[i] - starts[i]);
    }
    return;
  }
  std::unordered_map<int64_t, size_t> by_cell;  // a chunk read by several ranges is decoded once
  for (size_t i = 0; i < n_ranges; ++i) {
    if (starts[i] < stops[i]) {
      for (int64_t gr = starts[i] / L.chunk_rows; gr <= (stops[i] - 1) / L.chunk_rows; ++gr) {
        const int64_t r0 = std::max(starts[i], gr * L.chunk_rows);
        const int64_t r1 = std::min(stops[i], (gr + 1) * L.chunk_rows);
        uint8_t* dst = out + (pos + (r0 - starts[i])) * rb;
        for (int64_t gc = 0; gc < grid_cols_; ++gc) {
          const int64_t cell = gr * grid_cols_ + gc;
          auto it = by_cell.find(cell);
          if (it == by_cell.end()) {
            const int64_t chunk = grid_[cell] >= 0 ? grid_[cell] : -2;
            it = by_cell.emplace(cell, tasks.size()).first;
            tasks.push_back({this, chunk, gr, gc, {}});
          }
          tasks[it->second].pieces.push_back({r0, r1, dst});
        }
      }
    }
    pos += static_cast<uint64_t>(stops[i] - starts[i]);
  }
}

void Array::copy_rows(const uint8_t* src, int64_t src_row0, int64_t grid_col, const Piece& p) const {
  const auto& L = layout_;
  const size_t esz = L.elem_size;
  const int64_t col0 = grid_col * L.chunk_cols;
  const size_t n = static_cast<size_t>(std::min(L.chunk_cols, L.cols - col0)) * esz;
  const size_t src_stride = static_cast<size_t>(L.chunk_cols) * esz;
  for (int64_t r = p.row0; r < p.row1; ++r)
    std::memcpy(p.dst + (r - p.row0) * row_bytes() + col0 * esz, src + (r - src_row0) * src_stride, n);
}

const std::vector<uint8_t>& Array::decode_chunk(int64_t chunk, Scratch& s) const {
  const auto& L = layout_;
  const std::string what = file_->path() + ": " + L.name + " chunk " + std::to_string(chunk) + " (element " +
                           std::to_string(L.chunk_row0[chunk]) + ", byte offset " +
                           std::to_string(L.chunk_addr[chunk]) + ")";
  s.raw.resize(L.chunk_bytes[chunk]);
  file_->read_exact(L.chunk_addr[chunk], s.raw.size(), s.raw.data(), what);
  std::vector<uint8_t>* cur = &s.raw;
  for (size_t k = L.filters.size(); k-- > 0;) {
    if (L.chunk_mask[chunk] & (1u << k)) continue;
    std::vector<uint8_t>* next = (cur == &s.a) ? &s.b : &s.a;
    if (L.filters[k] == kFilterDeflate) {
      next->resize(chunk_nbytes_);
      inflate_exact(*cur, *next, s, what);
    } else {
      unshuffle(*cur, *next, L.elem_size);
    }
    cur = next;
  }
  if (cur->size() != chunk_nbytes_)
    throw FormatError(what + " decodes to " + std::to_string(cur->size()) + " bytes, a chunk holds " +
                      std::to_string(chunk_nbytes_));
  return *cur;
}

void Array::run(const Task& t, Scratch& s) const {
  const auto& L = layout_;
  const size_t rb = row_bytes();
  if (t.chunk == -1) {  // contiguous storage: one pread straight into the output
    for (const auto& p : t.pieces)
      file_->read_exact(L.offset + static_cast<uint64_t>(p.row0) * rb, (p.row1 - p.row0) * rb, p.dst,
                        L.name);
    return;
  }
  const int64_t row_base = t.grid_row * L.chunk_rows;
  if (t.chunk == -2) {  // never written: the fill value
    const int64_t col0 = t.grid_col * L.chunk_cols;
    const int64_t ncols = std::min(L.chunk_cols, L.cols - col0);
    for (const auto& p : t.pieces)
      for (int64_t r = p.row0; r < p.row1; ++r)
        for (int64_t c = 0; c < ncols; ++c)
          std::memcpy(p.dst + (r - p.row0) * rb + (col0 + c) * L.elem_size, L.fill.data(), L.elem_size);
    return;
  }
  const uint32_t all_filters = L.filters.empty() ? 0u : ((1u << L.filters.size()) - 1u);
  if ((L.chunk_mask[t.chunk] & all_filters) == all_filters) {  // stored as is: read only the rows needed
    const size_t src_stride = static_cast<size_t>(L.chunk_cols) * L.elem_size;
    for (const auto& p : t.pieces) {
      const uint64_t at = L.chunk_addr[t.chunk] + static_cast<uint64_t>(p.row0 - row_base) * src_stride;
      const size_t n = static_cast<size_t>(p.row1 - p.row0) * src_stride;
      if (L.chunk_cols == L.cols) {
        file_->read_exact(at, n, p.dst, L.name);
      } else {
        s.a.resize(n);
        file_->read_exact(at, n, s.a.data(), L.name);
        copy_rows(s.a.data(), p.row0, t.grid_col, p);
      }
    }
    return;
  }
  const std::vector<uint8_t>& decoded = decode_chunk(t.chunk, s);
  for (const auto& p : t.pieces) copy_rows(decoded.data(), row_base, t.grid_col, p);
}

void Array::read_inline(int64_t r0, int64_t r1, uint8_t* out) const {
  if (!unfiltered()) throw FormatError(layout_.name + ": read_inline needs an unfiltered array");
  std::vector<Task> tasks;
  plan(&r0, &r1, 1, out, static_cast<size_t>(std::max<int64_t>(r1 - r0, 0)) * row_bytes(), tasks);
  Scratch scratch;
  for (const auto& t : tasks) run(t, scratch);
}

void run_tasks(const std::vector<Array::Task>& tasks, int n_threads) {
  const int workers = std::max(1, std::min<int>(n_threads, static_cast<int>(tasks.size())));
  std::vector<Scratch> scratch(static_cast<size_t>(workers));
  parallel_for(static_cast<int64_t>(tasks.size()), workers,
               [&](int64_t i, int w) { tasks[i].array->run(tasks[i], scratch[w]); });
}

}  // namespace scidiff
