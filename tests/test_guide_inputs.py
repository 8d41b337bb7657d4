"""A first-time user walking through the guides (README.md, docs/quickstart.md, docs/perturbations.md,
docs/input.md, docs/denoising.md, docs/inverse_design.md, docs/serving.md, docs/streaming.md,
docs/scale.md) and running each code block as written, on tiny models. Each test here failed
before its fix."""
import subprocess
import sys

import pytest


def test_task_modules_reached_from_a_bare_import():
    """docs/perturbations.md and docs/scale.md call ``scidiff.tasks.screen.predict_screen``,
    ``scidiff.tasks.trajectory.trajectory`` and ``scidiff.tasks.generate.read_generated`` after
    ``import scidiff`` alone; a fresh interpreter raised AttributeError (module 'scidiff.tasks'
    has no attribute 'screen')."""
    code = ("import scidiff\n"
            "tasks = scidiff.tasks\n"
            "print(tasks.screen.predict_screen.__name__, tasks.trajectory.trajectory.__name__,\n"
            "      tasks.generate.read_generated.__name__, tasks.evaluate.evaluate_perturbation.__name__)\n"
            "try:\n    scidiff.tasks.nothing\nexcept AttributeError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["predict_screen trajectory read_generated evaluate_perturbation",
                                "module 'scidiff.tasks' has no attribute 'nothing'"]


def test_misspelt_flag_named_under_its_command(capsys):
    """docs/quickstart.md: every command turns bad input into ``scidiff COMMAND: error: ...``.
    A misspelt flag (``scidiff sample ... --bogus 1``) was reported by the top-level parser as
    ``scidiff: error: unrecognized arguments`` under ``usage: scidiff [-h] [--version] COMMAND``."""
    from scidiff.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["sample", "--model", "run/", "-n", "5", "--out", "generated.h5ad", "--bogus", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith("usage: scidiff sample ")
    assert err.splitlines()[-1] == "scidiff sample: error: unrecognized arguments: --bogus 1"
    with pytest.raises(SystemExit) as stop:
        main(["--bogus"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "scidiff: error: unrecognized arguments: --bogus"


def test_hostile_suite_counts_in_the_guides():
    """docs/input.md and docs/serving.md give the size of each hostile suite a user is pointed to
    (``tests/hostile/test_commands.py (73 hostile flags, ...)``); the suite held 74 cases."""
    import re
    from collections import Counter
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    files = ["tests/hostile/test_data_files.py", "tests/hostile/test_commands.py", "tests/hostile/test_serve_inputs.py"]
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                            cwd=root, capture_output=True, text=True).stdout
    counts = Counter(line.split("::")[0] for line in listed.splitlines() if "::" in line)
    text = (root / "docs/input.md").read_text() + (root / "docs/serving.md").read_text()
    said = {name: int(n) for name, n in re.findall(r"`(tests/hostile/\w+\.py)`\s+\((\d+) ", text.replace("\n", " "))}
    assert set(said) == set(files)
    assert said == {name: counts[name] for name in files}


def test_gears_ctrl_notation_needs_ctrl_among_the_control_labels(tmp_path):
    """docs/perturbations.md trains with ``--control-labels control`` and then reads GEARS' ``A+ctrl``
    as the single ``A``; a model trained so refuses ``A+ctrl`` (``ctrl`` is no control label of it),
    which the guide did not say. The guide now names the condition; the model's message names the
    label to write."""
    from pathlib import Path

    import anndata as ad
    import numpy as np
    import pandas as pd

    import scidiff
    from scidiff.config import load_config

    rng = np.random.default_rng(0)
    n, genes = 180, 24
    labels = np.array(["control", "STAT1", "IRF1"])[np.arange(n) % 3]
    counts = rng.poisson(3.0, (n, genes)).astype(np.float32)
    counts[labels == "STAT1", 0] = 0
    cells = ad.AnnData(counts, obs=pd.DataFrame({"perturbation": pd.Categorical(labels)},
                                                index=[f"c{i}" for i in range(n)]),
                       var=pd.DataFrame(index=["STAT1", "IRF1"] + [f"G{i}" for i in range(genes - 2)]))
    config = load_config(overrides={
        "model": {"hidden_dim": 32, "num_layers": 1, "num_timesteps": 50, "conditioning_dim": 16, "latent_dim": 8},
        "training": {"num_epochs": 2, "batch_size": 64, "warmup_steps": 2},
        "data": {"perturbation_keys": ["perturbation"], "control_labels": ["control"]}})
    model = scidiff.train(cells, str(tmp_path / "run"), config, condition_keys=["perturbation"], progress=False)
    control = cells[labels == "control"].copy()
    with pytest.raises(ValueError) as refused:
        scidiff.perturb(model, control, {"perturbation": "STAT1+ctrl"}, steps=4, progress=False)
    assert ("'ctrl' is not this model's control label (it knows the control as 'control'); "
            "write perturbation=STAT1") in str(refused.value)
    guide = " ".join((Path(__file__).resolve().parent.parent / "docs/perturbations.md").read_text().split())
    assert "the default `control,ctrl` has it, `--control-labels control` does not" in guide
