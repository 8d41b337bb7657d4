"""Training from Python with what a biologist brings: a config changed in Python or given as a
file or dict, one condition key as a string, a run folder that already holds a run, a model
loaded onto a device string the machine lacks."""
import csv
import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff import config as scidiff_config
from scidiff.config import Config, load_config
from scidiff.training.checkpoint import CHECKPOINT_FILE, read_training_checkpoint


def _cells(n=80, genes=24, seed=0):
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({"cell type": pd.Categorical(rng.choice(["T cell", "B-Zelle", "NKé"], n))},
                       index=[f"c{i}" for i in range(n)])
    return ad.AnnData(rng.poisson(2, size=(n, genes)).astype(np.float32), obs=obs,
                      var=pd.DataFrame(index=[f"g{i}" for i in range(genes)]))


def _config(**training) -> Config:
    c = load_config(overrides={"model": {"hidden_dim": 16, "num_layers": 1, "num_timesteps": 50,
                                         "conditioning_dim": 16, "latent_dim": 8},
                               "training": {"num_epochs": 1, "batch_size": 32, "warmup_steps": 2}})
    for k, v in training.items():
        setattr(c.training, k, v)
    return c


def _train(adata, out, config, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return scidiff.train(adata, str(out), config, progress=False, **kw)


def test_one_condition_key_as_a_string_is_that_key(tmp_path):
    """``condition_keys="cell type"`` was split into its characters (obs keys 'c', 'e', ...)."""
    model = _train(_cells(), tmp_path / "run", _config(), condition_keys="cell type")
    assert list(model.condition_encoder.keys) == ["cell type"]


def test_train_takes_a_yaml_path_or_a_dict_of_sections(tmp_path):
    """A config given as a path or a dict was an AttributeError ('str' object has no attribute 'data')."""
    path = tmp_path / "small.yaml"
    path.write_text("model: {hidden_dim: 16, num_layers: 1, num_timesteps: 50, conditioning_dim: 16, latent_dim: 8}\n"
                    "training: {num_epochs: 1, batch_size: 32, warmup_steps: 2}\n")
    model = _train(_cells(), tmp_path / "a", str(path))
    assert model.config()["hidden_dim"] == 16
    model = _train(_cells(), tmp_path / "b", {"model": {"hidden_dim": 16, "num_layers": 1, "num_timesteps": 50,
                                                       "conditioning_dim": 16, "latent_dim": None},
                                             "training": {"num_epochs": 1, "batch_size": 32}})
    assert model.config()["hidden_dim"] == 16 and not model.config().get("latent_dim")
    with pytest.raises(KeyError, match="trainig"):
        scidiff_config.as_config({"trainig": {"num_epochs": 1}})


def test_a_config_changed_in_python_is_checked_with_its_key_named(tmp_path):
    """``config.training.val_fraction = 1.5`` trained on no cells ('the training loader yields no batches')."""
    bad = _config(val_fraction=1.5)
    with pytest.raises(ValueError, match=r"training\.val_fraction must be in \[0, 1\)"):
        _train(_cells(), tmp_path / "run", bad)
    assert not (tmp_path / "run").exists()
    c = _config()
    c.model.gene_dim = "2000"
    assert scidiff_config.check_config(c).model.gene_dim == 2000


def test_load_config_overrides_name_a_bad_section():
    with pytest.raises(KeyError, match="unknown section 'trainig'"):
        load_config(overrides={"trainig": {"num_epochs": 1}})
    with pytest.raises(ValueError, match="section 'training' must be a mapping"):
        load_config(overrides={"training": 5})


def test_load_model_on_a_device_the_machine_lacks_falls_back_to_cpu(tmp_path):
    """``map_location="cuda"`` without CUDA was torch's AssertionError; ``"auto"`` a RuntimeError."""
    _train(_cells(), tmp_path / "run", _config())
    model = scidiff.load_model(tmp_path / "run", map_location="auto")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type == want
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="CUDA was requested but is not available"):
            model = scidiff.load_model(tmp_path / "run", map_location="cuda:0")
        assert next(model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        scidiff.load_model(tmp_path / "run", map_location="gpu")


def test_config_yaml_is_written_with_its_file_closed(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        scidiff.train(_cells(), str(tmp_path / "run"), _config(), progress=False)
    assert not [w for w in caught if issubclass(w.category, ResourceWarning) and "config.yaml" in str(w.message)]
    assert load_config(tmp_path / "run" / "config.yaml").model.hidden_dim == 16


def test_a_fresh_run_into_a_folder_holding_a_run_leaves_none_of_its_files(tmp_path):
    """The new run appended its steps.csv rows to the old run's, and left the old run's
    checkpoint.pt beside its own model.pt (so a later resume continued the other run)."""
    out = tmp_path / "run"
    _train(_cells(), out, _config(num_epochs=2, checkpoint_every=1, log_every_steps=1))
    assert read_training_checkpoint(out / CHECKPOINT_FILE)["epoch"] == 2
    _train(_cells(), out, _config(num_epochs=1, checkpoint_every=0, log_every_steps=1))
    with open(out / "steps.csv") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps == sorted(set(steps)) and steps[0] == 1
    assert not os.path.exists(out / CHECKPOINT_FILE)
    # with checkpoints of its own, only its own remain
    _train(_cells(), out, _config(num_epochs=2, checkpoint_every=1, keep_checkpoints=3))
    _train(_cells(), out, _config(num_epochs=1, checkpoint_every=1, keep_checkpoints=3, seed=1))
    assert read_training_checkpoint(out)["epoch"] == 1
    assert len(os.listdir(out / "checkpoints")) == 1


def test_too_few_cells_for_a_detection_model_says_what_to_do(tmp_path):
    """12 cells: 'the detection model needs at least 16 cells, got 12', and nothing more."""
    with pytest.raises(ValueError, match=r"at least 16 cells, got 12.*latent_dim: null"):
        _train(_cells(12), tmp_path / "run", _config(val_fraction=0.0))


def test_a_backed_anndata_trains_as_its_file_does(tmp_path):
    """``anndata.read_h5ad(path, backed="r")``, how atlases are opened, failed deep inside
    ('_CSRDataset' object has no attribute 'indptr'). In memory it trains as the file does, bit for
    bit; with streaming=True it streams its file; a backed subset cannot be streamed and says so."""
    import scipy.sparse as sp
    cells = _cells()
    cells.X = sp.csr_matrix(cells.X)
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    from_file = _train(str(path), tmp_path / "file", _config(), condition_keys="cell type")
    backed = ad.read_h5ad(path, backed="r")
    from_backed = _train(backed, tmp_path / "backed", _config(), condition_keys="cell type")
    for a, b in zip(from_file.state_dict().values(), from_backed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    streamed = _train(backed, tmp_path / "streamed", _config(), condition_keys="cell type", streaming=True)
    streamed_file = _train(str(path), tmp_path / "streamed_file", _config(), condition_keys="cell type",
                           streaming=True)
    for a, b in zip(streamed.state_dict().values(), streamed_file.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="a subset of .*cells.h5ad.*write the subset to a file first"):
        _train(backed[:40], tmp_path / "subset", _config(), condition_keys="cell type", streaming=True)
    subset = _train(backed[:40], tmp_path / "subset", _config(), condition_keys="cell type")
    assert subset.data_spec.n_genes == cells.n_vars
    denoised = scidiff.denoise(from_backed, backed[:10], steps=2, progress=False)  # the verbs read it alike
    assert denoised.n_obs == 10 and np.isfinite(np.asarray(denoised.layers["scidiff_denoised"])).all()
    backed.file.close()
