// Cells -> dense float32 rows in the model's gene space: gene subset/reorder, library-size
// normalisation + log1p (scanpy normalize_total + log1p, as scidiff.data.preprocess.log_normalize),
// then (x - offset) / scale (scidiff.data.DataSpec.to_model_space).
#pragma once

#include <cstdint>

namespace scidiff {

struct DensifyParams {
  const int32_t* gene_map = nullptr;   // sparse input: column -> output gene, or -1 to drop
  const int64_t* gene_cols = nullptr;  // dense input: output gene g reads column gene_cols[g]
  int64_t n_cols = 0;                  // columns of the stored matrix (all genes)
  int64_t n_genes = 0;                 // output width
  bool normalize = false;              // divide by the cell's total over all columns, times target_sum
  double target_sum = 1e4;
  bool log1p = false;
  const float* offset = nullptr;       // both null: no scaling
  const float* scale = nullptr;
};

// Dtype tags of the stored arrays.
enum class DType { f32, f64, i8, i16, i32, i64, u8, u16, u32, u64 };

// CSR block (indptr local to the block, indptr[0] may be > 0) -> out[n_out, n_genes] for the
// block rows `rows`. Everything is checked before the first write; an out-of-range column index
// raises before it is used.
void densify_csr(const int64_t* indptr, int64_t n_rows, const void* indices, DType index_type, int64_t n_indices,
                 const void* data, DType data_type, int64_t n_data, const int64_t* rows, int64_t n_out,
                 const DensifyParams& p, float* out, int n_threads);

// Dense block x[n_rows, n_cols] -> out[n_out, n_genes].
void densify_dense(const void* x, DType data_type, int64_t n_rows, const int64_t* rows, int64_t n_out,
                   const DensifyParams& p, float* out, int n_threads);

// Checks of a CSR block's structure (used before a GPU densify as well).
void check_csr(const int64_t* indptr, int64_t n_rows, int64_t nnz, const int64_t* rows, int64_t n_out);

}  // namespace scidiff
