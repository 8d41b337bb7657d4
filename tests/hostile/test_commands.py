"""Hostile flags, labels, models, configs and output paths for every command: each must fail
with exit status 2, no traceback, and a message naming the culprit (flag, key, label or file).
Bad data files belong to the data layer's suite. The argparse cases cost milliseconds; the
others load the tiny model (about 2 s each)."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_clean_error, run_cli

TORCH_ADVICE = ("two options", "Re-running", "trust the source", "WeightsUnpickler", "In PyTorch")

CONFIGS = {
    "unknown_key.yaml": "model: {gene_dimm: 100}\n",
    "wrong_type.yaml": "training: {batch_size: many}\n",
    "not_a_mapping.yaml": "- model\n- training\n",
    "bad_yaml.yaml": "model: {gene_dim: [\n",
    "section_not_a_mapping.yaml": "training: 5\n",
    "bad_sampler.yaml": "sampling: {sampler: euler}\n",
}


@pytest.fixture(scope="module")
def junk(tmp_path_factory, tiny_run, kang_file):
    """Broken models, configs, an output path blocked by a file, and cells without labels."""
    import anndata as ad

    root = tmp_path_factory.mktemp("hostile_commands")
    (root / "empty_run").mkdir()
    (root / "truncated").mkdir()
    raw = (tiny_run / "model.pt").read_bytes()
    (root / "truncated" / "model.pt").write_bytes(raw[: len(raw) // 2])
    (root / "garbage.pt").write_bytes(b"this is no checkpoint\n" * 10)
    torch.save(torch.nn.Linear(3, 3), root / "foreign.pt")  # pickled module: refused by weights_only
    (root / "blocker").write_text("a file where a folder must go\n")
    for name, text in CONFIGS.items():
        (root / name).write_text(text)
    (root / "targets_bad.txt").write_text("# a screen\ncondition=stimulated\ncell_type\n")
    (root / "targets_empty.txt").write_text("# nothing but comments\n\n")
    cells = ad.read_h5ad(kang_file)[:30].copy()
    cells.obs = cells.obs[[]]
    cells.write_h5ad(root / "no_labels.h5ad")
    kang = ad.read_h5ad(kang_file)
    kang[(kang.obs["condition"] == "stimulated").to_numpy()][:30].copy().write_h5ad(root / "stimulated_only.h5ad")
    return root


@pytest.fixture(scope="module")
def model_gene(tiny_run):
    from scidiff.training import load_model

    return load_model(tiny_run).data_spec.gene_names[0]


SAMPLE = ["sample", "--model", "{run}", "-n", "4", "--steps", "2", "--out", "{out}/g.h5ad"]
TRAIN = ["train", "--data", "{data}", "--condition-keys", "cell_type", "--out", "{out}/run"]
PREDICT = ["predict", "--model", "{run}", "--data", "{data}", "--steps", "2", "--out", "{out}/p.h5ad"]
DENOISE = ["denoise", "--model", "{run}", "--data", "{data}", "--out", "{out}/d.h5ad"]
DESIGN = ["design", "--model", "{run}", "-n", "4", "--steps", "2", "--out", "{out}/des.h5ad"]

# (id, arguments, what stderr must name); later flags override earlier ones (argparse keeps the last)
CASES = [
    # flags argparse refuses
    ("sample n zero", SAMPLE + ["-n", "0"], ["argument -n", "0"]),
    ("sample n negative", SAMPLE + ["-n", "-3"], ["argument -n", "-3"]),
    ("sample steps zero", SAMPLE + ["--steps", "0"], ["argument --steps"]),
    ("sample seed negative", SAMPLE + ["--seed", "-1"], ["argument --seed"]),
    ("sample seed too large", SAMPLE + ["--seed", str(2**70)], ["argument --seed", str(2**70)]),
    ("sample unknown sampler", SAMPLE + ["--sampler", "euler"], ["argument --sampler", "euler"]),
    ("sample distilled without a student", SAMPLE + ["--sampler", "distilled"],
     ["no distilled student", "scidiff distil"]),
    ("distil from a student it lacks", ["distil", "--model", "{run}", "--data", "{data}", "--from-student",
                                        "--out", "{out}/m.pt"], ["--from-student", "no distilled student"]),
    ("export distilled without a student", ["export-onnx", "--model", "{run}", "--sampler", "distilled",
                                            "--out", "{out}/m.onnx"], ["no distilled student"]),
    ("sample eta negative", SAMPLE + ["--eta", "-0.5"], ["argument --eta"]),
    ("sample device unknown", SAMPLE + ["--device", "gpu0"], ["argument --device", "gpu0"]),
    ("train epochs zero", TRAIN + ["--epochs", "0"], ["argument --epochs"]),
    ("train batch size zero", TRAIN + ["--batch-size", "0"], ["argument --batch-size"]),
    ("train n genes not a number", TRAIN + ["--n-genes", "lots"], ["argument --n-genes", "lots"]),
    ("predict unknown method", PREDICT + ["--target", "condition=stimulated", "--method", "sdedit"],
     ["argument --method", "sdedit"]),
    ("predict has no sampler", PREDICT + ["--target", "condition=stimulated", "--sampler", "heun"], ["--sampler"]),
    ("predict steps zero", PREDICT + ["--target", "condition=stimulated", "--steps", "0"], ["argument --steps"]),
    ("denoise strength above 1", DENOISE + ["--strength", "2"], ["argument --strength", "2"]),
    ("denoise strength zero", DENOISE + ["--strength", "0"], ["argument --strength"]),
    ("denoise samples zero", DENOISE + ["--samples", "0"], ["argument --samples"]),
    ("design n zero", DESIGN + ["--target", "{gene}>=2", "-n", "0"], ["argument -n"]),
    ("design retries negative", DESIGN + ["--target", "{gene}>=2", "--retries", "-1"], ["argument --retries"]),
    ("design measured and smooth", DESIGN + ["--target", "{gene}>=2", "--observed", "--smooth"],
     ["--smooth", "--observed"]),
    ("demo epochs zero", ["demo", "--epochs", "0", "--out", "{out}/demo"], ["argument --epochs"]),
    # conditions and labels the model does not know
    ("sample unknown condition key", SAMPLE + ["--condition", "cell_typo=B"], ["--condition", "cell_typo"]),
    ("sample unknown condition label", SAMPLE + ["--condition", "cell_type=Neuron"],
     ["--condition", "Neuron", "CD4T"]),
    ("sample condition without value", SAMPLE + ["--condition", "cell_type"], ["--condition", "key=value"]),
    ("predict unknown target key", PREDICT + ["--target", "conditio=stimulated"], ["--target", "conditio"]),
    ("predict unknown target label", PREDICT + ["--target", "condition=heatshock"],
     ["--target", "heatshock", "stimulated"]),
    ("design malformed target", DESIGN + ["--target", "IL2RA>>5"], ["IL2RA>>5"]),
    ("design gene not in the model", DESIGN + ["--target", "NOTAGENE1>=5"], ["NOTAGENE1"]),
    ("design unknown cell type", DESIGN + ["--target", "{gene}>=2", "--cell-type", "Neuron"], ["Neuron"]),
    ("design unknown cell type key", DESIGN + ["--target", "{gene}>=2", "--cell-type", "CD4T", "--cell-type-key",
                                              "celltype", "--data", "{data}"], ["--cell-type-key", "celltype"]),
    ("design cell type alone without data", DESIGN + ["--target", "", "--cell-type", "CD4T"],
     ["--cell-type 'CD4T' alone", "--data"]),
    ("design select over the cell type without data", DESIGN + ["--target", "{gene}>=2", "--cell-type", "CD4T",
                                                                "--select", "cell_type"], ["--select", "CD4T"]),
    ("design select a key the condition fixes", DESIGN + ["--target", "{gene}>=2", "--select", "condition",
                                                          "--condition", "condition=control"],
     ["--select", "--condition", "control"]),
    # models that are not there or not scidiff's
    ("sample folder without model", SAMPLE + ["--model", "{junk}/empty_run"], ["empty_run/model.pt"]),
    ("sample truncated model", SAMPLE + ["--model", "{junk}/truncated"], ["truncated/model.pt"]),
    ("sample garbage model", SAMPLE + ["--model", "{junk}/garbage.pt"], ["garbage.pt"]),
    ("denoise folder without model", DENOISE + ["--model", "{junk}/empty_run"], ["empty_run/model.pt"]),
    ("predict foreign torch file", PREDICT + ["--target", "condition=stimulated", "--model", "{junk}/foreign.pt"],
     ["foreign.pt", "never load a checkpoint you do not trust"]),
    # configs
    ("train config unknown key", TRAIN + ["--config", "{junk}/unknown_key.yaml"], ["unknown_key.yaml", "gene_dimm"]),
    ("train config wrong type", TRAIN + ["--config", "{junk}/wrong_type.yaml"],
     ["wrong_type.yaml", "training.batch_size", "many"]),
    ("train config not a mapping", TRAIN + ["--config", "{junk}/not_a_mapping.yaml"], ["not_a_mapping.yaml"]),
    ("train config bad yaml", TRAIN + ["--config", "{junk}/bad_yaml.yaml"], ["bad_yaml.yaml", "line 2"]),
    ("train config section not a mapping", TRAIN + ["--config", "{junk}/section_not_a_mapping.yaml"],
     ["section_not_a_mapping.yaml", "'training'"]),
    ("train config missing", TRAIN + ["--config", "{junk}/absent.yaml"], ["absent.yaml"]),
    ("sample config bad sampler", SAMPLE + ["--config", "{junk}/bad_sampler.yaml"],
     ["bad_sampler.yaml", "sampling.sampler", "euler"]),
    # outputs that cannot be written
    ("train out under a file", TRAIN + ["--out", "{junk}/blocker/run"], ["--out", "blocker"]),
    ("sample out under a file", SAMPLE + ["--out", "{junk}/blocker/g.h5ad"], ["--out", "blocker"]),
    ("predict out is a folder", PREDICT + ["--target", "condition=stimulated", "--out", "{junk}/empty_run"],
     ["--out", "empty_run", "is a folder"]),
    # screens, baselines and devices (scidiff predict)
    ("predict no target", PREDICT, ["--target", "--targets-file"]),
    ("predict targets file missing", PREDICT + ["--targets-file", "{junk}/absent.txt"], ["absent.txt"]),
    ("predict targets file bad line", PREDICT + ["--targets-file", "{junk}/targets_bad.txt"],
     ["targets_bad.txt", "line 3", "cell_type"]),
    ("predict targets file empty", PREDICT + ["--targets-file", "{junk}/targets_empty.txt"],
     ["targets_empty.txt", "no target"]),
    ("predict target twice", PREDICT + ["--target", "condition=stimulated", "--target", "condition=stimulated"],
     ["more than once", "condition=stimulated"]),
    ("predict threads zero", PREDICT + ["--target", "condition=stimulated", "--threads", "0"], ["argument --threads"]),
    ("predict batch size zero", PREDICT + ["--target", "condition=stimulated", "--batch-size", "0"],
     ["argument --batch-size"]),
    ("predict unknown device", PREDICT + ["--target", "condition=stimulated", "--device", "tpu"],
     ["argument --device", "tpu"]),
    *([("predict cuda without a gpu", PREDICT + ["--target", "condition=stimulated", "--device", "cuda"],
        ["--device cuda", "no CUDA"])] if not torch.cuda.is_available() else []),
    ("predict baseline without train", PREDICT + ["--target", "condition=stimulated", "--method", "mean-shift"],
     ["--method mean-shift", "--train"]),
    ("predict baseline flag for the model", PREDICT + ["--target", "condition=stimulated", "--train", "{data}"],
     ["--train", "baseline"]),
    ("predict model method without model", ["predict", "--data", "{data}", "--target", "condition=stimulated",
                                            "--out", "{out}/p.h5ad"], ["--method counterfactual", "--model"]),
    ("predict baseline control label nowhere", ["predict", "--method", "mean-shift", "--train", "{data}", "--data",
                                                "{data}", "--target", "condition=stimulated", "--control-labels",
                                                "untreated", "--out", "{out}/p.h5ad"],
     ["'untreated'", "condition"]),
    ("predict baseline unknown perturbation key", ["predict", "--method", "mean-shift", "--train", "{data}", "--data",
                                                   "{data}", "--target", "drug=A", "--out", "{out}/p.h5ad"],
     ["'drug'"]),
    ("predict baseline from perturbed cells", ["predict", "--method", "mean-shift", "--train", "{data}", "--data",
                                               "{data}", "--target", "condition=stimulated", "--perturbation-key",
                                               "condition", "--out", "{out}/p.h5ad"],
     ["obs['condition']", "'stimulated'", "start from control cells"]),
    # scoring perturbation predictions (scidiff evaluate --perturbation)
    ("evaluate perturbation real file without controls", ["evaluate", "--perturbation", "--real",
                                                          "{junk}/stimulated_only.h5ad", "--predicted", "{data}",
                                                          "--perturbation-key", "condition", "--out", "{out}/report"],
     ["--control-label", "include them in the real file"]),
    ("evaluate perturbation without key", ["evaluate", "--perturbation", "--real", "{data}", "--predicted", "{data}",
                                           "--out", "{out}/report"], ["--perturbation-key"]),
    ("evaluate perturbation unknown key", ["evaluate", "--perturbation", "--real", "{data}", "--predicted", "{data}",
                                           "--perturbation-key", "drug", "--out", "{out}/report"], ["'drug'"]),
    ("evaluate perturbation control label absent", ["evaluate", "--perturbation", "--real", "{data}", "--predicted",
                                                    "{data}", "--perturbation-key", "condition", "--control-label",
                                                    "ctrl", "--out", "{out}/report"], ["'ctrl'", "--control-label"]),
    ("evaluate perturbation baseline malformed", ["evaluate", "--perturbation", "--real", "{data}", "--predicted",
                                                  "{data}", "--perturbation-key", "condition", "--baseline", "{data}",
                                                  "--out", "{out}/report"], ["--baseline", "NAME=FILE"]),
    ("evaluate perturbation flags without the mode", ["evaluate", "--real", "{data}", "--generated", "{data}",
                                                      "--perturbation-key", "condition", "--out", "{out}/report"],
     ["--perturbation-key", "--perturbation"]),
    # files that disagree
    ("evaluate groupby missing in one file", ["evaluate", "--real", "{data}", "--generated", "{junk}/no_labels.h5ad",
                                              "--groupby", "cell_type", "--out", "{out}/report"],
     ["'cell_type'", "generated file"]),
]


@pytest.mark.parametrize("args, names", [pytest.param(a, n, id=i.replace(" ", "-")) for i, a, n in CASES])
def test_bad_input_fails_cleanly_naming_the_culprit(args, names, tiny_run, kang_file, junk, model_gene, tmp_path):
    fill = {"run": tiny_run, "data": kang_file, "junk": junk, "out": tmp_path, "gene": model_gene}
    err = assert_clean_error(run_cli(*[a.format(**fill) for a in args], timeout=120), *names)
    assert not [phrase for phrase in TORCH_ADVICE if phrase in err], err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a failed command left files behind"


def test_case_ids_are_distinct_and_cover_every_command():
    assert len({i for i, _, _ in CASES}) == len(CASES) >= 15
    assert {a[0] for _, a, _ in CASES} >= {"train", "sample", "predict", "denoise", "design", "evaluate", "demo"}
