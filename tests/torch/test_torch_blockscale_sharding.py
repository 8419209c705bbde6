"""Block-scaled recipes with FSDP2 over 2 gloo ranks (blockscale_sharding_worker.py): every
code and scale equals the unsharded run's share bit for bit; gradients and one training step
agree within float32 sum bounds; a distributed checkpoint resumes bit-identically."""

import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import blockscale_sharding_worker as w  # noqa: E402
from torch_support import free_port


@pytest.fixture(scope="module")
def fsdp_block_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_block")
    mp.spawn(w.worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [(out / f"rank{r}.txt").read_text() for r in range(2)]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("recipe", list(w.RECIPES))
@pytest.mark.parametrize("what", ["codes-and-scales", "fsdp2-step", "fsdp2-resume"])
def test_fsdp2_block_recipe_matches_unsharded(recipe, what, fsdp_block_runs):
    assert "OK control fsdp2-step" in fsdp_block_runs[0], fsdp_block_runs[0][-4000:]
    for text in fsdp_block_runs:
        lines = [" ".join(ln.split()[:3]) for ln in text.splitlines()]
        assert f"OK {recipe} {what}" in lines, text[-4000:]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("recipe", ["mxfp8", "nvfp4"])
def test_fsdp2_block_recipe_under_bf16_mixed(recipe, fsdp_block_runs):
    for text in fsdp_block_runs:
        assert f"OK {recipe} fsdp2-step-bf16-mixed" in text.splitlines(), text[-4000:]
