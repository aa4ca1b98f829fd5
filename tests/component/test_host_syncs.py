"""HostSyncCounter counts the .item() reads and collectives of each training step in a real fit."""

import json
import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from xception_pl.host_syncs import HostSyncCounter

READS_PER_STEP = 3


class ReadingModule(L.LightningModule):
    """Exactly READS_PER_STEP host reads and one all_reduce per training step, nothing else of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        for _ in range(READS_PER_STEP):
            loss.item()
        dist.all_reduce(loss.detach().clone())
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self.layer(batch[0]).sum().item()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def one_process_group(monkeypatch: pytest.MonkeyPatch):
    """DDP with one gloo process (real collectives); the group and its port are gone after the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    launcher_set = {name: os.environ.get(name) for name in ("LOCAL_RANK", "NODE_RANK")}
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    for name, value in launcher_set.items():  # Lightning's DDP launcher sets them in this process
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_counts_reads_and_collectives_per_step_and_flags_logging_validation_and_checkpoint_steps(
        tmp_path: Path, one_process_group) -> None:
    loader = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=2)
    counter = HostSyncCounter(output=str(tmp_path / "syncs.json"))
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy="ddp", max_steps=6, log_every_n_steps=2,
                        val_check_interval=4, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[counter, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3)],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ReadingModule(), loader, loader)

    records = counter.records
    assert [r["global_step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["batch_idx"] for r in records] == [0, 1, 2, 3, 4, 5]
    # Lightning logs when (steps done before + 1) % log_every_n_steps == 0: after steps 2, 4, 6
    assert [r["logs"] for r in records] == [False, True, False, True, False, True]
    assert [r["validated"] for r in records] == [False, False, False, True, False, False]
    assert [r["checkpointed"] for r in records] == [False, False, True, False, False, True]
    quiet = [r for r in records if not (r["logs"] or r["validated"] or r["checkpointed"])]
    assert len(quiet) == 2
    for r in quiet:
        assert r["reads"] == READS_PER_STEP and r["collectives"] == 1, r
        assert r["collective_calls"] == {"all_reduce": 1} and r["cuda_syncs"] is None
    assert records[3]["reads"] > READS_PER_STEP  # validation's read and the checkpoint's decisions count too
    assert dist.all_reduce.__module__ == "torch.distributed.distributed_c10d"  # restored after training
    assert json.loads((tmp_path / "syncs.json").read_text())["records"] == records


def test_unknown_mode_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="choose dispatch, cuda_debug or both"):
        HostSyncCounter(mode="sometimes")
