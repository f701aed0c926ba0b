"""Console entry points of the FSDP2 recipe: ``safedpo-train`` and ``safedpo-plan``.

    safedpo-train tiny_cpu --nproc-per-node 2                     # a shipped config, by name
    safedpo-train my.yaml lr=1e-6 model_config.hidden_size=64     # a YAML file + key=value overrides
    safedpo-train llama2_13b_8x80gb --nnodes 2 --rdzv-endpoint HOST:29500 --rdzv-id run1
    safedpo-plan llama2_13b_8x80gb --gpus 8 --gpu-mem 80

``safedpo-train`` launches ``python -m torch.distributed.run`` (torchrun) on the recipe script, as
torchtune's ``tune run`` does: options it does not know (``--nnodes``, ``--rdzv-endpoint``, ...) go to
torchrun unchanged. The recipe lives in the repository's ``recipes/`` folder (scripts, not library
code: the package never imports it). It is found, in this order, as an importable ``recipes``
package that holds ``train_safedpo.py`` (a clone on ``sys.path``, an editable install), in
``$SAFEDPO_RECIPES_DIR``, or next to the installed package (a clone). This module imports neither
transformers, and torch only to count GPUs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

RECIPE = "train_safedpo.py"
PLANNER = "plan_memory.py"


def recipes_dir() -> Path:
    """The folder holding ``train_safedpo.py`` and ``configs/``.

    Raises:
        FileNotFoundError: naming the places searched and how to point at a clone.
    """
    tried = []
    spec = importlib.util.find_spec("recipes")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            tried.append(loc)
            if (Path(loc) / RECIPE).exists():
                return Path(loc)
    env = os.environ.get("SAFEDPO_RECIPES_DIR")
    if env:
        tried.append(env)
        if (Path(env) / RECIPE).exists():
            return Path(env)
    beside = Path(__file__).resolve().parents[1] / "recipes"
    tried.append(str(beside))
    if (beside / RECIPE).exists():
        return beside
    raise FileNotFoundError(
        f"safedpo-train: {RECIPE} not found (looked in: {', '.join(tried)}). The recipe ships with the "
        "source tree: clone the repository and run from it, or set SAFEDPO_RECIPES_DIR=/path/to/clone/recipes")


def resolve_config(name: str, folder: Path) -> Path:
    """A YAML path, or the name of a shipped config (``tiny_cpu`` -> ``recipes/configs/tiny_cpu.yaml``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    for candidate in (folder / "configs" / name, folder / "configs" / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in (folder / "configs").glob("*.yaml"))
    raise FileNotFoundError(f"config: {name!r} is neither a file nor a shipped config ({', '.join(shipped)})")


def _default_nproc() -> str:
    try:
        import torch

        return str(torch.cuda.device_count() or 1)
    except ImportError:  # pragma: no cover - torch is a dependency
        return "1"


def build_train_command(argv: list[str]) -> list[str]:
    """The torchrun command line of ``safedpo-train ARGV`` (no process started)."""
    parser = argparse.ArgumentParser(
        prog="safedpo-train", description="Launch the SafeDPO / DPO / SFT FSDP2 recipe with torchrun.",
        epilog="Other --options are passed to torchrun (e.g. --nnodes 2 --rdzv-endpoint HOST:29500).")
    parser.add_argument("config", help="a YAML file or a shipped config name (tiny_cpu, llama2_13b_8x80gb, ...)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (nested: a.b=value)")
    parser.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc",
                        help="processes per node (default: the number of GPUs, else 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args, torchrun_args = parser.parse_known_intermixed_args(argv)
    folder = recipes_dir()
    config = resolve_config(args.config, folder)
    multi_node = any(a.startswith(("--nnodes", "--rdzv", "--master")) for a in torchrun_args)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc or _default_nproc()}"]
    cmd += ([] if multi_node else ["--standalone"]) + torchrun_args
    cmd += [str(folder / RECIPE), "--config", str(config), *args.overrides]
    return cmd + (["--dry-run"] if args.dry_run else [])


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def train(argv: list[str] | None = None) -> int:
    """``safedpo-train``: exit code of torchrun (``--dry-run``: print the command, 0; 2: recipe or
    config not found)."""
    try:
        cmd = build_train_command(sys.argv[1:] if argv is None else argv)
    except FileNotFoundError as err:
        return _fail(err)
    if cmd[-1] == "--dry-run":
        print(" ".join(cmd[:-1]))
        return 0
    env = dict(os.environ)
    root = str(Path(cmd[cmd.index("--config") - 1]).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.call(cmd, env=env)


def plan(argv: list[str] | None = None) -> int:
    """``safedpo-plan CONFIG [--gpus N --gpu-mem GiB --measure ...] [key=value ...]``: the memory planner."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        folder = recipes_dir()
        if argv and not argv[0].startswith("-"):
            argv = ["--config", str(resolve_config(argv[0], folder)), *argv[1:]]
    except FileNotFoundError as err:
        return _fail(err)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder.parent), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.call([sys.executable, str(folder / PLANNER), *argv], env=env)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train())
