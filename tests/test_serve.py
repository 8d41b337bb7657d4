"""The generation server on 127.0.0.1: real HTTP requests to an in-process uvicorn server (and
one `scidiff serve` subprocess), the 4xx paths, the limits (body size, strict types, bounded
values), request batching and the fair scheduler (slices, least work left first, no starvation)."""
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from scidiff.export.runtime import OnnxSampler  # noqa: E402
from scidiff.export.server import Batcher, Job, create_app  # noqa: E402

CAP = 50


@pytest.fixture(scope="module")
def sampler(kang_onnx):
    return OnnxSampler(kang_onnx[1], threads=1)


@contextlib.contextmanager
def serving(app):
    """``app`` on an in-process uvicorn server on 127.0.0.1 (any free port); yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    assert host == "127.0.0.1"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def url(sampler):
    with serving(create_app(sampler, max_cells=CAP, window_ms=5.0)) as address:
        yield address


def test_health_and_model(url, sampler):
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["max_cells"] == CAP
    assert health["providers"] == ["CPUExecutionProvider"]
    info = httpx.get(f"{url}/model", timeout=10).json()
    assert info["genes"] == sampler.genes and len(info["genes"]) == 100
    assert "B" in info["conditions"]["cell_type"] and sorted(info["conditions"]["condition"]) == ["control", "stimulated"]
    assert info["version"] == sampler.meta["scidiff_version"] and info["samplers"] == ["ddim", "dpmpp_2m"]
    assert info["defaults"]["steps"] == 8
    assert info["observed_available"] is True and "measured" in info["expression"]


def test_generate_json_is_the_samplers_output(url, sampler):
    body = {"n": 7, "condition": {"cell_type": "NK", "condition": "stimulated"}, "seed": 3, "steps": 4,
            "guidance": 1.5}
    r = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["genes"] == sampler.genes and out["seed"] == 3 and r.headers["x-scidiff-seed"] == "3"
    assert out["obs"]["cell_type"] == ["NK"] * 7 and out["sampler"] == "ddim" and out["steps"] == 4
    expected = sampler.sample(7, body["condition"], seed=3, steps=4, guidance=1.5, output="arrays")["X"]
    np.testing.assert_allclose(np.asarray(out["X"]), expected, atol=2e-6)
    # no seed: the server picks one and says which, so the request can be repeated
    first = httpx.post(f"{url}/generate", json={"n": 3, "steps": 3}, timeout=60).json()
    again = httpx.post(f"{url}/generate", json={"n": 3, "steps": 3, "seed": first["seed"]}, timeout=60).json()
    assert first["X"] == again["X"]


def test_generate_npz_and_h5ad_downloads(url, sampler, tmp_path):
    import anndata as ad

    body = {"n": 6, "condition": {"cell_type": "B"}, "seed": 9, "sampler": "dpm-solver++", "steps": 5}
    r = httpx.post(f"{url}/generate", json={**body, "format": "npz"}, timeout=60)
    assert r.status_code == 200 and "generated.npz" in r.headers["content-disposition"]
    z = np.load(io.BytesIO(r.content))
    expected = sampler.sample(6, {"cell_type": "B"}, seed=9, sampler="dpmpp_2m", steps=5, output="arrays")["X"]
    np.testing.assert_allclose(z["X"], expected, atol=1e-6)
    assert list(z["genes"]) == sampler.genes and list(z["obs_cell_type"]) == ["B"] * 6
    r = httpx.post(f"{url}/generate", json={**body, "format": "h5ad"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-hdf5"
    (tmp_path / "g.h5ad").write_bytes(r.content)
    a = ad.read_h5ad(tmp_path / "g.h5ad")
    assert a.shape == (6, 100) and list(a.var_names) == sampler.genes
    np.testing.assert_allclose(a.X, expected, atol=1e-6)
    assert a.uns["scidiff"]["sampler"] == "dpmpp_2m" and int(a.uns["scidiff"]["seed"]) == 9
    # the keys scidiff sample writes (its guidance is guidance_scale there too)
    assert {"sampler", "steps", "eta", "guidance_scale", "seed", "observed", "expression"} <= set(a.uns["scidiff"])


def test_generate_says_which_expression_it_returns(url, sampler, tmp_path):
    """Measured cells by default (the export has a detection model), smooth ones with
    ``observed: false``; the JSON, the header and both downloads say which."""
    import anndata as ad

    body = {"n": 40, "condition": {"cell_type": "B"}, "seed": 4, "steps": 4}
    measured = httpx.post(f"{url}/generate", json=body, timeout=60)
    smooth = httpx.post(f"{url}/generate", json={**body, "observed": False}, timeout=60)
    assert measured.status_code == smooth.status_code == 200, measured.text + smooth.text
    assert measured.headers["x-scidiff-expression"] == "measured" and smooth.headers["x-scidiff-expression"] == "smooth"
    m, s = measured.json(), smooth.json()
    assert m["observed"] is True and m["expression"] == "log1p-normalised, measured through the detection model"
    assert s["observed"] is False and s["expression"] == "log1p-normalised, smooth"
    np.testing.assert_allclose(np.asarray(m["X"]), sampler.sample(40, {"cell_type": "B"}, seed=4, steps=4,
                                                                  output="arrays")["X"], atol=2e-6)
    np.testing.assert_allclose(np.asarray(s["X"]), sampler.sample(40, {"cell_type": "B"}, seed=4, steps=4,
                                                                  observed=False, output="arrays")["X"], atol=2e-6)
    assert float((np.asarray(m["X"]) == 0).mean()) > float((np.asarray(s["X"]) == 0).mean()) + 0.3
    assert httpx.post(f"{url}/generate", json={**body, "observed": True}, timeout=60).json()["X"] == m["X"]
    z = np.load(io.BytesIO(httpx.post(f"{url}/generate", json={**body, "format": "npz"}, timeout=60).content))
    assert bool(z["observed"]) and "measured" in str(z["expression"])
    r = httpx.post(f"{url}/generate", json={**body, "observed": False, "format": "h5ad"}, timeout=60)
    assert r.headers["x-scidiff-expression"] == "smooth"
    (tmp_path / "g.h5ad").write_bytes(r.content)
    uns = ad.read_h5ad(tmp_path / "g.h5ad").uns["scidiff"]
    assert not uns["observed"] and uns["expression"] == "log1p-normalised, smooth"


def test_an_export_without_detection_serves_smooth_cells(kang_onnx, tmp_path):
    """An export without detection tables: ``GET /model`` says measured cells are unavailable,
    cells are smooth by default and ``observed: true`` is a 400 that says why."""
    for path in kang_onnx[1].parent.iterdir():
        shutil.copy(path, tmp_path / path.name)
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["detection"]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with serving(create_app(OnnxSampler(tmp_path / "model.onnx", threads=1), max_cells=CAP)) as address:
        assert httpx.get(f"{address}/model", timeout=10).json()["observed_available"] is False
        r = httpx.post(f"{address}/generate", json={"n": 2, "steps": 2}, timeout=60)
        assert r.status_code == 200 and r.headers["x-scidiff-expression"] == "smooth" and not r.json()["observed"]
        r = httpx.post(f"{address}/generate", json={"n": 2, "steps": 2, "observed": True}, timeout=60)
        assert r.status_code == 400 and "need a detection model" in r.json()["detail"]
        assert str(tmp_path) not in r.text  # the server's paths stay private


@pytest.mark.parametrize("body,status,message", [
    ({"n": CAP + 1}, 400, f"exceeds this server's cap of {CAP}"),
    ({"n": 2, "condition": {"tissue": "lung"}}, 400, "unknown condition key 'tissue'"),
    ({"n": 2, "condition": {"cell_type": "Neuron"}}, 400, "unknown value 'Neuron' for condition 'cell_type'"),
    ({"n": 2, "sampler": "euler"}, 400, "unknown sampler 'euler'"),
    ({"n": 2, "steps": 5000}, 400, "steps must lie in [1, 200]"),
    ({"n": 2, "sampler": "dpmpp_2m", "eta": 0.5}, 400, "eta applies to the ddim sampler only"),
    ({"n": 0}, 422, "greater than or equal to 1"),
    ({"condition": {"cell_type": "B"}}, 422, "Field required"),
    ({"n": "many"}, 422, "valid integer"),
    ({"n": 2, "colour": "red"}, 422, "Extra inputs are not permitted"),
    ({"n": 2, "format": "csv"}, 422, "'json', 'npz' or 'h5ad'"),
    ({"n": 2, "condition": {"cell_type": ["B", "NK"]}}, 422, "condition"),
])
def test_bad_requests_get_4xx_with_a_message(url, body, status, message):
    r = httpx.post(f"{url}/generate", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert message in r.text


def test_an_unknown_sampler_is_told_the_samplers_this_export_offers(url, sampler):
    """The 400 lists what this export offers (a teacher's: ddim, dpmpp_2m), not 'distilled',
    which the next request would then be refused for."""
    r = httpx.post(f"{url}/generate", json={"n": 2, "sampler": "heun"}, timeout=30)
    assert r.status_code == 400
    assert r.json()["detail"] == "unknown sampler 'heun'; this export offers ['ddim', 'dpmpp_2m']"
    assert sampler.samplers == ["ddim", "dpmpp_2m"]


def test_malformed_json_gets_422(url):
    r = httpx.post(f"{url}/generate", content=b'{"n": 3,', headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "JSON" in r.text


def test_concurrent_requests_are_all_answered_correctly(url, sampler):
    bodies = [{"n": 3 + i % 4, "seed": 100 + i, "steps": 4, "guidance": [1.0, 2.0][i % 2],
               "condition": {"cell_type": ["B", "NK", "CD4T"][i % 3]}} for i in range(12)]
    before = httpx.get(f"{url}/health", timeout=10).json()["stats"]
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda b: httpx.post(f"{url}/generate", json=b, timeout=120), bodies))
    assert [r.status_code for r in replies] == [200] * 12
    for body, r in zip(bodies, replies):
        expected = sampler.sample(body["n"], body["condition"], seed=body["seed"], steps=4,
                                  guidance=body["guidance"], output="arrays")["X"]
        np.testing.assert_allclose(np.asarray(r.json()["X"]), expected, atol=1e-5)
    after = httpx.get(f"{url}/health", timeout=10).json()["stats"]
    assert after["requests"] - before["requests"] == 12 and after["errors"] == before["errors"]
    assert after["runs"] - before["runs"] <= 12


def test_batcher_merges_waiting_requests_into_one_run(sampler):
    """Jobs queued while the worker is busy run as one batch (one onnxruntime call per step),
    with different conditions, guidance and seeds, and each gets exactly its own cells."""
    batcher = Batcher(sampler, window_ms=0, start=False)
    requests = [(4, {"cell_type": "B"}, 1.0, 1), (3, {"condition": "stimulated"}, 2.0, 2),
                (5, {"cell_type": "NK", "condition": "control"}, 1.0, 3), (2, {}, 0.5, 4)]
    futures = []
    for n, cond, w, seed in requests:
        opts = sampler.resolve("ddim", 5, 0.0, w)
        futures.append(batcher.submit(Job(sampler.prepare(n, cond, seed=seed, guidance=w), opts, seed)))
    batcher.start()
    try:
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert batcher.stats["runs"] == 1 and batcher.stats["max_merged"] == 4 and batcher.stats["onnx_calls"] == 5
    for (n, cond, w, seed), x in zip(requests, results):
        expected = sampler.sample(n, cond, seed=seed, steps=5, guidance=w, output="arrays")["X"]
        np.testing.assert_allclose(x, expected, atol=1e-5)


def test_batcher_keeps_stochastic_requests_reproducible(sampler):
    batcher = Batcher(sampler, window_ms=0, start=False)
    opts = sampler.resolve("ddim", 4, 1.0, 1.0)
    jobs = [Job(sampler.prepare(3, {"cell_type": "B"}, seed=s, eta=1.0), opts, s) for s in (5, 6)]
    futures = [batcher.submit(j) for j in jobs]
    batcher.start()
    try:
        merged = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    for s, x in zip((5, 6), merged):
        alone = sampler.sample(3, {"cell_type": "B"}, seed=s, steps=4, eta=1.0, output="arrays")["X"]
        np.testing.assert_allclose(x, alone, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scidiff_serve_command_binds_to_localhost(kang_onnx, sampler):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scidiff", "serve", "--model", str(kang_onnx[1]), "--port",
                             str(port), "--threads", "1", "--max-cells", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "scidiff serve did not start"
                time.sleep(0.2)
        assert health.json()["max_cells"] == 20
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"n": 21}, timeout=30)
        assert r.status_code == 400 and "cap of 20" in r.text
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"n": 4, "seed": 1, "steps": 3}, timeout=60)
        expected = sampler.sample(4, seed=1, steps=3, output="arrays")["X"]
        np.testing.assert_allclose(np.asarray(r.json()["X"]), expected, atol=2e-6)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
    assert proc.returncode is not None


def test_serve_command_refuses_a_missing_model(tmp_path, capsys):
    from scidiff.cli import main

    assert main(["serve", "--model", str(tmp_path / "absent.onnx")]) == 2
    assert "no ONNX model" in capsys.readouterr().err


# -- limits: body size, content type, strict types, bounded values --------------------------------
def _no_echo(r, filler: str):
    """The reply is short and quotes at most 60 characters of the request's long value."""
    assert len(r.content) < 2000, r.text[:300]
    assert filler * 61 not in r.text


def test_an_oversized_body_gets_413_and_is_never_echoed(url):
    big = json.dumps({"n": 2, "junk": "x" * 10_000_000}).encode()
    r = httpx.post(f"{url}/generate", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "at most 1,048,576 bytes" in r.json()["detail"]
    _no_echo(r, "x")
    # chunked, no Content-Length: refused while it arrives
    chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))
    r = httpx.post(f"{url}/generate", content=chunks, headers={"content-type": "application/json"}, timeout=60)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413 and "at most 1,048,576 bytes" in r.json()["detail"]
    _no_echo(r, "x")
    # under the limit but invalid: the error names the field and leaves the value out
    for body, field in (({"n": 2, "junk": "y" * 900_000}, "junk"), ({"n": "y" * 900_000}, "n"),
                        ({"n": 2, "condition": {"cell_type": "y" * 900_000}}, "condition"),
                        ({"n": 2, "condition": {"y" * 900_000: "B"}}, "condition"),
                        ({"n": 2, "sampler": "y" * 900_000}, "sampler")):
        r = httpx.post(f"{url}/generate", json=body, timeout=60)
        assert r.status_code == 422, r.text[:300]
        _no_echo(r, "y")
        assert r.json()["detail"][0]["field"].startswith(field)
        assert all(set(e) == {"loc", "field", "msg", "type"} for e in r.json()["detail"])  # no "input"
    r = httpx.post(f"{url}/generate", json={"n": 2, "condition": {"cell_type": "y" * 250}}, timeout=60)
    assert r.status_code == 400 and "unknown value 'yyyy" in r.text and "(252 characters)" in r.text
    _no_echo(r, "y")
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


def test_the_body_limit_is_exact_and_set_by_max_body_bytes(sampler):
    body = json.dumps({"n": 2, "seed": 1, "steps": 2}).encode()
    padded = body[:-1] + b" " * (1000 - len(body)) + b"}"  # JSON whitespace: exactly 1000 bytes
    json_type = {"content-type": "application/json"}
    with serving(create_app(sampler, max_body_bytes=1000)) as address:
        r = httpx.post(f"{address}/generate", content=padded, headers=json_type, timeout=30)
        assert len(padded) == 1000 and r.status_code == 200, r.text
        r = httpx.post(f"{address}/generate", content=padded + b" ", headers=json_type, timeout=30)
        assert r.status_code == 413 and "at most 1,000 bytes" in r.json()["detail"]
        r = httpx.post(f"{address}/generate", content=iter([padded[:600], padded[600:] + b" "]), headers=json_type,
                       timeout=30)
        assert "content-length" not in r.request.headers and r.status_code == 413
        r = httpx.post(f"{address}/generate", content=iter([padded[:600], padded[600:]]), headers=json_type, timeout=30)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{address}/health", timeout=10).json()["limits"]["max_body_bytes"] == 1000


@pytest.mark.parametrize("body,status,field,message", [
    ({"n": True}, 422, "n", "valid integer"),
    ({"n": 2.0}, 422, "n", "valid integer"),
    ({"n": "3"}, 422, "n", "valid integer"),
    ({"n": 10**20}, 400, "n", f"exceeds this server's cap of {CAP}"),
    ({"n": 2, "steps": True}, 422, "steps", "valid integer"),
    ({"n": 2, "steps": 4.0}, 422, "steps", "valid integer"),
    ({"n": 2, "steps": 0}, 422, "steps", "greater than or equal to 1"),
    ({"n": 2, "steps": 10**9}, 400, "steps", "steps must lie in [1, 200]"),
    ({"n": 2, "seed": True}, 422, "seed", "valid integer"),
    ({"n": 2, "seed": "7"}, 422, "seed", "valid integer"),
    ({"n": 2, "seed": 1.5}, 422, "seed", "valid integer"),
    ({"n": 2, "seed": -1}, 422, "seed", "greater than or equal to 0"),
    ({"n": 2, "seed": 2**63}, 422, "seed", "less than 9223372036854775808"),
    ({"n": 2, "seed": 10**40}, 422, "seed", "less than 9223372036854775808"),
    ({"n": 2, "guidance": 1e30}, 422, "guidance", "less than or equal to 20"),
    ({"n": 2, "guidance": 20.5}, 422, "guidance", "less than or equal to 20"),
    ({"n": 2, "guidance": -0.5}, 422, "guidance", "greater than or equal to 0"),
    ({"n": 2, "guidance": True}, 422, "guidance", "valid number"),
    ({"n": 2, "guidance": "2"}, 422, "guidance", "valid number"),
    ({"n": 2, "eta": 1.5}, 422, "eta", "less than or equal to 1"),
    ({"n": 2, "eta": -0.1}, 422, "eta", "greater than or equal to 0"),
    ({"n": 2, "sampler": 3}, 422, "sampler", "valid string"),
    ({"n": 2, "observed": 1}, 422, "observed", "valid boolean"),
    ({"n": 2, "observed": "true"}, 422, "observed", "valid boolean"),
    ({"n": 2, "format": None}, 422, "format", "'json', 'npz' or 'h5ad'"),
    ({"n": 2, "condition": "B"}, 422, "condition", "valid dictionary"),
    ({"n": 2, "condition": {"cell_type": True}}, 422, "condition", "got a boolean"),
    ({"n": 2, "condition": {"cell_type": {"label": "B"}}}, 422, "condition", "takes one value"),
    ({"n": 2, "condition": {"": "B"}}, 422, "condition", "at least 1 character"),
    ({"n": 2, "condition": {"cell_type": 10**400}}, 422, "condition", "must be finite"),
    ({"n": 2, "condition": {"cell_type": 3}}, 400, "cell_type", "takes a label, a JSON string, not the number 3"),
    ({"n": 2, "condition": {"cell_type": 2.5}}, 400, "cell_type", "takes a label"),
    ({"n": 2, "condition": {"CELL_TYPE": "B"}}, 400, "CELL_TYPE", "unknown condition key 'CELL_TYPE'"),
    ({"n": 2, "seed": 1, "extra": {"nested": [1, 2]}}, 422, "extra", "Extra inputs are not permitted"),
])
def test_types_are_strict_and_values_bounded(url, body, status, field, message):
    r = httpx.post(f"{url}/generate", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert message in r.text
    detail = r.json()["detail"]
    if status == 422:
        assert any(e["field"] == field or e["field"].startswith(field + ".") for e in detail), detail
        assert all("input" not in e for e in detail)
    else:
        assert isinstance(detail, str) and field in detail


def test_a_number_is_not_taken_as_a_label_and_obs_holds_labels(url, sampler):
    labels = sampler.by_key["cell_type"]["labels"]
    r = httpx.post(f"{url}/generate", json={"n": 2, "condition": {"cell_type": 2}}, timeout=30)
    assert r.status_code == 400 and all(repr(label) in r.json()["detail"] for label in labels)
    r = httpx.post(f"{url}/generate", json={"n": 2, "seed": 0, "steps": 2, "condition": {"cell_type": labels[2]}},
                   timeout=30)
    assert r.status_code == 200 and r.json()["obs"]["cell_type"] == [labels[2]] * 2
    # the Python API still takes codes, says so, and writes the label the code stands for in obs
    arrays = sampler.sample(2, {"cell_type": 2}, seed=0, steps=2, output="arrays")
    assert arrays["obs"]["cell_type"] == [labels[2]] * 2
    by_label = sampler.sample(2, {"cell_type": labels[2]}, seed=0, steps=2, output="arrays")
    np.testing.assert_array_equal(arrays["X"], by_label["X"])
    with pytest.raises(ValueError, match="ambiguous value 0 for condition 'k'"):
        OnnxSampler._code("k", ["x", "0"], 0)  # 0 is the code of 'x' and the label '0'
    assert OnnxSampler._code("k", ["0", "x"], 0) == 0  # both readings agree


@pytest.mark.parametrize("guidance,eta", [(0, None), (20, None), (1, 1), (0.0, 0.0)])
def test_bounds_are_inclusive_and_integers_are_numbers(url, guidance, eta):
    body = {"n": 2, "seed": 4, "steps": 2, "guidance": guidance, **({} if eta is None else {"eta": eta})}
    r = httpx.post(f"{url}/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["guidance"] == guidance and (eta is None or r.json()["eta"] == eta)


def test_max_steps_caps_steps(sampler):
    with serving(create_app(sampler, max_steps=12)) as address:
        r = httpx.post(f"{address}/generate", json={"n": 2, "steps": 13}, timeout=30)
        assert r.status_code == 400 and "steps must lie in [1, 12], got 13" in r.json()["detail"]
        assert httpx.post(f"{address}/generate", json={"n": 2, "steps": 12}, timeout=30).status_code == 200
        assert httpx.get(f"{address}/model", timeout=10).json()["limits"]["max_steps"] == 12
        sampler.defaults["steps"], default = 50, sampler.defaults["steps"]  # a sidecar default above the cap
        try:
            r = httpx.post(f"{address}/generate", json={"n": 2}, timeout=30)
            assert r.status_code == 400 and "default steps (50) exceed this server's cap of 12" in r.json()["detail"]
        finally:
            sampler.defaults["steps"] = default


@pytest.mark.parametrize("content,content_type,status,field,message", [
    (b'{"n": 2}', "text/plain", 415, None, "Content-Type: application/json"),
    (b"n=2", "application/x-www-form-urlencoded", 415, None, "Content-Type: application/json"),
    (b'{"n": 2}', None, 415, None, "Content-Type: application/json"),
    (b"not json", "application/json", 422, "body", "not valid JSON"),
    (b"", "application/json", 422, "body", "has no body"),
    (b"[1, 2]", "application/json", 422, "body", "valid dictionary"),
    (b'"n"', "application/json", 422, "body", "valid dictionary"),
    (b'{"n": 2, "n": true}', "application/json", 422, "n", "valid integer"),  # the last duplicate counts
    (b'{"n": 2, "guidance": NaN}', "application/json", 422, "guidance", "finite number"),
    (b'{"n": 2, "eta": Infinity}', "application/json", 422, "eta", "finite number"),
    (b'{"n": 2, "guidance": 1e999}', "application/json", 422, "guidance", "finite number"),
    (b'{"n": 2, "condition": {"cell_type": -Infinity}}', "application/json", 422, "condition", "must be finite"),
    (b'{"n": 2, "condition": {"cell_type": "\xff"}}', "application/json", 400, None, "could not be read as JSON"),
    (b'{"n": 1' + b"0" * 5000 + b"}", "application/json", 400, None, "could not be read as JSON"),
])
def test_hostile_bodies_get_a_clean_4xx(url, content, content_type, status, field, message):
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(f"{url}/generate", content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert message in r.text and len(r.content) < 2000
    if field is not None:
        assert field in [e["field"] for e in r.json()["detail"]]


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.scidiff+json"])
def test_json_content_types_are_accepted(url, content_type):
    r = httpx.post(f"{url}/generate", content=b'{"n": 2, "steps": 2, "seed": 1}',
                   headers={"content-type": content_type}, timeout=30)
    assert r.status_code == 200 and r.json()["n"] == 2


# -- the fair scheduler -----------------------------------------------------------------------------
def _opts(sampler, name, steps, eta=0.0, guidance=1.0):
    return sampler.resolve(name, steps, eta, guidance)


def _alone(sampler, n, cond, seed, name, steps, eta=0.0, guidance=1.0, slice_cell_steps=512):
    """One job through a Batcher of its own."""
    batcher = Batcher(sampler, window_ms=0, slice_cell_steps=slice_cell_steps)
    try:
        job = Job(sampler.prepare(n, cond, seed=seed, guidance=guidance, eta=eta),
                  _opts(sampler, name, steps, eta, guidance), seed)
        return batcher.submit(job).result(timeout=120)
    finally:
        batcher.close()


def test_slicing_never_changes_the_cells(sampler):
    """Slices of 7 cell-steps (every step in blocks of 7 cells) give each request the cells of an
    unsliced run, stochastic DDIM (noise drawn once per step) and DPM-Solver++ (x0 history) too."""
    batcher = Batcher(sampler, window_ms=0, slice_cell_steps=7, start=False)
    requests = [(20, {"cell_type": "B"}, 1, "ddim", 6, 1.0, 1.0), (15, {"condition": "stimulated"}, 2, "dpmpp_2m", 5,
                0.0, 2.0), (9, {"cell_type": "NK"}, 3, "ddim", 4, 0.0, 1.5)]
    futures = [batcher.submit(Job(sampler.prepare(n, c, seed=s, guidance=w, eta=eta),
                                  _opts(sampler, name, k, eta, w), s))
               for n, c, s, name, k, eta, w in requests]
    batcher.start()
    try:
        results = [f.result(timeout=120) for f in futures]
    finally:
        batcher.close()
    assert batcher.stats["onnx_calls"] == 3 * 6 + 3 * 5 + 2 * 4  # blocks of at most 7 cells
    assert batcher.stats["slices"] == batcher.stats["onnx_calls"] and batcher.stats["runs"] == 3
    for (n, c, s, name, k, eta, w), x in zip(requests, results):
        expected = sampler.sample(n, c, seed=s, sampler=name, steps=k, eta=eta, guidance=w, output="arrays")["X"]
        np.testing.assert_allclose(x, expected, atol=1e-5)


def test_jobs_arriving_together_short_ones_first_and_never_merged_with_long_ones(sampler):
    """A long job and two short ones with the same settings, queued together: the short ones are
    merged with each other, not with the long one, and are answered while it is still running."""
    batcher = Batcher(sampler, window_ms=0, slice_cell_steps=512, start=False)
    opts = _opts(sampler, "ddim", 100)
    big = Job(sampler.prepare(2000, {"cell_type": "B"}, seed=1), opts, 1)
    shorts = [Job(sampler.prepare(4, {"cell_type": "NK"}, seed=2), opts, 2),
              Job(sampler.prepare(3, {"condition": "control"}, seed=3), opts, 3)]
    big_running_when_short_done = []
    for job in [big] + shorts:
        batcher.submit(job)
    for job in shorts:
        job.future.add_done_callback(lambda f: big_running_when_short_done.append(not big.future.done()))
    batcher.start()
    try:
        short_x = [j.future.result(timeout=120) for j in shorts]
        big_x = big.future.result(timeout=300)
    finally:
        batcher.close()
    assert big_running_when_short_done == [True, True]
    assert batcher.stats["runs"] == 2 and batcher.stats["max_merged"] == 2
    np.testing.assert_allclose(big_x, sampler.sample(2000, {"cell_type": "B"}, seed=1, steps=100, output="arrays")["X"],
                               atol=1e-5)
    for job, x, cond in zip(shorts, short_x, ({"cell_type": "NK"}, {"condition": "control"})):
        np.testing.assert_allclose(x, sampler.sample(job.n, cond, seed=job.seed, steps=100, output="arrays")["X"],
                                   atol=1e-5)


def test_a_short_job_runs_between_slices_of_a_long_one_with_the_same_cells(sampler):
    """Submitted while a long job runs, a short job (same settings, or others) waits about one
    slice, not for the long job, and gets exactly the cells it gets when it runs alone."""
    batcher = Batcher(sampler, window_ms=0, slice_cell_steps=512)
    try:
        big = Job(sampler.prepare(3000, {"cell_type": "B"}, seed=1), _opts(sampler, "ddim", 150), 1)
        t_big = time.monotonic()
        batcher.submit(big)
        while batcher.stats["slices"] < 2:
            assert not big.future.done()
            time.sleep(0.001)
        shorts = [(4, {"cell_type": "NK"}, 5, "ddim", 150, 0.0), (4, {"cell_type": "CD4T"}, 6, "ddim", 10, 1.0),
                  (3, {"condition": "stimulated"}, 7, "dpmpp_2m", 8, 0.0)]
        latencies, results = [], []
        for n, cond, seed, name, steps, eta in shorts:
            t0 = time.monotonic()
            x = batcher.submit(Job(sampler.prepare(n, cond, seed=seed, eta=eta), _opts(sampler, name, steps, eta),
                                   seed)).result(timeout=120)
            latencies.append(time.monotonic() - t0)
            results.append(x)
            assert not big.future.done(), "the short job waited for the long one"
        big.future.result(timeout=300)
        t_big = time.monotonic() - t_big
    finally:
        batcher.close()
    assert max(latencies) < 0.2 * t_big, (latencies, t_big)
    for (n, cond, seed, name, steps, eta), x in zip(shorts, results):
        np.testing.assert_array_equal(x, _alone(sampler, n, cond, seed, name, steps, eta))
        expected = sampler.sample(n, cond, seed=seed, sampler=name, steps=steps, eta=eta, output="arrays")["X"]
        np.testing.assert_allclose(x, expected, atol=1e-5)


def _turns(batcher, arrivals=lambda turn: ()):
    """Drive ``batcher``'s policy by hand (no worker thread): before each turn admit
    ``arrivals(turn)``, pick a group, run its slice; returns the seed of the first job of each pick."""
    picks = []
    while batcher._groups:
        batcher._admit(list(arrivals(len(picks))))
        group = batcher._pick()
        picks.append(group.jobs[0].seed)
        if not batcher._slice(group):
            batcher._groups.remove(group)
    return picks


def test_equal_requests_finish_in_arrival_order(sampler):
    """Of two equal requests the one started first has fewer cell-steps left, so it runs to the
    end before the other starts (round-robin would alternate them and finish both late)."""
    batcher = Batcher(sampler, window_ms=0, slice_cell_steps=256, max_passed_over=1000, start=False)
    opts = _opts(sampler, "ddim", 20)
    first, second = (Job(sampler.prepare(100, {"cell_type": "B"}, seed=s), opts, s) for s in (1, 2))
    batcher._admit([first])
    picks = _turns(batcher, lambda turn: [second] if turn == 1 else [])
    assert picks == [1] * 10 + [2] * 10  # 100 cells x 20 steps in slices of 2 steps
    for job in (first, second):
        expected = sampler.sample(100, {"cell_type": "B"}, seed=job.seed, steps=20, output="arrays")["X"]
        np.testing.assert_allclose(job.future.result(timeout=0), expected, atol=1e-5)


def test_a_long_request_is_not_starved_by_short_ones(sampler):
    """A new short request every turn goes first, but a long one passed over ``max_passed_over``
    turns in a row runs next."""
    batcher = Batcher(sampler, window_ms=0, slice_cell_steps=64, max_passed_over=3, start=False)
    long_job = Job(sampler.prepare(500, {"cell_type": "B"}, seed=0), _opts(sampler, "ddim", 4), 0)
    batcher._admit([long_job])
    shorts = [Job(sampler.prepare(2, {"cell_type": "NK"}, seed=s), _opts(sampler, "ddim", 5), s) for s in range(1, 25)]
    picks = _turns(batcher, lambda turn: shorts[turn:turn + 1])
    long_turns = [turn for turn, seed in enumerate(picks) if seed == 0]
    assert long_turns[:5] == [3, 7, 11, 15, 19]
    assert len(long_turns) == 4 * 8  # 4 steps, each over 500 cells in 8 blocks of at most 64
    assert long_job.future.done() and all(j.future.done() for j in shorts)
    expected = sampler.sample(500, {"cell_type": "B"}, seed=0, steps=4, output="arrays")["X"]
    np.testing.assert_allclose(long_job.future.result(timeout=0), expected, atol=1e-5)


@pytest.fixture(scope="module")
def fair_url(sampler):
    with serving(create_app(sampler, max_cells=20_000, window_ms=5.0, slice_cell_steps=2048)) as address:
        yield address


def test_a_small_request_is_not_stuck_behind_a_big_one(fair_url, sampler):
    """A 4-cell 10-step request sent while a 10,000-cell 200-step request runs (slices of 2,048
    cell-steps) is answered before it, in under a fifth of its time, with the cells it gets alone."""
    small = {"n": 4, "steps": 10, "seed": 7, "condition": {"cell_type": "NK"}}
    alone = httpx.post(f"{fair_url}/generate", json=small, timeout=60)
    assert alone.status_code == 200
    big_body = {"n": 10_000, "steps": 200, "seed": 1, "format": "npz", "condition": {"cell_type": "B"}}
    before = httpx.get(f"{fair_url}/health", timeout=10).json()["stats"]
    big = {}

    def send_big():
        t0 = time.monotonic()
        r = httpx.post(f"{fair_url}/generate", json=big_body, timeout=600)
        big.update(status=r.status_code, seconds=time.monotonic() - t0, done=time.monotonic())

    thread = threading.Thread(target=send_big)
    thread.start()
    deadline = time.monotonic() + 60
    while httpx.get(f"{fair_url}/health", timeout=10).json()["stats"]["slices"] < before["slices"] + 3:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    t0 = time.monotonic()
    during = httpx.post(f"{fair_url}/generate", json=small, timeout=600)
    t_small, finished = time.monotonic() - t0, time.monotonic()
    big_still_running = "done" not in big
    thread.join(600)
    assert during.status_code == 200 and big["status"] == 200
    assert big_still_running and finished < big["done"]
    assert t_small < 0.2 * big["seconds"], (t_small, big["seconds"])
    assert during.json()["X"] == alone.json()["X"]
    expected = sampler.sample(4, small["condition"], seed=7, steps=10, output="arrays")["X"]
    np.testing.assert_allclose(np.asarray(during.json()["X"]), expected, atol=2e-6)


def test_npz_obs_columns_load_without_pickle():
    """A null numeric covariate (None) made the npz's obs column an object array, which a client's
    numpy.load refuses (allow_pickle=False): numbers go as floats (None: NaN), labels as text."""
    from types import SimpleNamespace

    from scidiff.export.server import npz_column
    sampler = SimpleNamespace(by_key={"dose": {"kind": "continuous"}, "cell_type": {"kind": "categorical"}})
    buf = io.BytesIO()
    np.savez(buf, obs_dose=npz_column(sampler, "dose", [None, 1.5]),
             obs_cell_type=npz_column(sampler, "cell_type", ["B", "NK"]))
    z = np.load(io.BytesIO(buf.getvalue()))  # allow_pickle=False, numpy's default
    np.testing.assert_array_equal(z["obs_dose"], [np.nan, 1.5])
    assert z["obs_cell_type"].tolist() == ["B", "NK"]
    with pytest.raises(ValueError, match="allow_pickle"):  # what the column was before
        buf = io.BytesIO()
        np.savez(buf, obs_dose=np.asarray([None, 1.5]))
        np.load(io.BytesIO(buf.getvalue()))["obs_dose"]
