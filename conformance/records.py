"""The record: one check's verdict, the unit the suite reports, stores and compares.

Every check yields records; the CLI prints them, the report renders them, the JSON file is
a list of them.  A record always says which policy, model and check it is about, which tier
(bit-exact or tolerance), the status (pass / fail / error / skip; error: the check raised) and why, and the measured error
against the tolerance, so a failure can be read without rerunning anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

TIERS = ("bit-exact", "tolerance")
STATUSES = ("pass", "fail", "error", "skip")

#: Keys every record in the JSON carries, in this order (the documented schema).
REQUIRED_KEYS = ("policy", "model", "check", "tier", "status", "reason", "max_abs_err",
                 "max_rel_err", "max_ulp_err", "tolerance", "where", "step")


@dataclasses.dataclass
class Record:
    """One check's verdict.

    ``where`` names the layer, op or parameter where the two backends diverge most (or
    first, for step-wise checks); ``step`` the training step where it happened (None when
    the check has no steps).  ``tolerance`` is the relative tolerance for the tolerance tier
    and 0.0 for the bit-exact tier.  ``detail`` carries per-step series (for plots) and any
    check-specific facts.
    """

    policy: str
    model: str
    check: str
    tier: str
    status: str
    reason: str = ""
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    max_ulp_err: float | None = None
    tolerance: float | None = None
    where: str | None = None
    step: int | None = None
    seconds: float = 0.0
    detail: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {self.tier!r}")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.status in ("skip", "fail", "error") and not self.reason:
            raise ValueError(f"a {self.status} record needs a reason ({self.policy}/{self.model}/{self.check})")

    @property
    def failed(self) -> bool:
        """A divergence (fail) or a check that raised (error): either makes a run red."""
        return self.status in ("fail", "error")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: _jsonable(d[k]) for k in REQUIRED_KEYS + ("seconds", "detail")}

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _jsonable(v: Any) -> Any:
    """Plain JSON values: NaN/inf errors become strings so the file stays strict JSON."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def dumps(records: list[Record]) -> str:
    return json.dumps([r.to_dict() for r in records], indent=2, allow_nan=False)


def loads(text: str) -> list[Record]:
    return [Record.from_dict(d) for d in json.loads(text)]


def validate(data: list[dict]) -> None:
    """Raise ValueError unless ``data`` (parsed JSON) follows the record schema."""
    if not isinstance(data, list):
        raise ValueError("records JSON must be a list")
    for i, d in enumerate(data):
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ValueError(f"record {i} lacks {missing}")
        if d["tier"] not in TIERS or d["status"] not in STATUSES:
            raise ValueError(f"record {i}: bad tier/status {d['tier']!r}/{d['status']!r}")
        if d["status"] != "pass" and not d["reason"]:
            raise ValueError(f"record {i}: {d['status']} without a reason")


def summary(records: list[Record]) -> dict[str, int]:
    return {s: sum(r.status == s for r in records) for s in STATUSES}
