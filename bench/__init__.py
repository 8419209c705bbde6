"""dualprec benchmarks: what each precision policy costs and buys, in PyTorch and JAX.

`python -m bench` (or `dualprec bench`) runs the named workloads (`bench.workloads`) under
the policy rows, timed by `bench.harness`, and writes JSON records to `bench/results/`;
`bench.memory` measures bytes per parameter, `bench.plot` turns the JSON into the README
table and figure, and `bench/gpu_run.py` is the one prepared script for a lent H200.
"""
