"""Engine configs in and out: a DeepSpeed ``ds_config.json`` or an Accelerate config as job fields, and the
DeepSpeed config that reproduces a job.

``memfit estimate --deepspeed ds_config.json`` and ``--accelerate-config accelerate.yaml`` read the fields that
move memory (ZeRO stage, bf16/fp16, offload, bucket sizes, stage-3 limits, micro-batch, optimizer, GPUs); the
measure engine writes :func:`ds_config_for_job` for ``deepspeed.initialize``. Values the Hugging Face Trainer
fills in at run time (``"auto"``) are left to the job (or DeepSpeed's default). No torch, no deepspeed import.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import JobError, brief
from .job import Job, read_config_file

__all__ = ["read_deepspeed_config", "read_accelerate_config", "ds_config_for_job", "DEEPSPEED_DEFAULTS",
           "zero_option"]

#: DeepSpeed's defaults for the ZeRO options a job can set (deepspeed/runtime/zero/config.py,
#: ``DeepSpeedZeroConfig``): reduce/allgather buckets 5e8 elements, stage-3 prefetch 5e7, persistence
#: threshold 1e5, live parameters 1e9, reuse distance 1e9, sub_group_size 1e9, contiguous gradients on,
#: overlap_comm on for stage 3 only (``overlap_comm_valid``).
DEEPSPEED_DEFAULTS: dict[str, Any] = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "contiguous_gradients": True,
    "sub_group_size": 1_000_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
}

_ZERO_STRATEGY = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}
"""The job strategy of each ZeRO stage (stage 0 is plain data parallelism)."""

_OPTIMIZERS = {"adamw": "adamw", "adam": "adam", "sgd": "sgd", "lion": "lion", "adagrad": None,
               "onebitadam": None, "lamb": None, "muon": None}


def zero_option(job: Job, name: str) -> Any:
    """A ZeRO option of ``job``: its own value, else DeepSpeed's default (overlap_comm: stage 3 only)."""
    v = getattr(job, name)
    if v is not None:
        return v
    if name == "overlap_comm":
        return job.strategy == "zero3"
    return DEEPSPEED_DEFAULTS[name]


def _load(path: str | Path, kind: str) -> dict[str, Any]:
    if not isinstance(path, (str, Path)) or not str(path):
        raise JobError(f"a {kind} config is named by a file path, not {brief(path)}")
    data = read_config_file(path, f"{kind} config", default_format="json", not_utf8=" (JSON or YAML)")
    if not isinstance(data, dict):
        raise JobError(f"{kind} config {str(Path(path))!r} must be a mapping")
    return data


def _given(v: Any) -> bool:
    return v is not None and v != "auto"


_MAX_INT = 1 << 50
"""Largest count an engine config may give (element counts of buckets and thresholds stay far below)."""


def _int(v: Any, what: str) -> int:
    """A whole, non-negative number of an engine config (``1e5`` and ``"4"`` too), at most 2**50."""
    if isinstance(v, bool):
        raise JobError(f"{what} must be a number, not {brief(v)}")
    if isinstance(v, int) and 0 <= v <= _MAX_INT:
        return v
    f = None
    if isinstance(v, float):
        f = v
    elif isinstance(v, str) and len(v) < 40:
        try:
            f = float(v)
        except ValueError:
            pass
    if f is not None and math.isfinite(f) and f.is_integer() and 0 <= f <= _MAX_INT:
        return int(f)
    raise JobError(f"{what} must be a whole number from 0 to 2**50; got {brief(v)}")


def _section(cfg: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """A sub-mapping of an engine config; absent or null is empty, anything but a mapping is an error."""
    v = cfg.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise JobError(f"{where}{key} must be a mapping in the config; got {brief(v)}")
    return v


def _enabled(section: Any) -> bool:
    if not isinstance(section, dict):
        return False
    v = section.get("enabled", False)
    return v is True or (isinstance(v, str) and v.lower() == "true")


def read_deepspeed_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Job fields from a DeepSpeed config (a path to ds_config.json or the dict itself).

    Reads ``zero_optimization`` (stage, offload_optimizer / offload_param with their device, bucket sizes,
    overlap_comm, contiguous_gradients, sub_group_size, the stage-3 limits), ``bf16`` / ``fp16`` (DeepSpeed's
    16-bit parameters with an fp32 master partition: memfit's ``bf16-mixed`` / ``16-mixed``; bf16 with
    ``bf16_master_weights_and_grads`` and ``bf16_optimizer_states`` is ``bf16-true``), neither is ``32-true``,
    ``train_micro_batch_size_per_gpu`` and the optimizer type. Stage 0 is plain data parallelism (ddp).
    """
    cfg = source if isinstance(source, dict) else _load(source, "DeepSpeed")
    out: dict[str, Any] = {}
    if not isinstance(cfg, dict):
        raise JobError("a DeepSpeed config must be a mapping")
    zero = cfg.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise JobError("zero_optimization must be a mapping in a DeepSpeed config")
    stage = zero.get("stage", 0)
    stage = 0 if not _given(stage) else _int(stage, "zero_optimization.stage")
    if stage not in _ZERO_STRATEGY:
        raise JobError(f"zero_optimization.stage must be 0, 1, 2 or 3; got {stage}")
    out["strategy"] = _ZERO_STRATEGY[stage]
    bf16 = cfg.get("bf16") or cfg.get("bfloat16") or {}
    fp16 = cfg.get("fp16") or {}
    for key, sec in (("bf16", bf16), ("fp16", fp16)):
        if not isinstance(sec, dict):
            raise JobError(f"{key} must be a mapping like {{\"enabled\": true}} in a DeepSpeed config; got {brief(sec)}")
    if _enabled(bf16):
        pure = bool(bf16.get("bf16_master_weights_and_grads")) and bool(bf16.get("bf16_optimizer_states"))
        out["precision"] = "bf16-true" if pure else "bf16-mixed"
    elif _enabled(fp16):
        out["precision"] = "16-mixed"
    elif isinstance(bf16, dict) and bf16.get("enabled") == "auto":
        out["precision"] = "bf16-mixed"
    else:
        out["precision"] = "32-true"
    off_opt = _section(zero, "offload_optimizer", "zero_optimization.")
    off_par = _section(zero, "offload_param", "zero_optimization.")
    if zero.get("cpu_offload") is True:  # the deprecated spelling
        off_opt = {"device": "cpu"}
    devices = []
    for sec in (off_opt, off_par):
        dev = sec.get("device", "none")
        dev = "none" if dev is None else dev
        if not isinstance(dev, str) or dev.lower() not in ("none", "cpu", "nvme"):
            raise JobError(f"offload device must be none, cpu or nvme; got {brief(dev)}")
        devices.append(dev.lower())
    opt_dev, par_dev = devices
    if par_dev != "none":
        out["offload"] = "optimizer+params"
        out["offload_device"] = par_dev if par_dev == "nvme" or opt_dev == "none" else opt_dev
    elif opt_dev != "none":
        out["offload"] = "optimizer"
        out["offload_device"] = opt_dev
    for name in ("reduce_bucket_size", "allgather_bucket_size", "sub_group_size", "stage3_prefetch_bucket_size",
                 "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance"):
        alias = name.replace("stage3_", "") if name.startswith("stage3_") else None
        v = zero.get(name, zero.get(alias) if alias else None)
        if _given(v):
            out[name] = _int(v, f"zero_optimization.{name}")
    for name in ("overlap_comm", "contiguous_gradients"):
        v = zero.get(name)
        if isinstance(v, bool):
            out[name] = v
    mb = cfg.get("train_micro_batch_size_per_gpu")
    if _given(mb):
        out["batch_size"] = max(1, _int(mb, "train_micro_batch_size_per_gpu"))
    opt = cfg.get("optimizer")
    if opt is not None and not isinstance(opt, dict):
        raise JobError(f"optimizer must be a mapping with a type in a DeepSpeed config; got {brief(opt)}")
    if isinstance(opt, dict) and _given(opt.get("type")):
        if not isinstance(opt["type"], str):
            raise JobError(f"optimizer.type must be a name like AdamW; got {brief(opt['type'])}")
        name = opt["type"].lower().replace("_", "")
        mapped = {"fusedadam": "adamw", "cpuadam": "adamw", "deepspeedcpuadam": "adamw"}.get(name, name)
        if mapped not in _OPTIMIZERS or _OPTIMIZERS[mapped] is None:
            raise JobError(f"optimizer type {brief(opt['type'])} is not one memfit estimates "
                           "(AdamW, Adam, SGD, Lion)")
        if mapped == "adam":
            params = _section(opt, "params", "optimizer.")
            mapped = "adamw" if params.get("adam_w_mode", True) else "adam"
        out["optimizer"] = _OPTIMIZERS[mapped]
    return out


def read_accelerate_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Job fields from an Accelerate config (``accelerate config`` writes it as YAML).

    ``distributed_type: FSDP`` with ``fsdp_config`` (``fsdp_version`` 1 or 2, ``fsdp_sharding_strategy``,
    ``fsdp_reshard_after_forward``, ``fsdp_offload_params``, ``fsdp_activation_checkpointing``),
    ``distributed_type: DEEPSPEED`` with ``deepspeed_config`` (``zero_stage``, ``offload_optimizer_device``,
    ``offload_param_device``, or a ``deepspeed_config_file``), ``distributed_type: MULTI_GPU`` (DDP);
    ``mixed_precision`` (no / fp16 / bf16), ``num_processes`` and ``num_machines``.
    """
    cfg = source if isinstance(source, dict) else _load(source, "Accelerate")
    if not isinstance(cfg, dict):
        raise JobError("an Accelerate config must be a mapping")
    out: dict[str, Any] = {}
    kind, mp = cfg.get("distributed_type", "NO"), cfg.get("mixed_precision", "no")
    kind = "NO" if kind is None else kind
    mp = "no" if mp is None else mp
    if not isinstance(kind, str) or not isinstance(mp, str):
        raise JobError(f"distributed_type and mixed_precision must be names; got {brief(kind)}, {brief(mp)}")
    kind, mp = kind.upper(), mp.lower()
    out["precision"] = {"bf16": "bf16-mixed", "fp16": "16-mixed", "no": "32-true", "fp8": "bf16-mixed"}.get(mp)
    if out["precision"] is None:
        raise JobError(f"mixed_precision must be no, fp16 or bf16; got {brief(mp)}")
    procs = cfg.get("num_processes")
    machines = cfg.get("num_machines", 1)
    if _given(procs):
        out["gpus"] = max(1, _int(procs, "num_processes"))
        m = max(1, _int(machines, "num_machines")) if _given(machines) else 1
        if out["gpus"] % m:
            raise JobError(f"num_processes ({out['gpus']}) must be a multiple of num_machines ({m})")
        out["gpus_per_node"] = out["gpus"] // m
    if kind == "FSDP":
        fc = _section(cfg, "fsdp_config", "")
        version = _int(fc.get("fsdp_version", 1), "fsdp_version")
        out["strategy"] = "fsdp2" if version == 2 else "fsdp"
        if version not in (1, 2):
            raise JobError(f"fsdp_version must be 1 or 2; got {version}")
        names = {1: "FULL_SHARD", 2: "SHARD_GRAD_OP", 3: "NO_SHARD", 4: "HYBRID_SHARD", 5: "HYBRID_SHARD"}
        strat = fc.get("fsdp_sharding_strategy")
        if strat is not None and not isinstance(strat, (str, int)) or isinstance(strat, bool):
            raise JobError(f"fsdp_sharding_strategy must be a name or 1-5; got {brief(strat)}")
        reshard = fc.get("fsdp_reshard_after_forward")
        if version == 1:
            if isinstance(strat, int):
                if strat not in names:
                    raise JobError(f"fsdp_sharding_strategy must be a name or 1-5; got {brief(strat)}")
                strat = names[strat]
            if isinstance(reshard, str) and strat is None:  # accelerate >= 1.6 spells v1 strategies here
                strat = reshard
            if strat:
                out["fsdp_sharding"] = str(strat).upper()
        else:
            if isinstance(reshard, bool):
                out["reshard_after_forward"] = reshard
            elif isinstance(reshard, str):
                out["reshard_after_forward"] = reshard.lower() in ("true", "full_shard")
        if fc.get("fsdp_offload_params") in (True, "true", "True"):
            out["offload"] = "optimizer+params"
        if fc.get("fsdp_activation_checkpointing") in (True, "true", "True"):
            out["gradient_checkpointing"] = True
    elif kind == "DEEPSPEED":
        dc = _section(cfg, "deepspeed_config", "")
        if dc.get("deepspeed_config_file"):
            ds = read_deepspeed_config(dc["deepspeed_config_file"])
            out.update({k: v for k, v in ds.items() if k != "precision" or out["precision"] == "32-true"})
        else:
            stage = _int(dc.get("zero_stage", 0), "zero_stage")
            if stage not in _ZERO_STRATEGY:
                raise JobError(f"zero_stage must be 0-3; got {stage}")
            out["strategy"] = _ZERO_STRATEGY[stage]
            od, pd = (dc.get(k) or "none" for k in ("offload_optimizer_device", "offload_param_device"))
            if not isinstance(od, str) or not isinstance(pd, str):
                raise JobError(f"offload devices must be none, cpu or nvme; got {brief(od)}, {brief(pd)}")
            od, pd = od.lower(), pd.lower()
            if pd not in ("none", ""):
                out["offload"], out["offload_device"] = "optimizer+params", pd
            elif od not in ("none", ""):
                out["offload"], out["offload_device"] = "optimizer", od
            if dc.get("gradient_accumulation_steps") is not None:
                pass  # accumulation does not move the per-step peak of one micro-batch
    elif kind in ("MULTI_GPU", "NO"):
        out["strategy"] = "ddp" if out.get("gpus", 1) > 1 else "single"
    else:
        raise JobError(f"distributed_type {brief(kind)} is not estimated (FSDP, DEEPSPEED, MULTI_GPU or NO)")
    return out


def ds_config_for_job(job: Job) -> dict[str, Any]:
    """The DeepSpeed config that runs ``job`` (strategy zero1/zero2/zero3) as memfit describes it.

    Precision: ``bf16-mixed`` -> ``bf16.enabled`` (16-bit parameters and gradients, fp32 master partition
    and optimizer states), ``16-mixed`` -> ``fp16.enabled``, ``bf16-true`` -> bf16 with
    ``bf16_master_weights_and_grads`` and ``bf16_optimizer_states``, ``32-true`` -> neither. The optimizer is
    the job's torch optimizer passed to ``deepspeed.initialize`` (``zero_allow_untested_optimizer``); with
    optimizer offload it runs on the host (``zero_force_ds_cpu_optimizer: false``).
    """
    if job.strategy not in ("zero1", "zero2", "zero3"):
        raise JobError(f"a DeepSpeed config is made for strategy zero1, zero2 or zero3, not {job.strategy}")
    stage = int(job.strategy[-1])
    zero: dict[str, Any] = {"stage": stage}
    for name in ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients"):
        v = getattr(job, name)
        if v is not None:
            zero[name] = v
    if stage == 3:
        for name in ("sub_group_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                     "stage3_max_live_parameters", "stage3_max_reuse_distance"):
            v = getattr(job, name)
            if v is not None:
                zero[name] = v
    if job.offload != "none":
        zero["offload_optimizer"] = {"device": job.offload_device, "pin_memory": True}
        if job.offload == "optimizer+params":
            zero["offload_param"] = {"device": job.offload_device, "pin_memory": True}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": job.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if job.precision == "bf16-mixed":
        cfg["bf16"] = {"enabled": True}
    elif job.precision == "bf16-true":
        cfg["bf16"] = {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    elif job.precision in ("16-mixed", "16-true"):
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return cfg
