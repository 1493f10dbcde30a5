"""Every loader on files written in the dataset's real on-disk format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from bdlab.datasets import CIFAR10, CIFAR100, GTSRB, MNIST, SVHN, FashionMNIST, Synthetic
from bdlab.datasets.idx import read_idx, write_idx
from bdlab.errors import ConfigError

RNG = np.random.default_rng(0)


def write_idx_set(folder: Path, n_train: int = 40, n_test: int = 20, size: int = 28) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    arrays = {"train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, size, size), dtype=np.uint8),
              "train-labels-idx1-ubyte": RNG.integers(0, 10, n_train, dtype=np.uint8),
              "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, size, size), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": RNG.integers(0, 10, n_test, dtype=np.uint8)}
    for stem, array in arrays.items():
        write_idx(folder / f"{stem}.gz", array)
    return arrays


def test_idx_roundtrip_and_corruption(tmp_path: Path) -> None:
    array = RNG.integers(0, 256, (3, 5, 7), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b", array)
    assert torch.equal(read_idx(tmp_path / "a.gz"), torch.from_numpy(array))
    assert torch.equal(read_idx(tmp_path / "b"), torch.from_numpy(array))
    (tmp_path / "c").write_bytes((tmp_path / "b").read_bytes()[:-3])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "c")


def test_bundled_mnist_and_splits() -> None:
    data = MNIST(root="/nonexistent").load()
    assert data.train.images.shape == (60000, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert len(data.defense) == 500 and len(data.test) == 9500
    assert data.num_classes == 10 and data.train.labels.dtype == torch.int64
    assert 0.12 < data.mean[0] < 0.14 and 0.29 < data.std[0] < 0.32
    # the held-out defense split is disjoint from the evaluation images
    test_rows = {bytes(x.numpy()) for x in data.test.images[:2000]}
    assert not any(bytes(x.numpy()) in test_rows for x in data.defense.images)


def test_defense_split_is_seeded() -> None:
    a, b, c = (MNIST(root="/nonexistent", split_seed=s).load() for s in (0, 0, 1))
    assert torch.equal(a.defense.labels, b.defense.labels)
    assert not torch.equal(a.defense.images, c.defense.images)


def test_mnist_prefers_user_copy(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path / "mnist")
    data = MNIST(root=tmp_path).load()
    assert len(data.train) == 40
    assert torch.equal(data.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))


def test_fashion_mnist_from_data_dir_and_system_dir(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path / "data" / "fashion_mnist")
    data = FashionMNIST(root=tmp_path / "data", system_dir=tmp_path / "none").load()
    assert torch.equal(data.train.labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    write_idx_set(tmp_path / "system", n_train=30)
    data = FashionMNIST(root=tmp_path / "empty", system_dir=tmp_path / "system").load()
    assert len(data.train) == 30


def test_fashion_mnist_absent_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset-fashion-mnist"):
        FashionMNIST(root=tmp_path, system_dir=tmp_path / "none").load()


def write_cifar_bin(path: Path, labels: np.ndarray, images: np.ndarray, coarse: np.ndarray | None = None) -> None:
    parts = [labels[:, None]] if coarse is None else [coarse[:, None], labels[:, None]]
    path.write_bytes(np.concatenate(parts + [images.reshape(len(labels), -1)], axis=1).astype(np.uint8).tobytes())


def test_cifar10_binary_format(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    batches = []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = RNG.integers(0, 10, 4, dtype=np.uint8)
        images = RNG.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
        write_cifar_bin(folder / name, labels, images)
        batches.append((labels, images))
    data = CIFAR10(root=tmp_path, download=False, defense_fraction=0.25).load()
    assert data.train.images.shape == (20, 3, 32, 32)
    assert torch.equal(data.train.images[4:8], torch.from_numpy(batches[1][1]))
    assert torch.equal(data.train.labels[:4], torch.from_numpy(batches[0][0]).long())
    assert len(data.test) + len(data.defense) == 4


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    fine = np.array([97, 3, 55, 0], dtype=np.uint8)
    for name in ("train.bin", "test.bin"):
        write_cifar_bin(folder / name, fine, RNG.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8),
                        coarse=np.array([1, 2, 3, 4], dtype=np.uint8))
    data = CIFAR100(root=tmp_path, download=False).load()
    assert data.num_classes == 100 and data.train.labels.tolist() == fine.tolist()


def test_cifar_offline_names_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr("bdlab.datasets.cifar.try_download", lambda *a, **k: calls.append(a) or False)
    with pytest.raises(ConfigError, match="cifar-10-binary.tar.gz") as info:
        CIFAR10(root=tmp_path).load()
    assert calls, "the real download path must be tried when download=true"
    assert "\n" not in str(info.value)


def test_svhn_mat_format(tmp_path: Path) -> None:
    folder = tmp_path / "svhn"
    folder.mkdir()
    x = RNG.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [3], [9]], dtype=np.uint8)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        scipy.io.savemat(folder / name, {"X": x, "y": y})
    data = SVHN(root=tmp_path, download=False, defense_fraction=0.2).load()
    assert data.train.labels.tolist() == [0, 1, 2, 3, 9]
    assert torch.equal(data.train.images[2], torch.from_numpy(x[:, :, :, 2]).permute(2, 0, 1))


def test_svhn_offline(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_32x32.mat"):
        SVHN(root=tmp_path, download=False).load()


def test_gtsrb_torchvision_layout(tmp_path: Path) -> None:
    base = tmp_path / "gtsrb" / "GTSRB"
    for cls in range(43):
        folder = base / "Training" / f"{cls:05d}"
        folder.mkdir(parents=True)
        Image.fromarray(np.full((40, 36, 3), 5 * cls, dtype=np.uint8)).save(folder / "00000_00000.ppm")
        (folder / f"GT-{cls:05d}.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
                                                  f"00000_00000.ppm;36;40;1;1;35;39;{cls}\n")
    test_dir = base / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, cls in enumerate((5, 0, 42)):
        Image.fromarray(np.full((30, 30, 3), 200, dtype=np.uint8)).save(test_dir / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;30;30;1;1;29;29;{cls}")
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    data = GTSRB(root=tmp_path, download=False, size=16, defense_fraction=0.34).load()
    assert data.num_classes == 43 and data.train.images.shape == (43, 3, 16, 16)
    # the label is the class folder's number and the pixels are that folder's image, resized
    assert torch.equal(data.train.images.float().mean((1, 2, 3)), 5.0 * data.train.labels.float())
    assert sorted(data.test.labels.tolist() + data.defense.labels.tolist()) == [0, 5, 42]
    assert (tmp_path / "gtsrb" / "bdlab-16px.safetensors").is_file()
    again = GTSRB(root=tmp_path, download=False, size=16, defense_fraction=0.34).load()
    assert torch.equal(again.train.images, data.train.images)


def test_gtsrb_offline(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GTSRB/Training"):
        GTSRB(root=tmp_path, download=False).load()


@pytest.mark.parametrize("channels", [1, 3])
def test_synthetic_shapes_and_determinism(channels: int) -> None:
    a = Synthetic(classes=5, channels=channels, size=12, train_size=50, test_size=40, seed=3).load()
    b = Synthetic(classes=5, channels=channels, size=12, train_size=50, test_size=40, seed=3).load()
    assert a.train.images.shape == (50, channels, 12, 12) and a.num_classes == 5
    assert torch.equal(a.train.images, b.train.images)
    assert torch.bincount(a.train.labels).tolist() == [10] * 5


@pytest.mark.parametrize("kwargs, field", [({"channels": 2}, "dataset.channels"), ({"size": 4}, "dataset.size"),
                                           ({"defense_fraction": 1.0}, "dataset.defense_fraction")])
def test_synthetic_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Synthetic(**kwargs)
