"""The command line driven by a workflow manager (Snakemake, Nextflow, a SLURM script).

Checked here, on tiny synthetic cells and one tiny model trained once: every command's ``--help``
exits 0 and ``python -m scidiff`` behaves as ``scidiff``; a user error exits 2 with one line
``scidiff <command>: error: ...`` on stderr naming the file, and no traceback; stdout holds the
result lines alone (progress bars and warnings go to stderr); relative paths are read from the
working directory, and paths with spaces and non-ASCII characters work; an output whose folder
does not exist yet gets its folder, for every command; an interrupted command (KeyboardInterrupt,
as SIGTERM is unwound, while its file is written) exits 130 and leaves neither a partial file nor a
temporary one, and an earlier run's output as it was: a single ``.h5ad`` of ``sample``, ``predict``
and ``denoise``, the report folder of ``evaluate`` (its plots and ``metrics.json`` replaced
together), and the folder of ``sample --out FOLDER`` (a re-run never leaves the earlier run's
manifest or merged file describing other cells than its shards); two commands run side by side
into one folder each write their own file.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import threading

import anndata as ad
import pytest

from scidiff.cli import COMMANDS, main
from scidiff.data import h5ad_writer
from scidiff.tasks.design.job import output_paths
from test_notebook_inputs import scanpy_cells

evaluate_task = importlib.import_module("scidiff.tasks.evaluate")  # the module (scidiff.tasks.evaluate is a verb)

TINY = """
model: {hidden_dim: 32, num_layers: 2, num_timesteps: 100, latent_dim: 8, conditioning_dim: 16}
training: {batch_size: 64, num_epochs: 2, warmup_steps: 2}
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``(root, cells.h5ad, control.h5ad, run folder)``: 120 cells of three types, control and
    stimulated, and a tiny model trained on them through ``scidiff train`` into a new folder."""
    root = tmp_path_factory.mktemp("pipeline")
    cells = scanpy_cells(n=120)
    cells.write_h5ad(root / "cells.h5ad")
    cells[cells.obs["condition"] == "control"][:16].copy().write_h5ad(root / "control.h5ad")
    (root / "tiny.yaml").write_text(TINY)
    run = root / "runs" / "tiny"  # a run folder in a folder that does not exist yet
    assert main(["train", "--data", str(root / "cells.h5ad"), "--condition-keys", "cell_type,condition",
                 "--config", str(root / "tiny.yaml"), "--out", str(run)]) == 0
    assert (run / "model.pt").is_file()
    return root, root / "cells.h5ad", root / "control.h5ad", run


def _scidiff(*args, cwd=None):
    """``python -m scidiff ARGS`` in a new process."""
    return subprocess.run([sys.executable, "-m", "scidiff", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=300)


def _snapshot(folder) -> dict:
    """Name -> digest of every file in ``folder`` (temporaries included)."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def _commands(root, cells, control, run, out) -> dict:
    """The argv of each file-writing command, its output at ``out/<name>``."""
    return {"sample": ["sample", "--model", run, "-n", "4", "--steps", "2", "--out", out / "sample.h5ad"],
            "predict": ["predict", "--model", run, "--data", control, "--target", "condition=stim", "--steps", "2",
                        "--out", out / "predict.h5ad"],
            "baseline": ["predict", "--method", "mean-shift", "--train", cells, "--data", control, "--target",
                         "condition=stim", "--perturbation-key", "condition", "--out", out / "baseline.h5ad"],
            "denoise": ["denoise", "--model", run, "--data", control, "--out", out / "denoise.h5ad"]}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_commands_help_exits_0_on_stdout(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"usage: scidiff {command}") and captured.err == ""


def test_a_user_error_is_one_line_on_stderr_with_status_2(files, tmp_path, capsys):
    """Through ``python -m scidiff`` in a new process, and through ``main`` for a missing file."""
    root, cells, control, run = files
    result = _scidiff("sample", "--model", run, "-n", "3", "--condition", "cell_type=Neuron", "--out", "g.h5ad",
                      cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "scidiff sample: error: --condition 'cell_type=Neuron': unknown value 'Neuron' for condition "
        "'cell_type'; known values: ['B', 'CD4/CD8 T', 'NK']"]
    assert main(["denoise", "--model", str(run), "--data", "no such cells.h5ad", "--out",
                 str(tmp_path / "d.h5ad")]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "scidiff denoise: error: no such file: 'no such cells.h5ad'\n")
    assert os.listdir(tmp_path) == []


def test_relative_paths_with_spaces_and_accents_read_from_the_working_directory(files, tmp_path, monkeypatch,
                                                                                 capsys):
    """Run in a folder with a space and accents, every path relative to it: stdout is the
    result lines alone, the progress bar is on stderr."""
    root, cells, control, run = files
    here = tmp_path / "mon dossier é"
    (here / "données").mkdir(parents=True)
    (here / "données" / "contrôle cells.h5ad").write_bytes(control.read_bytes())
    os.symlink(run, here / "rün 1")
    monkeypatch.chdir(here)
    assert main(["predict", "--model", "rün 1", "--data", "données/contrôle cells.h5ad", "--target",
                 "condition=stim", "--steps", "2", "--out", "sortie/préd ité.h5ad"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[:2] == ["wrote 16 predicted cells x 36 genes to sortie/préd ité.h5ad (measured cells)",
                         "what each prediction rests on (route, mean confidence 0-1):"]
    assert len(lines) == 3 and lines[2].startswith("  condition=stim: direct, confidence ")
    assert "predicting" in captured.err
    assert os.listdir(here / "sortie") == ["préd ité.h5ad"]
    assert ad.read_h5ad(here / "sortie" / "préd ité.h5ad").shape == (16, 36)


def test_two_commands_side_by_side_write_their_own_files_in_one_folder(files, tmp_path, capsys):
    """Run at once (threads of one process: the same process id in their temporary names)."""
    root, cells, control, run = files
    argv = _commands(root, cells, control, run, tmp_path / "shared")
    codes = {}

    def run_one(name):
        codes[name] = main([str(a) for a in argv[name]])

    threads = [threading.Thread(target=run_one, args=(name,)) for name in argv]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert codes == {name: 0 for name in argv}
    assert sorted(os.listdir(tmp_path / "shared")) == ["baseline.h5ad", "denoise.h5ad", "predict.h5ad", "sample.h5ad"]
    assert ad.read_h5ad(tmp_path / "shared" / "sample.h5ad").n_obs == 4
    for name in ("predict", "baseline", "denoise"):
        assert ad.read_h5ad(tmp_path / "shared" / f"{name}.h5ad").n_obs == 16
    capsys.readouterr()


def test_every_commands_output_in_a_new_folder_gets_its_folder(files, tmp_path, capsys):
    root, cells, control, run = files
    for name, argv in _commands(root, cells, control, run, tmp_path / "new" / "deeper").items():
        out = argv[-1]
        argv[-1] = tmp_path / name / "a" / "b" / out.name
        assert main([str(a) for a in argv]) == 0, name
        assert os.listdir(tmp_path / name / "a" / "b") == [out.name]
    assert main(["evaluate", "--real", str(cells), "--generated", str(tmp_path / "sample" / "a" / "b" / "sample.h5ad"),
                 "--no-plots", "--out", str(tmp_path / "report" / "a" / "b")]) == 0
    assert os.listdir(tmp_path / "report" / "a" / "b") == ["metrics.json"]
    capsys.readouterr()


def test_evaluate_perturbation_says_cell_eval_is_missing_on_stderr(files, tmp_path, monkeypatch, capsys):
    """Without cell-eval the note that its metrics are skipped is a warning: stdout holds the
    summary (JSON), the inputs line and the file written, nothing else. The report's new folder is made."""
    root, cells, control, run = files
    pred = tmp_path / "pred.h5ad"
    assert main(["predict", "--method", "no-change", "--data", str(control), "--target", "condition=stim",
                 "--out", str(pred)]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "cell_eval", None)
    report = tmp_path / "new" / "report"
    assert main(["evaluate", "--perturbation", "--real", str(cells), "--predicted", str(pred), "--perturbation-key",
                 "condition", "--out", str(report)]) == 0
    captured = capsys.readouterr()
    summary, rest = captured.out.split("\n}\n")
    assert json.loads(summary + "}")["groups"] == 1
    assert rest.splitlines()[1:] == [f"wrote {report / 'metrics.json'}"] and rest.startswith("X read as: ")
    assert captured.err == ("scidiff evaluate: warning: cell-eval is not installed: its metrics and scores are "
                            "skipped (pip install 'scidiff[celleval]')\n")
    assert os.listdir(report) == ["metrics.json"]


def _interrupt_h5ad_writes(monkeypatch):
    """Every ``.h5ad`` writer raises KeyboardInterrupt mid-write: scidiff's chunked writer while it
    writes ``var`` (the cells are in the file), anndata's after a part of the file is written."""
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    def partial(self, filename=None, **kwargs):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(h5ad_writer, "_write_elem_function", lambda: stop)
    monkeypatch.setattr(ad.AnnData, "write_h5ad", partial)


@pytest.mark.parametrize("name", ["sample", "predict", "baseline", "denoise"])
def test_an_interrupted_write_leaves_no_file_and_keeps_an_earlier_one(files, tmp_path, monkeypatch, capsys, name):
    root, cells, control, run = files
    fresh = _commands(root, cells, control, run, tmp_path / "fresh")[name]
    again = _commands(root, cells, control, run, tmp_path / "again")[name]
    (tmp_path / "again").mkdir()
    again[-1].write_bytes(b"an earlier run's cells")
    with monkeypatch.context() as m:
        _interrupt_h5ad_writes(m)
        assert main([str(a) for a in fresh]) == 130
        assert main([str(a) for a in again]) == 130
    command = fresh[0]
    assert capsys.readouterr().err.count(f"scidiff {command}: interrupted") == 2
    assert not (tmp_path / "fresh").exists()  # nor the folder made for it
    assert os.listdir(tmp_path / "again") == [again[-1].name]
    assert again[-1].read_bytes() == b"an earlier run's cells"


def _savefig_interrupted_at(monkeypatch, call: int):
    """matplotlib's ``savefig`` raises KeyboardInterrupt at its ``call``-th call (1-based)."""
    from matplotlib.figure import Figure

    original, calls = Figure.savefig, []

    def savefig(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)


def test_an_interrupted_evaluate_keeps_the_earlier_report_whole(files, tmp_path, monkeypatch, capsys):
    """The report folder is one output: an interrupted re-run (while its third plot is written,
    or, with --no-plots, while metrics.json is) leaves the earlier report's plots and metrics.json
    as they were; a fresh folder interrupted is not left behind with some plots in it."""
    root, cells, control, run = files
    gen = tmp_path / "gen.h5ad"
    assert main(["sample", "--model", str(run), "-n", "4", "--steps", "2", "--out", str(gen)]) == 0
    report = tmp_path / "report"
    argv = ["evaluate", "--real", str(control), "--generated", str(gen), "--out", str(report)]
    scored, real_scores = [], evaluate_task.evaluate_generation_quality

    def score_once(*args, **kwargs):  # the runs below differ in their writing alone
        if not scored:
            scored.append(real_scores(*args, **kwargs))
        return dict(scored[0])

    monkeypatch.setattr(evaluate_task, "evaluate_generation_quality", score_once)
    assert main(argv) == 0  # 20 cells: no UMAP
    before = _snapshot(report)
    assert sorted(before) == ["gene_means.png", "gene_variances.png", "metrics.json", "pca.png"]
    with monkeypatch.context() as m:
        _savefig_interrupted_at(m, 3)
        assert main(argv) == 130
    assert _snapshot(report) == before
    with monkeypatch.context() as m:
        m.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(argv + ["--no-plots"]) == 130
    assert _snapshot(report) == before
    with monkeypatch.context() as m:
        _savefig_interrupted_at(m, 2)
        assert main(argv[:-1] + [str(tmp_path / "new" / "report")]) == 130
    assert not (tmp_path / "new").exists()
    assert main(argv + ["--no-plots"]) == 0  # finished: this report's files alone
    assert os.listdir(report) == ["metrics.json"] and len(scored) == 1
    assert capsys.readouterr().err.count("scidiff evaluate: interrupted") == 3


def test_a_sharded_sample_rerun_leaves_no_earlier_manifest_or_merged_file(files, tmp_path, monkeypatch, capsys):
    """``sample --out FOLDER``: a re-run of other cells does not leave the earlier run's merged
    ``generated.h5ad`` (nor its manifest, when interrupted) beside shards that hold other cells;
    an interrupted run into a new folder leaves no folder."""
    from scidiff.tasks.generate import read_generated

    root, cells, control, run = files
    folder = tmp_path / "shards"
    base = ["sample", "--model", str(run), "--steps", "2", "--out", str(folder)]
    assert main(base + ["-n", "6", "--merge"]) == 0
    assert sorted(os.listdir(folder)) == ["generated.h5ad", "manifest.json", "shard-00000-of-00001.h5ad"]
    (folder / "shard-00001-of-00002.h5ad").write_bytes(b"a shard of an earlier run on two processes")
    assert main(base + ["-n", "3"]) == 0
    assert sorted(os.listdir(folder)) == ["manifest.json", "shard-00000-of-00001.h5ad"]
    assert read_generated(folder).n_obs == 3
    assert main(base + ["-n", "6", "--merge"]) == 0
    with monkeypatch.context() as m:
        _interrupt_h5ad_writes(m)
        assert main(base + ["-n", "5", "--merge"]) == 130
        assert main(base[:-1] + [str(tmp_path / "new" / "shards"), "-n", "5"]) == 130
    with pytest.raises(FileNotFoundError, match="the generation has not finished"):
        read_generated(folder)
    assert "generated.h5ad" not in os.listdir(folder) and not [f for f in os.listdir(folder) if f.startswith(".")]
    assert not (tmp_path / "new").exists()  # a new folder is not left behind empty
    capsys.readouterr()


def test_an_h5ad_extension_in_capitals_is_a_file_not_a_folder(files, tmp_path, capsys):
    """``--out GEN.H5AD`` (a Windows or macOS habit) is one file, as ``gen.h5ad`` is; it was read
    as a folder and shards were written inside it."""
    root, cells, control, run = files
    assert main(["sample", "--model", str(run), "-n", "4", "--steps", "2", "--out", str(tmp_path / "GEN.H5AD")]) == 0
    assert (tmp_path / "GEN.H5AD").is_file()
    assert ad.read_h5ad(tmp_path / "GEN.H5AD").n_obs == 4
    paths = output_paths(str(tmp_path / "DESIGN.H5AD"))  # design's files: 'DESIGN.H5AD.h5ad' and its report beside
    assert paths["cells"] == str(tmp_path / "DESIGN.H5AD") and paths["report"] == str(tmp_path / "DESIGN.report.json")
