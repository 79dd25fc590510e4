"""Loading tokenizers and causal LMs by local path or hub id, with one-line errors.

The same code path serves a hub id (`Qwen/Qwen2.5-7B`) and a local directory; tests exercise it on
local directories because this project's CI has no model hub. A local `.gguf` file (llama.cpp's format) is read
through transformers' GGUF support (the `gguf` package, `pip install 'kdcache[gguf]'`): the model dequantized to a
plain float model, the tokenizer from the same file.
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


GGUF_EXTRA = "pip install 'kdcache[gguf]'"


def is_gguf(name: str | Path) -> bool:
    """True for a path naming a `.gguf` file (whether or not it exists): a model and its tokenizer in one file."""
    return str(name).lower().endswith(".gguf")


def _missing_package(module: str, min_version: str) -> str | None:
    """None when `module` imports at `min_version` or later, else what is wrong with it."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    try:
        importlib.import_module(module)
    except ImportError:
        return "not installed"
    try:
        have = version(module)
    except PackageNotFoundError:
        return None
    from packaging.version import InvalidVersion, Version

    try:
        return None if Version(have) >= Version(min_version) else f"{have} installed, {min_version} or later needed"
    except InvalidVersion:
        return None


def check_gguf(what: str, name: str, model: bool = False) -> Path:
    """The `.gguf` file `name` as a Path, after checking that it exists, starts with the GGUF magic, and that the
    packages transformers reads it with are installed (the `gguf` package; accelerate as well for a `model`).
    Each failure is a one-line `KdError`."""
    p = Path(name).expanduser()
    if not p.is_file():
        raise KdError(f"{what} file not found: {name}" if not p.exists() else f"{what} {name!r} is not a file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise KdError(f"cannot load {what} {name!r}: not a GGUF file (it does not start with the GGUF magic bytes)")
    # The versions transformers itself requires (GGUF_MIN_VERSION, ACCELERATE_MIN_VERSION).
    for module, least in (("gguf", "0.10.0"),) + ((("accelerate", "1.1.0"),) if model else ()):
        why = _missing_package(module, least)
        if why is not None:
            raise KdError(f"loading the GGUF file {name!r} needs the {module} package ({why}): {GGUF_EXTRA}")
    return p


def gguf_error(what: str, name: str, e: BaseException) -> KdError:
    """The one line for a `.gguf` file that exists, starts like one, and still did not load (damaged, truncated, or an
    architecture or tokenizer transformers cannot read from GGUF)."""
    first = (str(e).splitlines() or [type(e).__name__])[0] or type(e).__name__
    return KdError(f"cannot load {what} from GGUF file {name!r}: {first}")


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


def local_model(model: str) -> str:
    """A `kdcache train --out URL` run (or its final/) -> the local, checked copy of its final/ model
    (`pipeline.storage.synced.local_unit`: downloaded once per machine); anything else as given."""
    from pipeline.storage import is_url

    if not is_url(model):
        return model
    from pipeline.storage.synced import local_unit

    url = str(model).rstrip("/")
    return str(local_unit(url[: -len("/final")] if url.endswith("/final") else url, "final"))


def resolve_model_path(model: str) -> str:
    """A `kdcache train` run directory stands for its final/ model (what eval loads), also at a URL
    (`local_model`); anything else is used as given."""
    local = local_model(model)
    if local != model:
        return local
    p = Path(model).expanduser()
    if p.is_dir() and not (p / "config.json").exists() and (p / "final" / "config.json").exists():
        return str(p / "final")
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer_files(directory: str | Path) -> bool:
    """True when a local model directory carries its own tokenizer (a GGUF file always does: its metadata)."""
    d = Path(directory)
    if is_gguf(d):
        return d.is_file()
    return d.is_dir() and any((d / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(name_or_path: str) -> Any:
    """AutoTokenizer from a local directory or a hub id; a failure is a one-line `KdError`."""
    from transformers import AutoTokenizer

    if not name_or_path:
        raise KdError("no tokenizer given (--tokenizer PATH_OR_ID)")
    if is_gguf(name_or_path):
        p = check_gguf("tokenizer", name_or_path)
        try:
            return _drop_unlisted_tokens(AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name))
        except Exception as e:  # noqa: BLE001 -- a damaged file fails in the reader with any error type
            raise gguf_error("tokenizer", name_or_path, e) from None
    if _looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise KdError(f"tokenizer directory not found: {name_or_path}")
    try:
        return AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser())
                                             if _looks_local(name_or_path) else name_or_path)
    except (OSError, ValueError, KeyError) as e:
        raise load_error("tokenizer", name_or_path, e) from None


def _drop_unlisted_tokens(tok: Any) -> Any:
    """A tokenizer read from a GGUF file, without the ids beyond the file's own vocabulary.

    transformers builds a byte-level GGUF vocabulary with `GPT2Tokenizer`, whose default unk/bos/eos token
    `<|endoftext|>` is appended as a new id when the file does not list it (Llama 3 files, for one): a tokenizer one
    id longer than the model's head, with a vocabulary hash no other copy of the tokenizer has. Such trailing added
    tokens are removed here (logged), so the tokenizer maps exactly the file's ids.
    """
    import json

    backend = getattr(tok, "_tokenizer", None)
    if backend is None:
        return tok
    n = max(backend.get_vocab(with_added_tokens=False).values(), default=-1) + 1
    data = json.loads(backend.to_str())
    added = data.get("added_tokens") or []
    keep = [a for a in added if a["id"] < n]
    if len(keep) == len(added):
        return tok
    from tokenizers import Tokenizer

    log.info("GGUF tokenizer: dropped %s, added by transformers beyond the file's %d ids",
             ", ".join(repr(a["content"]) for a in added if a["id"] >= n), n)
    data["added_tokens"] = keep
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tok


def own_tokenizer(name_or_path: str) -> Any | None:
    """The tokenizer a model carries: a local directory's tokenizer files (None when it has none: a bare
    checkpoint), a GGUF file's tokenizer, or a hub id's tokenizer. Loading failures are one-line `KdError`s."""
    if is_gguf(name_or_path):
        return load_tokenizer(name_or_path)
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

    A `.gguf` file is dequantized into a plain float model of `dtype` (`load_gguf_model`).

    parallel: "none" -> the whole model on `device`; "tp" -> transformers' tensor-parallel plan
    (`tp_plan="auto"`) over the process group torchrun started (every rank holds 1/world of each layer);
    "device_map" -> accelerate's `device_map="auto"`: the layers spread over the GPUs this process sees
    (one process, no collectives). Either way the model can exceed one device's memory.
    """
    from transformers import AutoModelForCausalLM

    if parallel not in PARALLEL:
        raise KdError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    gguf = is_gguf(name_or_path)
    if gguf:
        path = str(check_gguf("model", name_or_path, model=True))
    elif _looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise KdError(f"model directory not found: {name_or_path}")
    else:
        path = str(Path(name_or_path).expanduser()) if _looks_local(name_or_path) else name_or_path
    extra: dict[str, Any] = {}
    if parallel == "tp":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise KdError("--parallel tp needs torchrun (one process per GPU of the tensor-parallel group)")
        extra["tp_plan"] = "auto"
    elif parallel == "device_map":
        extra["device_map"] = "auto" if device.type == "cuda" else {"": str(device)}
    if gguf:
        try:
            model = load_gguf_model(path, dtype, **extra)
        except Exception as e:  # noqa: BLE001 -- a damaged file fails in the reader with any error type
            raise gguf_error("model", name_or_path, e) from None
        return (model if parallel != "none" else model.to(device)).eval()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision or None, **extra)
    except ImportError as e:  # device_map needs accelerate
        raise KdError(f"cannot load model {name_or_path!r} with --parallel {parallel}: {e} "
                      "(pip install 'kdcache[trainers]' for accelerate)") from None
    except (OSError, ValueError, KeyError) as e:
        raise load_error("model", name_or_path, e) from None
    return (model if parallel != "none" else model.to(device)).eval()


def load_gguf_model(path: str | Path, dtype: torch.dtype, **extra: Any) -> Any:
    """A causal LM from a `.gguf` file as a plain float model of `dtype`: every weight dequantized, no quantizer
    and no `quantization_config` left (so it trains, and `save_pretrained` writes an ordinary checkpoint)."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    try:  # transformers >= 5 may keep GGUF blocks packed for some architectures: ask for dense weights
        from transformers import GgufConfig

        extra.setdefault("quantization_config", GgufConfig(gguf_file=p.name, dequantize=True))
    except ImportError:  # older transformers always dequantize
        pass
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype, **extra)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:  # the dense weights are the model now
        model.hf_quantizer = None
    return model


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
