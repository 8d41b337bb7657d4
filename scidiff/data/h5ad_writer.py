"""Write an ``.h5ad`` chunk by chunk, with memory bounded by the chunk, not by the file.

``X`` (dense float rows, or CSR), dense ``layers``, and the ``obs`` index, categorical and numeric
columns grow as cells are appended; ``var`` and ``uns`` are written at the end. The file is
written under a temporary name beside the target and renamed only when complete, so an
interrupted run never leaves a partial file at the target.
The layout follows anndata's on-disk format (``encoding-type`` attributes), so
``anndata.read_h5ad`` opens the result. With ``compression="gzip"`` the sparse arrays' chunks are
compressed on several threads and stored directly (``write_direct_chunk``). The temporary name
is :func:`scidiff.data.io.temporary_beside`'s: a write killed mid-way is cleaned up by the next
write to the same path.
"""
from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pandas as pd

from .io import missing_folders, remove_empty_folders, temporary_beside
from .spec import typed_labels

_STR = h5py.string_dtype("utf-8")


def _attrs(node, kind: str, version: str) -> None:
    node.attrs["encoding-type"] = kind
    node.attrs["encoding-version"] = version


def _write_elem_function():
    import anndata as ad

    return getattr(getattr(ad, "io", None), "write_elem", None) or ad.experimental.write_elem


def _missing(value) -> bool:
    """``None`` or a float NaN: a missing label (code -1)."""
    return value is None or (isinstance(value, (float, np.floating)) and np.isnan(value))


def _numeric(values) -> bool:
    """Whether obs values make a numeric column: a number, a numeric array, or numbers and ``None``."""
    if isinstance(values, (int, float, np.number)) and not isinstance(values, bool):
        return True
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":
        return True
    if isinstance(values, (list, tuple)):
        present = [v for v in values if v is not None]
        return bool(present) and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                                     for v in present)
    return False


class _Growing1D:
    """A resizable 1-D dataset appended in whole chunks; gzip chunks are compressed on threads
    and written with ``write_direct_chunk``."""

    def __init__(self, group, name, dtype, chunk: int, gzip_level: int | None, pool):
        self.dtype, self.chunk, self.level, self.pool = np.dtype(dtype), int(chunk), gzip_level, pool
        kw = {"compression": "gzip", "compression_opts": gzip_level} if gzip_level is not None else {}
        self.ds = group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=self.dtype, chunks=(self.chunk,), **kw)
        self.n = 0  # values appended
        self._pending: list[np.ndarray] = []
        self._pending_n = 0

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if self.level is None:
            self.ds.resize((self.n + len(values),))
            self.ds[self.n:] = values
            self.n += len(values)
            return
        self._pending.append(values)
        self._pending_n += len(values)
        if self._pending_n >= self.chunk:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        buf = np.concatenate(self._pending) if self._pending else np.zeros(0, self.dtype)
        whole = (len(buf) // self.chunk) * self.chunk
        cut = len(buf) if final else whole
        start = self.n
        pieces = [buf[i:i + self.chunk] for i in range(0, cut, self.chunk)]
        if pieces:
            padded = [p if len(p) == self.chunk else np.concatenate([p, np.zeros(self.chunk - len(p), self.dtype)])
                      for p in pieces]
            blobs = list(self.pool.map(lambda p: zlib.compress(p.tobytes(), self.level), padded))
            self.ds.resize((start + cut,))
            for k, blob in enumerate(blobs):
                self.ds.id.write_direct_chunk((start + k * self.chunk,), blob, 0)
        self.n = start + cut
        rest = buf[cut:]
        self._pending, self._pending_n = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        if self.level is not None:
            self._flush(final=True)


class H5adWriter:
    """Append cells to a new ``.h5ad`` at ``path``.

    Args:
        var_names: the genes (columns).
        sparse: write ``X`` as CSR (else a dense 2-D array).
        dtype: dtype of the stored values; ``index_dtype``: of CSR indices.
        compression: ``None`` or ``"gzip"`` (level ``gzip_level``).
        chunk_values: values per chunk of the CSR arrays; ``chunk_cells``: rows per chunk of dense X.
        threads: compression threads.

    Use as a context manager; :meth:`append` adds ``x [n, G]`` (numpy or scipy) with its ``obs``
    columns (labels) and names; leaving the block without an error renames the file into place.
    """

    def __init__(self, path, var_names, *, sparse: bool = False, dtype=np.float32, index_dtype=np.int32,
                 compression: str | None = None, gzip_level: int = 4, chunk_values: int = 49152,
                 chunk_cells: int | None = None, threads: int | None = None):
        if compression not in (None, "gzip"):
            raise ValueError(f"compression must be None or 'gzip', got {compression!r}")
        self.path = os.fspath(path)
        self._made = missing_folders(os.path.dirname(os.path.abspath(self.path)))  # removed by abort() if left empty
        self._tmp = temporary_beside(self.path)
        self.var_names = [str(g) for g in var_names]
        self.n_genes, self.sparse, self.n_cells = len(self.var_names), bool(sparse), 0
        self._closed = False
        self.uns: dict = {}  # written at close
        self.drop_if_empty: set = set()  # obs columns dropped at close when no cell has a value in them
        self.var: pd.DataFrame | None = None  # var columns (gene symbols) beside the names, written at close
        self.label_types: dict = {}  # obs column -> the type its labels are written as (spec.label_type)
        level = gzip_level if compression == "gzip" else None
        self._pool = ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1))
        self.f = h5py.File(self._tmp, "w")
        _attrs(self.f, "anndata", "0.1.0")
        self._dense_rows = chunk_cells or max(1, (1 << 18) // max(self.n_genes, 1))
        self._dense_options = {"compression": "gzip", "compression_opts": gzip_level} if level is not None else {}
        if self.sparse:
            g = self.f.create_group("X")
            _attrs(g, "csr_matrix", "0.1.0")
            self._data = _Growing1D(g, "data", dtype, chunk_values, level, self._pool)
            self._indices = _Growing1D(g, "indices", index_dtype, chunk_values, level, self._pool)
            self._indptr = g.create_dataset("indptr", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(65536,))
        else:
            self._x = self._dense(self.f, "X", dtype)
        obs = self.f.create_group("obs")
        self._obs_index = obs.create_dataset("_index", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(65536,))
        _attrs(self._obs_index, "string-array", "0.2.0")
        # name -> (codes, label -> code) for labels, (values, None) for numbers
        self._columns: dict[str, tuple[h5py.Dataset, dict | None]] = {}
        self._integer: set[str] = set()  # numeric columns given integers by every append: stored as int64 at close
        self._layers: dict[str, h5py.Dataset] = {}

    # -- appending --------------------------------------------------------------------------------
    def append(self, x, obs: dict | None = None, obs_names=None, layers: dict | None = None) -> None:
        """Add cells ``x [n, G]``; ``obs``: column -> labels (one per cell, or one for all; a
        numeric array, or numbers with ``None`` for missing, makes a numeric column); ``obs_names``:
        the cells' names (default ``cell_<row>``); ``layers``: name -> dense ``[n, G]`` (every
        append gives the same layers)."""
        import scipy.sparse as sp

        n = x.shape[0]
        if x.shape[1] != self.n_genes:
            raise ValueError(f"cells have {x.shape[1]} genes, the file {self.n_genes}")
        layers = dict(layers or {})
        if self.n_cells and set(layers) != set(self._layers):
            raise ValueError(f"layers {sorted(layers)} differ from the file's {sorted(self._layers)}")
        for name, values in layers.items():
            values = np.asarray(values.toarray() if sp.issparse(values) else values)
            if values.shape != (n, self.n_genes):
                raise ValueError(f"layer {name!r} has shape {values.shape}, the cells {(n, self.n_genes)}")
            if name not in self._layers:
                self._layers[name] = self._dense(self.f.require_group("layers"), name, values.dtype)
            self._layers[name].resize((self.n_cells + n, self.n_genes))
            self._layers[name][self.n_cells:] = values
        if self.sparse:
            m = sp.csr_matrix(x)
            m.sort_indices()
            self._data.append(m.data)
            self._indices.append(m.indices)
            base = self._indptr[-1]
            self._indptr.resize((self.n_cells + n + 1,))
            self._indptr[self.n_cells + 1:] = base + m.indptr[1:].astype(np.int64)
        else:
            self._x.resize((self.n_cells + n, self.n_genes))
            self._x[self.n_cells:] = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=self._x.dtype)
        names = [f"cell_{i}" for i in range(self.n_cells, self.n_cells + n)] if obs_names is None else list(obs_names)
        if len(names) != n:
            raise ValueError(f"{len(names)} obs names for {n} cells")
        self._obs_index.resize((self.n_cells + n,))
        self._obs_index[self.n_cells:] = np.asarray(names, dtype=object)
        for key in list(self._columns) + [k for k in (obs or {}) if k not in self._columns]:  # columns in order met
            self._append_labels(key, (obs or {}).get(key), n)
        self.n_cells += n

    def _dense(self, group, name: str, dtype) -> h5py.Dataset:
        """A dense ``[0, G]`` matrix growing by rows."""
        out = group.create_dataset(name, shape=(0, self.n_genes), maxshape=(None, self.n_genes), dtype=dtype,
                                   chunks=(self._dense_rows, max(self.n_genes, 1)), **self._dense_options)
        _attrs(out, "array", "0.2.0")
        return out

    def _append_labels(self, key: str, labels, n: int) -> None:
        integers = isinstance(labels, np.ndarray) and labels.dtype.kind in "iu"
        if key not in self._columns and labels is not None and _numeric(labels):
            values = self.f["obs"].create_dataset(key, data=np.full(self.n_cells, np.nan), maxshape=(None,),
                                                  chunks=(65536,))
            _attrs(values, "array", "0.2.0")
            self._columns[key] = (values, None)
            if integers and self.n_cells == 0:
                self._integer.add(key)
        if key in self._columns and self._columns[key][1] is None:  # a numeric column
            if not integers:
                self._integer.discard(key)
            values = self._columns[key][0]
            if labels is None:
                new = np.full(n, np.nan)
            elif not _numeric(labels):
                raise ValueError(f"obs column {key!r} is numeric in the file; got labels {list(labels)[:3]}")
            else:
                new = np.broadcast_to(np.asarray([np.nan if v is None else v for v in np.atleast_1d(labels)],
                                                 np.float64), (n,))
            values.resize((self.n_cells + n,))
            values[self.n_cells:] = new
            return
        if key not in self._columns:
            col = self.f["obs"].create_group(key)
            _attrs(col, "categorical", "0.2.0")
            col.attrs["ordered"] = False
            codes = col.create_dataset("codes", data=np.full(self.n_cells, -1, np.int32), maxshape=(None,),
                                       chunks=(65536,))
            _attrs(codes, "array", "0.2.0")
            self._columns[key] = (codes, {})
        codes, vocab = self._columns[key]
        if labels is None:
            new = np.full(n, -1, np.int32)  # missing in this part
        else:
            labels = [labels] * n if isinstance(labels, (str, int, float)) else list(labels)
            if len(labels) != n:
                raise ValueError(f"obs column {key!r} has {len(labels)} labels for {n} cells")
            new = np.fromiter((-1 if _missing(v) else vocab.setdefault(str(v), len(vocab)) for v in labels),
                              np.int32, n)
        codes.resize((self.n_cells + n,))
        codes[self.n_cells:] = new

    # -- finishing --------------------------------------------------------------------------------
    def close(self, uns: dict | None = None) -> str:
        """Finish the file (``var``, ``uns`` (default :attr:`uns`), categories) and rename it into place."""
        if self._closed:
            return self.path
        write_elem = _write_elem_function()
        try:
            if self.sparse:
                self._data.close()
                self._indices.close()
                self.f["X"].attrs["shape"] = np.array([self.n_cells, self.n_genes], np.int64)
            obs = self.f["obs"]
            obs.attrs["_index"] = "_index"
            if self.drop_if_empty:
                for key in [k for k, (d, vocab) in self._columns.items() if k in self.drop_if_empty
                            and (not vocab if vocab is not None else bool(np.isnan(d[:]).all()))]:
                    del obs[key]
                    del self._columns[key]
            for key in self._integer & set(self._columns):
                self._store_integers(obs, key)
            obs.attrs["column-order"] = np.array(list(self._columns), dtype=object) if self._columns \
                else np.zeros(0, np.float64)
            _attrs(obs, "dataframe", "0.2.0")
            for key, (_, vocab) in self._columns.items():
                if vocab is not None:
                    self._write_categories(obs, key, list(vocab))
            var = pd.DataFrame(index=pd.Index(self.var_names))
            if self.var is not None:
                var = self.var.reindex(var.index)
            write_elem(self.f, "var", var)
            write_elem(self.f, "uns", dict(self.uns if uns is None else uns))
            layers = self.f.require_group("layers")
            _attrs(layers, "dict", "0.1.0")
            for key in ("obsm", "varm", "obsp", "varp"):
                write_elem(self.f, key, {})
            self.f.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        finally:
            self._pool.shutdown()
        self._closed = True
        return self.path

    def _write_categories(self, obs, key: str, labels: list) -> None:
        """The categories of label column ``key``: text, or booleans or numbers where
        :attr:`label_types` gives it a type (``'bool'`` or ``'int64'``, not categorical: the
        values themselves, where no cell misses one), as ``anndata`` writes such a column."""
        kind = self.label_types.get(key)
        values = np.asarray(typed_labels(labels, kind))
        if values.dtype.kind not in "biuf":
            cats = obs[key].create_dataset("categories", data=np.array(labels, dtype=object), dtype=_STR)
            _attrs(cats, "string-array", "0.2.0")
            return
        codes = obs[key]["codes"][:]
        if kind.startswith("category:") or (codes < 0).any():
            _attrs(obs[key].create_dataset("categories", data=values), "array", "0.2.0")
            return
        del obs[key]
        _attrs(obs.create_dataset(key, data=values[codes]), "array", "0.2.0")
        self._columns[key] = (obs[key], None)

    def _store_integers(self, obs, key: str, rows: int = 1 << 20) -> None:
        """Rewrite the numeric column ``key`` (float64 as appended) as int64: every append gave it
        integers, as the input's obs column held them."""
        old = self._columns[key][0]
        new = obs.create_dataset(f"{key}__int64__", shape=old.shape, maxshape=(None,), dtype=np.int64,
                                 chunks=(65536,))
        for start in range(0, len(old), rows):
            new[start:start + rows] = old[start:start + rows].astype(np.int64)
        del obs[key]
        obs.move(new.name, f"{obs.name}/{key}")
        _attrs(obs[key], "array", "0.2.0")
        self._columns[key] = (obs[key], None)

    def abort(self) -> None:
        """Drop the partial file (and the folders made for it, where left empty)."""
        self._closed = True
        try:
            self.f.close()
        except Exception:  # already closed
            pass
        self._pool.shutdown()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)
        remove_empty_folders(self._made)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
