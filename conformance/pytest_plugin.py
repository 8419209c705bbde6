"""pytest plugin: the ``golden`` fixture makes a cross-framework numerics regression test one line.

Enable with ``pytest_plugins = ["conformance.pytest_plugin"]`` (or the ``pytest11`` entry
point), then::

    def test_my_model(golden):
        golden("my_model_bf16", {"logits": logits}, policy="bf16-mixed")

The first run (or any run with ``--golden-update``) writes ``<test dir>/golden/<name>.npz``
and passes; later runs compare against it with the policy's tolerances and fail with the
localised divergence.  ``--golden-dir`` puts the files elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("dualprec golden files")
    group.addoption("--golden-update", action="store_true", default=False,
                    help="(re)write golden .npz files instead of checking against them")
    group.addoption("--golden-dir", default=None, help="directory of golden files (default: <test dir>/golden)")


class GoldenFailure(AssertionError):
    pass


@pytest.fixture
def golden(request):
    """``golden(name, arrays, policy=None, shape=None)`` -> list of Records; raises on failure."""
    from . import golden as gold

    opt = request.config.getoption
    base = Path(opt("--golden-dir")) if opt("--golden-dir") else Path(request.node.path).parent / "golden"

    def run(name: str, arrays, policy=None, shape=None, **meta):
        path = base / f"{name}.npz"
        if opt("--golden-update") or not path.exists():
            if policy is None:
                raise ValueError("a new golden file needs its policy: golden(name, arrays, policy=...)")
            gold.save(path, arrays, policy, test=request.node.nodeid, **meta)
            return []
        records = gold.check(path, arrays, policy, shape, model=name)
        bad = [r for r in records if r.failed]
        if bad:
            raise GoldenFailure(f"{path}: {len(bad)} of {len(records)} arrays diverge\n"
                                + "\n".join(f"  {r.reason}" for r in bad[:10]))
        return records

    return run
