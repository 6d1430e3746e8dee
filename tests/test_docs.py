"""README.md and docs/*.md cannot go stale.

* Every ```` ```python ```` block runs, in a fresh interpreter, in a temporary working
  directory, unless the line just before its fence is an HTML comment
  ``<!-- not run: <reason> -->`` (invisible on GitHub) or its first line is
  ``# not run: <reason>``. Keep such blocks few: fragments whose complete version is an
  example script that other tests run.
* Every public name of :mod:`rigl_func` (``__all__``) and of ``rigl_func.testing``,
  ``rigl_func.functional_optim`` and ``rigl_func.dispatch`` appears in docs/api.md,
  inside backticks.
* README.md stays short (at most 260 lines) and shows the main-job and test commands.
* Every relative link (and image) in README.md and docs/*.md points to an existing file.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import rigl_func
import rigl_func.dispatch
import rigl_func.functional_optim
import rigl_func.testing

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^\s*(<!--\s*not run\b|# not run\b)")
MAX_SKIPPED = 4


def code_blocks(path: Path) -> list[tuple[int, str, str]]:
    """``(line, code, skip_reason)`` for each ```` ```python ```` block of ``path``;
    ``skip_reason`` is "" for blocks that must run."""
    lines = path.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            code = "\n".join(lines[start + 1:j])
            before = lines[start - 1] if start else ""
            first = code.split("\n", 1)[0]
            reason = before if NOT_RUN.match(before) else first if NOT_RUN.match(first) else ""
            blocks.append((start + 1, code, reason.strip()))
            i = j
        i += 1
    return blocks


ALL_BLOCKS = [(p, line, code, reason) for p in DOCS for line, code, reason in code_blocks(p)]
RUN_BLOCKS = [pytest.param(code, id=f"{p.relative_to(ROOT)}:{line}")
              for p, line, code, reason in ALL_BLOCKS if not reason]


def test_blocks_found_and_few_skipped():
    """The collector sees the README's quick start; skipped blocks are few and say why."""
    readme = [(code, reason) for p, _, code, reason in ALL_BLOCKS if p.name == "README.md"]
    quick_start, reason = readme[0]
    assert not reason and "tx.step(" in quick_start and "grad(" in quick_start, "the README quick start must run"
    # issue 13: a complete torch.func.grad training loop in about 10 lines of user code
    user_lines = [ln for ln in quick_start.splitlines()
                  if ln.strip() and not ln.startswith(("import ", "from ")) and not ln.lstrip().startswith("#")]
    assert len(user_lines) <= 11, user_lines
    skipped = [(p.name, line, reason) for p, line, _, reason in ALL_BLOCKS if reason]
    assert len(skipped) <= MAX_SKIPPED, skipped
    for name, line, reason in skipped:
        assert re.search(r"not run:\s*\S", reason), f"{name}:{line}: say why the block is not run"


@pytest.mark.parametrize("code", RUN_BLOCKS)
def test_code_block_runs(code, tmp_path):
    """Each block is a self-contained script: it runs as is, in a fresh process."""
    script = tmp_path / "block.py"
    script.write_text(code + "\n")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"block failed:\n{code}\n--- stderr ---\n{out.stderr[-3000:]}"


def _documented_names() -> set[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    spans = re.findall(r"`([^`]+)`", text)
    return {tok for span in spans for tok in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}


@pytest.mark.parametrize("module", [rigl_func, rigl_func.testing, rigl_func.functional_optim,
                                    rigl_func.dispatch], ids=lambda m: m.__name__)
def test_every_public_name_is_in_api_md(module):
    missing = sorted(set(module.__all__) - _documented_names())
    assert not missing, f"docs/api.md does not mention {module.__name__}: {missing}"


def test_readme_is_short_and_has_the_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 260, "README.md: move reference material to docs/"
    assert "python examples/train_mnist1d.py" in readme  # the main job
    assert "python -m pytest" in readme  # the test command, as .ci/run runs it
    assert "python -m pytest\n" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(path):
    text = path.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    broken = []
    for target in targets:
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"
