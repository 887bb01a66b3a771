"""Reading a finished sweep: ``SweepResult.open(folder)`` (pyarrow, lazily; nothing is read until asked)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emovec.sweep.core import SCHEMA, SweepError


class SweepResult:
    """A sweep folder: its manifest, and selections of its rows by example, layer and vector."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.names: list[str] = manifest["names"]
        self.layers: list[int] = manifest["layers"]
        self.pool: str = manifest["pool"]

    @classmethod
    def open(cls, folder: str | Path) -> SweepResult:
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.exists():
            hint = " (it has settings.json: the sweep is unfinished; rerun its command)" if (
                folder / "settings.json").exists() else ""
            raise SweepError(f"{folder} has no manifest.json, so it is not a finished emovec sweep{hint}")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SweepError(f"{path} is unreadable ({error})") from None
        if manifest.get("schema") != SCHEMA:
            raise SweepError(f"{path} is not an {SCHEMA} manifest")
        return cls(folder, manifest)

    @property
    def num_examples(self) -> int:
        return int(self.manifest["totals"]["examples"])

    def dataset(self):
        """The shards as one ``pyarrow.dataset.Dataset`` (lazy; filter and project with pyarrow)."""
        import pyarrow.dataset as ds

        return ds.dataset([str(self.folder / s["file"]) for s in self.manifest["shards"]], format="parquet")

    def table(self, examples: Sequence[int] | None = None, layers: Sequence[int] | None = None,
              vectors: Sequence[str] | None = None):
        """A ``pyarrow.Table`` of the chosen examples (default all), sorted by example (and token/turn), with one
        float column per chosen layer and vector, named ``<vector>@L<layer>``, beside the key columns. Only the
        chosen layers' columns are read from disk."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        layers = list(layers) if layers is not None else list(self.layers)
        vectors = list(vectors) if vectors is not None else list(self.names)
        for layer in layers:
            if layer not in self.layers:
                raise SweepError(f"layer {layer} was not recorded; this sweep has layers {self.layers}")
        for name in vectors:
            if name not in self.names:
                raise SweepError(f"vector {name!r} was not recorded; this sweep has {len(self.names)} vectors "
                                 f"(e.g. {', '.join(self.names[:5])})")
        data = self.dataset()
        keys = [f for f in data.schema.names if not f.startswith("L")]
        filter_ = pc.field("example").isin(list(examples)) if examples is not None else None
        raw = data.to_table(columns=keys + [f"L{layer}" for layer in layers], filter=filter_)
        order = [("example", "ascending")] + [(k, "ascending") for k in ("token", "turn") if k in keys]
        raw = raw.sort_by(order)
        columns = {k: raw.column(k) for k in keys}
        picks = [self.names.index(v) for v in vectors]
        for layer in layers:
            flat = raw.column(f"L{layer}").combine_chunks()
            width = len(self.names)
            matrix = flat.values.to_numpy(zero_copy_only=False).reshape(-1, width) if len(flat) else np.zeros((0, width))
            for name, k in zip(vectors, picks):
                columns[f"{name}@L{layer}"] = pa.array(matrix[:, k].astype(np.float32))
        return pa.table(columns)

    def to_pandas(self, **selection):
        """:meth:`table` as a pandas DataFrame."""
        return self.table(**selection).to_pandas()
