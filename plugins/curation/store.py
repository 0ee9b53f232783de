"""Content-addressed dataset folders under ``<state_dir>/datasets/<hash>``, and what the CLI
shows of them.

A folder holds, for each non-empty split (``train``, ``validation``, ``forgetting``,
``dpo_train``, ``dpo_validation``), ``<split>.jsonl`` and ``<split>.parquet`` (the same rows),
``lineage.txt`` (every event id the rows came from, one a line) and ``manifest.json`` (role,
log positions, sizes, balance, rehearsal, the recipe and chat template that made it, and the
SHA-256 of every JSONL file and of the lineage). The dataset's hash is the SHA-256 of the
manifest, so it addresses the canonical content (the Parquet files are the same rows in
another encoding). Nothing in a folder holds a time or a path, so the same rows give the same
bytes. Files are written into a temporary folder that is renamed into place when complete:
a folder under its hash is always whole.

Load a dataset with ``datasets.load_dataset("json", data_files=...)`` or ``"parquet"``, or
``load_dataset_dict(settings, hash)``.

A dataset superseded because data in it was forgotten is removed whole (``remove_dataset``):
its rows held the forgotten text.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import orjson

from flywheel_loop.engine.config import Settings
from flywheel_loop.plugins.curation.recipe import BuiltDataset
from flywheel_loop.plugins.shared.datasets import (
    FORMAT,
    SPLITS,
    dataset_root,
    find_dataset,
    read_manifest,
)

__all__ = [
    "export_dataset",
    "list_datasets",
    "load_dataset_dict",
    "remove_dataset",
    "show_dataset",
    "write_dataset",
]

def _arrow_schema(split: str) -> Any:
    import pyarrow as pa

    common = [
        pa.field("id", pa.string()),
        pa.field("event_id", pa.string()),
        pa.field("role", pa.string()),
        pa.field("domain", pa.string()),
        pa.field("complexity", pa.string()),
        pa.field("tests", pa.string()),
    ]
    if split.startswith("dpo"):
        return pa.schema(
            [
                *common,
                pa.field("feedback_id", pa.string()),
                pa.field("prompt", pa.string()),
                pa.field("chosen", pa.string()),
                pa.field("rejected", pa.string()),
            ]
        )
    message = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
    return pa.schema(
        [
            *common,
            pa.field("messages", pa.list_(message)),
            pa.field("prompt", pa.string()),
            pa.field("completion", pa.string()),
            pa.field("text", pa.string()),
            pa.field("reward", pa.float64()),
            pa.field("source", pa.string()),
            pa.field("rehearsal", pa.bool_()),
        ]
    )


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) + b"\n" for r in rows)


def _parquet(split: str, rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_arrow_schema(split))
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def render(built: BuiltDataset) -> tuple[str, dict[str, bytes]]:
    """(hash, relative file name -> bytes) of a built dataset."""
    files: dict[str, bytes] = {}
    split_info: dict[str, Any] = {}
    for split in SPLITS:
        rows = built.splits.get(split) or []
        if not rows:
            continue
        body = _jsonl(rows)
        files[f"{split}.jsonl"] = body
        files[f"{split}.parquet"] = _parquet(split, rows)
        split_info[split] = {
            "rows": len(rows),
            "jsonl": f"{split}.jsonl",
            "parquet": f"{split}.parquet",
            "sha256": _sha(body),
        }
    lineage = "".join(f"{i}\n" for i in built.lineage).encode()
    files["lineage.txt"] = lineage
    manifest = {
        "format": FORMAT,
        "role": built.role,
        "log_position": built.position,
        "previous_position": built.previous_position,
        "sizes": built.sizes,
        "balance": [r.model_dump() for r in built.balance],
        "rehearsal_share": built.rehearsal_share,
        "splits": split_info,
        "lineage": {"file": "lineage.txt", "count": len(built.lineage), "sha256": _sha(lineage)},
        **built.identity,
    }
    body = orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"
    files["manifest.json"] = body
    return _sha(body), files


def write_dataset(built: BuiltDataset, root: Path) -> tuple[str, Path]:
    """Write ``built`` under ``root/<hash>`` (atomically; an existing folder is the same
    content and is kept); return (hash, folder)."""
    digest, files = render(built)
    final = root / digest
    if (final / "manifest.json").is_file():
        return digest, final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{digest[:12]}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        for name, data in sorted(files.items()):
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return digest, final


def remove_dataset(root: Path, digest: str) -> bool:
    """Delete the folder of dataset ``digest`` under ``root`` (renamed away first, so no reader
    ever sees half a folder under its hash); False when there was none."""
    folder = root / digest
    if not folder.is_dir():
        return False
    doomed = root / f".removed-{digest[:12]}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, doomed)
    shutil.rmtree(doomed)
    return True


def datasets(settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    """(hash, manifest) of every dataset, by role then log position."""
    root = dataset_root(settings)
    folders = [p for p in root.glob("*") if (p / "manifest.json").is_file()] if root.is_dir() else []
    found = [(p.name, read_manifest(p)) for p in folders]
    return sorted(found, key=lambda item: (item[1]["role"], item[1]["log_position"], item[0]))


def list_datasets(settings: Settings) -> Any:
    """A rich table of every dataset: hash, role, log positions, sizes, rehearsal, lineage."""
    from rich.table import Table

    table = Table(title=f"datasets in {dataset_root(settings)}")
    for col in ("hash", "role", "positions", "train", "val", "rehearsal", "forgetting", "dpo", "lineage"):
        table.add_column(col, justify="right" if col not in ("hash", "role") else "left")
    for digest, m in datasets(settings):
        s = m["sizes"]
        table.add_row(
            digest[:16],
            m["role"],
            f"{m['previous_position']}..{m['log_position']}",
            str(s.get("train", 0)),
            str(s.get("validation", 0)),
            f"{s.get('rehearsal', 0)} ({m['rehearsal_share']:.1%})",
            str(s.get("forgetting", 0)),
            str(s.get("dpo_train", 0) + s.get("dpo_validation", 0)),
            f"{m['lineage']['count']} events",
        )
    return table


def show_dataset(settings: Settings, hash_prefix: str, samples: int = 3) -> list[Any]:
    """Rich renderables for one dataset: a summary, the balance table, sample rows."""
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    folder = find_dataset(settings, hash_prefix)
    m = read_manifest(folder)
    summary = Table.grid(padding=(0, 2))
    summary.add_row("hash", folder.name)
    summary.add_row("role", m["role"])
    summary.add_row("log positions", f"after {m['previous_position']} up to {m['log_position']}")
    summary.add_row("chat template", m["chat_template"]["base_model"])
    summary.add_row("sizes", ", ".join(f"{k} {v}" for k, v in m["sizes"].items()))
    summary.add_row("rehearsal", f"{m['sizes'].get('rehearsal', 0)} rows, {m['rehearsal_share']:.2%} of train")
    summary.add_row("folder", str(folder))
    balance = Table(title="balance per (role, domain, complexity)")
    for col in ("role", "domain", "complexity", "available", "kept"):
        balance.add_column(col, justify="right" if col in ("available", "kept") else "left")
    for r in m["balance"]:
        balance.add_row(escape(r["role"]), escape(r["domain"]), escape(r["complexity"]), str(r["available"]),
                        str(r["kept"]))
    out: list[Any] = [Panel(summary, title="dataset"), balance]
    train = folder / "train.jsonl"
    if train.is_file():
        with open(train, "rb") as fh:
            for _, line in zip(range(samples), fh, strict=False):
                r = orjson.loads(line)
                tag = " [rehearsal]" if r.get("rehearsal") else ""
                body = Text()  # plain Text: placeholders such as [EMAIL] are not markup
                body.append("prompt\n", style="bold")
                body.append(r["messages"][0]["content"][:400] + "\n")
                body.append("target\n", style="bold")
                body.append(r["messages"][1]["content"][:400])
                title = Text(f"{r['id']} ({r['source']}{tag}, reward {r['reward']})")
                out.append(Panel(body, title=title))
    return out


def load_dataset_dict(settings: Settings, hash_prefix: str) -> Any:
    """The dataset as a ``datasets.DatasetDict`` (one entry per non-empty split), from Parquet."""
    from datasets import load_dataset

    folder = find_dataset(settings, hash_prefix)
    m = read_manifest(folder)
    files = {split: str(folder / info["parquet"]) for split, info in m["splits"].items()}
    return load_dataset("parquet", data_files=files)


def export_dataset(settings: Settings, hash_prefix: str, format: str, out: Path) -> Path:
    """Copy a dataset out: ``jsonl`` or ``parquet`` (the split files, the manifest and the
    lineage into the folder ``out``) or ``hf`` (``DatasetDict.save_to_disk(out)``)."""
    folder = find_dataset(settings, hash_prefix)
    m = read_manifest(folder)
    if format not in ("jsonl", "parquet", "hf"):
        raise ValueError(f"format must be jsonl, parquet or hf, not {format!r}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    if format == "hf":
        load_dataset_dict(settings, folder.name).save_to_disk(str(out))
        return out
    out.mkdir(parents=True, exist_ok=True)
    for info in m["splits"].values():
        shutil.copyfile(folder / info[format], out / info[format])
    for name in ("manifest.json", "lineage.txt"):
        shutil.copyfile(folder / name, out / name)
    return out
