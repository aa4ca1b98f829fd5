"""Data: WebDataset shards (writer, DataModule), the cached demo set, and in-memory synthetic data."""

from xception_pl.data.datamodule import WebDatasetDataModule
from xception_pl.data.demo import DemoDataModule, make_demo_data
from xception_pl.data.samples import SKIP_REASONS
from xception_pl.data.synthetic import SyntheticDataModule
from xception_pl.data.writer import write_shards

__all__ = ["SKIP_REASONS", "DemoDataModule", "SyntheticDataModule", "WebDatasetDataModule", "make_demo_data",
           "write_shards"]
