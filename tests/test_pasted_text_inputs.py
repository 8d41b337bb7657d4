"""Text as a wet-lab collaborator hands it over: files exported from Excel or saved by a Windows
editor, strings pasted from a paper. Checked, per reader (the ``--targets-file`` list, the TF
network, the perturbation-feature TSV, the SMILES CSV, the YAML config): Excel's "Unicode Text"
export (UTF-16) is refused naming the file and the encoding; a semicolon- or tab-separated file
where another separator is expected is refused naming the separator found; the header row
pasted again is skipped; an empty network file says it is empty; gene names Excel turned into
dates (``SEPT2`` -> ``2-Sep``) are named. Pasted strings: a design target's ``≥``/``≤`` and
minus sign (U+2212) are read as ``>=``/``<=``/``-``, an en dash is refused naming the character
and where it is; gene names with a non-breaking space match; a label in (smart) quotes is refused
naming the quote. Through the Python API and the command line (``scidiff.cli.main``) on a tiny
model. (A byte-order mark and CRLF lines are covered by tests/test_predict_screen.py.)"""
import warnings

import numpy as np
import pandas as pd
import pytest

from scidiff.cli import main
from scidiff.cli.common import parse_conditions
from scidiff.cli.predict import read_targets_file
from scidiff.config import load_config
from scidiff.data.perturbation_features import read_feature_tsv, read_smiles_csv
from scidiff.tasks.design import PhenotypeTarget, UnknownGeneError, read_tf_network, tf_weight_matrix
from test_api_types_inputs import timed_cells, timed_model
from test_predict_screen import single_thread

GENES = [f"G{i}" for i in range(8)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    timed_model(timed_cells(), folder)
    return folder


# -- design targets pasted from a paper ----------------------------------------------------------------------------

def test_a_target_pasted_from_a_paper_reads_its_relation_and_minus_signs():
    """``ISG15≥3`` and ``IFIT1 ≥ 1.5`` were 'cannot read target': the typeset >=, <= and minus
    sign (U+2212) have one meaning each."""
    target = PhenotypeTarget.parse("ISG15≥3, IFIT1 ≥ 1.5,MX1⩽0.2,OAS1 ≤ 1,STAT1=−0.5")
    assert target.marker_genes == {"ISG15": 3.0, "IFIT1": 1.5}
    assert target.suppressed_genes == {"MX1": 0.2, "OAS1": 1.0}
    assert target.gene_targets == {"STAT1": -0.5}


def test_an_en_dash_in_a_target_is_refused_naming_the_character_and_where_it_is():
    """An en dash is a minus in one paper and a range (``1–2``) in the next: refused, naming it."""
    with pytest.raises(ValueError, match=r"cannot read target 'IFIT1<=–1.5'.*; it holds '–' \(U\+2013 EN DASH\) at "
                                         r"character 8, write it in ASCII$"):
        PhenotypeTarget.parse("ISG15>=3,IFIT1<=–1.5")


def test_gene_names_with_a_non_breaking_space_match_the_genes():
    """``{"ISG15\\xa0": 3}`` (a name copied from a table cell) was a gene the model lacks."""
    target = PhenotypeTarget(marker_genes={"ISG15\xa0": 3}, suppressed_genes=[" MX1\xa0"])
    assert target.marker_genes == {"ISG15": 3.0} and target.suppressed_genes == {"MX1": 0.1}
    target.check(["ISG15", "MX1"])
    assert PhenotypeTarget.parse("ISG15\xa0≥\xa03").marker_genes == {"ISG15": 3.0}


def test_a_target_gene_that_excel_made_a_date_is_named_as_one():
    with pytest.raises(UnknownGeneError, match=r"'2-Sep' \(close matches: none\); '2-Sep' look\(s\) like date\(s\) "
                                               r"Excel made of gene names \(SEPT2 -> 2-Sep, MARCH1 -> 1-Mar\)"):
        PhenotypeTarget.parse("2-Sep>=1").check(["SEPT2", "G1"])


def test_the_design_command_reads_a_pasted_greater_or_equal_sign(model_dir, tmp_path):
    out = tmp_path / "designed.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["design", "--model", str(model_dir), "--target", "GENE1 ≥ 0.5", "-n", "4", "--steps", "3",
                   "--no-screen", "--retries", "0", "--out", str(out)])
    assert rc in (None, 0) and out.exists()


# -- key=value labels pasted with quotes -------------------------------------------------------------------------------

def test_a_label_in_smart_quotes_is_refused_naming_the_quote():
    assert parse_conditions("condition = stim , cell_type=B\xa0") == {"condition": "stim", "cell_type": "B"}
    with pytest.raises(ValueError, match=r"^'condition=“stim”': '“stim”' is in quotes \('“', U\+201C LEFT DOUBLE "
                                         r"QUOTATION MARK, at character 11\); write condition=stim without them$"):
        parse_conditions("condition=“stim”")
    assert parse_conditions("cell_type=Th1 'like'") == {"cell_type": "Th1 'like'"}  # a quote inside a label stays


def test_the_sample_command_names_the_quote_around_a_label(model_dir, tmp_path, capsys):
    rc = main(["sample", "--model", str(model_dir), "-n", "2", "--steps", "2", "--condition", "condition=‘stim’",
               "--out", str(tmp_path / "s.h5ad")])
    assert rc == 2 and not (tmp_path / "s.h5ad").exists()
    assert "'‘stim’' is in quotes ('‘', U+2018 LEFT SINGLE QUOTATION MARK, at character 11)" in capsys.readouterr().err


# -- Excel's "Unicode Text" (UTF-16) ---------------------------------------------------------------------------------

READERS = {
    "targets": (read_targets_file, "condition=stim\n", "--targets-file"),
    "network": (read_tf_network, "source\ttarget\tweight\nTF\tG1\t1\n", "TF network"),
    "features": (read_feature_tsv, "label\tf1\nA\t1\n", "tab-separated file"),
    "smiles": (read_smiles_csv, "name,smiles\nD1,CCO\n", "CSV file"),
    "config": (load_config, "training:\n  num_epochs: 3\n", "config"),
}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])
@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_utf16_file_is_refused_naming_the_file_and_the_encoding(tmp_path, reader, encoding):
    """'is not a UTF-8 text file', "'utf-8' codec can't decode byte 0xff", and from a UTF-16 file
    without a byte-order mark, NUL characters in every name."""
    read, text, what = READERS[reader]
    path = tmp_path / "exported.txt"
    path.write_text(text, encoding=encoding)
    with pytest.raises(ValueError, match=rf"^{what} '.*exported.txt' is UTF-16 text \(as Excel's 'Unicode Text' "
                                         r"export writes it\), not UTF-8; save it as UTF-8"):
        read(str(path))


def test_the_sample_command_names_a_utf16_config(model_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("sampling:\n  steps: 2\n", encoding="utf-16")
    rc = main(["sample", "--model", str(model_dir), "-n", "2", "--config", str(config), "--out",
               str(tmp_path / "s.h5ad")])
    assert rc == 2 and "run.yaml' is UTF-16 text" in capsys.readouterr().err


# -- separators, a header pasted twice, an empty file -----------------------------------------------------------------

def test_a_semicolon_separated_network_is_refused_naming_the_separator(tmp_path):
    path = tmp_path / "net.tsv"
    path.write_text("source;target;weight\nTF;G1;1\n")
    with pytest.raises(ValueError, match=r"found \['source;target;weight'\] \(it looks semicolon-separated; the "
                                         r"network is a tab-separated file\)$"):
        read_tf_network(path)


def test_a_feature_table_with_another_separator_is_refused_naming_it(tmp_path):
    path = tmp_path / "features.tsv"
    path.write_text("label;f1;f2\nA;1;2\n")
    with pytest.raises(ValueError, match=r"names no feature column; .* \(it looks semicolon-separated\)$"):
        read_feature_tsv(path)


@pytest.mark.parametrize("sep,name", [(";", "semicolon"), ("\t", "tab")])
def test_a_drug_list_with_another_separator_is_refused_naming_it(tmp_path, sep, name):
    path = tmp_path / "drugs.csv"
    path.write_text(f"name{sep}smiles\nD1{sep}CCO\n")
    with pytest.raises(ValueError, match=rf"line 1: expected 'name,smiles', got .* \(it looks {name}-separated; the "
                                         r"drug list is comma-separated\)$"):
        read_smiles_csv(path)


def test_a_header_pasted_again_is_not_read_as_a_row(tmp_path):
    """Two exports pasted one under another: the network's second header was 'non-numeric weight
    'weight'', the feature table's 'f1 is not a number', and the drug list read a drug named
    'name' with the SMILES 'smiles'."""
    net = tmp_path / "net.tsv"
    net.write_text("source\ttarget\tweight\nTF\tG1\t1\nsource\ttarget\tweight\nTF\tG2\t-1\n")
    assert read_tf_network(net).to_dict("list") == {"source": ["TF", "TF"], "target": ["G1", "G2"],
                                                      "weight": [1.0, -1.0]}
    features = tmp_path / "features.tsv"
    features.write_text("label\tf1\nA\t1\nlabel\tf1\nB\t2\n")
    block = read_feature_tsv(features)
    assert block.labels == ["A", "B"] and block.values.ravel().tolist() == [1.0, 2.0]
    drugs = tmp_path / "drugs.csv"
    drugs.write_text("name,smiles\nD1,CCO\nname,smiles\nD2,CCN\n")
    assert read_smiles_csv(drugs) == [(2, "D1", "CCO"), (4, "D2", "CCN")]


def test_an_empty_network_file_says_it_is_empty(tmp_path):
    path = tmp_path / "net.tsv"
    path.write_bytes(b"\xef\xbb\xbf\r\n\r\n")
    with pytest.raises(ValueError, match=r"^TF network '.*net.tsv' is empty; it needs tab-separated source, target "
                                         r"and weight columns$"):
        read_tf_network(path)


def test_an_excel_network_with_a_bom_crlf_blank_lines_and_padded_cells_reads(tmp_path):
    path = tmp_path / "net.tsv"
    path.write_bytes("\ufeffsource\ttarget\tweight\r\nTF\tG1\xa0\t1\r\n\r\n\"TF \"\tG2\t-1\r\n\r\n".encode())
    assert read_tf_network(path).to_dict("list") == {"source": ["TF", "TF"], "target": ["G1", "G2"],
                                                       "weight": [1.0, -1.0]}


# -- gene names Excel made dates -------------------------------------------------------------------------------------

def test_network_targets_that_excel_made_dates_are_warned_about():
    """``2-Sep`` (SEPT2) and ``1-Mar`` (MARCH1) matched no gene: the TF lost them without a word."""
    net = pd.DataFrame({"source": ["TF"] * 6, "target": ["2-Sep", "1-Mar"] + GENES[:4], "weight": 1.0})
    with pytest.warns(UserWarning, match=r"the TF network: target\(s\) that match none of the model's genes; "
                                         r"'2-Sep', '1-Mar' look\(s\) like date\(s\) Excel made of gene names"):
        w, tfs, n = tf_weight_matrix(net, GENES, min_targets=4)
    assert tfs == ["TF"] and n.tolist() == [4] and np.array_equal(w[:, 0], [1, 1, 1, 1, 0, 0, 0, 0])
