#!/usr/bin/env python
"""The SafeDPO paper's experiment in miniature: SFT, then SafeDPO against the DPO baselines, judged on CPU.

    python recipes/compare_methods.py --config recipes/configs/tiny_compare.yaml           # full (8-12 min, 2 cores)
    python recipes/compare_methods.py --config recipes/configs/tiny_compare.yaml --quick   # smoke run (~1 min)
    ... --set align.beta=0.1 --set seeds=[0]     # override any config key (dotted, YAML value)
    python recipes/compare_methods.py --from-results recipes/results/results.json          # redraw md + PNGs only

For every seed: one SFT stage on the fixture's responses (both responses of every pair, so the SFT
model, like the paper's Alpaca, sometimes complies with harmful prompts), then, from that same SFT
checkpoint and with the same budget (steps, batch, lr, beta, schedule), SafeDPO and the paper's
baselines DPO-Helpful (``better`` pairs), DPO-Harmless (``safer``) and DPO-SafeBetter
(``safe_better``), plus SafeDPO at every Delta of the sweep. Every stage is a call of
``recipes/train_safedpo.run`` (the FSDP2 recipe, world size 1), so the comparison runs the exact
pipeline a user runs. Each trained model (and the SFT model) is evaluated on the held-out split:

* generation: responses sampled with ``model.generate`` for every distinct test prompt, judged by the
  fixture's rule (``safedpo_kernels.data.judge_response``): harmless ratio (share of responses judged
  safe: the paper's headline metric) and helpfulness (the judge's score in [0, 1]), overall and split
  by harmful / benign prompts (a prompt is harmful when any response to it in the data is unsafe);
* likelihood: on held-out pairs with one safe and one unsafe response, the share where the safe one
  ranks higher, by implicit reward ``log pi - log pi_sft`` and by plain log-prob; on safe-safe pairs,
  the share where the helpfulness winner ranks higher; NLL per token of safe / unsafe held-out responses;
* fluency: the SFT model's NLL per token of each model's generations (the rule judge calls any text
  without a harmful instruction harmless, gibberish included; this column tells the two apart).

Outputs: ``<results_dir>/results.json`` (config, per-seed values, mean / std / min / max, runtimes,
example generations), ``results.md`` (tables), ``harmless_vs_helpfulness.png`` (the paper's figure
style) and ``delta_sweep.png``; trained models and recipe logs under ``<output_dir>``. All defaults
live in the YAML config; ``--quick`` applies its ``quick:`` section on top.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

_ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("safedpo_kernels") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(_ROOT))
if str(_ROOT) not in sys.path:  # `recipes` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(_ROOT))

from recipes.train_safedpo import CONFIG_SCHEMA as RECIPE_SCHEMA  # noqa: E402
from recipes.train_safedpo import run as run_recipe  # noqa: E402
from recipes.train_safedpo import validate_config as validate_recipe_config  # noqa: E402
from safedpo_kernels import linear_logprobs, sequence_logps  # noqa: E402

IGNORE_INDEX = -100
SFT = "SFT"

# ---------------------------------------------------------------------------------------------
# Config: the YAML is the one source of defaults; this only checks it.
# ---------------------------------------------------------------------------------------------

_TOP_KEYS = {
    "seeds": "a non-empty list of distinct integers >= 0",
    "sft_per_seed": "true (one SFT model per seed) or false (one SFT model, trained with sft_seed, shared)",
    "sft_seed": "null (the first seed) or an integer >= 0: the seed of the shared SFT model when sft_per_seed is false",
    "num_threads": "an integer >= 1 (torch intra-op threads) or null (torch's default)",
    "output_dir": "a folder for models and recipe logs",
    "results_dir": "a folder for results.json, results.md and the PNGs",
    "keep_models": "true or false (keep every aligned model's export and checkpoint)",
    "recipe": "a mapping of recipes/train_safedpo.py keys shared by every stage",
    "sft": "a mapping of recipe keys for the SFT stage (objective: sft)",
    "align": "a mapping of recipe keys shared by every alignment stage: the equal budget",
    "methods": "a mapping of method name -> recipe keys (objective, selection, delta)",
    "delta_sweep": "a mapping with method (a name in methods, objective safedpo) and values (list of Delta >= 0)",
    "evaluation": "a mapping with samples_per_prompt, temperature, top_p, max_new_tokens, batch_size, examples",
}
_EVAL_KEYS = ("samples_per_prompt", "temperature", "top_p", "max_new_tokens", "batch_size", "examples")
_PER_STAGE_KEYS = ("output_dir", "model_name_or_path", "reference_cache_dir", "seed")


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` updated by ``override``, recursing into mappings present in both (copies, no aliasing)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_num(v: Any, lo: float = 0.0) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= lo


def validate_config(raw: dict) -> dict:
    """Checks every key of a compare config (no defaults here: they are in the YAML).

    Raises ValueError naming the key for an unknown or missing key or a bad value; every stage's recipe
    config is validated by the recipe's own ``validate_config`` before anything trains.
    """
    if not isinstance(raw, dict):
        raise TypeError(f"config: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_TOP_KEYS) - {"quick"})
    if unknown:
        raise ValueError(f"config key {unknown[0]!r}: unknown key (known keys: {', '.join(_TOP_KEYS)}, quick)")
    missing = [k for k in _TOP_KEYS if k not in raw]
    if missing:
        raise ValueError(f"config key {missing[0]!r}: missing ({_TOP_KEYS[missing[0]]})")
    cfg = {k: raw[k] for k in _TOP_KEYS}

    def bad(key: str, value: Any) -> ValueError:
        top = key.split(".")[0]
        return ValueError(f"config key {key!r}: expected {_TOP_KEYS.get(top, 'a valid value')}, got {value!r}")

    seeds = cfg["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds) or len(set(seeds)) != len(seeds):
        raise bad("seeds", seeds)
    if not isinstance(cfg["sft_per_seed"], bool):
        raise bad("sft_per_seed", cfg["sft_per_seed"])
    if cfg["sft_seed"] is not None and not _is_int(cfg["sft_seed"]):
        raise bad("sft_seed", cfg["sft_seed"])
    if cfg["num_threads"] is not None and not _is_int(cfg["num_threads"], 1):
        raise bad("num_threads", cfg["num_threads"])
    for key in ("output_dir", "results_dir"):
        if not isinstance(cfg[key], str) or not cfg[key]:
            raise bad(key, cfg[key])
    if not isinstance(cfg["keep_models"], bool):
        raise bad("keep_models", cfg["keep_models"])
    for key in ("recipe", "sft", "align", "methods", "delta_sweep", "evaluation"):
        if not isinstance(cfg[key], dict):
            raise bad(key, cfg[key])
    for section in ("recipe", "sft", "align"):
        clash = sorted(set(cfg[section]) & set(_PER_STAGE_KEYS))
        if clash:
            raise ValueError(f"config key '{section}.{clash[0]}': set by compare_methods for every stage, not in the config")
    if cfg["sft"].get("objective") != "sft":
        raise ValueError(f"config key 'sft.objective': expected 'sft', got {cfg['sft'].get('objective')!r}")
    if not cfg["methods"]:
        raise bad("methods", cfg["methods"])
    for name, spec in cfg["methods"].items():
        if name == SFT or not isinstance(name, str):
            raise ValueError(f"config key 'methods.{name}': method names must be strings other than {SFT!r}")
        if not isinstance(spec, dict) or spec.get("objective") not in ("safedpo", "dpo"):
            raise ValueError(f"config key 'methods.{name}': expected a mapping with objective safedpo or dpo, got {spec!r}")
        budget = sorted(set(spec) & (set(cfg["align"]) | set(_PER_STAGE_KEYS) | {"max_steps", "lr", "beta", "epochs"}))
        if budget:
            raise ValueError(f"config key 'methods.{name}.{budget[0]}': the budget is shared; set it in 'align'")
    sweep = cfg["delta_sweep"]
    if set(sweep) != {"method", "values"}:
        raise bad("delta_sweep", sweep)
    if sweep["method"] not in cfg["methods"] or cfg["methods"][sweep["method"]]["objective"] != "safedpo":
        raise ValueError(f"config key 'delta_sweep.method': expected a safedpo method of 'methods', got {sweep['method']!r}")
    values = sweep["values"]
    if not isinstance(values, list) or not all(_is_num(v) for v in values) or len(set(values)) != len(values):
        raise bad("delta_sweep.values", values)
    ev = cfg["evaluation"]
    unknown = sorted(set(ev) - set(_EVAL_KEYS))
    missing = [k for k in _EVAL_KEYS if k not in ev]
    if unknown or missing:
        key = (unknown or missing)[0]
        raise ValueError(f"config key 'evaluation.{key}': {'unknown' if unknown else 'missing'} "
                         f"(keys: {', '.join(_EVAL_KEYS)})")
    for key in ("samples_per_prompt", "max_new_tokens", "batch_size"):
        if not _is_int(ev[key], 1):
            raise ValueError(f"config key 'evaluation.{key}': expected an integer >= 1, got {ev[key]!r}")
    if not _is_int(ev["examples"], 0):
        raise ValueError(f"config key 'evaluation.examples': expected an integer >= 0, got {ev['examples']!r}")
    if not _is_num(ev["temperature"]) or not (_is_num(ev["top_p"]) and 0 < ev["top_p"] <= 1):
        raise ValueError(f"config key 'evaluation': temperature >= 0 (0 = greedy) and top_p in (0, 1], got {ev}")
    for stage in build_stage_configs(cfg, seed=cfg["seeds"][0], stage_root=Path("/nonexistent"),
                                     sft_dir=Path("/nonexistent/sft"), sft_seed=cfg["sft_seed"]):
        try:
            validate_recipe_config(stage.config)
        except ValueError as err:
            raise ValueError(f"stage {stage.name}: {err}") from None
    return cfg


def parse_set(item: str) -> dict:
    """``"align.beta=0.1"`` -> ``{"align": {"beta": 0.1}}`` (the value parsed with ``yaml.safe_load``)."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY (e.g. align.beta=0.1)")
    out: Any = yaml.safe_load(value)
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(path: str | os.PathLike, *, quick: bool = False, overrides: dict | None = None) -> dict:
    """YAML (``yaml.safe_load``) -> validated config; ``quick`` merges the file's ``quick:`` section."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {path}: expected a YAML mapping at the top level")
    if quick:
        if not isinstance(raw.get("quick"), dict):
            raise ValueError(f"config key 'quick': --quick needs a 'quick:' mapping of overrides in {path}")
        raw = deep_merge(raw, raw["quick"])
    raw = deep_merge(raw, overrides or {})
    return validate_config(raw)


# ---------------------------------------------------------------------------------------------
# Stages: one recipe config per training run
# ---------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One training run: ``name`` (``SFT``, a method, or ``SafeDPO@Delta=2``), its recipe ``config``,
    the ``method`` it belongs to and, for sweep runs, its ``delta``."""

    name: str
    method: str
    config: dict
    delta: float | None = None


def sweep_name(method: str, delta: float) -> str:
    return f"{method}@Delta={delta:g}"


def build_stage_configs(cfg: dict, *, seed: int, stage_root: Path, sft_dir: Path,
                        sft_seed: int | None = None) -> list[Stage]:
    """The SFT stage (written to ``sft_dir``) and every alignment stage of one seed (under ``stage_root``).

    Alignment stages start from ``sft_dir/hf_export`` and share its reference log-prob cache. The sweep's
    Delta equal to the method's own Delta reuses the method's run (no extra stage).
    """
    common = deep_merge(cfg["recipe"], {"seed": seed})
    if str(common.get("tokenizer", "")).startswith("fixture:"):  # the tokenizer committed with a fixture
        from safedpo_kernels.data import fixture_tokenizer_path

        common["tokenizer"] = str(fixture_tokenizer_path(common["tokenizer"].split(":", 1)[1]))
    sft = deep_merge(common, cfg["sft"])
    sft["seed"] = seed if sft_seed is None else sft_seed
    sft["output_dir"] = str(sft_dir)
    stages = [Stage(SFT, SFT, sft)]
    align_common = deep_merge(common, cfg["align"])
    align_common.pop("model_config", None)  # every aligned model starts from the SFT export
    align_common["model_name_or_path"] = str(sft_dir / "hf_export")
    align_common["reference_cache_dir"] = str(sft_dir / "reference_cache")
    sweep = cfg["delta_sweep"]
    for name, spec in cfg["methods"].items():
        c = deep_merge(align_common, spec)
        c["output_dir"] = str(stage_root / _slug(name))
        stages.append(Stage(name, name, c, float(_recipe_value(c, "delta")) if spec["objective"] == "safedpo" else None))
    base = cfg["methods"][sweep["method"]]
    base_delta = float(_recipe_value(deep_merge(align_common, base), "delta"))
    for delta in sweep["values"]:
        if float(delta) == base_delta:
            continue
        name = sweep_name(sweep["method"], delta)
        c = deep_merge(align_common, base)
        c["delta"] = float(delta)
        c["output_dir"] = str(stage_root / _slug(name))
        stages.append(Stage(name, sweep["method"], c, float(delta)))
    return stages


SFT_MARKER = "compare_sft.json"
# Keys that do not change the trained model (where it is written, what is evaluated or logged).
_LOCATION_KEYS = ("output_dir", "reference_cache_dir", "eval_split", "eval_limit", "eval_batch_size", "eval_every",
                  "eval_at_start", "log_every", "plot", "progress_bar")


def _sft_identity(stage_cfg: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in stage_cfg.items() if k not in _LOCATION_KEYS}))


def write_sft_marker(stage_cfg: dict, result: dict) -> None:
    """Records a finished SFT stage (its config and summary) next to its export, for :func:`reusable_sft`."""
    summary = {"train_time_s": float(result["train_time_s"]), "steps": int(result["steps"]),
               "train_losses": [float(x) for x in result["train_losses"][-1:]],
               "final_eval": {k: float(v) for k, v in result["final_eval"].items()}}
    marker = {"config": _sft_identity(stage_cfg), "result": summary}
    (Path(stage_cfg["output_dir"]) / SFT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def reusable_sft(stage_cfg: dict) -> dict | None:
    """The recipe-style result of an SFT stage already trained with exactly this config (marker written by
    :func:`write_sft_marker`, export present), else None. Lets several comparison runs (a learning-rate
    grid, seeds run as parallel processes) share one SFT model instead of retraining it."""
    out = Path(stage_cfg["output_dir"])
    marker, export = out / SFT_MARKER, out / "hf_export"
    if not (marker.is_file() and export.is_dir()):
        return None
    saved = json.loads(marker.read_text())
    if saved.get("config") != _sft_identity(stage_cfg):
        return None
    return {**saved["result"], "export": str(export), "reused": True}


def _recipe_value(stage_cfg: dict, key: str) -> Any:
    """A stage's value of ``key`` with the recipe's own default when the config leaves it out."""
    return stage_cfg[key] if key in stage_cfg else RECIPE_SCHEMA[key][0]


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


# ---------------------------------------------------------------------------------------------
# Evaluation data: held-out prompts (generation) and pairs (likelihood)
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """Held-out split, prepared once.

    prompts: distinct test prompts (sorted); prompt_ids: their token ids (template applied, as in
    training); harmful: per prompt, True when any response to it in train or test is flagged unsafe.
    pairs: tokenized test pairs in helpfulness order (nothing dropped); chosen_unsafe / rejected_unsafe:
    (N,) bool; chosen_tokens / rejected_tokens: (N,) float32 response token counts (EOS included).
    """

    prompts: list[str]
    prompt_ids: list[list[int]]
    harmful: list[bool]
    categories: list[str]
    pairs: Any
    chosen_unsafe: torch.Tensor
    rejected_unsafe: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    report: dict
    source: str = ""


def load_eval_data(recipe_cfg: dict, tokenizer) -> EvalData:
    """``recipe_cfg``: a stage config validated by the recipe (every key present, defaults filled)."""
    from safedpo_kernels.data import build_prompts, load_pairs, tokenize_pairs

    if recipe_cfg["eval_split"] is None:
        raise ValueError("config key 'recipe.eval_split': the comparison evaluates on a held-out split, got null")
    source, name = recipe_cfg["dataset"], recipe_cfg["dataset_config"]
    test, test_report = load_pairs(source, split=recipe_cfg["eval_split"], name=name, limit=recipe_cfg["eval_limit"])
    train, _ = load_pairs(source, split=recipe_cfg["train_split"], name=name)
    unsafe_prompts: set[str] = set()
    for ds in (train, test):
        for p, cu, ru in zip(ds["prompt"], ds["chosen_unsafe"], ds["rejected_unsafe"]):
            if cu or ru:
                unsafe_prompts.add(p)
    prompts = sorted(set(test["prompt"]))
    categories = [prompt_categories(source, p, p in unsafe_prompts) for p in prompts]
    tok, tok_report = tokenize_pairs(test, tokenizer, max_length=recipe_cfg["max_length"],
                                     ignore_index=IGNORE_INDEX)
    report = {"split": recipe_cfg["eval_split"], "test_pairs": len(test), "tokenized_pairs": len(tok),
              "prompts": len(prompts), "harmful_prompts": categories.count("harmful"),
              "benign_prompts": categories.count("benign"), "sensitive_prompts": categories.count("sensitive"),
              "prompts_seen_in_train": len(set(prompts) & set(train["prompt"])),
              "load": _as_dict(test_report), "tokenize": _as_dict(tok_report)}
    return EvalData(
        prompts=prompts,
        prompt_ids=build_prompts(prompts, tokenizer),
        harmful=[c == "harmful" for c in categories],
        categories=categories,
        pairs=tok,
        chosen_unsafe=torch.tensor(tok["chosen_unsafe"], dtype=torch.bool),
        rejected_unsafe=torch.tensor(tok["rejected_unsafe"], dtype=torch.bool),
        chosen_tokens=_response_tokens(tok["chosen_labels"]),
        rejected_tokens=_response_tokens(tok["rejected_labels"]),
        report=report,
        source=source,
    )


def prompt_categories(source: str, prompt: str, has_unsafe_response: bool) -> str:
    """"harmful", "benign" or "sensitive": from the pku_long judge's topic table for that fixture, else
    "harmful" when any response to the prompt in the data is unsafe and "benign" otherwise."""
    if source == "fixture:pku_long":
        from safedpo_kernels.data import prompt_category

        category = prompt_category(prompt)
        if category is not None:
            return category
    return "harmful" if has_unsafe_response else "benign"


def judge_for(source: str):
    """``judge(prompt, response) -> {unsafe, refusal, fluent, degenerate, helpful}`` for a dataset source:
    the pku_long rule judge for ``fixture:pku_long``; for other data the pku_tiny judge with the
    pattern-based refusal detector (fluency then is not judged: NaN, see gen/sft_nll)."""
    if source == "fixture:pku_long":
        from safedpo_kernels.data import judge_long

        return judge_long
    from safedpo_kernels.data import judge_response
    from safedpo_kernels.data.rule_judge import is_refusal

    def judge(prompt: str, response: str) -> dict:
        verdict = judge_response(prompt, response)
        return {"unsafe": verdict["unsafe"], "refusal": is_refusal(response), "fluent": None,
                "degenerate": "", "helpful": verdict["helpful"]}

    return judge


def _response_tokens(labels: list[list[int]]) -> torch.Tensor:
    return torch.tensor([sum(1 for t in row[1:] if t != IGNORE_INDEX) for row in labels], dtype=torch.float32)


def _as_dict(report: Any) -> Any:
    return report.as_dict() if hasattr(report, "as_dict") else report


def load_tokenizer(recipe_cfg: dict):
    """The tokenizer the recipe trains with (``tokenizer`` key: "fixture", "model" or a path / hub id)."""
    name = recipe_cfg["tokenizer"]
    if name == "fixture":
        from safedpo_kernels.data import load_fixture_tokenizer

        tokenizer = load_fixture_tokenizer()
    else:
        from transformers import AutoTokenizer

        path = recipe_cfg["model_name_or_path"] if name == "model" else name
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe_cfg["trust_remote_code"])
    if tokenizer.pad_token_id is None:  # as the recipe does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | os.PathLike):
    """An exported Hugging Face model folder (safetensors) in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


@torch.no_grad()
def pair_logps(model, pairs, pad_token_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) chosen and (N,) rejected float32 sequence log-probs (sums over response tokens).

    Runs the backbone and ``linear_logprobs`` on the lm_head weight (no logits materialized), on
    batches from ``PaddedPairCollator``.
    """
    from safedpo_kernels.data import PaddedPairCollator

    collate = PaddedPairCollator(pad_token_id, ignore_index=IGNORE_INDEX)
    base = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        rows = [pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]
        batch = collate(rows)
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        target = batch["labels"][:, 1:]
        tok = linear_logprobs(hidden[:, :-1], head.weight, target, bias=getattr(head, "bias", None),
                              ignore_index=IGNORE_INDEX)
        seq = sequence_logps(tok, target, ignore_index=IGNORE_INDEX)
        chosen.append(seq[: len(rows)])
        rejected.append(seq[len(rows):])
    return torch.cat(chosen), torch.cat(rejected)


def likelihood_metrics(policy: tuple[torch.Tensor, torch.Tensor], sft: tuple[torch.Tensor, torch.Tensor],
                       chosen_unsafe: torch.Tensor, rejected_unsafe: torch.Tensor,
                       tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """Ranking rates and per-token NLL on held-out pairs (chosen = helpfulness winner). All inputs (N,).

    safe_over_unsafe_*: pairs with exactly one unsafe response, share where the safe one ranks higher;
    helpful_safe_pairs_*: pairs with two safe responses, share where the helpfulness winner ranks higher.
    ``*_reward``: by implicit reward log pi - log pi_sft (NaN for the SFT model itself: all rewards are
    0); ``*_logp``: by the policy's own sequence log-prob. With ``tokens`` (response token counts):
    nll_safe / nll_unsafe, the policy's NLL per token over all safe / unsafe held-out responses (how
    fluent the model stays on safe text, and how far unsafe text was pushed down).
    """
    pc, pr = policy
    rc, rr = pc - sft[0], pr - sft[1]
    mixed, both_safe = chosen_unsafe ^ rejected_unsafe, ~chosen_unsafe & ~rejected_unsafe
    is_reference = bool(torch.equal(pc, sft[0]) and torch.equal(pr, sft[1]))

    def rate(hits: torch.Tensor, mask: torch.Tensor) -> float:
        n = int(mask.sum())
        return float((hits & mask).sum()) / n if n else float("nan")

    safe_first = rejected_unsafe  # mixed pairs: the chosen one is safe exactly when the rejected one is unsafe
    out = {
        "lik/safe_over_unsafe_logp": rate((pc > pr) == safe_first, mixed),
        "lik/helpful_safe_pairs_logp": rate(pc > pr, both_safe),
        "lik/safe_over_unsafe_reward": float("nan") if is_reference else rate((rc > rr) == safe_first, mixed),
        "lik/helpful_safe_pairs_reward": float("nan") if is_reference else rate(rc > rr, both_safe),
    }
    if tokens is not None:
        logps, counts = torch.cat([pc, pr]).double(), torch.cat(tokens).double()
        unsafe = torch.cat([chosen_unsafe, rejected_unsafe])
        for name, mask in (("safe", ~unsafe), ("unsafe", unsafe)):
            n = counts[mask].sum()
            out[f"lik/nll_{name}"] = float(-logps[mask].sum() / n) if n > 0 else float("nan")
    return out


@torch.no_grad()
def generate_and_judge(model, tokenizer, data: EvalData, ev: dict, seed: int, judge=None) -> tuple[dict[str, float], list[dict]]:
    """Samples ``samples_per_prompt`` responses per held-out prompt and judges each with the fixture's rule.

    Returns (metrics, records). Metrics (shares in [0, 1], means over responses): gen/harmless_ratio
    (not unsafe, all prompts), gen/harmless_ratio_harmful (harmful prompts: the paper's harmless ratio),
    gen/safe_fluent_harmful (not unsafe AND fluent, harmful prompts), gen/refusal_harmful,
    gen/over_refusal_benign and gen/over_refusal_sensitive (refusals of benign and of
    benign-but-sensitive prompts), gen/helpfulness (judge score over benign + sensitive prompts: the
    headline helpfulness), gen/helpfulness_{benign,sensitive,harmful}, gen/fluent (share of fluent
    responses, all prompts; NaN when the judge does not rate fluency), gen/degenerate_<reason>,
    gen/ended_with_eos, gen/new_tokens. Records: one dict per response (prompt, category, response,
    and the judge's verdict). ``judge``: from :func:`judge_for` (default: the pku_tiny judge).
    """
    from transformers import GenerationConfig

    judge = judge or judge_for("")
    k = ev["samples_per_prompt"]
    greedy = ev["temperature"] == 0
    gen_cfg = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else float(ev["temperature"]),
        top_p=None if greedy else float(ev["top_p"]), top_k=None if greedy else 0,
        max_new_tokens=ev["max_new_tokens"], pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    jobs = [(i, ids) for i, ids in enumerate(data.prompt_ids) for _ in range(1 if greedy else k)]
    torch.manual_seed(seed)
    records: list[dict] = []
    for start in range(0, len(jobs), ev["batch_size"]):
        chunk = jobs[start:start + ev["batch_size"]]
        width = max(len(ids) for _, ids in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, ids) in enumerate(chunk):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_cfg)
        new = out[:, width:]
        for row, (i, _) in enumerate(chunk):
            toks = new[row].tolist()
            ended = tokenizer.eos_token_id in toks
            if ended:
                toks = toks[: toks.index(tokenizer.eos_token_id)]
            toks = [t for t in toks if t != tokenizer.pad_token_id]
            text = tokenizer.decode(toks, skip_special_tokens=True).strip()
            verdict = judge(data.prompts[i], text)
            records.append({"prompt": data.prompts[i], "response": text, "harmful_prompt": data.harmful[i],
                            "category": data.categories[i], "unsafe": verdict["unsafe"],
                            "refusal": verdict["refusal"], "fluent": verdict["fluent"],
                            "degenerate": verdict["degenerate"], "helpful": verdict["helpful"], "eos": ended,
                            "new_tokens": len(toks), "prompt_ids": data.prompt_ids[i],
                            "response_ids": toks + ([tokenizer.eos_token_id] if ended else [])})

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return judged_metrics(records), records


def judged_metrics(records: list[dict]) -> dict[str, float]:
    """The gen/* metrics of :func:`generate_and_judge` from judged response records (NaN where empty)."""

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    def share(rows: list[dict], test) -> float:
        return mean([1.0 if test(r) else 0.0 for r in rows])

    by = {c: [r for r in records if r["category"] == c] for c in ("harmful", "benign", "sensitive")}
    answerable = by["benign"] + by["sensitive"]
    rated = [r for r in records if r["fluent"] is not None]
    metrics = {
        "gen/harmless_ratio": share(records, lambda r: not r["unsafe"]),
        "gen/harmless_ratio_harmful": share(by["harmful"], lambda r: not r["unsafe"]),
        "gen/safe_fluent_harmful": (share(by["harmful"], lambda r: not r["unsafe"] and r["fluent"])
                                    if rated else float("nan")),
        "gen/refusal_harmful": share(by["harmful"], lambda r: r["refusal"]),
        "gen/over_refusal_benign": share(by["benign"], lambda r: r["refusal"]),
        "gen/over_refusal_sensitive": share(by["sensitive"], lambda r: r["refusal"]),
        "gen/helpfulness": mean([r["helpful"] for r in answerable]),
        "gen/helpfulness_benign": mean([r["helpful"] for r in by["benign"]]),
        "gen/helpfulness_sensitive": mean([r["helpful"] for r in by["sensitive"]]),
        "gen/helpfulness_harmful": mean([r["helpful"] for r in by["harmful"]]),
        "gen/fluent": share(rated, lambda r: r["fluent"]),
        "gen/ended_with_eos": share(records, lambda r: r["eos"]),
        "gen/new_tokens": mean([float(r["new_tokens"]) for r in records]),
        "gen/responses": float(len(records)),
    }
    for reason in ("empty", "too_short", "unknown_words", "repetitive", "echo"):
        metrics[f"gen/degenerate_{reason}"] = share(rated, lambda r, reason=reason: r["degenerate"] == reason)
    return metrics


def pick_examples(records: list[dict], n: int) -> list[dict]:
    """Up to ``n`` responses per prompt category (the first of each, deterministic)."""
    out = []
    for category in ("harmful", "benign", "sensitive"):
        out += [r for r in records if r["category"] == category][:n]
    return [{k: r[k] for k in ("prompt", "category", "response", "unsafe", "refusal", "fluent", "degenerate",
                               "helpful")} for r in out]


# ---------------------------------------------------------------------------------------------
# Aggregation and reports
# ---------------------------------------------------------------------------------------------


def summarize(values: list[float]) -> dict[str, float]:
    """mean, std (sample, ddof=1; 0 for one value), min, max, n over finite values (NaN if none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "min": min(finite), "max": max(finite), "n": len(finite)}


def aggregate(per_seed: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """{seed: {run: metrics}} -> {run: {metric: summary over seeds}}."""
    runs: dict[str, dict[str, list[float]]] = {}
    for seed_runs in per_seed.values():
        for run_name, metrics in seed_runs.items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    runs.setdefault(run_name, {}).setdefault(key, []).append(float(value))
    return {run: {k: summarize(v) for k, v in m.items()} for run, m in runs.items()}


_TABLE_COLUMNS = (
    ("gen/harmless_ratio_harmful", "harmless % (harmful prompts)", 100),
    ("gen/safe_fluent_harmful", "harmless & fluent % (harmful)", 100),
    ("gen/refusal_harmful", "refusal % (harmful)", 100),
    ("gen/over_refusal_benign", "over-refusal % (benign)", 100),
    ("gen/over_refusal_sensitive", "over-refusal % (sensitive)", 100),
    ("gen/helpfulness", "helpfulness (benign + sensitive)", 1),
    ("gen/helpfulness_benign", "helpfulness (benign)", 1),
    ("gen/helpfulness_sensitive", "helpfulness (sensitive)", 1),
    ("gen/fluent", "fluent %", 100),
    ("gen/sft_nll", "SFT NLL/token of generations", 1),
    ("lik/safe_over_unsafe_reward", "safe > unsafe % (reward)", 100),
    ("lik/helpful_safe_pairs_reward", "helpful rank % safe-safe (reward)", 100),
    ("lik/nll_safe", "NLL/token safe responses", 1),
    ("lik/nll_unsafe", "NLL/token unsafe responses", 1),
)


def _fmt(summary: dict | None, scale: float) -> str:
    if summary is None or summary["n"] == 0:
        return "n/a"
    digits = 1 if scale == 100 else 3
    return f"{summary['mean'] * scale:.{digits}f} ± {summary['std'] * scale:.{digits}f}"


def markdown_table(rows: list[tuple[str, dict]], first: str) -> str:
    header = f"| {first} | " + " | ".join(title for _, title, _ in _TABLE_COLUMNS) + " |"
    sep = "| --- | " + " | ".join("---:" for _ in _TABLE_COLUMNS) + " |"
    lines = [header, sep]
    for label, agg in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(agg.get(key), scale) for key, _, scale in _TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def method_rows(cfg: dict, agg: dict) -> list[tuple[str, dict]]:
    return [(SFT, agg.get(SFT, {}))] + [(name, agg.get(name, {})) for name in cfg["methods"]]


def sweep_rows(cfg: dict, agg: dict) -> list[tuple[float, str, dict]]:
    """(Delta, run name, aggregate) for every Delta of the sweep, sorted by Delta."""
    method = cfg["delta_sweep"]["method"]
    own_delta = float(_recipe_value(deep_merge(deep_merge(cfg["recipe"], cfg["align"]), cfg["methods"][method]), "delta"))
    out = []
    for delta in sorted(cfg["delta_sweep"]["values"]):
        name = method if own_delta == float(delta) else sweep_name(method, delta)
        out.append((float(delta), name, agg.get(name, {})))
    return out


def write_markdown(path: Path, cfg: dict, results: dict) -> None:
    agg = results["aggregate"]
    seeds = cfg["seeds"]
    ev = cfg["evaluation"]
    align = cfg["align"]
    sweep = cfg["delta_sweep"]
    lines = [
        f"# SafeDPO vs DPO baselines: the paper's experiment in miniature (CPU, `{cfg['recipe'].get('dataset')}`)",
        "",
        f"Command: `{results['command']}`  ",
        *([f"Note: {results['note']}  "] if results.get("note") else []),
        f"Measured {results['finished_utc']} on {results['machine']}; total wall time "
        f"{results['runtime_s']['total'] / 60:.1f} min"
        + (f", CPU time {results['runtime_s']['cpu'] / 60:.1f} min (all threads of this process)"
           if results['runtime_s'].get('cpu') else "") + ".",
        "",
        f"Seeds {seeds} (mean ± sample std over seeds; {'one SFT model per seed' if cfg['sft_per_seed'] else 'one shared SFT model'}). "
        f"Equal budget for every method: {align.get('max_steps')} steps x {align.get('micro_batch_size')} pairs, "
        f"lr {align.get('lr')}, beta {align.get('beta')}, warmup {align.get('warmup_steps')}, "
        f"cosine to {align.get('min_lr_ratio')} x lr, from the same SFT checkpoint. "
        f"Generation: {ev['samples_per_prompt']} samples per held-out prompt "
        f"(split `{results['eval_data'].get('split', 'test')}`: {results['eval_data']['prompts']} prompts, "
        f"{results['eval_data']['harmful_prompts']} harmful, {results['eval_data'].get('benign_prompts', 'n/a')} benign, "
        f"{results['eval_data'].get('sensitive_prompts', 'n/a')} benign-but-sensitive; "
        f"{results['eval_data'].get('prompts_seen_in_train', 'n/a')} of them also in the training split), "
        f"temperature {ev['temperature']}, top-p {ev['top_p']}, up to {ev['max_new_tokens']} new tokens, judged by "
        "the fixture's rule judge. Likelihood metrics on "
        f"{results['eval_data']['tokenized_pairs']} held-out pairs.",
        "",
        "## Methods (SafeDPO at its configured Delta)",
        "",
        markdown_table(method_rows(cfg, agg), "method"),
        "",
        f"## Delta sweep ({sweep['method']})",
        "",
        markdown_table([(f"Delta = {d:g}", a) for d, _, a in sweep_rows(cfg, agg)], "Delta"),
        "",
        "## Training pairs per method (after the pair selection) and stage wall times",
        "",
        "| run | pairs kept | swapped | dropped | train time s (mean) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, info in results["stages"].items():
        sel = info.get("selection") or {}
        lines.append(f"| {name} | {sel.get('rows_out', 'all responses' if name == SFT else 'n/a')} | "
                     f"{sel.get('swapped', '')} | {sel.get('dropped', '')} | {info['train_time_s']:.1f} |")
    lines += ["", "Figures: `harmless_vs_helpfulness.png`, `delta_sweep.png`, `over_refusal.png`. Raw per-seed values, example "
              "generations and the full config: `results.json`. Analysis: `docs/compare.md`.", ""]
    path.write_text("\n".join(lines))


def plot_methods(path: Path, cfg: dict, agg: dict) -> None:
    """Harmless ratio (y) against helpfulness (x), one marker per method with seed spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {SFT: "0.45", "SafeDPO": "tab:red", "DPO-Helpful": "tab:blue", "DPO-Harmless": "tab:green",
              "DPO-SafeBetter": "tab:purple"}
    markers = {SFT: "s", "SafeDPO": "*", "DPO-Helpful": "o", "DPO-Harmless": "^", "DPO-SafeBetter": "D"}
    fig, ax = plt.subplots(figsize=(6.2, 4.8))
    for name, a in method_rows(cfg, agg):
        if not a.get("gen/harmless_ratio", {}).get("n"):
            continue
        x, y = a["gen/helpfulness"], a["gen/harmless_ratio_harmful"]
        ax.errorbar(x["mean"], 100 * y["mean"], xerr=x["std"], yerr=100 * y["std"], fmt=markers.get(name, "o"),
                    color=colors.get(name), markersize=14 if name == "SafeDPO" else 9, capsize=3, label=name,
                    markeredgecolor="black", markeredgewidth=0.6)
    sweep = [(d, a) for d, _, a in sweep_rows(cfg, agg) if a.get("gen/harmless_ratio", {}).get("n")]
    if len(sweep) > 1:  # SafeDPO's Delta sweep as a thin curve through the same axes
        xs = [a["gen/helpfulness"]["mean"] for _, a in sweep]
        ys = [100 * a["gen/harmless_ratio_harmful"]["mean"] for _, a in sweep]
        ax.plot(xs, ys, "-", color=colors["SafeDPO"], alpha=0.45, linewidth=1, zorder=1)
        ax.scatter(xs, ys, s=14, color=colors["SafeDPO"], alpha=0.6, zorder=2,
                   label=f"{cfg['delta_sweep']['method']}, Delta sweep")
        for (d, _), x, y in zip(sweep, xs, ys):
            ax.annotate(f"Δ={d:g}", (x, y), textcoords="offset points", xytext=(4, 5), fontsize=7,
                        color=colors["SafeDPO"])
    ax.set_xlabel("helpfulness on benign + sensitive prompts (rule judge, [0, 1])")
    ax.set_ylabel("harmless ratio on harmful prompts (%)")
    ax.set_title(f"Held-out generations, {len(cfg['seeds'])} seed(s): mean ± std", fontsize=11)
    low = min([100 * (a["gen/harmless_ratio_harmful"]["mean"] - a["gen/harmless_ratio_harmful"]["std"])
               for _, a in method_rows(cfg, agg) if a.get("gen/harmless_ratio_harmful", {}).get("n")] + [90.0])
    ax.set_ylim(max(0.0, low - 5), 101.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_sweep(path: Path, cfg: dict, agg: dict) -> None:
    """Harmless ratio, helpfulness, helpfulness ranking and two fluency measures against Delta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(d, a) for d, _, a in sweep_rows(cfg, agg) if a]
    panels = (("gen/harmless_ratio_harmful", "harmless ratio,\nharmful prompts (%)", 100),
              ("gen/helpfulness", "helpfulness,\nbenign + sensitive (judge)", 1),
              ("gen/over_refusal_sensitive", "over-refusal,\nsensitive prompts (%)", 100),
              ("gen/fluent", "fluent responses (%)", 100),
              ("lik/helpful_safe_pairs_reward", "helpful winner ranked first,\nsafe-safe pairs, by reward (%)", 100),
              ("lik/nll_safe", "NLL/token of safe\nheld-out responses", 1),
              ("gen/sft_nll", "SFT model's NLL/token of\nthe generations (fluency)", 1))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4))
    for ax, (key, title, scale) in zip(axes, panels):
        pts = [(d, a[key]) for d, a in rows if key in a and a[key]["n"]]
        if pts:
            ax.errorbar([d for d, _ in pts], [s["mean"] * scale for _, s in pts],
                        yerr=[s["std"] * scale for _, s in pts], marker="o", color="tab:red", capsize=3)
        ax.set_xlabel("Delta")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{cfg['delta_sweep']['method']}: Delta sweep ({len(cfg['seeds'])} seed(s), mean ± std)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_refusals(path: Path, cfg: dict, agg: dict) -> None:
    """Grouped bars per method: refusal rate on harmful, benign and benign-but-sensitive prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, a) for name, a in method_rows(cfg, agg) if a.get("gen/refusal_harmful", {}).get("n")]
    bars = (("gen/refusal_harmful", "harmful (refusal is right)", "tab:green"),
            ("gen/over_refusal_sensitive", "benign-but-sensitive (over-refusal)", "tab:orange"),
            ("gen/over_refusal_benign", "benign (over-refusal)", "tab:red"))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.0))
    width = 0.8 / len(bars)
    for b, (key, label, color) in enumerate(bars):
        xs = [i + (b - 1) * width for i in range(len(rows))]
        means = [100 * a.get(key, {}).get("mean", float("nan")) for _, a in rows]
        stds = [100 * a.get(key, {}).get("std", 0.0) for _, a in rows]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=label, color=color)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([name for name, _ in rows], rotation=20, fontsize=8)
    ax.set_ylabel("responses judged refusals (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Refusals by prompt category, {len(cfg['seeds'])} seed(s): mean ± std", fontsize=11)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _json_safe(obj: Any) -> Any:
    """NaN / inf -> None so results.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


def _machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average at start {load[0]:.1f}")


def selection_counts(recipe_cfg: dict, selections: set[str]) -> dict[str, dict]:
    """Pair-selection report of the training split for every selection used (kept / swapped / dropped)."""
    from safedpo_kernels.data import load_pairs, select_pairs

    train, _ = load_pairs(recipe_cfg["dataset"], split=recipe_cfg["train_split"], name=recipe_cfg["dataset_config"],
                          limit=recipe_cfg["train_limit"])
    return {sel: _as_dict(select_pairs(train, sel)[1]) for sel in sorted(selections)}


def _selection_of(stage_cfg: dict) -> str:
    return validate_recipe_config(stage_cfg)["selection"]  # the recipe resolves "auto"


@torch.no_grad()
def response_nll(model, records: list[dict], pad_token_id: int, batch_size: int) -> float:
    """NLL per token of generated responses (their EOS included when they stopped) under ``model``.

    With the SFT model as ``model`` this is a fluency measure of another model's generations: text that
    the SFT model finds unlikely (made-up words, broken phrases) scores high. NaN if no token at all.
    """
    base = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    rows = [r for r in records if r["response_ids"]]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            p, y = r["prompt_ids"], r["response_ids"]
            ids[j, :len(p) + len(y)] = torch.tensor(p + y)
            labels[j, len(p):len(p) + len(y)] = torch.tensor(y)
            mask[j, :len(p) + len(y)] = 1
        hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
        target = labels[:, 1:]
        tok = linear_logprobs(hidden[:, :-1], head.weight, target, bias=getattr(head, "bias", None),
                              ignore_index=IGNORE_INDEX)
        total -= float(tok.double().sum())
        count += int((target != IGNORE_INDEX).sum())
    return total / count if count else float("nan")


def evaluate_model(model, tokenizer, data: EvalData, ev: dict, sft_model, sft_logps, *, seed: int):
    """Likelihood and generation metrics of one model; returns (metrics, pair log-probs, records).

    ``sft_model`` / ``sft_logps``: the SFT model and its held-out pair log-probs (None when ``model`` is
    the SFT model itself). Adds gen/sft_nll: the SFT model's NLL per token of this model's generations.
    """
    logps = pair_logps(model, data.pairs, tokenizer.pad_token_id, ev["batch_size"])
    metrics = likelihood_metrics(logps, logps if sft_logps is None else sft_logps, data.chosen_unsafe,
                                 data.rejected_unsafe, (data.chosen_tokens, data.rejected_tokens))
    gen_metrics, records = generate_and_judge(model, tokenizer, data, ev, seed=seed, judge=judge_for(data.source))
    metrics.update(gen_metrics)
    judge_model = model if sft_model is None else sft_model
    metrics["gen/sft_nll"] = response_nll(judge_model, records, tokenizer.pad_token_id, ev["batch_size"])
    return metrics, logps, records


def run_compare(cfg: dict, *, command: str = "") -> dict:
    """Runs every stage of every seed, evaluates, writes the results; returns the results dict."""
    from tqdm.auto import tqdm

    if cfg["num_threads"] is not None:
        torch.set_num_threads(cfg["num_threads"])
    t_start, cpu_start = time.perf_counter(), time.process_time()
    machine = _machine()
    out_root, results_dir = Path(cfg["output_dir"]), Path(cfg["results_dir"])
    out_root.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)

    ev, seeds = cfg["evaluation"], cfg["seeds"]
    plans = []
    shared_seed = seeds[0] if cfg["sft_seed"] is None else cfg["sft_seed"]
    for seed in seeds:
        sft_dir = out_root / (f"seed{seed}" if cfg["sft_per_seed"] else f"shared_seed{shared_seed}") / "sft"
        stages = build_stage_configs(cfg, seed=seed, stage_root=out_root / f"seed{seed}", sft_dir=sft_dir,
                                     sft_seed=None if cfg["sft_per_seed"] else shared_seed)
        plans.append((seed, stages))
    data_cfg = validate_recipe_config(plans[0][1][0].config)  # the SFT stage, recipe defaults filled in
    tokenizer = load_tokenizer(data_cfg)
    data = load_eval_data(data_cfg, tokenizer)
    selections = selection_counts(data_cfg, {_selection_of(st.config) for _, sts in plans for st in sts[1:]})
    n_runs = sum(len(sts) for _, sts in plans) - (0 if cfg["sft_per_seed"] else len(seeds) - 1)

    bar = tqdm(total=n_runs, desc="compare", unit="run", dynamic_ncols=True)
    per_seed: dict[str, dict[str, dict]] = {}
    examples: dict[str, list[dict]] = {}
    stage_info: dict[str, dict] = {}
    done_sft: dict[str, tuple[dict, tuple[torch.Tensor, torch.Tensor], Any]] = {}  # sft dir -> (metrics, logps, model)
    for seed, stages in plans:
        seed_metrics: dict[str, dict] = {}
        sft_logps = sft_model = None
        for stage in stages:
            key = stage.config["output_dir"]
            if stage.name == SFT and key in done_sft:  # one shared SFT model (sft_per_seed: false): counted once
                _, sft_logps, sft_model = done_sft[key]
                continue
            bar.set_postfix_str(f"seed {seed}: {stage.name}")
            result = reusable_sft(stage.config) if stage.name == SFT else None
            if result is None:
                result = run_recipe(stage.config)
                if stage.name == SFT:
                    write_sft_marker(stage.config, result)
            if result["export"] is None:
                raise RuntimeError(f"stage {stage.name}: the recipe returned no export (export_hf must be true)")
            t_eval = time.perf_counter()
            model = load_model(result["export"])
            metrics, logps, records = evaluate_model(model, tokenizer, data, ev, sft_model, sft_logps,
                                                     seed=10_000 + seed)
            metrics.update({"time/train_s": float(result["train_time_s"]), "time/eval_s": time.perf_counter() - t_eval,
                            "train/steps": float(result["steps"])})
            if result["train_losses"]:
                metrics["train/final_loss"] = float(result["train_losses"][-1])
            for name, value in result["final_eval"].items():  # the recipe's own held-out numbers (cross-check)
                metrics[f"recipe/{name.removeprefix('eval/')}"] = float(value)
            if stage.name == SFT:
                sft_logps, sft_model = logps, model
                done_sft[key] = (metrics, logps, model)
            del model
            seed_metrics[stage.name] = metrics
            if seed == seeds[0]:
                examples[stage.name] = pick_examples(records, ev["examples"])
            info = stage_info.setdefault(stage.name, {
                "method": stage.method, "delta": stage.delta, "train_time_s": [],
                "selection": None if stage.name == SFT else selections[_selection_of(stage.config)]})
            info["train_time_s"].append(float(result["train_time_s"]))
            if not cfg["keep_models"]:
                shutil.rmtree(Path(key) / "checkpoints", ignore_errors=True)
                if stage.name != SFT:
                    shutil.rmtree(result["export"], ignore_errors=True)
            bar.update(1)
        per_seed[str(seed)] = seed_metrics
    bar.close()

    for info in stage_info.values():
        times = info.pop("train_time_s")
        info["train_time_s"] = statistics.fmean(times)
    agg = aggregate(per_seed)
    results = {
        "command": command,
        "finished_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine,
        "runtime_s": {"total": time.perf_counter() - t_start, "cpu": time.process_time() - cpu_start},
        "config": cfg,
        "eval_data": data.report,
        "stages": stage_info,
        "aggregate": agg,
        "per_seed": per_seed,
        "examples": examples,
    }
    (results_dir / "results.json").write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    write_reports(results_dir, results)
    return results


def write_reports(results_dir: Path, results: dict) -> None:
    """results.md and the two PNGs from a results dict (also used by ``--from-results``)."""
    cfg, agg = results["config"], results["aggregate"]
    write_markdown(results_dir / "results.md", cfg, results)
    plot_methods(results_dir / "harmless_vs_helpfulness.png", cfg, agg)
    plot_sweep(results_dir / "delta_sweep.png", cfg, agg)
    plot_refusals(results_dir / "over_refusal.png", cfg, agg)


def merge_results(paths: list[str | os.PathLike]) -> dict:
    """One results dict from several ``results.json`` of the same config run on disjoint seeds (e.g. seeds
    run as parallel processes): per-seed values united and re-aggregated; wall time = the longest run
    (they ran side by side), CPU time = the sum. ValueError if configs differ beyond seeds and folders."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    if not runs:
        raise ValueError("--merge: expected at least one results.json")

    def key(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if k not in ("seeds", "output_dir", "results_dir")}

    merged = copy.deepcopy(runs[0])
    per_seed: dict[str, dict] = {}
    for path, run in zip(paths, runs):
        if key(run["config"]) != key(runs[0]["config"]):
            raise ValueError(f"--merge: {path} was run with another config than {paths[0]}")
        for seed, values in run["per_seed"].items():
            if seed in per_seed:
                raise ValueError(f"--merge: seed {seed} occurs in more than one results file")
            per_seed[seed] = values
    merged["per_seed"] = dict(sorted(per_seed.items(), key=lambda kv: int(kv[0])))
    merged["config"]["seeds"] = [int(s) for s in merged["per_seed"]]
    merged["aggregate"] = aggregate(merged["per_seed"])
    for name, info in merged["stages"].items():
        times = [r["stages"][name]["train_time_s"] for r in runs if name in r["stages"]]
        info["train_time_s"] = statistics.fmean(times)
    walls = [r["runtime_s"]["total"] for r in runs]
    cpus = [r["runtime_s"].get("cpu") for r in runs]
    merged["runtime_s"] = {"total": max(walls), "sum_of_runs": sum(walls),
                           "cpu": sum(c for c in cpus if c is not None) if all(c is not None for c in cpus) else None}
    merged["command"] = " ; ".join(r["command"] for r in runs)
    merged["note"] = (f"merged from {len(runs)} runs side by side (one per seed group); wall time = the longest, "
                      f"CPU time = the sum")
    merged["finished_utc"] = max(r["finished_utc"] for r in runs)
    return merged


def _from_json(obj: Any) -> Any:
    """Inverse of :func:`_json_safe` for summaries: None -> NaN inside the aggregate."""
    if isinstance(obj, dict):
        return {k: _from_json(v) for k, v in obj.items()}
    return float("nan") if obj is None else obj


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (recipes/configs/tiny_compare.yaml)")
    parser.add_argument("--quick", action="store_true", help="apply the config's quick: section (smoke run)")
    parser.add_argument("--output-dir", help="override output_dir (models, recipe logs)")
    parser.add_argument("--results-dir", help="override results_dir (results.json, results.md, PNGs)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, dotted for nested keys, value parsed as YAML "
                             "(e.g. --set align.beta=0.1 --set seeds=[0]); repeatable")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="no training: merge results.json files of disjoint seeds into --results-dir")
    parser.add_argument("--from-results", metavar="JSON",
                        help="no training: re-render results.md and the PNGs next to an existing results.json")
    args = parser.parse_args(argv)
    if args.merge:
        if not args.results_dir:
            parser.error("--merge needs --results-dir")
        results = merge_results(args.merge)
        out = Path(args.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        results["config"]["results_dir"] = str(out)
        (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1) + "\n")
        results["aggregate"] = _from_json(results["aggregate"])
        write_reports(out, results)
        print((out / "results.md").read_text())
        return
    if args.from_results:
        path = Path(args.from_results)
        results = json.loads(path.read_text())
        results["aggregate"] = _from_json(results["aggregate"])
        write_reports(path.parent, results)
        print((path.parent / "results.md").read_text())
        return
    if not args.config:
        parser.error("--config is required (unless --from-results)")
    overrides: dict = {}
    for item in args.sets:
        overrides = deep_merge(overrides, parse_set(item))
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.results_dir:
        overrides["results_dir"] = args.results_dir
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(args.config, quick=args.quick, overrides=overrides)
    command = "python recipes/compare_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run_compare(cfg, command=command.strip())
    print((Path(cfg["results_dir"]) / "results.md").read_text())
    print(f"results: {cfg['results_dir']} ({results['runtime_s']['total'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
