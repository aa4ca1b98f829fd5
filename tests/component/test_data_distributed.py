"""Two real gloo processes x two workers each (spawned for training): equal training batches, each
validation sample exactly once; and with fewer shards than ranks x workers (3 shards, 2 ranks x 4
workers; 1 shard, 2 ranks), still each sample exactly once."""

import json
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import free_port
from tests.data_helpers import shards
from xception_pl.data import WebDatasetDataModule

SAMPLES = 23  # odd on purpose: 8 shards of 3, the last one short
BATCH = 3
FEW = {"three": 7, "one": 2}  # samples of evaluation sets written in shards of 3: 3 shards and 1 shard


def read_few_shards(data: str) -> dict:
    """An evaluation set with fewer shards than 2 ranks x 4 workers: its keys on this rank, and the workers."""
    dm = WebDatasetDataModule(val=data, batch_size=2, num_workers=4, image_size=16, eval_resize=16,
                              multiprocessing_context="fork")
    dm.setup("validate")
    loader = dm.val_dataloader()
    return {"keys": [k for b in loader for k in b["key"]], "workers": loader.pipeline[0].num_workers}  # the DataLoader


def run_rank(rank: int, port: int, data: str, out: str) -> None:
    for name in ("RANK", "WORLD_SIZE"):  # as under srun: nothing tells webdataset the rank
        os.environ.pop(name, None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dm = WebDatasetDataModule(train=data, val=data, batch_size=BATCH, num_workers=2, image_size=16,
                                  eval_resize=16, multiprocessing_context="spawn")
        dm.setup("fit")  # no trainer: the rank comes from torch.distributed
        loader = dm.train_dataloader()
        train = [[b["key"] for b in loader] for _epoch in range(2)]
        dm.multiprocessing_context = "fork"  # to save time: shard slots do not depend on the start method
        val = [k for b in dm.val_dataloader() for k in b["key"]]
        gathered = [None, None]
        dist.all_gather_object(gathered, val)
        few = {name: read_few_shards(f"{out}/{name}") for name in FEW}
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"len": len(loader), "train": train, "val": val, "gathered": gathered, "few": few,
                       "env": [os.environ.get("RANK"), os.environ.get("WORLD_SIZE")]}, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = shards(tmp, classes=1, per_class=SAMPLES, shard_size=3)
    for name, samples in FEW.items():
        shards(tmp, name, classes=1, per_class=samples, shard_size=3)
    # fork: the two ranks start without re-importing torch; their DataLoader workers are spawned
    mp.start_processes(run_rank, args=(free_port(), str(data), str(tmp)), nprocs=2, start_method="fork")
    keys = [f"c0/img0_{i}" for i in range(SAMPLES)]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)], keys


def test_every_rank_draws_the_same_number_of_training_batches(ranks):
    results, _ = ranks
    per_rank = SAMPLES // (BATCH * 2)
    for rank, result in enumerate(results):
        assert result["env"] == [None, None]  # the process environment is not ours to change
        assert result["len"] == per_rank
        assert [len(epoch) for epoch in result["train"]] == [per_rank, per_rank]
        assert all(len(batch) == BATCH for epoch in result["train"] for batch in epoch)
    assert results[0]["train"] != results[1]["train"]  # ranks draw different data
    assert results[0]["train"][0] != results[0]["train"][1]  # and each epoch anew
    first_batches = results[0]["train"][0][:2]  # one from each worker
    assert first_batches[0] != first_batches[1]


def test_validation_reads_each_sample_exactly_once_across_ranks_and_workers(ranks):
    results, keys = ranks
    union = results[0]["val"] + results[1]["val"]
    assert sorted(union) == sorted(keys) and len(union) == SAMPLES  # no duplicates, no padding, no loss
    assert results[0]["gathered"] == [results[0]["val"], results[1]["val"]]
    assert results[0]["val"] and results[1]["val"]


def test_fewer_shards_than_ranks_times_workers_still_reads_each_sample_once(ranks):
    results, _ = ranks
    for name, samples in FEW.items():
        per_rank = [result["few"][name] for result in results]
        union = per_rank[0]["keys"] + per_rank[1]["keys"]
        assert sorted(union) == [f"c0/img0_{i}" for i in range(samples)], name  # each once, none lost
    three, one = ([result["few"][name] for result in results] for name in FEW)
    assert [r["workers"] for r in three] == [2, 1]  # rank 0: shards 0 and 2; rank 1: shard 1
    assert [len(r["keys"]) for r in three] == [3 + 1, 3]
    assert one[1] == {"keys": [], "workers": 0}  # no shard on rank 1: an empty loader, no error
    assert len(one[0]["keys"]) == 2
