"""The package's layers hold: `lint-imports` keeps the import contracts of pyproject.toml (a module
imports only from the layers below it, kernels import nothing of scidiff, the plans and the ONNX
runtime import no torch); every function-local import of scidiff says why it is lazy; the command
line's --help imports nothing heavy; the old module addresses still work, with a warning."""
import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    pytest.importorskip("importlinter", reason="import-linter is not installed (pip install 'scidiff[test]')")
    exe = Path(sys.executable).parent / "lint-imports"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from importlinter.cli import "
                                                                   "lint_imports_command as c; sys.exit(c())"]
    out = subprocess.run(cmd + ["--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _function_local_imports(path: Path):
    """``(line number, line)`` of each import of scidiff (relative or absolute) inside a function."""
    src = path.read_text()
    lines = src.splitlines()
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for sub in ast.walk(node):
            ours = (isinstance(sub, ast.ImportFrom) and (sub.level > 0 or (sub.module or "").split(".")[0] == "scidiff")
                    or isinstance(sub, ast.Import) and any(a.name.split(".")[0] == "scidiff" for a in sub.names))
            if ours:
                yield sub.lineno, lines[sub.lineno - 1]


def test_every_function_local_import_of_scidiff_says_why():
    """Imports of scidiff inside functions only where they keep ``--help`` or an optional
    dependency light, each with a ``# lazy: reason`` comment (no more imports that hide a cycle)."""
    bare = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for path in sorted((ROOT / "scidiff").rglob("*.py")) for n, line in _function_local_imports(path)
            if "# lazy:" not in line]
    assert not bare, "function-local imports without a '# lazy: reason' comment:\n" + "\n".join(bare)


def test_the_checker_sees_function_local_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\n\ndef f():\n    from .data import x\n    from scidiff.models import y  # lazy: why\n"
                     "    import os.path\n")
    assert [n for n, _ in _function_local_imports(probe)] == [5, 6]


def test_command_line_help_imports_nothing_heavy():
    code = ("import sys, scidiff, scidiff.cli\n"
            "from scidiff.cli import build_parser\n"
            "build_parser().format_help()\n"
            "heavy = ('torch', 'scanpy', 'onnx', 'onnxruntime', 'fastapi', 'triton', 'matplotlib', 'anndata')\n"
            "heavy = [m for m in heavy if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("old,name,new", [
    ("scidiff.sampling", "ddim", "scidiff.diffusion.samplers"),
    ("scidiff.sampling", "SamplingEngine", "scidiff.engine"),
    ("scidiff.sampling", "InverseDesigner", "scidiff.tasks.design"),
    ("scidiff.sampling.inverse_design", "PhenotypeTarget", "scidiff.tasks.design"),
    ("scidiff.sampling.inverse_design", "objective_guidance", "scidiff.diffusion.guidance"),
    ("scidiff.pipeline", "generate_to_file", "scidiff.tasks.generate"),
    ("scidiff.pipeline", "train", "scidiff.tasks.train"),
    ("scidiff.perturbation", "predict_perturbation", "scidiff.tasks.perturb"),
    ("scidiff.denoising", "denoise", "scidiff.tasks.denoise"),
    ("scidiff.regulators", "screen_perturbations", "scidiff.tasks.design"),
])
def test_old_addresses_reexport_with_a_deprecation_warning(old, name, new):
    for mod in [m for m in sys.modules if m == old or m.startswith(old + ".") or m == "scidiff.sampling"]:
        del sys.modules[mod]
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.") + " is deprecated"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_the_verbs_are_exported_from_the_top_level():
    import scidiff
    from scidiff.tasks.denoise import denoise
    from scidiff.tasks.design import InverseDesigner, PhenotypeTarget, design
    from scidiff.tasks.generate import generate
    from scidiff.tasks.perturb import perturb, predict_perturbation

    assert (scidiff.generate, scidiff.perturb, scidiff.denoise, scidiff.design) == (generate, perturb, denoise, design)
    assert scidiff.predict_perturbation is predict_perturbation
    assert (scidiff.InverseDesigner, scidiff.PhenotypeTarget) == (InverseDesigner, PhenotypeTarget)
    from scidiff.models.noise_scheduler import BiologicalNoiseScheduler  # the original design's address
    from scidiff.diffusion.schedules import BiologicalNoiseScheduler as moved

    assert BiologicalNoiseScheduler is moved


def test_renamed_keywords_keep_working_with_a_warning():
    """Design's old ``guidance_scale`` (the objective's strength, now ``objective_scale``) and
    ``num_samples`` (now ``n``) give the same cells, with a DeprecationWarning."""
    import numpy as np
    import torch

    from scidiff.data import DataSpec
    from scidiff.models import ScIDiffModel
    from scidiff.tasks.design import InverseDesigner, PhenotypeTarget

    torch.manual_seed(0)
    model = ScIDiffModel(gene_dim=3, hidden_dim=8, num_layers=1, num_timesteps=20,
                         data_spec=DataSpec(gene_names=["a", "b", "c"])).eval()
    designer, target = InverseDesigner(model), PhenotypeTarget(marker_genes={"a": 1.0})
    new = designer.design(target, 5, steps=4, objective_scale=3.0, seed=1)
    with pytest.warns(DeprecationWarning, match="objective_scale"):
        old = designer.design(target, num_samples=5, steps=4, guidance_scale=3.0, seed=1)
    np.testing.assert_array_equal(old.expression, new.expression)
    assert new.settings["objective_scale"] == 3.0 and new.settings["guidance_scale"] == 1.0
    with pytest.raises(TypeError, match="not both"):
        designer.design(target, 5, steps=4, objective_scale=3.0, guidance_scale=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        designer.design(target, 2, steps=2)  # the new names warn about nothing
