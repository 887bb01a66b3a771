"""The sweep: readings of chosen vectors at chosen layers over a whole dataset, streamed to Parquet shards.

Layout of an output folder::

    settings.json            what decides the output (a rerun with other settings is refused)
    shards/shard-NNNNNN.parquet   one per chunk of ``chunk_size`` consecutive examples, written atomically
    manifest.json            written last (by rank 0 after a barrier): settings, shards, totals, schema

Chunk ``c`` holds examples ``[c * chunk_size, (c + 1) * chunk_size)`` of the dataset's usable examples; with
``W`` processes, rank ``r`` does the chunks with ``c % W == r``. Shards therefore do not depend on the number of
processes, and a killed run resumes by skipping the shards that exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from emovec.fileio import atomic_write, atomic_write_text
from emovec.layers import find_decoder_layers, resolve_layer_indices
from emovec.runtime import Monitor
from emovec.sweep.inputs import Example, ReadStats, read_examples
from emovec.vectors import VectorSet, config_hash

SCHEMA = "emovec.sweep/1"
POOLS = ("token", "mean", "last", "max", "assistant")


class SweepError(ValueError):
    """A sweep cannot run as asked (settings mismatch, bad options); the message says what to do."""


@dataclass(frozen=True)
class SweepSettings:
    input: str
    format: str | None
    field: str
    messages_field: str
    chat: bool
    layers: tuple[int, ...]
    vectors: tuple[str, ...]
    pool: str
    dtype: str
    measure: str
    max_length: int
    overflow: str
    chunk_size: int
    on_error: str
    model: str
    config_hash: str
    vectors_hash: str

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def vectors_hash(vectors: VectorSet) -> str:
    digest = hashlib.sha256(json.dumps([vectors.names, vectors.layers]).encode())
    digest.update(vectors.vectors.float().numpy().tobytes())
    return digest.hexdigest()[:16]


class _StopForward(Exception):
    pass


class _Recorder(Monitor):
    """A monitor that stops the forward pass after the deepest recorded layer (no later layers, no logits)."""

    def apply(self, position: int, flat: torch.Tensor) -> None:
        super().apply(position, flat)
        if position == len(self.layer_indices) - 1:
            raise _StopForward


@dataclass
class _Piece:
    example: int  # index within the chunk
    ids: list[int]
    offsets: list[tuple[int, int]]
    messages: list[int]  # message index of each token (-1: plain text)
    start: int  # position of the piece's first token in its example (split pieces)


@dataclass
class _Tokens:
    ids: list[int]
    offsets: list[tuple[int, int]]  # characters of each token in the text (or the templated conversation)
    owner: list[int]  # message index of each token (-1: plain text)
    roles: list[str]  # role of each message
    content_starts: list[int]  # character where each message's content begins


def _tokenize(tokenizer, example: Example) -> _Tokens:
    """Tokens of a text, or of a conversation in the model's chat template; a message owns its template header
    and its content (the tokens up to the end of its content)."""
    if example.messages is not None:
        text = tokenizer.apply_chat_template(example.messages, tokenize=False, add_generation_prompt=False)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts, ends, cursor = [], [], 0
        for message in example.messages:
            found = text.find(message["content"], cursor)
            start = found if found >= 0 else cursor
            cursor = start + len(message["content"]) if found >= 0 else cursor
            starts.append(start)
            ends.append(cursor)
        offsets = [tuple(o) for o in encoded["offset_mapping"]]
        owner = [next((i for i, e in enumerate(ends) if start < e), len(ends) - 1) for start, _ in offsets]
        return _Tokens(encoded["input_ids"], offsets, owner, [m["role"] for m in example.messages], starts)
    encoded = tokenizer(example.text, add_special_tokens=True, return_offsets_mapping=True)
    n = len(encoded["input_ids"])
    return _Tokens(encoded["input_ids"], [tuple(o) for o in encoded["offset_mapping"]], [-1] * n, [], [])


def _batches(pieces: list[_Piece], budget: int) -> Iterator[list[int]]:
    """Indices of pieces, longest first, in batches of at most ``budget`` tokens (padding included)."""
    order = sorted(range(len(pieces)), key=lambda i: (-len(pieces[i].ids), i))
    batch: list[int] = []
    for i in order:
        width = len(pieces[batch[0]].ids) if batch else len(pieces[i].ids)
        if batch and (len(batch) + 1) * width > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def _batch_readings(model, tokenizer, vectors: VectorSet, pieces: list[_Piece], layers: list[int], measure: str,
                    budget: int) -> Iterator[tuple[list[int], list[torch.Tensor], int]]:
    """Per batch (longest pieces first): the piece indices, the batch's (B, T, L, K) fp32 readings (cosine or
    projection; row b holds piece batch[b] in its first len(ids) columns, right-padded) and the batch's real tokens.
    The forward pass stops after the deepest chosen layer."""
    device = next(model.parameters()).device
    found = find_decoder_layers(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for batch in _batches(pieces, budget):
        width = max(len(pieces[i].ids) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(pieces[i].ids)
            ids[row, :n] = torch.tensor(pieces[i].ids)
            mask[row, :n] = 1
        recorder = _Recorder(model, vectors, layers, tokenizer=tokenizer)
        with recorder:
            try:
                found.base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _StopForward:
                pass
        # the monitor's own buffers, read once (no MonitorResult: padding is cut per piece below)
        scores = recorder.scores[:, :width]
        values = scores / recorder.norms[:, :width, :, None].clamp(min=1e-12) if measure == "cosine" else scores
        yield batch, values, int(mask.sum())


def _write_chunk(path: Path, examples: list[Example], tokenizer, model, vectors: VectorSet, s: SweepSettings,
                 budget: int, progress: Callable[[int], None] | None) -> dict[str, int]:
    """Readings of one chunk of examples into the Parquet file ``path`` (written atomically; record batches are
    appended as the forward passes go, so memory holds one batch of readings at a time)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats = {"examples": len(examples), "tokens": 0, "truncated": 0, "split": 0, "rows": 0}
    pieces: list[_Piece] = []
    info: list[_Tokens] = []
    for e, example in enumerate(examples):
        tokens = _tokenize(tokenizer, example)
        if len(tokens.ids) > s.max_length:
            if s.overflow == "truncate":
                keep = s.max_length
                tokens = _Tokens(tokens.ids[:keep], tokens.offsets[:keep], tokens.owner[:keep], tokens.roles,
                                 tokens.content_starts)
                stats["truncated"] += 1
            else:
                stats["split"] += 1
        info.append(tokens)
        stats["tokens"] += len(tokens.ids)
        for start in range(0, len(tokens.ids), s.max_length):
            stop = start + s.max_length
            pieces.append(_Piece(e, tokens.ids[start:stop], tokens.offsets[start:stop], tokens.owner[start:stop], start))
    value_type = pa.float16() if s.dtype == "float16" else pa.float32()
    np_dtype = np.float16 if s.dtype == "float16" else np.float32
    schema = pa.schema(_schema(s, value_type))
    K, L = len(s.vectors), len(s.layers)

    def values_column(matrix: np.ndarray):  # (rows, K) -> fixed-size list column
        flat = pa.array(matrix.astype(np_dtype).reshape(-1), type=value_type)
        return pa.FixedSizeListArray.from_arrays(flat, K)

    torch_dtype = torch.float16 if np_dtype == np.float16 else torch.float32

    def layer_column(matrix: np.ndarray):  # contiguous (rows, K) in the stored dtype -> fixed-size list, no copy
        flat = pa.Array.from_buffers(value_type, matrix.size, [None, pa.py_buffer(matrix)])
        return pa.FixedSizeListArray.from_arrays(flat, K)

    # pooled modes: small per-example accumulators; the assistant pool: the positions to read
    sums = np.zeros((len(examples), L, K), dtype=np.float64)
    maxima = np.full((len(examples), L, K), -np.inf, dtype=np.float32)
    lasts = np.zeros((len(examples), L, K), dtype=np.float32)
    markers: dict[tuple[int, int], int] = {}  # (example, token position) -> turn
    if s.pool == "assistant":
        for e, tokens in enumerate(info):
            for turn, role in enumerate(tokens.roles):
                if role != "assistant":
                    continue
                content = next((t for t in range(len(tokens.ids)) if tokens.owner[t] == turn and
                                tokens.offsets[t][1] > tokens.content_starts[turn]), None)
                if content:  # where the turn begins: the token just before its content (the end of its header)
                    markers[(e, content - 1)] = turn
    marked: list[tuple[int, int, int, np.ndarray]] = []

    def write(writer) -> None:
        for batch, values, real in _batch_readings(model, tokenizer, vectors, pieces, list(s.layers), s.measure,
                                                   budget):
            if s.pool == "token":
                columns: dict[str, list] = {name: [] for name in schema.names}
                stacks = []
                for row, i in enumerate(batch):
                    piece, tokens = pieces[i], info[pieces[i].example]
                    n = len(piece.ids)
                    columns["example"] += [examples[piece.example].index] * n
                    columns["token"] += list(range(piece.start, piece.start + n))
                    columns["token_id"] += piece.ids
                    columns["char_start"] += [o[0] for o in piece.offsets]
                    columns["char_end"] += [o[1] for o in piece.offsets]
                    columns["message"] += piece.messages
                    columns["role"] += [tokens.roles[m] if m >= 0 else None for m in piece.messages]
                    stacks.append(values[row, :n])
                # (L, rows, K) in the stored dtype, converted and laid out by torch (multithreaded), then handed to
                # Arrow without another copy
                stacked = torch.cat(stacks).to(torch_dtype).permute(1, 0, 2).contiguous().numpy()
                arrays = [pa.array(columns[name], type=schema.field(name).type) for name in schema.names[:7]]
                arrays += [layer_column(stacked[li]) for li in range(L)]
                writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
                stats["rows"] += stacked.shape[1]
            else:
                for row, i in enumerate(batch):
                    piece = pieces[i]
                    x = values[row, : len(piece.ids)].numpy()
                    e = piece.example
                    sums[e] += x.sum(0)
                    maxima[e] = np.maximum(maxima[e], x.max(0))
                    if piece.start + len(piece.ids) == len(info[e].ids):
                        lasts[e] = x[-1]
                    for t in range(len(piece.ids)):
                        turn = markers.get((e, piece.start + t))
                        if turn is not None:
                            marked.append((e, turn, piece.start + t, x[t]))
            if progress is not None:
                progress(real)
        if s.pool == "token":
            return
        if s.pool == "assistant":
            marked.sort(key=lambda item: (item[0], item[1]))
            rows = marked
            arrays = [pa.array([examples[e].index for e, _, _, _ in rows], pa.int64()),
                      pa.array([turn for _, turn, _, _ in rows], pa.int16()),
                      pa.array([t for _, _, t, _ in rows], pa.int32()),
                      pa.array([len(info[e].ids) for e, _, _, _ in rows], pa.int32())]
            stacked = np.stack([x for _, _, _, x in rows]) if rows else np.zeros((0, L, K), dtype=np.float32)
        else:
            lengths = np.array([max(1, len(t.ids)) for t in info], dtype=np.float64)
            stacked = {"mean": (sums / lengths[:, None, None]).astype(np.float32), "max": maxima, "last": lasts}[s.pool]
            arrays = [pa.array([ex.index for ex in examples], pa.int64()),
                      pa.array([len(t.ids) for t in info], pa.int32())]
        arrays += [values_column(stacked[:, li]) for li in range(L)]
        writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
        stats["rows"] += stacked.shape[0]

    # the readings are close to incompressible (float16/32 noise): no dictionary, no compression for them
    value_names = [f"L{layer}" for layer in s.layers]
    compression = {name: ("none" if name in value_names else "snappy") for name in schema.names}
    dictionary = [name for name in schema.names if name == "role"]

    def write_file(tmp: str) -> None:
        with pq.ParquetWriter(tmp, schema, compression=compression, use_dictionary=dictionary) as writer:
            write(writer)
            writer.add_key_value_metadata({"emovec": json.dumps(stats)})

    atomic_write(path, write_file)
    return stats


def _schema(s: SweepSettings, value_type) -> list:
    import pyarrow as pa

    values = [pa.field(f"L{layer}", pa.list_(value_type, len(s.vectors))) for layer in s.layers]
    if s.pool == "token":
        return [pa.field("example", pa.int64()), pa.field("token", pa.int32()), pa.field("token_id", pa.int32()),
                pa.field("char_start", pa.int32()), pa.field("char_end", pa.int32()), pa.field("message", pa.int16()),
                pa.field("role", pa.string()), *values]
    if s.pool == "assistant":
        return [pa.field("example", pa.int64()), pa.field("turn", pa.int16()), pa.field("token", pa.int32()),
                pa.field("n_tokens", pa.int32()), *values]
    return [pa.field("example", pa.int64()), pa.field("n_tokens", pa.int32()), *values]


def _shard_name(chunk: int) -> str:
    return f"shard-{chunk:06d}.parquet"


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group), from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return 0, 1, False
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=6))
    return rank, world, True


def prepare_folder(out: Path, settings: SweepSettings) -> dict | None:
    """Create ``out`` with settings.json, or check that it holds a sweep with the same settings; the manifest
    when that sweep is already complete."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    path = out / "settings.json"
    record = {"schema": SCHEMA, "key": settings.key(), "settings": json.loads(json.dumps(asdict(settings)))}
    if path.exists():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise SweepError(f"{path} is unreadable; delete {out} or choose another --out") from None
        if existing.get("key") != record["key"]:
            old = existing.get("settings", {})
            changed = sorted(k for k in record["settings"] if old.get(k) != record["settings"][k])
            raise SweepError(f"{out} holds a sweep with other settings (different {', '.join(changed) or 'schema'});"
                             " rerun with the same settings to resume it, or choose another --out")
    else:
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    manifest = out / "manifest.json"
    if manifest.exists():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            if data.get("key") == record["key"]:
                return data
        except (OSError, ValueError):
            pass
    return None


def run_sweep(model, tokenizer, vectors: VectorSet, input_path: str | Path, out: str | Path, *,
              layers: Any = None, names: Sequence[str] | None = None, pool: str = "mean", dtype: str | None = None,
              measure: str = "cosine", fmt: str | None = None, field: str = "text", messages_field: str = "messages",
              chat: bool = False, max_length: int | None = None, overflow: str = "truncate", chunk_size: int = 256,
              batch_tokens: int = 4096, on_error: str = "raise", model_name: str = "",
              progress: bool = True) -> dict[str, Any]:
    """Record ``vectors`` (``names``) at ``layers`` over every example of ``input_path`` into the folder ``out``
    (see the module docstring); returns the manifest. Under torchrun each rank does its share of the chunks and
    rank 0 writes the manifest after a barrier. Resumes an interrupted sweep with the same settings."""
    if pool not in POOLS:
        raise SweepError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if measure not in ("cosine", "projection"):
        raise SweepError(f"measure must be cosine or projection, got {measure!r}")
    if overflow not in ("truncate", "split"):
        raise SweepError(f"overflow must be truncate or split, got {overflow!r}")
    if on_error not in ("raise", "skip"):
        raise SweepError(f"on_error must be raise or skip, got {on_error!r}")
    if pool == "assistant" and not chat:
        raise SweepError("pool 'assistant' reads where each assistant turn begins: it needs chat input (--chat)")
    if chunk_size < 1 or batch_tokens < 1:
        raise SweepError("chunk_size and batch_tokens must be positive")
    vectors.check_model(model)
    found = find_decoder_layers(model)
    if layers is None:
        layers = [vectors.default_layer] if vectors.default_layer is not None else "all"
    layer_list = resolve_layer_indices(layers, len(found.layers))
    chosen = vectors.select(list(names) if names else None, layer_list if vectors.layers else None)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    max_length = int(max_length or context)
    if max_length < 1:
        raise SweepError("max_length must be positive")
    dtype = dtype or ("float16" if pool == "token" else "float32")
    if dtype not in ("float16", "float32"):
        raise SweepError(f"dtype must be float16 or float32, got {dtype!r}")
    settings = SweepSettings(str(Path(input_path).resolve()), fmt, field, messages_field, chat, tuple(layer_list),
                             tuple(chosen.names), pool, dtype, measure, max_length, overflow, chunk_size, on_error,
                             model_name or getattr(model, "emovec_name", type(model).__name__),
                             config_hash(model.config), vectors_hash(chosen))
    out = Path(out)
    rank, world, initialised = _distributed()
    try:
        done = prepare_folder(out, settings) if rank == 0 else None
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
            if rank != 0:
                done = prepare_folder(out, settings)
        if done is not None:
            return done
        read = dict(fmt=fmt, field_name=field, messages_field=messages_field, chat=chat, on_error=on_error)
        total = sum(1 for _ in read_examples(input_path, **{**read, "on_error": "skip"}))
        stats = ReadStats()
        bar = _bar(progress and rank == 0, total)
        chunk: list[Example] = []
        number = 0

        def flush(examples: list[Example], c: int) -> None:
            if c % world != rank:
                return
            path = out / "shards" / _shard_name(c)
            if path.exists():  # done before an interruption
                bar.update(len(examples))
                return
            _write_chunk(path, examples, tokenizer, model, chosen, settings, batch_tokens, _token_counter(bar))
            bar.update(len(examples))

        started = time.perf_counter()
        for example in read_examples(input_path, **read, stats=stats):
            chunk.append(example)
            if len(chunk) == chunk_size:
                flush(chunk, number)
                chunk, number = [], number + 1
        if chunk:
            flush(chunk, number)
            number += 1
        bar.close()
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if rank != 0:
            return {}
        return _write_manifest(out, settings, number, stats, world, time.perf_counter() - started)
    finally:
        if initialised:
            import torch.distributed as dist

            dist.destroy_process_group()


def _bar(enabled: bool, total: int):
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, unit="ex", desc="sweep", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _token_counter(bar) -> Callable[[int], None]:
    state = {"tokens": 0, "t0": time.perf_counter()}

    def update(tokens: int) -> None:
        state["tokens"] += tokens
        elapsed = max(time.perf_counter() - state["t0"], 1e-9)
        bar.set_postfix_str(f"{state['tokens'] / elapsed:,.0f} tok/s", refresh=False)

    return update


def _write_manifest(out: Path, settings: SweepSettings, chunks: int, stats: ReadStats, world: int,
                    seconds: float) -> dict[str, Any]:
    import pyarrow.parquet as pq

    shards, totals = [], {"examples": 0, "tokens": 0, "truncated": 0, "split": 0, "rows": 0}
    missing = [c for c in range(chunks) if not (out / "shards" / _shard_name(c)).exists()]
    if missing:
        raise SweepError(f"{len(missing)} shard(s) are missing in {out} (first: {_shard_name(missing[0])}); a process "
                         "died? Rerun the same command to finish the sweep")
    for c in range(chunks):
        path = out / "shards" / _shard_name(c)
        meta = pq.read_metadata(path).metadata or {}
        shard_stats = json.loads(meta.get(b"emovec", b"{}"))
        shards.append({"file": f"shards/{path.name}", "chunk": c, **shard_stats})
        for key in totals:
            totals[key] += shard_stats.get(key, 0)
    manifest = {
        "schema": SCHEMA, "key": settings.key(), "settings": asdict(settings), "names": list(settings.vectors),
        "layers": list(settings.layers), "pool": settings.pool, "dtype": settings.dtype,
        "measure": settings.measure, "columns": COLUMNS[settings.pool], "shards": shards,
        "totals": {**totals, "skipped_rows": stats.skipped}, "skipped": stats.problems, "world_size": world,
        "seconds_last_run": round(seconds, 1),
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


_VALUES_DOC = ("L<layer>: list of one value per vector (manifest 'names' order): cosine of the residual stream with "
               "the vector, or its projection (manifest 'measure'), float16 or float32 (manifest 'dtype')")
COLUMNS = {
    "token": {"example": "index of the example among the dataset's usable rows", "token": "position in the example",
              "token_id": "token id", "char_start": "first character of the token in the text (or templated chat)",
              "char_end": "one past its last character", "message": "message index (-1 for plain text)",
              "role": "role of that message (null for plain text)", "L<layer>": _VALUES_DOC},
    "assistant": {"example": "example index", "turn": "message index of the assistant turn",
                  "token": "position read: the token just before the turn's content", "n_tokens": "tokens in the "
                  "example", "L<layer>": _VALUES_DOC},
    **{pool: {"example": "example index", "n_tokens": "tokens in the example (after truncation)",
              "L<layer>": f"{pool} over the example's tokens; " + _VALUES_DOC} for pool in ("mean", "last", "max")},
}
