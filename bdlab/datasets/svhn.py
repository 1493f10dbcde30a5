"""SVHN cropped digits (Netzer et al., 2011) from the official ``*_32x32.mat`` files."""

from __future__ import annotations

import numpy as np
import scipy.io
import torch

from bdlab.datasets.base import ImageDataset, ImageSet, missing_files_error
from bdlab.datasets.download import try_download


def read_svhn_mat(path) -> ImageSet:
    """``X`` is ``(32, 32, 3, N)`` uint8, ``y`` is ``(N, 1)`` with digit 0 stored as 10."""
    mat = scipy.io.loadmat(str(path))
    images = torch.from_numpy(np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1))).astype(np.uint8))
    labels = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1) % 10)
    return ImageSet(images, labels)


class SVHN(ImageDataset):
    """SVHN: 32x32 RGB house-number digits, 10 classes; augmentation: crop 4, no flip."""

    name = "svhn"
    num_classes = 10

    def __init__(self, *args, crop_padding: int = 4, **kwargs) -> None:
        super().__init__(*args, crop_padding=crop_padding, **kwargs)
    base_url = "http://ufldl.stanford.edu/housenumbers/"
    files = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
             "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}

    def load_raw(self) -> tuple[ImageSet, ImageSet]:
        folder = self.root / "svhn"
        for filename, md5 in self.files.items():
            if not (folder / filename).is_file() and self.download:
                try_download(self.base_url + filename, folder, md5, extract=False)
        if not all((folder / f).is_file() for f in self.files):
            raise missing_files_error(self.name, folder, "download train_32x32.mat and test_32x32.mat from "
                                      f"{self.base_url} into it")
        return read_svhn_mat(folder / "train_32x32.mat"), read_svhn_mat(folder / "test_32x32.mat")
