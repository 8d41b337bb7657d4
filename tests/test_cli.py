"""The command line on real data (a 300-cell Kang subset), and its errors."""
import json
import os

import anndata as ad
import numpy as np
import pytest

from scidiff.cli import main

SMALL_CONFIG = """
model:
  gene_dim: 100
  hidden_dim: 64
  num_layers: 2
  num_timesteps: 200
  latent_dim: 16
training:
  batch_size: 64
  num_epochs: 4
  warmup_steps: 5
  checkpoint_every: 2
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, kang_small):
    root = tmp_path_factory.mktemp("cli")
    data = root / "kang_small.h5ad"
    kang_small.write_h5ad(data)
    config = root / "small.yaml"
    config.write_text(SMALL_CONFIG)
    out = root / "run"
    rc = main(["train", "--data", str(data), "--condition-keys", "cell_type,condition", "--out", str(out),
               "--config", str(config), "--epochs", "4"])
    assert rc == 0
    return root, data, out


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for cmd in ("train", "sample", "evaluate", "demo"):
        assert cmd in text
    for cmd in ("train", "sample", "evaluate", "demo"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "usage: scidiff " + cmd in capsys.readouterr().out


def test_train_writes_a_self_contained_run(run):
    root, _, out = run
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.yaml", "history.csv", "model.pt"]
    assert len((out / "history.csv").read_text().strip().splitlines()) == 1 + 4


def test_sample_and_evaluate(run, kang_small):
    root, data, out = run
    gen = root / "generated.h5ad"
    assert main(["sample", "--model", str(out), "-n", "40", "--condition", "cell_type=B,condition=stimulated",
                 "--condition", "cell_type=CD4T,condition=control", "--steps", "10", "--seed", "3",
                 "--out", str(gen)]) == 0
    g = ad.read_h5ad(gen)
    assert g.shape == (80, 100)
    assert list(g.obs["cell_type"].unique()) == ["B", "CD4T"]
    assert (g.obs["condition"].to_numpy() == np.array(["stimulated"] * 40 + ["control"] * 40)).all()
    assert set(g.var_names) <= set(kang_small.var_names) and float(g.X.min()) >= 0
    # the same seed gives the same cells
    gen2 = root / "generated2.h5ad"
    main(["sample", "--model", str(out), "-n", "40", "--condition", "cell_type=B,condition=stimulated",
          "--condition", "cell_type=CD4T,condition=control", "--steps", "10", "--seed", "3", "--out", str(gen2)])
    np.testing.assert_array_equal(ad.read_h5ad(gen2).X, g.X)

    report = root / "report"
    assert main(["evaluate", "--real", str(data), "--generated", str(gen), "--groupby", "cell_type",
                 "--out", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    for k in ("mmd", "energy_distance", "fid", "classifier_auc", "mean_correlation", "gene_correlation"):
        assert np.isfinite(metrics[k])
    assert set(metrics["per_cell_type"]) == {"B", "CD4T"}
    for png in ("pca.png", "umap.png", "gene_means.png", "gene_variances.png"):
        assert (report / png).stat().st_size > 1000


def test_errors_name_the_problem_and_leave_no_file(run, capsys, tmp_path):
    root, data, out = run
    target = tmp_path / "never.h5ad"
    assert main(["sample", "--model", str(out), "-n", "5", "--condition", "cell_type=Neuron", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "unknown value 'Neuron' for condition 'cell_type'" in err and "CD4T" in err
    assert not target.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]

    assert main(["train", "--data", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "r")]) == 2
    assert "missing.h5ad" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--condition-keys", "drug", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "drug" in err and "available obs keys" in err and "cell_type" in err
    assert main(["sample", "--model", str(tmp_path / "nothing"), "-n", "2", "--out", str(target)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["evaluate", "--real", str(data), "--generated", str(data), "--groupby", "batch",
                 "--out", str(tmp_path / "rep")]) == 2
    assert "obs key 'batch'" in capsys.readouterr().err


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    from scidiff.data import write_h5ad

    path = tmp_path / "out.h5ad"
    a = ad.AnnData(X=np.ones((3, 2), np.float32))
    write_h5ad(a, path)
    before = path.read_bytes()

    def boom(self, filename, **kw):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", boom)
    with pytest.raises(OSError, match="disk full"):
        write_h5ad(ad.AnnData(X=np.zeros((5, 2), np.float32)), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.h5ad"]
