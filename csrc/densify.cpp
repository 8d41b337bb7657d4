#include "densify.hpp"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common.hpp"

namespace scidiff {

namespace {

constexpr int64_t kRowsPerTask = 32;

// Normalisation factor of a cell with this total, as log_normalize computes it: float64 division,
// then rounded to float32 before it multiplies the (float32) counts.
inline float cell_factor(double total, const DensifyParams& p) {
  return total > 0 ? static_cast<float>(p.target_sum / total) : 0.0f;
}

inline void finish_row(float* __restrict o, const DensifyParams& p) {
  if (p.offset == nullptr) return;
  const float* __restrict off = p.offset;
  const float* __restrict scale = p.scale;
  for (int64_t g = 0; g < p.n_genes; ++g) o[g] = (o[g] - off[g]) / scale[g];
}

// A cell's total in float64 with four independent sums (exact, in any order, for the integer
// counts that normalisation applies to).
template <class V>
inline double row_total(const V* __restrict v, int64_t n) {
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    a0 += static_cast<double>(v[k]);
    a1 += static_cast<double>(v[k + 1]);
    a2 += static_cast<double>(v[k + 2]);
    a3 += static_cast<double>(v[k + 3]);
  }
  for (; k < n; ++k) a0 += static_cast<double>(v[k]);
  return (a0 + a1) + (a2 + a3);
}

// log1p(count * factor) for the small integer counts of one cell, each computed once: the same
// function on the same input, so the same bits, at a fraction of the calls.
class Log1pCache {
 public:
  static constexpr int kSize = 64;
  void reset() { ++generation_; }
  float operator()(float count, float factor, bool normalize) {
    const float v = normalize ? count * factor : count;
    if (count >= 0.0f && count < static_cast<float>(kSize)) {
      const int c = static_cast<int>(count);
      if (static_cast<float>(c) == count) {
        if (stamp_[c] != generation_) {
          stamp_[c] = generation_;
          value_[c] = std::log1p(v);
        }
        return value_[c];
      }
    }
    return std::log1p(v);
  }

 private:
  uint64_t generation_ = 1;
  uint64_t stamp_[kSize] = {};
  float value_[kSize] = {};
};

template <class I, class V>
void csr_rows(const int64_t* indptr, const I* indices, const V* data, const int64_t* rows, int64_t r0, int64_t r1,
              const DensifyParams& p, float* out) {
  std::vector<int32_t> hit_gene;  // kept entries of the current cell, gathered without branches
  std::vector<float> hit_value;
  Log1pCache log1p_of;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = rows[r];
    const int64_t s = indptr[i], e = indptr[i + 1];
    float* __restrict o = out + r * p.n_genes;
    std::memset(o, 0, sizeof(float) * static_cast<size_t>(p.n_genes));
    const float factor = p.normalize ? cell_factor(row_total(data + s, e - s), p) : 1.0f;
    if (static_cast<int64_t>(hit_gene.size()) < e - s + 1) {
      hit_gene.resize(e - s + 1);
      hit_value.resize(e - s + 1);
    }
    int64_t n = 0;
    for (int64_t k = s; k < e; ++k) {
      const auto c = indices[k];
      if (static_cast<uint64_t>(static_cast<int64_t>(c)) >= static_cast<uint64_t>(p.n_cols))
        throw FormatError("column index " + std::to_string(static_cast<long long>(c)) + " of cell " +
                          std::to_string(i) + " of the block (stored value " + std::to_string(k) +
                          ") is outside [0, " + std::to_string(p.n_cols) + ")");
      const int32_t g = p.gene_map[c];
      hit_gene[n] = g;
      hit_value[n] = static_cast<float>(data[k]);
      n += (g >= 0);
    }
    log1p_of.reset();
    for (int64_t j = 0; j < n; ++j) {
      float v = hit_value[j];
      if (p.log1p) {
        v = log1p_of(v, factor, p.normalize);
      } else if (p.normalize) {
        v *= factor;
      }
      o[hit_gene[j]] += v;  // duplicate entries add up, as scipy's toarray does
    }
    finish_row(o, p);
  }
}

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

template <class Fn>
void with_index_type(DType t, const void* ptr, Fn&& fn) {
  switch (t) {
    case DType::i8: return fn(static_cast<const int8_t*>(ptr));
    case DType::i16: return fn(static_cast<const int16_t*>(ptr));
    case DType::i32: return fn(static_cast<const int32_t*>(ptr));
    case DType::i64: return fn(static_cast<const int64_t*>(ptr));
    case DType::u8: return fn(static_cast<const uint8_t*>(ptr));
    case DType::u16: return fn(static_cast<const uint16_t*>(ptr));
    case DType::u32: return fn(static_cast<const uint32_t*>(ptr));
    case DType::u64: return fn(static_cast<const uint64_t*>(ptr));
    default: break;
  }
  throw FormatError("indices must be integers");
}

template <class Fn>
void with_value_type(DType t, const void* ptr, Fn&& fn) {
  switch (t) {
    case DType::f32: return fn(static_cast<const float*>(ptr));
    case DType::f64: return fn(static_cast<const double*>(ptr));
    case DType::i8: return fn(static_cast<const int8_t*>(ptr));
    case DType::i16: return fn(static_cast<const int16_t*>(ptr));
    case DType::i32: return fn(static_cast<const int32_t*>(ptr));
    case DType::i64: return fn(static_cast<const int64_t*>(ptr));
    case DType::u8: return fn(static_cast<const uint8_t*>(ptr));
    case DType::u16: return fn(static_cast<const uint16_t*>(ptr));
    case DType::u32: return fn(static_cast<const uint32_t*>(ptr));
    case DType::u64: return fn(static_cast<const uint64_t*>(ptr));
  }
  throw FormatError("unsupported dtype");
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
      for_row_tasks(n_out, n_threads, [&](int64_t r0, int64_t r1) { csr_rows(indptr, idx, val, rows, r0, r1, p, out); });
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
