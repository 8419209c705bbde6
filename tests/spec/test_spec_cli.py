"""The dualprec command line: explain, presets, and exit code 2 without a traceback on bad input."""

import json
import subprocess
import sys

from dualprec.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "dualprec.cli", *args], capture_output=True, text=True)


def test_explain_json_names_every_op_class(capsys):
    assert main(["explain", "bf16-mixed", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["policy"] == "bf16-mixed" and info["preset"]["source"] == "Lightning Fabric"
    for backend in ("torch", "jax"):
        b = info["backends"][backend]
        assert "bfloat16" in b["matmul-like (linear, matmul, bmm, conv, einsum, attention)"]
        assert b["normalization / softmax / loss"].startswith("float32")
        assert b["params"] == "stored in float32"
        assert b["loss scaling"] == "none"


def test_explain_describes_everything(capsys):
    assert main(["explain", "bf16-true,master=true,quant=nf4-dq(skip=lm_head),fp8=delayed,"
                            "loss_scale=dynamic,@lm_head=(quant=none)", "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    torch_side = b["backends"]["torch"]
    assert "float32 master copies" in torch_side["params"]
    assert "double-quantized" in torch_side["quantization"] and "lm_head" in torch_side["quantization"]
    assert torch_side["quantization"].endswith("; skipped: lm_head")  # how: from the backend's registry
    assert "delayed scaling (amax history 1024" in torch_side["fp8"]
    assert "dynamic: start 65536" in torch_side["loss scaling"]
    assert b["overrides"][0]["pattern"] == "lm_head"


def test_explain_64_bit_says_jax_x64(capsys):
    assert main(["explain", "64", "--json"]) == 0
    assert "jax_enable_x64" in json.loads(capsys.readouterr().out)["backends"]["jax"]["mechanism"]


def test_explain_table_output():
    r = run("explain", "16-mixed")
    assert r.returncode == 0, r.stderr
    assert "16-mixed" in r.stdout and "dynamic" in r.stdout


def test_bad_policy_exits_2_without_traceback():
    r = run("explain", "bf16-mixd")
    assert r.returncode == 2
    assert 'did you mean "bf16-mixed"' in r.stderr
    assert "Traceback" not in r.stderr


def test_presets_json(capsys):
    assert main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows]
    assert "bf16-mixed" in names and "nf4-dq" in names and "mixed_float16" in names
    for r in rows:
        from dualprec import Policy
        assert Policy.parse(r["explicit"]) == Policy.parse(r["name"])


def test_spec_imports_no_backend():
    code = "import sys, dualprec, dualprec.cli; dualprec.Policy.parse('bf16-mixed'); " \
           "print(any(m in sys.modules for m in ('torch', 'jax', 'flax', 'bitsandbytes')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr


def test_lazy_subcommands_get_their_options(monkeypatch):
    """`dualprec conformance --policy X` reaches conformance.cli.main with its options intact."""
    import types

    seen = {}
    fake = types.SimpleNamespace(main=lambda argv: seen.setdefault("argv", argv) and 3)
    monkeypatch.setitem(sys.modules, "conformance.cli", fake)
    assert main(["conformance", "--policy", "bf16-mixed", "--format", "json"]) == 3
    assert seen["argv"] == ["--policy", "bf16-mixed", "--format", "json"]
