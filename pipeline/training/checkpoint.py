"""Training checkpoints: `OUT/checkpoints/step_NNNNNN/` written under a temporary name, then renamed.

A checkpoint holds the model (a Hugging Face directory), and `trainer_state.pt` with the optimizer,
scheduler, RNG states (torch, CUDA, the gate's generator), the reader's position and LATF state,
so resuming continues the exact same run: 2N steps straight equal N + resume + N on CPU.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import KdError

STATE_FILE = "trainer_state.pt"


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:06d}"


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(), "python": random.getstate(),
            "gate": generator.get_state() if generator is not None else None}


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if generator is not None and state["gate"] is not None:
        generator.set_state(state["gate"])


def save_checkpoint(out: Path, step: int, model: Any, state: dict[str, Any], keep: int = 2,
                    state_dict: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step` atomically; keep only the newest `keep` complete ones. `state_dict`: the
    model's weights when they are not the model's own tensors (gathered from FSDP shards)."""
    final = step_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # A copy: save_pretrained edits the dict it is given (tied weights), and the same gathered weights are saved
    # again for final/.
    model.save_pretrained(tmp, state_dict=dict(state_dict) if state_dict is not None else None)
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(out)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def replace_dir(tmp: Path, dst: Path) -> Path:
    """Swap the finished directory `tmp` in at `dst`: the old one moves aside to DST.old first, so at every
    instant `dst` is either the old complete directory or the new one (after a kill between the two
    renames, `recover_dir` puts the old one back)."""
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def recover_dir(dst: Path) -> None:
    """Undo a `replace_dir` killed between its renames: DST.old without DST goes back to DST."""
    old = dst.with_name(dst.name + ".old")
    if old.is_dir() and not dst.exists():
        os.replace(old, dst)


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are ignored)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file())


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1] if found else None


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:
        raise KdError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to resume from an older one") from None
