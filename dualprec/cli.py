"""The `dualprec` command line.  Subcommands live in their own modules and are imported
only when run, so `dualprec explain` starts without torch or JAX."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from . import __version__
from .errors import PolicyError

#: name -> (module, help).  Each module has add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "explain": ("dualprec.cli", "what each backend does under a policy"),
    "presets": ("dualprec.cli", "list the named policies"),
    "conformance": ("conformance.cli", "run the cross-framework conformance suite"),
    "bench": ("bench.cli", "benchmark policies in both backends"),
}


def _explain_args(p):
    p.add_argument("policy", help='a policy string, e.g. "bf16-mixed" or "p=f32,c=bf16,quant=nf4"')
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _explain(args) -> int:
    from .explain import explain
    from .policy import Policy

    policy = Policy.parse(_maybe_int(args.policy))
    info = explain(policy)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = f"[bold]{info['policy']}[/bold]"
    if info["preset"]:
        head += f"  ({info['preset']['source']}: {info['preset']['description']})"
    console.print(head)
    d = info["dtypes"]
    console.print(f"params {d['params']} | compute {d['compute']} | output {d['output']} | reduce {d['reduce']}")
    table = Table(show_lines=True)
    table.add_column("")
    table.add_column("torch")
    table.add_column("jax")
    for key in info["backends"]["torch"]:
        table.add_row(key, info["backends"]["torch"][key], info["backends"]["jax"][key])
    console.print(table)
    for o in info["overrides"]:
        console.print(f"override [bold]{o['pattern']}[/bold]: {o['policy']}")
    if info.get("op_table_text"):
        print(info["op_table_text"])
    return 0


def _presets_args(p):
    p.add_argument("--json", action="store_true")


def _presets(args) -> int:
    from .grammar import explicit_form
    from .presets import PRESET_TABLE

    rows = [{"name": r.name, "aliases": list(r.aliases), "source": r.source, "description": r.description,
             "explicit": explicit_form(r.policy)} for r in PRESET_TABLE]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in ("name", "aliases", "source", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], ", ".join(r["aliases"]), r["source"], r["description"])
    Console().print(table)
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


def _run_lazy(command: str, module: str, rest: list[str]) -> int:
    if module == "bench.cli":
        # bench/ lives in the source checkout next to the package (an editable install or a
        # checkout on sys.path), not in a wheel: find it from the package, then the cwd.
        from pathlib import Path

        for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
            if (root / "bench" / "cli.py").is_file():
                if str(root) not in sys.path:
                    sys.path.insert(0, str(root))
                break
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        hint = (" (bench/ ships with the source checkout, not the wheel: pip install -e . from a "
                "checkout, or run it there)") if module == "bench.cli" else ""
        print(f"dualprec {command}: not available ({e}){hint}", file=sys.stderr)
        return 2
    return int(mod.main(rest) or 0)

if __name__ == "__main__":
    sys.exit(main())
