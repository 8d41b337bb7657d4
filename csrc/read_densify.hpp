// Fused read + densify of a CSR matrix whose arrays are stored without filters: each thread
// preads a few cells' values and indices into its own cache-sized buffers and densifies them
// straight away, so the values are never read back from main memory.
#pragma once

#include <cstdint>

#include "densify.hpp"
#include "storage.hpp"

namespace scidiff {

// Cells [starts[i], stops[i]) of the matrix (global indptr, n_cells + 1 entries), concatenated,
// go to rows dest[j] of out[n_out, n_genes]. Runs, indptr and dest are checked before any read.
void read_densify_csr(const Array& data, DType data_type, const Array& indices, DType index_type,
                      const int64_t* indptr, int64_t n_cells, const int64_t* starts, const int64_t* stops,
                      int64_t n_runs, const int64_t* dest, int64_t n_dest, float* out, int64_t n_out,
                      const DensifyParams& p, int n_threads);

}  // namespace scidiff
