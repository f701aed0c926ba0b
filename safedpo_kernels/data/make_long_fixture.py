"""Generate the ``pku_long`` fixture: PKU-length safety-preference pairs with held-out prompts.

    python -m safedpo_kernels.data.make_long_fixture            # writes safedpo_kernels/data/fixtures/pku_long/
    python -m safedpo_kernels.data.make_long_fixture --out DIR  # DIR/pku_long/

Writes ``pku_long/{train,validation,test}.jsonl`` in the PKU-SafeRLHF-30K schema (``prompt``,
``response_0``, ``response_1``, ``is_response_0_safe``, ``is_response_1_safe`` with True = SAFE,
``better_response_id``, ``safer_response_id``) and ``pku_long/tokenizer/`` (BPE, 1024 tokens,
trained offline on the fixture text; ``<pad>``, ``<s>`` prepended, ``</s>``, ``<unk>``).
Deterministic: one seeded ``random.Random``; the tokenizer trainer is deterministic.

Compared with ``pku_tiny`` (28-token answers, one template for every harmful answer, test prompts
seen in training), every response is several sentences long (median >= 80 tokens, like
PKU-SafeRLHF), each harmful topic has its own harmful steps, and the splits are disjoint in topics
and in prompt templates (:mod:`safedpo_kernels.data.long_vocab`), so validation and test measure
behaviour on unseen prompts. Every split has three prompt categories: harmful, benign, and
benign-but-sensitive (XSTest-style: "kill a Python process"). Every prompt of a split (each topic
with each template of that split) occurs in it.

Pair kinds by prompt category (harmful kinds drawn with the weights below):

===================  ======  =========================================================  ===========
kind                 weight  better (helpfulness winner) vs worse                         T(D)
===================  ======  =========================================================  ===========
benign / sensitive   -       detailed answer vs shorter answer / vague / over-refusal      keep
harmful_safe_safe    0.20    refusal with safe alternatives vs bare refusal               keep
harmful_safe_better  0.25    refusal with safe alternatives vs harmful answer             keep
harmful_swap         0.35    detailed harmful answer vs (redirecting) refusal             swap
harmful_drop         0.20    detailed harmful answer vs shorter harmful answer             drop
===================  ======  =========================================================  ===========

``safer_response_id`` on a pair of two safe (or two unsafe) responses is a coin flip, as PKU's
safer label carries little signal there. Every pair is redrawn until the rule judge
(:func:`~safedpo_kernels.data.rule_judge.judge_long`) agrees with its labels: both safety flags,
the better response strictly more helpful, both responses fluent.
"""

from __future__ import annotations

import random

from safedpo_kernels.data import long_vocab as V
from safedpo_kernels.data.make_fixture import parse_fixture_args, pku_row, tokenizer_corpus, train_tokenizer, write_jsonl
from safedpo_kernels.data.rule_judge import judge_long

SEED = 20261129
NAME = "pku_long"
PAIRS_PER_PROMPT = {"train": 3.5, "validation": 4.0, "test": 4.0}
HARMFUL_KIND_WEIGHTS = {"harmful_safe_safe": 0.20, "harmful_safe_better": 0.25, "harmful_swap": 0.35,
                        "harmful_drop": 0.20}
VOCAB_SIZE = 1024


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


class _Writer:
    """Builds the responses of one split with a shared RNG."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def _steps(self, steps: list[str], elaborations: tuple[str, ...], p_elab: float) -> str:
        elabs = self.rng.sample(list(elaborations), len(steps))
        parts = [f"{s}, {e}" if self.rng.random() < p_elab else s for s, e in zip(steps, elabs)]
        if self.rng.random() < 0.5:
            return " ".join(f"Step {i + 1}: {p}." for i, p in enumerate(parts))
        words = ["First,", "Next,", "After that,", "Then,"][: len(parts) - 1] + ["Finally,"]
        if len(parts) == 1:
            words = ["Just"]
        return " ".join(f"{w} {p}." for w, p in zip(words, parts))

    def harmful(self, topic: V.LongTopic, k: int) -> str:
        steps = self.rng.sample(list(topic.steps), k)
        opener = self.rng.choice(V.HARMFUL_OPENERS).format(request=topic.request)
        return f"{opener} {self._steps(steps, V.HARMFUL_ELABORATIONS, 0.8)} {self.rng.choice(V.HARMFUL_CLOSERS)}"

    def refusal(self, topic: V.LongTopic) -> str:
        return (f"{self.rng.choice(V.REFUSALS).format(request=topic.request)} {self.rng.choice(V.REFUSAL_REASONS)} "
                f"{self.rng.choice(V.REFUSAL_CLOSERS)}")

    def redirect(self, topic: V.LongTopic, k: int) -> str:
        alts = self.rng.sample(list(V.ALTERNATIVES[topic.alternatives]), k)
        leads = self.rng.sample(list(V.REDIRECT_LEADS), k)
        body = " ".join(f"{lead} {alt}." for lead, alt in zip(leads, alts))
        return (f"{self.rng.choice(V.REFUSALS).format(request=topic.request)} {self.rng.choice(V.REFUSAL_REASONS)} "
                f"{self.rng.choice(V.REDIRECT_OPENERS)} {body}")

    def answer(self, topic: V.LongTopic, k: int) -> str:
        steps = self.rng.sample(list(topic.steps), k)
        opener = self.rng.choice(V.BENIGN_OPENERS).format(request=topic.request)
        return f"{opener} {self._steps(steps, V.BENIGN_ELABORATIONS, 0.8)} {self.rng.choice(V.BENIGN_CLOSERS)}"

    def worse_answer(self, topic: V.LongTopic, better_k: int) -> str:
        r = self.rng.random()
        if r < 0.25:
            return self.rng.choice(V.VAGUE_ANSWERS)
        if r < 0.45:
            return self.refusal(topic)  # over-refusal: safe and unhelpful
        return self.answer(topic, self.rng.randint(1, better_k - 1))


def _make_pair(topic: V.LongTopic, kind: str, w: _Writer) -> tuple[str, str, bool, bool, bool]:
    """(better, worse, better_safe, worse_safe, better_is_safer)."""
    rng = w.rng
    if kind == "answer":
        k = rng.randint(3, 4)
        return w.answer(topic, k), w.worse_answer(topic, k), True, True, rng.random() < 0.5
    if kind == "harmful_safe_safe":
        worse = w.refusal(topic) if rng.random() < 0.6 else w.redirect(topic, 1)
        return w.redirect(topic, rng.randint(2, 4)), worse, True, True, rng.random() < 0.5
    if kind == "harmful_safe_better":
        return w.redirect(topic, rng.randint(3, 4)), w.harmful(topic, rng.randint(1, 2)), True, False, True
    if kind == "harmful_swap":
        worse = w.refusal(topic) if rng.random() < 0.6 else w.redirect(topic, 1)
        return w.harmful(topic, rng.randint(3, 4)), worse, False, True, False
    if kind == "harmful_drop":
        k = rng.randint(3, 4)
        return w.harmful(topic, k), w.harmful(topic, rng.randint(1, k - 1)), False, False, rng.random() < 0.5
    raise ValueError(f"unknown pair kind {kind!r}")


def _judge_agrees(prompt: str, better: str, worse: str, better_safe: bool, worse_safe: bool) -> bool:
    jb, jw = judge_long(prompt, better), judge_long(prompt, worse)
    return (jb["unsafe"] == (not better_safe) and jw["unsafe"] == (not worse_safe)
            and jb["fluent"] and jw["fluent"] and jb["helpful"] > jw["helpful"])


def split_prompts(split: str) -> list[tuple[str, V.LongTopic]]:
    """Every (prompt, topic) of ``split``: its topics crossed with its templates."""
    return [(template.format(request=t.request), t) for t in V.topics(split=split) for template in V.TEMPLATES[split]]


def generate_split(split: str, rng: random.Random) -> list[dict]:
    """Rows of one split in the PKU-SafeRLHF-30K schema; every prompt of the split occurs at least once."""
    prompts = split_prompts(split)
    n = round(PAIRS_PER_PROMPT[split] * len(prompts))
    order = [prompts[i % len(prompts)] for i in range(n)]
    rng.shuffle(order)
    writer = _Writer(rng)
    kinds, weights = list(HARMFUL_KIND_WEIGHTS), list(HARMFUL_KIND_WEIGHTS.values())
    rows = []
    for prompt, topic in order:
        kind = rng.choices(kinds, weights)[0] if topic.category == "harmful" else "answer"
        for _ in range(200):
            better, worse, better_safe, worse_safe, better_is_safer = _make_pair(topic, kind, writer)
            if better != worse and _judge_agrees(prompt, better, worse, better_safe, worse_safe):
                break
        else:  # pragma: no cover - the vocabulary makes agreement likely within a few draws
            raise RuntimeError(f"could not draw a judge-consistent {kind} pair for {prompt!r}")
        rows.append(pku_row(prompt, better, worse, better_safe, worse_safe, better_is_safer, rng))
    return rows


def generate_dataset(seed: int = SEED) -> dict[str, list[dict]]:
    """``{"train": rows, "validation": rows, "test": rows}``, deterministic in ``seed``."""
    rng = random.Random(seed)
    return {split: generate_split(split, rng) for split in V.SPLITS}


def main(argv: list[str] | None = None) -> None:
    args = parse_fixture_args(argv, __doc__, SEED)
    splits = generate_dataset(args.seed)
    for split, rows in splits.items():
        write_jsonl(rows, args.out / NAME / f"{split}.jsonl")
    tokenizer = train_tokenizer(tokenizer_corpus(splits), vocab_size=VOCAB_SIZE)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(str(args.out / NAME / "tokenizer"))
    print(f"wrote {', '.join(f'{s}: {len(r)} rows' for s, r in splits.items())}; "
          f"tokenizer vocab {len(tokenizer)} -> {args.out / NAME}")


if __name__ == "__main__":
    main()
