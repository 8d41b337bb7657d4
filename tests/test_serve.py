"""The generation server on 127.0.0.1: real HTTP requests to an in-process uvicorn server (and
one `scidiff serve` subprocess), the 4xx paths, the cap on n and request batching."""
import io
import os
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


@pytest.fixture(scope="module")
def url(sampler):
    app = create_app(sampler, max_cells=CAP, window_ms=5.0)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    assert host == "127.0.0.1"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(15)
    assert not thread.is_alive()


def test_health_and_model(url, sampler):
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["max_cells"] == CAP
    assert health["providers"] == ["CPUExecutionProvider"]
    info = httpx.get(f"{url}/model", timeout=10).json()
    assert info["genes"] == sampler.genes and len(info["genes"]) == 100
    assert "B" in info["conditions"]["cell_type"] and sorted(info["conditions"]["condition"]) == ["control", "stimulated"]
    assert info["version"] == sampler.meta["scidiff_version"] and info["samplers"] == ["ddim", "dpmpp_2m"]
    assert info["defaults"]["steps"] == 8


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


@pytest.mark.parametrize("body,status,message", [
    ({"n": CAP + 1}, 400, f"exceeds this server's cap of {CAP}"),
    ({"n": 2, "condition": {"tissue": "lung"}}, 400, "unknown condition key 'tissue'"),
    ({"n": 2, "condition": {"cell_type": "Neuron"}}, 400, "unknown value 'Neuron' for condition 'cell_type'"),
    ({"n": 2, "sampler": "euler"}, 400, "unknown sampler 'euler'"),
    ({"n": 2, "steps": 5000}, 400, "steps must lie in [1, 200]"),
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
