"""Reading an offline W&B run back: its ``.wandb`` transaction log, parsed record by record with W&B's own
protobuf schema (``wandb.proto.wandb_internal_pb2.Record``).

wandb >= 0.2x writes the log from its Go core and ships no Python reader, so the framing is read here: a
7-byte file header (``:W&B``, magic 0xBEE1, version 0), then LevelDB-log chunks in 32 KiB blocks, each chunk
``crc32 (4) | length (2) | type (1: full, 2: first, 3: middle, 4: last)`` followed by its bytes.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = struct.Struct("<IHB")


def read_records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), f"{path} is no W&B log"
    records, pending, pos = [], b"", 7
    while pos + HEADER.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER.size:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        crc, length, kind = HEADER.unpack_from(data, pos)
        if kind == 0:  # zero padding up to the next block
            pos += room
            continue
        chunk = data[pos + HEADER.size : pos + HEADER.size + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"corrupt chunk at {pos} in {path}"
        pos += HEADER.size + length
        pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@dataclass
class OfflineRun:
    """What an offline run holds: its run record, summary, history rows, saved files, logged artifacts."""

    folder: Path
    run: Any = None
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    artifacts: list[Any] = field(default_factory=list)
    exit_code: int | None = None

    def logged(self, key: str) -> Any:
        """The last value logged under ``key`` in the history (a dict value, an image's or a table's, comes
        back whole: W&B's core stores it flattened as ``key/<field>``)."""
        for row in reversed(self.history):
            if key in row:
                return row[key]
            fields = {k[len(key) + 1 :]: v for k, v in row.items() if k.startswith(key + "/")}
            if fields:
                return fields
        raise AssertionError(f"{key} was never logged; keys: {sorted({k for r in self.history for k in r})}")

    def media(self, value: dict[str, Any]) -> Path:
        """The file a logged image or table points to, in the run's files folder."""
        return self.folder / "files" / value["path"]


def read_run(folder: Path) -> OfflineRun:
    """The offline run in ``folder`` (``.../wandb/offline-run-*``)."""
    (log,) = Path(folder).glob("run-*.wandb")
    out = OfflineRun(Path(folder))
    for record in read_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.run = record.run
        elif kind == "summary":
            for item in record.summary.update:
                out.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            out.history.append(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "files":
            out.files += [f.path for f in record.files.files]
        elif kind == "artifact":
            out.artifacts.append(record.artifact)
        elif kind == "exit":
            out.exit_code = record.exit.exit_code
    return out


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """Every offline W&B run under ``run_dir``/wandb, once W&B's service has written all it was sent (as
    it has when a job's process exits: a finished run's records may still be in the service's buffers)."""
    import wandb

    wandb.teardown()
    return [read_run(f) for f in sorted((Path(run_dir) / "wandb").glob("offline-run-*"))]
