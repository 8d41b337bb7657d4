// Python bindings of the streaming reader: check arguments, release the GIL, dispatch.
// Reached only through scidiff/data/streaming.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"
#include "densify.hpp"
#include "read_densify.hpp"
#include "storage.hpp"
#if defined(SCIDIFF_HAVE_CUDA)
#include "densify_cuda.hpp"
#endif

namespace py = pybind11;
using namespace scidiff;

namespace {

template <class T>
using Vec = py::array_t<T, py::array::c_style | py::array::forcecast>;

DType dtype_of(const py::dtype& dt, const char* what) {
  if (!dt.attr("isnative").cast<bool>()) throw FormatError(std::string(what) + ": byte order is not native");
  const char kind = dt.kind();
  const auto size = dt.itemsize();
  if (kind == 'f' && size == 4) return DType::f32;
  if (kind == 'f' && size == 8) return DType::f64;
  if (kind == 'i' && size == 1) return DType::i8;
  if (kind == 'i' && size == 2) return DType::i16;
  if (kind == 'i' && size == 4) return DType::i32;
  if (kind == 'i' && size == 8) return DType::i64;
  if (kind == 'u' && size == 1) return DType::u8;
  if (kind == 'u' && size == 2) return DType::u16;
  if (kind == 'u' && size == 4) return DType::u32;
  if (kind == 'u' && size == 8) return DType::u64;
  throw FormatError(std::string(what) + ": unsupported dtype " + py::str(dt).cast<std::string>());
}

DType dtype_of(const py::array& a, const char* what) { return dtype_of(a.dtype(), what); }

void require_contiguous(const py::array& a, const char* what) {
  if (!(a.flags() & py::array::c_style)) throw FormatError(std::string(what) + " must be C-contiguous");
}

float* output_buffer(py::array& out, int64_t rows, int64_t cols) {
  if (!out.dtype().is(py::dtype::of<float>()) || out.ndim() != 2 || out.shape(0) != rows || out.shape(1) != cols)
    throw FormatError("out must be float32 of shape (" + std::to_string(rows) + ", " + std::to_string(cols) + ")");
  require_contiguous(out, "out");
  if (!out.writeable()) throw FormatError("out is read-only");
  return static_cast<float*>(out.mutable_data());
}

DensifyParams params(int64_t n_cols, int64_t n_genes, bool normalize, double target_sum, bool log1p,
                     const py::object& offset, const py::object& scale, Vec<float>& off, Vec<float>& sc) {
  DensifyParams p;
  p.n_cols = n_cols;
  p.n_genes = n_genes;
  p.normalize = normalize;
  p.target_sum = target_sum;
  p.log1p = log1p;
  if (normalize && !(target_sum > 0)) throw FormatError("target_sum must be > 0");
  if (offset.is_none() != scale.is_none()) throw FormatError("pass both offset and scale, or neither");
  if (!offset.is_none()) {
    off = offset.cast<Vec<float>>();
    sc = scale.cast<Vec<float>>();
    if (off.size() != n_genes || sc.size() != n_genes) throw FormatError("offset and scale need one value per gene");
    p.offset = off.data();
    p.scale = sc.data();
  }
  return p;
}

std::shared_ptr<Array> make_array(std::shared_ptr<File> file, std::string name, size_t elem_size, int64_t rows,
                                  int64_t cols, bool chunked, uint64_t offset, int64_t chunk_rows, int64_t chunk_cols,
                                  Vec<int64_t> row0, Vec<int64_t> col0, Vec<uint64_t> addr, Vec<uint64_t> nbytes,
                                  Vec<uint32_t> mask, std::vector<int> filters, py::bytes fill) {
  ArrayLayout L;
  L.name = std::move(name);
  L.elem_size = elem_size;
  L.rows = rows;
  L.cols = cols;
  L.chunked = chunked;
  L.offset = offset;
  L.chunk_rows = chunk_rows;
  L.chunk_cols = chunk_cols;
  L.chunk_row0.assign(row0.data(), row0.data() + row0.size());
  L.chunk_col0.assign(col0.data(), col0.data() + col0.size());
  L.chunk_addr.assign(addr.data(), addr.data() + addr.size());
  L.chunk_bytes.assign(nbytes.data(), nbytes.data() + nbytes.size());
  L.chunk_mask.assign(mask.data(), mask.data() + mask.size());
  L.filters = std::move(filters);
  const std::string f = fill;
  L.fill.assign(f.begin(), f.end());
  return std::make_shared<Array>(std::move(file), std::move(L));
}

// requests: [(Array, starts, stops, out), ...] -> all read together on n_threads threads.
void read_requests(const py::list& requests, int n_threads) {
  std::vector<Array::Task> tasks;
  std::vector<py::object> keep;  // arrays stay referenced while the GIL is released
  for (const auto& item : requests) {
    auto req = item.cast<py::tuple>();
    if (req.size() != 4) throw FormatError("a read request is (array, starts, stops, out)");
    auto array = req[0].cast<std::shared_ptr<Array>>();
    auto starts = req[1].cast<Vec<int64_t>>();
    auto stops = req[2].cast<Vec<int64_t>>();
    auto out = req[3].cast<py::array>();
    if (starts.size() != stops.size()) throw FormatError("starts and stops differ in length");
    require_contiguous(out, "out");
    if (!out.writeable()) throw FormatError("out is read-only");
    array->plan(starts.data(), stops.data(), static_cast<size_t>(starts.size()),
                static_cast<uint8_t*>(out.mutable_data()), static_cast<size_t>(out.nbytes()), tasks);
    keep.push_back(req[0]);
    keep.push_back(out);
  }
  py::gil_scoped_release release;
  run_tasks(tasks, n_threads);
}

void densify_csr_py(Vec<int64_t> indptr, py::array indices, py::array data, Vec<int64_t> rows, Vec<int32_t> gene_map,
                    py::array out, bool normalize, double target_sum, bool log1p, py::object offset, py::object scale,
                    int n_threads) {
  require_contiguous(indices, "indices");
  require_contiguous(data, "data");
  if (indptr.size() < 1) throw FormatError("indptr is empty");
  const int64_t n_genes = out.ndim() == 2 ? out.shape(1) : -1;
  float* dst = output_buffer(out, rows.size(), n_genes);
  Vec<float> off, sc;
  DensifyParams p = params(gene_map.size(), n_genes, normalize, target_sum, log1p, offset, scale, off, sc);
  p.gene_map = gene_map.data();
  const DType it = dtype_of(indices, "indices"), dt = dtype_of(data, "data");
  py::gil_scoped_release release;
  densify_csr(indptr.data(), indptr.size() - 1, indices.data(), it, indices.size(), data.data(), dt, data.size(),
              rows.data(), rows.size(), p, dst, n_threads);
}

void densify_dense_py(py::array x, Vec<int64_t> rows, Vec<int64_t> gene_cols, py::array out, bool normalize,
                      double target_sum, bool log1p, py::object offset, py::object scale, int n_threads) {
  require_contiguous(x, "x");
  if (x.ndim() != 2) throw FormatError("x must be 2-D");
  float* dst = output_buffer(out, rows.size(), gene_cols.size());
  Vec<float> off, sc;
  DensifyParams p = params(x.shape(1), gene_cols.size(), normalize, target_sum, log1p, offset, scale, off, sc);
  p.gene_cols = gene_cols.data();
  const DType dt = dtype_of(x, "x");
  py::gil_scoped_release release;
  densify_dense(x.data(), dt, x.shape(0), rows.data(), rows.size(), p, dst, n_threads);
}

void read_densify_py(const Array& data, py::dtype data_dtype, const Array& indices, py::dtype index_dtype,
                     Vec<int64_t> indptr, Vec<int64_t> starts, Vec<int64_t> stops, Vec<int64_t> dest, Vec<int32_t> gene_map,
                     py::array out, bool normalize, double target_sum, bool log1p, py::object offset, py::object scale,
                     int n_threads) {
  if (starts.size() != stops.size()) throw FormatError("starts and stops differ in length");
  if (indptr.size() < 1) throw FormatError("indptr is empty");
  const int64_t n_out = out.ndim() == 2 ? out.shape(0) : -1, n_genes = out.ndim() == 2 ? out.shape(1) : -1;
  float* dst = output_buffer(out, n_out, n_genes);
  Vec<float> off, sc;
  DensifyParams p = params(gene_map.size(), n_genes, normalize, target_sum, log1p, offset, scale, off, sc);
  p.gene_map = gene_map.data();
  if (data.layout().elem_size != static_cast<size_t>(data_dtype.itemsize()) ||
      indices.layout().elem_size != static_cast<size_t>(index_dtype.itemsize()))
    throw FormatError("dtype sizes differ from the arrays' element sizes");
  const DType dt = dtype_of(data_dtype, "data"), it = dtype_of(index_dtype, "indices");
  py::gil_scoped_release release;
  read_densify_csr(data, dt, indices, it, indptr.data(), indptr.size() - 1, starts.data(), stops.data(),
                   starts.size(), dest.data(), dest.size(), dst, n_out, p, n_threads);
}

}  // namespace

PYBIND11_MODULE(_streaming, m) {
  m.doc() = "scidiff's streaming h5ad reader: pread + inflate of dataset storage, densify to model space";
  auto format_error = py::register_exception<FormatError>(m, "FormatError", PyExc_ValueError);
  // registered after FormatError, so tried first: the more specific type wins
  py::register_exception<ColumnIndexError>(m, "ColumnIndexError", format_error);
  py::register_exception<IOFailure>(m, "IOFailure", PyExc_OSError);

  py::class_<File, std::shared_ptr<File>>(m, "File")
      .def(py::init<const std::string&>(), py::arg("path"))
      .def_property_readonly("size", &File::size)
      .def_property_readonly("path", &File::path);

  py::class_<Array, std::shared_ptr<Array>>(m, "Array")
      .def(py::init(&make_array), py::arg("file"), py::arg("name"), py::arg("elem_size"), py::arg("rows"),
           py::arg("cols"), py::arg("chunked"), py::arg("offset"), py::arg("chunk_rows"), py::arg("chunk_cols"),
           py::arg("chunk_row0"), py::arg("chunk_col0"), py::arg("chunk_addr"), py::arg("chunk_bytes"),
           py::arg("chunk_mask"), py::arg("filters"), py::arg("fill"))
      .def_property_readonly("name", [](const Array& a) { return a.layout().name; })
      .def_property_readonly("row_bytes", &Array::row_bytes);

  m.def("read", &read_requests, py::arg("requests"), py::arg("n_threads"),
        "Read row ranges of several arrays into their output buffers (GIL released).");
  m.def("densify_csr", &densify_csr_py, py::arg("indptr"), py::arg("indices"), py::arg("data"), py::arg("rows"),
        py::arg("gene_map"), py::arg("out"), py::arg("normalize"), py::arg("target_sum"), py::arg("log1p"),
        py::arg("offset"), py::arg("scale"), py::arg("n_threads"),
        "CSR block rows -> normalised, gene-selected, scaled float32 rows (GIL released).");
  m.def("densify_dense", &densify_dense_py, py::arg("x"), py::arg("rows"), py::arg("gene_cols"), py::arg("out"),
        py::arg("normalize"), py::arg("target_sum"), py::arg("log1p"), py::arg("offset"), py::arg("scale"),
        py::arg("n_threads"), "Dense block rows -> normalised, gene-selected, scaled float32 rows.");
  m.def("read_densify_csr", &read_densify_py, py::arg("data"), py::arg("data_dtype"), py::arg("indices"),
        py::arg("index_dtype"), py::arg("indptr"), py::arg("starts"), py::arg("stops"), py::arg("dest"),
        py::arg("gene_map"), py::arg("out"), py::arg("normalize"), py::arg("target_sum"), py::arg("log1p"),
        py::arg("offset"), py::arg("scale"), py::arg("n_threads"),
        "Read cells of an unfiltered CSR matrix and densify them into out rows dest (GIL released).");
  m.def("check_csr", [](Vec<int64_t> indptr, int64_t nnz, Vec<int64_t> rows) {
    if (indptr.size() < 1) throw FormatError("indptr is empty");
    check_csr(indptr.data(), indptr.size() - 1, nnz, rows.data(), rows.size());
  }, py::arg("indptr"), py::arg("nnz"), py::arg("rows"));
  m.attr("deflate") = deflate_library();
#if defined(SCIDIFF_HAVE_CUDA)
  m.attr("has_cuda") = true;
  m.def("densify_csr_cuda",
        [](uintptr_t indptr, uintptr_t indices, int index_bytes, uintptr_t data, uintptr_t rows, int64_t n_out,
           uintptr_t gene_map, int64_t n_cols, uintptr_t out, int64_t n_genes, bool normalize, double target_sum,
           bool log1p, uintptr_t offset, uintptr_t scale, uintptr_t stream) {
          py::gil_scoped_release release;
          densify_csr_cuda(reinterpret_cast<const int64_t*>(indptr), reinterpret_cast<const void*>(indices),
                           index_bytes, reinterpret_cast<const float*>(data), reinterpret_cast<const int64_t*>(rows),
                           n_out, reinterpret_cast<const int32_t*>(gene_map), n_cols, reinterpret_cast<float*>(out),
                           n_genes, normalize, target_sum, log1p, reinterpret_cast<const float*>(offset),
                           reinterpret_cast<const float*>(scale), stream);
        },
        "Device pointers of a CSR batch -> densified rows on the GPU (check_csr on the host first).");
#else
  m.attr("has_cuda") = false;
#endif
  m.attr("hardware_threads") = std::thread::hardware_concurrency();
}
