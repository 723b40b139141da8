"""Teacher embeddings of a tile set, computed once and shared by the jobs of a sweep over students.

An entry ``<root>/teacher_embeddings/<16 hex of the key's sha256>/`` holds one float32 ``<name>.npy`` per
embedding the teacher gives (``cls``, ``patch``, ...), one row per tile in tile order, and ``key.json``
(the key, each array's shape, dtype and sha256). The entry is built in a temporary folder beside it and
renamed into place with ``key.json`` already inside, so a folder named by the key without ``key.json`` is
never complete. A file lock makes parallel jobs compute it once: the others wait, then read it. An entry
whose key, shapes or checksums disagree (truncated, corrupt, or from another key) is rebuilt with a
warning saying why, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from numpy.lib.format import open_memmap
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from patholite.io import current_umask, write_json
from patholite.progress import Progress

log = logging.getLogger(__name__)

FOLDER = "teacher_embeddings"
KEY_FILE = "key.json"
FORMAT_VERSION = 1


def canonical(key: dict) -> str:
    """The key as the canonical JSON it is hashed and compared as."""
    return json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))


def entry_name(key: dict) -> str:
    """The entry's folder name: 16 hex characters of the sha256 of the canonical key."""
    return hashlib.sha256(canonical(key).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _unusable(entry: Path, key: dict, count: int) -> str | None:
    """Why the entry cannot be reused (None: it can). Reads every file through once for its checksum."""
    try:
        meta = json.loads((entry / KEY_FILE).read_text())
    except FileNotFoundError:
        return f"no {KEY_FILE} (an interrupted build)"
    except (OSError, ValueError) as err:
        return f"{KEY_FILE} is unreadable ({err})"
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        return f"{KEY_FILE} is not of format version {FORMAT_VERSION}"
    if canonical(meta.get("key")) != canonical(json.loads(canonical(key))):
        return "it was built for another key"
    arrays = meta.get("arrays")
    if not isinstance(arrays, dict) or not arrays:
        return f"{KEY_FILE} lists no arrays"
    for name, want in arrays.items():
        path = entry / f"{name}.npy"
        if not path.is_file():
            return f"{path.name} is missing"
        try:
            array = np.load(path, mmap_mode="r")
            shape, dtype = list(array.shape), str(array.dtype)
            del array  # the map is reopened once the file is known good
        except (OSError, ValueError) as err:  # a truncated file fails to map
            return f"{path.name} is unreadable ({err})"
        if shape != want.get("shape") or dtype != want.get("dtype"):
            return f"{path.name} is {dtype} {shape}, not the recorded {want.get('dtype')} {want.get('shape')}"
        if shape[0] != count:
            return f"{path.name} has {shape[0]} rows for {count} tiles"
        if file_sha256(path) != want.get("sha256"):
            return f"{path.name} does not match its recorded sha256 (corrupt)"
    return None


def _open(entry: Path) -> dict[str, np.ndarray]:
    meta = json.loads((entry / KEY_FILE).read_text())
    return {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}


def cached_embeddings(
    root: Path,
    key: dict,
    tiles: Dataset,
    compute: Callable[[Tensor], dict[str, Tensor]],
    batch_size: int,
    num_workers: int = 0,
    log_name: str = "teacher",
) -> dict[str, np.ndarray]:
    """Read-only memory maps ``{name: (N, ...) float32}`` of ``compute`` over ``tiles`` in tile order,
    from the entry of ``key`` under ``root``, computed (once, under a lock) when absent or unusable.

    ``compute`` gets a uint8 batch (B, 3, H, W) and returns named float embeddings (B, ...); ``tiles``
    yields ``image`` or ``(image, index)``; ``key`` must change whenever the tiles or the teacher do."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    entry = Path(root) / FOLDER / entry_name(key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if entry.exists():
            why = _unusable(entry, key, len(tiles))
            if why is None:
                log.info("%s embeddings of %d tiles: from the cache %s", log_name, len(tiles), entry)
                return _open(entry)
            log.warning("%s embeddings cache %s is unusable (%s); computing them again", log_name, entry, why)
        _build(entry, key, tiles, compute, batch_size, num_workers, log_name)
    return _open(entry)


def _build(
    entry: Path,
    key: dict,
    tiles: Dataset,
    compute: Callable[[Tensor], dict[str, Tensor]],
    batch_size: int,
    num_workers: int,
    log_name: str,
) -> None:
    count = len(tiles)
    if count == 0:
        raise ValueError(f"{log_name} embeddings: no tiles to embed")
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        arrays = _fill(tmp, tiles, compute, batch_size, num_workers, log_name)
        mode = 0o666 & ~current_umask()
        meta = {"version": FORMAT_VERSION, "key": key, "count": count, "arrays": {}}
        for name, (shape, dtype) in arrays.items():
            path = tmp / f"{name}.npy"
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(path, mode)  # the umask's mode, as every output (io.atomic_path)
            meta["arrays"][name] = {"shape": shape, "dtype": dtype, "sha256": file_sha256(path)}
        write_json(tmp / KEY_FILE, meta)  # last: it marks the entry complete
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes its folder 0700
        _replace_dir(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s embeddings of %d tiles: cached in %s", log_name, count, entry)


def _fill(
    folder: Path,
    tiles: Dataset,
    compute: Callable[[Tensor], dict[str, Tensor]],
    batch_size: int,
    num_workers: int,
    log_name: str,
) -> dict[str, tuple[list[int], str]]:
    """Write ``compute``'s embeddings of every tile into ``<name>.npy`` memory maps in ``folder``, batch by
    batch, in tile order; their shapes and dtypes."""
    count = len(tiles)
    loader = DataLoader(tiles, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    maps: dict[str, np.memmap] = {}
    done = 0
    with Progress(f"{log_name} embeddings", count, "tiles") as progress, torch.no_grad():
        for batch in loader:
            # row i is the dataset's item i (an unshuffled loader); an item's own index is not checked, so a
            # Subset, whose items keep their parent's indices, is embedded in its own order
            images = batch[0] if isinstance(batch, list | tuple) else batch
            out = compute(images)
            if not maps:
                if not out:
                    raise ValueError(f"{log_name} embeddings: compute returned no embeddings")
                maps = {
                    name: open_memmap(
                        folder / f"{name}.npy", mode="w+", dtype=np.float32, shape=(count, *value.shape[1:])
                    )
                    for name, value in out.items()
                }
            if set(out) != set(maps):
                raise ValueError(
                    f"{log_name} embeddings: compute returned {sorted(out)} after {sorted(maps)}; it must "
                    "return the same names for every batch"
                )
            for name, value in out.items():
                rows = value.detach().to("cpu", torch.float32).numpy()
                if rows.shape != (len(images), *maps[name].shape[1:]):
                    raise ValueError(
                        f"{log_name} embeddings: {name} of a batch of {len(images)} has shape {rows.shape}, "
                        f"expected {(len(images), *maps[name].shape[1:])}"
                    )
                maps[name][done : done + len(rows)] = rows
            done += len(images)
            progress.advance(len(images))
    if done != count:
        raise RuntimeError(f"{log_name} embeddings: the loader gave {done} tiles of {count}")
    shapes = {}
    for name, array in maps.items():
        array.flush()
        shapes[name] = (list(array.shape), str(array.dtype))
        del array
    maps.clear()  # close the maps before the files are checksummed and moved
    return shapes


def _replace_dir(new: Path, entry: Path) -> None:
    """Put folder ``new`` at ``entry``; an old entry is moved aside first (a folder cannot be renamed onto a
    non-empty one), then removed. Readers hold the lock, so none sees the gap."""
    if entry.exists():
        old = entry.with_name(f".{entry.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(entry, old)
        os.rename(new, entry)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, entry)
