"""HTTP generation server over an exported model (FastAPI + uvicorn, onnxruntime; no torch).

Endpoints:

- ``POST /generate`` ``{n, condition, seed, sampler, steps, guidance, eta, observed, format}``: ``n``
  cells of one condition (labels by covariate), as JSON (``format: "json"``, values rounded to 6
  decimals), or as an ``.npz`` / ``.h5ad`` download (exact float32). The cells are measured (sparse,
  through the export's detection model) by default where the export has one, smooth with
  ``observed: false`` (``observed: true`` is a 400 for an export without one); which one comes back
  is said by the ``observed`` and ``expression`` fields (JSON; the npz's arrays; the h5ad's
  ``uns['scidiff']``) and the ``X-Scidiff-Expression: measured|smooth`` header. The seed used is
  returned (JSON field, ``X-Scidiff-Seed`` header), so a request without one can be repeated.
- ``GET /health``: liveness and scheduler counters. ``GET /model``: genes, vocabularies, defaults,
  version, limits, whether measured cells are available (``observed_available``).

Limits. A request body over ``max_body_bytes`` (default 1 MiB) gets 413 before anything parses it,
whether it declares a Content-Length or is sent chunked; ``POST /generate`` takes JSON only (415
otherwise). Types are strict: ``n``, ``steps`` and ``seed`` are JSON integers (``true`` or ``2.0``
are refused), ``observed`` a JSON boolean (``1`` or ``"true"`` are refused), ``n`` lies in
[1, ``max_cells``], ``steps`` in [1, min(``max_steps``, the model's timesteps)], ``seed`` in
[0, 2**63), ``guidance`` in [0, 20] and ``eta`` in [0, 1] (finite numbers; NaN and infinities are
refused). A condition is one value per covariate: a label (a JSON string of the model's vocabulary,
recorded as such in ``obs``) for a categorical or perturbation covariate (a number there is
refused, not read as a code), a finite number for a numeric one, or null. Unknown fields are
refused. A body that is not JSON, a value of the wrong type or out of range gets 422 (``detail``: a
list of ``{loc, field, msg, type}``); condition keys, labels or samplers the model does not know,
and ``n`` or ``steps`` over the server's caps, get 400 (``detail``: a message naming the field and,
for labels, the vocabulary). No error echoes the request body or a long input value back: FastAPI's
``input`` is dropped from 422s and quoted values are cut to 60 characters.

Scheduling. A :class:`Batcher` worker thread runs every request in slices of at most
``slice_cell_steps`` cells x sampler steps (whole steps while they fit; a step over more cells in
blocks of that many cells). Each turn goes to the request with the fewest cell-steps left (the
oldest among equals), unless one has been passed over 4 turns in a row, which then runs. A request
that fits in one slice thus waits about one slice behind a long one (two at worst, if the long one
is due) instead of for all of it, equal requests finish in arrival order as with plain batching,
and no long request is starved. Requests that have not started and share sampler, steps and eta
are merged into one run, one onnxruntime call per sampler step (their condition tables
concatenated, guidance per row); short ones (one slice) only with short ones, long with long. Each
request's cells come from its own seed (its start points and step noise drawn from its own
generator, once per step) and every update is per cell, so neither merging nor slicing changes
them.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
import queue
import secrets
import tempfile
import threading
import time
from concurrent.futures import Future
from typing import Annotated, Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from .runtime import Batch, OnnxSampler, Trajectory

DEFAULT_MAX_CELLS = 10_000
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_STEPS = 1000
DEFAULT_SLICE_CELL_STEPS = 2048
GUIDANCE_RANGE = (0.0, 20.0)
MAX_TEXT = 256  # characters in a label, a condition key or a sampler name

Seed = Annotated[int, Field(strict=True, ge=0, lt=2**63)]
Key = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_TEXT)]


def short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages that name an input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def labels_text(labels, limit: int = 40) -> str:
    """A vocabulary for an error message: all of it, or its first ``limit`` labels and a count."""
    labels = list(labels)
    if len(labels) <= limit:
        return str(labels)
    return f"{labels[:limit]}... ({len(labels)} in all; GET /model lists them)"


class GenerateRequest(BaseModel):
    """The body of ``POST /generate``: strict types, bounded values, unknown fields refused."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(..., strict=True, ge=1, description="cells to generate (at most the server's cap)")
    condition: dict[Key, Any] = Field(default_factory=dict,
                                      description="covariate -> label (string), number (numeric covariate) or null")
    seed: Optional[Seed] = None
    sampler: Optional[Annotated[str, StringConstraints(strict=True, max_length=32)]] = None
    steps: Optional[int] = Field(None, strict=True, ge=1, description="at most the server's --max-steps")
    guidance: Optional[float] = Field(None, strict=True, ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1],
                                      allow_inf_nan=False, description="classifier-free guidance scale")
    eta: Optional[float] = Field(None, strict=True, ge=0.0, le=1.0, allow_inf_nan=False)
    observed: Optional[bool] = Field(None, strict=True, description="measured cells (default where the model "
                                                                      "has a detection model) or smooth (false)")
    format: Literal["json", "npz", "h5ad"] = "json"

    @field_validator("condition")
    @classmethod
    def _one_value_per_key(cls, condition: dict) -> dict:
        for key, value in condition.items():
            if value is None:
                continue
            if isinstance(value, str):
                if len(value) > MAX_TEXT:
                    raise ValueError(f"condition {short(key)}: a label has at most {MAX_TEXT} characters "
                                     f"(got {len(value)})")
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                try:
                    ok = math.isfinite(float(value)) and abs(float(value)) <= 3.4e38
                except OverflowError:
                    ok = False
                if not ok:
                    raise ValueError(f"condition {short(key)}: a number must be finite (and within float32's range)")
                continue
            kind = {bool: "a boolean", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
            raise ValueError(f"condition {short(key)} takes one value: a label (a string), a number for a numeric "
                             f"covariate, or null; got {kind}")
        return condition


class Job:
    """One request, prepared: its batch (noise and measurements from its seed), settings
    (:meth:`OnnxSampler.resolve`'s, ``observed`` included) and where its answer goes."""

    def __init__(self, batch: Batch, opts: dict, seed: int):
        self.batch, self.opts, self.seed = batch, opts, seed
        self.n = len(batch.x_T)
        self.key = (opts["sampler"], opts["steps"], opts["eta"])
        self.cost = self.n * int(opts["steps"])  # cell-steps, about (a grid can have fewer steps)
        self.future: Future = Future()


class Group:
    """Jobs merged into one sampling run (one onnxruntime call per step for all their cells). Jobs
    join it until its first slice, when its :class:`~scidiff.export.runtime.Trajectory` is made."""

    def __init__(self, job: Job, short: bool, seq: int):
        self.jobs, self.key, self.short, self.seq = [job], job.key, short, seq
        self.cells = job.n
        self.trajectory: Trajectory | None = None
        self.passed = 0  # turns other groups took since this one last ran

    def remaining(self) -> int:
        """The scheduling priority: cell-steps left for the largest request in the group."""
        done = 0 if self.trajectory is None else self.trajectory.step
        return max(j.n for j in self.jobs) * (int(self.key[1]) - done)


class Batcher:
    """The scheduler: a worker thread that runs jobs in slices, merging those that can share a run.

    When idle, the worker takes the first waiting job and keeps collecting for up to ``window_ms``
    (or until ``max_batch_cells`` cells are waiting); between slices it takes whatever has arrived
    without waiting. Jobs with the same ``(sampler, steps, eta)`` join a group that has not started
    yet (up to ``max_batch_cells`` cells; jobs that fit in one slice only with each other, longer
    ones only with longer ones). Each turn advances one group by one slice of at most
    ``slice_cell_steps`` cell-steps (:meth:`Trajectory.advance`): the group whose largest request
    has the fewest cell-steps left (the oldest among equals), unless a group has been passed over
    ``max_passed_over`` turns in a row, which then runs. So a request that fits in one slice waits
    about one slice behind a long one (two at worst), equal requests finish in arrival order as
    with plain batching, and a long request is not starved (passed over ``max_passed_over`` turns
    in a row, it runs next; the one passed over longest first).
    ``stats`` counts requests, cells, runs (finished groups), slices, onnxruntime calls, errors,
    the most requests merged into one run and the requests in flight.
    """

    def __init__(self, sampler: OnnxSampler, max_batch_cells: int = 4096, window_ms: float = 2.0,
                 start: bool = True, slice_cell_steps: int = DEFAULT_SLICE_CELL_STEPS, max_passed_over: int = 4):
        if int(slice_cell_steps) < 1 or int(max_batch_cells) < 1 or int(max_passed_over) < 1:
            raise ValueError("slice_cell_steps, max_batch_cells and max_passed_over must be >= 1")
        self.sampler = sampler
        self.max_batch_cells = int(max_batch_cells)
        self.slice_cell_steps = int(slice_cell_steps)
        self.max_passed_over = int(max_passed_over)
        self.window = float(window_ms) / 1000.0
        self.queue: queue.Queue = queue.Queue()
        self.stats = {"requests": 0, "cells": 0, "runs": 0, "slices": 0, "onnx_calls": 0, "errors": 0,
                      "max_merged": 0, "in_flight": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._groups: list[Group] = []  # in flight, started or not, in order of creation
        self._seq = 0
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
        with self._lock:
            self.stats["in_flight"] += 1
        self.queue.put(job)
        return job.future

    def _collect(self) -> list[Job]:
        """Block for the first job, then gather more for up to the window (the worker is idle)."""
        first = self.queue.get()
        if first is None:
            self._stop.set()
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

    def _drain(self) -> list[Job]:
        """The jobs that arrived during the last slice (no waiting: others are running)."""
        jobs = []
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is None:
                self._stop.set()
                return jobs
            jobs.append(job)

    def _admit(self, jobs: list[Job]):
        """Put each new job in a group that has not started and shares its settings and length
        class (short: fits in one slice), while it has room; else in a new group."""
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():  # cancelled while queued
                with self._lock:
                    self.stats["in_flight"] -= 1
                continue
            short = job.cost <= self.slice_cell_steps
            for group in self._groups:
                if (group.trajectory is None and group.key == job.key and group.short == short
                        and group.cells + job.n <= self.max_batch_cells):
                    group.jobs.append(job)
                    group.cells += job.n
                    break
            else:
                self._seq += 1
                self._groups.append(Group(job, short, self._seq))

    def _pick(self) -> Group:
        """The next group to run a slice of (see the class docstring)."""
        starving = [g for g in self._groups if g.passed >= self.max_passed_over]
        if starving:
            chosen = max(starving, key=lambda g: (g.passed, -g.seq))
        else:
            chosen = min(self._groups, key=lambda g: (g.remaining(), g.seq))
        for g in self._groups:
            g.passed += 1
        chosen.passed = 0
        return chosen

    def _loop(self):
        while not self._stop.is_set():
            self._admit(self._collect() if not self._groups else self._drain())
            if self._stop.is_set() or not self._groups:
                continue
            group = self._pick()
            if not self._slice(group):
                self._groups.remove(group)
        left, self._groups = self._groups, []
        for group in left:  # fail what is left so no client waits forever
            self._fail(group.jobs, RuntimeError("the server is shutting down"), count=False)
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                if job.future.set_running_or_notify_cancel():
                    self._fail([job], RuntimeError("the server is shutting down"), count=False)
                else:
                    with self._lock:
                        self.stats["in_flight"] -= 1

    def _fail(self, jobs: list[Job], exc: Exception, count: bool = True):
        with self._lock:
            self.stats["errors"] += int(count)
            self.stats["in_flight"] -= len(jobs)
        for j in jobs:
            if not j.future.done():
                j.future.set_exception(exc)

    def _slice(self, group: Group) -> bool:
        """Advance ``group`` by one slice (making its trajectory on its first); deliver each job
        its cells when the run ends. Returns whether the group has steps left."""
        try:
            if group.trajectory is None:
                group.trajectory = self.sampler.trajectory(merge([j.batch for j in group.jobs]), *group.key)
            calls = group.trajectory.advance(self.slice_cell_steps)
            with self._lock:
                self.stats["slices"] += 1
                self.stats["onnx_calls"] += calls
            if not group.trajectory.done:
                return True
            z, start, cells = group.trajectory.x, 0, []
            for j in group.jobs:  # each request measured from its own generator
                cells.append(self.sampler.express(z[start:start + j.n], j.opts["observed"], j.batch.rng))
                start += j.n
            with self._lock:
                self.stats["runs"] += 1
                self.stats["requests"] += len(group.jobs)
                self.stats["cells"] += len(z)
                self.stats["max_merged"] = max(self.stats["max_merged"], len(group.jobs))
                self.stats["in_flight"] -= len(group.jobs)
            for j, x in zip(group.jobs, cells):
                j.future.set_result(x)
        except Exception as exc:  # one bad group must not stop the worker
            self._fail(group.jobs, exc)
        return False


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


class BodyLimit:
    """ASGI middleware in front of the app: reads each request body, refusing it with 413 as soon
    as it exceeds ``max_body_bytes`` (at once when Content-Length says so, else while a chunked
    body arrives), so nothing parses or echoes an oversized body; ``POST /generate`` must say its
    body is JSON (415 otherwise). The body read is handed on to the app as one message."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.limit = app, int(max_body_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await _reply(send, 400, "the Content-Length header is not a number")
            if size > self.limit:
                return await _reply(send, 413, self._too_large(f"{size:,} bytes declared"))
        if scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/generate"):
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if not (kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))):
                return await _reply(send, 415, "POST /generate takes a JSON body: send it with the header "
                                               "Content-Type: application/json")
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await _reply(send, 413, self._too_large("more than that sent"))
            more = message.get("more_body", False)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self, what: str) -> str:
        return f"request body too large: this server takes at most {self.limit:,} bytes ({what}; --max-body-bytes)"


async def _reply(send, status: int, detail: str):
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _field(loc) -> str:
    """A validation error's location as a field name (``condition.cell_type``), user text cut short."""
    parts = [str(p) if len(str(p)) <= 40 else str(p)[:40] + "..." for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _clean_errors(errors) -> list[dict]:
    """FastAPI's validation errors without the ``input`` (nor ``ctx``/``url``) they carry: the
    field, a message (cut to 300 characters) and the error type."""
    out = []
    for e in list(errors)[:20]:
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "json_invalid":
            msg = f"the body is not valid JSON: {str((e.get('ctx') or {}).get('error', ''))[:100]}".rstrip(": ")
            loc = ["body"]
        elif tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing":
            msg, loc = "the request has no body: send a JSON object such as {\"n\": 10}", ["body"]
        else:
            loc = [p if not isinstance(p, str) or len(p) <= 40 else p[:40] + "..." for p in e.get("loc", ())]
            msg = msg if len(msg) <= 300 else msg[:300] + "..."
        out.append({"loc": loc, "field": _field(loc), "msg": msg, "type": str(e.get("type", ""))})
    return out


def create_app(model, *, max_cells: int = DEFAULT_MAX_CELLS, max_batch_cells: int = 4096, window_ms: float = 2.0,
               device: str = "auto", threads: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_steps: int = DEFAULT_MAX_STEPS, slice_cell_steps: int = DEFAULT_SLICE_CELL_STEPS):
    """The FastAPI app serving ``model`` (a path to ``model.onnx`` or an :class:`OnnxSampler`).
    ``max_cells`` caps ``n`` per request, ``max_steps`` the sampler steps and ``max_body_bytes``
    the request body; the scheduler (:class:`Batcher`, slices of ``slice_cell_steps``) is started
    with the app and stopped with it."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    for name, value in (("max_cells", max_cells), ("max_batch_cells", max_batch_cells),
                        ("max_body_bytes", max_body_bytes), ("max_steps", max_steps),
                        ("slice_cell_steps", slice_cell_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(window_ms, (int, float)) and math.isfinite(window_ms) and window_ms >= 0):
        raise ValueError(f"window_ms must be a finite number >= 0, got {window_ms!r}")
    sampler = model if isinstance(model, OnnxSampler) else OnnxSampler(model, device=device, threads=threads)
    step_cap = min(int(max_steps), sampler.num_timesteps)
    state: dict = {}
    lock = threading.Lock()

    def batcher() -> Batcher:
        """The app's scheduler, started with the app (or on first use when no lifespan ran)."""
        with lock:
            if state.get("batcher") is None:
                state["batcher"] = Batcher(sampler, max_batch_cells=max_batch_cells, window_ms=window_ms,
                                           slice_cell_steps=slice_cell_steps)
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
    limits = {"max_cells": int(max_cells), "max_steps": step_cap, "max_body_bytes": int(max_body_bytes),
              "guidance": list(GUIDANCE_RANGE), "slice_cell_steps": int(slice_cell_steps)}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        errors = _clean_errors(exc.errors())
        return JSONResponse({"detail": errors, "message": "; ".join(f"{e['field']}: {e['msg']}" for e in errors[:5])},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        detail = exc.detail
        if detail == "There was an error parsing the body":  # FastAPI's words for a body json cannot read
            detail = ("the body could not be read as JSON (invalid UTF-8, a number with too many digits, or "
                      "nesting too deep)")
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    def bad(message: str) -> HTTPException:
        return HTTPException(400, message if len(message) <= 2000 else message[:2000] + "... (GET /model lists the "
                                                                                        "vocabularies)")

    def check_condition(condition: dict):
        """Keys the model knows; a label (string) of its vocabulary for a categorical covariate, a
        string for a perturbation (parsed by the runtime), a number for a numeric one."""
        for key, value in condition.items():
            if key not in sampler.by_key:
                known = list(sampler.by_key) or "no covariates"
                raise bad(f"unknown condition key {short(key)}; the model knows {known}")
            c = sampler.by_key[key]
            if value is None:
                continue
            if c["kind"] == "continuous":
                if isinstance(value, str):
                    raise bad(f"condition {key!r} is numeric: send a JSON number, not the string {short(value)}")
                continue
            labels = [str(v) for v in c["labels"]]
            if not isinstance(value, str):
                hint = f' (send "{value}" for the label {str(value)!r})' if str(value) in labels else ""
                raise bad(f"condition {key!r} takes a label, a JSON string, not the number {value}{hint}; "
                          f"known labels: {labels_text(labels)}")
            if c["kind"] == "categorical" and value not in labels:
                raise bad(f"unknown value {short(value)} for condition {key!r}; known values: {labels_text(labels)}")

    @app.get("/health")
    def health():
        return {"status": "ok", "providers": sampler.providers, "max_cells": int(max_cells), "limits": limits,
                "stats": dict(batcher().stats)}

    @app.get("/model")
    def describe():
        return {**sampler.describe(), "max_cells": int(max_cells), "limits": limits}

    @app.post("/generate")
    async def generate(req: GenerateRequest):
        if req.n > max_cells:
            raise bad(f"n={req.n} exceeds this server's cap of {max_cells} cells per request")
        if req.steps is not None and req.steps > step_cap:
            raise bad(f"steps must lie in [1, {step_cap}], got {req.steps}")
        check_condition(req.condition)
        try:
            opts = sampler.resolve(req.sampler, req.steps, req.eta, req.guidance, req.observed)
            if opts["steps"] > step_cap:
                raise ValueError(f"the model's default steps ({opts['steps']}) exceed this server's cap of {step_cap}; "
                                 f"pass steps")
            seed = int(secrets.randbits(63)) if req.seed is None else int(req.seed)
            batch = await asyncio.to_thread(sampler.prepare, req.n, req.condition, seed=seed,
                                            guidance=opts["guidance"], eta=opts["eta"])
        except KeyError as exc:
            raise bad(str(exc.args[0]) if exc.args else str(exc)) from None
        except ValueError as exc:
            raise bad(str(exc)) from None
        job = Job(batch, opts, seed)
        x = await asyncio.wrap_future(batcher().submit(job))
        expression = sampler.expression_note(opts["observed"])
        headers = {"X-Scidiff-Seed": str(seed), "X-Scidiff-Expression": "measured" if opts["observed"] else "smooth"}
        if req.format == "json":
            def render() -> bytes:
                body = {"n": req.n, "genes": sampler.genes, "obs": batch.obs, "X": np.round(x, 6).tolist(),
                        "seed": seed, **{k: v for k, v in opts.items()}, "expression": expression}
                return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
            return Response(await asyncio.to_thread(render), media_type="application/json", headers=headers)
        if req.format == "npz":
            def pack() -> bytes:
                buf = io.BytesIO()
                np.savez(buf, X=x, genes=np.asarray(sampler.genes), seed=np.int64(seed),
                         observed=np.bool_(opts["observed"]), expression=np.asarray(expression),
                         **{f"obs_{k}": npz_column(sampler, k, v) for k, v in batch.obs.items()})
                return buf.getvalue()
            return Response(await asyncio.to_thread(pack), media_type="application/octet-stream",
                            headers={**headers, "Content-Disposition": 'attachment; filename="generated.npz"'})
        adata = await asyncio.to_thread(sampler.package, x, batch.obs, seed, opts, "anndata")
        if isinstance(adata, dict):
            raise HTTPException(400, "format 'h5ad' needs anndata installed on the server; use 'npz'")
        data = await asyncio.to_thread(_h5ad_bytes, adata)
        return Response(data, media_type="application/x-hdf5",
                        headers={**headers, "Content-Disposition": 'attachment; filename="generated.h5ad"'})

    app.add_middleware(BodyLimit, max_body_bytes=int(max_body_bytes))
    return app


def npz_column(sampler, key: str, values) -> np.ndarray:
    """One ``obs`` column for the npz download, as an array a client loads without pickle: a
    numeric covariate as floats (a null one, ``None``, as NaN), labels as text (an array holding
    ``None`` was an object array, which ``numpy.load`` refuses by default)."""
    if sampler.by_key[key]["kind"] == "continuous":
        return np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    return np.asarray([str(v) for v in values], dtype=str)


def _h5ad_bytes(adata) -> bytes:
    fd, tmp = tempfile.mkstemp(suffix=".h5ad")
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        with open(tmp, "rb") as fh:
            return fh.read()
    finally:
        os.remove(tmp)


def listen(host: str, port: int):
    """A TCP socket bound to ``host:port`` for the server (``port`` 0: any free port), or a
    ValueError naming the address when it cannot be bound (in use, not an address of this machine)."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, OverflowError) as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; a live listener still blocks it
        sock.bind(address)
        sock.set_inheritable(True)
    except (OSError, OverflowError) as exc:
        sock.close()
        why = "the port is already in use" if getattr(exc, "errno", None) == errno.EADDRINUSE else \
            (getattr(exc, "strerror", None) or str(exc))
        raise ValueError(f"cannot listen on {host}:{port}: {why}") from None
    return sock


def serve(model, host: str = "127.0.0.1", port: int = 8000, *, max_cells: int = DEFAULT_MAX_CELLS,
          max_batch_cells: int = 4096, window_ms: float = 2.0, device: str = "auto", threads: int | None = None,
          log_level: str = "info", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_steps: int = DEFAULT_MAX_STEPS,
          slice_cell_steps: int = DEFAULT_SLICE_CELL_STEPS, sock=None):
    """Run the server until interrupted (binds to localhost unless ``host`` says otherwise; an
    address that cannot be bound is a ValueError, raised before the model is loaded). ``sock``: an
    already bound socket (:func:`listen`) to serve on instead."""
    import uvicorn

    own = sock is None
    sock = listen(host, port) if own else sock
    try:
        app = create_app(model, max_cells=max_cells, max_batch_cells=max_batch_cells, window_ms=window_ms,
                         device=device, threads=threads, max_body_bytes=max_body_bytes, max_steps=max_steps,
                         slice_cell_steps=slice_cell_steps)
        config = uvicorn.Config(app, host=host, port=int(port), log_level=log_level)
        name = sock.getsockname()
        logging.getLogger("uvicorn.error").info("scidiff serve: listening on http://%s:%d (Ctrl+C to stop)",
                                                f"[{name[0]}]" if ":" in name[0] else name[0], name[1])
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if own:
            sock.close()
