"""Read a wandb offline run file (``offline-run-*/run-*.wandb``) without wandb's own reader (0.31 has
none in Python): a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then LevelDB log records in
32 KiB blocks (crc32 4 bytes, length 2, type 1: full / first / middle / last) holding ``Record``
protobufs (``wandb.proto.wandb_internal_pb2``)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B" and struct.unpack("<HB", raw[4:7]) == (0xBEE1, 0), raw[:7]
    out, pos, chunks = [], HEADER, []
    while pos + HEADER <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + HEADER])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        chunks.append(raw[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(chunks))
            out.append(rec)
            chunks = []
    return out


def history_and_config(path: str | Path) -> tuple[list[dict], dict]:
    """The logged rows (``wandb.log``) and the final config (run record + config updates)."""
    rows, config = [], {}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind in ("run", "config"):
            update = rec.run.config.update if kind == "run" else rec.config.update
            for item in update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return rows, config
