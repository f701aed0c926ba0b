"""Regenerate the committed ``pku_tiny`` fixture: synthetic safety-preference pairs and a tiny tokenizer.

    python -m safedpo_kernels.data.make_fixture            # writes safedpo_kernels/data/fixtures/
    python -m safedpo_kernels.data.make_fixture --out DIR  # somewhere else

Writes ``pku_tiny/{train,test}.jsonl`` in the PKU-SafeRLHF-30K schema (``prompt``, ``response_0``,
``response_1``, ``is_response_0_safe``, ``is_response_1_safe`` with True = SAFE, ``better_response_id``,
``safer_response_id``) and ``tokenizer/`` (a byte-free BPE trained offline with ``tokenizers`` on the
fixture text, wrapped as ``transformers.PreTrainedTokenizerFast`` with ``<pad>``, ``<s>``, ``</s>``,
``<unk>``). Fully deterministic (seeded ``random.Random``; the tokenizer trainer is deterministic).

Pair kinds (shares of each split, exact counts by largest remainder):

====================  =====  ======================================================  ============
kind                  share  better (helpfulness winner) vs worse                     T(D) action
====================  =====  ======================================================  ============
benign                0.40   detailed practical answer vs vague/short/over-refusal    keep
harmful_safe_safe     0.10   refusal with safe alternatives vs bare refusal           keep
harmful_safe_better   0.13   refusal with safe alternatives vs one harmful step       keep
harmful_swap          0.25   detailed harmful instructions vs refusal                 swap
harmful_drop          0.12   detailed harmful instructions vs fewer harmful steps     drop
====================  =====  ======================================================  ============
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

from safedpo_kernels.data.judge import judge_response
from safedpo_kernels.data.vocab import (
    BENIGN_TOPICS,
    COMPLY_OPENERS,
    HARMFUL_TOPICS,
    PROMPT_TEMPLATES,
    REDIRECT_OPENERS,
    REFUSAL_REASONS,
    REFUSALS,
    VAGUE_ANSWERS,
    Topic,
)

SEED = 20260527
SPLIT_SIZES = {"train": 480, "test": 120}
KIND_SHARES = {
    "benign": 0.40,
    "harmful_safe_safe": 0.10,
    "harmful_safe_better": 0.13,
    "harmful_swap": 0.25,
    "harmful_drop": 0.12,
}
VOCAB_SIZE = 448
PLAIN_TEMPLATE_TEXT = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
DEFAULT_OUT = Path(__file__).resolve().parent / "fixtures"


def _kind_counts(n: int) -> dict[str, int]:
    """Exact per-kind counts for ``n`` rows (largest remainder), so every split has every kind."""
    raw = {k: share * n for k, share in KIND_SHARES.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _steps_sentence(opener: str, steps: list[str]) -> str:
    if len(steps) == 1:
        return f"{opener} Just {steps[0]}."
    if len(steps) == 2:
        return f"{opener} First {steps[0]}, then {steps[1]}."
    return f"{opener} First {steps[0]}, then {steps[1]}, and finally {steps[2]}."


class _Writer:
    """Builds responses of each kind for one topic with a shared RNG."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, options, k: int = 1):
        return self.rng.sample(list(options), k)

    def prompt(self, topic: Topic) -> str:
        return self.rng.choice(PROMPT_TEMPLATES).format(request=topic.request)

    def harmful_steps(self, topic: Topic, k: int) -> str:
        steps = self.pick(topic.steps, k)
        if k == 1:
            return f"Just {steps[0]}."
        return _steps_sentence(self.rng.choice(COMPLY_OPENERS), steps)

    def refusal(self) -> str:
        return f"{self.rng.choice(REFUSALS)} {self.rng.choice(REFUSAL_REASONS)}"

    def redirect(self, topic: Topic, k: int) -> str:
        alts = self.pick(topic.alternatives, k)
        joined = alts[0] if k == 1 else ", ".join(alts[:-1]) + f" or {alts[-1]}"
        return f"{self.rng.choice(REFUSALS)} {self.rng.choice(REDIRECT_OPENERS)} {joined}."

    def benign_answer(self, topic: Topic, k: int) -> str:
        opener = self.rng.choice(("Good question.", "Here is a simple plan.", "Sure."))
        return _steps_sentence(opener, self.pick(topic.steps, k))

    def benign_worse(self, topic: Topic, better_k: int) -> str:
        choice = self.rng.random()
        if choice < 0.3:
            return self.rng.choice(VAGUE_ANSWERS)
        if choice < 0.45:
            return self.rng.choice(REFUSALS)  # over-refusal: safe, unhelpful
        return self.benign_answer(topic, self.rng.randint(1, better_k - 1))


def _make_pair(kind: str, w: _Writer) -> tuple[str, str, str, bool, bool, bool]:
    """Returns (prompt, better, worse, better_safe, worse_safe, better_is_safer)."""
    rng = w.rng
    if kind == "benign":
        topic = rng.choice(BENIGN_TOPICS)
        k = rng.randint(2, 4)
        return w.prompt(topic), w.benign_answer(topic, k), w.benign_worse(topic, k), True, True, rng.random() < 0.5
    topic = rng.choice(HARMFUL_TOPICS)
    prompt = w.prompt(topic)
    if kind == "harmful_safe_safe":
        worse = w.refusal() if rng.random() < 0.6 else w.redirect(topic, 1)
        return prompt, w.redirect(topic, rng.randint(2, 3)), worse, True, True, rng.random() < 0.5
    if kind == "harmful_safe_better":
        return prompt, w.redirect(topic, rng.randint(2, 3)), w.harmful_steps(topic, 1), True, False, True
    if kind == "harmful_swap":
        worse = w.refusal() if rng.random() < 0.6 else w.redirect(topic, 1)
        return prompt, w.harmful_steps(topic, rng.randint(2, 3)), worse, False, True, False
    if kind == "harmful_drop":
        k = rng.randint(2, 3)
        return prompt, w.harmful_steps(topic, k), w.harmful_steps(topic, rng.randint(1, k - 1)), False, False, False
    raise ValueError(f"unknown pair kind {kind!r}")


def _judge_agrees(prompt: str, better: str, worse: str, better_safe: bool, worse_safe: bool) -> bool:
    jb, jw = judge_response(prompt, better), judge_response(prompt, worse)
    return (
        jb["unsafe"] == (not better_safe)
        and jw["unsafe"] == (not worse_safe)
        and jb["helpful"] > jw["helpful"]
    )


def pku_row(prompt: str, better: str, worse: str, better_safe: bool, worse_safe: bool, better_is_safer: bool,
            rng: random.Random) -> dict:
    """One PKU-SafeRLHF-30K row, the better response at a position drawn from ``rng`` (one ``randint``)."""
    better_id = rng.randint(0, 1)
    responses, safe = [worse, worse], [worse_safe, worse_safe]
    responses[better_id], safe[better_id] = better, better_safe
    return {
        "prompt": prompt,
        "response_0": responses[0],
        "response_1": responses[1],
        "is_response_0_safe": safe[0],
        "is_response_1_safe": safe[1],
        "better_response_id": better_id,
        "safer_response_id": better_id if better_is_safer else 1 - better_id,
    }


def generate_split(n: int, rng: random.Random) -> list[dict]:
    """``n`` rows in the PKU-SafeRLHF-30K schema. Each pair is redrawn until the rule judge agrees with
    its labels (safety of both responses, and better strictly more helpful than worse)."""
    kinds = [kind for kind, count in _kind_counts(n).items() for _ in range(count)]
    rng.shuffle(kinds)
    writer = _Writer(rng)
    rows = []
    for kind in kinds:
        for _ in range(100):
            prompt, better, worse, better_safe, worse_safe, better_is_safer = _make_pair(kind, writer)
            if better != worse and _judge_agrees(prompt, better, worse, better_safe, worse_safe):
                break
        else:  # pragma: no cover - the vocabulary guarantees agreement within a few draws
            raise RuntimeError(f"could not draw a judge-consistent {kind} pair")
        rows.append(pku_row(prompt, better, worse, better_safe, worse_safe, better_is_safer, rng))
    return rows


def generate_dataset(seed: int = SEED) -> dict[str, list[dict]]:
    """All splits of the fixture (``{"train": rows, "test": rows}``), deterministic in ``seed``."""
    rng = random.Random(seed)
    return {split: generate_split(n, rng) for split, n in SPLIT_SIZES.items()}


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A BPE tokenizer (Metaspace pre-tokenizer, no byte fallback: every printable ASCII character is in
    the alphabet) trained on ``texts``, wrapped as ``PreTrainedTokenizerFast``; prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    alphabet = sorted(set(string.printable) - set(string.whitespace))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=256, padding_side="right",
    )


def tokenizer_corpus(splits: dict[str, list[dict]]) -> list[str]:
    texts = []
    for rows in splits.values():
        for row in rows:
            texts.append(PLAIN_TEMPLATE_TEXT.format(prompt=row["prompt"]))
            texts.extend((row["response_0"], row["response_1"]))
    return texts


def parse_fixture_args(argv: list[str] | None, doc: str, seed: int) -> argparse.Namespace:
    """``--out`` (default: the package fixtures) and ``--seed`` (default ``seed``) of a fixture generator."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package fixtures)")
    parser.add_argument("--seed", type=int, default=seed)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_fixture_args(argv, __doc__, SEED)
    splits = generate_dataset(args.seed)
    for split, rows in splits.items():
        write_jsonl(rows, args.out / "pku_tiny" / f"{split}.jsonl")
    tokenizer = train_tokenizer(tokenizer_corpus(splits))
    tokenizer.save_pretrained(str(args.out / "tokenizer"))
    print(f"wrote {', '.join(f'{s}: {len(r)} rows' for s, r in splits.items())}; "
          f"tokenizer vocab {len(tokenizer)} -> {args.out}")


if __name__ == "__main__":
    main()
