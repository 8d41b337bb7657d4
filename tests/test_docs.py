"""The documentation: the Sphinx build passes with warnings as errors, the README stays an entry
point, every relative link of the README, the guides and the benchmarks page points to a file
(and heading) that exists, and every ``scidiff.*`` name the pages show can be imported from where
they show it without a DeprecationWarning (never from a deprecated re-export module)."""
from __future__ import annotations

import glob
import importlib
import os
import re
import json
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
README = os.path.join(ROOT, "README.md")
README_MAX_LINES = 220


def pages() -> list[str]:
    """The Markdown pages whose links and names are checked."""
    return [README, os.path.join(ROOT, "bench", "README.md")] + sorted(glob.glob(os.path.join(DOCS, "*.md")))


def test_docs_build_with_warnings_as_errors(tmp_path):
    pytest.importorskip("sphinx", reason="the docs build needs Sphinx: pip install -e '.[test]'")
    pytest.importorskip("myst_parser", reason="the docs build needs myst-parser: pip install -e '.[test]'")
    out = tmp_path / "html"
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", DOCS, str(out)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, f"sphinx-build -W failed:\n{result.stderr[-6000:]}"
    for page in ("index", "quickstart", "input", "api", "benchmarks"):
        assert (out / f"{page}.html").is_file(), page
    api = (out / "api.html").read_text()
    for name in ("scidiff.data.setup_anndata", "scidiff.models.ScIDiffModel", "scidiff.training.ScIDiffTrainer",
                 "scidiff.evaluation.evaluate_generation_quality", "scidiff.generate", "scidiff.perturb",
                 "scidiff.denoise", "scidiff.design", "scidiff.train", "scidiff.SamplingEngine"):
        assert f'id="{name}"' in api, f"api.md documents no {name} (autodoc found nothing to import?)"


def test_readme_is_an_entry_point():
    with open(README) as fh:
        lines = fh.read().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/ or bench/README.md"


# -- links -------------------------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INCLUDE = re.compile(r"^```\{include\}\s+(\S+)", re.M)


def prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code removed."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, re.sub(r"(`+)(?:(?!\1).)+?\1", "", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (MyST's ``myst_heading_anchors`` makes the same)."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    """The heading anchors of a Markdown file, those of the files it includes among them."""
    with open(path) as fh:
        text = fh.read()
    found, seen = set(), {}
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m and not fenced:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    for target in INCLUDE.findall(text):
        found |= anchors(os.path.normpath(os.path.join(os.path.dirname(path), target)))
    return found


def test_every_relative_link_points_to_a_file_and_heading_that_exist():
    broken = []
    for page in pages():
        with open(page) as fh:
            lines = prose(fh.read())
        for number, line in lines:
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
                where = f"{os.path.relpath(page, ROOT)}:{number}: {target}"
                if not os.path.exists(full):
                    broken.append(f"{where} (no such file)")
                elif anchor and full.endswith(".md") and anchor not in anchors(full):
                    broken.append(f"{where} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_sees_links_and_anchors():
    assert LINK.findall("see [the guide](docs/input.md#what-is-refused), not `[x](nowhere.md)`") == \
        ["docs/input.md#what-is-refused", "nowhere.md"]
    assert [t for _, line in prose("a `[x](nowhere.md)` b\n```\n[y](gone.md)\n```\n") for t in LINK.findall(line)] == []
    assert slug("Perturbation response on Kang") == "perturbation-response-on-kang"
    assert slug("Which weights are kept") == "which-weights-are-kept"


# -- names ---------------------------------------------------------------------------------------------

NAME = re.compile(r"\bscidiff(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"^\s*from\s+(scidiff(?:\.\w+)*)\s+import\s+([\w, ]+)", re.M)


def resolve(dotted: str):
    """The object a dotted ``scidiff.*`` name refers to: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name is not None and not ".".join(parts[:cut]).startswith(exc.name):
                raise  # a dependency of the module is missing, not the module
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def shown_names() -> set[str]:
    """The ``scidiff.*`` names README.md, bench/README.md and docs/ show (dotted or ``from ... import``)."""
    names = set()
    for page in pages():
        with open(page) as fh:
            text = fh.read()
        names |= {n.rstrip(".") for n in NAME.findall(text)}
        for module, imported in FROM_IMPORT.findall(text):
            names |= {f"{module}.{n.strip()}" for n in imported.split(",") if n.strip()}
    return {n for n in names if not n.startswith("scidiff.kernels")}  # Triton's modules: tests/test_kernels.py


def unresolved(names) -> list[str]:
    """``name: why`` for each name that does not resolve, or whose import raises a
    DeprecationWarning (a deprecated address: the old modules re-export under a warning)."""
    missing = []
    for name in sorted(names):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            try:
                resolve(name)
            except (ImportError, AttributeError, DeprecationWarning) as exc:
                missing.append(f"{name}: {type(exc).__name__}: {exc}")
    return missing


def test_every_scidiff_name_the_pages_show_exists():
    """Resolved in a fresh interpreter: a deprecated module that another test imported first
    would not warn again in this one."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "from test_docs import unresolved; print(json.dumps(unresolved(json.load(sys.stdin))))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(sorted(shown_names())), capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-6000:]
    missing = json.loads(out.stdout.strip().splitlines()[-1])
    assert not missing, ("names shown in README.md, bench/README.md or docs/ that do not exist or are deprecated:\n"
                         + "\n".join(missing))


def test_the_name_check_refuses_deprecated_addresses():
    code = ("import sys, warnings; sys.path.insert(0, 'tests'); from test_docs import unresolved; "
            "print(unresolved(['scidiff.pipeline.read_generated', 'scidiff.tasks.generate.read_generated', "
            "'scidiff.nowhere']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-6000:]
    assert "scidiff.pipeline.read_generated: DeprecationWarning" in out.stdout
    assert "scidiff.tasks.generate.read_generated" not in out.stdout
    assert "scidiff.nowhere" in out.stdout


def shell_lines(text: str) -> list[str]:
    """The lines of the fenced code blocks whose info string is empty, bash, console or sh."""
    out, info = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and info is None:
            info = line.strip()[3:].strip()
        elif m:
            info = None
        elif info in ("", "bash", "console", "sh"):
            out.append(line)
    return out


def test_every_command_the_guides_show_parses():
    """Each ``scidiff CMD ...`` line of a code block in docs/ names a command and flags it has
    (the README's own command lines: tests/test_cli.py)."""
    from scidiff.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    bad = []
    for page in sorted(glob.glob(os.path.join(DOCS, "*.md"))):
        with open(page) as fh:
            text = fh.read()
        for line in shell_lines(text):
            line = re.sub(r"^.*?-m scidiff ", "scidiff ", re.sub(r"\s#\s.*$", "", line)).strip()  # torchrun ... -m
            if not line.startswith("scidiff "):
                continue
            cmd = line.split()[1]
            where = f"{os.path.relpath(page, ROOT)}: {line}"
            if cmd not in commands:
                bad.append(f"{where} (no command {cmd!r})")
                continue
            known = commands[cmd]._option_string_actions
            bad += [f"{where} ({flag} is not a flag of {cmd})"
                    for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*|-n)(?![\w-])", line) if flag not in known]
    assert not bad, "\n".join(bad)
