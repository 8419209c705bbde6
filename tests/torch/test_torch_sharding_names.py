"""Under FSDP2 every rank names the same bad parameter, also the rank whose shards are finite."""


import pytest
import sharding_names_worker as w
import torch
import torch.multiprocessing as mp
from torch_support import free_port


@pytest.mark.multiprocess
@pytest.mark.slow
def test_every_rank_names_the_parameter_whose_shard_overflowed(tmp_path):
    mp.spawn(w.worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["named"] for r in results] == ["2.weight", "2.weight"]
    assert [r["report"] for r in results] == ["2.weight", "2.weight"]
    assert [r["taken"] for r in results] == [False, False]
