"""Reading and writing .h5ad with errors that name the file, and writes that never leave a
half-written file behind (temporary name in the same folder, then rename).

:func:`read_h5ad` also reads 10x Genomics HDF5 (``.h5``, the ``matrix`` group) and checks every
sparse matrix it loads (``X``, each layer, ``raw.X``) before scipy touches it
(:mod:`scidiff.data.validate`).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys

import anndata as ad

from .hdf5_guard import check_hdf5_file
from .validate import check_sparse, rna_features

_TMP = re.compile(r"^\.tmp-(\d+)-([0-9a-f]+)\.(.+)$")


def user_path(path) -> str:
    """``path`` (text or a path object) as text with ``~`` the home folder, as pandas and scanpy
    read it: every file scidiff reads or writes goes through it (``'~/run'`` was otherwise a folder
    named ``~``, or no such file)."""
    return os.path.expanduser(os.fspath(path))


def _is_10x_h5(path: str) -> bool:
    """Whether ``path`` is a 10x Genomics HDF5 matrix (v3: a ``matrix`` group; v2: a group per
    genome holding ``barcodes``) rather than an .h5ad."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "X" in f or "obs" in f:
                return False
            return "matrix" in f or any(isinstance(g, h5py.Group) and "barcodes" in g for g in f.values())
    except Exception:  # not HDF5 at all: read_h5ad says so
        return False


def _read_10x(path: str) -> ad.AnnData:
    """A 10x HDF5 file through scanpy, its Gene Expression features alone (others left out with a
    warning); duplicated gene symbols are made unique (scanpy's convention), said in one line on stderr."""
    import scanpy as sc

    try:
        adata = sc.read_10x_h5(path, gex_only=False)  # gex_only=True drops ADTs, guides, peaks unsaid
    except Exception as exc:
        raise ValueError(f"could not read {path!r} as a 10x Genomics HDF5 file: {exc}") from exc
    rna = rna_features(adata.var, repr(path))  # one warning naming the other feature types
    if rna is not None:
        adata = adata[:, rna].copy()
    dup = int(adata.var_names.duplicated().sum())
    if dup:
        adata.var_names_make_unique()
        print(f"scidiff: {path!r}: {dup} duplicated gene symbol(s) of the 10x file made unique with "
              "var_names_make_unique() (e.g. 'GENE' -> 'GENE-1')", file=sys.stderr)
    return adata


_COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip -k {path}"), b"PK\x03\x04": ("zip", "unzip {path}")}


def _check_not_compressed(path: str) -> None:
    """Refuse a compressed file (GEO's ``.h5ad.gz``) with how to decompress it: HDF5 reads only the
    file itself, and libhdf5's own message would be ``file signature not found``."""
    with open(path, "rb") as f:
        magic = f.read(4)
    for prefix, (kind, command) in _COMPRESSED.items():
        if magic.startswith(prefix):
            raise ValueError(f"{path!r} is {kind}-compressed, not an .h5ad or 10x .h5 file itself: decompress it "
                             f"first (`{command.format(path=path)}`) and pass the file it holds")


def check_matrices(adata: ad.AnnData, source: str) -> None:
    """Check every sparse matrix of ``adata`` (``X``, layers, ``raw.X``) (:func:`check_sparse`)."""
    check_sparse(adata.X, source, "X", adata.obs_names, adata.var_names)
    for name in adata.layers:
        check_sparse(adata.layers[name], source, f"layers/{name}", adata.obs_names, adata.var_names)
    if adata.raw is not None:
        check_sparse(adata.raw.X, source, "raw/X", adata.obs_names, adata.raw.var_names)


def read_h5ad(path) -> ad.AnnData:
    """``anndata.read_h5ad`` (or scanpy's 10x reader for a 10x ``.h5``) with errors that name the
    file, and every sparse matrix checked. ``~`` is the home folder, as pandas and scanpy read it."""
    path = user_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder, not an .h5ad file")
    _check_not_compressed(path)
    check_hdf5_file(path)  # damaged metadata can crash or hang libhdf5: probed in a child first
    if _is_10x_h5(path):
        adata = _read_10x(path)
    else:
        try:
            adata = ad.read_h5ad(path)
        except Exception as exc:  # h5py/anndata raise many kinds for a bad file
            raise ValueError(f"could not read {path!r} as an .h5ad file: {exc}") from exc
    check_matrices(adata, repr(path))
    adata.uns["scidiff_source"] = path
    return adata


def in_memory(adata) -> ad.AnnData:
    """An AnnData whose matrices are in memory: ``adata`` itself, read from its path
    (:func:`read_h5ad`), or, for a backed one (``anndata.read_h5ad(path, backed="r")``, or a view
    of one), its cells read from the file (``to_memory``) and checked as :func:`read_h5ad` checks a
    file's (a backed ``X`` is no matrix scidiff can slice)."""
    if not isinstance(adata, ad.AnnData):
        return read_h5ad(adata)
    if not adata.isbacked:
        return adata
    path = os.fspath(adata.filename)
    try:
        loaded = adata.to_memory()
    except Exception as exc:  # h5py/anndata raise many kinds for a bad file
        raise ValueError(f"could not read the backed AnnData of {path!r} into memory: {exc}") from exc
    check_matrices(loaded, repr(path))
    loaded.uns["scidiff_source"] = path
    return loaded


# -- atomic writes ---------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path) -> list[str]:
    """Delete the temporary files of earlier writes to ``path`` whose writer process is gone
    (killed mid-write); returns their paths."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    return remove_dead_writers_files(folder, lambda target: target == base)


def remove_dead_writers_files(folder, targets=lambda target: True) -> list[str]:
    """Delete the temporary files in ``folder`` (``.tmp-<pid>-<random>.<target>``, ``targets``
    choosing the targets) whose writer process is gone; a live writer's, this process's or
    another's (a run written to by two processes), are kept. Returns their paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP.match(name)
        if m and targets(m.group(3)) and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
            except OSError:
                pass
    return removed


def temporary_beside(path) -> str:
    """Create an empty temporary file beside ``path`` and return its name,
    ``.tmp-<pid>-<random>.<name>`` (traceable to its target and writer), with the normal mode
    (``0o666`` less the umask). Stale temporaries of ``path`` are removed first. A folder at
    ``path`` is refused here, before anything is written (the rename would fail at the end)."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(("/", os.sep)):  # 'out/' names a folder, made or not
        raise IsADirectoryError(f"{path!r} is a folder; give a file path to write")
    folder, base = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(path)
    while True:
        tmp = os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(4)}.{base}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_path(path, write) -> str:
    """Call ``write(tmp_path)`` for a temporary file beside ``path`` (:func:`temporary_beside`),
    then rename it to ``path``. On any error the temporary file is removed, ``path`` is
    untouched, and the folders made for it are removed where left empty."""
    path = os.fspath(path)
    made = missing_folders(os.path.dirname(os.path.abspath(path)))
    tmp = temporary_beside(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        remove_empty_folders(made)
        raise
    return path


def missing_folders(folder) -> list[str]:
    """``folder`` and those of its parents that do not exist (yet), the deepest first."""
    made, missing = [], os.path.abspath(os.fspath(folder))
    while not os.path.exists(missing):
        made.append(missing)
        missing = os.path.dirname(missing)
    return made


def remove_empty_folders(folders) -> None:
    """Remove the folders of ``folders`` (:func:`missing_folders` before a write) that a failed
    write left empty, the deepest first."""
    for path in folders:
        try:
            if not os.listdir(path):
                os.rmdir(path)
        except OSError:  # not there, or another process writes in it
            pass


@contextlib.contextmanager
def staged_files(folder=None):
    """Write the files of one output together: ``stage(path, write)`` calls ``write(tmp)`` for a
    temporary file beside ``path`` (:func:`temporary_beside`); leaving the block without an error
    renames them all into place, in the order staged (a report last). On an error none is
    renamed: the temporaries are removed, the files at the paths are as they were, and the
    folders up to ``folder`` that did not exist before are removed where left empty."""
    made = missing_folders(folder) if folder is not None else []
    staged = []

    def stage(path, write) -> str:
        tmp = temporary_beside(path)
        staged.append((tmp, os.fspath(path)))
        write(tmp)
        return os.fspath(path)

    try:
        yield stage
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        remove_empty_folders(made)
        raise
    for i, (tmp, path) in enumerate(staged):
        try:
            os.replace(tmp, path)
        except BaseException:
            for rest, _ in staged[i:]:
                if os.path.exists(rest):
                    os.remove(rest)
            raise


def write_h5ad(adata: ad.AnnData, path) -> str:
    """Write ``adata`` to ``path`` atomically, without ``uns['scidiff_source']`` (the file it was
    read from, :func:`read_h5ad`'s note); the caller's ``adata`` keeps it."""
    source = adata.uns.pop("scidiff_source", None)
    try:
        return atomic_path(path, adata.write_h5ad)
    finally:
        if source is not None:
            adata.uns["scidiff_source"] = source
