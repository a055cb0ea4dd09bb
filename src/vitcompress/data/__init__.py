"""Datasets as uint8 tensors (in memory, or decoded from files on the fly), and a batched, seeded input pipeline.

``load_split(name, split)`` returns a bundled dataset's split as an `ImageTensorDataset`;
``open_source(DataConfig)`` any dataset a recipe can name, including a user's image folder
or Hugging Face dataset, whose ``split(name, preprocess)`` prepares it for one model (see
:mod:`.source`). ``make_loader`` turns a split into normalized float batches at the size
and channel count the model wants, as its `Preprocess` says. Bundled: Fashion-MNIST (idx
files, e.g. from the Debian package dataset-fashion-mnist), CIFAR-10 and CIFAR-100 (python
batch files, read with a restricted unpickler).
"""

from __future__ import annotations

from vitcompress.data.dataset import (
    DATASETS,
    SPLITS,
    DatasetInfo,
    ImageTensorDataset,
    clear_cache,
    dataset_info,
    default_data_root,
)
from vitcompress.data.files import FileImages
from vitcompress.data.preprocess import Preprocess, dataset_preprocess, from_hf_processor, from_timm_config
from vitcompress.data.source import (
    DATA_NAMES,
    DataConfig,
    DataSource,
    data_config_from_arg,
    load_split,
    open_source,
)
from vitcompress.data.transforms import BatchTransform, make_loader

__all__ = [
    "DATASETS",
    "DATA_NAMES",
    "SPLITS",
    "BatchTransform",
    "DataConfig",
    "DataSource",
    "DatasetInfo",
    "FileImages",
    "ImageTensorDataset",
    "Preprocess",
    "clear_cache",
    "dataset_info",
    "data_config_from_arg",
    "dataset_preprocess",
    "default_data_root",
    "from_hf_processor",
    "from_timm_config",
    "load_split",
    "make_loader",
    "open_source",
]
