"""The spec layer's public API documents its arguments and results (Google style).

Every public function and method checked here has an ``Args:`` section naming exactly its
parameters (no missing, no stale ones) and, unless it returns None, a ``Returns:`` section;
every public dataclass has an ``Attributes:`` section naming exactly its fields.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

import pytest

import dualprec
from dualprec import capabilities, checkpoint, errors, grammar, registry

presets = importlib.import_module("dualprec.presets")  # the package attribute is the presets() function

_FUNCTIONS = [
    grammar.parse_policy, dualprec.explain, dualprec.presets, dualprec.check_policy,
    capabilities.resolve_fp8_engine,
    presets.preset_names, presets.lookup_preset, presets.preset_name_of,
    registry.register, registry.registered, registry.loaded, registry.not_loaded, registry.describe,
    registry.register_check, registry.refusal, checkpoint.register_array_converter,
    checkpoint.save, checkpoint.load, checkpoint.save_state, checkpoint.load_state,
    checkpoint.save_training_file, checkpoint.load_training_file, checkpoint.write_checked,
    checkpoint.read_checked, checkpoint.register_state_extension, checkpoint.state_extensions,
    checkpoint.loadable_extensions, checkpoint.new_state, checkpoint.check_state, checkpoint.check_values,
    checkpoint.clamped_loss_scale, checkpoint.state_to_file, checkpoint.state_from_file,
    errors.one_line, errors.closest, errors.did_you_mean,
]
_CLASSES = [getattr(dualprec, n) for n in dualprec.__all__ if inspect.isclass(getattr(dualprec, n))]
_CLASSES += [presets.Preset, capabilities.Finding, checkpoint.StateExtension]


def _section(doc: str, title: str) -> list[str] | None:
    """The entry names of a Google-style section (entries one indent in, ``name: text``), or
    None when the docstring has no such section."""
    lines = doc.splitlines()
    if f"{title}:" not in lines:
        return None
    names = []
    for line in lines[lines.index(f"{title}:") + 1:]:
        if line and not line.startswith(" "):  # the next section
            break
        m = re.match(r"    (\*{0,2}\w+)( \(.*\))?:", line)
        if m:
            names.append(m.group(1))
    return names


def _methods():
    for cls in _CLASSES:
        for name, member in vars(cls).items():
            if name.startswith("_"):
                continue
            if isinstance(member, (classmethod, staticmethod)):
                yield f"{cls.__name__}.{name}", member.__func__
            elif inspect.isfunction(member):
                yield f"{cls.__name__}.{name}", member


def _params(fn) -> list[str]:
    out = []
    for i, p in enumerate(inspect.signature(fn).parameters.values()):
        if i == 0 and p.name in ("self", "cls"):
            continue
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        out.append(prefix + p.name)
    return out


_CALLABLES = [(f"{f.__module__}.{f.__name__}", f) for f in _FUNCTIONS] + list(_methods())


def test_the_lists_cover_the_api():
    names = {n for n, _ in _CALLABLES}
    for expected in ("Policy.parse", "Policy.for_module", "Policy.check", "LossScaleConfig.dynamic",
                     "CheckReport.raise_if_unrunnable", "dualprec.checkpoint.save_state"):
        assert expected in names
    assert len(_CALLABLES) > 50


@pytest.mark.parametrize("name,fn", _CALLABLES, ids=[n for n, _ in _CALLABLES])
def test_public_callable_has_args_and_returns(name, fn):
    doc = inspect.getdoc(fn)
    assert doc, f"{name} has no docstring"
    params = _params(fn)
    documented = _section(doc, "Args")
    if params:
        assert documented == params, f"{name}: Args documents {documented}, the signature has {params}"
    else:
        assert documented is None, f"{name} takes no arguments but documents {documented}"
    returns = inspect.signature(fn).return_annotation
    if returns not in ("None", None):
        assert _section(doc, "Returns") is not None, f"{name} returns {returns} but has no Returns section"
    else:
        assert _section(doc, "Returns") is None, f"{name} returns None but has a Returns section"


@pytest.mark.parametrize("cls", _CLASSES, ids=[c.__name__ for c in _CLASSES])
def test_public_class_documents_its_fields(cls):
    doc = inspect.getdoc(cls)
    assert doc and doc != inspect.getdoc(cls.__mro__[1]), f"{cls.__name__} has no docstring of its own"
    if dataclasses.is_dataclass(cls):
        fields = [f.name for f in dataclasses.fields(cls)]
        assert _section(doc, "Attributes") == fields, f"{cls.__name__}: Attributes do not match its fields {fields}"
    for name, member in vars(cls).items():
        if isinstance(member, property) and not name.startswith("_"):
            assert inspect.getdoc(member), f"{cls.__name__}.{name} has no docstring"


def test_section_parser_reads_a_google_docstring():
    doc = "Do it.\n\nArgs:\n    a: one\n        more\n    **kw: rest\n\nReturns:\n    x: no entry name here"
    assert _section(doc, "Args") == ["a", "**kw"]
    assert _section(doc, "Raises") is None
