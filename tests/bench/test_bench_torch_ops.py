"""bench/bench_torch_ops.py: its "hand cuda table" baseline is Precision's arithmetic (the claim
its ratios rest on), and a quick run reports every variant and ratio."""

import torch

from bench import bench_torch_ops as b
from dualprec_torch import Precision, ops


def test_hand_cuda_table_baseline_is_precisions_arithmetic_bit_for_bit():
    """Three AdamW steps of the elementwise MLP: the loop with x.float() written before each
    float32-list op (no kernels registered) and Precision give the same parameters, bits included."""
    ops.uninstall_cpu_table()
    try:
        hand, opt, x = b.build("mlp", b.upcast)
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = hand(x).float().pow(2).mean()
            loss.backward()
            opt.step()
    finally:
        ops.install_cpu_table()
    net, opt, x = b.build("mlp")
    prec = Precision("bf16-mixed", device="cpu")
    net, opt = prec.setup(net, opt)
    for _ in range(3):
        opt.zero_grad()
        with prec.autocast():
            loss = net(x).float().pow(2).mean()
        prec.backward(loss)
        prec.step(opt)
    for (name, a), c in zip(hand.named_parameters(), net.parameters()):
        assert torch.equal(a, c), name


def test_quick_run_reports_every_variant():
    threads = torch.get_num_threads()
    try:
        result = b.main(["--quick", "--parts", "calls,mlp", "--policies", "bf16-mixed"])  # sets 1 thread
    finally:
        torch.set_num_threads(threads)
    row = result["results"]["bf16-mixed"]
    assert set(row["calls"]) == set(b.CALLS)
    for variants in [*row["calls"].values(), row["mlp"]]:
        assert variants["precision c++"]["vs_cpu_autocast"]["median"] > 0
        assert variants["precision python"]["vs_hand_cuda_table"]["min"] > 0
    assert "hand + c++ kernels" in row["mlp"] and "cpu autocast + kernels" in row["calls"]["exp"]
    assert ops.kernel_language() == "c++"
