// scidiff._measure: the detection model's measurement of smooth expression in one pass per value
// (scidiff.models.observation.DetectionModel.measure is the torch reference it must equal bit for
// bit: the same bin count, the same float32 arithmetic in the same order, no fused multiply-adds).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common.hpp"

namespace py = pybind11;

namespace {

template <class T>
using Array = py::array_t<T, py::array::c_style>;  // no forcecast: a wrong dtype is an error, not a copy

void check(const py::array& a, int ndim, const char* what) {
  if (a.ndim() != ndim) throw py::value_error(std::string(what) + ": expected " + std::to_string(ndim) + " dims");
}

// Per value (DetectionModel._between): k = the count of the gene's bin centres (each bin's mean
// smooth value over its training cells) at or below it, less one, within [0, bins - 2];
// k1 = k + 1 (at most bins - 1); w = (value - c_k) / (c_k1 - c_k) clipped to [0, 1] (0 where the
// centres tie; NaN stays NaN). Detected when detect_u is below the rate mixed between bins k and
// k1 by w, at the mix of the two bins' levels, each interpolated between its quantiles at
// level_u * (Q - 1); else 0.
// smooth and out are cell-major [N, G]; the uniforms gene-major [G, N] (as DetectionModel.sample
// draws them). Tiles of 16 genes x all cells: a tile's tables (16 x bins x Q floats) stay in cache
// and each cell's 16 values share one cache line.
void measure(Array<float> smooth, Array<float> detect_u, Array<float> level_u, Array<float> centres,
             Array<float> detection, Array<float> levels, Array<float> out, int n_threads) {
  check(smooth, 2, "smooth");
  check(centres, 2, "centres");
  check(detection, 2, "detection");
  check(levels, 3, "levels");
  const int64_t n = smooth.shape(0), g = smooth.shape(1), bins = detection.shape(1), q = levels.shape(2);
  for (const py::array* a : {&detect_u, &level_u})
    if (a->ndim() != 2 || a->shape(0) != g || a->shape(1) != n)
      throw py::value_error("the uniforms must be gene-major [G, N]");
  if (out.ndim() != 2 || out.shape(0) != n || out.shape(1) != g)
    throw py::value_error("out must have smooth's shape [N, G]");
  if (centres.shape(0) != g || centres.shape(1) != bins || detection.shape(0) != g || levels.shape(0) != g ||
      levels.shape(1) != bins || q < 2 || bins < 1)
    throw py::value_error("centres [G, bins], detection [G, bins] and levels [G, bins, Q >= 2] must agree");
  if (!out.writeable()) throw py::value_error("out is read-only");
  const float *x = smooth.data(), *du = detect_u.data(), *lu = level_u.data(), *c = centres.data();
  const float *rate = detection.data(), *lv = levels.data();
  float* o = out.mutable_data();
  const float scale = static_cast<float>(q - 1);
  constexpr int64_t kTile = 16, kChunk = 256;  // genes x cells held in local, gene-major buffers
  py::gil_scoped_release release;
  scidiff::parallel_for((g + kTile - 1) / kTile, n_threads, [&](int64_t task, int) {
    const int64_t j0 = task * kTile, genes = std::min(g, j0 + kTile) - j0;
    std::vector<float> xt(kTile * kChunk), res(kTile * kChunk);
    std::vector<int32_t> b(kChunk);
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const int64_t cells = std::min(n - i0, kChunk);
      for (int64_t ii = 0; ii < cells; ++ii)  // this chunk's values, gene-major
        for (int64_t jj = 0; jj < genes; ++jj) xt[jj * kChunk + ii] = x[(i0 + ii) * g + j0 + jj];
      for (int64_t jj = 0; jj < genes; ++jj) {
        const int64_t j = j0 + jj;
        const float* value = xt.data() + jj * kChunk;
        const float* centre = c + j * bins;
        std::fill(b.begin(), b.begin() + cells, 0);
        for (int64_t k = 0; k < bins; ++k) {  // the count of centres at or below the value
          const float at = centre[k];
          for (int64_t ii = 0; ii < cells; ++ii) b[ii] += value[ii] >= at;
        }
        const float *d = du + j * n + i0, *l = lu + j * n + i0, *r = rate + j * bins, *t = lv + j * bins * q;
        float* res_j = res.data() + jj * kChunk;
        for (int64_t ii = 0; ii < cells; ++ii) {
          const int64_t k = std::min<int64_t>(std::max<int64_t>(b[ii] - 1, 0), std::max<int64_t>(bins - 2, 0));
          const int64_t k1 = std::min<int64_t>(k + 1, bins - 1);
          const float c0 = centre[k], gap = centre[k1] - c0;
          const float s = (value[ii] - c0) / (gap > 0.0f ? gap : 1.0f);
          const float w = gap > 0.0f ? (s < 0.0f ? 0.0f : (s > 1.0f ? 1.0f : s)) : 0.0f;
          const float p = r[k] + w * (r[k1] - r[k]);
          const float v = l[ii] * scale;
          // v >= 0 (uniforms in [0, 1)), so truncation is the reference's floor, without a libm call
          const int64_t lo = std::min<int64_t>(static_cast<int64_t>(v), q - 2);
          const float frac = v - static_cast<float>(lo);
          const float *at0 = t + k * q + lo, *at1 = t + k1 * q + lo;
          const float l0 = at0[0] + frac * (at0[1] - at0[0]);
          const float l1 = at1[0] + frac * (at1[1] - at1[0]);
          const float level = l0 + w * (l1 - l0);
          res_j[ii] = d[ii] < p ? level : 0.0f;
        }
      }
      for (int64_t ii = 0; ii < cells; ++ii)
        for (int64_t jj = 0; jj < genes; ++jj) o[(i0 + ii) * g + j0 + jj] = res[jj * kChunk + ii];
    }
  });
}

}  // namespace

PYBIND11_MODULE(_measure, m) {
  m.doc() = "The detection model's measurement in one pass (scidiff.models.observation)";
  m.def("measure", &measure, py::arg("smooth"), py::arg("detect_u"), py::arg("level_u"), py::arg("centres"),
        py::arg("detection"), py::arg("levels"), py::arg("out"), py::arg("n_threads"));
}
