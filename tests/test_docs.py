"""The documentation: its runnable code blocks run, and the site builds with `mkdocs build --strict`.

Convention for documentation authors: every ```python block in README.md and docs/*.md is preceded by a marker line, an
HTML comment that neither GitHub nor the site shows (`test_every_python_block_is_marked` fails on an unmarked block):

    <!-- test: run -->                 executed here, offline, on CPU (use trl_cpo.tiny models)
    <!-- test: skip (reason) -->       shown only (downloads a model, needs a GPU, ...)

Each runnable block runs on its own, in a fresh namespace, in a temporary working directory.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from helpers import REPO

DOCS = REPO / "docs"
README = REPO / "README.md"
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*test:\s*(run|skip)\b[^>]*-->\s*$")


def python_blocks():
    """(page, line, marker or None, code) for every ```python block in README.md and docs/*.md."""
    blocks = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip("\n").splitlines()
            marker = MARKER.search(before[-1]) if before else None
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((page.name, line, marker.group(1) if marker else None, match.group(1)))
    return blocks


BLOCKS = python_blocks()
RUNNABLE = [pytest.param(code, id=f"{page}:{line}") for page, line, marker, code in BLOCKS if marker == "run"]


def test_every_python_block_is_marked():
    unmarked = [f"{page}:{line}" for page, line, marker, _ in BLOCKS if marker is None]
    assert not unmarked, (
        f"python blocks without a '<!-- test: run -->' or '<!-- test: skip -->' line above: {unmarked}"
    )
    assert len(RUNNABLE) >= 5


def test_readme_swap_snippet_is_run():
    """The README's first code block is the swap on a plain DPOConfig, and it is one of the blocks run below."""
    readme = [(marker, code) for page, _, marker, code in BLOCKS if page == README.name]
    assert readme, "README.md has no python block"
    marker, code = readme[0]
    assert marker == "run", "the README's first python block must be marked '<!-- test: run -->'"
    assert "from trl_cpo import CPOTrainer" in code and "DPOConfig(" in code and "CPOTrainer(" in code
    assert "trainer.train()" in code


def test_readme_is_a_front_door():
    """At most 1,200 words (as `wc -w` counts them), and the runnable swap comes before the set-up commands."""
    text = README.read_text(encoding="utf-8")
    assert len(text.split()) <= 1200, f"README.md has {len(text.split())} words; move depth into docs/"
    assert text.index("```python") < text.index("## Set up")


@pytest.mark.parametrize("code", RUNNABLE)
def test_doc_block_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__main__"})


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed (pip install '.[docs]')")
def test_mkdocs_build_strict(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "NO_MKDOCS_2_WARNING": "1",
    }
    site = tmp_path / "site"
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The generated parts are there: the configuration tables (hook) and the API reference (mkdocstrings).
    configuration = (site / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "<code>cpo_gamma</code>" in configuration and "<code>ecpoc_tau</code>" in configuration
    assert "length_normalize" not in configuration
    assert "config-reference:" not in configuration
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert "cpo_margin" in api and "UFractionCallback" in api and "is_length_normalized" in api
