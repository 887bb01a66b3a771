"""``emovec sweep``: readings over a dataset into Parquet shards, resumable, on one or many processes."""

from __future__ import annotations

import os
import subprocess
import sys

import click

from emovec.cli import UserError, _setup, _user_errors, main


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("data", type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--model", "model_name", default=None, metavar="NAME_OR_PATH", help="model (default: the default one)")
@click.option("--vectors", "vectors_path", default=None, type=click.Path(dir_okay=False),
              help="vector file (default: the model's emotion vectors)")
@click.option("--layers", default=None, help="layers: 19, 10-20, all (default: the vectors' default layer)")
@click.option("--names", default=None, help="comma-separated vectors to record (default: all)")
@click.option("--pool", type=click.Choice(["token", "mean", "last", "max", "assistant"]), default="mean",
              show_default=True, help="one row per token, or per example pooled (assistant: where each assistant "
                                      "turn begins)")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None,
              help="stored value type (default: float16 per token, float32 pooled)")
@click.option("--measure", type=click.Choice(["cosine", "projection"]), default="cosine", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "parquet", "txt", "datasets"]), default=None,
              help="input format (default: from the file name; a folder is a datasets save_to_disk folder)")
@click.option("--field", default="text", show_default=True, help="text field of each row")
@click.option("--messages-field", default="messages", show_default=True, help="chat messages field of each row")
@click.option("--chat", is_flag=True, help="rows are chat messages ({role, content} lists) read in the chat template")
@click.option("--max-length", default=None, type=click.IntRange(min=1),
              help="tokens per forward pass (default: the model's context)")
@click.option("--overflow", type=click.Choice(["truncate", "split"]), default="truncate", show_default=True,
              help="longer examples: keep the first --max-length tokens, or read them in windows")
@click.option("--chunk-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="examples per shard (the unit of resumption)")
@click.option("--batch-tokens", default=4096, show_default=True, type=click.IntRange(min=1),
              help="tokens per forward batch, padding included")
@click.option("--on-error", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
              help="a bad row: stop with its file and line, or skip it and count it in the manifest")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1),
              help="processes on this machine (runs torchrun for you); for many machines run torchrun yourself")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch threads per process on the CPU")
@click.option("--quiet", is_flag=True, help="no progress bar")
def sweep(data, out_dir, model_name, vectors_path, layers, names, pool, dtype, measure, fmt, field, messages_field,
          chat, max_length, overflow, chunk_size, batch_tokens, on_error, nproc, threads, quiet) -> None:
    """Record emotion (or any) vector readings over DATA (JSONL, CSV, Parquet, text lines or a datasets folder)
    into Parquet shards and a manifest in --out; rerun the same command to resume after an interruption."""
    import torch

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch(nproc, threads)
        return
    if threads is not None:
        torch.set_num_threads(threads)
    elif "LOCAL_WORLD_SIZE" in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    from emovec.sweep import SweepError, run_sweep

    device = None
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    loaded, vectors = _setup(model_name, vectors_path, device)
    with _user_errors():
        try:
            manifest = run_sweep(loaded.model, loaded.tokenizer, vectors, data, out_dir, layers=layers,
                                 names=[n.strip() for n in names.split(",") if n.strip()] if names else None,
                                 pool=pool, dtype=dtype, measure=measure, fmt=fmt, field=field,
                                 messages_field=messages_field, chat=chat, max_length=max_length, overflow=overflow,
                                 chunk_size=chunk_size, batch_tokens=batch_tokens,
                                 on_error="raise" if on_error == "stop" else "skip", model_name=loaded.name,
                                 progress=not quiet)
        except SweepError as error:
            raise UserError(str(error)) from None
        except OSError as error:
            raise UserError(f"cannot write {out_dir}: {error.strerror or error}") from None
    if manifest:
        totals = manifest["totals"]
        click.echo(f"wrote {out_dir}: {totals['examples']} examples, {totals['tokens']} tokens, {totals['rows']} rows "
                   f"in {len(manifest['shards'])} shard(s); skipped {totals['skipped_rows']} bad row(s), truncated "
                   f"{totals['truncated']}, split {totals['split']}", err=True)


def _relaunch(nproc: int, threads: int | None) -> None:
    """Run this same command (rebuilt from its parsed options) under torchrun with ``nproc`` local processes."""
    ctx = click.get_current_context()
    args = ["sweep", str(ctx.params["data"])]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in ("data", "nproc") or value is None or value is False:
            continue
        option = max(param.opts, key=len)
        args += [option] if getattr(param, "is_flag", False) else [option, str(value)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "emovec", *args]
    result = subprocess.run(command)
    if result.returncode != 0:
        raise UserError(f"the {nproc} sweep processes failed (exit code {result.returncode}); the folder is "
                        "resumable: rerun the same command")
