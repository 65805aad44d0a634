"""Datasets: offline sources, IDX files, checksummed caches and the paper's splits."""

from fmdefense.data.sources import SOURCES, RawDataset, fetch, load_raw
from fmdefense.data.splits import DEFAULT_SPLITS, SplitConfig, make_splits, split_tensors, to_float

__all__ = [
    "DEFAULT_SPLITS",
    "SOURCES",
    "RawDataset",
    "SplitConfig",
    "fetch",
    "load_raw",
    "make_splits",
    "split_tensors",
    "to_float",
]
