"""Shared fixtures. Real data lives in ../shared/data beside the project; tests that need it
skip with the reason when it is absent."""
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be switched on before
# any kernel module is imported (tests/test_kernels.py). It changes nothing else: on CPU,
# scidiff.ops picks the torch references unless SCIDIFF_KERNELS=triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from shared_data import shared_file


@pytest.fixture(scope="session")
def kang_path():
    return shared_file("kang_ifnb_pbmc.h5ad")


@pytest.fixture(scope="session")
def kang(kang_path):
    import anndata as ad

    return ad.read_h5ad(kang_path)


@pytest.fixture(scope="session")
def kang_small(kang):
    """300 Kang cells (every cell type and condition), 200 highly variable genes, for quick tests."""
    import numpy as np

    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(kang.n_obs, 300, replace=False))
    return kang[idx].copy()


@pytest.fixture(scope="session")
def kang_onnx(tmp_path_factory, kang_small):
    """A small latent model trained on Kang cells for 20 epochs, saved as a run and exported by
    ``scidiff export-onnx``: ``(model, path to model.onnx)`` (tests of scidiff.export)."""
    from onnx_helpers import train_and_export_kang

    return train_and_export_kang(tmp_path_factory.mktemp("onnx"), kang_small)
