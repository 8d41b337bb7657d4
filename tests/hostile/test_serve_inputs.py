"""Hostile inputs to ``scidiff serve`` itself: each bad model file, address or setting must end
the command with exit status 2, no traceback and a message naming the culprit, before anything
is served. (Hostile HTTP requests to a running server are in tests/test_serve.py.)"""
from __future__ import annotations

import json
import shutil
import socket

import pytest

from conftest import assert_clean_error, run_cli

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TIMEOUT = 120  # a command that started serving instead of failing would hang until this


@pytest.fixture(scope="module")
def model(kang_onnx):
    """The path of a good exported model (the shared ``kang_onnx`` fixture)."""
    return kang_onnx[1]


def _copy_export(model, folder):
    """The exported files (model.onnx, model.json, model.decoder.npz) copied into ``folder``."""
    folder.mkdir()
    for path in model.parent.iterdir():
        shutil.copy(path, folder / path.name)
    return folder / model.name


def test_a_missing_model_file(tmp_path):
    absent = tmp_path / "absent.onnx"
    assert_clean_error(run_cli("serve", "--model", absent, timeout=TIMEOUT), "no ONNX model", str(absent))


def test_a_folder_as_the_model(tmp_path):
    assert_clean_error(run_cli("serve", "--model", tmp_path, timeout=TIMEOUT), "--model", "is a folder")


def test_a_file_that_is_not_onnx_without_a_sidecar(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"this is not an ONNX graph\n" * 10)
    assert_clean_error(run_cli("serve", "--model", fake, timeout=TIMEOUT), "no sidecar", str(tmp_path / "model.json"))


def test_a_text_file_passed_as_the_model(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert_clean_error(run_cli("serve", "--model", notes, timeout=TIMEOUT), str(notes),
                       "not a readable scidiff ONNX sidecar")


def test_a_pytorch_checkpoint_passed_as_the_model(tmp_path):
    """A run's model.pt is what a user has before exporting: told to export it first."""
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"PK\x03\x04 not read")
    assert_clean_error(run_cli("serve", "--model", checkpoint, timeout=TIMEOUT), str(checkpoint),
                       "not an ONNX export", "scidiff export-onnx")


def test_a_corrupted_onnx_file_beside_its_sidecar(model, tmp_path):
    """Garbage in place of the graph: the sidecar's SHA-256 catches it; without the checksum,
    onnxruntime's own parse error is reported, naming the file."""
    onnx = _copy_export(model, tmp_path / "export")
    onnx.write_bytes(b"\x08\x07garbage" * 100)
    assert_clean_error(run_cli("serve", "--model", onnx, timeout=TIMEOUT), str(onnx), "SHA-256 differs")
    sidecar = onnx.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    del meta["onnx_sha256"]
    sidecar.write_text(json.dumps(meta))
    assert_clean_error(run_cli("serve", "--model", onnx, timeout=TIMEOUT), "cannot load --model", str(onnx))


def test_a_sidecar_that_is_not_json(model, tmp_path):
    onnx = _copy_export(model, tmp_path / "export")
    onnx.with_suffix(".json").write_text("{not json")
    assert_clean_error(run_cli("serve", "--model", onnx, timeout=TIMEOUT), str(onnx.with_suffix(".json")),
                       "not a readable scidiff ONNX sidecar")


def test_a_port_already_in_use(model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--model", model, "--port", port, "--threads", 1, timeout=TIMEOUT)
    assert_clean_error(result, f"127.0.0.1:{port}", "already in use")


@pytest.mark.parametrize("flag,value,message", [
    ("--port", "70000", "--port must lie in [0, 65535], got 70000"),
    ("--port", "-1", "--port must lie in [0, 65535], got -1"),
    ("--port", "http", "argument --port: invalid int value: 'http'"),
    ("--max-cells", "0", "--max-cells must be >= 1, got 0"),
    ("--max-cells", "many", "argument --max-cells: invalid int value"),
    ("--threads", "0", "--threads must be >= 1, got 0"),
    ("--threads", "-4", "--threads must be >= 1, got -4"),
    ("--max-steps", "0", "--max-steps must be >= 1"),
    ("--max-body-bytes", "-1", "--max-body-bytes must be >= 1"),
    ("--slice-cell-steps", "0", "--slice-cell-steps must be >= 1"),
    ("--max-batch-cells", "0", "--max-batch-cells must be >= 1"),
    ("--window-ms", "nan", "--window-ms must be a finite number >= 0"),
    ("--window-ms", "-5", "--window-ms must be a finite number >= 0"),
    ("--device", "tpu", "argument --device: invalid choice: 'tpu'"),
])
def test_invalid_settings(model, flag, value, message):
    assert_clean_error(run_cli("serve", "--model", model, flag, value, timeout=TIMEOUT), message)


def test_cuda_requested_without_a_usable_gpu(model):
    import onnxruntime as ort

    from scidiff.export.runtime import cuda_device_count

    if "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_count() > 0:
        pytest.skip("a GPU is usable here: --device cuda would serve")
    assert_clean_error(run_cli("serve", "--model", model, "--device", "cuda", "--port", 0, timeout=TIMEOUT),
                       "device='cuda' requested")
