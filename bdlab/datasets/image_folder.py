"""Your own images in torchvision's ImageFolder layout, decoded once and kept in the artifact cache.

Layouts under ``root``: ``train/<class>/<image>`` and ``test/<class>/<image>`` (the same class folders in
both), or ``<class>/<image>`` alone, split into train and test by a seeded, stratified fraction. Images may
sit in subfolders of their class folder; hidden files and folders (``.DS_Store``, macOS ``._`` copies) and
files without an image suffix are skipped. Class indices follow the sorted class folder names, as in
torchvision.

Every file's bytes are hashed on each load (fast next to decoding): the digest keys the decoded uint8
tensors in the cache, so a changed, added or renamed file means a new entry, and it is the dataset's
``fingerprint``, part of every model's cache key.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2.functional import pil_to_tensor, resize
from tqdm import tqdm

from bdlab.cache import ArtifactCache, Tensors
from bdlab.datasets.base import ImageDataset, ImageSet, split_by_fraction
from bdlab.errors import ConfigError, check_range

log = logging.getLogger(__name__)

KIND = "datasets/image_folder"
# part of the cache key: bumped when decoding changes, so images decoded the old way are not reused
DECODER_VERSION = 1
# PIL modes of one grey channel (with alpha or at 16 bits); every other mode counts as colour
GREY_MODES = ("1", "L", "LA", "La", "I", "F")
SHOWN = 3  # file names a message lists before "and N more"


@dataclass(frozen=True)
class ImageFile:
    """One image of the folder: its path, class index and whether it belongs to the ``test/`` split."""

    path: Path
    label: int
    test: bool


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _listing(paths: list[Path]) -> str:
    names = ", ".join(str(p) for p in paths[:SHOWN])
    return names + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")


def class_folders(folder: Path) -> list[str]:
    """The sorted names of ``folder``'s visible subfolders."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and _visible(entry.name))


def image_files(folder: Path) -> list[Path]:
    """Every visible image file under ``folder``, at any depth, in sorted order (links followed, as torchvision)."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if _visible(d))
        found += [Path(parent) / f for f in sorted(files) if _visible(f) and f.lower().endswith(IMG_EXTENSIONS)]
    return found


def find_images(root: Path) -> tuple[list[str], list[ImageFile]]:
    """The class names and image files of an ImageFolder tree (``train/`` + ``test/``, or one folder of classes);
    raises ConfigError for a tree that cannot make a classification dataset."""
    layout = "<root>/<class>/<image> (or <root>/train/<class>/... and <root>/test/<class>/...)"
    splits = [name for name in ("train", "test") if (root / name).is_dir()]
    if len(splits) == 1:
        other = "test" if splits == ["train"] else "train"
        raise ConfigError("dataset.root", f"{root} has {splits[0]}/ but no {other}/: add {other}/ with the same class "
                          f"folders, or put the class folders directly in {root}")
    folders = [(root / name, name == "test") for name in splits] or [(root, False)]
    classes = class_folders(folders[0][0])
    if len(folders) == 2:
        test_classes = class_folders(root / "test")
        if classes != test_classes:
            only_train = ", ".join(sorted(set(classes) - set(test_classes))) or "none"
            only_test = ", ".join(sorted(set(test_classes) - set(classes))) or "none"
            raise ConfigError("dataset.root", f"train/ and test/ of {root} have different class folders (only in "
                              f"train/: {only_train}; only in test/: {only_test}); give both the same class folders")
    found = {(folder / name, test, label): image_files(folder / name) for folder, test in folders
             for label, name in enumerate(classes)}
    files = [ImageFile(path, label, test) for (_, test, label), paths in found.items() for path in paths]
    if not files:
        raise ConfigError("dataset.root", f"no images under {root}: expected {layout}, files ending in "
                          f"{' '.join(IMG_EXTENSIONS)}")
    if len(classes) < 2:
        raise ConfigError("dataset.root", f"{root} has {len(classes)} class folder ({', '.join(classes)}); a "
                          "classifier needs at least 2: add a folder of images per class")
    empty = [folder for (folder, _, _), paths in found.items() if not paths]
    if empty:
        raise ConfigError("dataset.root", f"{len(empty)} class folder(s) hold no images: {_listing(empty)}; add images "
                          "or remove the folder(s)")
    return classes, files


def is_grey(mode: str) -> bool:
    return mode in GREY_MODES or mode.startswith("I;16")


def scan(files: list[ImageFile], root: Path) -> tuple[str, list[str]]:
    """The digest of the tree's content (each file's path under ``root``, split, class and bytes) and every
    file's PIL mode, read from its header (a file PIL cannot even open is refused here, by name)."""
    digest = hashlib.blake2b(digest_size=20)
    modes = []
    for file in files:
        data = file.path.read_bytes()
        digest.update(f"{file.path.relative_to(root).as_posix()}\0{file.label}\0{file.test}\0{len(data)}\0".encode())
        digest.update(data)
        try:
            with Image.open(io.BytesIO(data)) as image:
                modes.append(image.mode)
        except Exception as error:  # PIL raises many types for a file that is not an image it knows
            reason = "not an image format PIL knows" if isinstance(error, UnidentifiedImageError) else error
            raise ConfigError("dataset.root", f"cannot read the image {file.path} ({reason}); replace or remove it") \
                from None
    return digest.hexdigest(), modes


def resolve_channels(files: list[ImageFile], modes: list[str], channels: int | None) -> int:
    """``channels`` when given (every image is converted to it), else what the files have: they must agree."""
    if channels is not None:
        return channels
    grey = [f.path for f, mode in zip(files, modes) if is_grey(mode)]
    if not grey or len(grey) == len(files):
        return 1 if grey else 3
    colour = [f.path for f, mode in zip(files, modes) if not is_grey(mode)]
    fewer, kind = (grey, "grey") if len(grey) <= len(colour) else (colour, "colour")
    raise ConfigError("dataset.channels", f"the images mix {len(grey)} grey and {len(colour)} colour files (the {kind} "
                      f"ones: {_listing(fewer)}); make them agree, or set dataset.channels=1 or 3 to convert them all")


def decode(path: Path, channels: int, size: tuple[int, int]) -> Tensor:
    """One image as uint8 ``(channels, *size)``: alpha dropped (as torchvision's loader does: a classifier sees
    colours, and most alpha channels are opaque), 16-bit grey scaled to 8 bits, resized with antialiasing
    (stretched to ``size``, never cropped)."""
    with Image.open(path) as image:
        if image.mode.startswith("I;16"):  # PIL's conversion would clip every level above 255
            image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
        tensor = pil_to_tensor(image.convert("L" if channels == 1 else "RGB"))
    return resize(tensor, list(size), antialias=True)


def decode_all(files: list[ImageFile], channels: int, size: tuple[int, int], name: str) -> Tensors:
    """Every file decoded (with a progress bar on a terminal), as the cache entry's tensors."""
    log.info("decoding %d images of %s to %dx%d (once: later runs read them from the cache)", len(files), name, *size)
    images = torch.empty(len(files), channels, *size, dtype=torch.uint8)
    for i, file in enumerate(tqdm(files, desc=f"decoding {name}", unit="img", disable=None)):
        try:
            images[i] = decode(file.path, channels, size)
        except Exception as error:  # a truncated or corrupt file: PIL, zlib and the decoders raise many types
            raise ConfigError("dataset.root", f"cannot decode the image {file.path} ({error}); replace or remove it") \
                from None
    return {"images": images, "labels": torch.tensor([f.label for f in files], dtype=torch.int64),
            "is_test": torch.tensor([f.test for f in files], dtype=torch.bool)}


class ImageFolder(ImageDataset):
    """Your own images, grey or RGB, of any size, in torchvision's ImageFolder layout (module docstring).

    Args:
        root: the folder (required).
        size: the side (square) or ``[height, width]`` every image is resized to (default 32).
        channels: 1 or 3 to convert every image to grey or RGB; null (default) keeps what the files have, and
            they must agree.
        test_fraction: share of each class held out as the test set when ``root`` has no ``train/`` and
            ``test/`` (default 0.2; stratified, drawn with ``split_seed``, which also draws the defense split).
        cache_dir: where the decoded images are kept (default ``~/.cache/bdlab``; the YAML gives the run's).
        defense_fraction, split_seed, crop_padding, hflip: as every dataset (default 0.05, 0, 0, false: no
            flip, since flipping changes the meaning of some classes, such as text or signs).
    """

    def __init__(self, root: str | Path | None = None, *, size: int | list[int] = 32, channels: int | None = None,
                 test_fraction: float = 0.2, cache_dir: str | Path = "~/.cache/bdlab", **kwargs) -> None:
        if root is None:
            raise ConfigError("dataset.root", "set dataset.root=DIR, a folder of class folders of images "
                              "(DIR/<class>/<image>, or DIR/train/<class>/... and DIR/test/<class>/...)")
        super().__init__(root, **kwargs)
        if not self.root.is_dir():
            raise ConfigError("dataset.root", f"{self.root} is not a folder; set dataset.root=DIR to your images' "
                              "folder")
        sides = [size] if isinstance(size, int) else list(size)
        if len(sides) not in (1, 2) or any(not isinstance(s, int) or s < 8 for s in sides):
            raise ConfigError("dataset.size", f"got {size}, must be a side >= 8 or [height, width], each >= 8")
        if channels not in (None, 1, 3):
            raise ConfigError("dataset.channels", f"got {channels}, must be 1, 3 or null (what the files have)")
        check_range("dataset.test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        self.size = (sides[0], sides[-1])
        self.channels, self.test_fraction = channels, test_fraction
        self.cache = ArtifactCache(cache_dir)
        # tables and file names show the folder's own name
        self.name = self.root.resolve().name or "image_folder"
        self.class_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_raw(self) -> tuple[ImageSet, ImageSet]:
        classes, files = find_images(self.root)
        self.class_names = tuple(classes)
        self.fingerprint, modes = scan(files, self.root)
        channels = resolve_channels(files, modes, self.channels)
        spec = {"content": self.fingerprint, "size": list(self.size), "channels": channels, "decoder": DECODER_VERSION}
        decode_files = functools.partial(decode_all, files, channels, self.size, self.name)
        # without an entry, decode before touching the cache: a file that fails to decode leaves nothing behind
        # (not even a lock file); an entry that exists was decoded from exactly these files before
        decoded = None if self.cache.path(KIND, spec).is_dir() else decode_files()
        tensors, _ = self.cache.get_or_build(KIND, spec, decode_files if decoded is None else lambda: decoded)
        everything = ImageSet(tensors["images"], tensors["labels"])
        is_test = tensors["is_test"]
        if is_test.any():
            return everything.subset(~is_test), everything.subset(is_test)
        return split_by_fraction(everything, self.test_fraction, self.split_seed, "dataset.test_fraction")
