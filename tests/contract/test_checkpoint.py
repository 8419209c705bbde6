"""The precision checkpoint file: pickle-free, atomic, and refused when damaged."""

import json
import os

import numpy as np
import pytest

from dualprec import checkpoint
from dualprec.errors import CheckpointError, PolicyError


def _state():
    masters = {"fc1.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc1.bias": np.ones(2, np.float32)}
    return checkpoint.new_state("bf16-true,master=true", 1.0, 0, masters,
                                {"fp8": {"fp8.fc1.input.scale": np.float32(2.0) * np.ones((), np.float32)}})


def test_round_trip_keeps_every_tensor_and_the_header(tmp_path):
    path = tmp_path / "p.safetensors"
    checkpoint.save_state(path, _state())
    back = checkpoint.load_state(path)
    assert back["policy"] == "params=bfloat16,compute=bfloat16,output=float32,master=true"
    assert back["loss_scale"] == {"scale": 1.0, "counter": 0}
    assert set(back["master_weights"]) == {"fc1.weight", "fc1.bias"}
    np.testing.assert_array_equal(back["master_weights"]["fc1.weight"], _state()["master_weights"]["fc1.weight"])
    assert back["extensions"]["fp8"]["fp8.fc1.input.scale"].shape == ()
    header, tensors = checkpoint.load(path)
    assert (header["format"], header["version"]) == (checkpoint.FORMAT, checkpoint.VERSION)
    assert tensors["loss_scale.scale"].dtype == np.float32 and tensors["loss_scale.counter"].dtype == np.int32
    assert open(path, "rb").read(8) and b"pickle" not in open(path, "rb").read()


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    checkpoint.save_state(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load_state(path)


def test_tampered_tensor_bytes_are_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    checkpoint.save_state(path, _state())
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # the last byte of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="altered"):
        checkpoint.load_state(path)


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "p.safetensors"
    checkpoint.save_state(path, _state())
    before = path.read_bytes()
    bad = _state()
    bad["master_weights"]["obj"] = np.array(["text"])  # not storable: the write fails
    with pytest.raises(CheckpointError):
        checkpoint.save_state(path, bad)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.safetensors"]  # no temporary file left behind


def test_newer_versions_and_foreign_dicts_are_refused():
    from dualprec import Policy

    state = dict(_state(), version=99)
    with pytest.raises(CheckpointError, match="version 99"):
        checkpoint.check_state(state, Policy.parse("bf16-true,master=true"), strict=True)
    with pytest.raises(PolicyError, match="GradScaler"):
        checkpoint.check_state({"scale": 1.0, "_growth_tracker": 0}, None, strict=False)
    assert json.dumps(checkpoint.state_to_file(_state())[0])  # the header is plain JSON


def test_torch_masters_are_keyed_by_name_and_resume(tmp_path):
    torch = pytest.importorskip("torch")
    from dualprec_torch import Precision

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        prec = Precision("bf16-true,master=true")
        return (prec, *prec.setup(model, opt))

    prec, model, opt = build()
    prec.backward(model(torch.randn(5, 3, dtype=torch.bfloat16)).float().sum())
    prec.step(opt)
    checkpoint.save_state(tmp_path / "p.safetensors", prec.state_dict())
    prec2, model2, opt2 = build()
    state = checkpoint.load_state(tmp_path / "p.safetensors")
    assert set(state["master_weights"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    prec2.load_state_dict(state)
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), n
    state["master_weights"].pop("1.bias")
    with pytest.raises(CheckpointError, match="1.bias"):
        prec2.load_state_dict(state)
