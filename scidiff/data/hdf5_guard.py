"""Refuse HDF5 files whose damage would make libhdf5 itself hang, balloon or read out of bounds.

Variable-length strings (obs and var names, categories, attribute values such as
``encoding-type``) live in *global heap collections*, and libhdf5 (2.0.0 included) trusts them:

- a free-space object of size 0 in a collection stops its parse loop from advancing: every
  reader (anndata, h5py, scanpy) hangs forever on the file;
- an object running past its collection is later copied out of bounds;
- a damaged string reference (length, collection address, object index) makes it allocate the
  stated length, up to 4 GiB per string, before it notices the heap is not there.

A single damaged byte is enough. :func:`check_global_heaps` walks each collection exactly as
libhdf5 does and checks every string reference of every variable-length dataset against them,
before any string is read, and raises ``ValueError`` naming the file and the byte or element at
fault. Collections are found by their ``GCOL`` signature outside dataset storage (the large
arrays are skipped, so the scan reads little more than the metadata).

Other damage to the metadata (attribute messages, object headers, chunk indexes) can crash
libhdf5 outright (a segfault, an allocation of terabytes). :func:`check_hdf5_file` therefore
reads the metadata first in a child process (this file run as a script, importing only h5py and
numpy, its memory capped): a crash, a hang or a runaway allocation there becomes a ``ValueError``
naming the file, and the caller's process never touches the damage.
"""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import zlib

import h5py
import numpy as np

_SIGNATURE = b"GCOL"
_READ = 1 << 22  # bytes per read of the scan
PROBE_TIMEOUT_S = float(os.environ.get("SCIDIFF_HDF5_PROBE_TIMEOUT", "60"))  # reading metadata, never data
PROBE_MEMORY = 2 << 30  # bytes the probe may allocate beyond its start (metadata, never data)
_DAMAGED, _NO_MEMORY = 3, 4  # the probe's exit statuses
_probed: set = set()  # files (identity and version) whose probe passed


def check_hdf5_file(path: str) -> None:
    """Read the HDF5 metadata of ``path`` (heaps, string references, every attribute, chunk
    indexes) in a child process and raise ``ValueError`` naming the file if that crashes, hangs,
    runs out of memory or finds a damaged heap (:func:`check_global_heaps`). Files that are not
    HDF5, or that HDF5 refuses with an error, pass: the reader then says why. Where no child
    process can be started, the heaps are checked in this process."""
    try:
        st = os.stat(path)
    except OSError:
        return
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _probed:
        return
    try:
        proc = subprocess.run(_probe_command(path), capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ValueError(f"{path!r} is damaged: reading its HDF5 metadata did not finish within {PROBE_TIMEOUT_S:g} s "
                         "(libhdf5 loops forever on some damaged files)") from None
    except OSError:  # no child process here
        check_global_heaps(path)
        proc = None
    if proc is not None:
        _judge(path, proc)
    _probed.add(key)


def _probe_command(path: str) -> list[str]:
    """This file run as a script on ``path`` (it imports h5py and numpy only)."""
    return [sys.executable, os.path.abspath(__file__), path]


def _judge(path: str, proc: subprocess.CompletedProcess) -> None:
    """Raise for a probe that crashed, ran out of memory or found damage."""
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        raise ValueError(f"{path!r} is damaged: libhdf5 crashed ({name}) reading its metadata")
    if proc.returncode == _DAMAGED:
        raise ValueError(proc.stdout.strip())
    if proc.returncode == _NO_MEMORY:
        raise ValueError(f"{path!r} is damaged: reading its HDF5 metadata asked for more than "
                         f"{PROBE_MEMORY >> 30} GiB of memory (a damaged size)")
    if proc.returncode != 0:  # the probe itself could not run (h5py missing there, ...)
        check_global_heaps(path)


def _probe(path: str) -> int:
    """The child's work: exit status 0 (fine, or refused by HDF5 with an error), ``_DAMAGED``
    (message on stdout) or ``_NO_MEMORY``."""
    _cap_memory(PROBE_MEMORY)
    try:
        check_global_heaps(path)
    except ValueError as exc:
        print(exc)
        return _DAMAGED
    except MemoryError:
        return _NO_MEMORY
    try:
        f = h5py.File(path, "r")
    except Exception:
        return 0
    with f:
        failures = []
        _attributes(f, failures)
        try:
            f.visititems(lambda _, obj: _attributes(obj, failures))
        except Exception as exc:
            failures.append(exc)
    out_of_memory = any(isinstance(e, MemoryError) or "alloc" in str(e).lower() for e in failures)
    return _NO_MEMORY if out_of_memory else 0


def _attributes(obj, failures: list) -> None:
    """Read every attribute of ``obj``; exceptions are collected, not raised."""
    try:
        names = list(obj.attrs)
    except Exception as exc:
        failures.append(exc)
        return
    for name in names:
        try:
            obj.attrs[name]
        except Exception as exc:
            failures.append(exc)


def _cap_memory(extra: int) -> None:
    """Limit this process's address space to what it uses now plus ``extra`` bytes."""
    try:
        import resource

        with open("/proc/self/statm") as fh:
            used = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (used + extra, used + extra))
    except (ImportError, OSError, ValueError):
        pass


def check_global_heaps(path: str) -> None:
    """Raise ``ValueError`` if the HDF5 file at ``path`` has a damaged global heap collection or
    string reference (see the module docstring). Files that are not HDF5, or that HDF5 refuses on
    its own, pass (the reader then says why)."""
    try:
        f = h5py.File(path, "r")
    except Exception:  # not HDF5, or refused by HDF5 itself: the reader says why
        return
    with f:
        addr_len, size_len = (int(n) for n in f.id.get_create_plist().get_sizes())
        try:
            covered, strings = _scan(f)
        except Exception:  # damaged metadata: look for heaps everywhere, references unchecked
            covered, strings = np.zeros((0, 2), np.int64), []
    heaps = {}
    with open(path, "rb") as fh:
        for at in _signatures(fh, _gaps(covered, os.path.getsize(path))):
            objects = _collection(fh, at, size_len)
            if isinstance(objects, str):
                raise ValueError(f"{path!r} is damaged: the HDF5 global heap at byte {at} (where names and other "
                                 f"strings are kept) {objects}; HDF5 cannot read it safely")
            if objects is not None:
                heaps[at] = objects
        for name, refs, base in strings:
            problem = _reference_problem(_raw_refs(fh, refs, addr_len), base, heaps)
            if problem:
                raise ValueError(f"{path!r} is damaged: {name} {problem}; HDF5 cannot read it safely")


def _scan(f: h5py.File):
    """Byte ranges holding dataset elements (``[k, 2]``, sorted), and for each variable-length
    dataset ``(name, where its references are, base element size)``."""
    ranges, strings = [], []

    def visit(name, obj):
        if not isinstance(obj, h5py.Dataset):
            return
        layout = obj.id.get_create_plist().get_layout()
        stored = []
        if layout == h5py.h5d.CONTIGUOUS and obj.id.get_offset() is not None:
            stored = [("contiguous", obj.id.get_offset(), obj.id.get_storage_size())]
        elif layout == h5py.h5d.CHUNKED and hasattr(obj.id, "chunk_iter"):
            obj.id.chunk_iter(lambda s: stored.append(("chunk", s.byte_offset, s.size)))
        ranges.extend((at, at + n) for _, at, n in stored)
        base = _vlen_base(obj.dtype)
        if base and stored:
            strings.append((name, _ref_source(obj, layout, stored), base))

    f.visititems(visit)
    return np.array(sorted(ranges), dtype=np.int64).reshape(-1, 2), strings


def _vlen_base(dtype) -> int:
    """Bytes per element of a variable-length string or sequence dtype, else 0."""
    info = h5py.check_string_dtype(dtype)
    if info is not None:
        return 1 if info.length is None else 0
    vlen = h5py.check_vlen_dtype(dtype)
    return np.dtype(vlen).itemsize if vlen is not None else 0


def _ref_source(ds: h5py.Dataset, layout: int, stored) -> tuple:
    """How to get the raw references: ``("bytes", offset, n)`` of contiguous storage, or
    ``("chunks", [raw chunk bytes, ...])`` already decoded (deflate, shuffle; other filters:
    nothing, they are not checked)."""
    if layout == h5py.h5d.CONTIGUOUS:
        return ("bytes", stored[0][1], stored[0][2])
    dcpl = ds.id.get_create_plist()
    filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
    if any(code not in (h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE) for code in filters):
        return ("chunks", [])
    offsets, chunks = [], []
    ds.id.chunk_iter(lambda s: offsets.append(s.chunk_offset))
    for offset in offsets:
        mask, raw = ds.id.read_direct_chunk(offset)
        for k in reversed(range(len(filters))):
            if mask & (1 << k):
                continue
            raw = zlib.decompress(raw) if filters[k] == h5py.h5z.FILTER_DEFLATE else _unshuffle(raw, ds)
        chunks.append(raw)
    return ("chunks", chunks)


def _unshuffle(raw: bytes, ds: h5py.Dataset) -> bytes:
    size = ds.id.get_type().get_size()
    n = len(raw) // size
    body = np.frombuffer(raw[: n * size], np.uint8).reshape(size, n).T.tobytes()
    return body + raw[n * size:]


def _raw_refs(fh, source: tuple, addr_len: int) -> np.ndarray:
    """The references ``(length, collection address, object index)`` as a structured array."""
    if source[0] == "bytes":
        fh.seek(source[1])
        raw = fh.read(source[2])
    else:
        raw = b"".join(source[1])
    ref = np.dtype([("length", "<u4"), ("addr", f"<u{addr_len}"), ("index", "<u4")])
    return np.frombuffer(raw[: len(raw) // ref.itemsize * ref.itemsize], ref)


def _reference_problem(refs: np.ndarray, base: int, heaps: dict) -> str | None:
    """What is wrong with the first reference that libhdf5 could not follow safely, or ``None``.
    An empty string (length 0) is never followed."""
    live = np.flatnonzero(refs["length"] > 0)
    bad = []
    for addr in np.unique(refs["addr"][live]).tolist():
        at = live[refs["addr"][live] == addr]
        objects = heaps.get(addr)
        if objects is None:
            bad.append((int(at[0]), f"points at byte {addr}, where no global heap is"))
            continue
        sizes = np.full(max(objects, default=0) + 2, -1, np.int64)
        sizes[list(objects)] = list(objects.values())
        index = np.minimum(refs["index"][at].astype(np.int64), len(sizes) - 1)
        wrong = at[sizes[index] != refs["length"][at].astype(np.int64) * base]
        if wrong.size:
            i = int(wrong[0])
            bad.append((i, f"points at object {int(refs['index'][i])} of the global heap at byte {addr} with a "
                           f"length of {int(refs['length'][i]) * base} bytes, which the heap does not hold"))
    if not bad:
        return None
    i, what = min(bad)
    return f"element {i} {what}"


def _gaps(covered: np.ndarray, file_size: int):
    """Byte ranges of the file outside ``covered``."""
    pos = 0
    for start, end in covered.tolist():
        if start > pos:
            yield pos, min(start, file_size)
        pos = max(pos, end)
    if pos < file_size:
        yield pos, file_size


def _signatures(fh, gaps):
    """Offsets of ``GCOL`` in the gaps, read in pieces that overlap by the signature's length."""
    for start, end in gaps:
        pos = start
        while pos < end:
            fh.seek(pos)
            chunk = fh.read(min(_READ, end - pos) + len(_SIGNATURE) - 1)
            hit = chunk.find(_SIGNATURE)
            while hit != -1 and pos + hit < end:
                yield pos + hit
                hit = chunk.find(_SIGNATURE, hit + 1)
            pos += _READ


def _collection(fh, at: int, size_len: int):
    """The objects ``{index: size}`` of the collection at ``at``; a string saying what would make
    libhdf5's parse loop hang or overrun; or ``None`` where libhdf5 refuses the collection itself
    (version, size past the end of the file). Mirrors ``H5HG__cache_heap_deserialize``."""
    fh.seek(at)
    head = fh.read(8 + size_len)
    if len(head) < 8 + size_len or head[4] != 1:
        return None
    size = int.from_bytes(head[8:8 + size_len], "little")
    fh.seek(at)
    chunk = fh.read(size) if size >= len(head) else b""
    if len(chunk) < size or size < len(head):
        return None
    obj_header, objects, p = 8 + size_len, {}, len(head)
    while p + obj_header <= size:  # a smaller tail is free space
        index, = struct.unpack_from("<H", chunk, p)
        length = int.from_bytes(chunk[p + 8:p + 8 + size_len], "little")
        need = length if index == 0 else obj_header + ((length + 7) & ~7)
        if index == 0 and length == 0:
            return f"has a free-space object of size 0 at byte {at + p} (libhdf5 would loop forever)"
        if length > size or p + need > size:
            return f"has object {index} at byte {at + p} of {length} bytes, running past the collection's end"
        if index:
            objects[index] = length
        p += need
    return objects


if __name__ == "__main__":
    sys.exit(_probe(sys.argv[1]))
