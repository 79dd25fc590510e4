"""Loading tokenizers and causal LMs by local path or hub id, with one-line errors.

The same code path serves a hub id (`Qwen/Qwen2.5-7B`) and a local directory; tests exercise it on
local directories because this project's CI has no model hub.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import KdError

log = logging.getLogger(__name__)


def pick_device(device: str) -> torch.device:
    """`auto` -> cuda when available else cpu; `cuda` without a GPU is a `KdError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KdError(f"--device {device} requested but no CUDA GPU is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise KdError(f"unknown device {device!r} (use auto, cpu or cuda)") from None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on GPU, float32 on CPU (CPU bf16 matmuls are slow and less exact)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise KdError(f"unknown dtype {dtype!r} (use auto, float32 or bfloat16)")
    return table[dtype]


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


# What the Hub accepts as a repo id: NAME or OWNER/NAME, letters, digits, '-', '_', '.', at most 96 characters.
_HUB_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?(?:/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?)?$")


def load_error(what: str, name: str, e: BaseException) -> KdError:
    """The one line for a model or tokenizer that did not load. A name that is not on this disk was meant either
    as a mistyped path or as a Hub id: say which it can be, rather than the Hub client's message about repo ids."""
    first = (str(e).splitlines() or [type(e).__name__])[0]
    if Path(name).expanduser().exists():
        return KdError(f"cannot load {what} {name!r}: {first}")
    if not _HUB_ID.match(name):
        return KdError(f"{what} {name!r} not found: no such directory here, and not a Hugging Face Hub id "
                       "(OWNER/NAME); check the path")
    return KdError(f"{what} {name!r} not found: no such directory here, and the Hub repo {name!r} could not be "
                   f"loaded ({first})")


def resolve_model_path(model: str) -> str:
    """A `kdcache train` run directory stands for its final/ model (what eval and teacher load); anything else is
    used as given."""
    p = Path(model).expanduser()
    if p.is_dir() and not (p / "config.json").exists() and (p / "final" / "config.json").exists():
        return str(p / "final")
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer_files(directory: str | Path) -> bool:
    """True when a local model directory carries its own tokenizer."""
    d = Path(directory)
    return d.is_dir() and any((d / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(name_or_path: str) -> Any:
    """AutoTokenizer from a local directory or a hub id; a failure is a one-line `KdError`."""
    from transformers import AutoTokenizer

    if not name_or_path:
        raise KdError("no tokenizer given (--tokenizer PATH_OR_ID)")
    if _looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise KdError(f"tokenizer directory not found: {name_or_path}")
    try:
        return AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser())
                                             if _looks_local(name_or_path) else name_or_path)
    except (OSError, ValueError, KeyError) as e:
        raise load_error("tokenizer", name_or_path, e) from None


def own_tokenizer(name_or_path: str) -> Any | None:
    """The tokenizer a model carries: a local directory's tokenizer files (None when it has none: a bare
    checkpoint), or a hub id's tokenizer. Loading failures are one-line `KdError`s."""
    if _looks_local(name_or_path):
        d = Path(name_or_path).expanduser()
        return load_tokenizer(str(d)) if has_tokenizer_files(d) else None
    return load_tokenizer(name_or_path)


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def set_special_token_ids(model: Any, tokenizer: Any) -> dict[str, int | None]:
    """Make the model's config and generation config carry the tokenizer's bos/eos/pad ids; returns them.

    The tokenizer is the authority: a config built from defaults says eos = 2 (LlamaConfig), which in
    the demo tokenizer is the pad token, so `model.generate` never stopped. A generation config that
    already stops at several ids including the tokenizer's eos (chat models: end of turn and end of
    text) keeps its list.
    """
    ids = {key: getattr(tokenizer, key, None) for key in SPECIAL_IDS}
    gen = getattr(model, "generation_config", None)
    for key, value in ids.items():
        setattr(model.config, key, value)
        if gen is None:
            continue
        old = getattr(gen, key, None)
        if key == "eos_token_id" and isinstance(old, list) and value in old:
            continue
        setattr(gen, key, value)
    return ids


PARALLEL = ("none", "tp", "device_map")


def load_causal_lm(name_or_path: str, device: torch.device, dtype: torch.dtype, revision: str | None = None,
                   parallel: str = "none") -> Any:
    """AutoModelForCausalLM in eval mode with `dtype` (at hub `revision`); errors are one line.

    parallel: "none" -> the whole model on `device`; "tp" -> transformers' tensor-parallel plan
    (`tp_plan="auto"`) over the process group torchrun started (every rank holds 1/world of each layer);
    "device_map" -> accelerate's `device_map="auto"`: the layers spread over the GPUs this process sees
    (one process, no collectives). Either way the model can exceed one device's memory.
    """
    from transformers import AutoModelForCausalLM

    if parallel not in PARALLEL:
        raise KdError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if _looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise KdError(f"model directory not found: {name_or_path}")
    path = str(Path(name_or_path).expanduser()) if _looks_local(name_or_path) else name_or_path
    extra: dict[str, Any] = {}
    if parallel == "tp":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise KdError("--parallel tp needs torchrun (one process per GPU of the tensor-parallel group)")
        extra["tp_plan"] = "auto"
    elif parallel == "device_map":
        extra["device_map"] = "auto" if device.type == "cuda" else {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision or None, **extra)
    except ImportError as e:  # device_map needs accelerate
        raise KdError(f"cannot load model {name_or_path!r} with --parallel {parallel}: {e} "
                      "(pip install 'kdcache[trainers]' for accelerate)") from None
    except (OSError, ValueError, KeyError) as e:
        raise load_error("model", name_or_path, e) from None
    return (model if parallel != "none" else model.to(device)).eval()


def input_device(model: Any) -> torch.device:
    """Where a (possibly layer-split) model takes its input ids: its input embedding's device."""
    return model.get_input_embeddings().weight.device


def model_vocab_size(model: Any) -> int:
    """Rows of the output head: the model's (possibly padded) vocabulary size."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def context_length(model: Any) -> int | None:
    """Longest sequence the model accepts, from its config (None when it states none)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
