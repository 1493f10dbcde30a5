"""GTSRB (Stallkamp et al., 2012) through torchvision's loader, resized once and kept as uint8."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torchvision.datasets import GTSRB as TorchvisionGTSRB

from bdlab.datasets.base import ImageDataset, ImageSet, missing_files_error
from bdlab.errors import ConfigError


class GTSRB(ImageDataset):
    """German traffic signs, 43 classes, variable-size RGB resized to ``size`` (default 32).

    Files follow torchvision's layout under ``<root>/gtsrb``; decoded and resized images are
    kept in ``<root>/gtsrb/bdlab-<size>px.safetensors`` so later runs skip the slow decode.
    Augmentation: crop 4, no flip (flipping changes the meaning of some signs).
    """

    name = "gtsrb"
    num_classes = 43

    def __init__(self, *args, size: int = 32, crop_padding: int = 4, **kwargs) -> None:
        super().__init__(*args, crop_padding=crop_padding, **kwargs)
        if size < 8:
            raise ConfigError("dataset.size", f"got {size}, must be >= 8")
        self.size = size

    def _read_split(self, split: str) -> ImageSet:
        try:
            source = TorchvisionGTSRB(str(self.root), split=split, download=False)
        except RuntimeError:
            if not self.download:
                raise
            source = TorchvisionGTSRB(str(self.root), split=split, download=True)
        images = np.empty((len(source), self.size, self.size, 3), dtype=np.uint8)
        labels = np.empty(len(source), dtype=np.int64)
        for i, (image, label) in enumerate(source):
            images[i] = np.asarray(image.convert("RGB").resize((self.size, self.size)))
            labels[i] = label
        return ImageSet(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))

    def load_raw(self) -> tuple[ImageSet, ImageSet]:
        folder = self.root / "gtsrb"
        decoded = folder / f"bdlab-{self.size}px.safetensors"
        if decoded.is_file():
            t = load_file(str(decoded))
            return ImageSet(t["train_images"], t["train_labels"]), ImageSet(t["test_images"], t["test_labels"])
        try:
            train, test = self._read_split("train"), self._read_split("test")
        except Exception as error:
            raise missing_files_error(self.name, folder, "torchvision's GTSRB layout is expected: GTSRB/Training/"
                                      "<class>/*.ppm, GTSRB/Final_Test/Images/*.ppm and GT-final_test.csv") from error
        handle, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(handle)
        save_file({"train_images": train.images, "train_labels": train.labels,
                   "test_images": test.images, "test_labels": test.labels}, tmp)
        os.replace(tmp, decoded)
        return train, test

