"""HTTP generation server over an exported model (FastAPI + uvicorn, onnxruntime; no torch).

Endpoints:

- ``POST /generate`` ``{n, condition, seed, sampler, steps, guidance, eta, format}``: ``n`` cells of
  one condition (labels by covariate), as JSON (``format: "json"``, values rounded to 6 decimals),
  or as an ``.npz`` / ``.h5ad`` download (exact float32). The seed used is returned (JSON field,
  ``X-Scidiff-Seed`` header), so a request without one can be repeated.
- ``GET /health``: liveness and batching counters. ``GET /model``: genes, vocabularies, defaults,
  version.

Malformed bodies get 422 (FastAPI's validation), unknown condition keys or labels, bad sampler
settings and ``n`` above the cap get 400, each with a message in ``detail``. Concurrent requests
are merged by a :class:`Batcher` into one onnxruntime call per sampler step: requests that share
sampler, steps and eta are stacked (their condition tables concatenated, guidance per row), and
each request's cells are generated from its own seed, so merging never changes them.
"""
from __future__ import annotations

import asyncio
import io
import os
import queue
import secrets
import tempfile
import threading
import time
from concurrent.futures import Future
from typing import Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .runtime import Batch, OnnxSampler

DEFAULT_MAX_CELLS = 10_000


class GenerateRequest(BaseModel):
    """The body of ``POST /generate``; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(..., ge=1, description="cells to generate (at most the server's cap)")
    condition: dict[str, Union[str, int, float, None]] = Field(default_factory=dict)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    sampler: Optional[str] = None
    steps: Optional[int] = Field(None, ge=1)
    guidance: Optional[float] = None
    eta: Optional[float] = Field(None, ge=0.0, le=1.0)
    format: Literal["json", "npz", "h5ad"] = "json"


class Job:
    """One request, prepared: its batch (noise from its seed) and where its answer goes."""

    def __init__(self, batch: Batch, opts: dict, seed: int):
        self.batch, self.opts, self.seed = batch, opts, seed
        self.n = len(batch.x_T)
        self.key = (opts["sampler"], opts["steps"], opts["eta"])
        self.future: Future = Future()


class Batcher:
    """A worker thread that merges queued jobs into one sampling run per group.

    The worker takes the first waiting job, then keeps collecting for up to ``window_ms`` (or
    until ``max_batch_cells`` cells are waiting), groups the jobs by ``(sampler, steps, eta)`` and
    runs each group as one batch: one onnxruntime call per sampler step for all of its cells.
    """

    def __init__(self, sampler: OnnxSampler, max_batch_cells: int = 4096, window_ms: float = 2.0,
                 start: bool = True):
        self.sampler = sampler
        self.max_batch_cells = int(max_batch_cells)
        self.window = float(window_ms) / 1000.0
        self.queue: queue.Queue = queue.Queue()
        self.stats = {"requests": 0, "cells": 0, "runs": 0, "onnx_calls": 0, "errors": 0, "max_merged": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if start:
            self.start()

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="scidiff-batcher", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0):
        self._stop.set()
        self.queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> Future:
        if self._stop.is_set():
            raise RuntimeError("the batcher is closed")
        self.queue.put(job)
        return job.future

    def _collect(self) -> list[Job]:
        first = self.queue.get()
        if first is None:
            return []
        jobs, cells = [first], first.n
        deadline = time.monotonic() + self.window
        while cells < self.max_batch_cells:
            try:
                job = self.queue.get_nowait() if self.window <= 0 else \
                    self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._stop.set()
                break
            jobs.append(job)
            cells += job.n
        return jobs

    def _loop(self):
        while not self._stop.is_set():
            jobs = self._collect()
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                self._run_group(group)
        while True:  # fail what is left so no client waits forever
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    def _run_group(self, group: list[Job]):
        live = [j for j in group if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            merged = merge([j.batch for j in live])
            sampler, steps, eta = live[0].key
            z = self.sampler.run(merged, sampler, steps, eta)
            x = self.sampler.to_expression(self.sampler.decode(z))
            with self._lock:
                self.stats["runs"] += 1
                self.stats["onnx_calls"] += len(self.sampler.grid(sampler, steps))
                self.stats["requests"] += len(live)
                self.stats["cells"] += len(x)
                self.stats["max_merged"] = max(self.stats["max_merged"], len(live))
            start = 0
            for j in live:
                j.future.set_result(x[start:start + j.n])
                start += j.n
        except Exception as exc:  # one bad group must not stop the worker
            with self._lock:
                self.stats["errors"] += 1
            for j in live:
                if not j.future.done():
                    j.future.set_exception(exc)


def merge(batches: list[Batch]) -> Batch:
    """Stack batches into one: cells concatenated, condition tables concatenated (each batch's
    ``index`` shifted by the rows before it), and step noise drawn from each batch's own source."""
    if len(batches) == 1:
        return batches[0]
    offsets = np.cumsum([0] + [len(b.guidance) for b in batches[:-1]])
    table = {k: np.concatenate([b.table[k] for b in batches]) for k in batches[0].table}
    def noise(i):
        return np.concatenate([b.noise(i) for b in batches])
    return Batch(np.concatenate([b.x_T for b in batches]),
                 np.concatenate([b.index + off for b, off in zip(batches, offsets)]),
                 table, np.concatenate([b.guidance for b in batches]),
                 noise if all(b.noise is not None for b in batches) else None)


def create_app(model, *, max_cells: int = DEFAULT_MAX_CELLS, max_batch_cells: int = 4096, window_ms: float = 2.0,
               device: str = "auto", threads: int | None = None):
    """The FastAPI app serving ``model`` (a path to ``model.onnx`` or an :class:`OnnxSampler`).
    ``max_cells`` caps ``n`` per request; the batcher is started with the app and stopped with it."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse, Response

    sampler = model if isinstance(model, OnnxSampler) else OnnxSampler(model, device=device, threads=threads)
    state: dict = {}
    lock = threading.Lock()

    def batcher() -> Batcher:
        """The app's batcher, started with the app (or on first use when no lifespan ran)."""
        with lock:
            if state.get("batcher") is None:
                state["batcher"] = Batcher(sampler, max_batch_cells=max_batch_cells, window_ms=window_ms)
            return state["batcher"]

    @asynccontextmanager
    async def lifespan(app):
        batcher()
        try:
            yield
        finally:
            with lock:
                running = state.pop("batcher", None)
            if running is not None:
                running.close()

    app = FastAPI(title="scidiff generation server", version=str(sampler.meta.get("scidiff_version")),
                  lifespan=lifespan)
    app.state.sampler = sampler
    app.state.max_cells = int(max_cells)

    @app.get("/health")
    def health():
        return {"status": "ok", "providers": sampler.providers, "max_cells": int(max_cells),
                "stats": dict(batcher().stats)}

    @app.get("/model")
    def describe():
        return {**sampler.describe(), "max_cells": int(max_cells)}

    @app.post("/generate")
    async def generate(req: GenerateRequest):
        if req.n > max_cells:
            raise HTTPException(400, f"n={req.n} exceeds this server's cap of {max_cells} cells per request")
        try:
            opts = sampler.resolve(req.sampler, req.steps, req.eta, req.guidance)
            seed = int(secrets.randbits(63)) if req.seed is None else int(req.seed)
            batch = sampler.prepare(req.n, req.condition, seed=seed, guidance=opts["guidance"], eta=opts["eta"])
        except KeyError as exc:
            raise HTTPException(400, str(exc.args[0]) if exc.args else str(exc)) from None
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        job = Job(batch, opts, seed)
        x = await asyncio.wrap_future(batcher().submit(job))
        headers = {"X-Scidiff-Seed": str(seed)}
        if req.format == "json":
            body = {"n": req.n, "genes": sampler.genes, "obs": batch.obs, "X": np.round(x, 6).tolist(),
                    "seed": seed, **{k: v for k, v in opts.items()},
                    "expression": sampler.meta["normalisation"].get("expression", "log1p-normalised")}
            return JSONResponse(body, headers=headers)
        if req.format == "npz":
            buf = io.BytesIO()
            np.savez(buf, X=x, genes=np.asarray(sampler.genes), seed=np.int64(seed),
                     **{f"obs_{k}": np.asarray(v) for k, v in batch.obs.items()})
            return Response(buf.getvalue(), media_type="application/octet-stream",
                            headers={**headers, "Content-Disposition": 'attachment; filename="generated.npz"'})
        adata = sampler.package(x, batch.obs, seed, opts, "anndata")
        if isinstance(adata, dict):
            raise HTTPException(400, "format 'h5ad' needs anndata installed on the server; use 'npz'")
        data = await asyncio.to_thread(_h5ad_bytes, adata)
        return Response(data, media_type="application/x-hdf5",
                        headers={**headers, "Content-Disposition": 'attachment; filename="generated.h5ad"'})

    return app


def _h5ad_bytes(adata) -> bytes:
    fd, tmp = tempfile.mkstemp(suffix=".h5ad")
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        with open(tmp, "rb") as fh:
            return fh.read()
    finally:
        os.remove(tmp)


def serve(model, host: str = "127.0.0.1", port: int = 8000, *, max_cells: int = DEFAULT_MAX_CELLS,
          max_batch_cells: int = 4096, window_ms: float = 2.0, device: str = "auto", threads: int | None = None,
          log_level: str = "info"):
    """Run the server until interrupted (binds to localhost unless ``host`` says otherwise)."""
    import uvicorn

    app = create_app(model, max_cells=max_cells, max_batch_cells=max_batch_cells, window_ms=window_ms,
                     device=device, threads=threads)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level)
