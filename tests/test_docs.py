"""README.md and docs/*.md cannot go stale.

* Every ```` ```python ```` block runs, in a fresh interpreter, in a temporary working
  directory, unless the line just before its fence is an HTML comment
  ``<!-- not run: <reason> -->`` (invisible on GitHub) or its first line is
  ``# not run: <reason>``. Keep such blocks few: fragments whose complete version is an
  example script that other tests run.
* Every public name of :mod:`rigl_func` (``__all__``) and of ``rigl_func.testing``,
  ``rigl_func.functional_optim`` and ``rigl_func.dispatch`` appears in docs/api.md,
  inside backticks.
* A block may end with ``# prints: <line>`` comments, one per line it prints (its last
  lines of output): words and integers must match exactly, decimals within ``PRINT_TOL``
  (they move slightly with the torch version, CPU and threads). Every README block that
  runs has one.
* README.md stays short (at most 260 lines) and shows the main-job and test commands; its
  test block is, line for line, what ``.ci/run`` runs on the README path (torch's line
  aside: CI installs torch 2.13.0 from its local disk), and its torchvision line is what
  CI's extras stage runs.
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
PRINTS = "# prints: "
PRINT_TOL = 0.02
_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)")


def expected_output(code: str) -> list[str]:
    """The ``# prints: ...`` lines at the end of a block, without the prefix, in order."""
    lines = code.rstrip().split("\n")
    out = []
    while lines and lines[-1].startswith(PRINTS):
        out.insert(0, lines.pop()[len(PRINTS):].strip())
    return out


def output_matches(actual: str, expected: str, tol: float = PRINT_TOL) -> bool:
    """Whether a printed line matches its ``# prints:`` line: the text between numbers equal
    (whitespace-normalized), integers equal, decimals within ``tol``."""
    a, e = _NUMBER.split(actual.strip()), _NUMBER.split(expected.strip())
    if len(a) != len(e):
        return False
    for i, (x, y) in enumerate(zip(a, e)):
        if i % 2 == 0:  # text between numbers
            if " ".join(x.split()) != " ".join(y.split()):
                return False
        elif "." in y:
            if "." not in x or abs(float(x) - float(y)) > tol + 1e-12:
                return False
        elif x != y:
            return False
    return True


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
    assert len(user_lines) <= 12, user_lines  # 11 + the seed line (every random choice takes a seed)
    for code, reason in readme:
        assert reason or expected_output(code), f"README block without a '{PRINTS}' line:\n{code}"
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
    expected = expected_output(code)
    printed = out.stdout.rstrip("\n").split("\n")[-len(expected):] if expected else []
    assert len(printed) == len(expected) and all(map(output_matches, printed, expected)), (
        f"the block printed {printed}, its '{PRINTS}' lines say {expected} (decimals within {PRINT_TOL})")


@pytest.mark.parametrize("actual, expected, ok", [
    ("accuracy 0.981, density 0.100, updates 5", "accuracy 0.981, density 0.100, updates 5", True),
    ("accuracy 0.965, density 0.1, updates 5", "accuracy 0.981, density 0.100, updates 5", True),
    ("accuracy 0.951, density 0.100, updates 5", "accuracy 0.981, density 0.100, updates 5", False),
    ("accuracy 0.981, density 0.100, updates 6", "accuracy 0.981, density 0.100, updates 5", False),
    ("accuracy 0.981, density 0.100, update 5", "accuracy 0.981, density 0.100, updates 5", False),
    ("accuracy 0.985 ± 0.002 (mean ± std over 4 seeds)", "accuracy 0.985 ± 0.002 (mean ± std over 4 seeds)", True),
    ("accuracy 0.985 ± 0.002 (mean ± std over 3 seeds)", "accuracy 0.985 ± 0.002 (mean ± std over 4 seeds)", False),
    ("accuracy 1 ± 0.002", "accuracy 0.985 ± 0.002", False),
    ("accuracy 0.98", "accuracy 0.98 extra", False),
])
def test_output_matches(actual, expected, ok):
    assert output_matches(actual, expected) is ok


def test_expected_output_is_the_trailing_prints_lines():
    assert expected_output("x = 1\n# prints: a 1\nprint(2)\n# prints: b 2\n# prints: c 3\n") == ["b 2", "c 3"]
    assert expected_output("print(1)\n") == []


def _documented_names() -> set[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    spans = re.findall(r"`([^`]+)`", text)
    return {tok for span in spans for tok in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}


@pytest.mark.parametrize("module", [rigl_func, rigl_func.testing, rigl_func.functional_optim,
                                    rigl_func.dispatch], ids=lambda m: m.__name__)
def test_every_public_name_is_in_api_md(module):
    missing = sorted(set(module.__all__) - _documented_names())
    assert not missing, f"docs/api.md does not mention {module.__name__}: {missing}"


def _bash_blocks(text: str) -> list[list[str]]:
    """The commands (comments and blank lines dropped, ``a && b`` as two) of each
    ```` ```bash ```` block."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    return [[cmd.strip() for ln in b.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
             for cmd in ln.split(" #", 1)[0].split(" && ")]
            for b in blocks]


def _ci_section(begin: str, end: str) -> list[str]:
    text = (ROOT / ".ci" / "run").read_text()
    assert begin in text and end in text, f".ci/run lost its markers {begin!r} / {end!r}"
    body = text[text.index(begin) + len(begin):text.index(end)]
    return [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_readme_is_short_and_has_the_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 260, "README.md: move reference material to docs/"
    assert "python examples/train_mnist1d.py" in readme  # the main job
    tests = [b for b in _bash_blocks(readme) if "python -m pytest" in b]
    assert len(tests) == 1, tests
    ci = _ci_section("# --- README path: begin", "# --- README path: end")
    readme_torch, ci_torch = tests[0][0], ci[0]
    # torch: the same command, from the CPU index for users, from the local disk (a pinned CPU wheel) in CI
    assert re.sub(r"\s*--index-url \S+", "", readme_torch) == re.sub(r"==\S+", "", ci_torch) == "pip install torch"
    assert tests[0][1:] == ci[1:] == ['pip install -e ".[dev]"', "python -m pytest", "python -m benchmarks --smoke"]


def test_readme_torchvision_line_cannot_swap_torch_and_ci_runs_it():
    readme = (ROOT / "README.md").read_text()
    lines = [ln for b in _bash_blocks(readme) for ln in b if "torchvision" in ln]
    assert len(lines) == 1 and lines[0].startswith("pip install --no-deps torchvision=="), lines
    assert lines[0] in _ci_section("# --- extras: begin", "# --- extras: end")
    extras = re.findall(r'^(\w+) = \[(.*)\]$', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert extras and not any("torchvision" in deps for _, deps in extras), extras  # no extra can swap torch


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
