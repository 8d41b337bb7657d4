"""What a first-time user brings to `scidiff distil`, `distil()` and the ONNX export of a model or
its student: outputs that would destroy a file or fail only at the end, step counts and opsets
the code cannot honour, an AnnData as the training cells. Each is refused before any work with a
message naming the flag or argument, or gives what the documented path gives."""
import json
import os

import numpy as np
import pytest
import torch

import scidiff
from scidiff.cli import main
from scidiff.export.runtime import SIDECAR_FORMAT
from scidiff.models import ScIDiffModel
from scidiff.tasks.cells import model_cells
from scidiff.training import ScIDiffTrainer, load_model
from scidiff.training.distillation import distil, halving_rounds

T = 100


@pytest.fixture(scope="module")
def run(kang_small, tmp_path_factory):
    """A tiny model trained on the `counts` layer of 300 real Kang cells (100 genes, two
    covariates) with a 2-step student, saved as a run folder beside its training file."""
    root = tmp_path_factory.mktemp("distil_inputs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adata = kang_small.copy()
        adata.write_h5ad(root / "train.h5ad")
        data = scidiff.setup_anndata(adata, layer="counts", n_top_genes=100, condition_keys=["cell_type", "condition"])
        torch.manual_seed(0)
        model = ScIDiffModel.from_data(data, hidden_dim=16, num_layers=1, num_timesteps=T, latent_dim=8,
                                       conditioning_dim=8)
        ScIDiffTrainer(model, data.loader(64, seed=0), device="cpu", learning_rate=2e-3, warmup_steps=2,
                       early_stopping_patience=None, progress=False, seed=0).train(2)
        model.eval()
        model.student = distil(model, data, steps=2, start_steps=4, iterations_per_round=3, batch_size=64,
                               progress=False)
        scidiff.save_model(model, root / "run")
    finally:
        torch.set_num_threads(threads)
    return root, load_model(root / "run")


def _distil_args(root, *extra):
    return ["distil", "--model", str(root / "run"), "--data", str(root / "train.h5ad"), "--steps", "1",
            "--start-steps", "2", "--iterations", "1", "--device", "cpu", *extra]


# -- scidiff distil --out ------------------------------------------------------------------------
def test_distil_refuses_to_write_its_checkpoint_over_the_training_file(run, tmp_path, capsys):
    """`--out train.h5ad` (a slip for --data) replaced the user's data with a checkpoint."""
    root, _ = run
    before = (root / "train.h5ad").read_bytes()
    data = tmp_path / "train.h5ad"
    data.write_bytes(before)
    args = _distil_args(root, "--out", str(data))
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "train.h5ad" in err and "is the --data file" in err
    assert data.read_bytes() == before


def test_distil_refuses_to_replace_a_file_that_is_not_a_checkpoint(run, tmp_path, capsys):
    root, _ = run
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert main(_distil_args(root, "--out", str(notes))) == 2
    assert "exists and is not a checkpoint" in capsys.readouterr().err and notes.read_text() == "my notes\n"


def test_distil_out_ending_in_a_slash_is_refused_before_the_work(run, tmp_path, capsys):
    """`--out newrun/` distilled every round, then failed in the rename with a temporary file's
    name (`Not a directory: '.tmp-...newrun' -> 'newrun/'`)."""
    root, _ = run
    out = str(tmp_path / "newrun") + "/"
    assert main(_distil_args(root, "--out", out)) == 2
    err = capsys.readouterr().err
    assert "names a folder" in err and os.path.join(out, "model.pt") in err and ".tmp-" not in err
    assert "distilling" not in err and not os.listdir(tmp_path)


def test_distil_can_still_replace_a_checkpoint_given_as_out(run, tmp_path, capsys):
    root, _ = run
    out = tmp_path / "copy.pt"
    out.write_bytes((root / "run" / "model.pt").read_bytes())
    assert main(_distil_args(root, "--out", str(out))) == 0, capsys.readouterr().err
    assert load_model(out).student.steps == 1


# -- distil() in Python ----------------------------------------------------------------------------
def test_distil_takes_an_anndata_as_its_training_cells(run, kang_small):
    """An AnnData (the natural `cells` of a biologist) failed with `KeyError: 'x'`; it is read
    like the model's training cells, giving the very student the CellData gives."""
    _, model = run
    kw = dict(steps=1, start_steps=2, iterations_per_round=2, batch_size=64, progress=False, seed=3)
    from_anndata = distil(model, kang_small, **kw)
    _, _, cells = model_cells(model, kang_small)
    reference = distil(model, cells, **kw)
    assert from_anndata.steps == 1
    for k, v in reference.parameters.items():
        assert torch.equal(from_anndata.parameters[k], v), k


@pytest.mark.parametrize("kwargs,match", [
    (dict(iterations_per_round=0), "iterations_per_round must be a whole number >= 1, got 0"),
    (dict(steps=1.0), "steps must be a whole number of sampling steps, got 1.0"),
    (dict(steps=1, start_steps="2"), "start_steps must be a whole number of sampling steps, got '2'"),
])
def test_distil_refuses_arguments_it_cannot_use_by_name(run, kwargs, match):
    """iterations_per_round=0 raised ZeroDivisionError, float steps a TypeError from `&`."""
    _, model = run
    kw = dict(steps=1, start_steps=2, iterations_per_round=1, progress=False)
    with pytest.raises(ValueError, match=match):
        distil(model, [], **{**kw, **kwargs})


def test_the_suggested_start_steps_fit_the_schedule():
    """The advice was `steps x 16` whatever the schedule: start_steps=128 for a 100-step one,
    itself refused; steps over half the schedule got a message about start_steps."""
    with pytest.raises(ValueError, match="e.g. start_steps=64$") as exc:
        halving_rounds(8, 12, T)
    halving_rounds(8, 64, T)  # the advice works
    assert "start_steps=128" not in str(exc.value)
    with pytest.raises(ValueError, match="e.g. start_steps=64$"):
        halving_rounds(4, 128, T)
    with pytest.raises(ValueError, match="steps=60: .* at most 50"):
        halving_rounds(60, 120, T)


def test_going_on_from_a_student_names_its_steps(run):
    """With `initial`, `start_steps` is the student's: the error said to pass start_steps=32, which
    is ignored."""
    _, model = run
    with pytest.raises(ValueError, match="the initial student samples in 2 steps: .* got steps=2") as exc:
        distil(model, [], steps=2, initial=model.student, progress=False)
    assert "start_steps" not in str(exc.value)


# -- ONNX export ---------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", ["13", "17", "0", "-1", "99"])
def test_an_opset_the_exporter_cannot_write_is_refused_before_any_file(run, tmp_path, capsys, opset):
    """--opset 13 and 99 wrote opset 18 without a word, 0 and -1 the default, 17 an invalid graph
    (ReduceMin's noop_with_empty_axes) that onnx's checker then rejected after the files were written."""
    pytest.importorskip("onnx")
    root, _ = run
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", "--model", str(root / "run"), "--out", str(out), "--opset", opset]) == 2
    err = capsys.readouterr().err
    assert f"--opset {opset} cannot be exported" in err and "18 to" in err
    assert not os.listdir(tmp_path)


def test_a_student_export_with_other_steps_is_refused(run, tmp_path, capsys):
    """`--sampler distilled --steps 25` (or steps=25 in Python, the samplers' default) exported the
    2-step student and recorded 2 steps; any number but the student's own is refused."""
    pytest.importorskip("onnx")
    from scidiff.export.onnx import export_onnx  # lazy: onnx is an optional extra

    root, model = run
    with pytest.raises(ValueError, match="exactly 2 steps, not 25"):
        export_onnx(model, tmp_path / "s.onnx", sampler="distilled", steps=25)
    assert main(["export-onnx", "--model", str(root / "run"), "--out", str(tmp_path / "s.onnx"),
                 "--sampler", "distilled", "--steps", "25"]) == 2
    assert "exactly 2 steps, not 25" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_a_graph_that_fails_its_check_replaces_no_earlier_export(run, tmp_path, monkeypatch):
    """The graph was renamed into place before onnxruntime checked it: a failed check left the new
    graph beside the old sidecar (whose checksum no longer matched). The graph checked is written
    in the opset asked for (18 to the installed onnx's newest)."""
    onnx = pytest.importorskip("onnx")
    from scidiff.export import onnx as exporter  # lazy: onnx is an optional extra

    _, model = run
    out = tmp_path / "m.onnx"
    np.savez(tmp_path / "m.decoder.npz", mean=np.zeros(3))  # an earlier export, as it would be replaced
    (tmp_path / "m.json").write_text(json.dumps({"format": SIDECAR_FORMAT, "onnx_file": "m.onnx"}))
    (tmp_path / "m.onnx").write_bytes(b"earlier graph")
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    opsets = []

    def failing(path, *args, **kwargs):
        opsets.append([o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")])
        raise RuntimeError(f"{kwargs.get('name', path)}: onnxruntime output differs from torch")

    monkeypatch.setattr(exporter, "_check_saved", failing)
    with pytest.raises(RuntimeError, match="m.onnx: onnxruntime output differs"):
        exporter.export_onnx(model, out, opset=19)
    assert opsets == [[19]]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


def test_an_export_does_not_replace_a_file_beside_it_that_is_not_an_export(run, tmp_path, capsys):
    """`--out RUN/training.onnx` replaced the run's training.json with the sidecar."""
    root, _ = run
    record = tmp_path / "training.json"
    record.write_text('{"weights": "last", "epoch": 3}\n')
    assert main(["export-onnx", "--model", str(root / "run"), "--out", str(tmp_path / "training.onnx")]) == 2
    err = capsys.readouterr().err
    assert "sidecar" in err and "training.json" in err and "not an earlier export's" in err
    assert record.read_text() == '{"weights": "last", "epoch": 3}\n' and os.listdir(tmp_path) == ["training.json"]


def test_every_commands_out_ending_in_a_slash_is_refused_before_the_work(tmp_path):
    """The general rule under distil's own message: check_out, which every command's --out goes
    through, refuses 'newdir/' for a file (export-onnx traced the model, then failed in the rename)."""
    from scidiff.cli.common import check_out
    with pytest.raises(ValueError, match="is a folder; give a file path"):
        check_out(str(tmp_path / "newdir") + "/")
    assert check_out(str(tmp_path / "newdir") + "/", folder=True) and not os.listdir(tmp_path)


def test_training_over_a_distilled_run_says_the_student_is_left_out(run, tmp_path):
    """`scidiff train --out RUN` (again, or --resume) after `scidiff distil` into RUN/model.pt wrote a
    model.pt without the student, silently: few-step sampling then failed with 'no distilled
    student'. Now a warning says so before training, naming the file and the way back."""
    import shutil

    from scidiff.config import load_config

    root, _ = run
    shutil.copytree(root / "run", tmp_path / "run")
    config = load_config(overrides={"model": {"hidden_dim": 16, "num_layers": 1, "num_timesteps": 50,
                                              "conditioning_dim": 8, "latent_dim": 8},
                                    "training": {"num_epochs": 1, "batch_size": 64, "warmup_steps": 2}})
    with pytest.warns(UserWarning, match=r"model.pt' holds a distilled student; .* distil again"):
        model = scidiff.train(str(root / "train.h5ad"), str(tmp_path / "run"), config, progress=False,
                              condition_keys=["cell_type"])
    assert model.student is None and load_model(tmp_path / "run").student is None
