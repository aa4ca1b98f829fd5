"""Random but learnable images made in memory: for unit tests and model-only benchmarks.

Not a dataset of the paper: the class shifts the mean of each colour channel by a
class-specific offset, so a network can learn it; the rest is Gaussian noise.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from xception_pl.data.workers import StopSignalsInWorker
from xception_pl.facts import DataFacts


class SyntheticImages(Dataset):
    def __init__(self, size: int, num_classes: int, multilabel: bool, image_size: int, seed: int) -> None:
        self.size, self.num_classes, self.multilabel, self.image_size, self.seed = (
            size, num_classes, multilabel, image_size, seed)
        self.offsets = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(seed)) - 0.5

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        labels = [index % self.num_classes]
        if self.multilabel:
            labels.append((index * 7 + 3) % self.num_classes)
        image = 0.3 * torch.randn(3, self.image_size, self.image_size, generator=generator)
        image = (image + self.offsets[labels].mean(0)).clamp(-1, 1)
        if self.multilabel:
            target = torch.zeros(self.num_classes).index_fill_(0, torch.tensor(labels), 1.0)
        else:
            target = torch.tensor(labels[0])
        return {"image": image, "target": target, "key": f"{index:08d}"}


class SyntheticDataModule(L.LightningDataModule, DataFacts):
    """In-memory synthetic data with the batch format of WebDatasetDataModule.

    Args:
        num_classes: classes.
        multilabel: two labels per image and multi-hot targets.
        train_size: training samples per epoch.
        val_size: validation (and test, predict) samples.
        batch_size: per-device batch.
        image_size: side of the square images.
        device: "cpu", or e.g. "cuda" to serve one fixed batch already on that device (a
            benchmark of the training loop without data loading).
        num_workers: DataLoader workers.
        seed: seed of the images.
    """

    def __init__(self, num_classes: int = 10, multilabel: bool = False, train_size: int = 256, val_size: int = 64,
                 batch_size: int = 16, image_size: int = 299, device: str = "cpu", num_workers: int = 0,
                 seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_classes, self.multilabel, self.train_size, self.batch_size = (
            num_classes, multilabel, train_size, batch_size)

    def dataset(self, size: int, seed: int) -> SyntheticImages:
        hp = self.hparams
        return SyntheticImages(size, hp.num_classes, hp.multilabel, hp.image_size, seed)

    def loader(self, size: int, seed: int, shuffle: bool = False) -> DataLoader:
        hp = self.hparams
        dataset = self.dataset(size, seed)
        if hp.device != "cpu":  # one batch, made once on the device, served size // batch_size times
            batch = torch.utils.data.default_collate([dataset[i] for i in range(hp.batch_size)])
            batch = {k: v.to(hp.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            return DataLoader([batch] * (size // hp.batch_size), batch_size=None)
        return DataLoader(dataset, batch_size=hp.batch_size, shuffle=shuffle, num_workers=hp.num_workers,
                          drop_last=shuffle,
                          worker_init_fn=StopSignalsInWorker() if hp.num_workers else None)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.hparams.train_size, self.hparams.seed, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.hparams.val_size, self.hparams.seed + 1)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
