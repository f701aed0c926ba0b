#!/usr/bin/env python
"""Chooses the alignment step budget of tiny_compare_long.yaml on the VALIDATION split, one rule for every method.

    python recipes/select_budget.py                          # lr of the config, budgets 40 80 120 160 240, 2 processes
    python recipes/select_budget.py --lrs 3e-5 1e-4 3e-4     # the lr grid too (the lr rule re-checked at each budget)
    python recipes/select_budget.py --report-only            # re-apply the rule to the cells already run

The rule, fixed before any cell was run (the same one that chose the learning rate, docs/compare.md):

    *the largest budget (steps x the config's pairs per step) at which every method of the paper's main
    comparison (SafeDPO, DPO-Helpful, DPO-Harmless, DPO-SafeBetter) keeps the SFT model's NLL per token of
    its validation generations at most 1.5 x that of the SFT model's own validation generations*,

measured as the learning rate was: seed 0, pure sampling (temperature 1, top-p 1), 4 samples per
validation prompt. The quantity is a cross-entropy against the SFT model, so it measures how far a
method's samples moved from fluent SFT text; it reads neither the judge nor any safety label, and the
budget it picks is the same for every method. No cell uses the test split.

Every cell (lr, budget) is a complete ``recipes/compare_methods.py`` run (its own warmup and cosine
schedule to the end of that budget, i.e. exactly the run the main table would do), from one shared SFT
model trained once and copied into each cell. Outputs: ``recipes/results/budget_selection/``:
``cells/lr<lr>_steps<n>/results.{json,md}`` (every metric, judged ones included, for reading only),
``selection.json``, ``selection.md`` (the rule's table and the choice) and ``budget_selection.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import yaml

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from recipes import compare_methods as cm  # noqa: E402

CONFIG = _ROOT / "recipes" / "configs" / "tiny_compare_long.yaml"
RULE_METHODS = ("SafeDPO", "DPO-Helpful", "DPO-Harmless", "DPO-SafeBetter")
RULE_MAX_RATIO = 1.5
RULE_DECODING = {"temperature": 1.0, "top_p": 1.0}
RULE_SEEDS = [0]
BUDGETS = (40, 80, 120, 160, 240)
READING_CELLS = "cells_report_decoding"
# Shown next to the rule's numbers, never read by it.
INFO_COLUMNS = (("gen/harmless_ratio_harmful", "harmless %", 100), ("gen/over_refusal_benign", "over-refusal benign %", 100),
                ("gen/over_refusal_sensitive", "over-refusal sensitive %", 100), ("gen/helpfulness", "helpfulness", 1),
                ("gen/fluent", "fluent %", 100))


def cell_name(lr: float, steps: int) -> str:
    return f"lr{lr:g}_steps{steps}"


def cell_config(config_path: Path, lr: float, steps: int, out_root: Path, results_root: Path,
                seeds: list[int], *, reading: bool = False) -> dict:
    """The validated compare config of one cell: validation split, the rule's methods, one Delta, and the
    rule's decoding (``reading=False``) or the config's own reporting decoding (``reading=True``: the
    cells under ``cells_report_decoding/``, read by nobody's rule, shown for the over-refusal analysis)."""
    raw = yaml.safe_load(Path(config_path).read_text())
    sub = READING_CELLS if reading else "cells"
    raw = cm.deep_merge(raw, {
        "seeds": seeds, "sft_per_seed": False, "sft_seed": 0, "keep_models": False,
        "output_dir": str(out_root / sub / cell_name(lr, steps)), "results_dir": str(results_root / sub / cell_name(lr, steps)),
        "recipe": {"eval_split": "validation"},
        "align": {"lr": lr, "max_steps": steps},
        "evaluation": {} if reading else dict(RULE_DECODING),
    })
    missing = [m for m in RULE_METHODS if m not in raw["methods"]]
    if missing:
        raise ValueError(f"config {config_path}: methods lacks {missing[0]!r}, which the budget rule compares")
    raw["methods"] = {m: raw["methods"][m] for m in RULE_METHODS}
    own_delta = raw["methods"][raw["delta_sweep"]["method"]].get("delta", 10.0)
    raw["delta_sweep"] = {"method": raw["delta_sweep"]["method"], "values": [own_delta]}  # no sweep runs
    return cm.validate_config(raw)


def _sft_dir(cfg: dict) -> Path:
    return Path(cfg["output_dir"]) / f"shared_seed{cfg['sft_seed']}" / "sft"


def train_shared_sft(cfg: dict, shared: Path) -> None:
    """Trains the SFT stage of ``cfg`` into ``shared`` unless a marker with the same config is there."""
    import torch

    torch.set_num_threads(cfg["num_threads"] or torch.get_num_threads())
    stage = cm.build_stage_configs(cfg, seed=cfg["seeds"][0], stage_root=shared.parent, sft_dir=shared,
                                   sft_seed=cfg["sft_seed"])[0]
    if cm.reusable_sft(stage.config) is None:
        result = cm.run_recipe(stage.config)
        cm.write_sft_marker(stage.config, result)
    shutil.rmtree(shared / "checkpoints", ignore_errors=True)


def run_cell(cfg: dict, shared_sft: str) -> str:
    """Copies the shared SFT model into the cell, runs the comparison, drops the cell's PNGs; -> results.json."""
    target = _sft_dir(cfg)
    if not (target / cm.SFT_MARKER).is_file():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(shared_sft, target, ignore=shutil.ignore_patterns("checkpoints", "reference_cache"))
    cm.run_compare(cfg, command=f"python recipes/select_budget.py (cell {Path(cfg['results_dir']).name})")
    for png in Path(cfg["results_dir"]).glob("*.png"):
        png.unlink()
    return str(Path(cfg["results_dir"]) / "results.json")


def nll_ratios(results: dict) -> dict[str, float]:
    """Per rule method: mean over seeds of (SFT NLL/token of its generations) / (of the SFT model's own)."""
    out = {}
    for method in RULE_METHODS:
        ratios = []
        for runs in results["per_seed"].values():
            own, sft = runs.get(method, {}).get("gen/sft_nll"), runs.get(cm.SFT, {}).get("gen/sft_nll")
            ratios.append(own / sft if own is not None and sft else float("nan"))
        out[method] = sum(ratios) / len(ratios) if ratios else float("nan")
    return out


def select(cells: dict[tuple[float, int], dict], lr: float, reading: dict[tuple[float, int], dict] | None = None) -> dict:
    """Applies the rule at ``lr``: the largest budget whose every method passes (NaN = a failed run: fails).

    ``cells``: (lr, steps) -> results dict (the rule's runs). ``reading``: the same cells run at the
    reporting decoding, whose judged metrics fill each row's "info" (else the rule cells' own do); the
    rule never reads "info". Returns {"lr", "steps" (None if no budget passes), "rows"}.
    """
    rows = []
    for (cell_lr, steps), results in sorted(cells.items()):
        ratios = nll_ratios(results)
        shown = (reading or {}).get((cell_lr, steps), results)
        worst = max(ratios.values(), key=lambda v: math.inf if math.isnan(v) else v)
        rows.append({"lr": cell_lr, "steps": steps, "ratios": ratios, "max_ratio": worst,
                     "passes": (not math.isnan(worst)) and worst <= RULE_MAX_RATIO and not results.get("failures"),
                     "sft_nll": [r[cm.SFT]["gen/sft_nll"] for r in results["per_seed"].values()],
                     "info_decoding": {k: shown["config"]["evaluation"][k] for k in ("temperature", "top_p")},
                     "info": {m: {k: _mean(shown, m, k) for k, _, _ in INFO_COLUMNS} for m in (cm.SFT, *RULE_METHODS)}})
    passing = [r["steps"] for r in rows if r["lr"] == lr and r["passes"]]
    return {"lr": lr, "steps": max(passing) if passing else None, "rows": rows}


def _mean(results: dict, run: str, key: str) -> float:
    values = [r[run][key] for r in results["per_seed"].values() if run in r and r[run].get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def write_selection(out: Path, choice: dict, *, pairs_per_step: int, td_pairs: int, command: str, runtime: dict) -> None:
    """selection.json, selection.md and budget_selection.png under ``out``."""
    (out / "selection.json").write_text(json.dumps(cm._json_safe({
        "rule": {"methods": list(RULE_METHODS), "max_ratio": RULE_MAX_RATIO, "decoding": RULE_DECODING,
                 "seeds": RULE_SEEDS, "split": "validation"},
        "chosen": {"lr": choice["lr"], "steps": choice["steps"]}, "rows": choice["rows"],
        "command": command, "runtime_s": runtime, "machine": cm._machine()}), indent=1) + "\n")

    def ep(steps: int) -> str:
        return f"{steps * pairs_per_step / td_pairs:.2f}"

    lines = [
        "# Step budget chosen on the validation split (one rule, every method)", "",
        f"Command: `{command}`  ",
        f"Machine: {cm._machine()}. Cells: {runtime['cells_wall_sum'] / 60:.1f} min wall in all (run "
        f"side by side), {runtime['cells_cpu_sum'] / 60:.1f} min CPU in all (single-threaded processes, shared SFT "
        "model trained once more).", "",
        f"Rule (fixed before the runs): the largest budget at which every method of {', '.join(RULE_METHODS)} keeps "
        f"the SFT model's NLL per token of its validation generations <= {RULE_MAX_RATIO} x the SFT model's own "
        f"(seed {RULE_SEEDS}, temperature {RULE_DECODING['temperature']}, top-p {RULE_DECODING['top_p']}); "
        f"the same rule that chose lr {choice['lr']:g}. Epochs = steps x {pairs_per_step} pairs / {td_pairs} T(D) pairs.", "",
        f"**Chosen: {choice['steps']} steps** at lr {choice['lr']:g}" if choice["steps"] is not None
        else f"**No budget passes at lr {choice['lr']:g}**", "",
        "| lr | steps | epochs | " + " | ".join(f"{m} NLL ratio" for m in RULE_METHODS) + " | max | passes |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in RULE_METHODS) + " | ---: | :---: |",
    ]
    for r in choice["rows"]:
        mark = "**" if r["lr"] == choice["lr"] and r["steps"] == choice["steps"] else ""
        lines.append(f"| {r['lr']:g} | {mark}{r['steps']}{mark} | {ep(r['steps'])} | "
                     + " | ".join(f"{r['ratios'][m]:.2f}" for m in RULE_METHODS)
                     + f" | {r['max_ratio']:.2f} | {'yes' if r['passes'] else 'no'} |")
    lines += ["", "## For reading only (the rule does not use these): judged validation metrics per cell", "",
              "Same lr and budget, validation split, seed 0; decoding per row (the rule's temperature 1 makes even "
              f"the SFT model's samples mostly disfluent, so the cells are also run at the reporting decoding, "
              f"`{READING_CELLS}/`, where present).", "",
              "| lr | steps | decoding | run | " + " | ".join(t for _, t, _ in INFO_COLUMNS) + " |",
              "| --- | ---: | --- | --- | " + " | ".join("---:" for _ in INFO_COLUMNS) + " |"]
    for r in choice["rows"]:
        dec = f"T {r['info_decoding']['temperature']:g}, top-p {r['info_decoding']['top_p']:g}"
        for run, info in r["info"].items():
            lines.append(f"| {r['lr']:g} | {r['steps']} | {dec} | {run} | "
                         + " | ".join(f"{info[k] * s:.{1 if s == 100 else 3}f}" for k, _, s in INFO_COLUMNS) + " |")
    lines += ["", "Per cell, every metric: `cells/<cell>/results.md`. Figure: `budget_selection.png`.", ""]
    (out / "selection.md").write_text("\n".join(lines))
    plot_selection(out / "budget_selection.png", choice)


def plot_selection(path: Path, choice: dict) -> None:
    """Left: the rule's quantity (max over methods) against the budget, one line per lr; middle: every
    method at the chosen lr; right, for reading only: validation over-refusal on benign prompts at the
    chosen lr (the reporting decoding when those cells exist)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"SafeDPO": "tab:red", "DPO-Helpful": "tab:blue", "DPO-Harmless": "tab:green", "DPO-SafeBetter": "tab:purple"}
    lrs = sorted({r["lr"] for r in choice["rows"]})
    chosen = [r for r in choice["rows"] if r["lr"] == choice["lr"]]
    steps = [r["steps"] for r in chosen]
    fig, (ax0, ax, ax2) = plt.subplots(1, 3, figsize=(15, 4.4))
    for lr, style in zip(lrs, ("--", "-", ":", "-.")):
        rows = [r for r in choice["rows"] if r["lr"] == lr]
        ax0.plot([r["steps"] for r in rows], [r["max_ratio"] for r in rows], style, marker="o", color="k",
                 label=f"lr {lr:g}" + (" (chosen)" if lr == choice["lr"] else ""))
    for m in RULE_METHODS:
        ax.plot(steps, [r["ratios"][m] for r in chosen], marker="o", color=colors[m], label=m)
    for a in (ax0, ax):
        a.axhline(RULE_MAX_RATIO, color="k", lw=1, ls=":", label=f"rule: <= {RULE_MAX_RATIO}")
        if choice["steps"] is not None:
            a.axvline(choice["steps"], color="0.5", lw=1, label=f"chosen: {choice['steps']} steps")
        a.set_xlabel("alignment steps (equal for every method)")
        a.set_ylabel("SFT NLL/token of generations / SFT's own")
        a.legend(fontsize=7)
    ax0.set_title("the rule: worst method, per lr (validation, T 1)")
    ax.set_title(f"every method at lr {choice['lr']:g}")
    for m in RULE_METHODS:
        ax2.plot(steps, [100 * r["info"][m]["gen/over_refusal_benign"] for r in chosen], marker="o", color=colors[m], label=m)
    ax2.plot(steps, [100 * r["info"][cm.SFT]["gen/over_refusal_benign"] for r in chosen], marker="s", color="0.45", label="SFT")
    dec = chosen[0]["info_decoding"]
    ax2.set_title(f"not used by the rule: lr {choice['lr']:g}, T {dec['temperature']:g}, top-p {dec['top_p']:g}")
    ax2.set_xlabel("alignment steps")
    ax2.set_ylabel("over-refusal % on benign validation prompts")
    ax2.set_ylim(-3, 103)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="the compare config whose budget is chosen")
    parser.add_argument("--lrs", type=float, nargs="+", help="learning rates (default: the config's align.lr)")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="candidate steps")
    parser.add_argument("--jobs", type=int, default=2, help="cells run side by side (one thread each)")
    parser.add_argument("--output-dir", default="recipes/outputs/budget_selection", help="models and logs")
    parser.add_argument("--results-dir", default="recipes/results/budget_selection")
    parser.add_argument("--report-only", action="store_true", help="no training: re-apply the rule to existing cells")
    parser.add_argument("--reading-cells", action="store_true",
                        help=f"also run every cell at the config's reporting decoding ({READING_CELLS}/, not used by the rule)")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.budgets) or args.jobs < 1:
        parser.error("--budgets and --jobs must be integers >= 1")
    base = cm.load_config(args.config)
    import torch

    torch.set_num_threads(base["num_threads"] or torch.get_num_threads())  # as every cell (one thread each)
    chosen_lr = float(base["align"]["lr"])
    lrs = sorted(set(args.lrs or [chosen_lr]) | {chosen_lr})
    out_root, results_root = Path(args.output_dir), Path(args.results_dir)
    keys = [(lr, n) for lr in lrs for n in sorted(set(args.budgets))]
    cfgs = {k: cell_config(Path(args.config), *k, out_root, results_root, RULE_SEEDS) for k in keys}
    reading_cfgs = {k: cell_config(Path(args.config), *k, out_root, results_root, RULE_SEEDS, reading=True) for k in keys}
    command = "python recipes/select_budget.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    if not args.report_only:
        shared = out_root / "shared_sft"
        train_shared_sft(next(iter(cfgs.values())), shared)
        todo = [c for c in [*cfgs.values(), *(reading_cfgs.values() if args.reading_cells else [])]
                if not (Path(c["results_dir"]) / "results.json").is_file()]
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            for path in pool.map(run_cell, todo, [str(shared)] * len(todo)):
                print(f"done: {path}", flush=True)
    cells = {}
    for key, c in cfgs.items():
        path = Path(c["results_dir"]) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: cell not run (run without --report-only)")
        cells[key] = json.loads(path.read_text())
    reading = {k: json.loads((Path(c["results_dir"]) / "results.json").read_text()) for k, c in reading_cfgs.items()
               if (Path(c["results_dir"]) / "results.json").is_file()}
    walls = [r["runtime_s"]["total"] for r in [*cells.values(), *reading.values()]]
    runtime = {"wall": time.perf_counter() - t0, "cells_wall_sum": sum(walls),
               "cells_cpu_sum": sum(r["runtime_s"].get("cpu") or 0 for r in [*cells.values(), *reading.values()])}
    align = base["align"]
    td_pairs = cells[next(iter(cells))]["stages"]["SafeDPO"]["selection"]["rows_out"]
    choice = select(cells, chosen_lr, reading)
    write_selection(results_root, choice, pairs_per_step=align["micro_batch_size"], td_pairs=td_pairs,
                    command=command.strip(), runtime=runtime)
    print((results_root / "selection.md").read_text())


if __name__ == "__main__":
    main()
