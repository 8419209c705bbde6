"""Times the default conformance matrix on CPU (target: <= 120 s on a 2-core machine) and
writes the timing and the pass/fail/skip counts to bench/results/conformance_<host>.json."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from conformance import matrix
    from conformance.records import summary

    t0 = time.perf_counter()
    records = matrix.run(steps=3)
    seconds = time.perf_counter() - t0
    by_policy = {}
    for r in records:
        by_policy.setdefault(r.policy, 0.0)
        by_policy[r.policy] += r.seconds
    result = {"benchmark": "conformance default matrix", "seconds": round(seconds, 2), "target_seconds": 120,
              "within_target": seconds <= 120, "counts": summary(records), "records": len(records),
              "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
              "seconds_by_policy": {k: round(v, 2) for k, v in by_policy.items()},
              "failures": [f"{r.policy}/{r.model}/{r.check}: {r.reason}" for r in records if r.status == "fail"]}
    out = ROOT / "bench" / "results" / f"conformance_{platform.node() or 'host'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("seconds", "within_target", "counts")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
