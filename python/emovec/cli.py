"""The ``emovec`` command line: info, demo, monitor, steer, chat, extract, bench."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import platform
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from emovec import __version__
from emovec.ops import BACKENDS


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
               f"{' (OpenMP)' if _ext.has_cpp_library and _ext._C.openmp else ''}"
               f"{', AVX-512 bf16 dots for bf16 rows' if _ext.has_cpp_library and _ext._C.cpu_bf16_dot() else ''}")
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
def selfcheck(rows: int, hidden: int, num_vectors: int, backend: str | None) -> None:
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


# ============================================================================================ the runtime commands
#
# monitor, steer and chat share: a model cache (a process that runs several commands, such as a test session, loads
# each model once), the vector file, the layer spec, the backend, and the translation of emovec's errors into one
# clear line (UserError) instead of a stack trace.

_MODELS: dict[tuple[str | None, str | None], Any] = {}


def _load_model(name: str | None = None, device: str | None = None):
    """``emovec.models.load_model(name, device=device)``, loaded once per process and kept."""
    key = (name, device)
    if key not in _MODELS:
        from emovec import models

        _MODELS[key] = models.load_model(name, device=device)
    return _MODELS[key]


def _command_line() -> str:
    """The running command as the user would type it again (its non-default options), for result files."""
    import shlex

    ctx = click.get_current_context()
    parts = ctx.command_path.split()
    parts[0] = "emovec"
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            parts += [str(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None]
            continue
        if value is None or value == param.default or value in ((), False):
            continue
        flag = param.opts[0]
        if getattr(param, "is_flag", False):
            parts.append(flag)
        elif getattr(param, "multiple", False):
            for v in value:
                parts += [flag, str(v)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _one_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(message).split()) or type(error).__name__


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn emovec's errors about the user's input (model, vector file, concept names, layers, backend) into
    UserError: one clear line, exit code 1."""
    import warnings

    from emovec.models import ModelLoadError
    from emovec.ops import BackendUnavailable

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        except (ModelLoadError, BackendUnavailable, ValueError, KeyError) as error:
            raise UserError(_one_line(error)) from None
        finally:
            for warning in caught:  # emovec's own warnings as one line each, not a file:line dump
                if issubclass(warning.category, UserWarning) and "emovec" in warning.filename:
                    click.echo(f"warning: {warning.message}", err=True)
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def _resolve_vectors(path: str | None, model):
    from emovec import extraction

    return extraction.resolve_vectors(path, model)


def _setup(model_name: str | None, vectors_path: str | None, device: str | None, backend: str | None = None):
    with _user_errors():
        loaded = _load_model(model_name, device)
        if backend is not None:  # an unusable --backend fails now, not after the first prompt
            import torch

            from emovec.ops import _pick_backend

            _pick_backend(torch.empty(0, 1, device=_device_of(loaded.model)), backend)
        vectors = _resolve_vectors(vectors_path, loaded.model)
    return loaded, vectors


def _read_text(text: str) -> str:
    """TEXT, or stdin when TEXT is "-" (bytes that are not UTF-8 are replaced, with a note); never empty."""
    if text == "-":
        stream = getattr(sys.stdin, "buffer", None)
        raw = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            text = raw.decode("utf-8", errors="replace")
            click.echo(f"emovec: stdin is not valid UTF-8 (byte {error.start}); undecodable bytes were replaced "
                       "with U+FFFD", err=True)
    if not text.strip():
        raise UserError("the text is empty: give some text (or '-' to read it from stdin)")
    return text


def _check_length(encoded, model, truncate: bool):
    """Refuse (or, with --truncate, cut to the model's context) a text longer than the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    length = encoded["input_ids"].shape[1]
    if limit is None or length <= limit:
        return encoded
    if not truncate:
        raise UserError(f"the text has {length} tokens, more than the model's context of {limit}; shorten it, or "
                        f"pass --truncate to keep the first {limit} tokens")
    click.echo(f"emovec: the text has {length} tokens; keeping the first {limit} (the model's context)", err=True)
    return {key: value[:, :limit] for key, value in encoded.items()}


def _model_options(command):
    """The options every runtime command takes: --model, --vectors, --layer, --backend, --device."""
    options = [
        click.option("--model", "model_name", default=None, metavar="NAME_OR_PATH",
                     help="a local model folder or a hub id in the local Hugging Face cache (default: SmolLM2-135M-Instruct)"),
        click.option("--vectors", "vectors_path", default=None, type=click.Path(dir_okay=False), metavar="FILE",
                     help="a vector file from `emovec extract` (default: the cached default emotion vectors)"),
        click.option("--layer", default=None, metavar="SPEC",
                     help="layer(s): 19, -1, 0.66 (fraction of depth), 10-14, 3,5,7 or all (default: the vectors' default layer)"),
        click.option("--backend", default=None, type=click.Choice(BACKENDS),
                     help="backend of the fused op (default: by device)"),
        click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _console():
    """A rich console on stdout; when stdout is not a terminal (a pipe, a file) and COLUMNS is not set, its lines are
    160 columns wide instead of rich's 80, so tables wrap less."""
    from rich.console import Console

    console = Console(highlight=False, emoji=False, markup=False)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = 160
    return console


def _device_of(model):
    return next(model.parameters()).device


def _encode(tokenizer, text: str, *, chat: bool, generation_prompt: bool, device, system: str | None = None,
            history: Sequence[dict[str, str]] = ()):
    """Token ids of ``text``, or of the chat ``history`` plus ``text`` as the user's turn, wrapped in the chat template."""
    if not chat:
        return tokenizer(text, return_tensors="pt").to(device)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("this model's tokenizer has no chat template; leave out --chat (or use `emovec monitor` on plain text)")
    messages = ([{"role": "system", "content": system}] if system else []) + list(history)
    if text:
        messages.append({"role": "user", "content": text})
    wrapped = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(wrapped, return_tensors="pt", add_special_tokens=False).to(device)


def _special_flags(tokenizer, ids: Sequence[int]) -> list[bool]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i in special for i in ids]


def _parse_recipe(items: Sequence[str]) -> dict[str, float]:
    """``["calm=0.05", "afraid=-0.02"]`` (or ``"calm=0.05,afraid=-0.02"``) -> {"calm": 0.05, "afraid": -0.02}."""
    recipe: dict[str, float] = {}
    for item in items:
        for term in (t for t in re.split(r"[,\s]+", re.sub(r"\s*=\s*", "=", item)) if t):
            name, sep, value = term.rpartition("=")
            name = name.strip()
            if not sep or not name or not value.strip():
                raise UserError(f"bad steering term {term!r}: write NAME=STRENGTH, e.g. calm=0.05")
            try:
                strength = float(value)
            except ValueError:
                raise UserError(f"bad strength {value!r} in {term!r}: it must be a number, e.g. calm=0.05") from None
            if not math.isfinite(strength):
                raise UserError(f"bad strength {value!r} in {term!r}: it must be a finite number")
            if name in recipe:
                raise UserError(f"{name!r} is given twice; give each concept once")
            recipe[name] = strength
    return recipe


def _check_recipe(recipe: dict[str, float], vectors) -> None:
    with _user_errors():
        for name in recipe:
            vectors.index(name)


def _check_relative(recipe: dict[str, float], vectors, absolute: bool) -> None:
    if recipe and not absolute and vectors.mean_norms is None:
        raise UserError("these vectors have no mean residual norms, which relative strengths are measured in; pass "
                        "--absolute (strength then multiplies the unit vector) or use vectors with mean norms")


def _describe_recipe(recipe: dict[str, float], absolute: bool) -> str:
    terms = ", ".join(f"{name}={strength:+g}" for name, strength in recipe.items())
    return f"{terms} ({'absolute' if absolute else 'relative'})" if recipe else "none"


def _parse_bound_terms(items: Sequence[str], op: str) -> dict[str, float]:
    """``["desperate<=0.02", "afraid<=0"]`` (op "<=") -> {"desperate": 0.02, "afraid": 0.0}; NAME=VALUE also works."""
    out: dict[str, float] = {}
    flag = "--cap" if op == "<=" else "--floor"
    for item in items:
        for term in (t.strip() for t in item.split(",") if t.strip()):
            match = re.fullmatch(r"([^<>=]+?)\s*(<=|>=|=)\s*([^<>=]+)", term)
            if not match or match.group(2) not in (op, "="):
                raise UserError(f"bad {flag} {term!r}: write NAME{op}VALUE, e.g. {flag} "
                                f"\"{'desperate<=0.02' if op == '<=' else 'calm>=0'}\"")
            name, value = match.group(1).strip(), match.group(3).strip()
            try:
                bound = float(value)
            except ValueError:
                raise UserError(f"bad bound {value!r} in {term!r}: it must be a number (a cosine, e.g. 0.02)") from None
            if not math.isfinite(bound):
                raise UserError(f"bad bound {value!r} in {term!r}: it must be a finite number")
            if (op == "<=" and bound >= 1) or (op == ">=" and bound <= -1):
                raise UserError(f"{flag} {term!r} never binds: bounds are cosines, so a cap must be below 1 and a floor "
                                "above -1")
            if name in out:
                raise UserError(f"{flag} gives {name!r} twice; give each concept once")
            out[name] = bound
    return out


def _parse_bounds(caps: Sequence[str], floors: Sequence[str],
                  regulate_layer: str | None = None) -> dict[str, tuple[float | None, float | None]]:
    """--cap / --floor terms as emovec.regulate bounds: {name: (floor or None, cap or None)}."""
    upper, lower = _parse_bound_terms(caps, "<="), _parse_bound_terms(floors, ">=")
    if regulate_layer is not None and not upper and not lower:
        raise UserError("--regulate-layer needs a --cap or --floor to apply there")
    return {name: (lower.get(name), upper.get(name)) for name in list(dict.fromkeys([*lower, *upper]))}


def _describe_bounds(bounds) -> str:
    parts = []
    for name, (lo, hi) in bounds.items():
        if lo is not None and hi is not None:
            parts.append(f"{lo:g} <= {name} <= {hi:g}")
        elif hi is not None:
            parts.append(f"{name} <= {hi:g}")
        else:
            parts.append(f"{name} >= {lo:g}")
    return ", ".join(parts) + " (cosine)" if parts else "none"


def _regulation_options(command):
    """--cap, --floor and --regulate-layer for monitor, steer and chat."""
    options = [
        click.option("--cap", "caps", multiple=True, metavar="NAME<=COSINE",
                     help='hold NAME\'s reading at or below COSINE on every token, e.g. "desperate<=0.02" (repeatable)'),
        click.option("--floor", "floors", multiple=True, metavar="NAME>=COSINE",
                     help='hold NAME\'s reading at or above COSINE on every token, e.g. "calm>=0" (repeatable)'),
        click.option("--regulate-layer", "regulate_layer", default=None, metavar="SPEC",
                     help="layer(s) where --cap/--floor apply (default: --layer)"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _check_bounds(model, vectors, bounds, layer, backend) -> None:
    """Refuse bad --cap / --floor before any work (unknown names, floor above cap, cosines out of range)."""
    import emovec

    if bounds:
        with _user_errors():
            emovec.regulate(model, vectors, bounds, layer, backend=backend)


def _regulation_note(result, bounds) -> str:
    """One line: per bound, the share of the tokens it corrected and the largest correction."""
    parts = []
    real = result.mask[:, :, None].expand(*result.corrections.shape[:3])
    for c, name in enumerate(result.names):
        values = result.corrections[..., c][real]
        hits = int((values != 0).sum())
        biggest = float(values.abs().max()) if values.numel() else 0.0
        parts.append(f"{name}: {hits}/{values.numel()} readings corrected"
                     + (f" (largest {biggest:.3g})" if hits else ""))
    return "regulated " + _describe_bounds(bounds) + ": " + "; ".join(parts)


def _reply_regulation(result, start: int) -> str:
    """Per bound, how many of the reply's tokens (from ``start``) it corrected, and the mean correction there."""
    parts = []
    reply = result.corrections[0, start:]  # (T, L, C)
    for c, name in enumerate(result.names):
        hit = (reply[..., c] != 0).any(-1)
        size = reply[..., c].abs().amax(-1)[hit]
        parts.append(f"{name} {int(hit.sum())}/{reply.shape[0]} tokens"
                     + (f" (mean correction {float(size.mean()):.3g})" if int(hit.sum()) else ""))
    return "; ".join(parts)


def _generation_config(model, tokenizer, max_new_tokens: int):
    """The model's generation config, made greedy (sampling parameters cleared) with ``max_new_tokens``."""
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.num_beams = 1
    for name in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if getattr(config, name, None) is not None:
            setattr(config, name, None)
    config.max_new_tokens = max_new_tokens
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def _write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    from emovec.fileio import atomic_write_text

    try:
        return atomic_write_text(path, text)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def _check_outputs(*paths: str | None) -> None:
    """Refuse, before any work, output paths that cannot be written."""
    from emovec.fileio import check_writable

    for path in paths:
        if path is not None and (why := check_writable(path)):
            raise UserError(f"cannot write {path}: {why}")


def _quiet():
    from emovec.models import _quiet_transformers

    return _quiet_transformers()


@main.command()
@click.argument("text")
@_model_options
@click.option("--top", default=3, show_default=True, type=click.IntRange(min=1), help="emotions shown per token")
@click.option("--chat", is_flag=True, help="wrap TEXT in the chat template as the user's turn")
@click.option("--emotion", default=None, metavar="NAME",
              help="an emotion to show in its own column and to highlight in --html (default there: the strongest)")
@click.option("--html", "html_path", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="also write a self-contained HTML page with the tokens highlighted")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="also write the top emotions per token as JSON")
@click.option("--truncate", is_flag=True, help="cut a text longer than the model's context (default: refuse it)")
@click.option("--smooth", default=1, show_default=True, type=click.IntRange(min=1), metavar="TOKENS",
              help="moving average of the cosines over this many neighbouring tokens (1 = raw readings)")
@_regulation_options
def monitor(text: str, model_name, vectors_path, layer, backend, device, top, chat, emotion, html_path, json_path,
            truncate, smooth, caps, floors, regulate_layer) -> None:
    """Show, per token of TEXT ("-" reads stdin), the strongest emotions in the residual stream."""
    import json

    import torch

    import emovec
    from emovec import render

    text = _read_text(text)
    bounds = _parse_bounds(caps, floors, regulate_layer)
    _check_outputs(html_path, json_path)
    loaded, vectors = _setup(model_name, vectors_path, device, backend)
    model, tokenizer = loaded.model, loaded.tokenizer
    with _user_errors():
        if emotion is not None:
            vectors.index(emotion)
        context = emovec.monitor(model, vectors, layer, tokenizer=tokenizer, backend=backend)
        regulation = (emovec.regulate(model, vectors, bounds, regulate_layer if regulate_layer else layer,
                                      backend=backend) if bounds else None)
        encoded = _encode(tokenizer, text, chat=chat, generation_prompt=False, device=_device_of(model))
        encoded = _check_length(encoded, model, truncate)
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if regulation is not None:
                stack.enter_context(regulation)
            mon = stack.enter_context(context)
            model(**encoded, use_cache=False)
    result = mon.result().smoothed(smooth)
    special = _special_flags(tokenizer, result.sequence(0)["token_ids"].tolist())
    layers = ", ".join(str(x) for x in result.layers)
    summary = (f"{loaded.name} · {len(special)} tokens · layer{'s' if len(result.layers) > 1 else ''} {layers} · "
               f"{len(vectors.names)} emotions · top {top} by cosine"
               + (f" (moving average over {smooth} tokens)" if smooth > 1 else ""))
    console = _console()
    console.print(render.monitor_table(result, top=top, emotion=emotion, special=special, title=summary))
    if regulation is not None:
        from rich.text import Text

        console.print(Text(_regulation_note(regulation.result(), bounds)
                           + f" at layer(s) {', '.join(map(str, regulation.layer_indices))}", style="dim"))
    if html_path is not None:
        page = render.monitor_html(result, emotion=emotion, top=max(top, 5), special=special,
                                   title="emovec monitor", subtitle=summary)
        _write_atomic(html_path, page)
        click.echo(f"wrote {html_path}", err=True)
    if json_path is not None:
        data = render.monitor_json(result, top=top, model=loaded.name, text=text, chat=chat)
        if regulation is not None:
            data["regulation"] = {"bounds": {n: list(b) for n, b in bounds.items()}, "units": "cosine",
                                  "layers": list(regulation.layer_indices)}
        _write_atomic(json_path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        click.echo(f"wrote {json_path}", err=True)


@main.command()
@click.argument("prompt")
@_model_options
@click.option("--add", "adds", multiple=True, metavar="NAME=STRENGTH",
              help="steer towards NAME (negative: away from it); repeat for several")
@click.option("--absolute", is_flag=True,
              help="strength multiplies the unit vector (default: relative, in units of the layer's mean residual norm)")
@click.option("--positions", default="all", show_default=True, type=click.Choice(["all", "prompt", "generated"]),
              help="which tokens are steered")
@click.option("--max-new-tokens", default=40, show_default=True, type=click.IntRange(min=1))
@click.option("--chat", is_flag=True, help="wrap PROMPT in the chat template (user turn, then the assistant's)")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="also write both generations as JSON")
@click.option("--truncate", is_flag=True, help="cut a prompt longer than the model's context (default: refuse it)")
@_regulation_options
def steer(prompt: str, model_name, vectors_path, layer, backend, device, adds, absolute, positions, max_new_tokens,
          chat, json_path, truncate, caps, floors, regulate_layer) -> None:
    """Generate from PROMPT greedily, plain and steered (and/or regulated with --cap/--floor), side by side."""
    import json

    import torch

    import emovec
    from emovec import render

    recipe = _parse_recipe(adds)
    bounds = _parse_bounds(caps, floors, regulate_layer)
    if not recipe and not bounds:
        raise UserError("give at least one --add NAME=STRENGTH (e.g. --add calm=0.05) or a --cap/--floor")
    prompt = _read_text(prompt)
    _check_outputs(json_path)
    loaded, vectors = _setup(model_name, vectors_path, device, backend)
    model, tokenizer = loaded.model, loaded.tokenizer
    _check_recipe(recipe, vectors)
    _check_relative(recipe, vectors, absolute)
    config = _generation_config(model, tokenizer, max_new_tokens)
    regulation = None
    with _user_errors():
        # one batch of two copies of the prompt: the first plain, the second steered and/or regulated
        context = emovec.steer(model, vectors, [None, recipe], layer, positions=positions, relative=not absolute,
                               backend=backend) if recipe else None
        if bounds:
            regulation = emovec.regulate(model, vectors, [None, bounds], regulate_layer if regulate_layer else layer,
                                         positions=positions, backend=backend)
        encoded = _encode(tokenizer, prompt, chat=chat, generation_prompt=True, device=_device_of(model))
        encoded = _check_length(encoded, model, truncate)
        batch = {key: value.repeat(2, 1) for key, value in encoded.items()}
        with torch.no_grad(), _quiet(), contextlib.ExitStack() as stack:
            for ctx in (context, regulation):
                if ctx is not None:
                    stack.enter_context(ctx)
            out = model.generate(**batch, generation_config=config)
    new = out[:, batch["input_ids"].shape[1]:]
    plain, steered = tokenizer.batch_decode(new, skip_special_tokens=True)
    described = " + ".join(([_describe_recipe(recipe, absolute)] if recipe else [])
                           + ([f"regulated {_describe_bounds(bounds)}"] if bounds else []))
    shown = (context or regulation).layer_indices
    layers = ", ".join(str(x) for x in shown)
    console = _console()
    from rich.text import Text

    console.print(Text(f"{loaded.name} · layer{'s' if len(shown) > 1 else ''} {layers} · "
                       f"positions {positions} · {max_new_tokens} new tokens, greedy", style="dim"))
    console.print(Text("prompt: ", style="bold") + Text(prompt))
    console.print(render.steer_table(plain.strip(), steered.strip(), f"{'steered' if recipe else 'regulated'}: "
                                                                     f"{described}"))
    if plain == steered:
        console.print(Text(f"(the {'steered' if recipe else 'regulated'} generation is identical to the plain one)",
                           style="dim"))
    if regulation is not None:
        regulated = regulation.result()  # the second sequence is the regulated one
        regulated = dataclasses.replace(regulated, corrections=regulated.corrections[1:], mask=regulated.mask[1:])
        console.print(Text(_regulation_note(regulated, bounds) + " at layer(s) "
                           + ", ".join(map(str, regulation.layer_indices)), style="dim"))
    if json_path is not None:
        data = {"model": loaded.name, "prompt": prompt, "chat": chat, "recipe": recipe, "relative": not absolute,
                "layers": list((context or regulation).layer_indices), "positions": positions,
                "max_new_tokens": max_new_tokens, "plain": plain, "steered": steered,
                "bounds": {n: list(b) for n, b in bounds.items()},
                "regulate_layers": list(regulation.layer_indices) if regulation is not None else []}
        _write_atomic(json_path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        click.echo(f"wrote {json_path}", err=True)


_CHAT_HELP = ("commands: /steer NAME=STRENGTH ... (replace the steering; /steer alone turns it off), "
              "/reset (forget the conversation), /quit")


def _streamer(tokenizer):
    """A streamer that echoes the reply as generate produces it (through click, so tests can capture it)."""
    from transformers import TextStreamer

    class _Echo(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            click.echo(text, nl=stream_end)

    return _Echo(tokenizer, skip_prompt=True, skip_special_tokens=True)


@main.command()
@_model_options
@click.option("--add", "adds", multiple=True, metavar="NAME=STRENGTH", help="steer the whole session (repeatable)")
@click.option("--absolute", is_flag=True, help="absolute strengths (default: relative to the layer's mean norm)")
@click.option("--positions", default="all", show_default=True, type=click.Choice(["all", "prompt", "generated"]),
              help="which tokens are steered")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1), help="per reply")
@click.option("--top", default=5, show_default=True, type=click.IntRange(min=1), help="emotions shown per reply")
@click.option("--system", default=None, help="a system prompt (default: the chat template's own)")
@_regulation_options
def chat(model_name, vectors_path, layer, backend, device, adds, absolute, positions, max_new_tokens, top, system,
         caps, floors, regulate_layer) -> None:
    """Chat with the model; after each reply, its strongest emotions (mean cosine over the reply's tokens)."""
    import torch
    from rich.text import Text

    import emovec
    from emovec import render

    recipe = _parse_recipe(adds)
    bounds = _parse_bounds(caps, floors, regulate_layer)
    loaded, vectors = _setup(model_name, vectors_path, device, backend)
    model, tokenizer = loaded.model, loaded.tokenizer
    _check_recipe(recipe, vectors)
    _check_relative(recipe, vectors, absolute)
    regulate_at = regulate_layer if regulate_layer else layer
    _check_bounds(model, vectors, bounds, regulate_at, backend)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{loaded.name}'s tokenizer has no chat template, so it cannot chat; use `emovec steer`")
    with _user_errors():  # check the layer spec and the steering once, before the first turn
        probe = emovec.monitor(model, vectors, layer, tokenizer=tokenizer, backend=backend)
        if recipe:
            emovec.steer(model, vectors, recipe, layer, positions=positions, relative=not absolute, backend=backend)
    layers = ", ".join(str(x) for x in probe.layer_indices)
    config = _generation_config(model, tokenizer, max_new_tokens)
    console = _console()
    console.print(Text(f"chatting with {loaded.name} · emotions at layer{'s' if len(probe.layer_indices) > 1 else ''} "
                       f"{layers} · steering: {_describe_recipe(recipe, absolute)}"
                       + (f" · regulated: {_describe_bounds(bounds)}" if bounds else ""), style="dim"))
    console.print(Text(_CHAT_HELP, style="dim"))
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            break
        except UnicodeDecodeError as error:
            console.print(Text(f"error: that line is not valid UTF-8 (byte {error.start}); type it again", style="red"))
            continue
        message = line.strip()
        if not message:
            continue
        if message.startswith("/"):
            command, _, rest = message.partition(" ")
            if command in ("/quit", "/exit", "/q"):
                break
            if command == "/reset":
                history.clear()
                console.print(Text("(conversation forgotten)", style="dim"))
            elif command == "/steer":
                try:
                    new_recipe = _parse_recipe([rest])
                    _check_recipe(new_recipe, vectors)
                    _check_relative(new_recipe, vectors, absolute)
                    if new_recipe:
                        with _user_errors():  # strengths too large for the model are refused here, not mid-turn
                            emovec.steer(model, vectors, new_recipe, layer, positions=positions,
                                         relative=not absolute, backend=backend)
                except click.ClickException as error:
                    console.print(Text(f"error: {error.format_message()}", style="red"))
                    continue
                recipe = new_recipe
                console.print(Text(f"(steering: {_describe_recipe(recipe, absolute)})", style="dim"))
            else:
                console.print(Text(f"unknown command {command!r}; {_CHAT_HELP}", style="red"))
            continue

        encoded = _encode(tokenizer, message, chat=True, generation_prompt=True, device=_device_of(model),
                          system=system, history=history)
        prompt_length = encoded["input_ids"].shape[1]
        click.echo("assistant> ", nl=False)
        try:
            with _user_errors(), torch.no_grad(), _quiet(), contextlib.ExitStack() as stack:
                if recipe:
                    stack.enter_context(emovec.steer(model, vectors, recipe, layer, positions=positions,
                                                     relative=not absolute, backend=backend))
                reg = stack.enter_context(emovec.regulate(model, vectors, bounds, regulate_at, positions=positions,
                                                          backend=backend)) if bounds else None
                mon = stack.enter_context(emovec.monitor(model, vectors, layer, tokenizer=tokenizer, backend=backend))
                out = model.generate(**encoded, generation_config=config, streamer=_streamer(tokenizer))
        except KeyboardInterrupt:
            console.print(Text("\n(interrupted; that turn is dropped)", style="dim"))
            continue
        reply = tokenizer.decode(out[0, prompt_length:], skip_special_tokens=True).strip()
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
        pairs = render.mean_emotions(mon.result(decode=False), start=prompt_length, k=top)
        if pairs:
            console.print(Text("emotions: ", style="bold") + render.emotion_text(pairs))
        else:
            console.print(Text("emotions: (the reply has no tokens to score)", style="dim"))
        if reg is not None:
            console.print(Text("regulated: ", style="bold") + Text(_reply_regulation(reg.result(), prompt_length)))


from emovec import cli_bench, cli_data, cli_demo, cli_interop, cli_science, cli_sweep  # noqa: E402, F401  (register their commands)

if __name__ == "__main__":
    main()
