"""Images and labels from one safetensors file, in the format ``python -m bdlab.export`` writes.

Tensors: ``images`` (uint8 ``(N, C, H, W)``, C = 1 or 3) and ``labels`` (integers, one per image), optionally
``test_images`` and ``test_labels`` (the same, for a test set of the same image shape) and ``is_poison`` (what
``bdlab.export`` adds; not used: the images are the training set as given). Metadata, optional:
``class_names``, a JSON list (``["cat", "dog"]``) or names separated by commas. safetensors holds tensors
only, so no code is ever unpickled from the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from bdlab.cache import file_digest
from bdlab.datasets.base import ImageDataset, ImageSet, split_by_fraction
from bdlab.errors import ConfigError, check_range

FIELD = "dataset.path"


def parse_class_names(text: str) -> tuple[str, ...]:
    """The ``class_names`` metadata entry: a JSON list of strings, or names separated by commas."""
    if not text.lstrip().startswith("["):
        return tuple(name.strip() for name in text.split(","))
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ConfigError(FIELD, f"the class_names metadata is not a JSON list of strings: {text[:80]!r}")
    return tuple(names)


class TensorFile(ImageDataset):
    """A dataset from one safetensors file (module docstring); without ``test_images``, a seeded, stratified
    ``test_fraction`` of each class is the test set.

    Args:
        path: the safetensors file (required).
        classes: the class count; null (default) takes the ``class_names`` metadata's count, else the largest
            label + 1.
        test_fraction: share of each class held out for testing when the file has no test split (default 0.2,
            drawn with ``split_seed``, which also draws the defense split).
        defense_fraction, split_seed, crop_padding, hflip: as every dataset (default 0.05, 0, 0, false).
    """

    def __init__(self, *args, path: str | Path | None = None, classes: int | None = None, test_fraction: float = 0.2,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if path is None:
            raise ConfigError(FIELD, "set dataset.path=FILE, a safetensors file with images (uint8 N,C,H,W) and labels "
                              "(python -m bdlab.export writes one)")
        if classes is not None and classes < 2:
            raise ConfigError("dataset.classes", f"got {classes}, must be >= 2 (or null: from the file)")
        check_range("dataset.test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ConfigError(FIELD, f"{self.path} is not a file; set dataset.path=FILE to a safetensors file")
        self.classes, self.test_fraction = classes, test_fraction
        # tables show the file's own name
        self.name = self.path.stem
        self._classes = 0

    @property
    def num_classes(self) -> int:
        return self._classes

    def _read(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
        except Exception as error:  # safetensors raises its own error types for a file that is not one
            raise ConfigError(FIELD, f"{self.path} is not a readable safetensors file ({error})") from None

    def _image_set(self, tensors: dict[str, Tensor], images_key: str, labels_key: str) -> ImageSet:
        images, labels = tensors[images_key], tensors[labels_key]
        if len(images) == 0:
            raise ConfigError(FIELD, f"{self.path}: {images_key} holds no images")
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(FIELD, f"{self.path}: {images_key} is {images.dtype} {tuple(images.shape)}; it must be "
                              "uint8 (N, C, H, W) with C = 1 or 3")
        if labels.dim() != 1 or len(labels) != len(images) or labels.is_floating_point() or labels.is_complex():
            raise ConfigError(FIELD, f"{self.path}: {labels_key} is {labels.dtype} {tuple(labels.shape)}; it must hold "
                              f"one integer per image of {images_key} ({len(images)})")
        return ImageSet(images, labels.long())

    def load_raw(self) -> tuple[ImageSet, ImageSet]:
        tensors, metadata = self._read()
        missing = [key for key in ("images", "labels") if key not in tensors]
        if missing:
            raise ConfigError(FIELD, f"{self.path} has no {' or '.join(missing)} tensor (it holds "
                              f"{', '.join(sorted(tensors)) or 'none'}); it needs images (uint8 N,C,H,W) and labels "
                              "(one integer per image)")
        if ("test_images" in tensors) != ("test_labels" in tensors):
            raise ConfigError(FIELD, f"{self.path} has only one of test_images and test_labels; give both or neither")
        train = self._image_set(tensors, "images", "labels")
        test = self._image_set(tensors, "test_images", "test_labels") if "test_images" in tensors else None
        if test is not None and test.images.shape[1:] != train.images.shape[1:]:
            raise ConfigError(FIELD, f"{self.path}: test_images are {tuple(test.images.shape[1:])}, images "
                              f"{tuple(train.images.shape[1:])}; both must have one shape")
        self.class_names = parse_class_names(metadata["class_names"]) if "class_names" in metadata else None
        self._classes = self._class_count([train] if test is None else [train, test])
        self.fingerprint = file_digest(self.path)
        if test is None:
            return split_by_fraction(train, self.test_fraction, self.split_seed, "dataset.test_fraction")
        return train, test

    def _class_count(self, sets: list[ImageSet]) -> int:
        """The class count (``classes``, else the class names', else the largest label + 1), with every label
        checked against it."""
        labels = torch.cat([s.labels for s in sets])
        names = self.class_names
        if self.classes is not None and names is not None and len(names) != self.classes:
            raise ConfigError("dataset.classes", f"got {self.classes}, but {self.path} names {len(names)} classes; "
                              "set it to null or to their count")
        count = self.classes or (len(names) if names is not None else int(labels.max()) + 1)
        outside = int(((labels < 0) | (labels >= count)).sum())
        if outside:
            source = "dataset.classes" if self.classes is not None else \
                "its class_names" if names is not None else "the largest label + 1"
            raise ConfigError("dataset.classes" if self.classes is not None else FIELD,
                              f"{outside} label(s) of {self.path} lie outside [0, {count - 1}] ({count} classes, from "
                              f"{source}); fix the labels or set dataset.classes to the class count")
        if count < 2:
            raise ConfigError(FIELD, f"{self.path} has {count} class; a classifier needs at least 2")
        return count
