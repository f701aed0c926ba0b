"""Damaged checkpoints, the output_dir lock, pruning, and the train-as-eval guard (in-process, seconds)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from recipe_testutils import ROOT, TINY

from recipes.checkpoint import OutputDirLock, checkpoint_problem, newest_verified, prune_in_background, step_folders

WORLD = 2
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _save(root, step: int, world: int = WORLD):
    """A checkpoint laid out as the recipe writes it: DCP shards + .metadata, extra_rank*.pt, meta.json."""
    import torch.distributed.checkpoint as dcp

    path = root / f"step_{step:07d}"
    state = {"model": {"w": torch.randn(37, 5), "b": torch.randn(5)}, "optim": {"m": torch.randn(11)}}
    dcp.save(state, checkpoint_id=str(path))  # no process group: one writer
    for r in range(world):
        torch.save({"step": step, "world": world}, path / f"extra_rank{r}.pt")
    (path / "meta.json").write_text(json.dumps({"step": step, "world": world, "complete": True}))
    return path


def _damage(path, what: str) -> None:
    if what == "shard":
        next(path.glob("*.distcp")).unlink()
    elif what == "truncated":
        shard = next(path.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:10])
    elif what == "metadata":
        (path / ".metadata").unlink()
    elif what == "rank_extra":
        (path / f"extra_rank{WORLD - 1}.pt").unlink()
    elif what == "meta_json":
        (path / "meta.json").unlink()


DAMAGES = {"shard": "is missing", "truncated": "truncated", "metadata": ".metadata", "rank_extra": "extra_rank1.pt",
           "meta_json": "meta.json"}


@pytest.mark.parametrize("what", list(DAMAGES))
def test_damaged_newest_falls_back_with_warning_naming_it(tmp_path, what):
    old, new = _save(tmp_path, 3), _save(tmp_path, 6)
    assert checkpoint_problem(old) is None and checkpoint_problem(new) is None
    _damage(new, what)
    problem = checkpoint_problem(new)
    assert problem is not None and DAMAGES[what] in problem, problem
    with pytest.warns(UserWarning, match="step_0000006") as seen:
        assert newest_verified(tmp_path) == old
    assert DAMAGES[what] in str(seen[0].message)
    with pytest.raises(ValueError, match=r"'resume'.*step_0000006.*damaged"):
        newest_verified(tmp_path, fallback=False)


@pytest.mark.parametrize("what", ["shard", "metadata", "rank_extra"])
def test_only_damaged_checkpoints_fail_naming_the_folder(tmp_path, what):
    _damage(_save(tmp_path, 2), what)
    with pytest.raises(ValueError, match=r"no usable checkpoint.*step_0000002") as err:
        newest_verified(tmp_path)
    assert DAMAGES[what] in str(err.value)
    with pytest.raises(ValueError, match="no usable checkpoint"):
        newest_verified(tmp_path / "absent")


def test_pruning_renames_then_deletes_in_background(tmp_path):
    paths = [_save(tmp_path, s) for s in (1, 2, 3, 4)]
    _damage(paths[3], "shard")  # the newest is damaged: kept for inspection, never counted as kept
    (tmp_path / "step_0000000.deleting").mkdir()  # leftover of a crash mid-delete
    thread = prune_in_background(tmp_path, keep=2)
    assert thread is not None
    assert [p.name for p in step_folders(tmp_path)] == ["step_0000002", "step_0000003", "step_0000004"]
    thread.join(timeout=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000003", "step_0000004"]
    assert prune_in_background(tmp_path, keep=2) is None


def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path):
    first = OutputDirLock(tmp_path)
    first.acquire()
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RuntimeError, match=r"'output_dir'.*in use by another run.*\.lock"):
        OutputDirLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / ".lock").exists()
    # a lock left by a process that died (same host): taken over with a warning
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with pytest.warns(UserWarning, match="stale lock"):
        OutputDirLock(tmp_path).acquire()
    # a lock from another host is never broken automatically
    (tmp_path / ".lock").write_text(json.dumps({"host": "other-node", "pid": 1}))
    with pytest.raises(RuntimeError, match="delete .*lock"):
        OutputDirLock(tmp_path).acquire()


def test_run_on_a_locked_output_dir_is_refused(tmp_path):
    from recipes.train_safedpo import run

    out = tmp_path / "out"
    OutputDirLock(out).acquire()  # held by this (live) process, as a concurrent run would
    with pytest.raises(RuntimeError, match="in use by another run"):
        run({**TINY, "output_dir": str(out), "max_steps": 1})
    assert (out / ".lock").exists()  # the refused run did not remove the other run's lock


def _single_file_dataset(tmp_path):
    src = ROOT / "safedpo_kernels" / "data" / "fixtures" / "pku_tiny" / "train.jsonl"
    dst = tmp_path / "pairs.jsonl"
    shutil.copy(src, dst)
    return dst


def test_single_file_without_eval_split_is_refused(tmp_path):
    from recipes.train_safedpo import run

    data = _single_file_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"'eval_split'.*no separate 'test' split.*eval_fraction"):
        run({**TINY, "dataset": str(data), "output_dir": str(tmp_path / "a"), "max_steps": 1})
    folder = tmp_path / "unsplit"
    folder.mkdir()
    shutil.copy(data, folder / "part-0.jsonl")
    with pytest.raises(ValueError, match="'eval_split'"):
        run({**TINY, "dataset": str(folder), "output_dir": str(tmp_path / "b"), "max_steps": 1})


def test_eval_fraction_is_carved_out_of_training_and_reported(tmp_path, capsys):
    from recipes.train_safedpo import Recipe

    data = _single_file_dataset(tmp_path)
    recipe = Recipe({**TINY, "dataset": str(data), "train_limit": 40, "eval_limit": None, "eval_fraction": 0.25,
                     "output_dir": str(tmp_path / "c")})
    try:
        recipe._init_distributed()
        recipe._load_tokenizer()
        bundle = recipe._load_data()
    finally:
        recipe.cleanup()
    held = bundle.reports["eval/held_out"]
    assert held == {"eval_fraction": 0.25, "held_out_pairs": 10, "train_pairs_left": 30, "seed": TINY["seed"]}
    assert len(bundle.eval_raw) == 10
    def rows(ds):
        return {(tuple(r["chosen_input_ids"]), tuple(r["rejected_input_ids"])) for r in ds}

    assert not rows(bundle.train) & rows(bundle.eval_raw)  # the 40 rows are distinct: disjoint splits
    assert "held_out_pairs" in capsys.readouterr().out
