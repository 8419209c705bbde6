"""Models, data and the hand-written reference loops the backend's tests compare against.

The hand-written loops are what a careful torch user writes without dualprec:
torch.autocast + torch.amp.GradScaler for mixed policies (norms, softmax and the loss upcast
to float32 explicitly, as the op policy prescribes), `.to(dtype)` for "-true" policies, and
explicit float32 master copies for master=true.
"""

from __future__ import annotations

import math
import os
import sys
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from dualprec import Policy
from dualprec_torch import Precision
from dualprec_torch.casts import torch_dtype

# every preset in scope (no quantization / FP8), plus master weights
POLICIES = ["32-true", "64-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed",
            "float64", "bfloat16", "float16", "mixed_bfloat16", "mixed_float16",
            "bf16-true,master=true"]


# These two models are not conformance.zoo's on purpose.  The hand-written loop below
# (run_by_hand) replays the op policy under CPU torch.autocast, so the models take an
# ``explicit_fp32`` switch that upcasts the norm, softmax and loss inputs to float32 as the
# policy prescribes (CPU autocast alone leaves softmax in the half dtype); the zoo's models
# have no such switch and are torch/Flax twins for the cross-framework suite.  They also
# differ in shape: this MLP has a LayerNorm and a residual, and Block keeps a per-token head
# (labels per token).  Replacing them would change what the bit-identity tests against
# run_by_hand compare.
class MLP(nn.Module):
    def __init__(self, d_in=16, hidden=32, classes=8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x, explicit_fp32=False):
        up = (lambda t: t.float()) if explicit_fp32 else (lambda t: t)
        h = F.gelu(self.fc1(x))
        h = self.norm(up(h))
        h = h + F.gelu(self.fc2(h))
        return self.head(h)


class Block(nn.Module):
    """A small pre-norm transformer block: LayerNorm, attention with softmax, GELU MLP, residuals."""

    def __init__(self, d=32, heads=4, mlp=64, classes=8):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x, explicit_fp32=False):
        up = (lambda t: t.float()) if explicit_fp32 else (lambda t: t)
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(up(x))).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(up(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(d // self.heads))), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(o)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(up(x)))))
        return self.head(x)


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP() if kind == "mlp" else Block()


def make_batches(kind: str, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (16, 16) if kind == "mlp" else (4, 6, 32)
    out = []
    for _ in range(steps):
        x = torch.randn(*shape, generator=g) * 2.0
        y = torch.randint(0, 8, shape[:-1], generator=g)
        out.append((x, y))
    return out


def loss_fn(logits, y, explicit_fp32=False):
    logits = logits.float() if explicit_fp32 else logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_optimizer(params):
    # eps representable in float16, so 16-true does not divide 0 by 0
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, eps=1e-4)


def setup_mlp(policy):
    """A Precision with the MLP and its AdamW set up: (precision, model, optimizer)."""
    precision = Precision(policy)
    model = make_model("mlp")
    model, optimizer = precision.setup(model, make_optimizer(model.parameters()))
    return precision, model, optimizer


def inject(model_or_params, step: int, bad_steps: dict[int, float]):
    """Write inf or NaN into one gradient at the steps listed (same place in both runs)."""
    if step in bad_steps:
        params = list(model_or_params.parameters()) if isinstance(model_or_params, nn.Module) else model_or_params
        with torch.no_grad():
            params[0].grad.view(-1)[0] = bad_steps[step]


# ----- the two loops --------------------------------------------------------------------
def run_precision(policy, kind, steps, *, bad_steps=None, model=None, precision=None, optimizer=None,
                  batches=None, log=None):
    """N steps through dualprec_torch.Precision; returns (model, optimizer, precision)."""
    bad_steps = bad_steps or {}
    if precision is None:
        precision = Precision(policy)
        model = model if model is not None else make_model(kind)
        optimizer = make_optimizer(model.parameters())
        model, optimizer = precision.setup(model, optimizer)
    for i, (x, y) in enumerate(batches if batches is not None else make_batches(kind, steps)):
        optimizer.zero_grad()
        with precision.autocast():
            out = precision.convert_output(model(precision.convert_input(x)))
            loss = loss_fn(out, y)
        precision.backward(loss)
        inject(model, i, bad_steps)
        took = precision.step(optimizer)
        precision.update()
        if log is not None:
            log.append((took, precision.scale, float(loss.detach())))
    return model, optimizer, precision


def run_by_hand(policy, kind, steps, *, bad_steps=None, log=None):
    """The same N steps written with torch.autocast / GradScaler / explicit casts."""
    p = Policy.parse(policy)
    bad_steps = bad_steps or {}
    param, compute, output = torch_dtype(p.param_dtype), torch_dtype(p.compute_dtype), torch_dtype(p.output_dtype)
    model = make_model(kind).to(param)
    masters = None
    if p.master_weights:
        masters = [q.detach().float().requires_grad_() for q in model.parameters()]
        optimizer = make_optimizer(masters)
    else:
        optimizer = make_optimizer(model.parameters())
    ls = p.loss_scale
    scaler = None
    if ls.enabled:
        scaler = torch.amp.GradScaler("cpu", init_scale=ls.init_scale, growth_factor=ls.growth_factor,
                                      backoff_factor=ls.backoff_factor, growth_interval=ls.growth_interval)
    for i, (x, y) in enumerate(make_batches(kind, steps)):
        optimizer.zero_grad()
        if p.is_mixed:
            with torch.autocast("cpu", dtype=compute):
                out = model(x.to(compute), explicit_fp32=True).to(output)
                loss = loss_fn(out, y, explicit_fp32=True)
        else:
            previous = torch.get_default_dtype()
            torch.set_default_dtype(compute)
            try:
                out = model(x.to(compute)).to(output)
                loss = loss_fn(out, y)
            finally:
                torch.set_default_dtype(previous)
        (scaler.scale(loss) if scaler else loss).backward()
        inject(model, i, bad_steps)
        if masters is not None:
            for q, m in zip(model.parameters(), masters):
                m.grad = q.grad.float()
                q.grad = None
        if scaler:
            before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            took = not scaler.get_scale() < before  # GradScaler backs off exactly when it skipped
        else:
            optimizer.step()
            took = True
        if masters is not None:
            with torch.no_grad():
                for q, m in zip(model.parameters(), masters):
                    q.copy_(m)
        if log is not None:
            log.append((took, scaler.get_scale() if scaler else 1.0, float(loss.detach())))
    return model, optimizer, scaler


# ----- comparison -----------------------------------------------------------------------
def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str):
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
    if not bool(same.all()):
        diff = (a.double() - b.double()).abs()
        raise AssertionError(f"{what}: {int((~same).sum())} of {a.numel()} elements differ, max |diff| "
                             f"{float(diff[~same].max()):.3g}")


def assert_same_state(model_a, opt_a, model_b, opt_b):
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert_same_bits(pa, pb, f"param {name}")
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys(), "optimizer state covers different parameters"
    for k in sa:
        for field in sa[k]:
            va, vb = sa[k][field], sb[k][field]
            if isinstance(va, torch.Tensor):
                assert_same_bits(va, vb, f"optimizer state[{k}][{field}]")
            else:
                assert va == vb, f"optimizer state[{k}][{field}]: {va} != {vb}"



def free_port() -> int:
    """A TCP port free on this host now (the rendezvous port of a spawned gloo group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_spawned_worker() -> NoReturn:
    """End a spawned gloo worker whose results are written, without Python's teardown.

    DTensor's sharding-propagation caches keep the DeviceMesh, and with it the gloo process
    group and its threads, alive after ``destroy_process_group``; at interpreter exit the
    destructors of those still-running C++ threads can call std::terminate, and the rank dies
    with SIGABRT after its work is done (seen in about 1 of 10 runs of the FSDP2 block-scale
    worker, and once in CI).  Call this only after the result files are closed: an exception
    before it still ends the rank with the error torch.multiprocessing reports.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
