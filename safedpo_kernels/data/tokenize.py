"""Tokenize canonical pairs into prompt + response token ids with HF-style labels.

Template: the tokenizer's chat template when it has one (prompt = the user turn rendered with
``add_generation_prompt=True``), else a plain template, by default safe-rlhf's
``"BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"`` (tokenized with the tokenizer's special
tokens, e.g. a BOS). The response is tokenized on its own (no special tokens) and EOS is appended.
Labels equal ``ignore_index`` on prompt tokens and the token ids on response tokens.

Truncation policy (per pair, so chosen and rejected share one prompt):

1. with ``max_prompt_length`` set, the prompt is trimmed from the LEFT to that many tokens;
2. if prompt + longer response exceeds ``max_length``, the prompt is trimmed further from the LEFT,
   but not below ``min_prompt_length`` tokens (default ``max_length // 2``, or the whole prompt if
   shorter);
3. then each response is trimmed from the RIGHT to fit ``max_length`` (a cut response loses its EOS);
4. a pair in which a response has no token left is dropped and counted (``no response token left``).
"""

from __future__ import annotations

import warnings
from collections import Counter

from safedpo_kernels.data.reports import TokenizeReport

__all__ = ["tokenize_pairs", "DEFAULT_TEMPLATE", "build_prompts"]

DEFAULT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
_REQUIRED = ("prompt", "chosen", "rejected", "chosen_unsafe", "rejected_unsafe")
# Bump when tokenization or truncation changes meaning: it is part of the Dataset.map cache key.
TOKENIZE_VERSION = 1


def _resolve_template(tokenizer, template: str | None) -> str:
    """``"chat"`` or a plain template containing ``{prompt}``."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template is None:
        return "chat" if has_chat else DEFAULT_TEMPLATE
    if not isinstance(template, str):
        raise TypeError(f"template: expected None, 'chat' or a str containing '{{prompt}}', got {template!r}")
    if template == "chat":
        if not has_chat:
            raise ValueError("template: 'chat' asks for the tokenizer's chat template, but it has none")
        return template
    if template.count("{prompt}") != 1:
        raise ValueError(f"template: expected exactly one '{{prompt}}' placeholder, got {template!r}")
    return template


def build_prompts(prompts: list[str], tokenizer, template: str | None = None) -> list[list[int]]:
    """Prompt token ids (template applied, special tokens as the template path adds them): what a model is
    given at generation time, identical to the prompt part of :func:`tokenize_pairs` before truncation."""
    resolved = _resolve_template(tokenizer, template)
    if resolved == "chat":
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    texts = [resolved.replace("{prompt}", p) for p in prompts]
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def _truncate(prompt, chosen, rejected, *, max_length, max_prompt_length, min_prompt_length):
    """(prompt, chosen, rejected, prompt_cut, response_cut) under the module's truncation policy."""
    prompt_cut = response_cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, prompt_cut = prompt[len(prompt) - max_prompt_length:], True
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > max_length:
        floor = min(len(prompt), min_prompt_length)
        keep = max(max_length - longest, floor)
        if keep < len(prompt):
            prompt, prompt_cut = prompt[len(prompt) - keep:], True
        budget = max_length - len(prompt)
        if longest > budget:
            chosen, rejected, response_cut = chosen[:budget], rejected[:budget], True
    return prompt, chosen, rejected, prompt_cut, response_cut


def _tokenize_batch(batch, *, tokenizer, template, max_length, max_prompt_length, min_prompt_length, ignore_index,
                    version):
    """Tokenize and truncate a batch of pairs; ``version`` only salts the ``Dataset.map`` cache key."""
    eos = tokenizer.eos_token_id
    prompts = build_prompts(batch["prompt"], tokenizer, template)
    chosen = tokenizer(batch["chosen"], add_special_tokens=False)["input_ids"]
    rejected = tokenizer(batch["rejected"], add_special_tokens=False)["input_ids"]
    out = {k: [] for k in ("prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids",
                           "rejected_labels", "_drop", "_pcut", "_rcut")}
    for p, c, r in zip(prompts, chosen, rejected):
        p, c, r, pcut, rcut = _truncate(
            list(p), list(c) + [eos], list(r) + [eos], max_length=max_length,
            max_prompt_length=max_prompt_length, min_prompt_length=min_prompt_length,
        )
        out["prompt_input_ids"].append(p)
        out["chosen_input_ids"].append(p + c)
        out["chosen_labels"].append([ignore_index] * len(p) + c)
        out["rejected_input_ids"].append(p + r)
        out["rejected_labels"].append([ignore_index] * len(p) + r)
        out["_drop"].append("no response token left" if not c or not r else "")
        out["_pcut"].append(pcut)
        out["_rcut"].append(rcut)
    return out


def _check_int(name: str, value, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


def tokenize_pairs(
    ds,
    tokenizer,
    *,
    max_length: int = 512,
    template: str | None = None,
    num_proc: int | None = None,
    ignore_index: int = -100,
    max_prompt_length: int | None = None,
    min_prompt_length: int | None = None,
):
    """Tokenize canonical pairs for preference training (``Dataset.map(batched=True)``: cached, parallel).

    Args:
        ds: ``datasets.Dataset`` with ``prompt, chosen, rejected, chosen_unsafe, rejected_unsafe``
            (from :func:`load_pairs` / :func:`select_pairs`); other columns are carried through.
        tokenizer: a ``transformers`` tokenizer with an EOS token. Without a pad token, the EOS token is
            set as pad token (a warning and a report note say so).
        max_length: most tokens per sequence (prompt + response + EOS), >= 2.
        template: None (chat template if the tokenizer has one, else :data:`DEFAULT_TEMPLATE`),
            ``"chat"`` (require the chat template) or a plain template with one ``{prompt}``.
        num_proc: worker processes for ``Dataset.map`` (None = in process).
        ignore_index: label value on prompt tokens; must not be a token id.
        max_prompt_length: optional cap on prompt tokens (trimmed from the left first).
        min_prompt_length: prompt tokens kept when trimming for ``max_length`` (default ``max_length // 2``).

    Returns:
        ``(dataset, TokenizeReport)``. New columns (lists of int): ``prompt_input_ids``,
        ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels`` (labels are
        HF-style: aligned with the input ids, ``ignore_index`` on the prompt).
    """
    import datasets

    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"ds: expected a datasets.Dataset (from load_pairs), got {type(ds).__name__}")
    missing = [c for c in _REQUIRED if c not in ds.column_names]
    if missing:
        raise ValueError(f"ds: missing canonical columns {missing} (load data with load_pairs first)")
    if not callable(tokenizer) or not hasattr(tokenizer, "eos_token_id"):
        raise TypeError(f"tokenizer: expected a transformers tokenizer, got {type(tokenizer).__name__}")
    _check_int("max_length", max_length, 2)
    _check_int("num_proc", num_proc, 1, allow_none=True)
    _check_int("max_prompt_length", max_prompt_length, 0, allow_none=True)
    _check_int("min_prompt_length", min_prompt_length, 0, allow_none=True)
    if min_prompt_length is not None and min_prompt_length > max_length:
        raise ValueError(f"min_prompt_length: expected <= max_length ({max_length}), got {min_prompt_length}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if 0 <= ignore_index < len(tokenizer):
        raise ValueError(f"ignore_index: {ignore_index} is a token id of this tokenizer (0..{len(tokenizer) - 1})")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: has no eos_token; set tokenizer.eos_token (EOS is appended to responses)")
    resolved = _resolve_template(tokenizer, template)
    notes = []
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(f"tokenizer had no pad token: set pad_token = eos_token {tokenizer.eos_token!r}")
        warnings.warn(f"tokenize_pairs: {notes[-1]}", stacklevel=2)
    report = TokenizeReport(template=resolved, max_length=max_length, total=len(ds), notes=notes)
    if len(ds) == 0:
        raise ValueError("ds: no pairs to tokenize (empty dataset)")
    tok = ds.map(
        _tokenize_batch, batched=True, num_proc=num_proc, desc="tokenizing pairs",
        fn_kwargs={"tokenizer": tokenizer, "template": resolved, "max_length": max_length,
                   "max_prompt_length": max_prompt_length,
                   "min_prompt_length": max_length // 2 if min_prompt_length is None else min_prompt_length,
                   "ignore_index": ignore_index, "version": TOKENIZE_VERSION},
    )
    drops = list(tok["_drop"])
    report.dropped = dict(Counter(d for d in drops if d))
    report.prompt_truncated = sum(tok["_pcut"])
    report.response_truncated = sum(tok["_rcut"])
    if report.dropped:
        tok = tok.select([i for i, d in enumerate(drops) if not d])
    tok = tok.remove_columns(["_drop", "_pcut", "_rcut"])
    report.kept = len(tok)
    lengths = [len(x) for col in ("chosen_input_ids", "rejected_input_ids") for x in tok[col]]
    if lengths:
        report.max_sequence_length = max(lengths)
        report.mean_sequence_length = round(sum(lengths) / len(lengths), 2)
    return tok, report
