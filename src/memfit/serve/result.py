"""The serving estimate's result type and the engine settings it is computed for."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import JobError, brief

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from typing import Any

ENGINES = ("vllm", "sglang")
#: Largest count a setting takes (tokens, sequences, slots, ranks), as :class:`memfit.job.Job`'s; parallel
#: degrees stop at 2**20 GPUs, as the job's do.
MAX_COUNT = (1 << 31) - 1
MAX_PARALLEL = 1 << 20
QUANTIZATIONS = ("none", "fp8", "awq", "gptq", "bitsandbytes", "w8a8", "w4a16", "int8", "nf4", "mxfp4")


def parse_version(text: str | None, default: str) -> tuple[int, int, int]:
    """``"0.6.3.post1"`` -> (0, 6, 3); ``"0.11"`` -> (0, 11, 0); ``"v0.8.5"`` -> (0, 8, 5); None -> ``default``."""
    import re

    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", (text or default))
    if not m:
        raise JobError(f"engine_version must look like 0.6, 0.8.5 or 0.4.3.post2; got {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


@dataclass(kw_only=True, slots=True)
class ServeConfig:
    """A serving engine's launch settings, as far as memory is concerned (the engines' own flag names).
    ``None`` means "the engine's default for this version, GPU and model"."""

    engine: str = "vllm"
    engine_version: str | None = None
    """vLLM ``0.5``-``0.11`` (default 0.11), SGLang ``0.3``-``0.5`` (default 0.5)."""
    engine_mode: str | None = None
    """vLLM ``v0`` or ``v1`` (default: v1 from 0.8, v0 before)."""
    gpu_memory_bytes: int
    """What the driver reports as the card's total (``torch.cuda.mem_get_info()[1]``)."""
    gpu_name: str = ""
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    """vLLM ``--data-parallel-size``: independent engines of ``tensor_parallel x pipeline_parallel`` GPUs
    each, with the same accounting; their MoE layers are split over all ``data_parallel x tensor_parallel``
    ranks (by experts with ``enable_expert_parallel``, else by each expert's width)."""
    enable_expert_parallel: bool = False
    enable_lora: bool = False
    """vLLM ``--enable-lora``: ``max_loras`` adapter slots of rank ``max_lora_rank`` are stacked beside
    every LoRA-capable linear (:func:`memfit.serve.memory.lora_bytes_on_rank`)."""
    max_loras: int = 1
    max_lora_rank: int = 16
    mla_cuda_mem_align_kv_cache: bool = False
    """vLLM V0 ``VLLM_MLA_CUDA_MEM_ALIGN_KV_CACHE=1`` (PR #12676, on by default in the V0 releases between it
    and PR #14842): every MLA cache entry starts on a 256-byte boundary, so a 576-element bf16 latent takes
    640 elements (``worker/cache_engine.py::get_cache_block_size``). Off by default here."""
    gpu_memory_utilization: float | None = None
    mem_fraction_static: float | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    """None: what the model's config.json says (``quantization_config``), else unquantized."""
    dtype: str = "auto"
    enforce_eager: bool = False
    block_size: int | None = None
    cuda_graph_max_bs: int | None = None
    disable_hybrid_kv_cache_manager: bool = False
    sampler: str | None = None
    """vLLM V1's top-k/top-p sampler in the profile run: ``native`` (PyTorch sort, what V1 falls back to when
    FlashInfer is not installed; the pip wheels of 0.10-0.11 do not require it) or ``flashinfer``
    (``Using FlashInfer for top-p & top-k sampling.`` in the log). None: ``native``. Only the profile's
    sampler moment moves (:func:`memfit.serve.memory.sampler_bytes_per_logit`); V0 and SGLang ignore it."""
    text_only: bool = False
    """A multimodal checkpoint served without its vision tower (vLLM ``--limit-mm-per-prompt`` with every
    modality at 0, in versions whose model code then skips building the tower): only the text model's
    weights are loaded. False: the tower and projector are loaded, as both engines do by default."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise JobError(f"engine must be vllm or sglang; got {self.engine!r}")
        for name in ("tensor_parallel", "pipeline_parallel", "data_parallel", "max_loras", "max_lora_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise JobError(f"{name} must be a whole number >= 1; got {brief(v)}")
            top = MAX_COUNT if name == "max_lora_rank" else MAX_PARALLEL
            if v > top:
                raise JobError(f"{name} must be at most {top:,}; got {brief(v)}")
        if not isinstance(self.gpu_memory_bytes, int) or self.gpu_memory_bytes <= 0:
            raise JobError(f"gpu memory must be a positive size; got {self.gpu_memory_bytes!r}")
        for name in ("gpu_memory_utilization", "mem_fraction_static"):
            v = getattr(self, name)
            if v is not None and not (0 < v <= 1):
                raise JobError(f"{name} must be in (0, 1]; got {v!r}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "cuda_graph_max_bs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise JobError(f"{name} must be a whole number >= 1; got {brief(v)}")
            if v is not None and v > MAX_COUNT:
                raise JobError(f"{name} must be at most {MAX_COUNT:,}; got {brief(v)}")
        if self.engine_mode not in (None, "v0", "v1"):
            raise JobError(f"engine_mode must be v0 or v1; got {self.engine_mode!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise JobError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "half", "bf16", "fp16", "float32"):
            raise JobError(f"dtype must be auto, bfloat16, float16 or float32; got {self.dtype!r}")
        if self.sampler not in (None, "native", "flashinfer"):
            raise JobError(f"sampler must be native or flashinfer; got {self.sampler!r}")
        parse_version(self.engine_version, "0.0")

    def replace(self, **changes: Any) -> "ServeConfig":
        return dataclasses.replace(self, **changes)


@dataclass(kw_only=True)
class ServeEstimate:
    """What the engine will do on the most constrained rank (bytes; GiB only when printed)."""

    engine: str
    engine_version: str
    engine_mode: str | None
    model: str
    gpu_memory_bytes: int
    tensor_parallel: int
    pipeline_parallel: int
    utilization: float
    """``gpu_memory_utilization`` (vLLM) or ``mem_fraction_static`` (SGLang) used."""
    utilization_source: str
    """``flag`` or how the engine's default was chosen."""
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_dtype: str
    quantization: str
    weights_bytes: int
    activation_peak_bytes: int
    activation_peak_moment: str
    non_torch_bytes: int
    cuda_graph_bytes: int
    cuda_graph_deducted: bool
    kv_cache_bytes: int
    kv_bytes_per_token: int
    """KV bytes of one token over the rank's layers (full-size layers; sliding windows count fully)."""
    block_size: int
    num_gpu_blocks: int
    kv_cache_tokens: int
    max_concurrency: float
    max_model_len_fits: int
    """The largest max_model_len whose one request fits in this KV cache."""
    fits: bool
    """One request of ``max_model_len`` fits (vLLM refuses to start otherwise)."""
    rule: str
    """Which version's accounting was applied."""
    data_parallel: int = 1
    """vLLM ``--data-parallel-size``: this many engines, each with this estimate's KV cache (GPUs in all:
    ``data_parallel x tensor_parallel x pipeline_parallel``)."""
    lora_bytes: int = 0
    """vLLM ``--enable-lora``: the adapter slots' bytes on the worst rank (in ``weights_bytes`` where the
    engine measures them with the weights, V1 and V0 before v0.6.5; beside them in V0 v0.6.5+)."""
    lora_in_weights: bool = False
    """Whether ``lora_bytes`` is part of ``weights_bytes`` (deducted from the KV cache)."""
    ranks: list[dict[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
