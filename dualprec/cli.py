"""The `dualprec` command line.  Subcommands live in their own modules and are imported
only when run, so `dualprec explain` starts without torch or JAX."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from . import __version__
from .errors import PolicyError
from .grammar import wrap_policy

#: name -> (module, help).  Each module has add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "explain": ("dualprec.cli", "what each backend does under a policy"),
    "presets": ("dualprec.cli", "list the named policies"),
    "conformance": ("conformance.cli", "run the cross-framework conformance suite"),
    "bench": ("bench.cli", "benchmark policies in both backends (from a source checkout)"),
    "diagnose": ("dualprec.diagnose_cli", "rank the modules a policy breaks, suggest a fix"),
}


def _explain_args(p):
    p.add_argument("policy", help='a policy string, e.g. "bf16-mixed" or "p=f32,c=bf16,quant=nf4"')
    p.add_argument("--ops", action="store_true", help="also print the full op table (every aten op and its "
                   "JAX counterparts)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def terminal_width() -> int:
    """The width output is wrapped to: the terminal's (COLUMNS), 80 when not a terminal."""
    import shutil

    return max(40, shutil.get_terminal_size((80, 24)).columns)


def wrap(text: str, width: int, indent: str = "", subsequent: str | None = None) -> list[str]:
    """``text`` wrapped at ``width`` without ever breaking a word or a hyphenated name (a
    policy such as bf16-mixed stays whole; a token longer than the line gets its own line)."""
    import textwrap

    return textwrap.wrap(text, width, initial_indent=indent,
                         subsequent_indent=indent if subsequent is None else subsequent,
                         break_long_words=False, break_on_hyphens=False) or [indent.rstrip()]


def _rewrap(block: str, width: int) -> list[str]:
    """Each line of ``block`` wrapped at ``width``, continuation lines indented 4 more."""
    out = []
    for line in block.splitlines():
        lead = line[:len(line) - len(line.lstrip())]
        out += wrap(line.strip(), width, lead, lead + "    ") if len(line) > width else [line]
    return out


def _op_summary(rows: list[dict], width: int) -> list[str]:
    lines = []
    for kind in dict.fromkeys(r["list"] for r in rows):
        names = [r["name"] for r in rows if r["list"] == kind]
        rule = next(r["rule"] for r in rows if r["list"] == kind)
        lines += wrap(f"[{kind}] {rule}: {', '.join(names)}", width, "  ", "      ")
    return lines


def import_backends() -> dict[str, str]:
    """Import the installed backend packages, so that they register what they run.

    The command line is the application on top of the layers: it imports the backends the
    library's `explain` describes (the spec layer itself never imports one).

    Returns:
        Backend package -> why it could not be imported, for each installed one that failed.
    """
    import importlib.util

    from .registry import BACKENDS

    failed = {}
    for package in BACKENDS.values():
        if importlib.util.find_spec(package) is None:
            continue
        try:
            importlib.import_module(package)
        except ImportError as e:
            failed[package] = f"{type(e).__name__}: {e}"
    return failed


def _explain(args) -> int:
    from .explain import explain
    from .policy import Policy

    policy = Policy.parse(_maybe_int(args.policy))
    for package, why in import_backends().items():
        print(f"dualprec explain: {package} is installed but does not import ({why})", file=sys.stderr)
    info = explain(policy)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = terminal_width()
    lines = wrap_policy(info["policy"], width, "", "  ")
    if info["preset"]:
        lines += wrap(f"{info['preset']['source']}: {info['preset']['description']}", width, "  ")
    d = info["dtypes"]
    lines += wrap(f"params {d['params']} | compute {d['compute']} | output {d['output']} | reduce {d['reduce']}",
                  width)
    torch_rows, jax_rows = info["backends"]["torch"], info["backends"]["jax"]
    for key in torch_rows:
        lines.append("")
        lines.append(key)
        if torch_rows[key] == jax_rows[key]:
            lines += wrap(f"both:  {torch_rows[key]}", width, "  ", "         ")
        else:
            lines += wrap(f"torch: {torch_rows[key]}", width, "  ", "         ")
            lines += wrap(f"jax:   {jax_rows[key]}", width, "  ", "         ")
    for o in info["overrides"]:
        lines.append("")
        lines += wrap_policy(f"override @{o['pattern']}: {o['policy']}", width, "", "  ")
    lines.append("")
    if args.ops:
        lines += _rewrap(info.get("op_table_text") or "", width)
    else:
        rows = info.get("op_table") or []
        on = [r for r in rows if not r["rule"].startswith("autocast off")]
        if on:
            lines.append("op table (torch's CUDA autocast lists; op names only):")
            lines += _op_summary(on, width)
            lines += wrap("every other op (mean, var, std, batch_norm, gelu, add, cat, ...): its inputs' dtype. "
                          f"`dualprec explain {args.policy} --ops` lists the aten ops and JAX counterparts.",
                          width, "  ", "  ")
        else:
            lines += wrap(info.get("op_table_text") or "", width)
    print("\n".join(lines))
    return 0


def _presets_args(p):
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _presets(args) -> int:
    from .grammar import explicit_form
    from .presets import PRESET_TABLE

    rows: list[dict[str, Any]] = [{"name": r.name, "aliases": list(r.aliases), "source": r.source, "description": r.description,
             "explicit": explicit_form(r.policy)} for r in PRESET_TABLE]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = terminal_width()
    lines = []
    for source in dict.fromkeys(r["source"] for r in rows):
        lines.append(f"{source}:")
        for r in (r for r in rows if r["source"] == source):
            head = r["name"] + (f"  (also {', '.join(r['aliases'])})" if r["aliases"] else "")
            lines += wrap(head, width, "  ", "    ")
            lines += wrap(r["description"], width, "      ")
            lines += wrap_policy(r["explicit"], width, "      ", "        ")
        lines.append("")
    lines += wrap("Any of these takes changes after it: \"bf16-mixed,@lm_head=32-true\", \"nf4,quant=nf4"
                  "(skip=lm_head)\". `dualprec explain NAME` says what each backend does.", width)
    print("\n".join(lines))
    return 0


def _maybe_int(text: str):
    text_ = text.strip()
    return int(text_) if text_.isascii() and text_.isdigit() else text  # "٣٢".isdigit() too


add_arguments = {"explain": _explain_args, "presets": _presets_args}
run = {"explain": _explain, "presets": _presets}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if argv and argv[0] in SUBCOMMANDS and SUBCOMMANDS[argv[0]][0] != "dualprec.cli":
        # Subcommands in other modules parse their own options (argparse's REMAINDER would
        # refuse a first argument such as --policy).
        return _guarded(lambda: _run_lazy(argv[0], SUBCOMMANDS[argv[0]][0], argv[1:]), debug)
    parser = argparse.ArgumentParser(prog="dualprec", description="One precision policy for PyTorch and JAX.",
                                     epilog="--debug (anywhere): show the traceback of an error")
    parser.add_argument("--version", action="version", version=f"dualprec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        if module == "dualprec.cli":
            add_arguments[name](sp)
        else:
            sp.set_defaults(_lazy=module)
            sp.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if getattr(args, "_lazy", None):
        return _guarded(lambda: _run_lazy(args.command, args._lazy, args.rest), debug)
    return _guarded(lambda: run[args.command](args), debug)


def _guarded(call, debug: bool) -> int:
    """Run a subcommand: an error is one line on stderr (exit 2 for a bad policy, 1 for
    anything else) unless --debug asks for the traceback."""
    try:
        return call()
    except PolicyError as e:
        if debug:
            raise
        print(f"dualprec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dualprec: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's promise: one line, no traceback
        if debug:
            raise
        print(f"dualprec: error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _shadowed(top: str) -> str | None:
    """Why the top-level package ``top`` (conformance, bench) that Python would import is not
    the one installed next to dualprec, or None: a folder of that name in the current
    directory (or earlier on sys.path) would otherwise run in its place."""
    import importlib.util
    from pathlib import Path

    ours = Path(__file__).resolve().parent.parent / top
    if not (ours / "__init__.py").is_file():
        return None  # not installed with dualprec (bench in a wheel): the import error says so
    loaded = sys.modules.get(top)
    try:
        origin = getattr(loaded, "__file__", None) if loaded is not None else getattr(importlib.util.find_spec(top), "origin", None)
    except (ImportError, ValueError, AttributeError):
        return None
    if origin is None or Path(origin).resolve().parent == ours:
        return None
    return (f"the {top!r} package Python finds first is {Path(origin).parent}, not dualprec's ({ours}): a folder "
            f"named {top} in the current directory or earlier on sys.path shadows it; run from another "
            "directory or rename that folder")


#: what `dualprec bench` says where the benches cannot be imported
BENCH_FROM_CHECKOUT = ("dualprec bench runs from a source checkout: bench/ is not part of the installed "
                       "package; in the checkout's root run `python -m bench ...`")


def _run_lazy(command: str, module: str, rest: list[str]) -> int:
    shadow = _shadowed(module.split(".")[0])
    if shadow:
        print(f"dualprec {command}: {shadow}", file=sys.stderr)
        return 2
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if module == "bench.cli" and e.name in ("bench", "bench.cli"):
            print(BENCH_FROM_CHECKOUT, file=sys.stderr)
        else:
            print(f"dualprec {command}: not available ({e})", file=sys.stderr)
        return 2
    import inspect

    named = {"prog": f"dualprec {command}"} if "prog" in inspect.signature(mod.main).parameters else {}
    return int(mod.main(rest, **named) or 0)

if __name__ == "__main__":
    sys.exit(main())
