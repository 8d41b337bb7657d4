"""A model trained on one machine and used on another: the run folder of ``scidiff train`` copied
from a GPU node to a laptop, where the training data is not, and used by ``scidiff sample``,
``predict``, ``denoise``, ``export-onnx`` and ``scidiff.load_model``.

Checked here: the folder, moved and renamed, holds no path of the machine it was trained on and
works without the training data; a read-only copy is only ever read (every write is recorded by
an audit hook, as the tests may run as root, whom ``chmod -w`` does not stop), and ``scidiff
distil``, which writes its student into the checkpoint, refuses such a copy before any work; a
partly copied folder (``model.pt`` truncated, empty or left behind; a damaged ``config.yaml``) is
an error naming the file and, where the run's training checkpoints came along, the one to load;
the trainer's ``checkpoints`` folder given as ``--model`` names its newest file, and a training
checkpoint samples with the run's sampling settings; weights saved from a ``torch.compile``'d or
DDP/DataParallel-wrapped model carry no ``_orig_mod.`` / ``module.`` prefix and files that do
load; every ``torch.load`` maps to the CPU with ``weights_only=True`` and everything scidiff
stores loads that way; cells of other genes, labels or a missing covariate column are refused
or warned about, naming them. Each test marked "(fixed)" failed before its fix.
"""
from __future__ import annotations

import ast
import glob
import os
import shutil
import sys
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scidiff
from scidiff.cli import main
from scidiff.config import sampling_config
from scidiff.training import ScIDiffTrainer, load_model, read_training_checkpoint, save_model
from scidiff.training.checkpoint import atomic_torch_save, model_payload, payload_digest
from training_helpers import TRAIN_KW, synthetic_cells, tiny_model

PACKAGE = os.path.dirname(os.path.abspath(scidiff.__file__))
N_CELLS, N_GENES = 120, 20

RUN_CONFIG = """model:
  gene_dim: 20
  hidden_dim: 32
  num_layers: 2
  num_timesteps: 100
  conditioning_dim: 16
  latent_dim: 8
training:
  batch_size: 32
  warmup_steps: 2
  checkpoint_every: 1
  checkpoint_every_steps: 2
  keep_checkpoints: 3
sampling:
  sampler: ddim
  steps: 7
"""


def _cells() -> ad.AnnData:
    """Counts of two cell types under control and two perturbations (A raises the first 5 genes)."""
    rng = np.random.default_rng(0)
    pert = np.array(["control", "A", "B"])[np.arange(N_CELLS) % 3]
    cell_type = np.array(["T", "B"])[np.arange(N_CELLS) % 2]
    x = rng.poisson(np.where((pert == "A")[:, None] & (np.arange(N_GENES) < 5), 8.0, 2.0), (N_CELLS, N_GENES))
    obs = pd.DataFrame({"perturbation": pert, "cell_type": cell_type}, index=[f"c{i}" for i in range(N_CELLS)])
    return ad.AnnData(x.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)]))


@pytest.fixture(scope="module")
def laptop(tmp_path_factory):
    """``scidiff train`` on "the GPU node", the run folder then moved to "the laptop" under another
    name, and the GPU node's folder (training data, config) deleted. Returns ``(model folder,
    control cells .h5ad, old root)``."""
    node = tmp_path_factory.mktemp("gpu-node")
    _cells().write_h5ad(node / "data.h5ad")
    (node / "run.yaml").write_text(RUN_CONFIG)
    rc = main(["train", "--data", str(node / "data.h5ad"), "--out", str(node / "run"), "--condition-keys",
               "cell_type", "--perturbation-keys", "perturbation", "--config", str(node / "run.yaml"),
               "--epochs", "2", "--device", "cpu"])
    assert rc == 0
    home = tmp_path_factory.mktemp("laptop")
    folder = home / "my model (copy)"
    shutil.move(str(node / "run"), str(folder))
    shutil.rmtree(node)
    cells = _cells()
    cells[cells.obs["perturbation"] == "control"].copy().write_h5ad(home / "control.h5ad")
    return str(folder), str(home / "control.h5ad"), str(node)


def _copy(folder: str, tmp_path, name: str = "copy") -> str:
    out = str(tmp_path / name)
    shutil.copytree(folder, out)
    return out


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


# -- moved, renamed, the training data gone ---------------------------------------------------------
def test_a_moved_run_folder_holds_no_path_of_the_machine_it_was_trained_on(laptop):
    folder, _, old = laptop
    files = [p for p in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(p)]
    assert {os.path.relpath(p, folder) for p in files} >= {"model.pt", "config.yaml", "history.csv",
                                                          "training.json", "checkpoint.pt"}
    for path in files:
        data = open(path, "rb").read()
        assert old.encode() not in data and os.path.basename(old).encode() not in data, path


def test_a_moved_run_folder_samples_without_the_training_data(laptop, tmp_path):
    folder, _, old = laptop
    assert not os.path.exists(old)
    assert main(["sample", "--model", folder, "-n", "4", "--out", str(tmp_path / "cells.h5ad")]) == 0
    out = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert list(out.var_names) == [f"G{i}" for i in range(N_GENES)]
    assert out.n_obs == 4
    assert (out.uns["scidiff"]["sampler"], out.uns["scidiff"]["steps"]) == ("ddim", 7)  # the run's config.yaml


# -- a read-only copy ---------------------------------------------------------------------------------
_WATCHED: dict = {"root": None, "writes": []}
_WRITING_EVENTS = {"os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.symlink",
                   "os.chmod", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile"}


def _inside(path) -> bool:
    root = _WATCHED["root"]
    if root is None or not isinstance(path, (str, bytes, os.PathLike)):
        return False
    return os.path.realpath(os.fsdecode(path)).startswith(root)


def _audit(event, args):
    if _WATCHED["root"] is None:
        return
    if event == "open" and _inside(args[0]):
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)):
            _WATCHED["writes"].append((event, args[0]))
    elif event in _WRITING_EVENTS and any(_inside(a) for a in args):
        _WATCHED["writes"].append((event, args))


sys.addaudithook(_audit)  # hooks stay for the process; this one records only while a folder is watched


@pytest.fixture
def read_only(laptop, tmp_path):
    """A ``chmod -w`` copy of the run, whose every write is recorded (root ignores the mode)."""
    folder = _copy(laptop[0], tmp_path, "read-only run")
    for path in glob.glob(os.path.join(folder, "**"), recursive=True):
        os.chmod(path, 0o555 if os.path.isdir(path) else 0o444)
    os.chmod(folder, 0o555)
    _WATCHED.update(root=os.path.realpath(folder), writes=[])
    yield folder
    _WATCHED["root"] = None
    for path in [folder] + glob.glob(os.path.join(folder, "**"), recursive=True):
        os.chmod(path, 0o755)


def test_a_read_only_model_folder_is_only_read_by_sample_predict_denoise_export_and_load(read_only, laptop,
                                                                                        tmp_path, monkeypatch):
    import scidiff.export.onnx as onnx_export

    exported = []  # export_onnx gets the loaded model, not its folder: the tracing (half a minute) is left out
    monkeypatch.setattr(onnx_export, "export_onnx", lambda model, out, **kw: exported.append((model, out, kw)) or {})
    control, out = laptop[1], tmp_path / "out"
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(read_only, "**"), recursive=True)}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for argv in (["sample", "--model", os.path.join(read_only, "model.pt"), "-n", "2", "--out", str(out / "s")],
                     ["predict", "--model", read_only, "--data", control, "--target", "perturbation=A", "--steps",
                      "3", "--device", "cpu", "--out", str(out / "p.h5ad")],
                     ["denoise", "--model", read_only, "--data", control, "--out", str(out / "d.h5ad")],
                     ["export-onnx", "--model", read_only, "--out", str(out / "m.onnx")]):
            assert main(argv) == 0, argv
    assert not [w for w in seen if "has no column" in str(w.message)]  # the cells carry every covariate
    assert [(type(m).__name__, kw["sampler"], kw["steps"]) for m, _, kw in exported] == [("ScIDiffModel", "ddim", 7)]
    model = scidiff.load_model(read_only)
    assert scidiff.generate(model, 2, progress=False).shape == (2, N_GENES)
    assert _WATCHED["writes"] == []
    assert {p: os.stat(p).st_mtime_ns for p in before} == before


def test_distil_into_a_read_only_model_folder_is_refused_before_any_work(read_only, laptop, monkeypatch,
                                                                           capsys):
    """(fixed) it distilled for the whole run, then failed writing the student into the folder."""
    import scidiff.training.distillation as distillation

    denied = os.path.realpath(read_only)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if (
        mode & os.W_OK and os.path.realpath(p) == denied) else real_access(p, mode, *a, **k))  # as for a non-root user
    monkeypatch.setattr(distillation, "distil", lambda *a, **k: pytest.fail("distillation started"))
    err = _error(capsys, ["distil", "--model", read_only, "--data", laptop[1], "--steps", "2", "--start-steps", "4",
                          "--iterations", "2", "--device", "cpu"])
    model_pt = os.path.join(read_only, "model.pt")
    assert err == (f"scidiff distil: error: --model {read_only!r}: the student is written into {model_pt!r}, but "
                   f"there is no permission to write in {denied!r} (a read-only copy of the run?); give --out "
                   f"NEW.pt to write the checkpoint with its student elsewhere\n")
    assert _WATCHED["writes"] == []


# -- a partly copied folder -----------------------------------------------------------------------
@pytest.mark.parametrize("cut", ["half", "empty"])
def test_a_truncated_model_pt_is_refused_naming_the_file(laptop, tmp_path, capsys, cut):
    folder = _copy(laptop[0], tmp_path)
    path = os.path.join(folder, "model.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2] if cut == "half" else b"")
    message = (f"{path!r} is not a readable scidiff checkpoint: not a complete torch file (truncated, corrupt, or "
               f"another kind of file)")
    for command in ("sample", "export-onnx"):
        out = str(tmp_path / ("x.onnx" if command == "export-onnx" else "x.h5ad"))
        argv = [command, "--model", folder, "--out", out] + (["-n", "2"] if command == "sample" else [])
        assert _error(capsys, argv) == f"scidiff {command}: error: {message}\n"
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        load_model(folder)


def test_a_run_folder_copied_without_model_pt_names_its_latest_training_checkpoint(laptop, tmp_path, capsys):
    folder = _copy(laptop[0], tmp_path)
    os.remove(os.path.join(folder, "model.pt"))
    latest = os.path.join(folder, "checkpoint.pt")
    assert _error(capsys, ["sample", "--model", folder, "-n", "2", "--out", str(tmp_path / "x.h5ad")]) == (
        f"scidiff sample: error: no checkpoint at {os.path.join(folder, 'model.pt')!r}: the run has not finished; "
        f"its latest training checkpoint is {latest!r} (load that file, or resume the run)\n")
    with pytest.raises(FileNotFoundError, match=f"its latest training checkpoint is {latest!r}"):
        load_model(folder)


def test_a_run_folder_with_only_its_step_checkpoints_names_the_newest_one(laptop, tmp_path):
    """(fixed) only ``checkpoints/step-*.pt`` came along: the error said nothing of them."""
    folder = _copy(laptop[0], tmp_path)
    os.remove(os.path.join(folder, "model.pt"))
    os.remove(os.path.join(folder, "checkpoint.pt"))
    steps = sorted(glob.glob(os.path.join(folder, "checkpoints", "step-*.pt")))
    assert [os.path.basename(p) for p in steps] == ["step-000000004.pt", "step-000000006.pt", "step-000000008.pt"]
    with pytest.raises(FileNotFoundError, match=f"^no checkpoint at {os.path.join(folder, 'model.pt')!r}: the run "
                                                f"has not finished; its latest training checkpoint is {steps[-1]!r}"):
        load_model(folder)
    assert isinstance(load_model(steps[-1]), scidiff.ScIDiffModel)


@pytest.mark.parametrize("damage", ["not yaml", "unknown key"])
def test_a_damaged_config_yaml_is_refused_naming_it(laptop, tmp_path, capsys, damage):
    folder = _copy(laptop[0], tmp_path)
    path = os.path.join(folder, "config.yaml")
    text = open(path).read()
    open(path, "w").write(text[: text.index("sampling:")] + ("sampling: [ddim" if damage == "not yaml" else
                                                               "sampling:\n  sampl: 3\n"))
    err = _error(capsys, ["sample", "--model", folder, "-n", "2", "--out", str(tmp_path / "x.h5ad")])
    assert err.startswith(f"scidiff sample: error: {path}: ")
    said = "not valid YAML" if damage == "not yaml" else "unknown key(s) ['sampl'] in section 'sampling'"
    assert said in err


# -- the trainer's training checkpoints -------------------------------------------------------------
def test_the_checkpoints_folder_given_as_model_names_its_newest_file_and_the_run_folder(laptop, capsys, tmp_path):
    """(fixed) it said ``no checkpoint at 'RUN/checkpoints/model.pt'`` and nothing more."""
    folder = laptop[0]
    checkpoints = os.path.join(folder, "checkpoints")
    newest = os.path.join(checkpoints, "step-000000008.pt")
    message = (f"no checkpoint at {os.path.join(checkpoints, 'model.pt')!r}: {checkpoints!r} holds a run's training "
               f"checkpoints; give one of its files (the newest is {newest!r}), or the run folder {folder!r} for its "
               f"finished model")
    with pytest.raises(FileNotFoundError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        load_model(checkpoints)
    err = _error(capsys, ["sample", "--model", checkpoints, "-n", "2", "--out", str(tmp_path / "x.h5ad")])
    assert f"its files (the newest is {newest!r})" in err


def test_a_training_checkpoint_samples_with_the_runs_sampling_settings(laptop, tmp_path):
    """(fixed) ``RUN/checkpoints/step-*.pt`` was sampled with the default sampler, not the
    ``sampling:`` section of ``RUN/config.yaml`` that ``RUN/model.pt`` and ``RUN/checkpoint.pt`` get."""
    folder = laptop[0]
    step = os.path.join(folder, "checkpoints", "step-000000006.pt")
    for path in (folder, os.path.join(folder, "checkpoint.pt"), step):
        assert (sampling_config(path).sampler, sampling_config(path).steps) == ("ddim", 7), path
    assert main(["sample", "--model", step, "-n", "2", "--out", str(tmp_path / "s.h5ad")]) == 0
    uns = ad.read_h5ad(tmp_path / "s.h5ad").uns["scidiff"]
    assert (uns["sampler"], uns["steps"]) == ("ddim", 7)
    # a training checkpoint holds the EMA weights of its step
    payload = read_training_checkpoint(step)
    assert payload["step"] == 6
    weights = load_model(step).state_dict()
    assert all(_equal(weights[k], v) for k, v in payload["state_dict"].items())


# -- wrapped models: torch.compile, DDP, DataParallel -----------------------------------------------
@pytest.fixture(scope="module")
def cells():
    return synthetic_cells()


def _equal(a, b) -> bool:
    """Equal tensors, NaN where NaN (the perturbation effects' unused cross-validation slots)."""
    return a.shape == b.shape and torch.allclose(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=True)


def _same_weights(model, other) -> bool:
    a, b = model.state_dict(), other.state_dict()
    return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)


def test_a_compiled_model_saved_with_save_model_loads_into_a_plain_model(cells, tmp_path):
    """(fixed) its weights were saved as ``_orig_mod.*``: ``does not match its own model config``."""
    model = tiny_model(cells)
    path = save_model(torch.compile(model, backend="eager"), tmp_path / "compiled.pt")
    stored = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert list(stored) == list(model.state_dict())  # no '_orig_mod.' prefix
    assert _same_weights(load_model(path), model)
    path = save_model(torch.nn.DataParallel(model), tmp_path / "data-parallel.pt")  # 'module.' (no .config before)
    assert _same_weights(load_model(path), model)


def test_a_trainer_given_a_compiled_model_writes_a_run_that_loads_into_a_plain_model(cells, tmp_path):
    """(fixed) ``model.pt`` and ``checkpoint.pt`` held ``_orig_mod.*`` weights: neither loaded."""
    model = tiny_model(cells)
    compiled = torch.compile(model, backend="eager")
    trainer = ScIDiffTrainer(compiled, cells.loader(32), checkpoint_dir=str(tmp_path / "run"), checkpoint_every=1,
                             **TRAIN_KW)
    assert trainer.model is model and trainer._net is compiled  # trained through the compiled forward
    trainer.train(1)
    loaded = load_model(tmp_path / "run")
    assert _same_weights(loaded, model)
    payload = read_training_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert not [k for name in ("state_dict", "live_state_dict") for k in payload[name] if "_orig_mod" in k]
    again = ScIDiffTrainer(tiny_model(cells), cells.loader(32), **TRAIN_KW)  # resumed without compiling
    again.resume(tmp_path / "run" / "checkpoint.pt")
    assert again.step == trainer.step
    with pytest.raises(ValueError, match=r"^the model is already wrapped \(OptimizedModule\); with use_ddp or "
                                         r"compile, pass the model itself"):
        ScIDiffTrainer(compiled, cells.loader(32), compile="eager", **TRAIN_KW)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_a_checkpoint_whose_weights_carry_a_wrappers_prefix_loads(cells, tmp_path, prefix):
    """(fixed) a file written from a DDP-wrapped or compiled model (by an older scidiff, or by hand)."""
    model = tiny_model(cells)
    payload = model_payload(model)
    payload["state_dict"] = {prefix + k: v for k, v in payload["state_dict"].items()}
    payload["digest"] = payload_digest(payload)
    atomic_torch_save(payload, str(tmp_path / "wrapped.pt"))
    assert _same_weights(load_model(tmp_path / "wrapped.pt"), model)


def test_the_trainers_save_paths_always_store_the_models_own_weight_names():
    """``model.pt`` and training checkpoints come from ``self.model`` (never the DDP or compiled
    wrapper ``self._net``) through ``model_payload``, which unwraps what it is given."""
    source = open(os.path.join(PACKAGE, "training", "trainer.py")).read()
    assert "save_model(self.model," in source and "model_payload(self.model," in source
    assert "self._net.state_dict" not in source and "self._ddp.state_dict" not in source


# -- torch.load: the CPU, weights only ----------------------------------------------------------------
def _torch_load_calls():
    for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
        for node in ast.walk(ast.parse(open(path).read())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                yield os.path.relpath(path, PACKAGE), node


def test_every_torch_load_in_scidiff_maps_to_the_cpu_and_loads_weights_only():
    calls = list(_torch_load_calls())
    assert calls  # the checkpoint reader's
    for where, node in calls:
        kw = {k.arg: k.value for k in node.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
        assert isinstance(kw.get("map_location"), ast.Constant) and kw["map_location"].value == "cpu", where


def test_loading_and_resuming_call_torch_load_with_map_location_cpu_and_weights_only(laptop, cells, tmp_path,
                                                                                    monkeypatch):
    folder = laptop[0]
    seen, real = [], torch.load

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no GPU here: 'cuda' falls back to the CPU, warned
        load_model(folder, map_location="cuda")
    read_training_checkpoint(folder)
    trainer = ScIDiffTrainer(tiny_model(cells), cells.loader(32), checkpoint_dir=str(tmp_path / "run"), **TRAIN_KW)
    trainer.train(1)
    ScIDiffTrainer(tiny_model(cells), cells.loader(32), **TRAIN_KW).resume(tmp_path / "run")
    assert len(seen) >= 3
    assert all(kw.get("map_location") == "cpu" and kw.get("weights_only") is True for kw in seen), seen


def test_everything_a_run_stores_loads_with_plain_torch_load_weights_only(laptop):
    """What a user's own script does on the laptop (torch 2.6+ defaults to ``weights_only=True``)."""
    for path in glob.glob(os.path.join(laptop[0], "**", "*.pt"), recursive=True):
        payload = torch.load(path, map_location="cpu")
        assert payload["format"] == "scidiff.checkpoint", path


# -- cells that do not match the model --------------------------------------------------------------
def _control(laptop, tmp_path, change) -> str:
    cells = ad.read_h5ad(laptop[1])
    cells = change(cells) or cells
    path = str(tmp_path / "cells.h5ad")
    cells.write_h5ad(path)
    return path


@pytest.mark.parametrize("command", ["predict", "denoise"])
def test_cells_of_other_genes_are_refused_naming_the_missing_ones(laptop, tmp_path, capsys, command):
    path = _control(laptop, tmp_path, lambda a: a[:, :15].copy())
    extra = ["--target", "perturbation=A", "--steps", "3"] if command == "predict" else []
    err = _error(capsys, [command, "--model", laptop[0], "--data", path, "--out", str(tmp_path / "x.h5ad")] + extra)
    assert err == (f"scidiff {command}: error: 5 of the model's genes are not in the data: "
                   f"['G15', 'G16', 'G17', 'G18', 'G19'] (read from X of {path!r})\n")


def test_load_model_with_other_genes_names_them(laptop):
    genes = [f"G{i}" for i in range(N_GENES - 1)] + ["CD3E"]
    with pytest.raises(ValueError, match=r"was built for a different gene set \(20 genes vs 20\); first genes not "
                                         r"in it: \['CD3E'\]"):
        load_model(laptop[0], genes=genes)


@pytest.mark.parametrize("command", ["predict", "denoise"])
def test_cells_of_a_cell_type_the_model_never_saw_are_refused_naming_it(laptop, tmp_path, capsys, command):
    def relabel(a):
        a.obs["cell_type"] = "NK"
    path = _control(laptop, tmp_path, relabel)
    extra = ["--target", "perturbation=A", "--steps", "3"] if command == "predict" else []
    err = _error(capsys, [command, "--model", laptop[0], "--data", path, "--out", str(tmp_path / "x.h5ad")] + extra)
    assert err == (f"scidiff {command}: error: obs['cell_type'] has values the model does not know: ['NK'] "
                   f"(in {path!r}); known values: ['B', 'T']\n")


def test_a_target_the_model_never_saw_is_refused_naming_the_known_ones(laptop, tmp_path, capsys):
    err = _error(capsys, ["sample", "--model", laptop[0], "-n", "2", "--condition", "perturbation=C", "--out",
                          str(tmp_path / "x.h5ad")])
    assert err == ("scidiff sample: error: --condition 'perturbation=C': unknown perturbation: ['C'] in 'C' for "
                   "condition 'perturbation' never appeared in training; known single perturbations: ['A', 'B'] "
                   "(control: ['control', 'ctrl'])\n")


def test_predict_on_cells_without_the_models_cell_type_column_warns_naming_it(laptop, tmp_path):
    """(fixed) the cells were predicted under the null cell type without a word (denoise warned)."""
    def drop(a):
        del a.obs["cell_type"]
    path = _control(laptop, tmp_path, drop)
    said = (f"obs of {path!r} has no column ['cell_type'] of the model's covariates: its cells are predicted under "
            f"the model's null condition for them (add the column to condition on it)")
    argv = ["predict", "--model", laptop[0], "--target", "perturbation=A", "--steps", "3", "--device", "cpu"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(argv + ["--data", path, "--out", str(tmp_path / "p.h5ad")]) == 0
    said_here = [w for w in seen if "has no column" in str(w.message)]
    assert [str(w.message) for w in said_here] == [said]
    assert said_here[0].filename.endswith(os.path.join("scidiff", "cli", "predict.py"))  # 'scidiff predict: ...'
    # cells with the column: no word (the read-only test's predict)
