"""CAMELYON16 lymph-node whole slides: Normal vs Tumor tiles from the ASAP lesion annotations; the official
test set, validation drawn by slide from training."""

from __future__ import annotations

from pathlib import Path

from patholite.data.images import headerless_rows, require_path, shown
from patholite.data.slides import NORMAL, SlideDataModule, SlideEntry
from patholite.errors import DatasetError
from patholite.wsi.annotations import CAMELYON16_CLASS_MAP, find_annotation

_C16_LAYOUT = (
    "Expected the CAMELYON16 layout: training/normal/normal_NNN.tif, training/tumor/tumor_NNN.tif, "
    "training/lesion_annotations/tumor_NNN.xml, testing/images/test_NNN.tif, testing/lesion_annotations/"
    "test_NNN.xml (tumour test slides; ASAP XML, or QuPath GeoJSON as tumor_NNN.geojson) and "
    "testing/reference.csv (header-less rows "
    "'test_NNN,Tumor|Normal,...'). Get it from https://camelyon17.grand-challenge.org/Data/ and set "
    "dataset.root to the folder holding training/ and testing/"
)


def _tifs(folder: Path, prefix: str) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in (".tif", ".tiff") and p.stem.startswith(prefix)
    )


class Camelyon16DataModule(SlideDataModule):
    """CAMELYON16 lymph-node slides: Normal vs Tumor tiles; the official test set, val drawn from training."""

    def default_class_names(self) -> list[str]:
        return [NORMAL, "Tumor"]

    def class_map(self) -> dict[str, str]:
        return dict(CAMELYON16_CLASS_MAP)

    def _folder(self, relative: str) -> Path:
        return require_path(self.root / relative, "dataset=camelyon16", _C16_LAYOUT, directory=True)

    def list_slides(self) -> list[SlideEntry]:
        require_path(self.root, "dataset=camelyon16", _C16_LAYOUT, directory=True)
        lesions = self._folder("training/lesion_annotations")
        entries = [SlideEntry(p, None, NORMAL) for p in _tifs(self._folder("training/normal"), "normal")]
        for p in _tifs(self._folder("training/tumor"), "tumor"):
            hint = f"Every tumour slide needs its lesion annotations. {_C16_LAYOUT}"
            # ASAP XML as published, or the regions redrawn in QuPath (GeoJSON)
            xml = find_annotation(lesions, p.stem) or require_path(
                lesions / f"{p.stem}.xml", "dataset=camelyon16", hint
            )
            entries.append(SlideEntry(p, xml, "Tumor"))
        if not entries:
            raise DatasetError(
                f"dataset=camelyon16: no training slides in {self.root}/training. {_C16_LAYOUT}"
            )
        return entries + self._test_slides()

    def _test_slides(self) -> list[SlideEntry]:
        images = self._folder("testing/images")
        reference = _reference(
            require_path(self.root / "testing/reference.csv", "dataset=camelyon16", _C16_LAYOUT)
        )
        slides = {p.stem.lower(): p for p in _tifs(images, "test")}
        unlisted, missing = sorted(set(slides) - set(reference)), sorted(set(reference) - set(slides))
        if unlisted or missing:
            raise DatasetError(
                f"dataset=camelyon16: testing/reference.csv and {images} disagree: slides without a row: "
                f"{shown(unlisted) or 'none'}; rows without a slide: {shown(missing) or 'none'}. "
                f"{_C16_LAYOUT}"
            )
        lesions = self._folder("testing/lesion_annotations") if "Tumor" in reference.values() else None
        entries = []
        for stem, path in sorted(slides.items()):
            xml = None if lesions is None else find_annotation(lesions, path.stem)
            # the official test annotations are not complete: a tumour slide without them keeps its
            # slide-level row (slide_table) but gives no tiles
            tileable = xml is not None or reference[stem] == NORMAL
            entries.append(SlideEntry(path, xml, reference[stem], "test", tileable=tileable))
        return entries


def _reference(path: Path) -> dict[str, str]:
    """Lower-case slide id -> Normal | Tumor, from CAMELYON16's header-less testing/reference.csv."""
    out: dict[str, str] = {}
    for line_no, row in headerless_rows(path):
        label = row[1].capitalize() if len(row) >= 2 else ""
        if label not in (NORMAL, "Tumor") or not row[0] or row[0].lower() in out:
            raise DatasetError(
                f"dataset=camelyon16: {path} line {line_no} is {row}; expected 'test_NNN,Tumor' or "
                "'test_NNN,Normal' (more columns allowed), each slide once, no header"
            )
        out[row[0].lower()] = label
    if not out:
        raise DatasetError(f"dataset=camelyon16: {path} lists no slides. {_C16_LAYOUT}")
    return out
