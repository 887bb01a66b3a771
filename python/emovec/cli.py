"""The ``emovec`` command line: info, demo, monitor, steer, chat, extract, bench."""

from __future__ import annotations

import platform

import click

from emovec import __version__


class UserError(click.ClickException):
    """An error caused by the user's input: printed as one clear line, no stack trace."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="emovec")
def main() -> None:
    """Find, watch and steer emotion vectors inside language models."""


@main.command()
def info() -> None:
    """Version, backends (and why any is missing), CUDA architectures, torch/triton versions, devices."""
    import torch

    from emovec import _ext
    from emovec.ops import backend_status

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    click.echo(f"emovec {__version__} (python {platform.python_version()}, {platform.machine()})")
    click.echo(f"torch {torch.__version__}, triton {triton_version}")
    compiled = "no" if not _ext.has_cpp_library else ("yes, " + ", ".join(f"sm_{a}" for a in _ext.cuda_architectures()) if _ext.cuda_compiled() else "no")
    click.echo(f"compiled core: {'emovec._C' if _ext.has_cpp_library else 'missing'}"
               f"{' (OpenMP)' if _ext.has_cpp_library and _ext._C.openmp else ''}")
    click.echo(f"CUDA kernels compiled: {compiled}")
    click.echo("backends:")
    for name, why in backend_status().items():
        if name == "triton" and why is not None and triton_version != "not installed":
            why = None if torch.cuda.is_available() else "for CUDA tensors (none here); run with TRITON_INTERPRET=1 to use it on the CPU"
            click.echo(f"  {name:<7} available {why}")
            continue
        click.echo(f"  {name:<7} {'available' if why is None else 'unavailable: ' + why}")
    devices = [f"cpu ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    elif _ext.has_cpp_library and _ext.cuda_compiled():
        devices.append(f"no CUDA device (driver sees {_ext._C.cuda_device_count()})")
    click.echo("devices: " + "; ".join(devices))


@main.command()
@click.option("--rows", default=8, show_default=True, help="rows of the residual stream")
@click.option("--hidden", default=576, show_default=True, help="hidden size")
@click.option("--vectors", "num_vectors", default=5, show_default=True, help="probe vectors")
@click.option("--backend", default=None, help="torch, cpu, triton or cuda (default: by device)")
def demo(rows: int, hidden: int, num_vectors: int, backend: str | None) -> None:
    """Run the fused op once on random data and check it against the torch reference."""
    import torch

    import emovec

    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden, generator=g)
    table = torch.randn(2, hidden, generator=g)
    probes = torch.nn.functional.normalize(torch.randn(num_vectors, hidden, generator=g), dim=1)
    slots = torch.arange(rows) % 3 - 1
    segments = torch.arange(rows) % 2
    want_h = h.clone()
    want = emovec.steer_project(want_h, slots=slots, table=table, probes=probes, segments=segments, num_segments=2, backend="torch")
    try:
        got = emovec.steer_project(h, slots=slots, table=table, probes=probes, segments=segments, num_segments=2, backend=backend)
    except (ValueError, TypeError, RuntimeError) as error:
        raise UserError(str(error)) from None
    chosen = backend or emovec.ops._pick_backend(h, None)
    error = max((got.scores - want.scores).abs().max().item(), (h - want_h).abs().max().item())
    click.echo(f"steer_project on {rows}x{hidden}, {num_vectors} probes, backend {chosen}: "
               f"max |difference| from the torch reference = {error:.2e}")
    click.echo("scores of row 0: " + ", ".join(f"{v:+.3f}" for v in got.scores[0].tolist()))
    if error > 1e-3:
        raise UserError("the backend disagrees with the reference; please report this with `emovec info`")


if __name__ == "__main__":
    main()
