"""Load preference pairs with Hugging Face ``datasets`` into the canonical pair format.

Sources: a hub id (``"PKU-Alignment/PKU-SafeRLHF-30K"``, ``"PKU-Alignment/PKU-SafeRLHF"`` with
``name=`` one of its configs), a local ``.jsonl`` / ``.json`` / ``.parquet`` file or a folder of them,
or ``"fixture:pku_tiny"`` (the committed synthetic fixture). See docs/data.md.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from safedpo_kernels.data.reports import LoadReport
from safedpo_kernels.data.schema import (
    CANONICAL_COLUMNS,
    PKU_OPTIONAL,
    PKU_REQUIRED,
    REF_COLUMNS,
    SAFE_FLAG_ALIASES,
    RowError,
    adapt_canonical_row,
    adapt_pku_row,
    check_column_mapping,
    detect_schema,
)

__all__ = ["load_pairs", "fixture_path", "fixture_tokenizer_path", "load_fixture_tokenizer", "FIXTURES_DIR"]

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
FIXTURE_NAMES = ("pku_tiny", "pku_long")
FIXTURE_SPLITS = {"pku_tiny": ("train", "test"), "pku_long": ("train", "validation", "test")}
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
KNOWN_SPLITS = ("train", "test", "validation", "valid", "dev", "eval")
_MAX_EXAMPLES = 10
# Bump when the adapters change meaning: it is part of the Dataset.map cache key.
ADAPTER_VERSION = 1


def fixture_path(name: str = "pku_tiny") -> Path:
    """Folder of a committed fixture (one ``<split>.jsonl`` per split of ``FIXTURE_SPLITS[name]``, in the
    PKU-SafeRLHF-30K schema). ``pku_tiny``: train/test, short answers; ``pku_long``: train/validation/test,
    PKU-length answers, held-out topics and templates (see docs/data.md)."""
    if name not in FIXTURE_NAMES:
        raise ValueError(f"name: expected one of {list(FIXTURE_NAMES)}, got {name!r}")
    return FIXTURES_DIR / name


def fixture_tokenizer_path(name: str = "pku_tiny") -> Path:
    """Folder of the tokenizer of fixture ``name`` (``pku_tiny`` uses the shared ``fixtures/tokenizer``)."""
    fixture_path(name)  # validates the name
    return FIXTURES_DIR / "tokenizer" if name == "pku_tiny" else FIXTURES_DIR / name / "tokenizer"


def load_fixture_tokenizer(name: str = "pku_tiny"):
    """The committed tokenizer of fixture ``name``, loaded offline as ``transformers.PreTrainedTokenizerFast``
    (BPE; ``<pad>``=0, ``<s>``=1 prepended, ``</s>``=2 eos, ``<unk>``=3). ``pku_tiny``: 448 tokens;
    ``pku_long``: 1024 tokens. No chat template, so :func:`tokenize_pairs` uses the plain template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(fixture_tokenizer_path(name)))


def _split_of(path: Path, root: Path) -> str | None:
    names = [path.stem.lower()] + [p.lower() for p in path.relative_to(root).parts[:-1]]
    for split in KNOWN_SPLITS:
        for n in names:
            if n == split or n.startswith((split + "-", split + "_", split + ".")):
                return split
    return None


def _local_data_files(path: Path, split: str) -> tuple[str, list[str], str | None]:
    """(builder, files, note) for a local file or folder and the requested split."""
    if path.is_file():
        fmt = LOCAL_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"source: expected a .jsonl, .json or .parquet file, got {str(path)!r}")
        return fmt, [str(path)], None
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_FORMATS)
    if not files:
        raise ValueError(f"source: folder {str(path)!r} has no .jsonl, .json or .parquet files")
    formats = {LOCAL_FORMATS[p.suffix.lower()] for p in files}
    if len(formats) > 1:
        raise ValueError(f"source: folder {str(path)!r} mixes json and parquet files; point at one file or subfolder")
    by_split: dict[str | None, list[Path]] = {}
    for p in files:
        by_split.setdefault(_split_of(p, path), []).append(p)
    if split in by_split:
        return formats.pop(), [str(p) for p in by_split[split]], None
    named = sorted(s for s in by_split if s is not None)
    if not named:
        note = f"no file in {str(path)!r} names a split: all {len(files)} files were read as split {split!r}"
        return formats.pop(), [str(p) for p in files], note
    raise ValueError(f"split: {split!r} not found in folder {str(path)!r}; its files name the splits {named}")


def _check_utf8(path: str, chunk_bytes: int = 1 << 24) -> None:
    """ValueError naming ``path``, the line and the byte offset of the first byte that is not UTF-8."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as bad:
                pos = min(max(bad.start, 0), len(chunk) - 1) if chunk else 0
                line = lines + chunk[:pos].count(b"\n")
                byte = f"{chunk[pos]:#04x}" if chunk else "(truncated sequence at end of file)"
                raise ValueError(
                    f"source: file {path!r} is not UTF-8 text (invalid byte {byte} at line {line}, "
                    f"byte offset {offset + pos}): save it as UTF-8 JSON lines"
                ) from None
            if not chunk:
                return
            lines += chunk.count(b"\n")
            offset += len(chunk)


def _parses_as_json(text: str) -> bool:
    import json

    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _diagnose_local_files(builder: str, files: list[str], err: BaseException) -> ValueError:
    """A ValueError naming the file and, for JSON, the line (row) that ``datasets`` failed to read."""
    import json

    for f in files:
        data = Path(f).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as bad:
            line = data[: bad.start].count(b"\n") + 1
            return ValueError(f"source: file {f!r} is not UTF-8 text (invalid byte {data[bad.start]:#04x} at "
                              f"line {line}, byte offset {bad.start}): save it as UTF-8 JSON lines")
        if builder != "json":
            continue
        if not text.strip():
            return ValueError(f"source: file {f!r} has no rows (only whitespace / blank lines)")
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as bad:
                return ValueError(f"source: file {f!r} is not valid JSON: {bad.msg} at line {bad.lineno}, "
                                  f"column {bad.colno}")
            if isinstance(doc, list) and not doc:
                return ValueError(f"source: file {f!r} has no rows (an empty JSON list)")
            if isinstance(doc, list):
                for i, row in enumerate(doc):
                    if not isinstance(row, dict):
                        return ValueError(f"source: file {f!r}, row {i}: expected a JSON object, got "
                                          f"{type(row).__name__}")
            continue
        keys = None
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as bad:
                if keys is None and _parses_as_json(text):  # one JSON document over several lines
                    break
                return ValueError(f"source: file {f!r}, line {lineno}: not valid JSON ({bad.msg} at column "
                                  f"{bad.colno}): {line[:80]!r}")
            if not isinstance(row, dict):
                return ValueError(f"source: file {f!r}, line {lineno}: expected a JSON object per line, got "
                                  f"{type(row).__name__}")
            if keys is None:
                keys = set(row)
            elif set(row) != keys:
                return ValueError(f"source: file {f!r}, line {lineno}: columns {sorted(row)} differ from the first "
                                  f"row's {sorted(keys)}")
    names = ", ".join(repr(f) for f in files)
    return ValueError(f"source: could not read {names} with the datasets {builder!r} builder: "
                      f"{type(err).__name__}: {err}")


def _read_raw(source: str, split: str, name: str | None, load_kwargs: dict[str, Any]):
    """(dataset, resolved description, notes) -- the only place that calls ``datasets.load_dataset``."""
    import datasets

    notes: list[str] = []
    if source.startswith("fixture:"):
        fixture = source.split(":", 1)[1]
        path = fixture_path(fixture)
        files = {s: str(path / f"{s}.jsonl") for s in FIXTURE_SPLITS[fixture]}
        if split not in files:
            raise ValueError(f"split: the fixture {fixture!r} has splits {list(files)}, got {split!r}")
        ds = datasets.load_dataset("json", data_files={split: files[split]}, split=split, **load_kwargs)
        return ds, f"json:{files[split]}", notes
    path = Path(source).expanduser()
    if path.exists():
        if name is not None:
            raise ValueError(f"name: a config name ({name!r}) only applies to hub datasets, not to {source!r}")
        builder, files, note = _local_data_files(path, split)
        if note:
            notes.append(note)
        for f in files:
            if Path(f).stat().st_size == 0:
                raise ValueError(f"source: file {f!r} is empty (0 bytes): expected rows of preference pairs")
            if builder == "json":
                _check_utf8(f)  # datasets would read a stray Latin-1 byte without a word
        try:
            ds = datasets.load_dataset(builder, data_files={split: files}, split=split, **load_kwargs)
        except Exception as err:  # datasets' errors name neither file nor row: find them
            raise _diagnose_local_files(builder, files, err) from err
        return ds, f"{builder}:{','.join(files)}", notes
    looks_local = source.startswith((".", "/", "~")) or Path(source).suffix.lower() in LOCAL_FORMATS
    if looks_local or source.count("/") != 1:
        raise FileNotFoundError(
            f"source: {source!r} is neither an existing local file/folder nor a hub id of the form 'owner/name'"
        )
    # Hub dataset, e.g. PKU-Alignment/PKU-SafeRLHF-30K or PKU-Alignment/PKU-SafeRLHF (name = config).
    ds = datasets.load_dataset(source, name=name, split=split, **load_kwargs)
    return ds, f"hub:{source}" + (f"/{name}" if name else ""), notes


def _adapt_batch(batch: dict[str, list], indices: list[int], *, view: dict[str, str], schema: str,
                 out_columns: list[str], strict: bool, origin: str, version: int) -> dict[str, list]:
    """Validate and adapt a batch of source rows; ``version`` only salts the ``Dataset.map`` cache key."""
    adapt = adapt_pku_row if schema == "pku" else adapt_canonical_row
    out: dict[str, list] = {c: [] for c in out_columns}
    out["_skip"] = []
    for i, index in enumerate(indices):
        row = {target: batch[src][i] for target, src in view.items()}
        try:
            pair = adapt(row)
            reason = ""
        except RowError as err:
            if strict:
                raise ValueError(
                    f"{origin}, row {index}: {err} (pass strict=False to skip and count such rows)"
                ) from None
            pair, reason = {}, err.reason
        for c in out_columns:
            default = math.nan if c in REF_COLUMNS else (False if c in ("chosen_unsafe", "rejected_unsafe",
                                                                        "chosen_is_safer") else "")
            out[c].append(pair.get(c, default))
        out["_skip"].append(reason)
    return out


def load_pairs(
    source: str,
    *,
    split: str = "train",
    name: str | None = None,
    limit: int | None = None,
    column_mapping: dict[str, str] | None = None,
    strict: bool = True,
    **load_kwargs: Any,
):
    """Load preference pairs into the canonical pair format (see :mod:`safedpo_kernels.data.schema`).

    Args:
        source: hub id (``"PKU-Alignment/PKU-SafeRLHF-30K"``; ``"PKU-Alignment/PKU-SafeRLHF"`` with
            ``name`` = config such as ``"default"`` or ``"alpaca-7b"``), a local ``.jsonl`` / ``.json`` /
            ``.parquet`` file (read as ``split``) or folder (files are matched to splits by name:
            ``train.jsonl``, ``test-00000-of-00001.parquet``, ``train/part.jsonl``), or
            ``"fixture:pku_tiny"``.
        split: which split to read.
        name: hub config name (hub ids only).
        limit: read at most this many source rows (the first ones) before validation.
        column_mapping: ``{target: source_column}`` for your own data; targets are canonical names
            (``prompt``, ``chosen``, ``rejected``, ``chosen_unsafe``/``chosen_safe``,
            ``rejected_unsafe``/``rejected_safe``, ``chosen_is_safer``, ``ref_chosen_logps``,
            ``ref_rejected_logps``) or PKU names (``response_0``, ``is_response_0_safe``, ...).
        strict: True raises ValueError at the first bad row (naming row and column); False skips bad
            rows and counts them by reason in the report.
        **load_kwargs: passed to ``datasets.load_dataset`` (``cache_dir``, ``revision``, ``token``, ...).

    Returns:
        ``(dataset, LoadReport)``; the dataset has the canonical columns ``prompt, chosen, rejected``
        (str), ``chosen_unsafe, rejected_unsafe, chosen_is_safer`` (bool) and, when the source has them,
        ``ref_chosen_logps, ref_rejected_logps`` (float64). Other source columns are dropped (listed in
        ``report.dropped_columns``).
    """
    if not isinstance(source, str) or not source:
        raise TypeError(f"source: expected a non-empty str (hub id, local path or 'fixture:NAME'), got {source!r}")
    if not isinstance(split, str) or not split:
        raise TypeError(f"split: expected a non-empty str such as 'train', got {split!r}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name: expected a config name str or None, got {name!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: expected None or an int >= 0, got {limit!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict: expected a bool, got {strict!r}")
    import datasets

    ds, resolved, notes = _read_raw(source, split, name, load_kwargs)
    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"source: expected one split to load as a datasets.Dataset, got {type(ds).__name__}")
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    columns = list(ds.column_names)
    view = {c: c for c in columns}
    if column_mapping is not None:
        mapping = check_column_mapping(column_mapping, columns)
        for target, src in mapping.items():
            view[target] = src
        # A mapped source column is only read under its target name.
        for src in set(mapping.values()) - set(mapping):
            view.pop(src, None)
    schema = detect_schema(list(view))
    if schema == "pku":
        wanted = set(PKU_REQUIRED) | set(PKU_OPTIONAL)
        out_columns = list(CANONICAL_COLUMNS)
    else:
        wanted = set(CANONICAL_COLUMNS) | set(REF_COLUMNS) | set(SAFE_FLAG_ALIASES.values())
        out_columns = list(CANONICAL_COLUMNS) + [c for c in REF_COLUMNS if c in view]
    view = {t: s for t, s in view.items() if t in wanted}
    used_sources = set(view.values())
    report = LoadReport(
        source=source, resolved=resolved, split=split, name=name,
        schema=schema if column_mapping is None else f"{schema} (column_mapping)",
        rows_read=len(ds), dropped_columns=sorted(c for c in columns if c not in used_sources), notes=notes,
    )
    features = datasets.Features({
        **{c: datasets.Value("string") for c in ("prompt", "chosen", "rejected")},
        **{c: datasets.Value("bool") for c in ("chosen_unsafe", "rejected_unsafe", "chosen_is_safer")},
        **{c: datasets.Value("float64") for c in out_columns if c in REF_COLUMNS},
        "_skip": datasets.Value("string"),
    })
    if len(ds) == 0:  # Dataset.map skips empty datasets: build the (empty) canonical one directly
        features.pop("_skip")
        return datasets.Dataset.from_dict({c: [] for c in out_columns}, features=features), report
    ds = ds.map(
        _adapt_batch, batched=True, with_indices=True, remove_columns=columns, features=features,
        fn_kwargs={"view": view, "schema": schema, "out_columns": out_columns, "strict": strict,
                   "origin": f"{source} [{split}]", "version": ADAPTER_VERSION},
        desc="validating pairs",
    )
    reasons = list(ds["_skip"])
    counts = Counter(r for r in reasons if r)
    if counts:
        report.skipped = dict(sorted(counts.items()))
        report.skipped_examples = [(i, r) for i, r in enumerate(reasons) if r][:_MAX_EXAMPLES]
        keep = [i for i, r in enumerate(reasons) if not r]
        ds = ds.select(keep)
    ds = ds.remove_columns("_skip")
    report.rows_kept = len(ds)
    return ds, report
