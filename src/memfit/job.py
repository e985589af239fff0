"""The Job: everything that decides how much memory a run takes.

A job is plain data. It reads from and writes to YAML/JSON (:meth:`Job.from_dict`, :meth:`Job.to_dict`,
:func:`load_job`), CLI flags are only another way to fill it in, and an invalid job raises
:class:`~memfit.errors.JobError` in ``__post_init__`` so that it never reaches an engine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields

from .errors import JobError, brief

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

__all__ = ["Job", "load_job", "default_lengths", "DEFAULT_SEQ_LEN", "DEFAULT_PROMPT_LEN", "PRECISIONS", "OPTIMIZERS", "ATTENTIONS", "QUANTIZATIONS", "STRATEGIES"]

TASKS = ("train", "infer")
METHODS = ("full", "lora", "qlora")
#: Lightning's precision names (what they mean for the weights, grads and compute is in README).
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true")
OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum", "adafactor", "lion",
              "adamw-8bit", "paged-adamw-8bit", "paged-adamw")
ATTENTIONS = ("sdpa", "eager", "flash")
KV_CACHE_DTYPES = ("auto", "fp32", "fp16", "bf16", "fp8")
QUANTIZATIONS = ("none", "int8", "nf4", "fp4", "fp8", "gptq", "awq")
STRATEGIES = ("single", "ddp", "fsdp", "fsdp2", "zero1", "zero2", "zero3")
OFFLOADS = ("none", "optimizer", "optimizer+params")
OFFLOAD_DEVICES = ("cpu", "nvme")
#: FSDP1's ``ShardingStrategy`` names (torch.distributed.fsdp.ShardingStrategy).
FSDP_SHARDINGS = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
#: DeepSpeed ZeRO options a job may set, by their ds_config names (None = DeepSpeed's default).
ZERO_OPTIONS = ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
                "sub_group_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                "stage3_max_live_parameters", "stage3_max_reuse_distance")


#: Largest value a count field takes. Beyond these no run exists and the arithmetic stops meaning anything
#: (2**31 tokens per sequence, 2**20 GPUs); the ZeRO element counts and bucket sizes go to 2**50.
_MAXIMA = {"gpus": 1 << 20, "gpus_per_node": 1 << 20, "tensor_parallel": 1 << 20, "pipeline_parallel": 1 << 20,
           "expert_parallel": 1 << 20, "pipeline_microbatches": 1 << 20}
_MAX_COUNT = (1 << 31) - 1
_MAX_ELEMENTS = 1 << 50


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise JobError(f"{name} must be one of {', '.join(allowed)}; got {brief(value)}")


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise JobError(f"{name} must be a whole number >= {minimum}; got {brief(value)}")
    maximum = _MAXIMA.get(name, _MAX_ELEMENTS if name in ZERO_OPTIONS else _MAX_COUNT)
    if value > maximum:
        raise JobError(f"{name} must be at most {maximum:,}; got {brief(value)}")


_DTYPE_PRECISION = {"bfloat16": "bf16-true", "bf16": "bf16-true", "float16": "16-true", "fp16": "16-true",
                    "half": "16-true", "float32": "32-true", "fp32": "32-true", "float": "32-true"}


#: The training sequence and inference prompt a job gets when it names none, each cut to what the model's
#: positions take (a learned table fails past its last row; a rotary model was not trained longer).
DEFAULT_SEQ_LEN = 2048
DEFAULT_PROMPT_LEN = 512


def _position_limit(model: Any) -> int | None:
    if not isinstance(model, str):
        return None
    from .models import position_limit

    found = position_limit(model)
    return found[0] if found else None


def default_lengths(data: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """``data`` (job fields) with ``seq_len`` / ``prompt_len`` filled where left out or null: the defaults cut
    to ``limit``, the longest sequence the model's positions take (None: unknown, the plain defaults). For a
    caller that resolves the model itself (a pasted config): ``spec_position_limit(spec)[0]``."""
    out = dict(data)
    if out.get("seq_len") is None:
        out["seq_len"] = min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
    if out.get("prompt_len") is None:
        new = out.get("new_tokens", 0)
        new = new if isinstance(new, int) and not isinstance(new, bool) else 0
        room = limit - new if limit else 0
        out["prompt_len"] = min(DEFAULT_PROMPT_LEN, room) if limit and room >= 1 else DEFAULT_PROMPT_LEN
    return out


def _default_lengths(job: "Job") -> None:
    """Fill ``seq_len`` / ``prompt_len`` left out (None) with the defaults the model can take."""
    if job.seq_len is not None and job.prompt_len is not None:
        return
    filled = default_lengths({"seq_len": job.seq_len, "prompt_len": job.prompt_len, "new_tokens": job.new_tokens},
                             _position_limit(job.model))
    job.seq_len, job.prompt_len = filled["seq_len"], filled["prompt_len"]


def _inference_precision(model: Any) -> str:
    """The precision an inference job runs in when none is given: the checkpoint's dtype."""
    if not isinstance(model, str):
        return "bf16-true"
    from .models import checkpoint_dtype

    dtype = checkpoint_dtype(model)
    return _DTYPE_PRECISION.get(dtype.lower(), "bf16-true") if dtype else "bf16-true"


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise JobError(f"{name} must be true or false; got {brief(value)}")


@dataclass(kw_only=True, slots=True)
class Job:
    """One training, fine-tuning or inference run, as far as memory is concerned."""

    model: str
    """Registry name, path to a config.json (or a folder holding one), or a Hugging Face Hub id."""
    task: str = "train"
    """``train`` (forward, backward, optimizer step) or ``infer`` (``generate()`` or one forward)."""
    method: str = "full"
    """``full`` fine-tuning, ``lora`` adapters on a frozen base, or ``qlora`` (lora + nf4 + double quant)."""
    lora_rank: int = 16
    """LoRA rank r (adapter A is r x in, B is out x r)."""
    lora_alpha: int | None = None
    """LoRA alpha; does not change memory, kept so the job reproduces a PEFT config."""
    lora_targets: str | list[str] = "all-linear"
    """``all-linear`` (every linear in the blocks, not the head) or a list of module names (``q_proj``...)."""
    precision: str | None = None
    """Lightning's names: 32-true, 16-mixed, bf16-mixed, bf16-true, 16-true. Left out: training runs
    bf16-mixed; inference runs in the checkpoint's ``torch_dtype`` (bfloat16 -> bf16-true, float16 ->
    16-true, float32 -> 32-true; bf16-true when the config is not at hand), as ``from_pretrained`` loads it."""
    optimizer: str = "adamw"
    """adamw, adam, sgd, sgd-momentum, adafactor, lion; bitsandbytes adamw-8bit, paged-adamw-8bit, paged-adamw."""
    batch_size: int = 1
    """Micro-batch per GPU (sequences per forward)."""
    seq_len: int | None = None
    """Tokens per training sequence. Left out: 2048, or the model's position limit where that is shorter
    (GPT-2's 1024, BERT's 512: :data:`DEFAULT_SEQ_LEN`, :func:`memfit.models.position_limit`)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in backward; keep only the layer inputs."""
    attention: str = "sdpa"
    """sdpa (PyTorch scaled_dot_product_attention), eager (keeps the score matrix), flash (flash-attn 2)."""
    prompt_len: int | None = None
    """Inference: prompt tokens per sequence. Left out: 512, or what the model's position limit leaves after
    ``new_tokens`` where that is less (:data:`DEFAULT_PROMPT_LEN`)."""
    new_tokens: int = 0
    """Inference: tokens generated per sequence; 0 means one forward over the prompt (prefill), no cache."""
    kv_cache_dtype: str = "auto"
    """Inference: dtype of the KV cache; auto follows the compute dtype."""
    quantization: str = "none"
    """Weight format of the frozen base: none, int8, nf4, fp4, fp8, gptq, awq."""
    double_quant: bool | None = None
    """bitsandbytes 4-bit: quantize the absmax constants too (QLoRA's double quantization). Left out, it
    follows the method: true for qlora, false otherwise; an explicit false is kept."""
    quant_group_size: int = 64
    """Block/group size of the quantization scales (bitsandbytes 4-bit blocksize 64; GPTQ/AWQ groups 128)."""
    gpus: int = 1
    """Total number of GPUs."""
    gpus_per_node: int | None = None
    """GPUs in one node (defaults to ``gpus``)."""
    strategy: str = "single"
    """single, ddp, fsdp, fsdp2, zero1, zero2, zero3."""
    offload: str = "none"
    """none, optimizer, optimizer+params."""
    offload_device: str = "cpu"
    """Where offloaded state goes: cpu (pinned host memory) or nvme (ZeRO-Infinity, stage 3 only)."""
    fsdp_sharding: str = "FULL_SHARD"
    """strategy fsdp (FSDP1): FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD (shard in a node, replicate across)
    or NO_SHARD (torch.distributed.fsdp.ShardingStrategy)."""
    reshard_after_forward: bool = True
    """strategy fsdp2: ``fully_shard(reshard_after_forward=...)``; false keeps every layer's gathered
    parameters from its forward to its backward (the root module never reshards after forward)."""
    gradient_as_bucket_view: bool = False
    """strategy ddp: ``DistributedDataParallel(gradient_as_bucket_view=...)``; true makes ``.grad`` views
    into the reducer's buckets instead of separate tensors."""
    bucket_cap_mb: int = 25
    """strategy ddp: ``DistributedDataParallel(bucket_cap_mb=...)``, the reducer's bucket size."""
    reduce_bucket_size: int | None = None
    """DeepSpeed ZeRO ``reduce_bucket_size`` in elements (default 5e8)."""
    allgather_bucket_size: int | None = None
    """DeepSpeed ZeRO-1/2 ``allgather_bucket_size`` in elements (default 5e8)."""
    overlap_comm: bool | None = None
    """DeepSpeed ZeRO ``overlap_comm`` (default: true for stage 3, false for 1 and 2)."""
    contiguous_gradients: bool | None = None
    """DeepSpeed ZeRO ``contiguous_gradients`` (default true)."""
    sub_group_size: int | None = None
    """DeepSpeed ZeRO-3 ``sub_group_size``: elements the optimizer steps at a time (default 1e9)."""
    stage3_prefetch_bucket_size: int | None = None
    """DeepSpeed ZeRO-3 parameters fetched ahead, in elements (default 5e7)."""
    stage3_param_persistence_threshold: int | None = None
    """DeepSpeed ZeRO-3: parameters with at most this many elements stay gathered (default 1e5)."""
    stage3_max_live_parameters: int | None = None
    """DeepSpeed ZeRO-3: most gathered parameters alive at once, in elements (default 1e9)."""
    stage3_max_reuse_distance: int | None = None
    """DeepSpeed ZeRO-3: a parameter used again within this many elements is not released (default 1e9)."""
    tensor_parallel: int = 1
    """Megatron-style tensor parallel degree (attention heads and MLP columns split across GPUs)."""
    pipeline_parallel: int = 1
    """Pipeline stages (layers split across GPUs)."""
    pipeline_microbatches: int | None = None
    """Micro-batches in flight on the first pipeline stage (1F1B keeps ``pipeline_parallel`` of them: default)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (Korthikanti et al. 2022): norms and dropout shard the sequence over
    the tensor-parallel group; needs tensor_parallel > 1."""
    expert_parallel: int = 1
    """Experts of MoE layers split across this many GPUs (each holds num_experts / expert_parallel)."""
    expandable_segments: bool = False
    """PyTorch's allocator setting ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: segments grow by
    mapping pages instead of one ``cudaMalloc`` per segment, which removes most fragmentation."""

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if not isinstance(self.model, str) or not self.model.strip():
            raise JobError("model must be a registry name, a config.json path or a Hub id (see `memfit models`)")
        _choice("task", self.task, TASKS)
        _choice("method", self.method, METHODS)
        if self.precision is None:
            self.precision = "bf16-mixed" if self.task == "train" else _inference_precision(self.model)
        _choice("precision", self.precision, PRECISIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("attention", self.attention, ATTENTIONS)
        _choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _choice("quantization", self.quantization, QUANTIZATIONS)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("offload", self.offload, OFFLOADS)
        _positive_int("batch_size", self.batch_size)
        _default_lengths(self)
        _positive_int("seq_len", self.seq_len)
        _positive_int("prompt_len", self.prompt_len)
        _positive_int("new_tokens", self.new_tokens, minimum=0)
        _positive_int("quant_group_size", self.quant_group_size)
        _positive_int("gpus", self.gpus)
        # lora fields are checked whatever the method: they are part of the job and go into its JSON
        _positive_int("lora_rank", self.lora_rank)
        alpha = self.lora_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or (isinstance(alpha, int) and abs(alpha) > _MAX_COUNT)
                                  or (isinstance(alpha, float) and not math.isfinite(alpha))):
            raise JobError(f"lora_alpha must be a number or left out; got {brief(self.lora_alpha)}")
        if isinstance(self.lora_targets, str):
            if self.lora_targets != "all-linear":
                self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        if isinstance(self.lora_targets, (list, tuple)):
            targets = list(self.lora_targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise JobError("lora_targets must be 'all-linear' or a non-empty list of module names like [q_proj, v_proj]")
            self.lora_targets = targets
        elif not isinstance(self.lora_targets, str):
            raise JobError("lora_targets must be 'all-linear' or a list of module names like [q_proj, v_proj]; "
                           f"got {brief(self.lora_targets)}")
        if self.double_quant is None:  # the method's default: QLoRA's recipe quantizes the constants too
            self.double_quant = self.method == "qlora"
        for flag in ("gradient_checkpointing", "double_quant", "expandable_segments"):
            _flag(flag, getattr(self, flag))
        if self.method == "qlora":
            if self.quantization == "none":
                self.quantization = "nf4"
            elif self.quantization not in ("nf4", "fp4"):
                raise JobError(f"method qlora quantizes the base to nf4 or fp4, not {self.quantization}")
        if self.gpus_per_node is None:
            self.gpus_per_node = self.gpus
        _positive_int("gpus_per_node", self.gpus_per_node)
        if self.gpus_per_node > self.gpus:
            raise JobError(
                f"gpus_per_node ({self.gpus_per_node}) is more than gpus ({self.gpus}); "
                "gpus is the total over all nodes")
        if self.gpus % self.gpus_per_node:
            raise JobError(f"gpus ({self.gpus}) must be a multiple of gpus_per_node ({self.gpus_per_node})")
        self._check_parallel()
        if self.strategy == "single" and self.gpus > 1:
            self.strategy = "ddp"
        if self.attention == "flash" and self.precision == "32-true":
            raise JobError("attention flash (flash-attn 2) runs in fp16 or bf16 only; with 32-true use sdpa or "
                           "eager, or pick a 16-bit precision")
        if self.strategy != "single" and self.task == "infer":
            raise JobError("multi-GPU strategies apply to training; for inference use gpus: 1")
        if self.task == "train" and self.quantization in ("gptq", "awq", "fp8") and self.method == "full":
            raise JobError(f"{self.quantization} weights cannot be fully fine-tuned; use method: lora or task: infer")
        if self.task == "train" and self.quantization != "none" and self.method == "full":
            raise JobError(f"a {self.quantization} base is frozen; fine-tune it with method: lora (QLoRA) instead of full")

    def _check_parallel(self) -> None:
        """Validate the multi-GPU fields (engines, offload, model parallelism)."""
        _choice("offload_device", self.offload_device, OFFLOAD_DEVICES)
        if isinstance(self.fsdp_sharding, str):
            self.fsdp_sharding = self.fsdp_sharding.strip().upper().replace("-", "_")
        _choice("fsdp_sharding", self.fsdp_sharding, FSDP_SHARDINGS)
        for flag in ("reshard_after_forward", "gradient_as_bucket_view", "sequence_parallel"):
            _flag(flag, getattr(self, flag))
        for flag in ("overlap_comm", "contiguous_gradients"):
            v = getattr(self, flag)
            if v is not None and not isinstance(v, bool):
                raise JobError(f"{flag} must be true, false or left out (DeepSpeed's default); got {brief(v)}")
        _positive_int("bucket_cap_mb", self.bucket_cap_mb)
        for name in ZERO_OPTIONS:
            v = getattr(self, name)
            if name in ("overlap_comm", "contiguous_gradients") or v is None:
                continue
            if isinstance(v, float) and v.is_integer() and abs(v) <= _MAX_ELEMENTS:
                v = int(v)
                setattr(self, name, v)
            _positive_int(name, v, minimum=0 if name.startswith("stage3_") else 1)
        for name in ("tensor_parallel", "pipeline_parallel", "expert_parallel"):
            _positive_int(name, getattr(self, name))
        if self.pipeline_microbatches is not None:
            _positive_int("pipeline_microbatches", self.pipeline_microbatches)
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if self.gpus % model_parallel:
            raise JobError(f"gpus ({self.gpus}) must be a multiple of tensor_parallel x pipeline_parallel "
                           f"({self.tensor_parallel} x {self.pipeline_parallel})")
        dp = self.gpus // model_parallel
        if self.expert_parallel > 1 and (dp * self.tensor_parallel) % self.expert_parallel:
            raise JobError(f"expert_parallel ({self.expert_parallel}) must divide the data x tensor parallel "
                           f"GPUs ({dp * self.tensor_parallel})")
        if self.sequence_parallel and self.tensor_parallel < 2:
            raise JobError("sequence_parallel splits the sequence over the tensor-parallel group; "
                           "it needs tensor_parallel >= 2")
        if self.offload != "none":
            if self.strategy in ("single", "ddp"):
                raise JobError(f"offload {self.offload} needs a sharding engine (fsdp, fsdp2, zero1, zero2, zero3), "
                               f"not {self.strategy}")
            if self.offload == "optimizer+params" and self.strategy in ("zero1", "zero2"):
                raise JobError("offload optimizer+params (parameter offload) needs zero3, fsdp or fsdp2; "
                               f"{self.strategy} offloads the optimizer only")
        if self.offload_device == "nvme" and self.strategy != "zero3":
            raise JobError("offload_device nvme is ZeRO-Infinity: strategy zero3 only")

    # ----------------------------------------------------------------- io
    @property
    def is_lora(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def tokens(self) -> int:
        """Tokens per forward: batch x seq_len for training, batch x prompt_len for inference."""
        return self.batch_size * (self.seq_len if self.task == "train" else self.prompt_len)

    def with_batch(self, batch_size: int) -> "Job":
        """A copy at another micro-batch, not validated again: for callers that sweep the micro-batch of a job
        already validated and pass a whole number >= 1 (the planner). ``copy.copy`` and then the batch, faster."""
        j = object.__new__(Job)
        for name in Job.__slots__:
            setattr(j, name, getattr(self, name))
        j.batch_size = batch_size
        return j

    def replace(self, **changes: Any) -> "Job":
        """A copy with some fields changed (validated again)."""
        data = self.to_dict()
        data.update(changes)
        return Job.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, list) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Job":
        if not isinstance(data, dict):
            raise JobError("a job must be a mapping of field: value (see README, 'Jobs')")
        known = {f.name for f in fields(cls)}
        odd = [k for k in data if not isinstance(k, str)]
        if odd:
            raise JobError(f"job field names must be text; got {', '.join(brief(k) for k in odd[:3])} "
                           "(quote it in YAML, or drop it)")
        unknown = sorted(set(data) - known)
        if unknown:
            shown = ", ".join(u if len(u) <= 40 else brief(u, 40) for u in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise JobError(f"unknown job field(s) {shown}; allowed: {', '.join(sorted(known))}")
        if "model" not in data:
            raise JobError("a job needs a model: a registry name (see `memfit models`), a config.json path or a Hub id")
        data = dict(data)
        for key in ("batch_size", "seq_len", "prompt_len", "new_tokens", "lora_rank", "gpus", "gpus_per_node",
                    "quant_group_size", "bucket_cap_mb", "tensor_parallel", "pipeline_parallel",
                    "pipeline_microbatches", "expert_parallel", *ZERO_OPTIONS):
            v = data.get(key)
            if isinstance(v, str) and v.strip().isascii() and v.strip().isdigit() and len(v.strip()) < 30:
                data[key] = int(v)
        try:
            return cls(**data)
        except TypeError as exc:  # pragma: no cover - guarded by the unknown-field check above
            raise JobError(str(exc)) from None


def read_config_file(path: str | Path, what: str, *, default_format: str, not_utf8: str) -> Any:
    """What a YAML or JSON file holds (``.json``: JSON, ``.yaml`` / ``.yml``: YAML, any other name:
    ``default_format``, ``"yaml"`` or ``"json"``). Every way the file can be missing, unreadable, not text or
    not parseable is a one-line :class:`JobError` naming it as ``what`` (``job file``, ``DeepSpeed config``);
    ``not_utf8`` ends the line for a file that is not UTF-8 text."""
    from pathlib import Path  # here, not at the top: a start-up without a file to read does without pathlib

    p = Path(path)
    try:
        if not p.is_file():
            raise JobError(f"{what} {brief(str(p), 200)} does not exist")
        raw = p.read_bytes()
    except JobError:
        raise
    except (OSError, ValueError) as exc:  # name too long, a NUL in the name, no permission
        raise JobError(f"cannot read {what} {brief(str(p), 200)}: {type(exc).__name__}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JobError(f"{what} {str(p)!r} is not UTF-8 text{not_utf8}") from None
    suffix = p.suffix.lower()
    as_yaml = suffix in (".yaml", ".yml") or (suffix != ".json" and default_format == "yaml")
    try:
        if as_yaml:
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except RecursionError:
        raise JobError(f"cannot parse {what} {str(p)!r}: nested too deep") from None
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line
        first = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        raise JobError(f"cannot parse {what} {str(p)!r}: {first}") from None


def load_job(path: str | Path) -> Job:
    """Read a job from a YAML or JSON file."""
    data = read_config_file(path, "job file", default_format="yaml", not_utf8="; a job is a YAML or JSON file")
    if isinstance(data, dict) and "job" in data and isinstance(data["job"], dict):
        data = data["job"]  # a measurement record holds its job under "job"
    return Job.from_dict(data)
