"""``python -m conformance.calibrate``: measure how closely the unmutated backends agree and
write the calibrated tolerances (``conformance/calibration.json``).

For every record of the tolerance tier, every tensor it compares, over several seeds (each
seed draws other weights and other data): the largest ULP distance and the largest fraction
of elements that are not bitwise equal.  ``tolerances.Calibrated`` turns them into
thresholds with the margins written there.  Re-run after a change to either backend's
numerics (or to torch / XLA) and review the diff of calibration.json like code: a tolerance
that grows is a behaviour that changed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def aggregate(runs: list[list]) -> dict:
    entries: dict = {}
    from .tolerances import key

    for records in runs:
        for r in records:
            if r.tier != "tolerance" or r.status not in ("pass", "fail"):
                continue
            for tensor, st in r.detail.get("per_tensor", {}).items():
                k = key(r.policy, r.model, r.check, tensor)
                e = entries.setdefault(k, {"max_ulp": 0.0, "neq_frac": 0.0, "size": st["size"]})
                e["max_ulp"] = max(e["max_ulp"], float(st["max_ulp"]))
                e["neq_frac"] = max(e["neq_frac"], float(st["neq_frac"]))
    return entries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None, help="default: conformance/calibration.json")
    p.add_argument("--policy", action="append", default=None,
                   help="measure only these policies (repeatable) and merge their entries into the "
                        "existing file; every other entry is kept as it is")
    p.add_argument("--model", action="append", default=None, help="with --policy: only these models")
    args = p.parse_args(argv)
    subset = []
    for flag, values in (("--policy", args.policy), ("--model", args.model)):
        for v in values or ():
            subset += [flag, v]
    from . import tolerances
    from .records import loads

    runs, t0 = [], time.perf_counter()
    for seed in args.seeds:
        # one process per seed: a float64 policy switches jax_enable_x64 on for the rest of
        # its process, and the default matrix runs those last for that reason
        env = dict(os.environ, DUALPREC_CONFORMANCE_UNCALIBRATED="1")
        out = subprocess.run([sys.executable, "-m", "conformance", "--format", "json", "--seed", str(seed),
                              "--steps", str(args.steps), *subset], capture_output=True, text=True, env=env)
        if out.returncode not in (0, 1):
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        runs.append(loads(out.stdout))
        print(f"seed {seed}: {len(runs[-1])} records, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    entries = aggregate(runs)
    if subset:
        # a subset run replaces the entries of the measured cells only
        measured = {f"{r.policy}|{r.model}" for rs in runs for r in rs}
        try:
            old = json.loads(tolerances.CALIBRATION_FILE.read_text())["entries"]
        except (OSError, ValueError, KeyError):
            old = {}
        kept = {k: v for k, v in old.items() if "|".join(k.split("|")[:2]) not in measured}
        entries = {**kept, **entries}
    data = {"seeds": args.seeds, "steps": args.steps,
            "margins": {"ulp_margin": tolerances.ULP_MARGIN, "ulp_floor": tolerances.ULP_FLOOR,
                        "frac_slack": tolerances.FRAC_SLACK, "frac_per_element": tolerances.FRAC_PER_ELEMENT},
            "entries": dict(sorted(entries.items()))}
    out = args.out or tolerances.CALIBRATION_FILE
    with open(out, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"{len(entries)} calibrated tensors -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
