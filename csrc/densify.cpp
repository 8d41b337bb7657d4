#include "densify.hpp"

#include <cmath>
#include <string>

#include "common.hpp"
#include "densify_kernels.hpp"

namespace scidiff {

namespace {

using namespace kernels;

constexpr int64_t kRowsPerTask = 32;

template <class V>
void dense_rows(const V* x, const int64_t* rows, int64_t r0, int64_t r1, const DensifyParams& p, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const V* row = x + rows[r] * p.n_cols;
    float* o = out + r * p.n_genes;
    const float factor = p.normalize ? cell_factor(row_total(row, p.n_cols), p) : 1.0f;
    for (int64_t g = 0; g < p.n_genes; ++g) {
      float v = static_cast<float>(row[p.gene_cols[g]]);
      if (p.normalize) v *= factor;
      if (p.log1p) v = std::log1p(v);
      o[g] = v;
    }
    finish_row(o, p);
  }
}

template <class Fn>
void for_row_tasks(int64_t n_out, int n_threads, Fn&& fn) {
  const int64_t n_tasks = (n_out + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(n_tasks, n_threads, [&](int64_t t, int) {
    fn(t * kRowsPerTask, std::min(n_out, (t + 1) * kRowsPerTask));
  });
}

void check_params(const DensifyParams& p, bool sparse) {
  if (p.n_genes < 0 || p.n_cols < 0) throw FormatError("negative gene count");
  if (sparse && p.gene_map == nullptr) throw FormatError("densify needs a gene map");
  if (!sparse && p.gene_cols == nullptr && p.n_genes > 0) throw FormatError("densify needs gene columns");
  if ((p.offset == nullptr) != (p.scale == nullptr)) throw FormatError("offset and scale go together");
  if (sparse) {
    for (int64_t c = 0; c < p.n_cols; ++c)
      if (p.gene_map[c] < -1 || p.gene_map[c] >= p.n_genes)
        throw FormatError("gene map entry " + std::to_string(c) + " is outside [-1, " + std::to_string(p.n_genes) + ")");
  } else {
    for (int64_t g = 0; g < p.n_genes; ++g)
      if (p.gene_cols[g] < 0 || p.gene_cols[g] >= p.n_cols)
        throw FormatError("gene column " + std::to_string(p.gene_cols[g]) + " is outside [0, " +
                          std::to_string(p.n_cols) + ")");
  }
}

}  // namespace

void check_csr(const int64_t* indptr, int64_t n_rows, int64_t nnz, const int64_t* rows, int64_t n_out) {
  if (n_rows < 0 || n_out < 0) throw FormatError("negative row count");
  if (indptr[0] < 0) throw FormatError("indptr starts below 0");
  for (int64_t i = 0; i < n_rows; ++i)
    if (indptr[i + 1] < indptr[i])
      throw FormatError("indptr is not monotone: cell " + std::to_string(i) + " of the block ends at " +
                        std::to_string(indptr[i + 1]) + " before it starts at " + std::to_string(indptr[i]));
  if (indptr[n_rows] > nnz)
    throw FormatError("indptr ends at " + std::to_string(indptr[n_rows]) + " but only " + std::to_string(nnz) +
                      " values were read");
  for (int64_t r = 0; r < n_out; ++r)
    if (rows[r] < 0 || rows[r] >= n_rows)
      throw FormatError("row " + std::to_string(rows[r]) + " is outside the block's " + std::to_string(n_rows) +
                        " cells");
}

void densify_csr(const int64_t* indptr, int64_t n_rows, const void* indices, DType index_type, int64_t n_indices,
                 const void* data, DType data_type, int64_t n_data, const int64_t* rows, int64_t n_out,
                 const DensifyParams& p, float* out, int n_threads) {
  check_params(p, true);
  check_csr(indptr, n_rows, std::min(n_indices, n_data), rows, n_out);
  with_index_type(index_type, indices, [&](auto* idx) {
    with_value_type(data_type, data, [&](auto* val) {
      for_row_tasks(n_out, n_threads, [&](int64_t r0, int64_t r1) {
        CellDensifier cell(p);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = rows[r];
          cell.row(idx + indptr[i], val + indptr[i], indptr[i + 1] - indptr[i], i, out + r * p.n_genes);
        }
      });
    });
  });
}

void densify_dense(const void* x, DType data_type, int64_t n_rows, const int64_t* rows, int64_t n_out,
                   const DensifyParams& p, float* out, int n_threads) {
  check_params(p, false);
  for (int64_t r = 0; r < n_out; ++r)
    if (rows[r] < 0 || rows[r] >= n_rows)
      throw FormatError("row " + std::to_string(rows[r]) + " is outside the block's " + std::to_string(n_rows) +
                        " cells");
  with_value_type(data_type, x, [&](auto* val) {
    for_row_tasks(n_out, n_threads, [&](int64_t r0, int64_t r1) { dense_rows(val, rows, r0, r1, p, out); });
  });
}

}  // namespace scidiff
