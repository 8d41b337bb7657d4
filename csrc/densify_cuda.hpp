// GPU densify of a CSR block already on the device (compiled only with SCIDIFF_CUDA=ON and a CUDA
// compiler). Same arithmetic as densify_csr; the CPU path stays the default and the reference.
#pragma once

#include <cstdint>

namespace scidiff {

// All pointers are device pointers except where noted. indices are int32 (index_bytes 4) or
// int64 (8); data are float32. The structure (indptr, rows) must be checked on the host first
// (check_csr); column indices are checked on the device and an out-of-range one raises
// FormatError after the kernel, with nothing written for that entry.
void densify_csr_cuda(const int64_t* indptr, const void* indices, int index_bytes, const float* data,
                      const int64_t* rows, int64_t n_out, const int32_t* gene_map, int64_t n_cols, float* out,
                      int64_t n_genes, bool normalize, double target_sum, bool log1p, const float* offset,
                      const float* scale, uintptr_t stream);

}  // namespace scidiff
