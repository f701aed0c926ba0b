"""Checkpoint folders of the recipe: verification before use, pruning off the critical path, the
``output_dir`` lock.

A checkpoint ``checkpoints/step_N/`` holds a DCP sharded checkpoint (``.metadata`` + ``__R_0.distcp``
files), one ``extra_rank{r}.pt`` per rank and ``meta.json`` (written last, with the world size). It is
*verified* when ``meta.json`` reads, ``.metadata`` reads, every file the metadata lists exists and is
long enough for the byte ranges it lists, and every rank's extra-state file exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

_STEP_RE = re.compile(r"step_(\d+)")


def step_folders(root: Path) -> list[Path]:
    """``step_N`` folders under ``root`` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[1].split(".")[0])


def checkpoint_problem(path: Path) -> str | None:
    """None when ``path`` is a usable checkpoint, else what is wrong with it (one sentence)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta_path = path / "meta.json"
    if not meta_path.exists():
        return "meta.json is missing (the save did not finish)"
    try:
        meta = json.loads(meta_path.read_text())
        world = int(meta["world"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"meta.json is unreadable ({err})"
    if not (path / ".metadata").exists():
        return ".metadata (the DCP index) is missing"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - any failure to parse means the index is damaged
        return f".metadata is unreadable ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = str(info.relative_path)
        needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
    if not needed:
        return ".metadata lists no data files"
    for rel, end in sorted(needed.items()):
        f = path / rel
        if not f.exists():
            return f"shard file {rel} listed in .metadata is missing"
        if f.stat().st_size < end:
            return f"shard file {rel} is truncated ({f.stat().st_size} bytes, .metadata needs {end})"
    for rank in range(world):
        if not (path / f"extra_rank{rank}.pt").exists():
            return f"extra_rank{rank}.pt (rank {rank}'s scheduler, data position and RNG) is missing"
    return None


def newest_verified(root: Path, *, fallback: bool = True) -> Path:
    """The newest checkpoint under ``root`` that passes :func:`checkpoint_problem`.

    Damaged newer ones are skipped with a warning naming the folder and the problem; with
    ``fallback=False`` the first damaged one is an error instead.

    Raises:
        ValueError: no usable checkpoint (each damaged folder named), or a damaged one and no fallback.
    """
    damaged = []
    for path in reversed(step_folders(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in damaged:
                warnings.warn(f"resume: skipping damaged checkpoint {bad}: {why}; using {path}", stacklevel=2)
            return path
        if not fallback:
            raise ValueError(f"config key 'resume': checkpoint {path} is damaged: {problem}")
        damaged.append((path, problem))
    detail = "; ".join(f"{p}: {why}" for p, why in damaged)
    raise ValueError(f"config key 'resume': no usable checkpoint under {root}"
                     + (f" (damaged: {detail})" if detail else ""))


def prune_in_background(root: Path, keep: int) -> threading.Thread | None:
    """Keep the ``keep`` newest verified checkpoints; delete older ones without blocking the caller.

    Each old folder is first renamed to ``step_N.deleting`` (instant, so resume never sees a half-deleted
    checkpoint), then removed in a daemon thread while training continues. Leftover ``.deleting`` folders
    (a crash mid-delete) are removed too. Call on one rank only (rank 0).
    """
    folders = step_folders(root)
    kept = [p for p in folders if checkpoint_problem(p) is None][-keep:]
    oldest_kept = _step_of(kept[0]) if kept else -1
    doomed = [p for p in folders if p not in kept and _step_of(p) < oldest_kept]
    doomed += list(root.glob("*.deleting")) if root.is_dir() else []
    renamed = []
    for p in doomed:
        target = p if p.name.endswith(".deleting") else p.with_name(p.name + ".deleting")
        if target != p:
            os.replace(p, target)
        renamed.append(target)
    if not renamed:
        return None
    thread = threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in renamed],
                              name="checkpoint-prune", daemon=True)
    thread.start()
    return thread


class OutputDirLock:
    """``output_dir/.lock``: one run at a time per output folder (created with O_EXCL, works on shared
    filesystems). The file holds host, pid and start time of the holder.

    Stale locks: a lock whose holder is on this host and no longer running is taken over with a warning.
    A lock held from another host is never broken automatically (this host cannot see that process):
    the error names the file and its holder; delete the file once that run is known to be dead.
    """

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / ".lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._stale(holder):
                    warnings.warn(f"output_dir lock {self.path}: taking over a stale lock of a dead process "
                                  f"({holder})", stacklevel=2)
                    self.path.unlink(missing_ok=True)
                    continue
                raise RuntimeError(
                    f"config key 'output_dir': {self.path.parent} is in use by another run (lock {self.path} "
                    f"held by {holder}). Use another output_dir, or delete {self.path} if that run is dead."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RuntimeError(f"config key 'output_dir': could not take the lock {self.path}")

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
