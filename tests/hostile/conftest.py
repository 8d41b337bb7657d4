"""The hostile-input suite's harness: run the real ``scidiff`` command in a child process (so a
crash shows as a signal, not as a dead test run) and check that it failed cleanly: exit status
2, no traceback, and a message that names the culprit."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

TINY_CONFIG = """\
model: {gene_dim: 100, hidden_dim: 64, num_layers: 2, num_timesteps: 100, conditioning_dim: 16, latent_dim: 16}
training: {batch_size: 64, num_epochs: 3, warmup_steps: 2, checkpoint_every: 100, early_stopping_patience: null}
"""


def run_cli(*args, timeout: float = 300, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``python -m scidiff ARGS`` in a child process, text output captured."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "scidiff", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=full_env)


def assert_clean_error(result: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 2 (never 1, never a signal), no traceback, and every one of ``names`` in stderr."""
    err = result.stderr
    assert result.returncode == 2, f"exit status {result.returncode}, expected 2\nstderr:\n{err[-3000:]}"
    assert "Traceback" not in err, f"a traceback reached the user:\n{err[-3000:]}"
    for name in names:
        assert str(name) in err, f"the message does not name {name!r}:\n{err[-3000:]}"
    return err


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile_config") / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    return path


@pytest.fixture(scope="session")
def kang_file(tmp_path_factory, kang_small):
    """300 real Kang cells (log1p-normalised CSR ``X``, raw counts in ``layers['counts']``) as an .h5ad."""
    path = tmp_path_factory.mktemp("hostile_data") / "kang300.h5ad"
    kang_small.write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, kang_file, tiny_config):
    """A run folder trained by ``scidiff train`` on the 300 Kang cells (3 epochs, a tiny network)."""
    out = tmp_path_factory.mktemp("hostile_run") / "run"
    result = run_cli("train", "--data", kang_file, "--condition-keys", "cell_type,condition", "--config", tiny_config,
                     "--out", out, "--seed", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)
