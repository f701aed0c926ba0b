"""compile_targets(): the enumeration the compile gate iterates covers every shipped specialization."""

import itertools

from safedpo_kernels.kernels.config import ARCHS, CONFIGS, entry_name, entry_parts
from safedpo_kernels.kernels.targets import DTYPES, compile_targets


def test_every_table_entry_and_flag_value_is_enumerated():
    targets = list(compile_targets())
    assert {t.arch for t in targets} == set(ARCHS) and {t.dtype for t in targets} == set(DTYPES)
    by_kernel = {}
    for t in targets:
        by_kernel.setdefault(t.kernel, []).append(t)
    for arch, table in CONFIGS.items():
        for kernel, classes in table.items():
            cfgs = {str(c) for cls in classes.values() for c in cls}
            assert cfgs <= {str(t.config) for t in by_kernel[kernel] if t.arch == arch}, (arch, kernel)
    # every constexpr flag takes both values somewhere, per base kernel (softcap entries merged)
    for base in ("forward", "backward", "grad_hidden", "grad_weight", "frozen"):
        ts = [t for t in targets if entry_parts(t.kernel)[0] == base]
        names = {k for t in ts for k, v in t.flags.items() if isinstance(v, bool)}
        for name in names:
            assert {t.flags[name] for t in ts} == {False, True}, (base, name)
        assert {"HAS_BIAS", "HAS_SOFTCAP", "UPCAST"} <= names
    assert any(t.dw_dtype == "bf16" for t in targets) and any(t.dw_dtype == "fp16" for t in targets)
    # UPCAST only for bf16 (the interpreter's workaround), with the ieee precision it launches with
    assert all(t.dtype == "bf16" and t.flags["DOT_PRECISION"] == "ieee" for t in targets if t.flags["UPCAST"])
    # each target is compiled with exactly the table entry its launch would pick
    for t in targets:
        base = entry_parts(t.kernel)[0]
        launch = entry_name(
            base, t.arch, softcap=t.flags["HAS_SOFTCAP"], pair=t.flags.get("PAIR", False), lowp=t.dw_dtype != "fp32"
        )
        assert launch == t.kernel, (t.name, launch)
    assert len({(t.name, t.flags["UPCAST"], t.flags["HAS_SOFTCAP"]) for t in targets}) == len(targets)
    # every launch a user can make has a target: each dtype x flag combination of each kernel
    for arch in ARCHS:
        for dtype in DTYPES:
            for base in ("backward", "grad_hidden", "grad_weight", "frozen"):
                got = {(t.flags["HAS_SOFTCAP"], t.flags.get("PAIR", False), t.dw_dtype != "fp32")
                       for t in targets if t.arch == arch and t.dtype == dtype and entry_parts(t.kernel)[0] == base}
                pairs = (False, True) if base != "backward" else (False,)
                lowps = (False, True) if base == "backward" and dtype != "fp32" else (False,)
                assert got == set(itertools.product((False, True), pairs, lowps)), (arch, dtype, base, got)


def test_signatures_cover_every_argument():
    for t in itertools.islice(compile_targets(), 0, None, 37):  # a spread of targets, cheap
        sig, const = t.signature(), t.constexprs()
        assert list(sig) == list(t.fn.arg_names)
        assert {a for a, ty in sig.items() if ty == "constexpr"} == set(const)
        assert sig["labels_ptr"] == "*i64" and sig["hidden_ptr"] == DTYPES[t.dtype][0]
        assert all(ty in ("constexpr", "i32", "fp32") or ty.startswith("*") for ty in sig.values())
        src = t.ast_source()
        assert src.fn is t.fn
        assert t.options()["num_warps"] == t.config.num_warps
