#!/usr/bin/env python
"""SafeDPO / DPO / SFT full fine-tuning with FSDP2, the loss computed from hidden states.

Launch (one node; N GPUs, or N CPU ranks with gloo):
    torchrun --nproc_per_node=N recipes/train_safedpo.py --config recipes/configs/tiny_cpu.yaml [key=value ...]
Multi-node (the same command on every node; shared filesystem for output_dir):
    torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        --rdzv_id=JOB recipes/train_safedpo.py --config C
In-process, world size 1 (other scripts, tests):
    from recipes.train_safedpo import run; result = run({"model_config": {...}, ...})

How the loss reaches the lm_head weight (see docs/recipe.md): every decoder layer is an FSDP2 unit, and
the root unit is :class:`PolicyWithLoss`, whose forward runs the base model and then our fused loss on
``lm_head.weight``. The logits are never materialized, FSDP reduce-scatters the head's gradient, and
tied embeddings stay tied. Keys and defaults of the config: ``CONFIG_SCHEMA`` below (one place).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import yaml
from torch import nn


_ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("safedpo_kernels") is None or importlib.util.find_spec("recipes") is None:
    sys.path.insert(0, str(_ROOT))  # run as a script from a checkout: the package and recipes/ importable

from safedpo_kernels import (FusedLinearDPOLoss, FusedLinearSafeDPOLoss, count_kept_pairs, linear_logprobs,
                             packed_sequence_logps, safety_transform, sequence_logps)

from recipes.checkpoint import OutputDirLock, checkpoint_problem, newest_verified, prune_in_background, step_folders
from recipes.lora import adapters_disabled, init_adapters, inject_lora, merged_state_dict
from recipes.loading import empty_shell, load_own_shards, restore_buffers, snapshot_buffers, weights_folder
from recipes.config import (CONFIG_SCHEMA, check_max_length, hf_config_from_dict, load_config, parse_overrides,
                            validate_config)

__all__ = ["CONFIG_SCHEMA", "Recipe", "load_config", "parse_overrides", "run", "validate_config"]

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# The FSDP root: base model + our loss on the lm_head weight
# ---------------------------------------------------------------------------------------------


class PolicyWithLoss(nn.Module):
    """Root FSDP unit. ``forward`` runs ``lm.<base>(...)`` and our loss on the output head.

    The head (weight, bias, logit_scale, softcap: Gemma 2's soft cap, Cohere's and Granite's scales)
    is read only through :func:`safedpo_kernels.integrations.output_head`, inside this forward where
    FSDP2 has gathered it. Inputs (from the pair collator): input_ids / attention_mask / labels (2B, T),
    B chosen rows then B rejected rows, HF-style labels (IGNORE_INDEX on prompt and padding);
    chosen_unsafe / rejected_unsafe (B,) bool; ref_chosen_logps / ref_rejected_logps (B,) float32 or
    None; num_units / num_nll_tokens: the step-wide normalizers (kept pairs, pairs or target tokens of
    every micro-batch on every rank; NLL winner tokens).
    ``what="loss"``: (loss, metrics) of the objective (SFT: the token NLL over num_units).
    ``what="logps"``: (2B,) float32 sequence log-probs, no loss. ``what="ref_logps"``: the same with the
    LoRA adapters disabled (the reference of a LoRA run: the base model; no second copy in memory).
    With ``live_reference`` (LoRA, reference_mode live) the loss computes its reference this way.
    """

    def __init__(self, lm: nn.Module, cfg: dict, *, live_reference: bool = False):
        super().__init__()
        from safedpo_kernels.integrations import output_head

        self.lm = lm
        self.objective = cfg["objective"]
        self.impl = cfg["loss_impl"]
        self.live_reference = live_reference
        self.use_ref = not cfg["reference_free"]
        head = output_head(lm)  # logit transform of the model class (the weight itself is read per forward)
        self.logit_scale, self.softcap = head.logit_scale, head.softcap
        common = dict(ignore_index=IGNORE_INDEX, beta=cfg["beta"], alpha=cfg["rpo_alpha"] or 0.0,
                      compute_nll_loss=cfg["rpo_alpha"] is not None, use_ref_model=self.use_ref,
                      average_log_prob=cfg["average_log_prob"], loss_type=cfg["loss_type"],
                      label_smoothing=cfg["label_smoothing"], impl=self.impl, logit_scale=self.logit_scale,
                      softcap=self.softcap)
        self.loss_fn = None
        if self.objective == "safedpo":
            self.loss_fn = FusedLinearSafeDPOLoss(**common, delta=cfg["delta"])
        elif self.objective == "dpo":
            self.loss_fn = FusedLinearDPOLoss(**common)
        # Sequence log-probs for the reference, evaluation and SFT: averaged where the loss averages.
        self.average = self.loss_fn.averages_log_probs if self.loss_fn is not None else cfg["average_log_prob"]

    def _hidden_and_head(self, input_ids, attention_mask, labels, position_ids=None):
        """Last hidden states, shifted targets (hidden[:, t] predicts labels[:, t + 1]) and the head.

        Padded rows (2B, T) -> (2B, T - 1). Packed (``position_ids`` given, one row (1, total), no
        attention mask): transformers builds the per-sequence causal mask from the position ids (SDPA /
        eager / flex) or runs flash-attention varlen; targets are shifted within each sequence."""
        from safedpo_kernels.data import shift_packed_labels
        from safedpo_kernels.integrations import output_head

        base = getattr(self.lm, self.lm.base_model_prefix)
        if position_ids is not None:
            hidden = base(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
            return hidden, shift_packed_labels(labels, IGNORE_INDEX), output_head(self.lm)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return hidden[:, :-1], labels[:, 1:], output_head(self.lm)

    def _token_logps(self, hidden, target, head):
        return linear_logprobs(hidden, head.weight, target, bias=head.bias, ignore_index=IGNORE_INDEX,
                               impl=self.impl, logit_scale=head.logit_scale, softcap=head.softcap)

    def _sequence_logps(self, input_ids, attention_mask, labels, position_ids=None, cu_seqlens=None):
        hidden, target, head = self._hidden_and_head(input_ids, attention_mask, labels, position_ids)
        tok = self._token_logps(hidden, target, head)
        if cu_seqlens is not None:
            return packed_sequence_logps(tok.reshape(-1), target.reshape(-1), cu_seqlens,
                                         ignore_index=IGNORE_INDEX, average=self.average)
        return sequence_logps(tok, target, ignore_index=IGNORE_INDEX, average=self.average)

    def forward(self, input_ids, attention_mask=None, labels=None, chosen_unsafe=None, rejected_unsafe=None,
                ref_chosen_logps=None, ref_rejected_logps=None, position_ids=None, cu_seqlens=None,
                num_units=None, num_nll_tokens=None, what: str = "loss"):
        rows = (input_ids, attention_mask, labels, position_ids, cu_seqlens)
        if what == "ref_logps":
            with torch.no_grad(), adapters_disabled(self.lm):
                return self._sequence_logps(*rows)
        if what == "logps":
            return self._sequence_logps(*rows)
        if self.live_reference and self.use_ref and self.objective != "sft":
            with torch.no_grad(), adapters_disabled(self.lm):
                ref = self._sequence_logps(*rows)
            b = ref.shape[0] // 2
            ref_chosen_logps, ref_rejected_logps = ref[:b], ref[b:]
        hidden, target, head = self._hidden_and_head(input_ids, attention_mask, labels, position_ids)
        if self.objective == "sft":
            tok = self._token_logps(hidden, target, head)
            n = (target != IGNORE_INDEX).sum()
            nll = -tok.sum() / (n.clamp(min=1) if num_units is None else num_units.clamp(min=1)).to(tok.dtype)
            return nll, {"loss": -tok.detach().sum() / n.clamp(min=1), "tokens/target": n.float()}
        refs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps} if self.use_ref else {}
        kwargs = dict(num_nll_tokens=num_nll_tokens, cu_seqlens=cu_seqlens, return_metrics=True, **refs)
        if self.objective == "safedpo":
            loss, _, metrics = self.loss_fn(head.weight, hidden, target, head.bias, chosen_unsafe=chosen_unsafe,
                                            rejected_unsafe=rejected_unsafe, num_kept_pairs=num_units, **kwargs)
        else:
            loss, _, metrics = self.loss_fn(head.weight, hidden, target, head.bias, num_pairs=num_units, **kwargs)
        return loss, metrics


# ---------------------------------------------------------------------------------------------
# Helpers: distributed setup, model building, sharding, fingerprints
# ---------------------------------------------------------------------------------------------


def _attn_implementation(cfg: dict, device: torch.device) -> str:
    if cfg["attn_implementation"] != "auto":
        return cfg["attn_implementation"]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _model_config(cfg: dict, tokenizer, attn: str):
    from transformers import AutoConfig

    if cfg["model_name_or_path"] is not None:
        config = AutoConfig.from_pretrained(cfg["model_name_or_path"], revision=cfg["model_revision"],
                                            trust_remote_code=cfg["trust_remote_code"])
    else:
        config = hf_config_from_dict(cfg["model_config"], vocab_size=len(tokenizer),
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     bos_token_id=tokenizer.bos_token_id)
    check_max_length(cfg, config)
    config._attn_implementation = attn
    config.use_cache = False
    return config


def _build_lm(cfg: dict, config, *, real: bool) -> nn.Module:
    """The causal LM in float32: weights loaded (real=True) or a shell with meta parameters (real buffers)."""
    from transformers import AutoModelForCausalLM

    common = dict(trust_remote_code=cfg["trust_remote_code"])
    if not real:
        return empty_shell(config, **common)
    if cfg["model_name_or_path"] is not None:
        return AutoModelForCausalLM.from_pretrained(
            cfg["model_name_or_path"], config=config, revision=cfg["model_revision"], dtype=torch.float32, **common)
    torch.manual_seed(cfg["seed"])  # random init for tests: identical for a given seed
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, **common)


def _decoder_layers(lm: nn.Module) -> nn.ModuleList:
    base = getattr(lm, lm.base_model_prefix)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"model: expected {type(lm).__name__}.{lm.base_model_prefix}.layers "
                         "(a ModuleList of decoder layers)")
    return layers


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dataset_fingerprint(ds) -> str:
    h = hashlib.sha256()
    for row in ds:
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            h.update(torch.tensor(row[key], dtype=torch.int64).numpy().tobytes())
        h.update(bytes([int(row["chosen_unsafe"]), int(row["rejected_unsafe"])]))
    return h.hexdigest()[:16]


def _model_fingerprint(cfg: dict, compute_dtype: torch.dtype, averaged: bool) -> str:
    import transformers

    key: dict[str, Any] = {k: cfg[k] for k in ("model_name_or_path", "model_revision", "model_config",
                                               "liger_kernels", "average_log_prob", "max_length")}
    key["dtype"] = str(compute_dtype)
    if averaged != cfg["average_log_prob"]:  # a loss type that averages (ipo): per-token means are cached
        key["averaged"] = averaged
    if cfg["model_config"] is not None:  # random init: the seed and library versions decide the weights
        key.update(seed=cfg["seed"], torch=torch.__version__, transformers=transformers.__version__)
    path = cfg["model_name_or_path"]
    if path is not None and Path(path).is_dir():
        key["files"] = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Path(path).iterdir()
                              if p.suffix in (".safetensors", ".bin", ".json"))
    return _fingerprint(key)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)


class SkippingDistributedSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start an epoch after ``skip`` samples (exact resume)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


@dataclass
class DataBundle:
    train: Any  # tokenized pairs (HF Dataset), objective's selection applied
    eval_sel: Any  # held-out pairs, objective's selection applied (loss / accuracy)
    eval_raw: Any  # held-out pairs in helpfulness order, nothing dropped (safety ranking)
    reports: dict


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


class Recipe:
    """``Recipe(cfg).setup(); .train(); .evaluate(); .save_checkpoint(); .cleanup()`` (see ``run``)."""

    def __init__(self, config: dict):
        self.cfg = validate_config(config)
        self.out = Path(self.cfg["output_dir"])
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.micro_in_epoch = 0  # micro-batches of this epoch already consumed (per rank)
        self.history: list[dict] = []
        self._owns_group = False
        self._lock = OutputDirLock(self.out)
        self._prune_thread = None

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        self._init_distributed()
        self._on_rank0(self._lock.acquire)  # a second run on the same output_dir is refused here
        torch.manual_seed(self.cfg["seed"])
        random.seed(self.cfg["seed"])
        self._load_tokenizer()
        self.data = self._load_data()
        self._build_models()
        self._build_optimizer()
        self._build_loader()
        if self.cfg["resume"]:
            self._load_checkpoint()
        elif self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").write_text("")
        if self.rank == 0:
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg, sort_keys=False))
        self._barrier()

    def _init_distributed(self) -> None:
        cfg = self.cfg
        if cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available()):
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if cfg["liger_kernels"] and self.device.type != "cuda":
            raise ValueError("config key 'liger_kernels': Liger-Kernel's Triton kernels need a CUDA device, "
                             f"this run is on {self.device.type}")
        backend = cfg["backend"] if cfg["backend"] != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        timeout = timedelta(minutes=cfg["dist_timeout_minutes"])  # model loading / precompute can be slow
        if not dist.is_initialized():
            if "WORLD_SIZE" in os.environ:  # torchrun
                dist.init_process_group(backend, timeout=timeout)
            else:  # in-process, world size 1
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            self._owns_group = True
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        use_bf16 = cfg["mixed_precision"] == "bf16" or (cfg["mixed_precision"] == "auto" and self.device.type == "cuda")
        self.compute_dtype = torch.bfloat16 if use_bf16 else torch.float32

    def _load_tokenizer(self) -> None:
        name = self.cfg["tokenizer"]
        if name == "fixture":
            from safedpo_kernels.data import load_fixture_tokenizer

            self.tokenizer = load_fixture_tokenizer()
        else:
            from transformers import AutoTokenizer

            path = self.cfg["model_name_or_path"] if name == "model" else name
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self.cfg["trust_remote_code"])
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _load_data(self) -> DataBundle:
        """Train and held-out pairs, selected and tokenized. Never evaluates on training rows: a source
        without separate splits (one file, a folder whose file names name no split) needs
        ``eval_fraction`` (held out of training, reported), ``eval_dataset``, or ``eval_split: null``."""
        from safedpo_kernels.data import load_pairs, select_pairs, tokenize_pairs

        cfg = self.cfg
        reports = {}

        def tokenize(ds, name, select):
            if select:
                ds, sel = select_pairs(ds, cfg["selection"])
                reports[f"{name}/selection"] = _as_dict(sel)
            tok, tok_report = tokenize_pairs(ds, self.tokenizer, max_length=cfg["max_length"],
                                             ignore_index=IGNORE_INDEX)
            reports[f"{name}/tokenize"] = _as_dict(tok_report)
            return tok

        # Rank 0 first (it fills the datasets cache), then the others read it.
        if self.rank != 0:
            self._barrier()
        try:
            train_raw, train_report = load_pairs(cfg["dataset"], split=cfg["train_split"], name=cfg["dataset_config"],
                                                 limit=cfg["train_limit"])
            reports["train/load"] = _as_dict(train_report)
            held_out = None
            if cfg["eval_split"] is not None and cfg["eval_fraction"] is not None:
                parts = train_raw.train_test_split(test_size=cfg["eval_fraction"], seed=cfg["seed"], shuffle=True)
                train_raw, held_out = parts["train"], parts["test"]
                if cfg["eval_limit"] is not None:
                    held_out = held_out.select(range(min(cfg["eval_limit"], len(held_out))))
                reports["eval/held_out"] = {"eval_fraction": cfg["eval_fraction"], "held_out_pairs": len(held_out),
                                            "train_pairs_left": len(train_raw), "seed": cfg["seed"]}
            elif cfg["eval_split"] is not None:
                source = cfg["eval_dataset"] or cfg["dataset"]
                held_out, eval_report = load_pairs(source, split=cfg["eval_split"], limit=cfg["eval_limit"],
                                                   name=cfg["dataset_config"] if cfg["eval_dataset"] is None else None)
                reports["eval/load"] = _as_dict(eval_report)
                _refuse_train_as_eval(cfg, train_report, eval_report)
            train = tokenize(train_raw, "train", True)
            eval_sel = eval_raw = None
            if held_out is not None:
                eval_sel = tokenize(held_out, "eval", True)
                eval_raw = tokenize(held_out, "eval_raw", False)
        finally:
            if self.rank == 0:
                self._barrier()
        if len(train) < self.world * cfg["micro_batch_size"] * cfg["grad_accum_steps"]:
            raise ValueError(
                f"config key 'micro_batch_size': {len(train)} training pairs cannot fill one step of "
                f"{self.world} ranks x {cfg['micro_batch_size']} x {cfg['grad_accum_steps']} accumulation")
        if self.rank == 0:
            self._print("data: " + json.dumps(reports))
        return DataBundle(train, eval_sel, eval_raw, reports)

    def _build_models(self) -> None:
        from safedpo_kernels.data import PackedPairCollator, PaddedPairCollator

        cfg = self.cfg
        attn = _attn_implementation(cfg, self.device)
        config = _model_config(cfg, self.tokenizer, attn)
        self.hf_config = config
        # Every rank builds a shell (meta parameters), shards it and reads its own shards from the
        # checkpoint's safetensors files. Random inits (tests) and .bin-only checkpoints: rank 0
        # materializes the model and broadcasts the shards (small models only).
        folder = None
        if cfg["model_name_or_path"] is not None:
            def locate() -> str | None:  # rank 0 downloads first; the others then find the files cached
                found = weights_folder(cfg["model_name_or_path"], cfg["model_revision"])
                return None if found is None else str(found)

            folder = self._on_rank0(locate)
            if folder is not None and self.rank != 0:
                folder = str(weights_folder(cfg["model_name_or_path"], cfg["model_revision"]))
        init = _build_lm(cfg, config, real=True) if folder is None and self.rank == 0 else None
        if init is not None and cfg["peft"] is not None:
            init = inject_lora(init, cfg["peft"])  # same parameter names as the shells
        source = Path(folder) if folder is not None else None
        self.policy = self._shard(self._shell(config), init, source, train=True)
        self.ref = None
        needs_ref = cfg["objective"] != "sft" and not cfg["reference_free"]
        if needs_ref and cfg["reference_mode"] == "live" and cfg["peft"] is None:
            self.ref = self._shard(self._shell(config), init, source, train=False)
        del init
        self.collate = (PackedPairCollator(ignore_index=IGNORE_INDEX) if cfg["packing"] else
                        PaddedPairCollator(self.tokenizer.pad_token_id, ignore_index=IGNORE_INDEX))
        if needs_ref and cfg["reference_mode"] == "precompute":
            self._precompute_reference()
        n_params = sum(p.numel() for p in self.policy.parameters())  # global sizes (DTensor numel)
        n_train = sum(p.numel() for p in self.policy.parameters() if p.requires_grad)
        self._print(f"model: {config.model_type}, {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.3f}M trained), "
                    f"attn={attn}, "
                    f"compute={self.compute_dtype}, world={self.world}, device={self.device.type}")

    def _shell(self, config) -> nn.Module:
        lm = _build_lm(self.cfg, config, real=False)
        if self.cfg["peft"] is not None:
            lm = inject_lora(lm, self.cfg["peft"])
        if self.cfg["liger_kernels"]:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            # Only the body: our head and loss replace Liger's cross-entropy paths.
            _apply_liger_kernel_to_instance(model=lm, rope=True, rms_norm=True, swiglu=True,
                                            cross_entropy=False, fused_linear_cross_entropy=False)
        return lm

    def _shard(self, lm: nn.Module, init: nn.Module | None, folder: Path | None, *, train: bool) -> PolicyWithLoss:
        """fully_shard every decoder layer, then the PolicyWithLoss root; fill each rank's shards from the
        safetensors in ``folder``, or (``folder`` None) from rank 0's materialized ``init``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        cfg = self.cfg
        layers = _decoder_layers(lm)
        if train and cfg["activation_checkpointing"]:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            for i, layer in enumerate(layers):
                layers[i] = checkpoint_wrapper(layer)  # non-reentrant, recomputed inside the layer's unit
        dtype = self.compute_dtype
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        # The root must not cast its inputs: ref log-probs would be rounded to bf16.
        mp_root = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        root = PolicyWithLoss(lm, cfg, live_reference=cfg["peft"] is not None and cfg["reference_mode"] == "live")
        fully_shard(root, mp_policy=mp_root)
        buffers = snapshot_buffers(lm)  # rotary inv_freq etc.: computed on the CPU by every rank
        root.to_empty(device=self.device)
        if restore_buffers(root.lm, buffers):
            raise RuntimeError("model: some buffers were created on the meta device; cannot restore them")
        if folder is not None:
            tied = {"lm_head.weight"} if getattr(self.hf_config, "tie_word_embeddings", False) else set()
            t0 = time.perf_counter()
            stats = load_own_shards(root.lm, folder, tied_names=tied)
            self._print(f"weights: rank 0 read {stats['read_bytes'] / 2**20:.3f} of {stats['total_bytes'] / 2**20:.3f}"
                        f" MiB (its own shards) from {folder} in {time.perf_counter() - t0:.1f} s")
        else:
            full = {} if init is None else {f"lm.{k}": v for k, v in init.state_dict().items()}
            set_model_state_dict(root, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        if cfg["peft"] is not None:
            init_adapters(root.lm, cfg["seed"])  # same start on any number of ranks; lora_B = 0
        if not train:
            root.requires_grad_(False)
            root.eval()
        return root

    # ----------------------------------------------------------------------------- reference
    def _pair_logps(self, model: nn.Module, ds, desc: str, what: str = "logps") -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) chosen and (N,) rejected float32 sequence log-probs of ``ds`` on every rank (no grad).

        Rows are split round-robin over ranks; each rank runs the same number of forwards (FSDP needs
        every rank in every all-gather), padded with a repeated row that is then ignored.
        """
        n, bs = len(ds), self.cfg["eval_batch_size"]
        mine = list(range(self.rank, n, self.world))
        n_batches = math.ceil(math.ceil(n / self.world) / bs)
        out = torch.zeros(2, n, dtype=torch.float64, device=self.device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            bar = _progress(n_batches, desc, self.rank == 0 and self.cfg["progress_bar"])
            for b in range(n_batches):
                idx = mine[b * bs:(b + 1) * bs]
                batch = self._to_device(self.collate([ds[i] for i in (idx or [0])]))
                logps = model(**{k: batch[k] for k in _ROW_INPUTS if k in batch}, what=what)
                if idx:
                    k = len(idx)
                    out[0, idx] = logps[:k].double()
                    out[1, idx] = logps[k:].double()
                bar.update(1)
            bar.close()
        model.reshard()  # the root keeps its parameters gathered after a forward that has no backward
        model.train(was_training)
        dist.all_reduce(out)  # each entry written by exactly one rank: the sum is a gather
        return out[0].float().cpu(), out[1].float().cpu()

    def _precompute_reference(self) -> None:
        """Reference log-probs of the initial policy for every split, cached on disk, added as columns."""
        cache = Path(self.cfg["reference_cache_dir"] or self.out / "reference_cache")
        model_fp = _model_fingerprint(self.cfg, self.compute_dtype, self.policy.average)
        for name in ("train", "eval_sel", "eval_raw"):
            ds = getattr(self.data, name)
            if ds is None:
                continue
            path = cache / f"ref_{model_fp}_{_dataset_fingerprint(ds)}.pt"
            have = torch.tensor([1 if path.exists() else 0], device=self.device)  # NCCL: device tensors only
            dist.all_reduce(have, op=dist.ReduceOp.MIN)  # every rank must see the file, else all compute
            if have.item():
                saved = torch.load(path, weights_only=True)
                chosen, rejected = saved["chosen"], saved["rejected"]
            else:
                chosen, rejected = self._pair_logps(self.policy, ds, f"reference log-probs ({name})")
                if self.rank == 0:
                    cache.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".tmp")
                    torch.save({"chosen": chosen, "rejected": rejected}, tmp)
                    os.replace(tmp, path)
            if not (torch.isfinite(chosen).all() and torch.isfinite(rejected).all()):
                raise FloatingPointError(f"reference log-probs of {name}: not finite (see {path})")
            ds = ds.add_column("ref_chosen_logps", chosen.tolist())
            ds = ds.add_column("ref_rejected_logps", rejected.tolist())
            setattr(self.data, name, ds)
            self._print(f"reference ({name}): {'cache hit' if have.item() else 'computed'} {path}")

    # ----------------------------------------------------------------------------- optimizer, data
    def _build_optimizer(self) -> None:
        cfg = self.cfg
        trained = [p for p in self.policy.parameters() if p.requires_grad]  # LoRA: the adapters only
        self.optimizer = torch.optim.AdamW(trained, lr=cfg["lr"], betas=tuple(cfg["adam_betas"]),
                                           eps=cfg["adam_eps"], weight_decay=cfg["weight_decay"])

    def _build_loader(self) -> None:
        cfg = self.cfg
        self.sampler = SkippingDistributedSampler(self.data.train, num_replicas=self.world, rank=self.rank,
                                                  shuffle=True, seed=cfg["seed"], drop_last=True)
        self.loader = torch.utils.data.DataLoader(self.data.train, batch_size=cfg["micro_batch_size"],
                                                  sampler=self.sampler, collate_fn=self.collate, drop_last=True)
        self.steps_per_epoch = (self.sampler.num_samples // cfg["micro_batch_size"]) // cfg["grad_accum_steps"]
        self.micro_per_epoch = self.steps_per_epoch * cfg["grad_accum_steps"]  # leftover micro-batches unused
        total = cfg["epochs"] * self.steps_per_epoch
        self.total_steps = min(total, cfg["max_steps"]) if cfg["max_steps"] else total
        warmup, floor = cfg["warmup_steps"], cfg["min_lr_ratio"]

        def lr_lambda(step: int) -> float:  # linear warmup, then cosine down to min_lr_ratio
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, self.total_steps - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self._iter = None

    def _next_micro_batches(self) -> list[dict]:
        accum = self.cfg["grad_accum_steps"]
        if self.micro_in_epoch >= self.micro_per_epoch:
            self.epoch, self.micro_in_epoch, self._iter = self.epoch + 1, 0, None
        if self._iter is None:
            self.sampler.set_epoch(self.epoch)
            self.sampler.skip = self.micro_in_epoch * self.cfg["micro_batch_size"]
            self._iter = iter(self.loader)
        batches = [self._to_device(next(self._iter)) for _ in range(accum)]
        self.micro_in_epoch += accum
        return batches

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ----------------------------------------------------------------------------- training
    def _units(self, batch: dict) -> torch.Tensor:
        """What the loss is averaged over: kept pairs (safedpo), pairs (dpo), target tokens (sft)."""
        if self.cfg["objective"] == "sft":
            return (batch["labels"][:, 1:] != IGNORE_INDEX).sum().double()
        if self.cfg["objective"] == "safedpo":
            return count_kept_pairs(batch["chosen_unsafe"], batch["rejected_unsafe"]).double()
        return torch.tensor(float(batch["chosen_unsafe"].shape[0]), dtype=torch.float64)

    def _nll_tokens(self, batch: dict) -> torch.Tensor:
        """Trained tokens of the T(D) winners of kept pairs (the NLL term's normalizer; DPO: chosen)."""
        counts = _target_counts(batch)
        b = counts.shape[0] // 2
        if self.cfg["objective"] != "safedpo":
            return counts[:b].sum()
        keep, swap, _ = safety_transform(batch["chosen_unsafe"], batch["rejected_unsafe"])
        return torch.where(keep, torch.where(swap, counts[b:], counts[:b]), torch.zeros_like(counts[:b])).sum()

    def _sft_view(self, batch: dict) -> dict:
        """SFT trains on the chosen rows (or both responses), no flags or reference."""
        rows = batch["input_ids"].shape[0]
        rows = rows // 2 if self.cfg["sft_responses"] == "chosen" else rows
        return {k: batch[k][:rows] for k in ("input_ids", "attention_mask", "labels")}

    def _train_step(self, batches: list[dict]) -> dict[str, float]:
        """Forward + backward of every micro-batch, gradients of the mean over the GLOBAL batch, step.

        The kept pairs (pairs, target tokens; NLL winner tokens) of all micro-batches on all ranks are
        counted with one all-reduce before the forwards and passed to the loss as its normalizer
        (``num_kept_pairs``), so ranks with more dropped pairs do not weigh more.
        """
        sft = self.cfg["objective"] == "sft"
        if sft:
            batches = [self._sft_view(b) for b in batches]
        units = [self._units(b).to(self.device) for b in batches]
        nll = self.cfg["rpo_alpha"] is not None and not sft
        totals = torch.stack([torch.stack(units).sum(), torch.stack([self._nll_tokens(b) for b in batches]).sum().to(
            self.device) if nll else torch.zeros((), dtype=torch.float64, device=self.device)])
        dist.all_reduce(totals)  # step-wide normalizers: every micro-batch of every rank
        global_units, global_nll_tokens = totals[0], (totals[1] if nll else None)
        sums: dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()
        for batch, n in zip(batches, units):
            if self.ref is not None:  # live reference: a frozen sharded copy, forward only
                batch = {**batch, **self._live_ref_logps(batch)}
            loss, metrics = self.policy(**{k: batch[k] for k in _MODEL_INPUTS if k in batch},
                                        num_units=global_units, num_nll_tokens=global_nll_tokens)
            # The loss is (sum over this micro-batch) / (global count); FSDP averages gradients over
            # ranks, so x world makes the update that of the mean over the whole step.
            (loss * self.world).backward()
            _accumulate(sums, metrics, n, batch)
        if self.cfg["debug_dump_grads"] and self.step == 0:
            self._dump_grads(Path(self.cfg["debug_dump_grads"]), batches)
        grad_norm = torch.tensor(0.0)
        if self.cfg["max_grad_norm"] is not None:
            params = [p for p in self.policy.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg["max_grad_norm"])
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        out = _reduce_metrics(sums, self.device)  # ONE stacked all-reduce
        dt = time.perf_counter() - t0
        out.update(step=self.step, epoch=self.epoch, lr=lr, grad_norm=float(grad_norm),
                   tokens_per_s=out.pop("tokens/total") / max(dt, 1e-9), step_time_s=dt,
                   peak_memory_gb=_peak_memory_gb(self.device))
        if not math.isfinite(out["loss"]):
            raise FloatingPointError(f"step {self.step}: loss is {out['loss']} (metrics: {out})")
        return out

    def _live_ref_logps(self, batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            logps = self.ref(**{k: batch[k] for k in _ROW_INPUTS if k in batch}, what="logps")
        self.ref.reshard()
        b = logps.shape[0] // 2
        return {"ref_chosen_logps": logps[:b], "ref_rejected_logps": logps[b:]}

    def _dump_grads(self, path: Path, batches: list[dict]) -> None:
        """Full gradients (gathered from the shards) and rank 0's micro-batches, saved by rank 0."""
        grads = {}
        for name, p in self.policy.named_parameters():
            g = p.grad
            if g is None:  # frozen (LoRA base weights)
                continue
            full = g.full_tensor() if hasattr(g, "full_tensor") else g
            grads[name.replace("_checkpoint_wrapped_module.", "")] = full.detach().cpu().clone()
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            cpu_batches = [{k: v.detach().cpu() for k, v in b.items() if torch.is_tensor(v)} for b in batches]
            torch.save({"grads": grads, "batches": cpu_batches, "world": self.world}, path)

    def train(self) -> list[dict]:
        """nanoGPT-like loop: batches, lr, forward/backward, clip, step, log, eval, save."""
        cfg = self.cfg
        if cfg["eval_at_start"] and self.step == 0 and self.data.eval_raw is not None:
            self._log({"step": 0, **self.evaluate()})
        bar = _progress(self.total_steps, "train", self.rank == 0 and cfg["progress_bar"], initial=self.step)
        while self.step < self.total_steps:
            metrics = self._train_step(self._next_micro_batches())
            acc = metrics.get("rewards/accuracies", float("nan"))
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{acc:.2f}", refresh=False)
            bar.update(1)
            if self.step % cfg["log_every"] == 0 or self.step == self.total_steps:
                self._log(metrics)
            last = self.step == self.total_steps
            if self.data.eval_raw is not None and (last or (cfg["eval_every"] and self.step % cfg["eval_every"] == 0)):
                self._log({"step": self.step, **self.evaluate()})
            if last or (cfg["save_every"] and self.step % cfg["save_every"] == 0):
                self.save_checkpoint()
        bar.close()
        return self.history

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, computed on every rank from all-gathered sequence log-probs.

        eval/loss, eval/accuracy, eval/margins: the objective on the selected held-out pairs
        (SFT: eval/nll_per_token on their chosen responses). eval/safe_over_unsafe: share of
        safe-vs-unsafe held-out pairs whose implicit reward beta * (log pi - log pi_ref) ranks the safe
        response higher; eval/safe_over_unsafe_logp: the same with plain log-probs (no reference);
        eval/helpful_accuracy_safe_pairs: implicit-reward ranking of the helpfulness winner on pairs
        where both responses are safe. eval/logps_chosen, eval/logps_rejected: mean policy sequence
        log-probs of the held-out responses (watch the chosen ones fall: likelihood displacement).
        """
        from safedpo_kernels import dpo_loss, safedpo_loss

        cfg, out = self.cfg, {}
        beta = cfg["beta"]
        raw = self.data.eval_raw
        pc, pr = self._pair_logps(self.policy, raw, "eval")
        cu = torch.tensor(raw["chosen_unsafe"], dtype=torch.bool)
        ru = torch.tensor(raw["rejected_unsafe"], dtype=torch.bool)
        mixed, both_safe = cu ^ ru, ~cu & ~ru
        safe_lp = torch.where(cu, pr, pc)
        unsafe_lp = torch.where(cu, pc, pr)
        out["eval/safe_over_unsafe_logp"] = _frac(safe_lp > unsafe_lp, mixed)
        out["eval/pairs_safe_vs_unsafe"] = float(mixed.sum())
        out["eval/logps_chosen"], out["eval/logps_rejected"] = float(pc.double().mean()), float(pr.double().mean())
        if cfg["objective"] == "sft":
            sel = self.data.eval_sel
            sc, _ = self._pair_logps(self.policy, sel, "eval (selected)")
            n_tok = sum(sum(1 for t in row[1:] if t != IGNORE_INDEX) for row in sel["chosen_labels"])
            nll = -sc.mean() if cfg["average_log_prob"] else -sc.double().sum() / max(1, n_tok)
            out["eval/nll_per_token"] = float(nll)
            return out
        rc, rr = self._ref_logps(raw, "eval_raw")
        r_c, r_r = beta * (pc - rc), beta * (pr - rr)
        out["eval/safe_over_unsafe"] = _frac(torch.where(cu, r_r, r_c) > torch.where(cu, r_c, r_r), mixed)
        out["eval/helpful_accuracy_safe_pairs"] = _frac(r_c > r_r, both_safe)
        sel = self.data.eval_sel
        spc, spr = self._pair_logps(self.policy, sel, "eval (selected)") if sel is not raw else (pc, pr)
        src, srr = self._ref_logps(sel, "eval_sel")
        if cfg["reference_free"]:
            src = srr = None
        opts = dict(beta=beta, loss_type=cfg["loss_type"], label_smoothing=cfg["label_smoothing"], return_metrics=True)
        if cfg["objective"] == "safedpo":
            scu = torch.tensor(sel["chosen_unsafe"], dtype=torch.bool)
            sru = torch.tensor(sel["rejected_unsafe"], dtype=torch.bool)
            loss, m = safedpo_loss(spc, spr, src, srr, scu, sru, delta=cfg["delta"], **opts)
        else:
            loss, m = dpo_loss(spc, spr, src, srr, **opts)
        out.update({"eval/loss": float(loss), "eval/accuracy": float(m["rewards/accuracies"]),
                    "eval/margins": float(m["rewards/margins"])})
        return out

    def _ref_logps(self, ds, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of ``ds``: 0 (reference-free), live (frozen copy, or the adapter-disabled
        LoRA policy), or the precomputed columns."""
        if self.cfg["reference_free"]:
            return torch.zeros(len(ds)), torch.zeros(len(ds))
        if self.ref is not None:
            return self._pair_logps(self.ref, ds, f"eval reference ({name})")
        if self.policy.live_reference:
            return self._pair_logps(self.policy, ds, f"eval reference ({name})", what="ref_logps")
        return (torch.tensor(ds["ref_chosen_logps"], dtype=torch.float32),
                torch.tensor(ds["ref_rejected_logps"], dtype=torch.float32))

    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """DCP-sharded model + optimizer, and per-rank scheduler / data position / RNG, saved atomically.

        Written to ``step_N.tmp`` and renamed to ``step_N`` by rank 0 once every rank has finished: a
        crash mid-save leaves only a ``.tmp`` folder, which resume ignores.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        root = self.out / "checkpoints"
        final, tmp = root / f"step_{self.step:07d}", root / f"step_{self.step:07d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        self._barrier()
        model_sd, optim_sd = get_state_dict(self.policy, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        extra = {
            "step": self.step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch, "world": self.world,
            "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": (torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                         else torch.empty(0, dtype=torch.uint8)),
            "python_rng": list(random.getstate()[1]),
        }
        torch.save(extra, tmp / f"extra_rank{self.rank}.pt")
        self._barrier()
        if self.rank == 0:
            (tmp / "meta.json").write_text(json.dumps({"step": self.step, "world": self.world, "complete": True}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self._barrier()
        if self.rank == 0:  # after the barrier: the other ranks train on while old folders are deleted
            if self._prune_thread is not None:
                self._prune_thread.join()
            self._prune_thread = prune_in_background(root, self.cfg["keep_checkpoints"])
        self._print(f"checkpoint: {final}")
        return final

    def _load_checkpoint(self) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        import warnings

        def choose() -> str:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                path = newest_verified(self.out / "checkpoints")
            for w in seen:  # damaged newer checkpoints skipped: named in the log
                self._print(f"WARNING: {w.message}")
            return str(path)

        path = Path(self._on_rank0(choose))
        model_sd, optim_sd = get_state_dict(self.policy, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.policy, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        saved_world = json.loads((path / "meta.json").read_text())["world"]
        # Verified: every rank of the saving run has its file. A rank the saving run did not have
        # (resuming on more ranks) starts from rank 0's position; the data order changes (printed).
        rank_file = path / f"extra_rank{self.rank if self.rank < saved_world else 0}.pt"
        extra = torch.load(rank_file, weights_only=True)
        if extra["world"] != self.world:
            self._print(f"resume: checkpoint written by {extra['world']} ranks, now {self.world}: "
                        "the data order changes")
        self.step, self.epoch, self.micro_in_epoch = extra["step"], extra["epoch"], extra["micro_in_epoch"]
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["torch_rng"])
        if self.device.type == "cuda" and extra["cuda_rng"].numel():
            torch.cuda.set_rng_state(extra["cuda_rng"], self.device)
        random.setstate((3, tuple(extra["python_rng"]), None))
        self._iter = None
        if self.rank == 0:  # keep the metrics of the steps this checkpoint contains, drop later ones
            path_m = self.out / "metrics.jsonl"
            rows = [json.loads(line) for line in path_m.read_text().splitlines() if line] if path_m.exists() else []
            rows = [r for r in rows if r.get("step", 0) <= self.step]
            path_m.write_text("".join(json.dumps(r) + "\n" for r in rows))
            self.history = rows
        self._print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, micro-batch {self.micro_in_epoch})")

    def export_hf(self) -> Path | None:
        """Full weights gathered to rank 0 and written as a Hugging Face folder (safetensors)."""
        from huggingface_hub import save_torch_state_dict
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        dest = self.out / "hf_export"
        tmp = self.out / "hf_export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        dtype = getattr(torch, self.cfg["export_dtype"])
        sd = {k.removeprefix("lm."): v for k, v in full.items()}
        if self.cfg["peft"] is not None:  # LoRA: W + (alpha / r) B A, plain HF names
            sd = merged_state_dict(sd, self.cfg["peft"]["lora_alpha"] / self.cfg["peft"]["r"])
        sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
        if getattr(self.hf_config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)  # tied: stored once, re-tied by from_pretrained
        save_torch_state_dict(sd, tmp, max_shard_size="5GB")
        config = self.hf_config.__class__.from_dict(self.hf_config.to_dict())
        config.dtype = self.cfg["export_dtype"]
        config.use_cache = True
        config.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        self._print(f"export: {dest}")
        return dest

    # ----------------------------------------------------------------------------- logging
    def _log(self, row: dict) -> None:
        row = {k: (float(v) if torch.is_tensor(v) else v) for k, v in row.items()}
        self.history.append(row)
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def plot(self) -> Path | None:
        if self.rank != 0 or not self.cfg["plot"]:
            return None
        return plot_metrics(self.out / "metrics.jsonl", self.out / "curves.png")

    def _on_rank0(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0; its result (or its error, re-raised on every rank) broadcast to all ranks.

        Decisions that read shared files (the lock, which checkpoint is intact) are taken once, so
        ranks never disagree and no rank waits in a collective for a rank that already failed.
        """
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                box[0] = ("error", err)
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def cleanup(self) -> None:
        if self._prune_thread is not None:
            self._prune_thread.join()
        if self.rank == 0:
            self._lock.release()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------

_MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "chosen_unsafe", "rejected_unsafe",
                 "ref_chosen_logps", "ref_rejected_logps", "position_ids", "cu_seqlens")
_ROW_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids", "cu_seqlens")
_MEAN_OVER_UNITS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected")
_COUNTS = ("pairs/kept", "pairs/swapped", "pairs/dropped", "nll_loss")  # summed (nll_loss: already / global)


def _accumulate(sums: dict, metrics: dict, units: torch.Tensor, batch: dict) -> None:
    """Per-micro-batch metrics (means over its units) -> sums, reduced later in one all-reduce."""
    def add(key, value):
        sums[key] = sums.get(key, 0) + value.detach().double()

    for key in _MEAN_OVER_UNITS:
        if key in metrics:
            add(key, metrics[key] * units)
    for key in _COUNTS:
        if key in metrics:
            add(key, metrics[key])
    rows = batch["input_ids"].shape[0]
    if "safety/safe_vs_unsafe_frac" in metrics:
        add("safety/safe_vs_unsafe_frac", metrics["safety/safe_vs_unsafe_frac"] * (rows // 2))
    add("pairs", torch.tensor(float(rows // 2), device=units.device))
    add("units", units)
    tokens = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].new_tensor(
        batch["input_ids"].numel())  # packed: every position is a real token
    add("tokens/total", tokens)


def _reduce_metrics(sums: dict, device) -> dict[str, float]:
    keys = sorted(sums)
    stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys])
    dist.all_reduce(stacked)
    total = dict(zip(keys, stacked.tolist()))
    units, pairs = max(total.pop("units"), 1.0), max(total.pop("pairs"), 1.0)
    out = {}
    for key, value in total.items():
        if key in _MEAN_OVER_UNITS:
            out[key] = value / units
        elif key == "safety/safe_vs_unsafe_frac":
            out[key] = value / pairs
        else:
            out[key] = value
    return out


def _target_counts(batch: dict) -> torch.Tensor:
    """(2B,) float64 trained tokens per sequence (after the shift), padded or packed batch."""
    if "cu_seqlens" in batch:
        from safedpo_kernels.data import shift_packed_labels

        trained = (shift_packed_labels(batch["labels"], IGNORE_INDEX).reshape(-1) != IGNORE_INDEX).double()
        ends = torch.cat([torch.zeros(1, dtype=torch.float64, device=trained.device), trained.cumsum(0)])
        cu = batch["cu_seqlens"].long()
        return ends[cu[1:]] - ends[cu[:-1]]
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).double()


def _frac(hits: torch.Tensor, mask: torch.Tensor) -> float:
    n = int(mask.sum())
    return float((hits & mask).sum()) / n if n else float("nan")


def _as_dict(report) -> Any:
    if hasattr(report, "as_dict"):
        return report.as_dict()
    return report if isinstance(report, (dict, list, int, float, str, type(None))) else str(report)


def _refuse_train_as_eval(cfg: dict, train_report, eval_report) -> None:
    """ValueError when the eval split read the very rows of the training split (a local source with no
    split names: one file, or a folder whose file names name no split)."""
    if cfg["eval_dataset"] is not None or train_report.resolved.startswith("hub:"):
        return
    if train_report.resolved == eval_report.resolved:
        raise ValueError(
            f"config key 'eval_split': dataset {cfg['dataset']!r} has no separate {cfg['eval_split']!r} split "
            f"(both splits read {train_report.resolved}), so evaluation would measure training rows. Set "
            "eval_fraction (e.g. 0.05: held out of training), eval_dataset (another file), or eval_split: null.")


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm bar advanced by hand (``update(1)`` per step, so the count and ETA move every step;
    ``set_postfix(..., refresh=False)`` never redraws a stale count); a no-op object when disabled."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    # Redirected to a file (CI logs): redraw at most every 15 s instead of every 0.1 s.
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, smoothing=0.1,
                mininterval=0.1 if sys.stderr.isatty() else 15.0)


def plot_metrics(metrics_path: Path, png_path: Path) -> Path:
    """Training and evaluation curves from a metrics JSONL -> PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    panels = [("loss", train, ["loss"]), ("rewards", train, ["rewards/margins", "rewards/accuracies"]),
              ("lr", train, ["lr"]),
              ("eval rates", evals, ["eval/accuracy", "eval/safe_over_unsafe", "eval/safe_over_unsafe_logp",
                                     "eval/helpful_accuracy_safe_pairs"]),
              ("eval loss", evals, ["eval/loss", "eval/nll_per_token"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5))
    for ax, (title, data, keys) in zip(axes, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in data if key in r and r[key] is not None and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), marker="o" if title.startswith("eval") else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run(config: dict) -> dict:
    """Train, evaluate, checkpoint and export; returns final metrics and output paths.

    Works under torchrun (any world size) and in-process (world size 1: a one-rank process group is
    created and destroyed here). Returns {"final_eval", "train_losses", "history", "output_dir",
    "checkpoint", "export", "plot", "steps", "train_time_s"}.
    """
    recipe = Recipe(config)
    try:
        recipe.setup()
        t0 = time.perf_counter()
        history = recipe.train()
        train_time = time.perf_counter() - t0
        export = recipe.export_hf() if recipe.cfg["export_hf"] else None
        png = recipe.plot()
        evals = [r for r in history if any(k.startswith("eval/") for k in r)]
        ckpts = [p for p in step_folders(recipe.out / "checkpoints") if checkpoint_problem(p) is None]
        result = {
            "final_eval": {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {},
            "train_losses": [r["loss"] for r in history if "loss" in r],
            "history": history,
            "output_dir": str(recipe.out),
            "checkpoint": str(ckpts[-1]) if ckpts else None,
            "export": str(export) if export else None,
            "plot": str(png) if png else None,
            "steps": recipe.step,
            "train_time_s": train_time,
        }
        if recipe.rank == 0:
            (recipe.out / "final_eval.json").write_text(json.dumps(result["final_eval"], indent=2))
        return result
    finally:
        recipe.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (recipes/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    result = run(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print("final evaluation:", json.dumps(result["final_eval"], indent=2))
        print(f"outputs: {result['output_dir']} ({result['steps']} steps in {result['train_time_s']:.1f} s)")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # after destroy_process_group: avoids gloo's rare abort at interpreter exit


if __name__ == "__main__":
    main()
