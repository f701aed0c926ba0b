"""The recipe's config: one pydantic v2 model (types, ranges, unknown keys), YAML + ``key=value`` overrides.

    cfg = load_config("recipes/configs/tiny_cpu.yaml", ["lr=1e-4", "model_config.hidden_size=64", "peft.r=8"])

``RecipeConfig`` below is the one place that holds every key, its default and its check. Errors are a
``ValueError`` naming the key as written in the YAML (``config key 'model_config.hidden_sizee': ...``).
``model_config`` (random-init models) is checked against the transformers config class of its
``model_type``, and ``max_length`` against that config's ``max_position_embeddings``.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

OBJECTIVES = ("safedpo", "dpo", "sft")
SELECTIONS = ("auto", "safedpo", "better", "safer", "safe_better")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

PositiveInt = Field(ge=1)


class PeftConfig(BaseModel):
    """``peft:`` block: LoRA adapters on the policy; the reference is the adapter-disabled policy."""

    model_config = ConfigDict(strict=True, extra="forbid")
    r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    bias: Literal["none"] = "none"


class RecipeConfig(BaseModel):
    """Every key of ``recipes/train_safedpo.py``, its default and its check (strict types: ``2.5`` is not
    an int, ``"yes"`` is not a bool)."""

    model_config = ConfigDict(strict=True, extra="forbid", protected_namespaces=(), populate_by_name=True)

    # --- model ---
    model_name_or_path: Optional[str] = Field(None, min_length=1)  # hub id or local folder
    hf_model_config: Optional[dict[str, Any]] = Field(None, alias="model_config")  # random init (tests)
    model_revision: Optional[str] = Field(None, min_length=1)
    trust_remote_code: bool = False
    tokenizer: str = Field("model", min_length=1)  # "model" | "fixture" | hub id / path
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    liger_kernels: bool = False  # Liger's RMSNorm / RoPE / SwiGLU patches; head + loss stay ours
    activation_checkpointing: bool = True
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    dist_timeout_minutes: float = Field(60.0, gt=0)  # process-group timeout (collectives, barriers)
    peft: Optional[PeftConfig] = None  # LoRA: null = full fine-tune
    # --- data ---
    dataset: str = Field("fixture:pku_tiny", min_length=1)
    dataset_config: Optional[str] = Field(None, min_length=1)
    train_split: str = Field("train", min_length=1)
    eval_split: Optional[str] = Field("test", min_length=1)
    eval_dataset: Optional[str] = Field(None, min_length=1)  # held-out pairs from another source
    eval_fraction: Optional[float] = Field(None, gt=0, lt=1)  # held out of the training split instead
    train_limit: Optional[int] = Field(None, ge=1)
    eval_limit: Optional[int] = Field(None, ge=1)
    selection: Literal[SELECTIONS] = "auto"  # auto: safedpo -> "safedpo", dpo / sft -> "better"
    max_length: int = Field(512, ge=8)
    sft_responses: Literal["chosen", "both"] = "chosen"
    packing: bool = False  # padding-free micro-batches (cu_seqlens + per-sequence position_ids)
    # --- objective ---
    objective: Literal[OBJECTIVES] = "safedpo"
    beta: float = Field(0.1, gt=0)
    delta: float = Field(10.0, ge=0)
    loss_type: str = Field("sigmoid", min_length=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # per loss_type: checked by the losses module
    reference_free: bool = False
    rpo_alpha: Optional[float] = Field(None, ge=0)
    average_log_prob: bool = False
    loss_impl: Literal["auto", "torch", "triton"] = "auto"
    reference_mode: Literal["precompute", "live"] = "precompute"
    reference_cache_dir: Optional[str] = Field(None, min_length=1)  # default: <output_dir>/reference_cache
    # --- optimization ---
    seed: int = Field(0, ge=0)
    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    micro_batch_size: int = Field(1, ge=1)  # pairs (sft: sequences) per rank per micro-batch
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(5e-7, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    # --- observability, evaluation, checkpoints ---
    output_dir: str = Field("outputs/safedpo", min_length=1)
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: evaluate only at the end
    eval_at_start: bool = True
    eval_batch_size: int = Field(4, ge=1)
    save_every: int = Field(0, ge=0)  # 0: checkpoint only at the end
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = False  # continue from the newest verified checkpoint under output_dir
    export_hf: bool = True
    export_dtype: Literal["float32", "bfloat16"] = "float32"
    plot: bool = True
    progress_bar: bool = True
    debug_dump_grads: Optional[str] = Field(None, min_length=1)  # save full gradients after the first backward

    @field_validator("beta", "delta", "lr", "weight_decay", "adam_eps", "min_lr_ratio", "max_grad_norm",
                     "label_smoothing", "rpo_alpha", "eval_fraction", "dist_timeout_minutes", mode="before")
    @classmethod
    def _yaml11_float(cls, v: Any) -> Any:
        """YAML 1.1 reads ``1e-6`` (no dot) as a string; NaN and inf are never a setting."""
        if isinstance(v, str) and _FLOAT_RE.fullmatch(v.strip()):
            v = float(v)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("expected a finite number")
        return v

    @field_validator("adam_betas", mode="before")
    @classmethod
    def _betas(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v):
            raise ValueError("expected a list of two numbers in [0, 1)")
        return tuple(float(b) for b in v)

    @model_validator(mode="after")
    def _combinations(self) -> "RecipeConfig":
        if (self.model_name_or_path is None) == (self.hf_model_config is None):
            raise _KeyError("model_name_or_path", "set exactly one of model_name_or_path and model_config")
        if self.tokenizer == "model" and self.model_name_or_path is None:
            raise _KeyError("tokenizer", "'model' needs model_name_or_path; use 'fixture' or a path/hub id")
        if self.objective == "sft" and self.reference_mode == "live":
            raise _KeyError("reference_mode", "'live' has no meaning for objective 'sft' (no reference)")
        if self.objective == "sft" and self.reference_free:
            raise _KeyError("reference_free", "has no meaning for objective 'sft' (no reference)")
        from safedpo_kernels.losses import check_loss_options

        try:
            check_loss_options(self.beta, self.loss_type, self.label_smoothing)
        except ValueError as err:
            key = str(err).split(":", 1)[0]
            raise _KeyError(key if key in ("loss_type", "label_smoothing") else "loss_type",
                            str(err).split(":", 1)[1].strip()) from None
        if self.packing and self.objective == "sft":
            raise _KeyError("packing", "supported for the pair objectives (safedpo, dpo), not for 'sft'")
        if self.eval_fraction is not None and self.eval_dataset is not None:
            raise _KeyError("eval_fraction", "set at most one of eval_fraction and eval_dataset")
        if self.eval_fraction is not None and self.eval_split is None:
            raise _KeyError("eval_fraction", "eval_split is null (no evaluation): drop eval_fraction too")
        return self


class _KeyError(ValueError):
    def __init__(self, key: str, msg: str):
        super().__init__(f"config key {key!r}: {msg}")
        self.key = key


CONFIG_KEYS: tuple[str, ...] = tuple(f.alias or name for name, f in RecipeConfig.model_fields.items())
# key -> (default, description): what other scripts (recipes/compare_methods.py) read the defaults from.
CONFIG_SCHEMA: dict[str, tuple[Any, str]] = {
    (f.alias or name): (list(f.default) if isinstance(f.default, tuple) else f.default, str(f.annotation))
    for name, f in RecipeConfig.model_fields.items()
}


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        top = key.split(".")[0]
        known = ", ".join(CONFIG_KEYS) if top == key else ", ".join(PeftConfig.model_fields)
        return f"config key {key!r}: unknown key (known keys: {known})"
    msg = first["msg"].removeprefix("Value error, ")
    if isinstance(first.get("ctx", {}).get("error"), _KeyError):
        return str(first["ctx"]["error"])
    return f"config key {key!r}: {msg}, got {first.get('input')!r}"


def validate_config(raw: dict) -> dict:
    """Defaults filled in and every key checked; returns a plain dict (``cfg["lr"]``).

    Raises:
        TypeError: ``raw`` is not a mapping.
        ValueError: naming the key (``config key 'lr': ...``), for unknown keys, bad values,
            contradicting keys, ``model_config`` keys its transformers config class does not have, or a
            ``max_length`` above ``max_position_embeddings``.
    """
    if not isinstance(raw, dict):
        raise TypeError(f"config: expected a mapping of keys to values, got {type(raw).__name__}")
    try:
        model = RecipeConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(_format_error(err)) from None
    cfg = model.model_dump(by_alias=True)
    cfg["adam_betas"] = list(cfg["adam_betas"])
    if cfg["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("config key 'device': 'cuda' requested but torch.cuda.is_available() is False")
    if cfg["selection"] == "auto":
        cfg["selection"] = "safedpo" if cfg["objective"] == "safedpo" else "better"
    if cfg["model_config"] is not None:
        check_max_length(cfg, hf_config_from_dict(cfg["model_config"]))
    return cfg


def hf_config_from_dict(model_config: dict, **defaults: Any):
    """The transformers config of a ``model_config`` mapping; every key must be a field of its class.

    A typo (``hidden_sizee``) would otherwise be stored as an extra attribute while the model silently
    takes the class default (a 4096-wide, 32-layer Llama).
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kwargs = dict(model_config)
    model_type = kwargs.pop("model_type", None)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ValueError(f"config key 'model_config.model_type': expected a transformers model type such as "
                         f"'llama', 'qwen2', 'gemma2', got {model_type!r}")
    cls = CONFIG_MAPPING[model_type]
    known = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "__dataclass_fields__", {}))
    known |= set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}))
    for key in kwargs:
        if key not in known or key in ("self", "kwargs"):
            raise ValueError(f"config key 'model_config.{key}': not a field of {cls.__name__} "
                             f"(model_type {model_type!r}); check the spelling")
    for key, value in defaults.items():
        kwargs.setdefault(key, value)
    return AutoConfig.for_model(model_type, **kwargs)


def check_max_length(cfg: dict, hf_config) -> None:
    positions = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg["max_length"] > positions:
        raise ValueError(f"config key 'max_length': {cfg['max_length']} is more than the model's "
                         f"max_position_embeddings ({positions})")


def _set_nested(out: dict, dotted: str, value: Any, item: str) -> None:
    keys = dotted.split(".")
    node = out
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {k!r} is not a mapping, cannot set {dotted!r}")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str], base: dict | None = None) -> dict:
    """``key=value`` strings applied onto ``base`` (a copy); values are YAML scalars (``lr=1e-6``,
    ``resume=true``, ``eval_split=null``), nested keys use dots (``model_config.hidden_size=64``,
    ``peft.r=16``); ``peft=null`` removes a block."""
    out = _deep_copy(base or {})
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r}: expected key=value (nested keys: a.b=value)")
        _set_nested(out, key, yaml.safe_load(value), item)
    return out


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """YAML file (``yaml.safe_load``) + ``key=value`` overrides -> validated config dict."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {str(path)!r}: expected a mapping of keys to values")
    return validate_config(parse_overrides(overrides or [], raw))
