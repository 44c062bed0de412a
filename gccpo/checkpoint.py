"""Checkpoints you can trust: a SHA-256 manifest of every file, a trainer state of tensors and
plain data read with ``torch.load(weights_only=True)``, and a resume that verifies both before
anything loads, falling back from a bad latest checkpoint to the previous complete one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError


#: The file in every checkpoint folder that lists every other file with its SHA-256 (JSON).
MANIFEST = "checkpoint.sha256"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_LEFTOVER = re.compile(r"\.checkpoint-(\d+)\.(old|partial)")
_STATE_KEYS: dict[str, type | tuple[type, ...]] = {
    "step": int, "task_cursor": int, "optimizer": (dict, type(None)), "scheduler": dict,
    "generator": torch.Tensor, "torch_rng": torch.Tensor, "python_rng": (tuple, list)}


class CheckpointError(ConfigError):
    """A checkpoint that cannot be trusted or used (missing, incomplete, changed on disk, not
    plain data): nothing of it is loaded."""


class UnsafeCheckpointError(CheckpointError):
    """A ``trainer_state.pt`` whose checksums match but that needs pickled code to load: the run
    directory itself is not trusted, so no other checkpoint of it is tried either."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` (recursively, the manifest excepted) by its relative POSIX path."""
    return {f.relative_to(folder).as_posix(): f for f in sorted(folder.rglob("*"))
            if (f.is_file() or f.is_symlink()) and f.relative_to(folder).as_posix() != MANIFEST}


def write_manifest(folder: Path) -> None:
    """Write ``folder/checkpoint.sha256``: the SHA-256 of every file in the checkpoint."""
    manifest = {name: _sha256(f) for name, f in _files(folder).items()}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _read_manifest(folder: Path) -> dict[str, str]:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (an incomplete checkpoint, or one written by an older "
                              "gccpo): its files cannot be verified")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in manifest.items()):
        raise CheckpointError(f"{path}: not a mapping of file -> sha256")
    return manifest


def verify_files(folder: Path) -> None:
    """Check that ``folder`` holds exactly the files of its manifest, with their checksums."""
    manifest, on_disk = _read_manifest(folder), _files(folder)
    links = [name for name, f in on_disk.items() if f.is_symlink()]
    missing, extra = sorted(set(manifest) - set(on_disk)), sorted(set(on_disk) - set(manifest))
    for problem, names in (("symbolic links", links), ("missing files", missing),
                           ("files not written with the checkpoint", extra)):
        if names:
            raise CheckpointError(f"{folder}: {problem}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    for name, digest in manifest.items():
        if _sha256(on_disk[name]) != digest:
            raise CheckpointError(f"{folder / name}: checksum mismatch (changed or corrupted after it was written)")


def load_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer_state.pt`` read with ``weights_only=True`` (tensors and plain data only; a pickle
    that needs any other code is refused, never run) and checked for the keys a resume needs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights only" in text.lower():
            found = re.search(r"[^\n]*global[^\n]*", text, re.IGNORECASE)  # "... unsupported GLOBAL posix.system ..."
            why = found.group(0).strip() if found else "weights-only load failed"
            raise UnsafeCheckpointError(f"{path}: holds objects that need pickled code to load; refused without "
                                        f"running it ({why})") from None
        raise CheckpointError(f"{path}: unreadable ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - any other failure to read is an unusable checkpoint
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a trainer state (a {type(state).__name__})")
    for key, kind in _STATE_KEYS.items():
        if key not in state or not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise CheckpointError(f"{path}: {key!r} missing or of the wrong type")
    return state


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint folder whose every file matches its manifest."""
    if not (folder / "trainer_state.pt").is_file():
        raise CheckpointError(f"{folder}: no trainer_state.pt (not a checkpoint of this trainer)")
    verify_files(folder)
    return load_trainer_state(folder / "trainer_state.pt")


def checkpoint_folders(run: Path) -> list[Path]:
    """``run``'s ``checkpoint-<step>`` folders, latest first (other names, e.g. ``checkpoint-final``,
    and dot-folders are not checkpoints of the run)."""
    found = [(int(m.group(1)), c) for c in run.iterdir() if c.is_dir() and (m := _CHECKPOINT.fullmatch(c.name))]
    return [c for _, c in sorted(found, key=lambda sc: sc[0], reverse=True)]


def run_folder(path: str | Path) -> Path:
    """The run directory of ``--resume PATH`` (a run directory, or a checkpoint folder in one)."""
    p = Path(path)
    return p.parent if _CHECKPOINT.fullmatch(p.name) or (p / "trainer_state.pt").exists() else p


def find_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any], list[str]]:
    """``(folder, trainer state, notes)`` of the checkpoint to resume from.

    ``path`` a checkpoint folder: that one, verified, or :class:`CheckpointError`. ``path`` a run
    directory: its latest checkpoint that verifies; each later one that does not is skipped with a
    note saying why. An :class:`UnsafeCheckpointError` (code in a checksummed state) stops the
    scan: nothing of that run is trusted.
    """
    p = Path(path)
    if _CHECKPOINT.fullmatch(p.name) or (p / "trainer_state.pt").exists() or (p / MANIFEST).exists():
        if not p.is_dir():
            raise CheckpointError(f"--resume {path}: no such checkpoint")
        return p, verify_checkpoint(p), []
    if not p.is_dir():
        raise CheckpointError(f"--resume {path}: no such run directory or checkpoint")
    notes: list[str] = []
    for folder in checkpoint_folders(p):
        try:
            return folder, verify_checkpoint(folder), notes
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            notes.append(f"skipping {folder.name}: {exc}")
    if not notes:
        raise CheckpointError(f"--resume {path}: neither a checkpoint (trainer_state.pt) nor a run directory with "
                              "checkpoint-<step> folders")
    raise CheckpointError(f"--resume {path}: no usable checkpoint ({'; '.join(notes)})")


def recover_interrupted_saves(run: Path) -> list[str]:
    """Finish or undo saves that were killed in ``run``: a ``.checkpoint-<step>.old`` (the previous
    copy during a re-save's swap) is moved back into place when the swap never completed, or the
    complete new copy (``.partial`` with its manifest) is; every leftover dot-folder is removed.
    Returns what was done, one line each."""
    if not run.is_dir():
        return []
    notes = []
    leftovers = sorted((m.group(2), int(m.group(1)), c) for c in run.iterdir()
                       if c.is_dir() and (m := _LEFTOVER.fullmatch(c.name)))
    for kind, step, folder in leftovers:  # "old" sorts before "partial"
        final = run / f"checkpoint-{step}"
        if kind == "old" and not final.exists():
            partial = run / f".checkpoint-{step}.partial"
            newer = partial if (partial / MANIFEST).is_file() else folder
            os.replace(newer, final)
            notes.append(f"{final.name}: restored from {newer.name} (a save was interrupted during its swap)")
        if folder.exists():
            shutil.rmtree(folder)
            notes.append(f"removed {folder.name} (left by an interrupted save)")
    return notes


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def plain_state(obj: Any, where: str = "state") -> Any:
    """``obj`` as tensors and plain Python data only (dataclasses become dicts, numpy scalars
    Python numbers), so that ``torch.load(weights_only=True)`` reads it; anything else raises
    TypeError naming where it is."""
    if isinstance(obj, _PLAIN):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain_state(dataclasses.asdict(obj), where)
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, (str, int))]
        if bad:
            raise TypeError(f"{where}: key {bad[0]!r} is not a str or int")
        return {k: plain_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{where}: a {type(obj).__name__} is not a tensor or plain data (a checkpoint holding it "
                    "would need pickled code to load)")


def _non_finite(model: Any, where: Any) -> None:
    """Raise :class:`CheckpointError` when a floating-point parameter or buffer of ``model`` (loaded
    from ``where``) holds a NaN or inf."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    bad = {n: int((~torch.isfinite(t)).sum()) for n, t in tensors if t.is_floating_point()}
    bad = {n: k for n, k in bad.items() if k}
    if bad:
        raise CheckpointError(f"{where}: {sum(bad.values())} non-finite values in {len(bad)} weight tensor(s) "
                              f"({', '.join(list(bad)[:3])}); not resuming")
