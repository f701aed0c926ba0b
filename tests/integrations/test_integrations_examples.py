"""The README examples (examples/safedpo_*.py) run as shipped, and docs/integrations.md shows them verbatim."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ("safedpo_own_loop", "safedpo_trainer", "safedpo_trl")


def _body(name: str) -> str:
    text = (ROOT / "examples" / f"{name}.py").read_text()
    return text[text.index('"""', 3) + 3 :].strip("\n")


@pytest.mark.parametrize("name", EXAMPLES)
def test_docs_show_the_example_verbatim(name):
    assert _body(name) in (ROOT / "docs" / "integrations.md").read_text()


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path, monkeypatch, capsys):
    if name == "safedpo_trl":
        pytest.importorskip("trl")
        pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    scope = runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "rewards/margins" in out
    if name == "safedpo_own_loop":
        assert math.isfinite(scope["loss"].item()) and scope["step"] == 3
    else:
        assert scope["trainer"].state.global_step == 4
        assert (tmp_path / scope["config"].output_dir).is_dir()
    if name == "safedpo_trl":  # LoRA: only the adapters trained
        trained = [n for n, p in scope["trainer"].model.named_parameters() if p.requires_grad]
        assert trained and all("lora_" in n for n in trained)
