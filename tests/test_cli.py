"""The command line on real data (a 300-cell Kang subset), and its errors; the command table
against the README; sampling defaults from the run's config; config validation."""
import json
import os
import re
import shutil
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import yaml

from scidiff import cli
from scidiff.cli import COMMANDS, build_parser, main

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

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


def _readme_command_lines() -> list[str]:
    """The ``scidiff <cmd> ...`` lines of the README's "Command line" section."""
    text = open(README).read()
    section = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.strip().startswith("scidiff ")]


def _subparser(name):
    return build_parser()._subparsers._group_actions[0].choices[name]


def test_help_lists_every_command_of_the_table(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for cmd in COMMANDS:
        assert re.search(rf"^\s+{re.escape(cmd)}\s", text, re.M), cmd
    assert list(build_parser()._subparsers._group_actions[0].choices) == list(COMMANDS)
    assert "denoise" in COMMANDS and "design" in COMMANDS and "export-onnx" in COMMANDS


def test_every_command_the_readme_names_has_help_and_its_flags():
    lines = _readme_command_lines()
    assert len(lines) >= len(COMMANDS)
    for line in lines:
        cmd = line.split()[1]
        assert cmd in COMMANDS, f"the README names {cmd!r}, which is not a command"
        result = subprocess.run([sys.executable, "-m", "scidiff", cmd, "--help"], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and f"usage: scidiff {cmd}" in result.stdout, result.stderr
        known = _subparser(cmd)._option_string_actions
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*|-n)(?![\w-])", line):
            assert flag in known, f"README: scidiff {cmd} {flag} is not a flag of the command"


def test_every_command_of_the_table_is_in_the_readme():
    named = {line.split()[1] for line in _readme_command_lines()}
    assert set(COMMANDS) <= named, f"not in the README's command line section: {sorted(set(COMMANDS) - named)}"


def test_sampler_choices_agree_everywhere():
    from scidiff.config import _CHOICES
    from scidiff.diffusion.samplers import SAMPLERS

    every = sorted([*SAMPLERS, "distilled"])  # the distilled student's sampler besides the solvers
    assert sorted(cli.SAMPLER_CHOICES) == every == sorted(_CHOICES["sampling.sampler"])


def test_train_writes_a_self_contained_run(run):
    root, _, out = run
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.yaml", "history.csv", "model.pt", "training.json"]
    assert len((out / "history.csv").read_text().strip().splitlines()) == 1 + 4
    kept = json.loads((out / "training.json").read_text())
    # by default the validation loss is reported, not used to stop: the last EMA weights are kept
    assert kept["epochs_trained"] == 4 and kept["weights"] == "last" and kept["early_stopping_patience"] is None
    assert "best_val_loss" in kept


def test_early_stopping_is_opt_in_from_the_command_line(run, tmp_path):
    root, data, _ = run
    out = tmp_path / "stopped"
    assert main(["train", "--data", str(data), "--condition-keys", "cell_type,condition", "--out", str(out),
                 "--config", str(root / "small.yaml"), "--epochs", "3", "--early-stopping-patience", "1"]) == 0
    kept = json.loads((out / "training.json").read_text())
    assert kept["early_stopping_patience"] == 1 and kept["weights"] == "best" and kept["epoch"] == kept["best_epoch"]


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
    assert set(metrics["measurement"]) == {"detected_per_cell", "total_per_cell", "detection_per_gene",
                                           "mean_per_gene", "variance_per_gene"}
    assert all(0 <= v <= 1 for v in metrics["measurement"].values())
    assert set(metrics["per_cell_type"]) == {"B", "CD4T"}
    for png in ("pca.png", "umap.png", "gene_means.png", "gene_variances.png"):
        assert (report / png).stat().st_size > 1000
    assert metrics["auc_repeats"] == 1
    # --auc-repeats averages draws of the classifier; the distances are those of one draw
    assert main(["evaluate", "--real", str(data), "--generated", str(gen), "--groupby", "cell_type",
                 "--auc-repeats", "3", "--no-plots", "--out", str(root / "report3")]) == 0
    three = json.loads((root / "report3" / "metrics.json").read_text())
    assert three["auc_repeats"] == 3 and three["classifier_auc"] != metrics["classifier_auc"]
    assert {k: three[k] for k in ("mmd", "energy_distance")} == {k: metrics[k] for k in ("mmd", "energy_distance")}


def test_layer_and_raw_flags_read_the_expression_where_it_lies(run, kang_small):
    """A file whose X is scaled (centred: refused as expression) with its log1p values in a layer
    and in .raw: --layer / --use-raw read them, and give what the unscaled file gives."""
    root, data, out = run
    x = kang_small.X.toarray() if hasattr(kang_small.X, "toarray") else np.asarray(kang_small.X)
    scaled = kang_small.copy()
    scaled.raw = kang_small.copy()
    scaled.layers["lognorm"] = kang_small.X.copy()
    scaled.X = (x - x.mean(0)) / (x.std(0) + 1e-6)
    path = root / "scaled.h5ad"
    scaled.write_h5ad(path)
    gen = root / "for_raw.h5ad"
    assert main(["sample", "--model", str(out), "-n", "30", "--condition", "cell_type=B,condition=control",
                 "--steps", "5", "--out", str(gen)]) == 0
    assert main(["evaluate", "--real", str(path), "--generated", str(gen), "--no-plots",
                 "--out", str(root / "ev_scaled")]) == 2  # refused: the error points to --use-raw / --layer
    scores = {}
    for name, real, flags in [("unscaled", data, []), ("raw", path, ["--use-raw"]), ("layer", path,
                                                                                     ["--layer", "lognorm"])]:
        assert main(["evaluate", "--real", str(real), *flags, "--generated", str(gen), "--no-plots",
                     "--out", str(root / f"ev_{name}")]) == 0
        scores[name] = json.loads((root / f"ev_{name}" / "metrics.json").read_text())["mmd"]
    assert scores["raw"] == scores["unscaled"] == scores["layer"]
    control = kang_small[kang_small.obs["condition"] == "control"][:20].copy()
    control_scaled = scaled[control.obs_names].copy()
    control.write_h5ad(root / "ctrl.h5ad")
    control_scaled.write_h5ad(root / "ctrl_scaled.h5ad")
    predicted = {}
    for name, cells, flags in [("unscaled", "ctrl.h5ad", []), ("layer", "ctrl_scaled.h5ad", ["--layer", "lognorm"]),
                               ("raw", "ctrl_scaled.h5ad", ["--use-raw"])]:
        assert main(["predict", "--model", str(out), "--data", str(root / cells), *flags, "--target",
                     "condition=stimulated", "--steps", "3", "--out", str(root / f"pred_{name}.h5ad")]) == 0
        predicted[name] = ad.read_h5ad(root / f"pred_{name}.h5ad").X
    np.testing.assert_array_equal(predicted["layer"], predicted["unscaled"])
    np.testing.assert_array_equal(predicted["raw"], predicted["unscaled"])


def test_sample_without_a_condition_draws_the_training_groups(run, kang_small, capsys):
    root, _, out = run
    gen = root / "like_the_data.h5ad"
    assert main(["sample", "--model", str(out), "-n", "300", "--steps", "2", "--out", str(gen)]) == 0
    assert "drawn from 14 training groups in their proportions" in capsys.readouterr().out
    counts = ad.read_h5ad(gen).obs.groupby(["cell_type", "condition"], observed=True).size()
    real = kang_small.obs.groupby(["cell_type", "condition"], observed=True).size()
    assert counts.sum() == 300 and set(counts.index) == set(real.index)
    assert (abs(counts - real.loc[counts.index] / real.sum() * 300) < 4).all()  # the training split's shares


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


def _sample_uns(args) -> dict:
    out = args[args.index("--out") + 1]
    assert main(["sample", *args]) == 0
    g = ad.read_h5ad(out)
    return {**{k: g.uns["scidiff"][k] for k in ("sampler", "steps", "eta", "guidance_scale")}, "X": np.asarray(g.X)}


def test_sample_takes_its_defaults_from_the_config_and_flags_override(run, tmp_path):
    _, data, out = run
    parsed = build_parser().parse_args(["sample", "--model", "m", "-n", "1", "--out", "x.h5ad"])
    assert (parsed.sampler, parsed.steps, parsed.eta, parsed.guidance) == (None, None, None, None)
    own = tmp_path / "run"
    own.mkdir()
    shutil.copy(out / "model.pt", own / "model.pt")
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["sampling"] = {"sampler": "ddim", "steps": 3, "eta": 0.5, "guidance_scale": 2.0}
    (own / "config.yaml").write_text(yaml.safe_dump(config))
    base = ["--model", str(own), "-n", "6", "--condition", "cell_type=B", "--seed", "1"]
    got = _sample_uns(base + ["--out", str(tmp_path / "a.h5ad")])
    assert (got["sampler"], got["steps"], got["eta"], got["guidance_scale"]) == ("ddim", 3, 0.5, 2.0)
    explicit = _sample_uns(["--model", str(out / "model.pt"), *base[2:], "--sampler", "ddim", "--steps", "3",
                            "--eta", "0.5", "--guidance", "2", "--out", str(tmp_path / "b.h5ad")])
    np.testing.assert_array_equal(got["X"], explicit["X"])  # the config's settings are the ones used
    got = _sample_uns(base + ["--steps", "4", "--guidance", "1.5", "--out", str(tmp_path / "c.h5ad")])
    assert (got["sampler"], got["steps"], got["eta"], got["guidance_scale"]) == ("ddim", 4, 0.5, 1.5)
    other = tmp_path / "other.yaml"
    other.write_text("sampling: {sampler: heun, steps: 2}\n")
    got = _sample_uns(base + ["--config", str(other), "--out", str(tmp_path / "d.h5ad")])
    assert (got["sampler"], got["steps"], got["eta"], got["guidance_scale"]) == ("heun", 2, 0.0, 1.0)
    # predict takes its guidance scale from the same section
    control = tmp_path / "control.h5ad"
    ad.read_h5ad(data)[:12].copy().write_h5ad(control)
    predicted = tmp_path / "p.h5ad"
    assert main(["predict", "--model", str(own), "--data", str(control), "--target", "condition=stimulated",
                 "--steps", "2", "--out", str(predicted)]) == 0
    assert ad.read_h5ad(predicted).uns["scidiff_prediction"]["guidance_scale"] == 2.0


@pytest.mark.parametrize("text, culprit", [
    ("model: {gene_dimm: 3}\n", "unknown key(s) ['gene_dimm'] in section 'model'"),
    ("trainig: {}\n", "unknown section(s) ['trainig']"),
    ("training: {batch_size: abc}\n", "training.batch_size must be int, got 'abc'"),
    ("training: {batch_size: 64.5}\n", "training.batch_size must be int, got 64.5"),
    ("training: {compile: 'yes'}\n", "training.compile must be bool"),
    ("training: {val_fraction: 1.5}\n", "training.val_fraction must be in [0, 1), got 1.5"),
    ("training: {seed: null}\n", "training.seed must not be null"),
    ("data: {condition_keys: cell_type}\n", "data.condition_keys must be list[str]"),
    ("sampling: {sampler: euler}\n", "sampling.sampler must be one of"),
    ("sampling: {steps: 0}\n", "sampling.steps must be >= 1, got 0"),
    ("model: 5\n", "section 'model' must be a mapping of keys, got 5"),
    ("- model\n- training\n", "a config is a mapping of sections"),
    ("model: {gene_dim: [\n", "not valid YAML (line 2"),
    ("training: {learning_rate: .inf}\n", "training.learning_rate must be float (a finite number), got inf"),
    ("data: {target_sum: .nan}\n", "data.target_sum must be float | None (a finite number), got nan"),
    ("data: {input: logp}\n", "data.input must be one of ['auto', 'counts', 'log1p'], got 'logp'"),
    ("data: {scaling: foo}\n", "data.scaling must be one of ['global', 'gene', 'none'], got 'foo'"),
])
def test_config_errors_name_the_file_and_the_key(tmp_path, text, culprit):
    from scidiff.config import load_config

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises((KeyError, ValueError)) as caught:
        load_config(path)
    message = cli.user_error(caught.value)
    assert message is not None and str(path) in message and culprit in message


def test_a_malformed_section_is_refused_even_where_a_flag_sets_one_of_its_keys(tmp_path):
    from scidiff.config import load_config

    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  - hidden_dim: 64\n")  # a list, not a mapping: it used to be dropped silently
    with pytest.raises(ValueError) as caught:
        load_config(path, {"model": {"gene_dim": 50}})  # as `scidiff train --n-genes 50 --config bad.yaml`
    assert str(path) in str(caught.value) and "section 'model' must be a mapping of keys" in str(caught.value)


def test_config_accepts_yaml_numbers_and_nulls(tmp_path):
    from scidiff.config import load_config

    path = tmp_path / "ok.yaml"
    path.write_text("training: {learning_rate: 1e-3, batch_size: 32.0, early_stopping_patience: null}\n"
                    "data: {target_sum: 1e4, condition_keys: [cell_type]}\nsampling:\n")
    c = load_config(path)
    assert c.training.learning_rate == 1e-3 and c.training.batch_size == 32 and isinstance(c.training.batch_size, int)
    assert c.training.early_stopping_patience is None and c.data.target_sum == 1e4
    assert c.data.condition_keys == ["cell_type"] and c.sampling.sampler == "dpmpp_2m"


def _run_failing(monkeypatch, exc):
    """``main`` on a command whose handler raises ``exc``."""
    def boom(args):
        raise exc

    monkeypatch.setitem(COMMANDS, "evaluate", cli.Command(COMMANDS["evaluate"].add, boom))
    return main(["evaluate", "--real", "a.h5ad", "--generated", "b.h5ad", "--out", "report"])


def test_bugs_keep_their_traceback_and_bad_environments_exit_2(monkeypatch, capsys):
    with pytest.raises(RuntimeError, match="deep in torch"):
        _run_failing(monkeypatch, RuntimeError("deep in torch"))
    with pytest.raises(KeyError):
        _run_failing(monkeypatch, KeyError("weight"))  # a failed lookup: a bug, not input
    assert _run_failing(monkeypatch, PermissionError(13, "Permission denied", "/data/run/model.pt")) == 2
    assert "scidiff evaluate: error: Permission denied: '/data/run/model.pt'" in capsys.readouterr().err
    assert _run_failing(monkeypatch, OSError(28, "No space left on device", "out.h5ad")) == 2
    assert "No space left on device: 'out.h5ad'" in capsys.readouterr().err
    assert _run_failing(monkeypatch, KeyError("obs key 'batch' is not in the data")) == 2
    assert "error: obs key 'batch' is not in the data" in capsys.readouterr().err


def test_out_that_cannot_be_written_fails_before_any_work(run, tmp_path, capsys, monkeypatch):
    _, data, out = run
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["sample", "--model", str(out), "-n", "2", "--out", str(blocker / "g.h5ad")]) == 2
    assert "cannot write --out" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(blocker), "--epochs", "1"]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert main(["sample", "--model", str(out), "-n", "2", "--out", str(tmp_path / "new" / "deep" / "g.h5ad"),
                 "--steps", "2"]) == 0  # missing parent folders are made
    assert (tmp_path / "new" / "deep" / "g.h5ad").exists()
    # ... by the writer: a run refused after the check leaves no empty folder behind
    assert main(["sample", "--model", str(out), "-n", "2", "--condition", "cell_type=NotAType", "--out",
                 str(tmp_path / "never" / "g.h5ad")]) == 2
    assert "NotAType" in capsys.readouterr().err and not (tmp_path / "never").exists()
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # permissions cannot be taken away from root: pretend the folder is read-only
    monkeypatch.setattr(cli.os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    assert main(["sample", "--model", str(out), "-n", "2", "--out", str(locked / "g.h5ad")]) == 2
    assert f"no permission to write in '{locked}'" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(locked / "run"), "--epochs", "1"]) == 2
    assert "cannot write --out" in capsys.readouterr().err and not os.listdir(locked)


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


def test_sigterm_stops_a_command_with_its_file_unwritten(tmp_path, monkeypatch, capsys):
    """A batch scheduler's time limit sends SIGTERM: the command stops as on Ctrl-C, the file it
    was writing leaves no temporary name behind, and the exit status is 143."""
    import signal

    from scidiff.data.h5ad_writer import H5adWriter

    def writing(args):
        with H5adWriter(tmp_path / "g.h5ad", ["a", "b"]) as writer:
            writer.append(np.ones((3, 2), np.float32))
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between these
                writer.append(np.ones((3, 2), np.float32))

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setitem(COMMANDS, "sample", cli.Command(COMMANDS["sample"].add, writing))
    assert main(["sample", "--model", "m", "-n", "3", "--out", str(tmp_path / "g.h5ad")]) == 143
    assert "scidiff sample: terminated" in capsys.readouterr().err
    assert os.listdir(tmp_path) == [] and signal.getsignal(signal.SIGTERM) is before


def test_labels_with_commas_are_named_on_the_command_line(tmp_path, kang_small):
    """Cell Ontology labels hold commas (CELLxGENE's ``CD4-positive, alpha-beta T cell``): a comma
    starts a new ``key=value`` only where an ``=`` follows."""
    from scidiff.cli.common import parse_conditions

    assert parse_conditions("cell_type=CD4-positive, alpha-beta T cell,condition=stimulated") == {
        "cell_type": "CD4-positive, alpha-beta T cell", "condition": "stimulated"}
    assert parse_conditions("drug=A+B, dose=10") == {"drug": "A+B", "dose": "10"}
    with pytest.raises(ValueError, match="key=value"):
        parse_conditions("B cell,condition=stimulated")
    a = kang_small.copy()
    a.obs["cell_type"] = a.obs["cell_type"].astype(str).replace({"CD4T": "CD4-positive, alpha-beta T cell"})
    a.write_h5ad(tmp_path / "cl.h5ad")
    (tmp_path / "small.yaml").write_text(SMALL_CONFIG)
    assert main(["train", "--data", str(tmp_path / "cl.h5ad"), "--condition-keys", "cell_type,condition", "--out",
                 str(tmp_path / "run"), "--config", str(tmp_path / "small.yaml"), "--epochs", "1"]) == 0
    assert main(["sample", "--model", str(tmp_path / "run"), "-n", "5", "--steps", "3", "--condition",
                 "cell_type=CD4-positive, alpha-beta T cell,condition=stimulated", "--out",
                 str(tmp_path / "g.h5ad")]) == 0
    assert set(ad.read_h5ad(tmp_path / "g.h5ad").obs["cell_type"]) == {"CD4-positive, alpha-beta T cell"}


def test_a_refused_resume_leaves_the_runs_config_as_it_was(run, tmp_path, capsys):
    """``--resume`` with settings that do not fit the run's checkpoint is refused, and the run's
    config.yaml still describes its model.pt (it was replaced before the resume was tried)."""
    _, data, out = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = (copy / "config.yaml").read_text()
    assert main(["train", "--data", str(data), "--condition-keys", "cell_type,condition", "--out", str(copy),
                 "--n-genes", "60", "--epochs", "1", "--resume"]) == 2
    assert "error" in capsys.readouterr().err
    assert (copy / "config.yaml").read_text() == before


def test_a_fresh_run_over_a_finished_one_keeps_the_old_pair_until_it_ends(run, tmp_path, monkeypatch, capsys):
    """A new run written into a finished run's folder replaces its config.yaml with its model.pt:
    interrupted, the folder still holds the old model with the config that made it; finished, the
    new pair."""
    from scidiff.training import ScIDiffTrainer
    from scidiff.training.checkpoint import load_model
    root, data, out = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = (copy / "config.yaml").read_text()
    args = ["train", "--data", str(data), "--condition-keys", "cell_type,condition", "--out", str(copy),
            "--config", str(root / "small.yaml"), "--n-genes", "60", "--epochs", "1"]
    with monkeypatch.context() as m:
        m.setattr(ScIDiffTrainer, "train", lambda self, epochs: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(args) == 130
    assert "replaced when this run ends" in capsys.readouterr().out
    assert (copy / "config.yaml").read_text() == before
    assert main(args) == 0
    assert yaml.safe_load((copy / "config.yaml").read_text())["model"]["gene_dim"] == 60
    assert load_model(str(copy)).data_spec.n_genes == 60
