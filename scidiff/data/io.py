"""Reading and writing .h5ad with errors that name the file, and writes that never leave a
half-written file behind (temporary name in the same folder, then rename)."""
from __future__ import annotations

import os
import tempfile

import anndata as ad


def read_h5ad(path) -> ad.AnnData:
    """``anndata.read_h5ad`` with errors that name the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many kinds for a bad file
        raise ValueError(f"could not read {path!r} as an .h5ad file: {exc}") from exc
    adata.uns["scidiff_source"] = path
    return adata


def atomic_path(path, write) -> str:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it to ``path``.
    On any error the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_h5ad(adata: ad.AnnData, path) -> str:
    """Write ``adata`` to ``path`` atomically."""
    adata.uns.pop("scidiff_source", None)
    return atomic_path(path, adata.write_h5ad)
