#include <cuda_runtime.h>

#include <string>

#include "common.hpp"
#include "densify_cuda.hpp"

namespace scidiff {

namespace {

constexpr int kThreads = 256;

void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) throw FormatError(std::string("CUDA densify: ") + what + ": " + cudaGetErrorString(rc));
}

// One block per output row: the cell's total (float64 tree sum), zero the row, scatter the kept
// genes, then scale.
template <class I>
__global__ void densify_kernel(const int64_t* indptr, const I* indices, const float* data, const int64_t* rows,
                               const int32_t* gene_map, int64_t n_cols, float* out, int64_t n_genes, bool normalize,
                               double target_sum, bool log1p, const float* offset, const float* scale, int* bad) {
  __shared__ double partial[kThreads];
  const int64_t r = blockIdx.x;
  const int64_t cell = rows[r];
  const int64_t s = indptr[cell], e = indptr[cell + 1];
  float* o = out + r * n_genes;
  double total = 0.0;
  if (normalize)
    for (int64_t k = s + threadIdx.x; k < e; k += blockDim.x) total += static_cast<double>(data[k]);
  partial[threadIdx.x] = total;
  for (int64_t g = threadIdx.x; g < n_genes; g += blockDim.x) o[g] = 0.0f;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  total = partial[0];
  const float factor = total > 0 ? static_cast<float>(target_sum / total) : 0.0f;
  for (int64_t k = s + threadIdx.x; k < e; k += blockDim.x) {
    const int64_t c = static_cast<int64_t>(indices[k]);
    if (c < 0 || c >= n_cols) {
      atomicExch(bad, 1);
      continue;
    }
    const int32_t g = gene_map[c];
    if (g < 0) continue;
    float v = data[k];
    if (normalize) v *= factor;
    if (log1p) v = log1pf(v);
    atomicAdd(o + g, v);
  }
  __syncthreads();
  if (offset != nullptr)
    for (int64_t g = threadIdx.x; g < n_genes; g += blockDim.x) o[g] = (o[g] - offset[g]) / scale[g];
}

}  // namespace

void densify_csr_cuda(const int64_t* indptr, const void* indices, int index_bytes, const float* data,
                      const int64_t* rows, int64_t n_out, const int32_t* gene_map, int64_t n_cols, float* out,
                      int64_t n_genes, bool normalize, double target_sum, bool log1p, const float* offset,
                      const float* scale, uintptr_t stream_handle) {
  if (index_bytes != 4 && index_bytes != 8) throw FormatError("CUDA densify: indices must be int32 or int64");
  if (n_out == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  int* bad = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&bad), sizeof(int), stream), "allocating the error flag");
  check(cudaMemsetAsync(bad, 0, sizeof(int), stream), "clearing the error flag");
  const dim3 grid(static_cast<unsigned>(n_out)), block(kThreads);
  if (index_bytes == 4)
    densify_kernel<int32_t><<<grid, block, 0, stream>>>(indptr, static_cast<const int32_t*>(indices), data, rows,
                                                        gene_map, n_cols, out, n_genes, normalize, target_sum, log1p,
                                                        offset, scale, bad);
  else
    densify_kernel<int64_t><<<grid, block, 0, stream>>>(indptr, static_cast<const int64_t*>(indices), data, rows,
                                                        gene_map, n_cols, out, n_genes, normalize, target_sum, log1p,
                                                        offset, scale, bad);
  check(cudaGetLastError(), "launching the kernel");
  int host_bad = 0;
  check(cudaMemcpyAsync(&host_bad, bad, sizeof(int), cudaMemcpyDeviceToHost, stream), "reading the error flag");
  check(cudaStreamSynchronize(stream), "running the kernel");
  check(cudaFreeAsync(bad, stream), "freeing the error flag");
  if (host_bad)
    throw FormatError("a column index of the batch is outside [0, " + std::to_string(n_cols) +
                      "): the file's indices are corrupt");
}

}  // namespace scidiff
