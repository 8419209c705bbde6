"""The timing and recording core of the benchmarks: statistics of repeated steps, the record
schema, the run environment, JSON result files, the rich table and the time-budget guard.

Nothing here imports torch or JAX at module level; the backends hand in a `sync` function
that waits for their device, so one harness times both the same way.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import json
import math
import os
import platform
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA_VERSION", "STATUS_OK", "STATUS_NOT_IMPLEMENTED", "STATUS_SKIPPED_BUDGET",
    "Stats", "summarize", "Record", "time_interleaved", "time_steps", "tflops",
    "environment", "results_path", "ResultsFile", "add_baseline_ratios", "rich_table", "reasons",
    "BudgetGuard", "Row", "run_rows", "DEFAULT_RESULTS_DIR", "default_results_dir",
]

SCHEMA_VERSION = 1
STATUS_OK = "ok"
STATUS_NOT_IMPLEMENTED = "not implemented"
STATUS_SKIPPED_BUDGET = "skipped: time budget"
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Packages whose versions every record carries.
VERSIONED = ("dualprec", "torch", "jax", "jaxlib", "flax", "optax", "jmp", "bitsandbytes", "torchao",
             "numpy", "ml_dtypes")


# --------------------------------------------------------------------------- statistics


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), written out so the harness needs
    no numpy and the arithmetic is testable by hand."""
    n = len(sorted_values)
    if n == 0:
        raise ValueError("no samples")
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Seconds per step: median and spread (quartiles and extremes) of n timed steps."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def rel_iqr(self) -> float:
        """The interquartile range as a fraction of the median: the noise figure."""
        return self.iqr / self.median if self.median > 0 else float("nan")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["iqr"] = self.iqr
        return d


def summarize(samples: Iterable[float]) -> Stats:
    values = sorted(float(s) for s in samples)
    if not values:
        raise ValueError("summarize() needs at least one sample")
    return Stats(median=_quantile(values, 0.5), q1=_quantile(values, 0.25), q3=_quantile(values, 0.75),
                 min=values[0], max=values[-1], n=len(values))


def tflops(flops_per_step: float | None, seconds: float | None) -> float | None:
    if not flops_per_step or not seconds or seconds <= 0:
        return None
    return flops_per_step / seconds / 1e12


# --------------------------------------------------------------------------- timing


def _no_sync(result):
    return result


@dataclass
class Timing:
    """What timing one step function gave: the first call (compilation included, reported
    apart from the steady state) and the per-step samples after warm-up."""

    first_call_s: float
    samples: list[float]

    @property
    def stats(self) -> Stats:
        return summarize(self.samples)


def time_interleaved(steps: Mapping[str, Callable[[], Any]], *, warmup: int = 2, rounds: int = 3,
                     steps_per_round: int = 3, sync: Callable[[Any], Any] = _no_sync,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time several step functions against each other, alternating them in rounds.

    A ratio between two implementations is only as good as the conditions they were timed
    under; on a shared machine the load drifts, so the steps take turns (A A A, B B B, A A A,
    ...) and drift lands on both.  The first call of each is timed alone (it includes
    compilation), then `warmup - 1` untimed calls, then `rounds * steps_per_round` timed
    calls, each ended by `sync` (which must wait for the device: cuda synchronize, JAX
    block_until_ready).
    """
    if warmup < 1 or rounds < 1 or steps_per_round < 1:
        raise ValueError("warmup, rounds and steps_per_round must be >= 1")
    timings: dict[str, Timing] = {}
    for name, step in steps.items():
        t0 = clock()
        sync(step())
        first = clock() - t0
        for _ in range(warmup - 1):
            sync(step())
        timings[name] = Timing(first, [])
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(steps_per_round):
                t0 = clock()
                sync(step())
                timings[name].samples.append(clock() - t0)
    return timings


def time_steps(step: Callable[[], Any], **kwargs) -> Timing:
    """`time_interleaved` for a single step function."""
    return time_interleaved({"step": step}, **kwargs)["step"]


# --------------------------------------------------------------------------- records


#: Below this many FLOPs per step a workload reports time, not TFLOP/s.
TINY_FLOPS = 1e9
#: A step time whose interquartile range exceeds this fraction of its median is noise: its
#: ratio is labelled so ("noisy") in tables and records.
NOISY_REL_IQR = 0.10


@dataclass
class Record:
    """One row of results.  `status` is "ok" when it holds a measurement; otherwise
    `reason` says why not ("not implemented", "skipped: time budget", "error: ...",
    "unavailable"), and the measured fields stay None: no row ever carries a made-up number.

    `baseline_ratio` is this row's median step time over the hand-written baseline's median
    step time measured in the same run (1.0 = as fast, 1.01 = 1% slower).
    """

    workload: str
    backend: str
    policy: str
    impl: str = "hand"                 # hand | dualprec | ceiling
    mode: str = "eager"                # eager | compiled | jit
    status: str = STATUS_OK
    reason: str | None = None
    policy_spec: str | None = None     # the canonical dualprec Policy string
    device: str | None = None
    step_time: dict | None = None      # Stats.to_dict(), seconds
    compile_s: float | None = None     # first call (tracing + compilation + first step)
    flops_per_step: float | None = None
    tflops: float | None = None
    peak_memory_bytes: int | None = None
    baseline_ratio: float | None = None
    baseline: str | None = None        # the key of the record it was compared with
    extra: dict = field(default_factory=dict)
    date: str | None = None
    machine: str | None = None
    versions: dict | None = None

    @property
    def key(self) -> str:
        return "/".join((self.workload, self.backend, self.policy, self.mode, self.impl))

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @classmethod
    def measured(cls, *, timing: Timing, flops_per_step: float | None = None, **fields) -> Record:
        """A measured row.  A workload under `TINY_FLOPS` per step reports its time only:
        its TFLOP/s would measure Python overhead, not arithmetic."""
        stats = timing.stats
        rate = None if flops_per_step is not None and flops_per_step < TINY_FLOPS else tflops(
            flops_per_step, stats.median)
        return cls(step_time=stats.to_dict(), compile_s=timing.first_call_s, flops_per_step=flops_per_step,
                   tflops=rate, **fields)

    @property
    def noisy(self) -> bool:
        """The step time's spread (IQR) is over `NOISY_REL_IQR` of its median."""
        st = self.step_time or {}
        return bool(st.get("median")) and st.get("iqr") is not None and st["iqr"] / st["median"] > NOISY_REL_IQR

    @classmethod
    def not_run(cls, status: str, reason: str | None = None, **fields) -> Record:
        if status == STATUS_OK:
            raise ValueError("a record that was not run cannot have status ok")
        return cls(status=status, reason=reason, **fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> Record:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown record fields: {sorted(unknown)}")
        return cls(**d)


def add_baseline_ratios(records: list[Record]) -> list[Record]:
    """Fill `baseline_ratio` of every measured record that has a hand-written twin (same
    workload, backend, policy and mode) measured in the same run."""
    hand = {(r.workload, r.backend, r.policy, r.mode): r for r in records if r.impl == "hand" and r.ok}
    for r in records:
        base = hand.get((r.workload, r.backend, r.policy, r.mode))
        if not r.ok or base is None or r.impl == "ceiling" or not r.step_time or not base.step_time:
            continue
        r.baseline_ratio = r.step_time["median"] / base.step_time["median"]
        r.baseline = base.key
        if r.noisy or base.noisy:
            r.extra["ratio_noisy"] = True  # either side's spread exceeds NOISY_REL_IQR
    return records


# --------------------------------------------------------------------------- environment


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version(name)
        except PackageNotFoundError:
            pass
        mod = importlib.import_module(name)
        return getattr(mod, "__version__", None)
    except Exception:  # a broken optional package must not stop a benchmark
        return None


def machine_name() -> str:
    """A short file-name-safe name for this machine ("h200", "cpu2-<host>")."""
    explicit = os.environ.get("BENCH_MACHINE")
    if explicit:
        return _safe(explicit)
    gpu = _gpu_name()
    if gpu:
        m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", gpu)
        return _safe(m.group(1).lower() if m else gpu)
    return _safe(f"cpu{os.cpu_count()}-{socket.gethostname()}")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:48] or "machine"


def _gpu_name() -> str | None:
    import sys
    torch = sys.modules.get("torch")  # only ask a framework that is already loaded
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        except Exception:
            pass
    return os.environ.get("BENCH_GPU_NAME")


def cpu_environment(threads: int | None = None) -> dict:
    """`environment` plus what moves CPU timings: the load average, torch's thread count
    (set to ``threads`` first when given) and its CPU kernel capability, the kernel-choice
    environment variables."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    env = environment()
    env.update(load_average=os.getloadavg(), torch_threads=torch.get_num_threads(),
               torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
               XLA_FLAGS=os.environ.get("XLA_FLAGS"), ATEN_CPU_CAPABILITY=os.environ.get("ATEN_CPU_CAPABILITY"))
    return env


def environment() -> dict:
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "date": now.strftime("%Y-%m-%d"),
        "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_name(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "gpu": _gpu_name(),
        "versions": {name: _version(name) for name in VERSIONED},
    }


def default_results_dir() -> Path:
    """Where `bench run` writes without ``--out-dir``: ``bench/results`` when run from the
    dualprec checkout's root (the results the README's figures come from), else
    ``./bench-results`` in the current directory (never into the installed checkout)."""
    here = Path.cwd() / "bench" / "results"
    if here.is_dir() and here.resolve() == DEFAULT_RESULTS_DIR:
        return DEFAULT_RESULTS_DIR
    return Path.cwd() / "bench-results"


def results_path(name: str, env: Mapping | None = None, directory: str | os.PathLike | None = None) -> Path:
    env = env or environment()
    directory = Path(directory) if directory is not None else default_results_dir()
    return directory / f"{env['date']}-{env['machine']}-{_safe(name)}.json"


class ResultsFile:
    """A JSON results file rewritten in full (atomically) after every added record, so a run
    cut short by a timeout still leaves every finished row on disk."""

    def __init__(self, path: str | os.PathLike, *, name: str, env: Mapping | None = None, meta: Mapping | None = None):
        self.path = Path(path)
        self.env = dict(env or environment())
        self.name = name
        self.meta = dict(meta or {})
        self.records: list[Record] = []

    def add(self, record: Record) -> Record:
        record.date = record.date or self.env.get("date")
        record.machine = record.machine or self.env.get("machine")
        record.versions = record.versions or self.env.get("versions")
        self.records.append(record)
        add_baseline_ratios(self.records)
        self.flush()
        return record

    def to_dict(self) -> dict:
        return {"schema": SCHEMA_VERSION, "name": self.name, "environment": self.env, "meta": self.meta,
                "records": [r.to_dict() for r in self.records]}

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @staticmethod
    def load(path: str | os.PathLike) -> dict:
        with open(path) as f:
            data = json.load(f)
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA_VERSION}")
        data["records"] = [Record.from_dict(r) for r in data["records"]]
        return data


def _json_default(obj):
    # numpy / framework scalars reach records through measured figures
    for attr in ("item", "tolist"):
        if hasattr(obj, attr):
            return getattr(obj, attr)()
    return str(obj)


# --------------------------------------------------------------------------- table


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _tflops_cell(r: Record) -> str:
    if r.tflops is None and r.flops_per_step is not None and r.flops_per_step < TINY_FLOPS:
        return "tiny"  # time only: see TINY_FLOPS
    return _fmt(r.tflops, ".3g")


def _ratio_cell(r: Record) -> str:
    text = _fmt(r.baseline_ratio, ".3f")
    return f"{text} noisy" if r.baseline_ratio is not None and r.extra.get("ratio_noisy") else text


#: rich_table's columns: header, justification, and what the header abbreviates
TABLE_COLUMNS = (("run", "left", "backend, implementation, mode"),
                 ("policy", "left", None),
                 ("ms", "right", "median step time in milliseconds"),
                 ("IQR%", "right", "interquartile range of the step time, % of the median"),
                 ("comp s", "right", "first call (tracing, compilation, one step) in seconds"),
                 ("TFLOP/s", "right", None),
                 ("MiB", "right", "peak memory"),
                 ("vs hand", "left", "step time over the hand-written baseline's; or why a row has no numbers"))


def rich_table(records: Iterable[Record], title: str | None = None):
    """The results as a rich Table that reads at 80 columns: backend, implementation and mode
    share one cell, the workload goes to the title when every row has the same, columns with
    no number in any row are left out, a row without a measurement says why in its last cell,
    and a caption spells out the short headers.  Cells wrap at spaces; nothing is cut."""
    from rich import box
    from rich.table import Table

    records = list(records)
    workloads = sorted({r.workload for r in records})
    one = len(workloads) == 1
    if one and workloads[0] not in (title or ""):
        title = f"{workloads[0]}: {title}" if title else workloads[0]
    rows = []
    for r in records:
        st = r.step_time or {}
        median = st.get("median")
        iqr = (100 * st["iqr"] / median) if median and st.get("iqr") is not None else None
        peak = r.peak_memory_bytes / 2**20 if r.peak_memory_bytes else None
        rows.append([f"{r.backend} {r.impl} {r.mode}", r.policy, _fmt(median and median * 1e3, ".3g"),
                     _fmt(iqr, ".1f"), _fmt(r.compile_s, ".2f"), _tflops_cell(r), _fmt(peak, ".0f"),
                     _ratio_cell(r) if r.ok else r.status])
    keep = [i for i, (_, _, _) in enumerate(TABLE_COLUMNS)
            if i in (0, 1, len(TABLE_COLUMNS) - 1) or any(row[i] != "-" for row in rows)]
    caption = "; ".join(f"{TABLE_COLUMNS[i][0]}: {TABLE_COLUMNS[i][2]}" for i in keep if TABLE_COLUMNS[i][2])
    table = Table(title=title, caption=caption, caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    if not one:
        table.add_column("workload", no_wrap=True)
    for i in keep:
        header, justify, _ = TABLE_COLUMNS[i]
        wraps = i in (0, len(TABLE_COLUMNS) - 1)  # words stay whole: they wrap at spaces
        longest_word = max([len(w) for row in rows for w in row[i].split()] + [len(header)])
        table.add_column(header, justify=justify, no_wrap=not wraps, min_width=longest_word)
    for r, row in zip(records, rows):
        table.add_row(*([] if one else [r.workload]), *(row[i] for i in keep))
    return table


def reasons(records: Iterable[Record]) -> list[str]:
    """The distinct reasons behind rows that hold no measurement (printed under the table)."""
    seen: list[str] = []
    for r in records:
        line = f"{r.status}: {r.reason}"
        if not r.ok and r.reason and line not in seen:
            seen.append(line)
    return seen


# --------------------------------------------------------------------------- budget guard


class BudgetGuard:
    """A wall-clock budget for a run: a row starts only if its estimated time fits in what
    is left.  Optional rows (torch.compile, say) also leave room for the estimates of the
    required rows still to come, so they never crowd out something more important."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.monotonic):
        self.budget_s = float(budget_s)
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def allows(self, estimate_s: float, reserve_s: float = 0.0) -> bool:
        return estimate_s + reserve_s <= self.remaining()


@dataclass
class Row:
    """One planned unit of a run: `run()` returns the records it measured (it may return
    several, e.g. a hand-written and a dualprec record timed together)."""

    name: str
    run: Callable[[], list[Record]]
    estimate_s: float
    optional: bool = False
    placeholders: Callable[[], list[Record]] | None = None  # what to record when skipped


def run_rows(rows: Sequence[Row], guard: BudgetGuard, results: ResultsFile, *,
             on_error: Callable[[Row, BaseException], list[Record]] | None = None,
             log: Callable[[str], Any] = print) -> list[Record]:
    """Run `rows` in order under `guard`; a row that does not fit is recorded as
    "skipped: time budget", a row that raises as an error record; every record is flushed
    to `results` as soon as it exists."""
    out: list[Record] = []
    for i, row in enumerate(rows):
        reserve = sum(r.estimate_s for r in rows[i + 1:] if not r.optional) if row.optional else 0.0
        if not guard.allows(row.estimate_s, reserve):
            log(f"[skip] {row.name}: needs ~{row.estimate_s:.0f}s (+{reserve:.0f}s reserved), "
                f"{guard.remaining():.0f}s left")
            made = row.placeholders() if row.placeholders else [Record(workload=row.name, backend="-", policy="-")]
            recs = []
            for rec in made:
                rec.status, rec.reason = STATUS_SKIPPED_BUDGET, f"needed ~{row.estimate_s:.0f}s, {guard.remaining():.0f}s left"
                rec.step_time = rec.tflops = rec.compile_s = None
                recs.append(rec)
        else:
            t0 = guard.clock()
            log(f"[run ] {row.name} (~{row.estimate_s:.0f}s, {guard.remaining():.0f}s left)")
            try:
                recs = list(row.run())
            except Exception as e:  # one broken row must not lose the rest of the visit
                if on_error is None:
                    recs = [Record(workload=row.name, backend="-", policy="-", status="error",
                                   reason=f"{type(e).__name__}: {e}"[:500])]
                else:
                    recs = on_error(row, e)
            log(f"       took {guard.clock() - t0:.1f}s")
        for rec in recs:
            results.add(rec)
            out.append(rec)
    return out
