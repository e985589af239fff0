"""trace(): the reference run (:mod:`memfit.reference`) on fake tensors, with a model of the CUDA allocator.

The model is built, the batch made and the steps run by the very functions ``measure`` runs on a GPU, under
``FakeTensorMode`` (tensors with shapes, dtypes and storages of the right size but no data; nothing is
computed and no memory is taken). The device is the fake ``cpu`` made to behave as CUDA where that changes
memory (:mod:`memfit.tracer.cuda_emulation`). :mod:`memfit.tracer.tracker` records every allocation and free
and feeds them to the allocator model.

As ``measure`` does, step 1 is a warm-up (it creates the optimizer state, the cuBLAS workspaces, the
allocator's segments) and the answer is the peak of step 2: forward with labels, backward, ``optimizer.step()``
and ``zero_grad(set_to_none=True)`` - or, for inference, the second ``generate()`` (or prefill forward).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from typing import Any, Iterator

from ..breakdown import Breakdown
from ..errors import JobError, MemfitError, MissingDependencyError, ModelNotFoundError
from ..job import Job
from ..reference import quiet_libraries as _quiet

__all__ = ["trace", "TraceUnsupportedError", "CUDA_CONTEXT_BYTES", "TRACE_INSTALL"]

from ..estimator.events import CUDA_CONTEXT_BYTES  # noqa: E402 - defined once, torch-free
"""What ``nvidia-smi`` shows for the process beyond PyTorch's reserve (``device_total - peak_reserved``): the
CUDA context and the loaded kernels of cuBLAS, cuDNN and PyTorch. A first value, to be calibrated from
measurements: the reference H100 (torch 2.11 + CUDA 13, cuDNN 9.19, lazy module loading) showed 767 MiB for
training steps (backward loads more kernels) and 695 MiB for inference."""

DEVICE_MEMORY_BYTES = 85_017_493_504
"""Memory of the device the trace models: an H100 80GB HBM3 as ``torch.cuda.mem_get_info`` reports it. The
allocator model gives cached segments back when a new one would not fit (as the caching allocator does
before it reports out of memory), and a job that still does not fit is noted."""

TRACE_INSTALL = "pip install 'memfit[trace]'"

WARMUP_NEW_TOKENS = 2
"""Tokens the warm-up ``generate()`` of an inference trace makes (the measured call makes ``new_tokens``)."""

_TORCH_MISSING = f"memfit trace needs torch and transformers; install them with: {TRACE_INSTALL}"


class TraceUnsupportedError(MemfitError):
    """The job cannot be traced (a CUDA-only kernel, data-dependent control flow, a multi-GPU layout)."""


class TraceVersionError(MemfitError, RuntimeError):
    """transformers or peft is not the version the trace is tested with."""


#: The versions the trace is tested with. It patches private internals of both (attention dispatch,
#: generation, PEFT's layer wrapping); another version may run and give a wrong answer, so it is refused.
#: CI pins the same versions (pyproject.toml, extras ``trace`` and ``test``).
TESTED_VERSIONS = {"transformers": "5.17.0", "peft": "0.21.0"}
#: Set to 1 to trace with other versions anyway (the numbers are then unchecked).
ALLOW_UNTESTED_ENV = "MEMFIT_TRACE_UNTESTED_VERSIONS"


def check_versions(installed: dict[str, str | None], *, allow: bool = False) -> None:
    """Raise :class:`TraceVersionError` when a package of ``installed`` ({name: version or None when not
    installed}) is not the version in :data:`TESTED_VERSIONS`. ``allow`` skips the check."""
    if allow:
        return
    for name, version in installed.items():
        want = TESTED_VERSIONS[name]
        if version is not None and version != want:
            raise TraceVersionError(
                f"trace is tested with {name}=={want}, found {version}: install it with "
                f"pip install '{name}=={want}' (or set {ALLOW_UNTESTED_ENV}=1 to trace anyway, unchecked)")


# --------------------------------------------------------------------------------------------- public
def trace(job: Job | dict[str, Any], model: Any = None, *, spec: Any = None, fallback: bool = True,
          sdpa: str | None = None, cuda: bool = True, steps: int | None = None,
          gpu_memory_bytes: int | None = None) -> Breakdown:
    """Trace ``job`` on fake tensors and return its :class:`~memfit.breakdown.Breakdown` (``engine="trace"``).

    ``model``: your own ``nn.Module`` (real, meta or fake weights; it is not modified) instead of the job's
    model; it is called as :func:`memfit.reference.forward_loss` says. ``spec``: a ModelSpec instead of
    resolving ``job.model``.

    Where the trace cannot run (bitsandbytes kernels, multi-GPU layouts, data-dependent control flow fake
    tensors cannot follow), it returns :func:`memfit.estimate`'s answer with a note saying why, or raises
    :class:`TraceUnsupportedError` when ``fallback`` is False.

    Not thread-safe: while it runs, it swaps kernels and functions of torch and transformers process-wide.

    Expert knobs: ``sdpa`` is the fused kernel ``scaled_dot_product_attention`` tries first on the H100
    (``cudnn``, as torch >= 2.10 does with cuDNN > 9.15, or ``flash``; default
    :data:`memfit.tracer.cuda_emulation.DEFAULT_SDPA_PREFERENCE`); ``cuda=False`` traces the plain CPU run (no CUDA
    emulation, no allocator rounding: what ``measure`` counts on the CPU); ``steps`` is the number of
    steps, the last one measured (default 2: a warm-up and the measured step; 1 for an inference job judged on a
    card, as the estimate's verdict and ``measure --find-max-batch`` take a user's first ``generate()`` call:
    under a cap the warm-up call's cached logits segment changes where the next call's tensors land).

    ``gpu_memory_bytes``: judge the run on a card of that size (its driver-reported total). The traced
    allocations then go through the caching-allocator model capped at the card less the CUDA context (as
    ``measure --gpu-memory`` caps the real allocator), cached segments freed and the request retried where a new
    segment would pass the cap; ``fits`` is False when a request is still refused, and the Breakdown carries
    ``gpu_memory_bytes`` and ``headroom_bytes``. Slower than :func:`memfit.estimate` with a card (the model code
    runs), and it follows every op of the real step, which the estimate's event stream abstracts in places (its
    backward under LoRA with checkpointing): see validation/trace_verdicts.py for how the two verdicts compare.
    """
    if isinstance(job, dict):
        job = Job.from_dict(job)
    if not isinstance(job, Job):
        raise JobError(f"trace needs a Job (or a dict of job fields), not {type(job).__name__}")
    if steps is None:
        steps = 1 if gpu_memory_bytes is not None and job.task == "infer" else 2
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise JobError(f"steps must be a whole number >= 1; got {steps!r}")
    if sdpa is None:
        from .cuda_emulation import DEFAULT_SDPA_PREFERENCE as sdpa
    if sdpa not in ("flash", "cudnn"):
        raise JobError(f"sdpa must be 'flash' or 'cudnn'; got {sdpa!r}")
    if gpu_memory_bytes is not None:
        if isinstance(gpu_memory_bytes, bool) or not isinstance(gpu_memory_bytes, int) or gpu_memory_bytes <= 0:
            raise JobError(f"gpu_memory_bytes must be a whole number of bytes > 0; got {gpu_memory_bytes!r}")
        if not cuda:
            raise JobError("a card (gpu_memory_bytes) is judged on the CUDA emulation; drop cuda=False")
    try:
        reason = _unsupported(job, model)
        if reason:
            raise TraceUnsupportedError(reason)
        torch = _require_torch(job)
        if spec is None:
            spec = _resolve_spec(job, model)
        _check_lengths(job, spec)
        return _TraceRun(torch, job, spec, model, cuda=cuda, sdpa=sdpa, steps=steps,
                         gpu_memory_bytes=gpu_memory_bytes).execute()
    except TraceUnsupportedError as exc:
        if not fallback:
            raise
        return _fallback(job, str(exc), spec, gpu_memory_bytes)


def _fallback(job: Job, reason: str, spec: Any = None, gpu_memory_bytes: int | None = None) -> Breakdown:
    """The estimate (judged on the card where one is given), with one line saying why it is not a trace."""
    try:
        from ..estimator import estimate
    except ImportError:
        raise TraceUnsupportedError(f"{reason}; and the estimate is not available to fall back to") from None
    model_spec = spec
    if spec is not None and _is_config_spec(spec):
        try:
            from ..models import spec_from_config

            model_spec = spec_from_config(spec.config, name=spec.name)
        except (ImportError, MemfitError):
            model_spec = None
    try:
        bd = estimate(job, model_spec, gpu_memory_bytes=gpu_memory_bytes)
    except Exception as exc:  # noqa: BLE001 - a fallback that fails says so in one line, never a traceback
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceUnsupportedError(f"{reason}; and the estimate cannot run either: {text}") from None
    bd.notes.insert(0, f"trace could not run: {reason}; showing the estimate instead")
    bd.extras["trace_error"] = reason
    return bd


def _check_lengths(job: Job, spec: Any) -> None:
    """A sequence past a learned position table: the one-line error before anything is built."""
    from ..checks import refuse_past_position_table

    refuse_past_position_table(job, spec)


def _is_config_spec(spec: Any) -> bool:
    return type(spec).__name__ == "ConfigSpec" or not hasattr(spec, "blocks")


def _require_torch(job: Job | None = None):
    try:
        import torch
        import transformers  # noqa: F401 - the reference run builds transformers models
    except ImportError as exc:
        raise MissingDependencyError(_TORCH_MISSING) from exc
    installed: dict[str, str | None] = {"transformers": transformers.__version__}
    if job is not None and job.is_lora:
        try:
            import peft
        except ImportError:
            installed["peft"] = None
        else:
            installed["peft"] = peft.__version__
    check_versions(installed, allow=os.environ.get(ALLOW_UNTESTED_ENV, "") == "1")
    return torch


def _unsupported(job: Job, model: Any) -> str:
    """Why ``job`` cannot be traced, or ''."""
    if job.gpus > 1 or job.strategy != "single":
        return f"the trace covers one GPU; {job.gpus} GPUs with {job.strategy} are not traced yet"
    if job.offload != "none":
        return f"offload {job.offload!r} moves state to the host; the trace covers offload: none"
    if job.quantization in ("nf4", "fp4") and job.task == "train" and model is None and job.is_lora:
        pass  # QLoRA: bitsandbytes' 4-bit linears are emulated (memfit.tracer.bnb_emulation)
    elif job.quantization in ("int8", "nf4", "fp4"):
        return f"{job.quantization} weights run bitsandbytes' CUDA kernels, which fake tensors cannot execute"
    if job.quantization in ("fp8", "gptq", "awq"):
        return f"{job.quantization} weights need a pre-quantized checkpoint and its CUDA kernels"
    if job.task == "infer" and job.kv_cache_dtype not in ("auto", {"32-true": "fp32", "16-mixed": "fp16",
                                                                   "16-true": "fp16"}.get(job.precision, "bf16")):
        return f"the reference run keeps the dynamic cache in the compute dtype, not {job.kv_cache_dtype}"
    return ""


def _resolve_spec(job: Job, model: Any) -> Any:
    from .. import reference as ref

    try:
        from ..models import load_model
    except ImportError:  # the registry is not importable in this checkout
        load_model = None
    if model is not None:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = getattr(inner, "config", None)
        if load_model is not None:
            try:
                return load_model(job.model)
            except MemfitError:
                pass
        if config is not None and hasattr(config, "to_dict"):
            head = "seq_cls" if type(inner).__name__.endswith("ForSequenceClassification") else "causal_lm"
            return ref.spec_from_config(config.to_dict(), name=job.model, head=head)
        return None
    if load_model is not None:
        return load_model(job.model)
    import json
    from pathlib import Path

    path = Path(job.model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return ref.spec_from_config(json.loads(path.read_text()), name=job.model)
    raise ModelNotFoundError(f"cannot resolve model {job.model!r}: memfit.models is not importable and it is not "
                             "a path to a config.json")


# --------------------------------------------------------------------------------------------- the run
class _Hooks:
    """The reference run's phase hooks: they move the tracker from phase to phase and name what is alive."""

    def __init__(self, run: "_TraceRun") -> None:
        self.run = run
        self.tracker = run.tracker
        self.forward_start = 0

    def on_phase(self, name: str) -> None:
        tr, run = self.tracker, self.run
        if name == "forward":
            self.forward_start = tr.event
            tr.default_category = "temporaries"
        elif name == "backward":
            # What forward made and is still alive is what backward needs: the saved activations.
            tr.retag_live(self.forward_start, "temporaries", "activations")
            tr.default_category = "temporaries"
        elif name == "optimizer_step":
            tr.tag((p.grad for p in run.model.parameters() if p.grad is not None), "gradients")
            tr.default_category = "temporaries"
        elif name in ("prefill", "decode"):
            tr.inference = True
            tr.default_category = "activations"
        elif name == "end":
            if run.optimizer is not None:
                tr.tag(_state_tensors(run.torch, run.optimizer), "optimizer_states")
            tr.default_category = "other"
        tr.set_phase(name)

    def on_decode_step(self, cache: Any) -> None:
        from .. import reference as ref

        self.tracker.tag(ref.cache_tensors(cache), "kv_cache")


def _state_tensors(torch: Any, optimizer: Any) -> Iterator[Any]:
    for state in getattr(optimizer, "state", {}).values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                yield v


class _TraceRun:
    def __init__(self, torch: Any, job: Job, spec: Any, user_model: Any, *, cuda: bool, sdpa: str,
                 steps: int, gpu_memory_bytes: int | None = None) -> None:
        from .tracker import Tracker

        self.torch, self.job, self.spec, self.user_model = torch, job, spec, user_model
        self.cuda, self.sdpa_prefer, self.steps = cuda, sdpa, steps
        self.training = job.task == "train"
        vocab = int(getattr(spec, "vocab_size", 0) or 0) if spec is not None else 0
        self.card = gpu_memory_bytes
        if gpu_memory_bytes is not None:
            # the card's allocator limit, as estimate() and measure --gpu-memory set it: the card less this
            # task's CUDA context (and a paged optimizer's unified-memory states, which live outside the allocator)
            from ..estimator.events import cuda_context_bytes

            self.card_context = cuda_context_bytes(job.task, job.quantization)
            # a card smaller than the context leaves no room at all: every request is refused (not an error)
            capacity = max(0, gpu_memory_bytes - self.card_context - _paged_host_bytes(job, spec))
        else:
            capacity = DEVICE_MEMORY_BYTES - CUDA_CONTEXT_BYTES if cuda else None
        from ..allocator import AllocatorConfig

        alloc_config = AllocatorConfig(expandable_segments=bool(getattr(job, "expandable_segments", False)))
        self.tracker = Tracker(torch, cuda=cuda, vocab_size=vocab, capacity_bytes=capacity,
                               allocator_config=alloc_config)
        self.model = self.optimizer = self.batch = self.scaler = None
        self.call_job = job
        self.sdpa = None
        self.warnings: list[str] = []
        self.notes: list[str] = []

    # ------------------------------------------------------------------------------------------
    def execute(self) -> Breakdown:
        torch = self.torch
        t0 = time.perf_counter()
        try:
            with self._context():
                self._load()
                self._steps()
            bd = self._breakdown(time.perf_counter() - t0)
        except (MemfitError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - anything the fake run cannot do becomes one line
            if os.environ.get("MEMFIT_TRACE_DEBUG"):
                raise  # developers: the full traceback instead of the one line
            raise TraceUnsupportedError(_one_line(torch, exc)) from None
        finally:
            self.tracker.close()
            self.model = self.optimizer = self.batch = self.scaler = self.user_model = None
        return bd

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        torch = self.torch
        from torch._subclasses.fake_tensor import FakeTensorMode

        from .cuda_emulation import (SdpaEmulation, cuda_autocast_policy, cuda_foreach_default,
                                     fake_safe_grad_scaler)

        with contextlib.ExitStack() as stack:
            stack.enter_context(_quiet(self.warnings))
            stack.enter_context(_quiet_logger("torch._subclasses.fake_tensor"))
            stack.enter_context(_generation_stop(self))
            stack.enter_context(_unpadded_masks())
            stack.enter_context(fake_safe_grad_scaler(torch))
            if self.cuda:
                stack.enter_context(cuda_autocast_policy(torch))
                stack.enter_context(cuda_foreach_default(torch))
                stack.enter_context(_decode_experts_as_cuda())
                force = "flash" if self.job.attention == "flash" else None
                self.sdpa = SdpaEmulation(torch, prefer=self.sdpa_prefer, force=force,
                                          workspace=self.tracker.workspace)
                stack.enter_context(self.sdpa.installed())
            self.fake = FakeTensorMode(allow_non_fake_inputs=True)
            stack.enter_context(_swappable_fakes(torch, self.fake))
            stack.enter_context(self.fake)
            stack.enter_context(self.tracker.mode())
            yield

    def _load(self) -> None:
        from .. import reference as ref

        job, tr = self.job, self.tracker
        if job.task == "infer" and job.new_tokens > 0 and getattr(self.spec, "head", "causal_lm") != "causal_lm":
            raise JobError("new_tokens > 0 generates text and needs a causal_lm head; use new_tokens: 0")
        tr.phase, tr.default_category = "load", "weights"
        user = _fake_copy(self.torch, self.user_model) if self.user_model is not None else None
        self.user_model = None
        build_job = job.replace(attention="sdpa") if job.attention == "flash" else job
        if job.attention == "flash":
            self.notes.append("flash-attn 2 is traced as its memory: PyTorch's flash kernel (output and fp32 "
                              "log-sum-exp saved, no score matrix)")
        if job.quantization in ("nf4", "fp4") and user is None:
            from .bnb_emulation import build_qlora_model

            self.model = build_qlora_model(build_job, self.spec, "cpu", empty_cache=tr.sim.release_cached)
        else:
            self.model = ref.build_model(build_job, self.spec, "cpu", user_model=user)
        del user
        _skip_zero_layerdrop(self.model)
        params = dict(self.model.named_parameters(remove_duplicate=True))
        tr.tag((p for n, p in params.items() if "lora_" in n), "lora_adapters")
        tr.tag((p for n, p in params.items() if "lora_" not in n), "weights")
        tr.tag(self.model.buffers(), "weights")
        tr.tag((b for n, b in self.model.named_buffers() if n.rsplit(".", 1)[-1] in ("absmax", "absmax2", "code2",
                                                                                   "offset")),
               "quantization_state")
        known = {id(r) for r in _records_of(tr, list(params.values()) + list(self.model.buffers()))}
        for rec in tr.live_records():
            if id(rec) not in known and rec.category == "weights":
                rec.category = "other"
        if self.training:
            if job.optimizer in ("adamw-8bit", "paged-adamw-8bit", "paged-adamw"):
                from .bnb_emulation import make_bnb_optimizer  # its fused kernels emulated: the states it makes

                self.optimizer = make_bnb_optimizer(job, self.model)
            else:
                self.optimizer = ref.make_optimizer(job, self.model)
            self.scaler = ref.make_grad_scaler(job, "cpu")
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        config = getattr(inner, "config", None)
        vocab = getattr(config, "vocab_size", None) or getattr(self.spec, "vocab_size", None)
        if vocab:
            tr.vocab_size = int(vocab)
        num_labels = getattr(config, "num_labels", None) if getattr(self.spec, "head", "") == "seq_cls" else None
        self.batch = ref.make_batch(job, self.spec, "cpu", vocab_size=vocab, num_labels=num_labels)
        tr.tag(self.batch.values(), "inputs")

    def _steps(self) -> None:
        from .. import reference as ref

        hooks = _Hooks(self)
        tr = self.tracker
        for i in range(self.steps):
            last = i == self.steps - 1
            if last:
                tr.start_window()
            if self.training:
                ref.train_step(self.job, self.model, self.optimizer, self.batch, self.scaler, hooks=hooks)
            else:
                # Decoding costs the trace ~0.1 s a token for a 1B model; a warm-up call only has to leave the
                # cuBLAS workspace and the prefill's cached segments behind, so it generates at most 2 tokens.
                self.call_job = self.job if last else self.job.replace(
                    new_tokens=min(self.job.new_tokens, WARMUP_NEW_TOKENS))
                ref.infer(self.call_job, self.model, self.batch, hooks=hooks)
        self.call_job = self.job
        tr.stop_window()

    # ------------------------------------------------------------------------------------------
    def _breakdown(self, seconds: float) -> Breakdown:
        from .tracker import CUBLAS_WORKSPACE_BYTES

        job, tr, torch = self.job, self.tracker, self.torch
        peak_event = tr.peak_event
        comps = {k: v for k, v in sorted(tr.components_at(peak_event).items()) if v}
        requested = tr.requested_at(peak_event)
        peak = tr.peak
        paged = int(getattr(self.optimizer, "host_bytes", 0) or 0)
        if self.cuda:
            reserved = max(tr.sim.peak_reserved, peak)
            # a paged optimizer's states are CUDA unified memory: resident while there is room, counted by nvidia-smi
            total = reserved + (CUDA_CONTEXT_BYTES if self.card is None else self.card_context) + paged
        else:
            # The plain CPU run: no caching allocator, tensor bytes as a CPU count sees them.
            comps = _requested_components(tr, peak_event)
            reserved = total = peak
        phase_names = ("forward", "backward", "optimizer_step") if self.training else ("prefill", "decode")
        phases = {"load": tr.load_peak}
        phases.update({p: tr.phase_peaks[p] for p in phase_names if p in tr.phase_peaks})
        peak_phase = tr.peak_phase if tr.peak_phase in phases else max(phases, key=phases.get)
        base, trainable = _count_parameters(self.model)
        notes = list(self.notes)
        if self.cuda:
            notes.insert(0, "fake tensors on the CPU with CUDA's behaviour emulated (autocast lists, sdpa kernels "
                            "as on an H100, foreach optimizer, caching allocator); nothing was computed")
        else:
            notes.insert(0, "fake tensors on the CPU, counted as a CPU run counts tensors (no CUDA emulation, no "
                            "allocator rounding)")
        card_fields: dict[str, Any] = {}
        if self.card is not None:
            fits = not tr.sim.oom_requests
            if not self.training:
                notes.append("the trace's verdict on a card is checked for training, not inference: on the rehearsed "
                             "prefill boundaries it said out of memory where the real runs fit "
                             "(validation/trace_verdicts.py); memfit estimate --gpu-memory gives the checked verdict")
            card_fields = {"gpu_memory_bytes": int(self.card), "fits": fits, "headroom_bytes": int(self.card - total)}
            if not fits:
                o = tr.first_oom or {}
                notes.insert(0, f"does not fit a {self.card / 2**30:.2f} GiB card: out of memory in "
                                f"{o.get('phase') or 'load'}, a {o.get('bytes', 0) / 2**30:.2f} GiB request "
                                f"({o.get('category', '?')}, {o.get('op') or 'an allocation'}) with "
                                f"{o.get('reserved_bytes', 0) / 2**30:.2f} GiB reserved; the figures are the run "
                                "past that point, over the limit")
                if peak + self.card_context + paged <= self.card:
                    notes.insert(1, "fails through fragmentation only: the live tensors at the peak fit the card, "
                                    "the caching allocator's free blocks do not fit that request")
        elif self.cuda and (tr.sim.oom_requests or total > DEVICE_MEMORY_BYTES):
            notes.insert(0, f"does not fit: needs {total / 2**30:.2f} GiB on the device, an 80 GB H100 has "
                            f"{DEVICE_MEMORY_BYTES / 2**30:.2f} GiB")
        if comps.get("logits_and_loss", 0) > 0.2 * peak:
            notes.append("the vocab-sized logits and their loss are a large part of the peak")
        sdpa_calls = dict(self.sdpa.calls) if self.sdpa is not None else {}
        window_events = (tr.window_end_event or tr.event) - tr.window_start_event
        extras: dict[str, Any] = {
            "timeline": tr.timeline(tr.window_start_event, tr.window_end_event),
            "timeline_format": ["event", "phase", "allocated_bytes"],
            "timeline_events": window_events,
            "peak_event": peak_event - tr.window_start_event,
            "peak_op": tr.peak_op,
            "largest_at_peak": tr.largest_at(peak_event),
            "peak_requested_bytes": requested,
            "load_peak_bytes": tr.load_peak,
            "steps": self.steps,
            "warmup_steps": self.steps - 1,
            **({"warmup_new_tokens": min(job.new_tokens, WARMUP_NEW_TOKENS)}
               if job.task == "infer" and job.new_tokens and self.steps > 1 else {}),
            "trace_seconds": round(seconds, 3),
            "allocator": {"segments": tr.sim.num_segments, "reserved_at_end_bytes": tr.sim.reserved,
                          "allocations": len(tr.records)},
            "device": "H100 (emulated on fake CPU tensors)" if self.cuda else "cpu (fake tensors)",
            "fits": (card_fields["fits"] if card_fields else
                     not (self.cuda and (tr.sim.oom_requests or total > DEVICE_MEMORY_BYTES))),
            "torch": torch.__version__,
        }
        if tr.first_oom is not None:
            extras["first_oom"] = tr.first_oom
            extras["decided_by"] = tr.first_oom["category"]
        if self.cuda:
            extras["cuda_context_bytes"] = CUDA_CONTEXT_BYTES if self.card is None else self.card_context
            extras["cublas_workspace_bytes"] = CUBLAS_WORKSPACE_BYTES
        if sdpa_calls:
            extras["sdpa_backends"] = sdpa_calls
        try:
            import transformers

            extras["transformers"] = transformers.__version__
        except ImportError:  # pragma: no cover
            pass
        if self.warnings:
            extras["warnings"] = list(self.warnings)
        if tr.assumed_values:
            extras["assumed_values"] = tr.assumed_values
            notes.append(f"{tr.assumed_values} value(s) read from tensors (which fake tensors do not hold) were "
                         "answered as the reference batch has them: no padding, finite values")
        return Breakdown(engine="trace", model=job.model, job=job.to_dict(), parameters=base,
                         trainable_parameters=trainable, components=comps, peak_allocated_bytes=int(peak),
                         peak_reserved_bytes=int(reserved), device_total_bytes=int(total), peak_phase=peak_phase,
                         phases={k: int(v) for k, v in phases.items()}, host_bytes=paged,
                         measurement="fake-tensors", notes=notes,
                         extras=extras, **card_fields)


def _paged_host_bytes(job: Job, spec: Any) -> int:
    """A paged optimizer's states held in CUDA unified memory (outside the allocator's limit), as the estimator
    counts them; 0 for other optimizers or where the model is not a memfit ModelSpec."""
    if job.optimizer not in ("paged-adamw-8bit", "paged-adamw") or spec is None or _is_config_spec(spec):
        return 0  # a user's model or a config read by the reference: the trace counts what its optimizer pages
    from ..estimator import states as st

    return int(st.paged_optimizer_host_bytes(spec, job))


def _requested_components(tr: Any, event: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in tr.records:
        if rec.born <= event and (rec.died is None or rec.died > event):
            out[rec.category] = out.get(rec.category, 0) + rec.nbytes
    return {k: v for k, v in sorted(out.items()) if v}


def _records_of(tr: Any, tensors: list[Any]) -> list[Any]:
    out = []
    for t in tensors:
        rec = tr._record_of(t)
        if rec is not None:
            out.append(rec)
    return out


def _count_parameters(model: Any) -> tuple[int, int]:
    """(base parameters, trainable parameters): LoRA adapters and PEFT's ``modules_to_save`` copies are not
    base parameters (as :func:`memfit.measurer.accounting.count_parameters` counts them)."""
    base = trainable = 0
    if model is None:
        return 0, 0
    for name, p in model.named_parameters(remove_duplicate=True):
        n = p.numel()
        if p.requires_grad:
            trainable += n
        if "lora_" not in name and "modules_to_save." not in name:
            base += n
    return int(base), int(trainable)


def _fake_copy(torch: Any, model: Any) -> Any:
    """A copy of the user's module whose parameters and buffers are fresh fake tensors (made inside the
    fake mode, so they are counted as the weights being loaded). The user's module is left as it is."""
    if not isinstance(model, torch.nn.Module):
        raise JobError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        fake = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")
        if isinstance(t, torch.nn.Parameter):
            fake = torch.nn.Parameter(fake, requires_grad=t.requires_grad)
        memo[id(t)] = fake
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _generation_stop(run: "_TraceRun") -> Iterator[None]:
    """``generate()`` asks each step whether every sequence has finished (``bool`` of a device tensor), which
    fake tensors cannot answer; the reference run always generates exactly ``new_tokens`` (``run.call_job``'s),
    so stop there."""
    job = run.job
    try:
        from transformers.generation import utils as gen
    except ImportError:  # pragma: no cover
        yield
        return
    stop_cls = getattr(gen, "StopCheck", None)
    if stop_cls is None or job.task != "infer" or job.new_tokens == 0:
        yield
        return
    original = stop_cls.__call__

    def __call__(self, unfinished_sequences, tokens, length):
        return length >= run.call_job.prompt_len + run.call_job.new_tokens

    stop_cls.__call__ = __call__
    try:
        yield
    finally:
        stop_cls.__call__ = original


@contextlib.contextmanager
def _decode_experts_as_cuda() -> Iterator[None]:
    """``generate()`` decodes MoE models with ``batched_mm`` experts on a GPU: ``transformers`` 5.17
    ``generation/utils.py`` ``_optimize_model_for_decode`` swaps every ``grouped_mm`` experts implementation
    for ``batched_mm`` around the decode loop when ``self.device.type != "cpu"`` (``batched_mm_experts_forward``
    gathers each routed token's expert weights, ``gate_up_proj[expert_ids]`` then ``down_proj[expert_ids]``:
    top_k weight copies a token). The trace's device is the fake ``cpu``, so it makes the swap itself."""
    try:
        from transformers.generation import utils as gen
    except ImportError:  # pragma: no cover
        yield
        return
    mixin = getattr(gen, "GenerationMixin", None)
    original = getattr(mixin, "_optimize_model_for_decode", None)
    if original is None:
        yield
        return

    @contextlib.contextmanager
    def as_on_cuda(self):
        before = self.get_experts_implementation()
        switch = "grouped_mm" in before.values()
        if switch:
            self.set_experts_implementation({k: "batched_mm" if v == "grouped_mm" else v for k, v in before.items()})
        try:
            yield
        finally:
            if switch:
                self.set_experts_implementation(before)

    mixin._optimize_model_for_decode = as_on_cuda
    try:
        yield
    finally:
        mixin._optimize_model_for_decode = original


@contextlib.contextmanager
def _unpadded_masks() -> Iterator[None]:
    """transformers skips building the attention mask (and so lets sdpa take its flash kernel with
    ``is_causal``) only after reading the mask's values - which it refuses to do on fake tensors, taking the
    masked path a real run never takes. The reference batch has no padding and no packed sequences, so the
    trace answers those reads as a real run would: no packing, and a padding mask that masks nothing."""
    try:
        from transformers import masking_utils as mu
    except ImportError:  # pragma: no cover
        yield
        return
    saved: dict[str, Any] = {}
    for name, arg in (("_ignore_causal_mask_sdpa", "padding_mask"), ("_ignore_bidirectional_mask_sdpa", "padding_mask"),
                      ("create_recurrent_attention_mask", "attention_mask")):
        original = getattr(mu, name, None)
        if original is not None:
            saved[name] = original
            setattr(mu, name, _with_none(original, arg))
    if hasattr(mu, "find_packed_sequence_indices"):
        saved["find_packed_sequence_indices"] = mu.find_packed_sequence_indices
        mu.find_packed_sequence_indices = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(mu, name, original)


@contextlib.contextmanager
def _swappable_fakes(torch: Any, fake_mode: Any) -> Iterator[None]:
    """``module.to(dtype)`` swaps fake parameters (``torch.utils.swap_tensors``), which refuses tensors with a
    weak reference - and the fake mode's converter keeps one to each fake ``Parameter`` it has seen. PEFT
    casts its adapters that way. Drop those memo entries before the swap (the trace never converts the same
    real tensor twice, which is all they are for)."""
    import torch.utils as tu

    original = tu.swap_tensors

    def swap_tensors(t1: Any, t2: Any) -> None:
        memo = getattr(getattr(fake_mode.fake_tensor_converter, "meta_converter", None), "tensor_memo", None)
        if memo is not None:
            for key, value in list(memo.items()):
                if value is t1 or value is t2:
                    del memo[key]
        return original(t1, t2)

    tu.swap_tensors = swap_tensors
    try:
        yield
    finally:
        tu.swap_tensors = original


def _with_none(fn: Any, arg: str) -> Any:
    """``fn`` called with its argument ``arg`` set to None."""
    import functools
    import inspect

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.arguments[arg] = None
        return fn(*bound.args, **bound.kwargs)

    return wrapper


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silence a logger (fake tensors log a traceback before the error the trace turns into one line)."""
    import logging

    log = logging.getLogger(name)
    old = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(old)


#: Decoders whose forward reads ``self.training`` only to draw LayerDrop's coin (transformers 5.17
#: ``modeling_opt.py`` ``OPTDecoder.forward``: ``if self.training: if torch.rand([]) < self.layerdrop:
#: continue``); the layers read their own ``training`` for dropout and checkpointing.
_LAYERDROP_ONLY = ("OPTDecoder",)


def _skip_zero_layerdrop(model: Any) -> None:
    """A LayerDrop probability of 0 (every shipped OPT config) never skips a layer, but comparing the fake
    random scalar with it is data-dependent control flow that fake tensors cannot follow: those decoders
    (only the decoder module itself, not its layers) run the trace with ``training`` off, which drops just the
    coin (one scalar a layer) from the recorded run."""
    for mod in model.modules():
        if type(mod).__name__ in _LAYERDROP_ONLY and not getattr(mod, "layerdrop", 0.0):
            mod.training = False


def _one_line(torch: Any, exc: BaseException) -> str:
    """Why the fake run stopped, in one line."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    try:
        from torch._subclasses import fake_tensor as ft

        if isinstance(exc, (ft.DataDependentOutputException, ft.DynamicOutputShapeException)):
            op = getattr(exc, "func", None)
            return (f"data-dependent control flow or output shape ({op or text}) that fake tensors cannot follow")
        if isinstance(exc, ft.UnsupportedOperatorException):
            return f"operator {getattr(exc, 'func', text)} has no fake-tensor implementation (a custom kernel?)"
    except ImportError:  # pragma: no cover
        pass
    low = text.lower()
    if "data-dependent" in low or "data dependent" in low or "item()" in low:
        return f"data-dependent control flow that fake tensors cannot follow ({text[:160]})"
    if "cuda" in low and ("not compiled" in low or "not available" in low or "no cuda" in low):
        return f"the model calls CUDA directly ({text[:160]})"
    return f"{name}: {text[:200]}"
