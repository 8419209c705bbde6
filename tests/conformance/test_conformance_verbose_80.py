"""`dualprec conformance --verbose` at 80 columns: every record's names whole, its numbers
and its reason all there (the 9-column table collapsed the numbers and reasons to nothing)."""

from rich.console import Console

from conformance.records import Record
from conformance.report import rich_table

REASON = ("first divergence at blocks.0.attn.proj: 72.3% of elements not bitwise equal > bound 2.0% "
          "(max 5 ULP of bfloat16)")


def test_verbose_table_reads_at_80_columns():
    recs = [Record("transformer-engine-float16", "transformer", "optimizer-dtypes", "tolerance", "fail",
                   reason=REASON, max_rel_err=0.0123, max_ulp_err=5, tolerance=2.0, step=2),
            Record("bf16-mixed", "mlp", "forward", "tolerance", "pass", max_rel_err=1e-3, max_ulp_err=1,
                   tolerance=2.0, where="fc1"),
            Record("nf4", "mlp", "fp8-scales", "bit-exact", "skip", reason="known divergence: " + "word " * 30)]
    console = Console(width=80, record=True, force_terminal=False)
    console.print(rich_table(recs))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    lines = text.splitlines()
    for name in ("transformer-engine-float16", "optimizer-dtypes", "bf16-mixed", "fp8-scales", "bit-exact"):
        assert any(name in line.split() or f"{name}:" in line.split() or f"{name};" in line.split()
                   for line in lines), name  # whole, on one line
    start = next(line.index("tier, numbers") for line in lines if "tier, numbers" in line)
    joined = " ".join(" ".join(line[start:].split()) for line in lines)  # the third column, rejoined
    assert "rel 0.012, 5 ULP, tol 2: [step 2] " + REASON in joined
    assert "rel 0.001, 1 ULP, tol 2: fc1" in joined
