#include "read_densify.hpp"

#include <algorithm>
#include <string>
#include <vector>

#include "common.hpp"
#include "densify_kernels.hpp"

namespace scidiff {

namespace {

constexpr int64_t kCellsPerTask = 16;
constexpr int64_t kValuesPerTask = 1 << 16;

struct CellRange {
  int64_t first, last, pos;  // cells [first, last) of the file; pos: their index in dest
};

}  // namespace

void read_densify_csr(const Array& data, DType data_type, const Array& indices, DType index_type,
                      const int64_t* indptr, int64_t n_cells, const int64_t* starts, const int64_t* stops,
                      int64_t n_runs, const int64_t* dest, int64_t n_dest, float* out, int64_t n_out,
                      const DensifyParams& p, int n_threads) {
  using namespace kernels;
  if (!data.unfiltered() || !indices.unfiltered())
    throw FormatError("read_densify_csr needs arrays stored without filters");
  if (data.layout().cols != 1 || indices.layout().cols != 1) throw FormatError("data and indices must be 1-D");
  if (p.gene_map == nullptr) throw FormatError("densify needs a gene map");
  for (int64_t c = 0; c < p.n_cols; ++c)
    if (p.gene_map[c] < -1 || p.gene_map[c] >= p.n_genes) throw FormatError("gene map entry outside the genes");
  // every check before the first read or write
  std::vector<CellRange> tasks;
  int64_t pos = 0;
  for (int64_t i = 0; i < n_runs; ++i) {
    if (starts[i] < 0 || starts[i] > stops[i] || stops[i] > n_cells)
      throw FormatError("cell range [" + std::to_string(starts[i]) + ", " + std::to_string(stops[i]) +
                        ") is outside [0, " + std::to_string(n_cells) + ")");
    for (int64_t c = starts[i]; c < stops[i]; ++c)
      if (indptr[c + 1] < indptr[c])
        throw FormatError("indptr is not monotone at cell " + std::to_string(c));
    if (stops[i] > starts[i] && (indptr[starts[i]] < 0 || indptr[stops[i]] > data.layout().rows ||
                                 indptr[stops[i]] > indices.layout().rows))
      throw FormatError("indptr of cells " + std::to_string(starts[i]) + "-" + std::to_string(stops[i]) +
                        " points outside data/indices (truncated dataset)");
    for (int64_t c = starts[i]; c < stops[i];) {
      int64_t e = c + 1;
      while (e < stops[i] && e - c < kCellsPerTask && indptr[e + 1] - indptr[c] <= kValuesPerTask) ++e;
      tasks.push_back({c, e, pos + (c - starts[i])});
      c = e;
    }
    pos += stops[i] - starts[i];
  }
  if (pos != n_dest) throw FormatError("dest needs one row per cell read");
  for (int64_t j = 0; j < n_dest; ++j)
    if (dest[j] < 0 || dest[j] >= n_out)
      throw FormatError("output row " + std::to_string(dest[j]) + " is outside [0, " + std::to_string(n_out) + ")");

  const int workers = std::max(1, std::min<int>(n_threads, static_cast<int>(tasks.size())));
  std::vector<std::vector<uint8_t>> values(workers), index_bytes(workers);
  const size_t vsz = data.layout().elem_size, isz = indices.layout().elem_size;
  parallel_for(static_cast<int64_t>(tasks.size()), workers, [&](int64_t t, int w) {
    const CellRange& r = tasks[t];
    const int64_t a = indptr[r.first], b = indptr[r.last];
    values[w].resize(static_cast<size_t>(b - a) * vsz + 8);
    index_bytes[w].resize(static_cast<size_t>(b - a) * isz + 8);
    data.read_inline(a, b, values[w].data());
    indices.read_inline(a, b, index_bytes[w].data());
    CellDensifier cell(p);
    with_index_type(index_type, index_bytes[w].data(), [&](auto* idx) {
      with_value_type(data_type, values[w].data(), [&](auto* val) {
        for (int64_t c = r.first; c < r.last; ++c) {
          const int64_t k = indptr[c] - a;
          cell.row(idx + k, val + k, indptr[c + 1] - indptr[c], c, out + dest[r.pos + (c - r.first)] * p.n_genes);
        }
      });
    });
  });
}

}  // namespace scidiff
