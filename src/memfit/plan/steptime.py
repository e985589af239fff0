"""Step-time model: seconds per optimizer step of a job on a card, pure Python (microseconds).

The time is a sum of kinds of work, each its count divided by the card's peak rate for it (catalog), times
one fitted factor per kind (the inverse of the efficiency that kind reaches; fitted on measured H100 steps
by ``validation/fit_steptime.py``, stored in ``steptime_fit.json``):

- ``matmul16`` / ``matmul32``: the linear layers' FLOPs (2 per multiply-add) over the dense 16-bit or fp32
  rate. Forward 2*P*T; backward 4*P*T for trained weights, 2*P*T where only input gradients flow (LoRA's
  frozen base, the ``grad(x) = grad(y) W`` product); a checkpointed layer runs its forward again.
  PyTorch's fp32 matmul defaults to full fp32 (``torch.backends.cuda.matmul.allow_tf32`` is False).
- ``attention``: the score and value products, 4*T*S*d per layer forward, halved for causal masks on the
  fused kernels (sdpa/flash skip masked tiles), backward 2.5x forward (FlashAttention-2 paper, Dao 2023).
- ``elementwise``: memory-bound traffic (norms, activations, residual adds, softmax of eager attention,
  the fp32 logits and cross-entropy) over HBM bandwidth.
- ``optimizer``: the bytes ``optimizer.step()`` reads and writes (PyTorch's foreach AdamW: param, grad,
  exp_avg, exp_avg_sq) over HBM bandwidth.
- ``dequant``: bitsandbytes 4/8-bit layers rebuild a 16-bit weight on every use (forward, backward,
  recompute): written and read once per use, over HBM bandwidth.
- ``launch``: a per-layer-pass cost (kernel launches and Python between them), the floor small models hit: the
  forward and a checkpointed layer's recompute.
- ``launch_bwd``: the same kernels counted twice for the backward, at their own cost: autograd's engine launches
  them from C++, without the forward's Python between ops.
- ``decode``: generation reads every weight and the KV cache once per new token; ``decode_launch`` is
  its per-layer, per-token launch cost (one token's kernels are tiny, so launches dominate small models).
- ``module_launch``: per LoRA-wrapped or bitsandbytes linear and pass, the extra small kernels they run.
- ``adapter``: per token, the memory traffic of each LoRA-wrapped linear's side branch (peft's ``Linear.forward``:
  the input read again for ``lora_A``, the rank-sized product, ``lora_B``'s output and its add into the base
  output; backward twice that), over HBM bandwidth. It grows with the tokens, unlike ``module_launch``.
- ``quant_io``: per token, what a bitsandbytes linear moves beyond a 16-bit one: QLoRA's fp32 norms and
  layer-norm outputs (``prepare_model_for_kbit_training``) make the quantized linears' inputs and outputs
  fp32 (``Linear4bit.forward`` casts the input to the compute dtype and the output back), counted as the
  in- and out-features' fp32 bytes per token and pass.
- ``int8_launch``: per LLM.int8 linear and pass, what bitsandbytes' ``MatMul8bitLt`` runs beyond one GEMM
  (row-wise quantization of the input, the int8 GEMM into int32, the dequantization of its output, the
  outlier columns): a host cost per call, like ``module_launch`` but several kernels more.
- ``optimizer_launch``: per trainable parameter tensor, the host's share of ``optimizer.step()``: PyTorch's
  foreach AdamW / SGD / Adam group ~100 tensors per kernel (counted as 1/20 of a tensor each), while
  bitsandbytes' 8-bit and paged optimizers, Adafactor and Lion update one tensor at a time.
- ``paged``: bitsandbytes' paged optimizers keep their states in CUDA managed memory; the step touches them
  through the unified-memory driver, counted as the state bytes over the PCIe rate (the page-migration path).
- ``step``: a fixed cost per step.

``launch`` counts the kernels of one layer pass from the block's structure (:func:`_layer_kernels`: each
RMSNorm is several elementwise kernels in eager PyTorch, a LayerNorm one; q/k norms; each linear; the rotary
embedding; attention; the activation; residual adds), so a layer with four norms and q/k norms (Gemma 3)
costs more host time than a Llama layer of the same width.

The host and the GPU work at the same time (kernels are queued asynchronously): the launch-bound kinds
(``launch``, ``decode_launch``, ``module_launch``: the host's time) and the rate-bound kinds (the GPU's) do not
add up but overlap; a micro-batch takes ``(host**p + gpu**p) ** (1/p)`` (``p`` = the fitted ``overlap``: 1 is a
plain sum, large ``p`` the larger of the two), so a small batch is as slow as its launches and a large one as
its arithmetic. The optimizer step, the fixed cost, collectives and offload are added.

Tensor parallelism (``tensor_parallel`` t > 1, Megatron-style as the memory estimate lays it out): each GPU
does 1/t of the linear layers' and attention's arithmetic, of the MLP's and the vocabulary's elementwise
traffic and of the optimizer's bytes (the norms and residual adds are replicated), and the layer's outputs
are summed over the t GPUs: two all-reduces of the activations (``T x hidden``) per layer forward, two in
backward, two more in a checkpointed layer's recompute, ring-wise (2(t-1)/t of the bytes) over the card's
link and on the critical path (``tp_comm``: not overlapped, unfitted). ``tokens_per_second`` is the whole
job's: a replica's tokens times the data-parallel replicas (``gpus / (tensor_parallel x pipeline_parallel)``),
what ``memfit measure`` records for a multi-GPU run; the planner ranks candidates by it (they all keep one
global batch).

Multi-GPU collectives and offload are not fitted (no timed multi-GPU runs yet): DDP and ZeRO-1/2 reduce
gradients ring-wise (2(n-1)/n of the gradient bytes), overlapped with backward as the bucketed reducer
does; FSDP/ZeRO-3 also all-gather parameters in forward and backward, prefetched (overlapped with the
layer's compute); the part that does not hide behind compute is added. Offload moves gradients and
parameters over PCIe each step and runs the CPU optimizer at an assumed 10 GB/s of state traffic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = ["StepTime", "step_time", "features", "KINDS", "load_factors", "BatchTimer", "annotate"]

KINDS = ("matmul16", "matmul32", "attention", "elementwise", "optimizer", "dequant", "launch", "launch_bwd", "decode",
         "decode_launch", "module_launch", "adapter", "quant_io", "int8_launch", "optimizer_launch", "paged", "tp_comm", "step")
_HOST = ("launch", "launch_bwd", "decode_launch", "module_launch", "int8_launch")  # the host's time per micro-batch
_ONCE = ("optimizer", "optimizer_launch", "paged", "step")  # once per optimizer step, whatever the accumulation
_FIT = Path(__file__).with_name("steptime_fit.json")
# defaults before any fit: efficiencies people usually see (factor = 1/efficiency)
_DEFAULT = {"matmul16": 1 / 0.6, "matmul32": 1 / 0.8, "attention": 1 / 0.4, "elementwise": 1 / 0.6,
            "optimizer": 1 / 0.5, "dequant": 1 / 0.5, "launch": 3e-4, "launch_bwd": 1e-4, "decode": 1 / 0.6, "decode_launch": 3e-4, "module_launch": 1e-5, "adapter": 1 / 0.6, "quant_io": 1 / 0.6,
            "int8_launch": 1e-4, "optimizer_launch": 2e-5, "paged": 1.0, "tp_comm": 1.0, "step": 5e-3, "overlap": 1.0}


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step (one micro-batch; gradient accumulation multiplies the compute part),
    tokens per second, and the seconds each kind of work contributes."""

    seconds: float
    tokens_per_second: float
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """One line: the kind of work that costs the most."""
        if not self.parts:
            return ""
        k = max(self.parts, key=self.parts.get)
        return f"{k} {100 * self.parts[k] / self.seconds:.0f}%"


def combine(parts: dict[str, float], overlap: float) -> float:
    """Seconds of one step from its parts (see the module note): host and GPU time per micro-batch overlap
    (``overlap`` is the exponent ``p``), the once-per-step kinds and anything else (collectives, offload) add."""
    host = gpu = other = 0.0
    for n, v in parts.items():
        if n in _HOST:
            host += v
        elif n in _ONCE or n not in KINDS:
            other += v
        else:
            gpu += v
    p = overlap if overlap and overlap > 0 else 1.0
    if p == 1.0 or host <= 0.0 or gpu <= 0.0:
        micro = host + gpu
    else:
        m = max(host, gpu)
        micro = m * ((host / m) ** p + (gpu / m) ** p) ** (1.0 / p)
    return micro + other


@lru_cache(maxsize=1)
def load_factors() -> dict[str, float]:
    """The fitted factor per kind (``steptime_fit.json``), defaults for kinds it lacks."""
    out = dict(_DEFAULT)
    if _FIT.exists():
        out.update(json.loads(_FIT.read_text())["factors"])
    return out


def _bytes16(precision: str) -> int:
    return 4 if precision == "32-true" else 2


def _linear_params(spec) -> tuple[float, float]:
    """(active linear parameters per token in all blocks, of which in quantizable block linears): routed
    experts count ``top_k`` of ``num_experts``."""
    total = 0.0
    for b in spec.blocks:
        per = 0.0
        for lin in b.linears:
            n = lin.in_features * lin.out_features
            if lin.role.startswith("expert") and b.moe is not None and b.moe.num_experts:
                per += n * lin.count * b.moe.top_k / b.moe.num_experts
            else:
                per += n * lin.count
        total += per * b.count
    return total, total


_FOREACH = frozenset({"adamw", "adam", "sgd", "sgd-momentum"})


def _layer_kernels(b) -> float:
    """Kernels one forward pass of a layer of block ``b`` launches in eager PyTorch (a count for the host's
    time, see ``launch``): RMSNorm ~6 (pow, mean, add, rsqrt, mul, cast), LayerNorm 1, each linear module 1
    (+1 with bias), rotary 6, attention 3, the activation 2 (3 gated), 2 residual adds; a MoE router ~8 plus
    per active expert its 3 linears."""
    norm = 6 if b.norm == "rms" else 1
    n = norm * (b.norms_per_layer + (2 if b.attention.qk_norm else 0))
    n += sum((1 + lin.bias) * (lin.count if lin.is_module else 1) for lin in b.linears
             if not lin.role.startswith("expert"))
    n += (6 if b.attention.rope else 0) + 3 + 2
    if b.mlp is not None:
        n += 3 if b.mlp.gated else 2
    if b.moe is not None:
        n += 8 + 3 * b.moe.top_k
    return float(n)


def _param_tensors(spec, job) -> float:
    """Trainable parameter tensors: per layer each linear's weight (and bias) and each norm; the embeddings
    and final norm; for LoRA two adapter matrices per wrapped linear."""
    from ..estimator import states as st

    if job.method in ("lora", "qlora"):
        targets = st.lora_targets(spec, job)
        return float(sum(2 * (lin.count if lin.is_module else 1) * b.count
                         for b in spec.blocks for lin in b.linears if lin.name in targets))
    n = 3.0
    for b in spec.blocks:
        per = b.norms_per_layer + (2 if b.attention.qk_norm else 0)
        per += sum((1 + lin.bias) * (1 if not lin.is_module else lin.count) for lin in b.linears)
        n += per * b.count
    return n


def features(job, spec, gpu) -> dict[str, float]:
    """Seconds of each kind of work at the card's peak rates (before the fitted factors), per micro-batch
    step of ``job`` with model ``spec`` on ``gpu``."""
    train = job.task == "train"
    B = job.batch_size
    S = job.seq_len if train else job.prompt_len
    T = B * S
    L = spec.num_layers
    h = spec.hidden_size
    lin, _ = _linear_params(spec)
    head = spec.hidden_size * spec.vocab_size if spec.head in ("causal_lm", "masked_lm") else 0
    ckpt = train and job.gradient_checkpointing
    lora = job.method in ("lora", "qlora")
    fp32 = job.precision == "32-true"
    tp = max(1, int(getattr(job, "tensor_parallel", 1) or 1))
    peak16 = gpu.bf16_flops if job.precision.startswith("bf16") else gpu.fp16_flops
    if not peak16:  # no native bf16 (T4, V100): emulated at about the fp32 rate
        peak16 = gpu.fp32_flops
    peak_mm = gpu.fp32_flops if fp32 else peak16
    fwd_mm = 2.0 * (lin + head) * T
    if train:
        bwd_mm = (2.0 if lora else 4.0) * lin * T + (2.0 if lora else 4.0) * head * T
        mm = fwd_mm * (2 if ckpt else 1) - (2.0 * head * T if ckpt else 0) + bwd_mm
    else:
        mm = fwd_mm
    heads_dim = sum(b.attention.num_heads * b.attention.head_dim * b.count for b in spec.blocks)
    causal = 0.5 if (spec.head != "masked_lm" and not spec.is_encoder and job.attention != "eager") else 1.0
    att_f = 4.0 * T * S * heads_dim * causal
    att = att_f * ((1 + (1 if ckpt else 0) + 2.5) if train else 1)
    act = _bytes16(job.precision)
    inter = max((b.mlp.intermediate_size if b.mlp else 0) for b in spec.blocks) if spec.blocks else 4 * h
    if any(b.moe for b in spec.blocks):
        m = next(b.moe for b in spec.blocks if b.moe)
        inter = max(inter, m.expert_intermediate_size * m.top_k)
    passes = (1 + (1 if ckpt else 0) + 2) if train else 1
    elem = T * L * (24 * h + 6 * inter / tp) * act * passes
    if job.attention == "eager":
        nh = max(b.attention.num_heads for b in spec.blocks)
        elem += T * S * nh * L * act * 4 * passes
    if head:
        elem += T * spec.vocab_size * 4 * (6 if train else 1) / tp
    opt_bytes = 0.0
    paged_bytes = 0.0
    if train:
        from ..estimator import states as st

        p = st.trainable_params(spec, job)
        pb = 4 if (job.precision.endswith("mixed") or fp32 or lora) else 2
        per = {"adamw": 2 * pb + pb + 16, "adam": 2 * pb + pb + 16, "adamw-8bit": 2 * pb + pb + 4,
               "paged-adamw-8bit": 2 * pb + pb + 4, "paged-adamw": 2 * pb + pb + 16, "sgd": 2 * pb + pb,
               "sgd-momentum": 2 * pb + pb + 8, "adafactor": 2 * pb + pb + 8, "lion": 2 * pb + pb + 8}
        opt_bytes = p * per.get(job.optimizer, 3 * pb + 16) / tp
        opt_bytes /= _layout(job).shard  # ZeRO / FSDP: each rank steps only its shard of the states
        if job.optimizer.startswith("paged"):
            paged_bytes = p * (2 if "8bit" in job.optimizer else 8)
    deq = 0.0
    if job.quantization in ("nf4", "fp4", "int8"):
        uses = (1 + (1 if ckpt else 0) + 1) if train else 1
        deq = lin * (2 + 2 + (0.5 if job.quantization != "int8" else 1)) * uses
        if job.quantization == "int8":
            deq *= 2  # LLM.int8 also splits outlier columns and rescales its int32 accumulators
    layer_kernels = sum(_layer_kernels(b) * b.count for b in spec.blocks)
    fwd_passes = (1 + (1 if ckpt else 0)) if train else 1
    wrapped = 0.0  # linears that LoRA wraps or bitsandbytes replaces: each adds its own small kernels
    adapter_io = 0.0  # per token: in + 2 x out features of each LoRA-wrapped linear (see ``adapter``)
    quant_io = 0.0  # per token: in + out features of each bitsandbytes linear (see ``quant_io``)
    quantized = job.quantization in ("nf4", "fp4", "int8")
    if lora or quantized:
        from ..estimator import states as st

        targets = st.lora_targets(spec, job) if lora else frozenset()
        for b in spec.blocks:
            for ln in b.linears:
                if not ln.is_module:
                    continue
                n = (1 if ln.role.startswith("expert") else ln.count) * b.count
                hit = (ln.name in targets) + quantized
                wrapped += hit * n
                if ln.name in targets:
                    adapter_io += (ln.in_features + 2 * ln.out_features) * n
                if quantized:
                    quant_io += (ln.in_features + ln.out_features) * n
    module_passes = wrapped * passes
    int8_passes = 0.0
    if job.quantization == "int8":
        int8_passes = sum((1 if ln.role.startswith("expert") else ln.count) * b.count
                          for b in spec.blocks for ln in b.linears if ln.is_module) * passes
    opt_tensors = 0.0
    if train:
        opt_tensors = _param_tensors(spec, job) * (0.05 if job.optimizer in _FOREACH else 1.0)
    adapter_bytes = T * adapter_io * act * passes
    quant_bytes = T * quant_io * 4 * passes if train else T * quant_io * act
    decode = 0.0
    decode_passes = 0.0
    if not train and job.new_tokens:
        from ..estimator import states as st

        wbytes = st.weight_bytes(spec, job)
        kv_per_tok = 2 * sum(b.attention.num_kv_heads * b.attention.head_dim * b.count for b in spec.blocks) * act
        avg_ctx = job.prompt_len + job.new_tokens / 2
        decode = job.new_tokens * (wbytes + B * avg_ctx * kv_per_tok) / gpu.memory_bandwidth_bytes_per_s
        decode_passes = L * job.new_tokens
        mm += 2.0 * (lin + head) * B * job.new_tokens  # decode matmuls (usually hidden under the reads)
    bw = gpu.memory_bandwidth_bytes_per_s
    tp_comm = 0.0
    if tp > 1:
        mm /= tp
        att /= tp
        reduces = (2 + (2 if ckpt else 0) + 2) if train else 2
        tp_comm = reduces * L * T * h * act * 2.0 * (tp - 1) / tp / gpu.interconnect_bytes_per_s
    return {
        "matmul16": 0.0 if fp32 else mm / peak_mm,
        "matmul32": mm / peak_mm if fp32 else 0.0,
        "attention": att / (gpu.fp32_flops if fp32 else peak16),
        "elementwise": elem / bw,
        "optimizer": opt_bytes / bw,
        "dequant": deq / bw,
        "launch": float(layer_kernels * fwd_passes),
        "launch_bwd": float(layer_kernels * 2) if train else 0.0,
        "decode": decode,
        "decode_launch": float(decode_passes),
        "module_launch": float(module_passes),
        "adapter": adapter_bytes / bw,
        "quant_io": quant_bytes / bw,
        "int8_launch": float(int8_passes),
        "optimizer_launch": opt_tensors,
        "paged": paged_bytes / gpu.pcie_bytes_per_s,
        "tp_comm": tp_comm,
        "step": 1.0,
    }


def _parallel_seconds(job, spec, gpu, compute_s: float, backward_s: float) -> tuple[float, float]:
    """(exposed collective seconds, offload seconds) per step for multi-GPU strategies (not fitted)."""
    from ..estimator import states as st

    n = job.gpus
    comm = 0.0
    if n > 1 and job.strategy != "single":
        per_node = job.gpus_per_node or n
        link = gpu.interconnect_bytes_per_s if per_node >= n else min(gpu.interconnect_bytes_per_s, 25e9)
        ring = 2.0 * (n - 1) / n
        gbytes = st.gradient_bytes(spec, job)
        if job.strategy in ("ddp", "zero1", "zero2"):
            t = ring * gbytes / link
            comm = max(0.0, t - 0.8 * backward_s) + 0.05 * t
        else:  # fsdp, fsdp2, zero3: all-gather forward + backward, reduce-scatter gradients
            pbytes = spec.parameters * _bytes16(job.precision)
            t = (2 * (n - 1) / n * pbytes + (n - 1) / n * gbytes) / link
            comm = max(0.0, t - 0.8 * compute_s) + 0.05 * t
    off = 0.0
    if job.offload != "none" and job.task == "train":
        p = st.trainable_params(spec, job) / max(1, n)
        off = 2 * p * _bytes16(job.precision) / gpu.pcie_bytes_per_s + p * 16 / 10e9
        if "params" in job.offload:
            off += 2 * spec.parameters / max(1, n) * _bytes16(job.precision) / gpu.pcie_bytes_per_s
    return comm, off


def step_time(job, spec=None, gpu=None, *, factors: dict[str, float] | None = None,
              accumulation: int = 1) -> StepTime:
    """Estimated seconds per optimizer step of ``job`` on ``gpu`` (a :class:`memfit.gpus.GPU` or a catalog
    name; default ``h100-80gb``). ``accumulation`` micro-batches run before each optimizer step."""
    from ..gpus import GPU, get_gpu

    if spec is None:
        from ..models import load_model

        spec = load_model(job.model)
    if gpu is None:
        gpu = "h100-80gb"
    if not isinstance(gpu, GPU):
        gpu = get_gpu(gpu)
    f = features(job, spec, gpu)
    k = factors or load_factors()
    parts = {name: f[name] * k[name] for name in KINDS}
    per_micro = {n: v for n, v in parts.items() if n not in _ONCE}
    micro = combine(per_micro, k.get("overlap", 1.0))
    a = max(1, int(accumulation))
    parts = {n: (v * a if n in per_micro else v) for n, v in parts.items()}
    backward = micro * 0.6
    comm, off = _parallel_seconds(job, spec, gpu, micro, backward)
    if comm:
        parts["collectives"] = comm
    if off:
        parts["offload"] = off
    total = combine(parts, k.get("overlap", 1.0))
    tokens = job.batch_size * (job.seq_len if job.task == "train" else (job.prompt_len + job.new_tokens)) * a
    tokens *= _replicas(job)
    return StepTime(seconds=total, tokens_per_second=tokens / total if total > 0 else 0.0, parts=parts)


def _layout(job):
    """The job's GPU layout as the memory estimate divides it (:func:`memfit.estimator.parallel.layout`)."""
    from ..estimator.parallel import layout

    return layout(job)


def _replicas(job) -> int:
    """Data-parallel replicas of ``job`` (the layout's ``dp``)."""
    return _layout(job).dp


def _at_batch(job, batch: int):
    """``job`` at another micro-batch, without validating it again (only the batch, a whole number >= 1,
    changes; :func:`features` reads the fields)."""
    return job.with_batch(batch)


class BatchTimer:
    """:func:`step_time` of one job at many micro-batches, cheaply: every feature is affine in the
    micro-batch (tokens scale with it; launches, optimizer and dequantization do not), so the features at
    batch 1 and 2 give all others exactly. Collectives and offload are added as in :func:`step_time` (they
    depend on the layout and on the compute time, not on the micro-batch itself)."""

    def __init__(self, job, spec, gpu, factors: dict[str, float] | None = None):
        from ..gpus import GPU, get_gpu

        self.gpu = gpu if isinstance(gpu, GPU) else get_gpu(gpu)
        self.job, self.spec = job, spec
        self.k = factors or load_factors()
        f1 = features(_at_batch(job, 1), spec, self.gpu)
        f2 = features(_at_batch(job, 2), spec, self.gpu)
        self.per = {n: f2[n] - f1[n] for n in KINDS}
        self.fixed = {n: f1[n] - self.per[n] for n in KINDS}
        self.multi = job.gpus > 1 or job.offload != "none"
        # (kind, fixed and per-sequence seconds, the kind's factor, once per optimizer step)
        self._terms = tuple((n, self.fixed[n], self.per[n], self.k[n], n in _ONCE) for n in KINDS)
        self._tokens = (job.seq_len if job.task == "train" else (job.prompt_len + job.new_tokens)) * _replicas(job)

    def __call__(self, batch: int, accumulation: int = 1) -> StepTime:
        a = max(1, int(accumulation))
        # the kinds' seconds as (fixed + per x batch) x factor, each multiplied by the accumulation unless once
        parts = {n: (f + p * batch) * k if once else (f + p * batch) * k * a for n, f, p, k, once in self._terms}
        if self.multi:
            # what step_time adds for several GPUs or offload: it depends on the job's layout and on the
            # micro-batch's compute time (how much of the collectives it hides), not on the batch itself
            micro = combine({n: v / a for n, v in parts.items() if n not in _ONCE}, self.k.get("overlap", 1.0))
            comm, off = _parallel_seconds(self.job, self.spec, self.gpu, micro, micro * 0.6)
            if comm:
                parts["collectives"] = comm
            if off:
                parts["offload"] = off
        total = combine(parts, self.k.get("overlap", 1.0))
        tokens = batch * self._tokens * a
        return StepTime(seconds=total, tokens_per_second=tokens / total if total > 0 else 0.0, parts=parts)


def annotate(breakdown, job, gpu, spec=None):
    """Fill ``breakdown.step_time_seconds`` and ``tokens_per_second`` for ``job`` on ``gpu`` (catalog name or
    GPU) and return it; what ``memfit estimate --gpu NAME`` calls so every Breakdown carries them."""
    st = step_time(job, spec, gpu)
    breakdown.step_time_seconds = st.seconds
    breakdown.tokens_per_second = st.tokens_per_second
    return breakdown
