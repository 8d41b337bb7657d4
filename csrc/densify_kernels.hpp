// The per-cell densify kernels shared by densify.cpp and read_densify.cpp (header-only
// templates), and the dispatch from a dtype tag to a typed pointer.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common.hpp"
#include "densify.hpp"

namespace scidiff {
namespace kernels {

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

// Densifies one CSR cell after another, reusing its buffers.
class CellDensifier {
 public:
  explicit CellDensifier(const DensifyParams& p) : p_(p) {}

  // The cell with column indices idx[0, nnz) and values val[0, nnz) -> o[n_genes]. An index
  // outside [0, n_cols) throws before it is used; `cell` only names the cell in that message.
  template <class I, class V>
  void row(const I* __restrict idx, const V* __restrict val, int64_t nnz, int64_t cell, float* __restrict o) {
    const DensifyParams& p = p_;
    std::memset(o, 0, sizeof(float) * static_cast<size_t>(p.n_genes));
    const float factor = p.normalize ? cell_factor(row_total(val, nnz), p) : 1.0f;
    if (static_cast<int64_t>(hit_gene_.size()) < nnz + 1) {
      hit_gene_.resize(nnz + 1);
      hit_value_.resize(nnz + 1);
    }
    int64_t n = 0;  // kept entries, gathered without branches
    for (int64_t k = 0; k < nnz; ++k) {
      const auto c = idx[k];
      if (static_cast<uint64_t>(static_cast<int64_t>(c)) >= static_cast<uint64_t>(p.n_cols))
        throw ColumnIndexError("column index " + std::to_string(static_cast<long long>(c)) + " of cell " +
                               std::to_string(cell) + " (its value " + std::to_string(k) + ") is outside [0, " +
                               std::to_string(p.n_cols) + ")");
      const int32_t g = p.gene_map[c];
      hit_gene_[n] = g;
      hit_value_[n] = static_cast<float>(val[k]);
      n += (g >= 0);
    }
    log1p_of_.reset();
    for (int64_t j = 0; j < n; ++j) {
      float v = hit_value_[j];
      if (p.log1p) {
        v = log1p_of_(v, factor, p.normalize);
      } else if (p.normalize) {
        v *= factor;
      }
      o[hit_gene_[j]] += v;  // duplicate entries add up, as scipy's toarray does
    }
    finish_row(o, p);
  }

 private:
  const DensifyParams& p_;
  std::vector<int32_t> hit_gene_;
  std::vector<float> hit_value_;
  Log1pCache log1p_of_;
};

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

}  // namespace kernels
}  // namespace scidiff
