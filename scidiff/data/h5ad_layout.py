"""Where the cell x gene matrix of an ``.h5ad`` lives, read once with h5py.

At open we read the encoding, shape, dtypes, ``indptr`` (as int64) and, for every array, its
storage map: the byte offset of a contiguous dataset, or the chunk table (offset, size, filter
mask) of a chunked one, plus the filter pipeline. The streaming reader then reads byte ranges
directly; arrays it cannot read that way (other filters, compact or external storage, foreign
byte order) are marked and read through h5py instead. Structural problems (non-monotone
``indptr``, a ``shape`` attribute that disagrees with the arrays, arrays shorter than ``indptr``
says, storage past the end of the file) are errors that name the file and key.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import h5py
import numpy as np

from .gene_symbols import with_var_columns
from .hdf5_guard import check_hdf5_file
from .validate import Site, check_indptr, check_unique_genes, rna_features

FILTER_CODES = {h5py.h5z.FILTER_DEFLATE: 1, h5py.h5z.FILTER_SHUFFLE: 2}  # HDF5 id -> reader code
FILTER_NAMES = {h5py.h5z.FILTER_DEFLATE: "gzip", h5py.h5z.FILTER_SHUFFLE: "shuffle",
                h5py.h5z.FILTER_FLETCHER32: "fletcher32", h5py.h5z.FILTER_SZIP: "szip",
                h5py.h5z.FILTER_NBIT: "nbit", h5py.h5z.FILTER_SCALEOFFSET: "scaleoffset", 32000: "lzf"}

CSC_HELP = ("streaming reads cells as rows, so it needs CSR. Convert the file once, e.g. "
            "`a = anndata.read_h5ad(path); a.X = scipy.sparse.csr_matrix(a.X); a.write_h5ad(new_path)` "
            "(the same for a layer or raw), or write it from scanpy after `adata.X = adata.X.tocsr()`")


@dataclass
class StorageMap:
    """How one dataset is stored. A 1-D dataset is seen as ``(n, 1)``."""

    name: str
    dtype: np.dtype
    rows: int
    cols: int
    chunked: bool = False
    offset: int = 0
    chunk_shape: tuple[int, int] = (0, 1)
    chunk_row0: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    chunk_col0: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    chunk_addr: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    chunk_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    chunk_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    filters: list[int] = field(default_factory=list)
    fill: bytes = b""
    direct: bool = True  # False: read through h5py
    reason: str = ""     # why not direct


@dataclass
class MatrixLayout:
    """The matrix at ``key`` (``X``, ``layers/<name>`` or ``raw/X``) of the file at ``path``."""

    path: str
    key: str
    encoding: str  # "csr" or "dense"
    n_cells: int
    n_genes: int
    var_names: list[str]
    indptr: np.ndarray | None  # int64, csr only
    arrays: dict[str, StorageMap]  # "data" + "indices" (csr) or "x" (dense)
    columns: np.ndarray | None = None  # stored columns read (RNA among other feature types), None: all

    @property
    def where(self) -> str:
        return f"{self.key} of {self.path!r}"

    @property
    def site(self) -> Site:
        """For messages that name the file, the array and the cell (:mod:`scidiff.data.validate`)."""
        return Site(repr(self.path), self.key, False, obs_name_reader(self.path))


def obs_name_reader(path: str):
    """``name(row)``: the obs name of a cell, read from the file when a message needs it."""
    def name(row: int) -> str | None:
        with h5py.File(path, "r") as f:
            obs = f.get("obs")
            if not isinstance(obs, h5py.Group):
                return None
            index = obs.attrs.get("_index", "_index")
            value = obs[index.decode() if isinstance(index, bytes) else str(index)][row]
            return value.decode() if isinstance(value, bytes) else str(value)
    return name


def _chunk_table(ds: h5py.Dataset):
    rows = []
    if hasattr(ds.id, "chunk_iter"):
        ds.id.chunk_iter(lambda s: rows.append((s.chunk_offset, s.byte_offset, s.size, s.filter_mask)))
    else:  # older HDF5: one call per chunk
        for i in range(ds.id.get_num_chunks()):
            s = ds.id.get_chunk_info(i)
            rows.append((s.chunk_offset, s.byte_offset, s.size, s.filter_mask))
    return rows


def storage_map(ds: h5py.Dataset, file_size: int) -> StorageMap:
    """The storage map of ``ds``; ``direct=False`` (with the reason) where it must go through h5py."""
    name = ds.name.lstrip("/")
    if ds.ndim not in (1, 2):
        raise ValueError(f"{name} has {ds.ndim} dimensions; expected 1 or 2")
    rows, cols = (int(ds.shape[0]), 1) if ds.ndim == 1 else (int(ds.shape[0]), int(ds.shape[1]))
    m = StorageMap(name=name, dtype=ds.dtype, rows=rows, cols=cols)
    if ds.dtype.kind not in "fiub" or ds.dtype.itemsize not in (1, 2, 4, 8):
        raise ValueError(f"{name} has dtype {ds.dtype}; expected numbers")
    m.fill = np.asarray(ds.fillvalue if ds.fillvalue is not None else 0, dtype=ds.dtype).tobytes()

    def via_h5py(reason):
        m.direct, m.reason = False, reason
        return m

    if not ds.dtype.isnative:
        return via_h5py("byte order is not native")
    dcpl = ds.id.get_create_plist()
    if dcpl.get_external_count() > 0:
        return via_h5py("stored in external files")
    layout = dcpl.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = ds.id.get_offset()
        if offset is None:  # never written: every element is the fill value
            m.chunked, m.chunk_shape = True, (max(rows, 1), max(cols, 1))
            return m
        m.offset = int(offset)
        if m.offset + rows * cols * ds.dtype.itemsize > file_size:
            raise ValueError(f"{name} is stored up to byte {m.offset + rows * cols * ds.dtype.itemsize} but the "
                             f"file has {file_size} bytes: the file is truncated")
        return m
    if layout != h5py.h5d.CHUNKED:
        return via_h5py("compact or virtual storage")
    for i in range(dcpl.get_nfilters()):
        code = dcpl.get_filter(i)[0]
        if code not in FILTER_CODES:
            return via_h5py(f"{FILTER_NAMES.get(code, f'filter {code}')} compression")
        m.filters.append(FILTER_CODES[code])
    chunks = ds.chunks if ds.ndim == 2 else (ds.chunks[0], 1)
    m.chunked, m.chunk_shape = True, (int(chunks[0]), int(chunks[1]))
    table = _chunk_table(ds)
    n = len(table)
    m.chunk_row0 = np.fromiter((t[0][0] for t in table), np.int64, n)
    m.chunk_col0 = np.fromiter((t[0][1] if ds.ndim == 2 else 0 for t in table), np.int64, n)
    m.chunk_addr = np.fromiter((t[1] for t in table), np.uint64, n)
    m.chunk_bytes = np.fromiter((t[2] for t in table), np.uint64, n)
    m.chunk_mask = np.fromiter((t[3] for t in table), np.uint32, n)
    if n and int((m.chunk_addr + m.chunk_bytes).max()) > file_size:
        raise ValueError(f"{name} has chunks stored past the end of the file ({file_size} bytes): "
                         "the file is truncated")
    return m


def _var(f: h5py.File, group: str, path: str):
    """The ``var`` frame at ``group`` (``raw/var`` with ``var``'s text columns it lacks, as
    :func:`~scidiff.data.gene_symbols.var_of` reads it in memory)."""
    import anndata as ad

    if group not in f:
        raise KeyError(f"{path!r} has no {group!r} (gene names)")
    read_elem = getattr(getattr(ad, "io", None), "read_elem", None) or ad.experimental.read_elem
    var = read_elem(f[group])
    return with_var_columns(var, read_elem(f["var"]) if group == "raw/var" and "var" in f else None)


def _sparse_kind(node) -> str | None:
    enc = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format"))
    if isinstance(enc, bytes):
        enc = enc.decode()
    return {"csr_matrix": "csr", "csc_matrix": "csc", "csr": "csr", "csc": "csc"}.get(enc)


def open_matrix(path, *, layer: str | None = None, use_raw: bool = False) -> MatrixLayout:
    """Read the layout of ``X``, ``layers[layer]`` or ``raw/X`` of the ``.h5ad`` at ``path``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if use_raw and layer:
        raise ValueError("pass either layer= or use_raw=True, not both")
    check_hdf5_file(path)  # damaged metadata can crash or hang libhdf5: probed in a child first
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"could not open {path!r} as an .h5ad (HDF5) file: {exc}") from exc
    with naming_file(path), f:
        return _layout(f, path, layer, use_raw)


@contextmanager
def naming_file(path: str):
    """Errors of h5py or anndata on a damaged file become ``ValueError`` naming the file (the
    CLI's clean exit); errors that already name it pass unchanged."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, (ValueError, KeyError, FileNotFoundError)) and path in str(exc):
            raise
        raise ValueError(f"could not read {path!r} (damaged, or not an .h5ad file): "
                         f"{type(exc).__name__}: {exc}") from exc


def _csr_layout(node: h5py.Group, path: str, key: str, var_names, size: int):
    """``(n_cells, n_genes, indptr, arrays)`` of the CSR group ``node``, its indptr checked."""
    where = f"{key} of {path!r}"
    kind = _sparse_kind(node)
    if kind == "csc":
        raise ValueError(f"{where} is stored as CSC (csc_matrix); {CSC_HELP}")
    if kind != "csr":
        raise ValueError(f"{where} has encoding {node.attrs.get('encoding-type')!r}; expected csr_matrix "
                         "or a dense array")
    for part in ("data", "indices", "indptr"):
        if part not in node:
            raise ValueError(f"{where} has no {part!r} array")
    shape = np.asarray(node.attrs.get("shape", ()), dtype=np.int64).ravel()
    if shape.size != 2 or (shape < 0).any():
        raise ValueError(f"{where} has a bad shape attribute {shape.tolist()}")
    n_cells, n_genes = int(shape[0]), int(shape[1])
    indptr = node["indptr"][...]
    arrays = {"data": storage_map(node["data"], size), "indices": storage_map(node["indices"], size)}
    if arrays["indices"].dtype.kind not in "iu":
        raise ValueError(f"{where}: indices have dtype {arrays['indices'].dtype}; expected integers")
    if arrays["data"].cols != 1 or arrays["indices"].cols != 1:
        raise ValueError(f"{where}: data and indices must be 1-D")
    site = MatrixLayout(path, key, "csr", n_cells, n_genes, var_names, None, arrays).site
    check_indptr(indptr, site, n_major=n_cells, n_data=arrays["data"].rows, n_indices=arrays["indices"].rows)
    return n_cells, n_genes, indptr.astype(np.int64), arrays


def _layout(f: h5py.File, path: str, layer: str | None, use_raw: bool) -> MatrixLayout:
    """The body of :func:`open_matrix` on the open file ``f``."""
    key = "raw/X" if use_raw else f"layers/{layer}" if layer else "X"
    if key not in f:
        if "matrix" in f and "X" not in f:
            raise ValueError(f"{path!r} is a 10x Genomics HDF5 file, not an .h5ad: streaming reads .h5ad only. "
                             "Train without --streaming, or convert it once with "
                             "`scanpy.read_10x_h5(path).write_h5ad(new_path)`")
        if layer:
            have = list(f["layers"]) if "layers" in f else []
            raise KeyError(f"layer {layer!r} is not in {path!r}; layers available: {have or 'none'}")
        raise KeyError(f"{path!r} has no {key!r}" + ("; it has no .raw" if use_raw else ""))
    node = f[key]
    var = _var(f, "raw/var" if use_raw else "var", path)
    var_names = [str(g) for g in var.index]
    size = os.path.getsize(path)
    where = f"{key} of {path!r}"
    if isinstance(node, h5py.Dataset):
        if node.ndim != 2:
            raise ValueError(f"{where} is a {node.ndim}-D array; expected cells x genes")
        (n_cells, n_genes), indptr, encoding = map(int, node.shape), None, "dense"
        arrays = {"x": storage_map(node, size)}
    else:
        n_cells, n_genes, indptr, arrays = _csr_layout(node, path, key, var_names, size)
        encoding = "csr"
    if len(var_names) != n_genes:
        raise ValueError(f"{where} has {n_genes} genes (shape attribute) but var has {len(var_names)} names")
    columns = rna_features(var, where)  # ADTs, guides, peaks left out, as in memory
    if columns is not None:
        var_names = [var_names[i] for i in columns]
    check_unique_genes(var_names, where)
    return MatrixLayout(path=path, key=key, encoding=encoding, n_cells=n_cells, n_genes=n_genes,
                        var_names=var_names, indptr=indptr, arrays=arrays, columns=columns)
