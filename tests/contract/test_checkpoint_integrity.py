"""Integrity of the files dualprec writes: every single-bit flip of a precision checkpoint or a
bitsandbytes-layout file is refused with CheckpointError; forged values (a re-computed
checksum around a NaN scale) are refused naming the field; temporary files never outlive a
save; modes follow the umask; version-2 files load with a warning."""

import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from dualprec import checkpoint
from dualprec.errors import CheckpointError, PolicyError


def _small_state():
    import ml_dtypes

    return checkpoint.new_state(
        "16-mixed,loss_scale=dynamic(interval=4,min=1,max=2**20)", 512.0, 3, {},
        {"fp8": {"fp8.fc.w": np.array([0.5, -1.0], np.float32),
                 "fp8.fc.b": np.array([-0.018], ml_dtypes.bfloat16)}})


def _refused_flips(path, data: bytes, load) -> tuple[int, list]:
    """Flip each bit of ``data`` in turn, write it to ``path``, and try ``load``; the bit
    positions whose damaged file loaded, or raised something other than CheckpointError."""
    bad = []
    tried = 0
    buf = bytearray(data)
    for i in range(len(buf)):
        for bit in range(8):
            buf[i] ^= 1 << bit
            path.write_bytes(buf)
            tried += 1
            try:
                load(path)
                bad.append((i, bit, "loaded"))
            except CheckpointError:
                pass
            except Exception as e:  # noqa: BLE001 - any other type is a failure of the contract
                bad.append((i, bit, type(e).__name__))
            buf[i] ^= 1 << bit
    return tried, bad


def test_every_bit_flip_of_a_precision_checkpoint_is_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    checkpoint.save_state(good, _small_state())
    data = good.read_bytes()
    assert checkpoint.load_state(good)["loss_scale"] == {"scale": 512.0, "counter": 3}
    t0 = time.perf_counter()
    tried, bad = _refused_flips(tmp_path / "flipped.safetensors", data, checkpoint.load_state)
    assert tried == 8 * len(data) and len(data) > 500
    assert bad == [], f"{len(bad)} of {tried} flips not refused with CheckpointError: {bad[:10]}"
    assert time.perf_counter() - t0 < 30


def _jax_bnb_file(tmp_path):
    jax = pytest.importorskip("jax")
    from dualprec_jax import quant
    kernel = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    params = {"fc": {"kernel": jax.numpy.asarray(kernel), "bias": jax.numpy.zeros(8)}}
    q = quant.quantize_params(params, "quant=nf4-dq")
    path = tmp_path / "jax_bnb.safetensors"
    quant.save_bnb(path, q, "quant=nf4-dq")
    return quant, params, q, path


def test_every_bit_flip_of_a_jax_bnb_file_is_refused(tmp_path):
    quant, params, q, path = _jax_bnb_file(tmp_path)
    back = quant.load_bnb(path, params, "quant=nf4-dq")
    import jax

    jax.tree.map(np.testing.assert_array_equal, back, q)
    tried, bad = _refused_flips(tmp_path / "flipped.safetensors", path.read_bytes(),
                                lambda p: quant.load_bnb(p, params, "quant=nf4-dq"))
    assert bad == [], f"{len(bad)} of {tried} flips not refused: {bad[:10]}"


def test_every_bit_flip_of_a_torch_bnb_file_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    from dualprec_torch import quant as tq
    torch.manual_seed(0)
    model = tq.quantize_module(torch.nn.Sequential(torch.nn.Linear(64, 8)), "quant=nf4", device="cpu")
    path = tmp_path / "torch_bnb.safetensors"
    tq.save_bnb(path, model)
    fresh = tq.quantize_module(torch.nn.Sequential(torch.nn.Linear(64, 8)), "quant=nf4", device="cpu")
    tq.load_bnb(path, fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    target = tq.quantize_module(torch.nn.Sequential(torch.nn.Linear(64, 8)), "quant=nf4", device="cpu")
    data = path.read_bytes()
    # every bit of the header, and every 7th bit of the data (the data are hashed alike)
    head = 8 + int.from_bytes(data[:8], "little")
    flips = [(i, b) for i in range(head) for b in range(8)] + [(i, i % 8) for i in range(head, len(data))]
    bad = []
    flipped = tmp_path / "flipped.safetensors"
    for i, bit in flips:
        buf = bytearray(data)
        buf[i] ^= 1 << bit
        flipped.write_bytes(buf)
        try:
            tq.load_bnb(flipped, target)
            bad.append((i, bit, "loaded"))
        except CheckpointError:
            pass
        except Exception as e:  # noqa: BLE001
            bad.append((i, bit, type(e).__name__))
    assert bad == [], f"{len(bad)} of {len(flips)} flips not refused: {bad[:10]}"


def test_a_bnb_file_torch_wrote_still_loads_and_garbage_is_a_checkpoint_error(tmp_path):
    quant, params, q, path = _jax_bnb_file(tmp_path)
    from safetensors.numpy import load_file, save_file

    plain = tmp_path / "plain.safetensors"
    save_file(load_file(str(path)), str(plain))  # as torch / bitsandbytes write it: no checksum
    import jax

    jax.tree.map(np.testing.assert_array_equal, quant.load_bnb(plain, params, "quant=nf4-dq"), q)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="not a readable"):
        quant.load_bnb(junk, params, "quant=nf4-dq")
    assert issubclass(CheckpointError, PolicyError)


# ----------------------------------------------------------------------------- values
def _forge(path, scale, counter, policy="16-mixed"):
    header = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "policy": policy,
              "masters": [], "extensions": {}, "bfloat16": []}
    checkpoint.save(path, header, {"loss_scale.scale": np.asarray(scale, np.float32),
                                   "loss_scale.counter": np.asarray(counter, np.int32)})


@pytest.mark.parametrize("scale,counter,field", [
    (float("nan"), 0, "loss_scale.scale"), (float("inf"), 0, "loss_scale.scale"), (0.0, 0, "loss_scale.scale"),
    (-2.0, 0, "loss_scale.scale"), (1e-45, 0, None), (65536.0, -1, "loss_scale.counter"),
    (65536.0, 2000, "loss_scale.counter"),
])
def test_forged_values_with_a_valid_checksum_are_refused(tmp_path, scale, counter, field):
    path = tmp_path / "forged.safetensors"
    _forge(path, scale, counter)
    if field is None:  # 1e-45 is a valid float32 (subnormal) > 0
        assert checkpoint.load_state(path)["loss_scale"]["scale"] == float(np.float32(1e-45))
        return
    with pytest.raises(CheckpointError, match=field.replace(".", r"\.") + ".*valid range"):
        checkpoint.load_state(path)


def test_the_scale_must_lie_inside_the_policys_clamps(tmp_path):
    path = tmp_path / "forged.safetensors"
    _forge(path, 2.0**21, 0, "16-mixed,loss_scale=dynamic(min=1,max=2**20)")
    with pytest.raises(CheckpointError, match=r"loss_scale\.scale 2097152.0 .*\[1.0, 1048576.0\]"):
        checkpoint.load_state(path)
    _forge(path, 0.5, 0, "16-mixed,loss_scale=dynamic(min=1,max=2**20)")
    with pytest.raises(CheckpointError, match=r"loss_scale\.scale"):
        checkpoint.load_state(path)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_both_backends_refuse_bad_values_in_a_state_dict(backend):
    state = checkpoint.new_state("16-mixed", 65536.0, 0)
    state["loss_scale"]["scale"] = float("nan")
    if backend == "torch":
        torch = pytest.importorskip("torch")
        from dualprec_torch import Precision

        model = torch.nn.Linear(2, 2)
        prec = Precision("16-mixed")
        prec.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
        with pytest.raises(CheckpointError, match=r"loss_scale\.scale nan"):
            prec.load_state_dict(state)
        state["loss_scale"].update(scale=1024.0, counter=-3)
        with pytest.raises(CheckpointError, match=r"loss_scale\.counter -3"):
            prec.load_state_dict(state)
    else:
        jax = pytest.importorskip("jax")
        import optax

        from dualprec_jax import Precision

        prec = Precision("16-mixed")
        tx = prec.wrap_optimizer(optax.sgd(0.1))
        opt_state = tx.init({"w": jax.numpy.zeros(2)})
        with pytest.raises(CheckpointError, match=r"loss_scale\.scale nan"):
            prec.load_state_dict(state, opt_state)
        state["loss_scale"].update(scale=1024.0, counter=-3)
        with pytest.raises(CheckpointError, match=r"loss_scale\.counter -3"):
            prec.load_state_dict(state, opt_state)


# ------------------------------------------------------------------------ the file system
def test_file_mode_follows_the_umask(tmp_path):
    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(mask)
        try:
            path = tmp_path / f"m{mask:o}.safetensors"
            checkpoint.save_state(path, _small_state())
        finally:
            os.umask(old)
        assert os.stat(path).st_mode & 0o777 == mode


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporary_files_of_killed_saves_are_swept_at_the_next_save(tmp_path):
    path = tmp_path / "p.safetensors"
    host = checkpoint._host_tag()
    dead = tmp_path / f".p.safetensors.{host}-{_dead_pid()}.abc12345.tmp"
    alive = tmp_path / f".p.safetensors.{host}-{os.getppid()}.abc12345.tmp"  # a running writer's: kept
    other_host = tmp_path / f".p.safetensors.00000000-{_dead_pid()}.abc12345.tmp"  # another host's: kept
    old_style = tmp_path / ".p.safetensors.k2j4h1_q.tmp"  # named as version 2 named them
    for f in (dead, alive, other_host, old_style):
        f.write_bytes(b"x" * 100)
    os.utime(old_style, (time.time() - 7200, time.time() - 7200))
    if host == "00000000":
        other_host.unlink()
    checkpoint.save_state(path, _small_state())
    left = sorted(os.listdir(tmp_path))
    assert dead.name not in left and old_style.name not in left
    assert alive.name in left and path.name in left


@pytest.mark.parametrize("where", ["write", "rename"])
def test_every_failure_removes_the_temporary_file(tmp_path, monkeypatch, where):
    path = tmp_path / "p.safetensors"
    checkpoint.save_state(path, _small_state())
    before = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt  # a BaseException, as from Ctrl-C

    if where == "write":
        import safetensors.numpy

        monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    else:
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_state(path, _small_state())
    assert os.listdir(tmp_path) == ["p.safetensors"] and path.read_bytes() == before


# ------------------------------------------------------------------------- version 2
def _write_v2(path, state):
    from safetensors.numpy import save_file

    header, tensors = checkpoint.state_to_file(state)
    header = dict(header, version=2, sha256=checkpoint._digest(tensors))
    save_file(tensors, str(path), metadata={"dualprec": json.dumps(header, sort_keys=True)})


def test_version_2_files_load_with_a_warning_and_resave_as_version_3(tmp_path):
    path = tmp_path / "v2.safetensors"
    _write_v2(path, _small_state())
    with pytest.warns(UserWarning, match="version-2 .*re-save"):
        state = checkpoint.load_state(path)
    assert state["loss_scale"] == {"scale": 512.0, "counter": 3}
    checkpoint.save_state(path, state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint.load(path)[0]["version"] == checkpoint.VERSION == 3
    _write_v2(path, _small_state())
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="altered"):
        checkpoint.load_state(path)
