"""WebDatasetDataModule: tar shards (written by `python -m xception_pl shards`) -> Xception batches."""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
import webdataset as wds
from torchvision.transforms import v2
from lightning.pytorch.trainer.states import TrainerFn

from xception_pl.data import transforms
from xception_pl.data.augmentations import Augmentation, OnDevice
from xception_pl.data.batch_crop import PerImage, RandomResizedCropFlip, ResizeCenterCrop
from xception_pl.data.buffers import BatchBuffers
from xception_pl.data.device_decode import BatchTransform, DecodeOnDevice
from xception_pl.data.images import image_files, image_loader
from xception_pl.data.mixing import BatchMix, target_vectors
from xception_pl.data.pipeline import EpochLoader, EpochSeed, carry_skips, eval_pipeline, rank_shards, train_pipeline
from xception_pl.data.position import StreamPosition
from xception_pl.data.samples import DecodeSamples, SkipCounter
from xception_pl.data.sources import ShardSet, dataset_facts, resolve
from xception_pl.data.workers import StopSignalsInWorker
from xception_pl.facts import DataFacts


class WebDatasetDataModule(L.LightningDataModule, DataFacts):
    """Batches {"image", "target", "skipped", "key"} from WebDataset shards.

    "image": [B, 3, S, S], uint8 from the loader, scaled to [-1, 1] on the device by `on_after_batch_transfer`
    (x / 127.5 - 1, the paper's Keras preprocessing); "target": long [B] class ids, or float
    [B, num_classes] multi-hot; "skipped": long [len(SKIP_REASONS)], samples dropped since the previous
    batch, per reason; "key": the sample keys; training batches also "stream": long [3] (slot, raw samples
    the slot used, the seed of the batch's randomness), which `on_before_batch_transfer` takes off (it makes
    a resume exact: data/position.py). decode_device="cuda": the device decodes and crops.

    Training gives every rank train_size // (batch_size * world_size) full batches per epoch (DDP never
    waits on a rank), from shards drawn with replacement; a resumed epoch trains only its remaining batches
    (data/position.py). Evaluation gives shard i to rank i % world_size, round-robin to its workers: every
    sample exactly once, unpadded (a worker's last batch may be short); any shard count works.

    Args:
        train: training shards: a directory holding manifest.json or a brace pattern of .tar files, local or at
            a URL of an object store (s3://bucket/train, s3://bucket/train-{000000..000099}.tar; gs://, https://:
            any fsspec protocol, xception_pl.storage), or a `pipe:` command with braces.
        val: validation shards, as `train`.
        test: test shards, as `train`.
        predict: shards to predict (labels optional), as `train`; or plain images: a folder (searched
            recursively), a glob, or one image file (xception_pl.data.images).
        train_size: training samples per epoch; default: the manifest's count (required without one).
        val_size: validation samples (informational); default: the manifest's count.
        test_size: test samples; default: the manifest's count.
        predict_size: samples to predict; default: the manifest's count.
        num_classes: number of classes; default: from the manifest (required without one).
        multilabel: `<key>.json` label lists (JFT) instead of `<key>.cls`; default: from the manifest.
        batch_size: samples per batch, per device.
        num_workers: DataLoader worker processes per device (0: load in the main process); evaluation
            starts at most one per shard of the rank.
        image_size: side of the square training crops (299 in the paper); a ProgressiveResizing callback
            (resizing.py) may shrink them on the device early in the fit.
        eval_image_size: side of the evaluation (and predict) crops; default image_size. Larger than the
            training size is usually better (FixRes, Touvron et al., NeurIPS 2019; docs/training.md).
        eval_resize: evaluation resizes the shorter side to this, then centre-crops eval_image_size (ours); at
            least eval_image_size.
        shuffle_buffer: raw training samples each worker shuffles in memory (ours; at most train_size).
        decode_device: "cpu": workers decode and augment; "cuda": workers send JPEG bytes and the
            GPU decodes (nvjpeg) and crops them, the default transforms batched (data/batch_crop.py).
        max_image_pixels: larger images are skipped ("too_large") from their header, never decoded.
        augmentations: training augmentations after the crop and flip, in order (data/augmentations.py:
            TrivialAugmentWide, RandAugment, RandomErasing, or your own part); batched on the device with
            decode_device="cuda", where a part without a batched form is refused.
        mixing: batch-level training parts (data/mixing.py: Mixup, CutMix), one per batch drawn uniformly, on the
            device after the batch arrives (either decode_device); the loss reads the mixed soft targets.
        train_transform: uint8 [3, H, W] -> [3, S, S]: replaces the crop and flip (experts; the augmentations
            still follow); default RandomResizedCrop(image_size) + RandomHorizontalFlip (batched with
            decode_device="cuda"; a custom one runs image by image there).
        eval_transform: uint8 [3, H, W] -> [3, S, S]; default Resize(eval_resize) + CenterCrop(image_size)
            (batched with decode_device="cuda", as train_transform).
        seed: seed of the training stream (shard draws, shuffle, augmentation).
        pin_memory: page-locked batches (only when CUDA is available; never the JPEG bytes of
            decode_device="cuda", which nvjpeg copies itself).
        persistent_workers: keep workers alive between epochs (when num_workers > 0).
        prefetch_factor: batches each worker loads ahead (None: PyTorch's default, 2).
        multiprocessing_context: start method of the workers (None: PyTorch's default).
        storage_options: fsspec options of the shards' object store (e.g. {"client_kwargs": {"endpoint_url":
            ...}}); credentials default to the store's environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...).
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        train_size: int | None = None,
        val_size: int | None = None,
        test_size: int | None = None,
        predict_size: int | None = None,
        num_classes: int | None = None,
        multilabel: bool | None = None,
        batch_size: int = 32,
        num_workers: int = 8,
        image_size: int = 299,
        eval_image_size: int | None = None,
        eval_resize: int = 333,
        shuffle_buffer: int = 5000,
        decode_device: Literal["cpu", "cuda"] = "cpu",
        max_image_pixels: int = 89_478_485,
        augmentations: list[Augmentation] | None = None,
        mixing: list[BatchMix] | None = None,
        train_transform: transforms.Transform | None = None,
        eval_transform: transforms.Transform | None = None,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        multiprocessing_context: Literal["fork", "spawn", "forkserver"] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        eval_image_size = eval_image_size or image_size
        if eval_resize < eval_image_size:
            raise ValueError(f"eval_resize={eval_resize} is smaller than the evaluation crop ({eval_image_size} px): "
                             f"set eval_resize >= eval_image_size, e.g. {round(eval_image_size * 333 / 299)} (our "
                             "333/299 ratio)")
        splits = {"train": (train, train_size), "val": (val, val_size), "test": (test, test_size),
                  "predict": (predict, predict_size)}
        self.images = image_files(predict) if predict is not None else None  # plain images to predict
        if self.images is not None:
            del splits["predict"]
        self.shards: dict[str, ShardSet] = {
            name: resolve(spec, size, name, storage_options)
            for name, (spec, size) in splits.items() if spec is not None}
        if not self.shards and self.images is None:
            raise ValueError("no data given: pass train=... and/or val=..., test=..., predict=...")
        self.num_classes, self.multilabel, self.class_names = dataset_facts(self.shards, num_classes, multilabel)
        self.train_size = self.shards["train"].size if "train" in self.shards else None
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.decode_device, self.max_image_pixels = decode_device, max_image_pixels
        augmentations = list(augmentations or [])
        if train_transform is None:
            self.train_transform = transforms.train_transform(image_size, augmentations)
        else:
            self.train_transform = v2.Compose([train_transform, *augmentations]) if augmentations else train_transform
        self.eval_transform = eval_transform or transforms.eval_transform(eval_image_size, eval_resize)
        self.mixing = list(mixing or [])
        self.batch_transforms: dict[bool, BatchTransform] = {  # decode_device="cuda", by training or not
            True: OnDevice(PerImage(train_transform) if train_transform else RandomResizedCropFlip(image_size),
                           augmentations if decode_device == "cuda" else []),
            False: PerImage(eval_transform) if eval_transform else ResizeCenterCrop(eval_image_size, eval_resize)}
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.prefetch_factor, self.multiprocessing_context = prefetch_factor, multiprocessing_context
        self.storage_options = storage_options
        self.position = StreamPosition(seed)
        self.rank, self.world_size = 0, 1

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        elif dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        if self.decode_device == "cuda" and device is not None and device.type != "cuda":
            raise ValueError("decode_device='cuda' needs a CUDA trainer; set decode_device=cpu")
        if stage == "fit":
            self.batches_per_rank()

    def split(self, name: str) -> ShardSet:
        if name not in self.shards:
            raise ValueError(f"no {name} data: pass {name}=<shard directory or pattern> to the DataModule")
        return self.shards[name]

    def batches_per_rank(self) -> int:
        batches = self.split("train").size // (self.batch_size * self.world_size)
        if batches < 1:
            raise ValueError(f"train_size={self.train_size} is less than one global batch ({self.batch_size} x "
                             f"{self.world_size} devices): lower batch_size or use more data")
        return batches

    def decoder(self, name: str) -> DecodeSamples:
        transform = self.train_transform if name == "train" else self.eval_transform
        return DecodeSamples(SkipCounter(name), self.num_classes, self.multilabel,
                             None if self.decode_device == "cuda" else transform, self.max_image_pixels,
                             labels_required=name != "predict")

    def loader_args(self, num_workers: int | None = None) -> dict[str, Any]:
        num_workers = self.num_workers if num_workers is None else num_workers
        pin = self.pin_memory and torch.cuda.is_available() and self.decode_device == "cpu"  # JPEG bytes: nvjpeg copies
        args: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin}
        if num_workers > 0:
            args.update(persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor,
                        multiprocessing_context=self.multiprocessing_context,
                        worker_init_fn=StopSignalsInWorker(self.multiprocessing_context))
        return args

    def train_dataloader(self) -> EpochLoader:
        if self.position.batch_shift and self.trainer is not None:  # Lightning's loops are restored by now
            shift_batch_progress(self.trainer, self.position.batch_shift)
            self.position.batch_shift = 0
        seeds = EpochSeed(self.position.seed, self.rank, self.num_workers)
        shards = self.split("train")
        shuffle_buffer = min(self.shuffle_buffer, shards.size)  # no point holding more than the data set
        buffers = self.batch_buffers(self.num_workers)
        pipeline = train_pipeline(shards.urls, seeds, self.decoder("train"), self.batch_size, shuffle_buffer,
                                  encoded=self.decode_device == "cuda", storage_options=self.storage_options,
                                  buffers=buffers)
        loader = EpochLoader(pipeline, seeds, self.position, self.trainer, self.batches_per_rank(),
                             **self.loader_args())
        return loader.compose(buffers.release, *self.device_decode(training=True), carry_skips)

    def eval_dataloader(self, name: str) -> wds.WebLoader:
        urls = self.split(name).urls
        # A worker reads whole shards, so more workers than this rank's shards would sit idle (ours).
        workers = min(self.num_workers, len(rank_shards(urls, self.rank, self.world_size)))
        buffers = self.batch_buffers(workers)
        pipeline = eval_pipeline(urls, self.rank, self.world_size, self.decoder(name),
                                 self.batch_size, encoded=self.decode_device == "cuda",
                                 storage_options=self.storage_options, buffers=buffers)
        loader = wds.WebLoader(pipeline, batch_size=None, **self.loader_args(workers))
        # val and test count the skips after their last batch (an empty batch); predict has no count to log.
        return loader.compose(buffers.release, *self.device_decode(training=False),
                              partial(carry_skips, last=name != "predict"))

    def batch_buffers(self, workers: int) -> BatchBuffers:
        """Workers stack decoded images into shared-memory buffers they reuse (data/buffers.py)."""
        return BatchBuffers(workers, (self.prefetch_factor or 2) + 1)  # 2: the DataLoader's default prefetch

    def device_decode(self, training: bool) -> list[DecodeOnDevice]:
        """decode_device="cuda": the main-process stage that decodes and crops on the device (a batch it
        leaves empty, all corrupt, carry_skips then drops, keeping its count)."""
        if self.decode_device != "cuda":
            return []
        if self.trainer is not None:
            device = self.trainer.strategy.root_device
        elif torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        else:  # the same code on the CPU, as the tests run it
            device = torch.device("cpu")
        return [DecodeOnDevice(self.batch_transforms[training], device)]

    def describe(self) -> list[str]:
        """For the run's start line: images and shards per split, from the manifests."""
        return [f"{name} {'?' if s.size is None else f'{s.size:,}'} images in {len(s.urls):,} shards"
                for name, s in self.shards.items() if name in ("train", "val")]

    def eval_batches(self, split: str, rank: int, world_size: int) -> int | None:
        """Batches `rank` reads from an evaluation split, whose loaders have no length (the progress bar's
        total): shard i goes to reader (rank, worker) i % (ranks x workers), each reader's last batch may be
        short. Exact from the manifest's per-shard counts; else size / (batch x ranks) rounded up. (Skipped
        samples make it a little less.)"""
        shards = self.shards.get(split)
        if shards is None or not shards.size:
            return None
        workers = max(1, self.num_workers)
        counts = [s["count"] for s in (shards.manifest or {}).get("shards", [])]
        if len(counts) != len(shards.urls):
            return math.ceil(shards.size / (self.batch_size * world_size))
        readers = world_size * workers
        return sum(math.ceil(sum(counts[slot::readers]) / self.batch_size)
                   for slot in range(rank * workers, (rank + 1) * workers))

    def val_dataloader(self) -> wds.WebLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> wds.WebLoader:
        return self.eval_dataloader("test")

    def predict_dataloader(self) -> wds.WebLoader | torch.utils.data.DataLoader:
        if self.images is not None:
            return image_loader(self.images, self.eval_transform, self.max_image_pixels, self.batch_size,
                                **self.loader_args())
        return self.eval_dataloader("predict")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if "stream" in batch:  # a training batch reaches the step: its place is noted, its randomness seeded
            seed = self.position.note(batch.pop("stream").tolist())
            if self.trainer is not None and self.trainer.training:
                torch.manual_seed(seed)  # mixing, dropout, stochastic depth: the batch's alone (an exact resume)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch["image"] = transforms.to_model_input(batch["image"])
        if self.mixing and self.trainer is not None and self.trainer.training and len(batch["image"]):
            part = self.mixing[int(torch.randint(len(self.mixing), ()))]
            targets = target_vectors(batch["target"], self.num_classes, self.multilabel)
            batch["image"], batch["soft_target"] = part(batch["image"], targets)
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None or self.trainer.state.fn != TrainerFn.FITTING or self.position.restored:
            return self.position.state_dict()  # (restored: as loaded, the same on every rank)
        state = self.position.state_dict(self.position.trained, self.trainer.num_training_batches,
                                         self.batch_size * self.world_size)
        # Every rank's streams, for an exact resume: every rank saves together (Trainer.save_checkpoint), rank 0 writes.
        used = [list(self.position.used)]
        if self.world_size > 1 and dist.is_initialized():
            used = [None] * self.world_size
            dist.all_gather_object(used, list(self.position.used))
        return {**state, "used": used}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # In samples: a resume on another world size goes on at the same sample of the epoch (setup has run).
        fitting = self.trainer is not None and "train" in self.shards
        self.position.load_state_dict(state_dict, self.batch_size * self.world_size if fitting else None,
                                      self.batches_per_rank() if fitting else None, self.world_size)
        # Lightning warns that a loader without its own state_dict replays a resumed epoch; this one does not.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")


def shift_batch_progress(trainer: L.Trainer, batches: int) -> None:
    """Move Lightning's restored count of this epoch's batches (docs/code.md "Seams"): a position converted to another
    world size is in other batches, and Lightning ends the epoch by its own count."""
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    for field in ("ready", "started", "processed", "completed"):
        setattr(current, field, getattr(current, field) + batches)

