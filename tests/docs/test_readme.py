"""The README is tested: every ```python block runs as written (in order, in one fresh
process), the generated tables match the code, and no document points outside the
repository."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
OUTSIDE = ("DESIGN" + ".md", "shared" + "/")  # spelled apart so this file does not match itself


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("```", 2)[1]
    assert "dualprec conformance" in head and "python -m pytest" in head
    assert head.count("pip install torch==2.13.0") == 2


@pytest.mark.slow
def test_every_python_snippet_runs(tmp_path):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n\n".join(f"# --- README block {i}\n{b}" for i, b in enumerate(blocks)))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_generated_sections_are_current():
    from dualprec import docgen

    text = README.read_text()
    for name, body in docgen.sections().items():
        m = re.search(rf"<!-- BEGIN {name} -->\n(.*?)<!-- END {name} -->", text, flags=re.S)
        assert m, f"README has no generated section {name}: run python -m dualprec.docgen --write"
        assert m.group(1) == body, f"README section {name} is stale: run python -m dualprec.docgen --write"


def test_no_document_or_source_points_outside_the_repository():
    offenders = []
    for path in ROOT.rglob("*"):
        if any(part in (".git", ".venv", "node_modules", "__pycache__", ".pytest_cache", ".hypothesis")
               for part in path.parts) or not path.is_file():
            continue
        if path.suffix not in (".py", ".md", ".toml", ".txt", ".cfg", ".yaml", ".yml") and path.name != "run":
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{path.relative_to(ROOT)}: {word}" for word in OUTSIDE if word in text]
    assert not offenders, offenders
