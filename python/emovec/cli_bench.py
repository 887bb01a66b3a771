"""``emovec bench``: the fused runtime against plain generation and naive hooks, from the command line."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import click

from emovec.cli import (
    _check_outputs,
    _command_line,
    _console,
    _load_model,
    _user_errors,
    _write_atomic,
    main,
)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(device: str) -> dict:
    import torch

    info = {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        flags = Path("/proc/cpuinfo").read_text()
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["avx2"] = "avx2" in flags
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from emovec.report.geometry import _figure_saver

    scenarios = list(dict.fromkeys(r["scenario"] for r in result["rows"]))
    providers = list(dict.fromkeys(r["provider"] for r in result["rows"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(scenarios)), 3.8))
    width = 0.8 / len(providers)
    for j, provider in enumerate(providers):
        values = []
        for s in scenarios:
            row = next((r for r in result["rows"] if r["scenario"] == s and r["provider"] == provider), None)
            values.append(row["time_vs_baseline"] if row else 0)
        ax.bar([i + j * width for i in range(len(scenarios))], values, width=width, label=provider)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(scenarios))], scenarios, rotation=20,
                  ha="right", fontsize=7)
    ax.set_ylabel("time / baseline (plain, or naive for step/op)")
    ax.set_title(f"emovec bench · {result['model']} · {result['device']} · K={result['K']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = _figure_saver(fig, path)
    plt.close(fig)
    return out


def _other_tools() -> list[str]:
    """nnsight is timed doing the same monitoring and steering when it can be; repeng is not driven (it steers
    only, no readings, and 0.4 needs numpy < 2); say what happened."""
    import importlib.util

    from emovec.bench.runner import nnsight_status

    why = nnsight_status()
    notes = [why or "nnsight: timed as provider 'nnsight' in generate and prefill (the same steering add, projections "
                    "and host copies every step, inside its trace)"]
    if importlib.util.find_spec("repeng") is None:
        notes.append("repeng is not installed: skipped (it steers only, with no readings to compare)")
    else:
        notes.append("repeng is installed but not driven: it steers only, with no readings to compare")
    return notes


@main.command()
@click.option("--model", "model_name", default=None, metavar="NAME_OR_PATH", help="default: SmolLM2-135M-Instruct")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
@click.option("--dtype", default=None, help="float32, bfloat16, float16 (default: the model's default)")
@click.option("--quick", is_flag=True, help="a short run (under a minute on 2 cores): 8 tokens, 1 round, fewer shapes")
@click.option("--k", default=171, show_default=True, type=click.IntRange(min=1), help="vectors monitored per layer")
@click.option("--tokens", "new_tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="tokens generated per sequence")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1), help="interleaved rounds")
@click.option("--backend", "backends", multiple=True, help="emovec backends to time (default: every one available)")
@click.option("--scenario", "scenarios", multiple=True, type=click.Choice(["generate", "prefill", "step", "op"]),
              help="scenarios to run (default: all)")
@click.option("--out", "out_dir", default="bench", show_default=True, type=click.Path(file_okay=False),
              help="folder for bench.csv, bench.json and bench.png")
def bench(model_name, device, dtype, quick, k, new_tokens, rounds, backends, scenarios, out_dir) -> None:
    """Time monitoring (every layer x K vectors) + steering inside a model against plain runs and naive PyTorch
    hooks, and the fused op against the naive op sequence; ratios come from one interleaved run."""
    from emovec.bench.runner import run_bench

    out = Path(out_dir)
    _check_outputs(str(out / "bench.json") if out.is_dir() else str(out))
    with _user_errors():
        if dtype is not None:
            from emovec import models

            loaded = models.load_model(model_name, device=device, dtype=dtype)
        else:
            loaded = _load_model(model_name, device)
        if backends:
            from emovec.ops import BACKENDS, backend_status

            for b in backends:
                if b not in BACKENDS:
                    raise ValueError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
                if backend_status()[b] is not None:
                    raise ValueError(f"backend {b!r} is unavailable: {backend_status()[b]}")
        kwargs = dict(k=k, new_tokens=8 if quick else new_tokens, rounds=1 if quick else rounds,
                      batches=(1, 8), prefill_tokens=128 if quick else 256, op_shapes=(1, 256) if quick else (1, 16, 256),
                      backends=list(backends) or None, scenarios=list(scenarios) or ("generate", "prefill", "step", "op"))
        result = run_bench(loaded.model, loaded.tokenizer, progress=lambda s: click.echo(f"emovec bench: {s}", err=True),
                           **kwargs)
    result.update(model=loaded.name, command=_command_line(), quick=quick,
                  machine=_machine(result["device"]), notes=_other_tools())
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "bench.json", json.dumps(result, indent=1) + "\n")
    columns = ["scenario", "provider", "p20_ms", "p50_ms", "p80_ms", "tokens_per_s", "time_vs_baseline", "recorded_mb"]
    lines = [",".join(columns + ["command"])]
    for row in result["rows"]:
        lines.append(",".join(str(row[c]) for c in columns) + "," + json.dumps(result["command"]))
    _write_atomic(out / "bench.csv", "\n".join(lines) + "\n")
    figure = _plot(result, out / "bench.png")
    from rich.table import Table

    table = Table(title=f"emovec bench · {loaded.name} · {result['device']} {result['dtype']} · {result['layers']} "
                        f"layers x K={result['K']} · steering at layer {result['steer_layer']}")
    for c in columns:
        table.add_column(c, justify="left" if c in ("scenario", "provider") else "right")
    for row in result["rows"]:
        table.add_row(*[str(row[c]) for c in columns])
    _console().print(table)
    for line in result["notes"]:
        click.echo(f"note: {line}", err=True)
    click.echo(f"wrote {out / 'bench.json'}, {out / 'bench.csv'} and {figure}", err=True)
