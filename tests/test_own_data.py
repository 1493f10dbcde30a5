"""Own data: a folder of images in torchvision's ImageFolder layout and a safetensors file of tensors. Images are
decoded once and cached by the folder's content; what cannot make a dataset is refused in one line naming the
field and the fix, exit 2, nothing written."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bdlab.attacks.base import PoisonedSet
from bdlab.cache import file_digest
from bdlab.compose import compose_config
from bdlab.datasets import ImageFolder, TensorFile
from bdlab.datasets import image_folder as image_folder_module
from bdlab.errors import ConfigError
from bdlab.export import save_poisoned_set
from bdlab.run import cli
from bdlab.services import model_spec
from tests.conftest import make_splits
from tests.test_bad_input import assert_refused

CLASSES = ("cat", "dog", "emu")
# a small, fast run: LeNet, one epoch
RUN = ["model=lenet", "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
       "logger=none"]
# 32x32 RGB, a third of the test images held out (STRIP's overlays)
FOLDER = ["dataset=image_folder", "dataset.size=32", "dataset.defense_fraction=0.3"]


def write_tree(root: Path, per_class: int = 30, splits: tuple[str, ...] = ("train", "test"),
               classes: tuple[str, ...] = CLASSES, mode: str = "RGB", size: int = 40) -> Path:
    """PNG files ``root/<split>/<class>/NNN.png`` (``split`` "" for one folder of classes): class ``c`` is
    noise around a colour of its own, so a small model tells the classes apart."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            tint = np.full(3, 60.0)
            tint[c % 3] = 200.0
            for i in range(per_class):
                pixels = np.clip(tint + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).convert(mode).save(folder / f"{i:03d}.png")
    return root


def cache_files(cache: Path) -> list[Path]:
    return [path for path in cache.rglob("*") if path.is_file()] if cache.exists() else []


def test_a_train_test_tree_is_decoded_resized_and_named(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "pets")
    Image.new("RGB", (40, 40), (10, 20, 30)).save(root / "train" / "dog" / "000.png")
    data = ImageFolder(root, size=32, cache_dir=tmp_path / "cache").load()
    assert data.name == "pets" and data.class_names == CLASSES and data.num_classes == 3
    assert data.train.images.shape == (90, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.train.labels.bincount().tolist() == [30, 30, 30]
    assert len(data.defense) + len(data.test) == 90 and data.class_name(2) == "emu"
    # files in sorted order, class by class: dog/000.png is the 31st; a flat colour survives the resize
    assert torch.equal(data.train.images[30], torch.tensor([10, 20, 30], dtype=torch.uint8)[:, None, None]
                       .expand(3, 32, 32))
    assert data.train.images[data.train.labels == 1][1:, 1].float().mean() > 150  # dog's tint is green
    assert len(data.fingerprint) == 40
    oblong = ImageFolder(root, size=[24, 36], cache_dir=tmp_path / "cache").load()
    assert oblong.train.images.shape == (90, 3, 24, 36) and oblong.fingerprint == data.fingerprint


def test_one_folder_is_split_by_a_seeded_stratified_fraction(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "pets", per_class=20, splits=("",))
    cache = tmp_path / "cache"
    first, again, other = (ImageFolder(root, test_fraction=0.25, split_seed=seed, cache_dir=cache).load()
                           for seed in (0, 0, 1))
    assert first.train.labels.bincount().tolist() == [15, 15, 15]
    assert torch.cat([first.defense.labels, first.test.labels]).bincount().tolist() == [5, 5, 5]
    assert torch.equal(first.test.images, again.test.images)
    assert not torch.equal(first.test.images, other.test.images)


def test_grey_16_bit_and_alpha_images(tmp_path: Path) -> None:
    grey = write_tree(tmp_path / "grey", per_class=4, mode="L")
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(grey / "train" / "cat" / "000.png")
    data = ImageFolder(grey, cache_dir=tmp_path / "cache").load()
    assert data.channels == 1 and int(data.train.images[0].min()) == 40000 >> 8  # scaled to 8 bits, not clipped
    as_rgb = ImageFolder(grey, channels=3, cache_dir=tmp_path / "cache").load()
    assert as_rgb.channels == 3 and torch.equal(as_rgb.train.images[:, 0], as_rgb.train.images[:, 2])
    rgb = write_tree(tmp_path / "rgb", per_class=4)
    Image.new("RGBA", (40, 40), (200, 10, 10, 0)).save(rgb / "test" / "emu" / "000.png")  # alpha is dropped
    data = ImageFolder(rgb, cache_dir=tmp_path / "cache").load()
    assert data.channels == 3 and data.train.images.shape[0] == 12


def test_mixed_channel_counts_are_refused_unless_converted(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "pets", per_class=4)
    odd = root / "test" / "dog" / "000.png"
    Image.new("L", (40, 40), 128).save(odd)
    with pytest.raises(ConfigError) as info:
        ImageFolder(root, cache_dir=tmp_path / "cache").load()
    assert info.value.field == "dataset.channels" and "1 grey and 23 colour" in str(info.value)
    assert str(odd) in str(info.value) and "dataset.channels=1 or 3" in str(info.value)
    assert not cache_files(tmp_path / "cache")
    assert ImageFolder(root, channels=3, cache_dir=tmp_path / "cache").load().channels == 3


def test_the_cache_is_reused_and_a_changed_file_is_a_new_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = write_tree(tmp_path / "pets", per_class=4), tmp_path / "cache"
    decoded: list[Path] = []
    decode = image_folder_module.decode
    monkeypatch.setattr(image_folder_module, "decode", lambda path, *args: decoded.append(path) or decode(path, *args))
    first = ImageFolder(root, cache_dir=cache).load()
    again = ImageFolder(root, cache_dir=cache).load()
    assert len(decoded) == 24 and torch.equal(first.train.images, again.train.images)
    Image.new("RGB", (40, 40), (0, 0, 0)).save(root / "train" / "cat" / "001.png")
    changed = ImageFolder(root, cache_dir=cache).load()
    assert len(decoded) == 48 and changed.fingerprint != first.fingerprint
    assert len(list((cache / "datasets" / "image_folder").glob("*/tensors.safetensors"))) == 2
    # the models trained on them are keyed by the content too, never by where the folder is
    cfg = compose_config([*RUN, *FOLDER, f"dataset.root={root}"])
    moved = compose_config([*RUN, *FOLDER, f"dataset.root={tmp_path / 'elsewhere'}"])
    assert model_spec(cfg, True, first.fingerprint) == model_spec(moved, True, first.fingerprint)
    assert model_spec(cfg, True, first.fingerprint) != model_spec(cfg, True, changed.fingerprint)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_png_is_refused_naming_the_file(damage: str, tmp_path: Path) -> None:
    root = write_tree(tmp_path / "pets", per_class=4)
    broken = root / "train" / "emu" / "002.png"
    broken.write_bytes(b"not an image" if damage == "garbage" else broken.read_bytes()[:200])
    with pytest.raises(ConfigError) as info:
        ImageFolder(root, cache_dir=tmp_path / "cache").load()
    assert info.value.field == "dataset.root" and str(broken) in str(info.value) and "\n" not in str(info.value)
    assert not cache_files(tmp_path / "cache")


def test_an_exported_file_is_a_dataset(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.arange(60) % 3
    path = tmp_path / "poisoned.safetensors"
    save_poisoned_set(PoisonedSet(images, labels, labels == 0), path, {"class_names": json.dumps(list(CLASSES))})
    data = TensorFile(path=path).load()
    assert data.name == "poisoned" and data.class_names == CLASSES and data.num_classes == 3
    assert data.train.labels.bincount().tolist() == [16, 16, 16]  # a stratified 20% held out
    assert len(data.defense) + len(data.test) == 12 and data.fingerprint == file_digest(path)
    # with a test split of its own, and the names separated by commas (as bdlab.from_tensors writes them)
    test = {"test_images": images[:20].clone(), "test_labels": labels[:20].clone()}  # safetensors refuses shared memory
    save_file({"images": images, "labels": labels, **test}, str(path), metadata={"class_names": "a,b,c"})
    data = TensorFile(path=path).load()
    assert torch.equal(data.train.images, images) and len(data.defense) + len(data.test) == 20
    assert data.class_names == ("a", "b", "c")


def test_badnets_and_strip_on_an_image_folder_end_to_end_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    root = write_tree(tmp_path / "pets")

    def run(name: str) -> dict:
        monkeypatch.setattr(sys, "argv", ["bdlab.run", *RUN, *FOLDER, f"dataset.root={root}", "attack=badnets",
                                          "defense=strip", "defense.num_overlays=16", f"cache_dir={tmp_path / 'cache'}",
                                          f"hydra.run.dir={tmp_path / name}", "hydra/job_logging=none",
                                          "hydra/hydra_logging=none"])
        cli()
        return json.loads((tmp_path / name / "results.json").read_text())

    first = run("one")
    assert first["status"] == "ok" and first["dataset"] == "pets" and first["class_names"] == list(CLASSES)
    assert {"trojan/acc", "trojan/asr", "defense/tpr", "defense/roc_auc"} <= set(first["metrics"])
    picture = Image.open(tmp_path / "one" / "trigger_examples.png")
    assert picture.height > 2 * 4 * 32 + 3 * 4  # two rows of 4x tiles, and a caption band under each
    # the second run decodes nothing and trains nothing
    monkeypatch.setattr(image_folder_module, "decode", lambda *args: pytest.fail("decoded again"))
    second = run("two")
    assert second["artifacts"]["clean_model"]["reused"] and second["artifacts"]["trojan_model"]["reused"]
    assert second["metrics"]["trojan/asr"] == first["metrics"]["trojan/asr"]
    assert "pets / lenet / badnets / strip" in capsys.readouterr().out


def test_per_class_tables_name_the_classes(tmp_path: Path) -> None:
    from bdlab.defenses.model_inspection.base import write_per_class_table

    data = dataclasses.replace(make_splits(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.arange(3), 3),
                               class_names=CLASSES)
    metrics = {"defense/per_class/score": [1.0, 2.0, 3.0], "defense/per_class/aiv": [0.5, 0.0, 4.0],
               "defense/clean_per_class/score": [9.0, 9.0, 9.0], "defense/aiv_max": 4.0}
    path = write_per_class_table(metrics, "defense/", data, tmp_path / "inspection_trojan.csv")
    assert path.read_text().splitlines() == ["class,class_name,score,aiv", "0,cat,1.0,0.5", "1,dog,2.0,0.0",
                                             "2,emu,3.0,4.0"]


def bad_folder(tmp_path: Path, case: str) -> list[str]:
    """The overrides of one bad image folder, written under ``tmp_path``."""
    root = tmp_path / "pets"
    if case == "empty":
        root.mkdir()
    elif case == "one class":
        write_tree(root, per_class=4, splits=("",), classes=("cat",))
    elif case == "different classes":
        write_tree(root, per_class=4, splits=("train",))
        write_tree(root, per_class=4, splits=("test",), classes=("cat", "dog", "fox"))
    else:
        write_tree(root, per_class=4)
        odd = root / "train" / "dog" / "003.png"
        if case == "unreadable":
            odd.write_bytes(b"\x89PNG garbage")
        else:
            Image.new("L", (40, 40)).save(odd)
    return [*FOLDER, f"dataset.root={root}"]


def bad_tensors(tmp_path: Path, case: str) -> list[str]:
    """The overrides of one bad tensors file, written under ``tmp_path``."""
    images, labels = torch.zeros(20, 3, 16, 16, dtype=torch.uint8), torch.arange(20) % 4
    tensors = {"images": images, "labels": labels}
    metadata = None
    if case in ("no images", "no labels"):
        del tensors[case.split()[1]]
    else:
        metadata = {"class_names": json.dumps(list(CLASSES))}  # 3 names, and labels up to 3
    path = tmp_path / "data.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return ["dataset=tensors", f"dataset.path={path}"]


BAD_OWN_DATA: list[tuple[Callable[[Path, str], list[str]], str, str, str]] = [
    (bad_folder, "empty", "dataset.root", "no images under"),
    (bad_folder, "one class", "dataset.root", "needs at least 2"),
    (bad_folder, "different classes", "dataset.root", "only in test/: fox"),
    (bad_folder, "unreadable", "dataset.root", "003.png"),
    (bad_folder, "mixed channels", "dataset.channels", "003.png"),
    (lambda tmp_path, case: FOLDER, "no root", "dataset.root", "set dataset.root=DIR"),
    (bad_tensors, "no images", "dataset.path", "has no images tensor"),
    (bad_tensors, "no labels", "dataset.path", "has no labels tensor"),
    (bad_tensors, "labels outside", "dataset.path", "5 label(s)"),
]


@pytest.mark.parametrize("write, case, field, words", BAD_OWN_DATA, ids=[case[1] for case in BAD_OWN_DATA])
def test_bad_own_data_is_one_line_exit_2_and_writes_nothing(write: Callable[[Path, str], list[str]], case: str,
                                                            field: str, words: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # what cli() sets, undone after the test
    monkeypatch.setattr(sys, "argv", ["bdlab.run", *RUN, *write(tmp_path, case), f"cache_dir={tmp_path / 'cache'}",
                                      f"hydra.run.dir={tmp_path / 'run'}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as stop:
        cli()
    assert_refused(stop.value.code, capsys.readouterr().err, tmp_path / "run", tmp_path / "cache", field, words)
