"""Stream cells from an ``.h5ad`` on disk without loading ``X``.

The one module that reaches the C++ extension (``scidiff.data._streaming``). Metadata comes from
h5py once at open (:mod:`scidiff.data.h5ad_layout`); the hot path reads byte ranges with
``pread`` from C++ threads (GIL released), inflates gzip chunks in parallel and densifies the
cells straight into the model's space (gene subset, library-size normalisation + log1p, per-gene
scaling) in preallocated float32 buffers. Where the extension is not built, or for arrays it
cannot read directly, h5py + numpy give the same batches (``backend="python"``).

:class:`StreamingLoader` yields the same batch dicts as :class:`~scidiff.data.InMemoryLoader`
(``"x"`` plus one tensor per covariate), block-shuffled and optionally sharded by rank, with the
next batches prepared in a background thread.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .block_order import BlockOrder, runs_to_ids
from .h5ad_layout import MatrixLayout, StorageMap, open_matrix
from .preprocess import dense, gene_columns, log_normalize
from .validate import Site, check_indices, check_indptr

try:  # the compiled reader; absent when the package was installed without building it
    from . import _streaming as _ext
except ImportError:  # pragma: no cover - exercised by installs without a compiler
    _ext = None

_NATIVE_DTYPES = set("fiu")


def _native(dtype) -> bool:
    """Whether the compiled densify reads values of ``dtype`` (integers, float32/64; float16 is
    widened to float32 first)."""
    return dtype.kind in _NATIVE_DTYPES and not (dtype.kind == "f" and dtype.itemsize < 4)


def extension_available() -> bool:
    """Whether the C++ reader was built."""
    return _ext is not None


def cuda_densify_available() -> bool:
    """Whether the extension was built with its CUDA densify (``SCIDIFF_CUDA=ON``)."""
    return _ext is not None and bool(getattr(_ext, "has_cuda", False))


def default_threads() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, min(8, os.cpu_count() or 1))


# -- what densify does to a cell ------------------------------------------------------------------

@dataclass
class Transform:
    """Cells -> model space: keep ``genes`` (in order), normalise counts to ``target_sum`` and
    log1p them when ``normalize``, then ``log1p(expm1(x) * rescale)`` when ``rescale`` is given
    (log1p values normalised to another total than the model's), then ``(x - offset) / scale``
    when ``offset`` is given."""

    genes: list[str]
    gene_cols: np.ndarray  # int64 [G]: stored column of each output gene
    gene_map: np.ndarray   # int32 [n_cols]: output gene of each stored column, or -1
    normalize: bool
    target_sum: float
    offset: np.ndarray | None = None  # float32 [G]
    scale: np.ndarray | None = None
    rescale: float | None = None  # factor on the normalised values of log1p input (counts: in target_sum)

    @classmethod
    def build(cls, var_names, genes, *, counts: bool, target_sum: float | None = 1e4, offset=None, scale=None,
              names=None, rescale: float | None = None):
        """``names``: each gene's name among ``var_names`` where it differs (default ``genes``).
        ``rescale``: the factor by which normalised values are brought to the model's scale (counts
        are normalised to ``target_sum * rescale``, exactly the same)."""
        cols = gene_columns(var_names, genes if names is None else names)
        gene_map = np.full(len(var_names), -1, np.int32)
        gene_map[cols] = np.arange(len(cols), dtype=np.int32)
        if counts and not (target_sum and target_sum > 0):
            raise ValueError(f"counts need a positive target_sum, got {target_sum!r}")
        if rescale is not None and not (np.isfinite(rescale) and rescale > 0):
            raise ValueError(f"rescale must be a positive number, got {rescale!r}")
        if rescale is not None and counts:  # normalisation is linear in its target
            target_sum, rescale = float(target_sum) * float(rescale), None
        off = None if offset is None else np.ascontiguousarray(offset, np.float32)
        sc = None if scale is None else np.ascontiguousarray(scale, np.float32)
        return cls(list(genes), cols, gene_map, bool(counts), float(target_sum or 0.0), off, sc,
                   None if rescale is None else float(rescale))

    @classmethod
    def from_spec(cls, spec, var_names, var=None, rescale: float | None = None) -> "Transform":
        """The transform of a :class:`~scidiff.data.DataSpec` (its genes, normalisation, scaling),
        for a file with ``var_names`` (and ``var``, where genes are named by symbol on one side and
        by ID on the other: :meth:`~scidiff.data.DataSpec.names_in`)."""
        return cls.build(var_names, spec.gene_names, counts=spec.input_kind == "counts",
                         target_sum=spec.target_sum, offset=spec.gene_offset, scale=spec.gene_scale,
                         names=spec.names_in(var_names, var), rescale=rescale)

    def without_scaling(self) -> "Transform":
        return Transform(self.genes, self.gene_cols, self.gene_map, self.normalize, self.target_sum,
                         rescale=self.rescale)

    def before_rescale(self) -> "Transform":
        """What the densify kernels do of this transform: all but ``rescale`` and what follows it
        (:meth:`finish` does that on their output)."""
        return Transform(self.genes, self.gene_cols, self.gene_map, self.normalize, self.target_sum)

    def finish(self, out):
        """``rescale``, offset and scale, in place, on the output of :meth:`before_rescale`
        (float32 numpy array or torch tensor); the same float32 steps as the in-memory path."""
        if isinstance(out, np.ndarray):
            np.expm1(out, out=out)
            out *= np.float32(self.rescale)
            np.log1p(out, out=out)
            if self.offset is not None:
                out -= self.offset
                out /= self.scale
            return out
        out.expm1_().mul_(float(np.float32(self.rescale))).log1p_()
        if self.offset is not None:
            import torch

            device = out.device
            out.sub_(torch.as_tensor(self.offset, device=device)).div_(torch.as_tensor(self.scale, device=device))
        return out

    @property
    def n_genes(self) -> int:
        return len(self.genes)


@dataclass
class RowBlock:
    """Cells read together, in the order of the runs they came from: CSR (``indptr`` local to
    the block, starting at 0) or a dense ``x``. ``ids``: each cell's row in the file."""

    n: int
    indptr: np.ndarray | None = None
    indices: np.ndarray | None = None
    data: np.ndarray | None = None
    x: np.ndarray | None = None
    ids: np.ndarray | None = None
    checked: bool = False  # check_block passed (the Python path checks a block once)

    def to_matrix(self, n_genes: int, site: Site):
        """A scipy CSR matrix (or the dense array) of the block, checked first."""
        if self.x is not None:
            return self.x
        check_block(self, n_genes, site)
        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=(self.n, n_genes))


def check_block(block: RowBlock, n_genes: int, site: Site) -> None:
    """The checks of :mod:`scidiff.data.validate` on a CSR block (a monotone local indptr within
    the values read, column indices inside ``[0, n_genes)``), the cells named by their file rows:
    the same messages as the in-memory reader's."""
    if block.checked:
        return
    rows = block.ids if block.ids is not None else np.arange(block.n)
    check_indptr(block.indptr, site, n_major=block.n, n_data=len(block.data), n_indices=len(block.indices),
                 rows=rows)
    check_indices(block.indptr, block.indices, n_genes, site, rows=rows)
    block.checked = True


# -- reading ---------------------------------------------------------------------------------------

class MatrixReader:
    """Rows of the matrix of one ``.h5ad`` (``X``, ``layers[layer]`` or ``raw/X``).

    ``backend``: ``"native"`` (the C++ extension), ``"python"`` (h5py + numpy) or ``"auto"``
    (native when built). ``n_threads``: threads of the native reader.
    """

    def __init__(self, path, *, layer: str | None = None, use_raw: bool = False, backend: str = "auto",
                 n_threads: int | None = None):
        if backend not in ("auto", "native", "python"):
            raise ValueError(f"backend must be 'auto', 'native' or 'python', got {backend!r}")
        if backend == "native" and _ext is None:
            raise ImportError("the streaming extension scidiff.data._streaming is not built; reinstall with "
                              "`pip install -e .` (needs a C++ compiler and CMake) or use backend='python'")
        self.layout: MatrixLayout = open_matrix(path, layer=layer, use_raw=use_raw)
        self.backend = "native" if backend == "native" or (backend == "auto" and _ext is not None) else "python"
        self.n_threads = int(n_threads or default_threads())
        self._h5 = None
        self._h5_lock = threading.Lock()
        self._arrays = {}
        self._column_map = None  # stored column -> column read, where only some are (RNA among ADTs)
        if self.backend == "native":
            file = _ext.File(self.layout.path)
            for name, m in self.layout.arrays.items():
                if m.direct and not (1 in m.filters and not _ext.deflate):
                    self._arrays[name] = _native_array(file, m)

    # -- facts ----------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.layout.path

    @property
    def n_cells(self) -> int:
        return self.layout.n_cells

    @property
    def var_names(self) -> list[str]:
        return self.layout.var_names

    def default_block_size(self) -> int:
        """Cells per contiguous block: 64, or enough to span about eight chunks of a compressed
        file (a chunk is inflated whole however few of its cells are needed, so short blocks
        waste work at their ends)."""
        m = self.layout.arrays.get("data") or self.layout.arrays["x"]
        if not m.chunked or not m.filters:
            return 64
        if self.layout.encoding == "dense":
            cells_per_chunk = float(m.chunk_shape[0])
        else:
            cells_per_chunk = m.chunk_shape[0] / max(int(self.layout.indptr[-1]) / max(self.n_cells, 1), 1e-9)
        return int(min(1024, max(64, 2 ** int(np.ceil(np.log2(max(8 * cells_per_chunk, 1)))))))

    # -- reading --------------------------------------------------------------------------------
    def _h5py(self):
        import h5py

        if self._h5 is None:
            try:
                self._h5 = h5py.File(self.layout.path, "r")
            except OSError as exc:
                raise ValueError(f"could not open {self.layout.path!r} as an .h5ad (HDF5) file: {exc}") from exc
        return self._h5

    def _read_via_h5py(self, m: StorageMap, starts, stops, out) -> None:
        with self._h5_lock:
            ds = self._h5py()[m.name]
            pos = 0
            for a, b in zip(starts.tolist(), stops.tolist()):
                if b > a:
                    try:
                        if ds.ndim == 1:
                            ds.read_direct(out, np.s_[a:b], np.s_[pos:pos + b - a])
                        else:
                            ds.read_direct(out, np.s_[a:b, :], np.s_[pos:pos + b - a, :])
                    except Exception as exc:  # h5py raises several kinds on a damaged chunk
                        raise ValueError(f"{self.layout.path!r}: reading {m.name} elements {a}-{b} failed: "
                                         f"{exc}") from exc
                pos += b - a

    def _read_arrays(self, requests) -> None:
        """``requests``: ``[(array name, starts, stops, out)]``; native arrays in one parallel call."""
        native = [(self._arrays[n], s, e, o) for n, s, e, o in requests if n in self._arrays]
        if native:
            _ext.read(native, self.n_threads)
        for name, starts, stops, out in requests:
            if name not in self._arrays:
                self._read_via_h5py(self.layout.arrays[name], starts, stops, out)

    def read(self, runs, scratch: dict | None = None) -> RowBlock:
        """The cells of ``runs`` (``[k, 2]`` cell-id ranges), concatenated in order. With a
        ``scratch`` dict the arrays are views of buffers kept there and reused by the next call
        (no fresh pages to fault in); the block is then valid until that call."""
        runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
        if len(runs) and (runs[:, 0].min() < 0 or runs[:, 1].max() > self.n_cells
                          or (runs[:, 1] < runs[:, 0]).any()):
            raise ValueError(f"{self.layout.where}: cell ranges outside [0, {self.n_cells})")
        starts, stops = np.ascontiguousarray(runs[:, 0]), np.ascontiguousarray(runs[:, 1])
        n = int((stops - starts).sum())
        L = self.layout
        if L.encoding == "dense":
            m = L.arrays["x"]
            x = _buffer(scratch, "x", n * L.n_genes, m.dtype).reshape(n, L.n_genes)
            self._read_arrays([("x", starts, stops, x)])
            return RowBlock(n, x=x if L.columns is None else np.ascontiguousarray(x[:, L.columns]))
        ip = L.indptr
        ids = runs_to_ids(runs)
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(ip[ids + 1] - ip[ids], out=indptr[1:])
        el_starts, el_stops = ip[starts], ip[stops]
        data = _buffer(scratch, "data", int(indptr[-1]), L.arrays["data"].dtype)
        indices = _buffer(scratch, "indices", int(indptr[-1]), L.arrays["indices"].dtype)
        self._read_arrays([("data", el_starts, el_stops, data), ("indices", el_starts, el_stops, indices)])
        block = RowBlock(n, indptr=indptr, indices=indices, data=data, ids=ids)
        return block if L.columns is None else self._rna_only(block)

    def _rna_only(self, block: RowBlock) -> RowBlock:
        """``block`` on the stored columns the layout reads (its RNA features, :attr:`MatrixLayout.columns`),
        renumbered: checked first against the file's full width."""
        L = self.layout
        check_block(block, L.n_genes, L.site)
        if self._column_map is None:
            self._column_map = np.full(L.n_genes, -1, np.int64)
            self._column_map[L.columns] = np.arange(len(L.columns))
        new = self._column_map[block.indices]
        keep = new >= 0
        kept = np.r_[0, np.cumsum(keep, dtype=np.int64)]
        return RowBlock(block.n, indptr=kept[block.indptr], indices=new[keep].astype(block.indices.dtype),
                        data=block.data[keep], ids=block.ids, checked=True)

    @property
    def fused(self) -> bool:
        """Whether :meth:`read_densify` applies: the native reader on CSR arrays stored without
        filters (cells are densified while their bytes are still in cache)."""
        L = self.layout
        return (self.backend == "native" and L.encoding == "csr" and "data" in self._arrays and L.columns is None
                and "indices" in self._arrays and not L.arrays["data"].filters
                and not L.arrays["indices"].filters and _native(L.arrays["data"].dtype))

    def read_densify(self, runs, dest, transform: Transform, out: np.ndarray) -> np.ndarray:
        """Read the cells of ``runs`` and densify cell ``j`` (of the runs concatenated) into
        ``out[dest[j]]``, in one pass (:attr:`fused` readers only)."""
        runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
        if transform.rescale is not None:
            return transform.finish(self.read_densify(runs, dest, transform.before_rescale(), out))
        t, L = transform, self.layout
        try:
            _ext.read_densify_csr(self._arrays["data"], L.arrays["data"].dtype, self._arrays["indices"],
                                  L.arrays["indices"].dtype, L.indptr, np.ascontiguousarray(runs[:, 0]),
                                  np.ascontiguousarray(runs[:, 1]), np.ascontiguousarray(dest, dtype=np.int64),
                                  t.gene_map, out, t.normalize, t.target_sum or 1.0, t.normalize, t.offset, t.scale,
                                  self.n_threads)
        except ValueError as exc:
            if _ext is not None and isinstance(exc, _ext.ColumnIndexError):
                self.check(self.read(runs))  # names the file, the array and the cell
            raise ValueError(f"{L.where}: {exc}") from exc
        return out

    def check(self, block: RowBlock) -> None:
        """:func:`check_block` against this file (messages name it, the array and the cell)."""
        if block.x is None:
            check_block(block, self.layout.n_genes, self.layout.site)

    def read_matrix(self, runs):
        """The cells of ``runs`` as a scipy CSR matrix (or a dense array), values as stored."""
        return self.read(runs).to_matrix(len(self.layout.var_names), self.layout.site)

    # -- densify --------------------------------------------------------------------------------
    def densify(self, block: RowBlock, rows, transform: Transform, out: np.ndarray | None = None) -> np.ndarray:
        """Block rows ``rows`` -> ``out [len(rows), G]`` float32 in ``transform``'s space."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows), transform.n_genes), np.float32)
        if transform.rescale is not None:
            return transform.finish(self.densify(block, rows, transform.before_rescale(), out))
        if self.backend == "python":
            self.check(block)
            self._densify_python(block, rows, transform, out)
            return out
        try:
            self._densify_native(block, rows, transform, out)
        except ValueError as exc:
            if isinstance(exc, _ext.ColumnIndexError):
                self.check(block)  # names the file, the array and the cell
            raise ValueError(f"{self.layout.where}: {exc}") from exc
        return out

    def _densify_native(self, block, rows, t, out):
        args = (out, t.normalize, t.target_sum or 1.0, t.normalize, t.offset, t.scale, self.n_threads)
        if block.x is not None:
            x = block.x if _native(block.x.dtype) else block.x.astype(np.float32)
            _ext.densify_dense(x, rows, t.gene_cols, *args)
        else:
            data = block.data if _native(block.data.dtype) else block.data.astype(np.float32)
            _ext.densify_csr(block.indptr, block.indices, data, rows, t.gene_map, *args)

    def _densify_python(self, block, rows, t, out):
        if len(rows) and (rows.min() < 0 or rows.max() >= block.n):
            raise ValueError(f"{self.layout.where}: row outside the block")
        if block.x is not None:
            m = block.x[rows]
        else:
            data = block.data if _native(block.data.dtype) else block.data.astype(np.float32)  # scipy has no float16
            m = sp.csr_matrix((data, block.indices, block.indptr), shape=(block.n, self.layout.n_genes))[rows]
        if t.normalize:
            m, _ = log_normalize(m, t.target_sum)
        x = dense(m[:, t.gene_cols])
        if t.offset is not None:
            x = ((x - t.offset) / t.scale).astype(np.float32)
        out[...] = x

    def close(self) -> None:
        self._arrays = {}
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _buffer(scratch: dict | None, name: str, n: int, dtype) -> np.ndarray:
    """``n`` values of ``dtype``: fresh, or a view of a buffer kept in ``scratch``."""
    if scratch is None:
        return np.empty(n, dtype)
    buf = scratch.get(name)
    if buf is None or buf.dtype != dtype or buf.size < n:
        buf = scratch[name] = np.empty(int(n * 1.25) + 1024, dtype)
    return buf[:n]


def _native_array(file, m: StorageMap):
    return _ext.Array(file, m.name, m.dtype.itemsize, m.rows, m.cols, m.chunked, m.offset, m.chunk_shape[0],
                      m.chunk_shape[1], m.chunk_row0, m.chunk_col0, m.chunk_addr, m.chunk_bytes, m.chunk_mask,
                      list(m.filters), m.fill)


# -- batches ---------------------------------------------------------------------------------------

class CodedCovariate:
    """A per-cell covariate stored as a table of distinct rows plus each cell's row number (e.g.
    multi-hot perturbations): memory grows with the labels, not with the cells' table width."""

    def __init__(self, table: np.ndarray, index: np.ndarray):
        self.table, self.index = np.asarray(table), np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, cells):
        return self.table[self.index[cells]]


class _BufferPool:
    """Reusable float32 batch buffers (pinned when asked). A buffer is handed out again only once
    nothing else refers to it (every tensor made from it is gone)."""

    def __init__(self, n_genes: int, pin: bool):
        self.n_genes, self.pin, self._buffers = n_genes, pin, {}
        probe = [np.empty(0)]
        self._free = sys.getrefcount(probe[0])  # the count of an array only the pool holds

    def take(self, rows: int) -> np.ndarray:
        pool = self._buffers.setdefault(rows, [])
        for i in range(len(pool)):
            if sys.getrefcount(pool[i]) == self._free:
                return pool[i]
        if self.pin:
            import torch

            buf = torch.empty((rows, self.n_genes), dtype=torch.float32, pin_memory=True).numpy()
        else:
            buf = np.empty((rows, self.n_genes), np.float32)
        pool.append(buf)
        return buf


class _CudaDensify:
    """Densify on the GPU from the sparse block (extension built with ``SCIDIFF_CUDA=ON``)."""

    def __init__(self, reader: MatrixReader, transform: Transform, device):
        import torch

        if reader.layout.encoding != "csr":
            raise ValueError("the CUDA densify reads CSR matrices; dense X densifies on the CPU")
        self.whole = transform  # rescale, offset and scale after the kernel where it rescales
        transform = transform.before_rescale() if transform.rescale is not None else transform
        self.torch, self.reader, self.t, self.device = torch, reader, transform, torch.device(device)
        self.gene_map = torch.from_numpy(transform.gene_map).to(self.device)
        self.offset = None if transform.offset is None else torch.from_numpy(transform.offset).to(self.device)
        self.scale = None if transform.scale is None else torch.from_numpy(transform.scale).to(self.device)

    def load(self, block: RowBlock) -> None:
        torch = self.torch
        n_genes = self.reader.layout.n_genes
        self.reader.check(block)  # structure and column indices, before the GPU reads them
        idx = block.indices if block.indices.dtype in (np.int32, np.int64) else block.indices.astype(
            np.int64 if n_genes >= 2**31 else np.int32)
        self.block_n = block.n
        self.indptr = torch.from_numpy(block.indptr).to(self.device)
        self.indices = torch.from_numpy(np.ascontiguousarray(idx)).to(self.device)
        self.data = torch.from_numpy(np.ascontiguousarray(block.data, dtype=np.float32)).to(self.device)

    def __call__(self, rows: np.ndarray):
        torch = self.torch
        if len(rows) and (rows.min() < 0 or rows.max() >= self.block_n):
            raise ValueError("row outside the block")
        rows_t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.device)
        out = torch.empty((len(rows), self.t.n_genes), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        _ext.densify_csr_cuda(self.indptr.data_ptr(), self.indices.data_ptr(), self.indices.element_size(),
                              self.data.data_ptr(), rows_t.data_ptr(), len(rows), self.gene_map.data_ptr(),
                              len(self.t.gene_map), out.data_ptr(), self.t.n_genes, self.t.normalize,
                              self.t.target_sum or 1.0, self.t.normalize,
                              0 if self.offset is None else self.offset.data_ptr(),
                              0 if self.scale is None else self.scale.data_ptr(), stream)
        return self.whole.finish(out) if self.whole.rescale is not None else out


class _End:
    pass


class _Failure:
    def __init__(self, exc):
        self.exc = exc


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; returns whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _in_background(make, maxsize: int, name: str):
    """Iterate the generator ``make(stop)`` in a daemon thread, at most ``maxsize`` items ahead.
    Its exceptions are raised here; closing this generator stops and joins the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
    stop = threading.Event()

    def run():
        it = make(stop)
        try:
            for item in it:
                if not _put(q, item, stop):
                    return
            _put(q, _End(), stop)
        except BaseException as exc:  # handed to the consumer, raised there
            _put(q, _Failure(exc), stop)
        finally:
            it.close()

    worker = threading.Thread(target=run, daemon=True, name=name)
    worker.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()


class StreamingLoader:
    """Batch dicts streamed from disk, exactly as :class:`~scidiff.data.InMemoryLoader` yields
    them: ``{"x": FloatTensor[B, G], <covariate>: LongTensor[B] (or FloatTensor), ...}``.

    Args:
        reader: a :class:`MatrixReader`; transform: what densify does (:meth:`Transform.from_spec`).
        covariates: name -> array over all cells of the file (codes or values).
        cells: the cells to visit (sorted ids or ``[k, 2]`` runs); all cells by default.
        block_size: cells per contiguous block (default: :meth:`MatrixReader.default_block_size`).
        fetch_batches: batches read together and shuffled in memory.
        prefetch: batches prepared ahead in a background thread (0: none, all in the caller).
        rank, world_size: this process's shard (disjoint and covering across ranks).
        return_index: add ``"cell_index"`` (the cells' row numbers in the file) to each batch.
        pin_memory: pinned host buffers (default: when CUDA is available).
        densify_device: ``"cpu"`` or a CUDA device (needs the CUDA build of the extension).

    Each ``iter()`` is one epoch; epochs advance by themselves, or set one with :meth:`set_epoch`
    (all ranks must use the same epoch).
    """

    def __init__(self, reader: MatrixReader, transform: Transform, covariates: dict | None = None, cells=None, *,
                 batch_size: int = 256, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 block_size: int | None = None, fetch_batches: int = 8, prefetch: int = 16, rank: int = 0,
                 world_size: int = 1, return_index: bool = False, pin_memory: bool | None = None,
                 densify_device="cpu"):
        import torch

        self.reader, self.transform = reader, transform
        self.covariates = {k: v if isinstance(v, CodedCovariate) else np.asarray(v)
                           for k, v in (covariates or {}).items()}
        for k, v in self.covariates.items():
            if len(v) != reader.n_cells:
                raise ValueError(f"covariate {k!r} has {len(v)} values for {reader.n_cells} cells")
        runs = np.array([[0, reader.n_cells]], np.int64) if cells is None else cells
        self.order = BlockOrder(runs, batch_size=batch_size, block_size=block_size or reader.default_block_size(),
                                fetch_batches=fetch_batches, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                rank=rank, world_size=world_size)
        self.batch_size, self.prefetch, self.return_index = batch_size, int(prefetch), return_index
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.densify_device = torch.device(densify_device)
        if self.densify_device.type == "cuda" and not cuda_densify_available():
            raise ValueError("densify_device='cuda' needs the extension built with SCIDIFF_CUDA=ON and a GPU")
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order for the next iteration (the same on every rank)."""
        self.epoch = int(epoch)

    def _blocks(self, epoch: int, stop: threading.Event | None = None, ring: int = 3):
        """``(group, block)`` in order; blocks reuse ``ring`` sets of read buffers, so at most
        ``ring - 2`` blocks may wait between this stage and the next."""
        scratch = [{} for _ in range(ring)]
        for i, group in enumerate(self.order.groups(epoch)):
            if stop is not None and stop.is_set():
                return
            yield group, self.reader.read(group.runs, scratch[i % ring])

    def _batches(self, blocks, stop: threading.Event | None = None):
        """Batch dicts from ``(group, block)`` pairs."""
        import torch

        gpu = _CudaDensify(self.reader, self.transform, self.densify_device) \
            if self.densify_device.type == "cuda" else None
        pool = _BufferPool(self.transform.n_genes, self.pin_memory)
        try:
            for group, block in blocks:
                ids = group.cell_ids
                if gpu is not None:
                    gpu.load(block)
                for rows in group.batches:
                    if stop is not None and stop.is_set():
                        return
                    if gpu is not None:
                        x = gpu(rows)
                    else:
                        x = torch.from_numpy(self.reader.densify(block, rows, self.transform,
                                                                 out=pool.take(len(rows))))
                    yield self._batch(x, ids[rows])
        finally:
            if hasattr(blocks, "close"):
                blocks.close()

    def _batch(self, x, cells: np.ndarray) -> dict:
        """The batch dict of densified rows ``x`` for file rows ``cells``: ``"x"``, each
        covariate's codes and, with ``return_index``, the rows themselves."""
        import torch

        batch = {"x": x}
        for k, v in self.covariates.items():
            batch[k] = torch.from_numpy(np.ascontiguousarray(v[cells]))
        if self.return_index:
            batch["cell_index"] = torch.from_numpy(cells)
        return batch

    def _fused_batches(self, epoch: int, stop: threading.Event | None = None):
        """Batch dicts read and densified in one pass per fetch group (uncompressed CSR): the
        group lands in one buffer, permuted, and each batch is a slice of it."""
        import torch

        pool = _BufferPool(self.transform.n_genes, self.pin_memory)
        for group in self.order.groups(epoch):
            if stop is not None and stop.is_set():
                return
            order = np.concatenate(group.batches) if group.batches else np.zeros(0, np.int64)
            dest = np.empty(len(order), np.int64)
            dest[order] = np.arange(len(order))
            out = self.reader.read_densify(group.runs, dest, self.transform, pool.take(len(order)))
            ids, start = group.cell_ids, 0
            for rows in group.batches:
                yield self._batch(torch.from_numpy(out[start:start + len(rows)]), ids[rows])
                start += len(rows)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        fused = self.reader.fused and self.densify_device.type == "cpu"
        if self.prefetch <= 0:
            yield from (self._fused_batches(epoch) if fused else self._batches(self._blocks(epoch)))
            return
        if fused:
            yield from _in_background(lambda stop: self._fused_batches(epoch, stop), self.prefetch, "scidiff-read")
            return
        # two stages, each in its own thread (the C++ work releases the GIL): reading the next
        # fetch group overlaps densifying the current one
        blocks = _in_background(lambda stop: self._blocks(epoch, stop), 1, "scidiff-read")
        yield from _in_background(lambda stop: self._batches(blocks, stop), self.prefetch, "scidiff-densify")
