"""Every malformed dataset stops setup() with a DatasetError that names the path and what was expected."""

from __future__ import annotations

import csv
import gc
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from omegaconf import OmegaConf

from patholite.config.schema import BachConfig, CifarConfig, ImageFolderConfig, Isic2018Config, MedmnistConfig
from patholite.data import build_datamodule
from patholite.errors import DatasetError
from tests.fixtures_data import ISIC, make_bach, make_cifar, make_image_folder, make_isic, make_medmnist

GT = f"{ISIC}_Training_GroundTruth/{ISIC}_Training_GroundTruth.csv"


def _setup(schema, **kw):
    dm = build_datamodule(OmegaConf.structured(schema(image_size=32, batch_size=4, **kw)))
    dm.setup()
    return dm


def _fails(schema, *words: str, **kw) -> str:
    with pytest.raises(DatasetError) as err:
        _setup(schema, **kw)
    message = str(err.value)
    for w in words:
        assert str(w) in message, message
    return message


def _rewrite_csv(path: Path, edit) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(edit(rows))


# ------------------------------------------------------------------------------------------- missing data
@pytest.mark.parametrize(
    ("schema", "kw", "words"),
    [
        (BachConfig, {}, ["zenodo"]),
        (Isic2018Config, {}, ["isic-archive.com"]),
        (CifarConfig, {}, ["cifar-10-batches-py", "cs.toronto.edu"]),
        (ImageFolderConfig, {}, ["<root>/<class>/<image>"]),
        (MedmnistConfig, {}, ["pathmnist.npz", "medmnist.com"]),
    ],
)
def test_missing_root(tmp_path, schema, kw, words):
    _fails(schema, str(tmp_path / "nowhere"), *words, root=str(tmp_path / "nowhere"), **kw)


def test_root_unset():
    with pytest.raises(DatasetError, match="dataset.root"):
        _setup(BachConfig, root=None)


# ------------------------------------------------------------------------------------------------- BACH
def test_bach_root_pointing_at_photos(tmp_path):
    root = make_bach(tmp_path / "bach")
    _fails(BachConfig, f"dataset.root={root}", root=str(root / "Photos"))


def test_bach_csv_lists_a_missing_photo(tmp_path):
    root = make_bach(tmp_path / "bach")
    (root / "Photos" / "Benign" / "b002.tif").unlink()
    _fails(BachConfig, "microscopy_ground_truth.csv", "b002.tif", "missing", root=str(root))


def test_bach_csv_disagrees_with_folders(tmp_path):
    root = make_bach(tmp_path / "bach")
    shutil.move(root / "Photos" / "Benign" / "b001.tif", root / "Photos" / "Normal" / "b001.tif")
    _fails(BachConfig, "disagrees", "b001.tif: CSV says Benign, folder Normal", root=str(root))


def test_bach_bad_csv_line(tmp_path):
    root = make_bach(tmp_path / "bach")
    csv_path = root / "Photos" / "microscopy_ground_truth.csv"
    csv_path.write_text("image,label\n" + csv_path.read_text())
    _fails(BachConfig, str(csv_path), "line 1", "no header", root=str(root))


def test_bach_tiles_and_modes(tmp_path):
    root = make_bach(tmp_path / "bach", size=(64, 48))
    _fails(BachConfig, "tile_size=64", "(64x48)", "Photos", root=str(root), mode="tile", tile_size=64)
    _fails(BachConfig, "'crop'", root=str(root), mode="crop")
    _fails(BachConfig, "val_fraction", root=str(root), val_fraction=0.0)


# ------------------------------------------------------------------------------------------------- ISIC
def test_isic_missing_ground_truth(tmp_path):
    root = make_isic(tmp_path / "isic", n=14)
    (root / GT).unlink()
    _fails(Isic2018Config, str(root / GT), root=str(root))


def test_isic_wrong_header(tmp_path):
    root = make_isic(tmp_path / "isic", n=14)
    _rewrite_csv(
        root / GT,
        lambda rows: (
            [["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC", "UNK"]]
            + [r + ["0.0"] for r in rows[1:]]
        ),
    )
    _fails(Isic2018Config, str(root / GT), "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC", root=str(root))


@pytest.mark.parametrize(
    "row",
    [
        ["1.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0"],
        ["0.0"] * 7,
        ["0.5", "0.5", "0.0", "0.0", "0.0", "0.0", "0.0"],
        ["x"] * 7,
    ],
)
def test_isic_non_one_hot_row(tmp_path, row):
    root = make_isic(tmp_path / "isic", n=14)
    _rewrite_csv(root / GT, lambda rows: rows[:3] + [[rows[3][0], *row]] + rows[4:])
    _fails(Isic2018Config, str(root / GT), "line 4", "one-hot", root=str(root))


def test_isic_listed_image_missing(tmp_path):
    root = make_isic(tmp_path / "isic", n=14)
    (root / f"{ISIC}_Training_Input" / "ISIC_0024310.jpg").unlink()
    _fails(Isic2018Config, "ISIC_0024310", f"{ISIC}_Training_Input", root=str(root))


def test_isic_half_present_official_part(tmp_path):
    root = make_isic(tmp_path / "isic", n=14, with_official_splits=True)
    shutil.rmtree(root / f"{ISIC}_Test_GroundTruth")
    _fails(Isic2018Config, f"{ISIC}_Test_GroundTruth.csv", "test ground truth", root=str(root))


def test_isic_bad_groupings(tmp_path):
    root = make_isic(tmp_path / "isic", n=14)
    groups = root / f"{ISIC}_Training_LesionGroupings.csv"
    _rewrite_csv(groups, lambda rows: [["image", "lesion"]] + [r[:2] for r in rows[1:]])
    _fails(Isic2018Config, str(groups), "lesion_id", root=str(root))
    _rewrite_csv(groups, lambda rows: [["image", "lesion_id"]] + rows[2:])
    _fails(Isic2018Config, str(groups), "ISIC_0024306", root=str(root))
    _fails(
        Isic2018Config, "dataset.lesion_groups_csv", root=str(root), lesion_groups_csv=str(tmp_path / "x.csv")
    )


def test_isic_truncated_jpeg_fails_in_a_worker_as_dataset_error(tmp_path):
    # torch re-raises a worker's exception as its class, built from one message: ours must survive that.
    root = make_isic(tmp_path / "isic", n=14, with_official_splits=True, official_per_class=1)
    dm = _setup(Isic2018Config, root=str(root), num_workers=1)
    bad = Path(dm.splits["test"].paths[0])
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DatasetError) as err:
        list(dm.test_dataloader())
    message = str(err.value)
    assert str(bad) in message and "truncated" in message
    # torch needs ~5 s to shut a worker down after it failed; pay it here, not in the next test.
    del err, dm
    gc.collect()


# --------------------------------------------------------------------------------------------- MedMNIST
def test_medmnist_missing_keys(tmp_path):
    path = make_medmnist(tmp_path / "pathmnist.npz")
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files if not k.startswith("val_")}
    np.savez(path, **arrays)
    _fails(MedmnistConfig, str(path), "val_images", "val_labels", root=str(tmp_path))


def test_medmnist_presets(tmp_path):
    make_medmnist(tmp_path / "organmnist.npz", preset="organmnist", num_classes=3)
    _fails(MedmnistConfig, "organmnist", "dataset.class_names", root=str(tmp_path), preset="organmnist")
    _fails(MedmnistConfig, "multi-label", root=str(tmp_path), preset="chestmnist")
    _fails(MedmnistConfig, "3-D", root=str(tmp_path), preset="organmnist3d")
    make_medmnist(tmp_path / "pathmnist.npz")
    _fails(MedmnistConfig, "2 names", "9 classes", root=str(tmp_path), class_names=["a", "b"])


def test_medmnist_multilabel_labels_and_bad_file(tmp_path):
    path = make_medmnist(tmp_path / "x.npz", num_classes=3)
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["train_labels"] = np.zeros((len(arrays["train_labels"]), 14), np.uint8)
    np.savez(path, **arrays)
    _fails(MedmnistConfig, str(path), "multi-label", npz=str(path))
    path.write_bytes(b"garbage")
    _fails(MedmnistConfig, str(path), "download it again", npz=str(path))


# ------------------------------------------------------------------------------------------------ CIFAR
def test_cifar_missing_batch_and_wrong_variant(tmp_path):
    root = make_cifar(tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    _fails(CifarConfig, "data_batch_3", root=str(root))
    _fails(CifarConfig, "cifar-100-python", root=str(root), variant="cifar100")
    _fails(CifarConfig, "'cifar1000'", root=str(root), variant="cifar1000")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_pickle_that_runs_code_is_refused(tmp_path, capsys):
    root = make_cifar(tmp_path)
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    _fails(CifarConfig, str(batch), "refusing to construct", "print", root=str(root))
    assert "pwned" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- image folder
def test_image_folder_splits_with_different_classes(tmp_path):
    root = make_image_folder(tmp_path / "if", with_splits=True)
    shutil.rmtree(root / "test" / "stroma")
    _fails(ImageFolderConfig, "different classes", "test/: ['lymphocytes', 'tumor']", root=str(root))


def test_image_folder_layout_mistakes(tmp_path):
    root = make_image_folder(tmp_path / "if", with_splits=True)
    (root / "extra").mkdir()
    _fails(ImageFolderConfig, "mixes split folders", "extra", root=str(root))
    root = make_image_folder(tmp_path / "if2")
    for f in (root / "tumor").iterdir():
        f.unlink()
    _fails(ImageFolderConfig, str(root / "tumor"), "no images", root=str(root))
    root = make_image_folder(tmp_path / "if3")
    _fails(
        ImageFolderConfig,
        "class_names",
        "['lymphocytes', 'stroma', 'tumor']",
        root=str(root),
        class_names=["lymphocytes", "stroma", "necrosis"],
    )


# ------------------------------------------------------------------------------------- early image checks
@pytest.mark.parametrize(
    ("write", "words"),
    [
        (lambda p: tifffile.imwrite(p, np.zeros((8, 8), np.float32)), ["floating-point"]),
        (lambda p: tifffile.imwrite(p, np.zeros((3, 8, 8), np.uint8), photometric="minisblack"), ["pages"]),
        (lambda p: p.write_bytes(b"not an image at all"), ["not a readable TIFF"]),
    ],
    ids=["float", "multi-page", "garbage"],
)
def test_unconvertible_images_fail_at_setup_not_in_a_worker(tmp_path, write, words):
    root = make_image_folder(tmp_path / "folder", per_class=4)
    bad = root / "stroma" / "odd.tif"
    write(bad)
    _fails(ImageFolderConfig, str(bad), *words, root=str(root))
    # and a user who knows better can skip the header pass
    dm = _setup(ImageFolderConfig, root=str(root), verify_images=False)
    assert str(bad) in [p for s in dm.splits.values() for p in s.paths]
