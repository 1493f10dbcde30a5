"""CIFAR-10 and CIFAR-100 from the official *binary* version (no pickle is ever loaded).

The binary archives hold fixed-size records: CIFAR-10 ``<1 label byte><3072 pixel bytes>``,
CIFAR-100 ``<coarse byte><fine byte><3072 pixel bytes>``; pixels are channel-major 32x32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bdlab.datasets.base import ImageDataset, ImageSet, missing_files_error
from bdlab.datasets.download import try_download

_PIXELS = 3 * 32 * 32


def read_cifar_binary(paths: list[Path], label_bytes: int, label_index: int) -> ImageSet:
    """Concatenate the records of CIFAR binary files; ``label_index`` picks which label byte."""
    records = []
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        width = label_bytes + _PIXELS
        if raw.size % width:
            raise ValueError(f"{path}: size {raw.size} is not a multiple of the record size {width}")
        records.append(raw.reshape(-1, width))
    table = np.concatenate(records)
    images = torch.from_numpy(table[:, label_bytes:].reshape(-1, 3, 32, 32).copy())
    labels = torch.from_numpy(table[:, label_index].astype(np.int64))
    return ImageSet(images, labels)


class CIFAR10(ImageDataset):
    """CIFAR-10 (Krizhevsky, 2009): 32x32 RGB, 10 classes; augmentation: crop 4 + flip."""

    name = "cifar10"
    num_classes = 10

    def __init__(self, *args, crop_padding: int = 4, hflip: bool = True, **kwargs) -> None:
        super().__init__(*args, crop_padding=crop_padding, hflip=hflip, **kwargs)
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    md5 = "c32a1d4ab5d03f1284b67883e8d87530"
    folder = "cifar-10-batches-bin"
    train_files = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
    test_files = ("test_batch.bin",)
    label_bytes, label_index = 1, 0

    def load_raw(self) -> tuple[ImageSet, ImageSet]:
        folder = self.root / self.folder
        wanted = [folder / f for f in self.train_files + self.test_files]
        if not all(p.is_file() for p in wanted) and self.download:
            try_download(self.url, self.root, self.md5)
        if not all(p.is_file() for p in wanted):
            archive = self.url.rsplit("/", 1)[1]
            raise missing_files_error(self.name, folder, f"download {self.url} and unpack {archive} in "
                                      f"{self.root.resolve()} (it creates {self.folder}/)")
        n_train = len(self.train_files)
        train = read_cifar_binary(wanted[:n_train], self.label_bytes, self.label_index)
        test = read_cifar_binary(wanted[n_train:], self.label_bytes, self.label_index)
        return train, test


class CIFAR100(CIFAR10):
    """CIFAR-100 (Krizhevsky, 2009): 32x32 RGB, 100 fine classes; augmentation: crop 4 + flip."""

    name = "cifar100"
    num_classes = 100
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
    md5 = "03b5dce01913d631647c71ecec9e9cb8"
    folder = "cifar-100-binary"
    train_files = ("train.bin",)
    test_files = ("test.bin",)
    label_bytes, label_index = 2, 1
