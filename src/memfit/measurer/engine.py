"""measure(): run the reference job for real and report what the allocator saw, by phase and component.

The window (DESIGN.md, "What right means"): step 1 warms up - it creates the optimizer state, cuBLAS
workspaces and autocast's first casts - so the peaks are taken over steps 2..``steps`` only (the steady
state). Inside that window every phase boundary of :mod:`memfit.reference` resets the allocator's peak and
reads it at the next boundary, so each phase gets its own peak; the largest is the job's peak.

Components at the peak are what can be named exactly - weights, LoRA adapters, quantization state,
optimizer states, gradients (those present at the end of backward, when the peak is in backward or in the
optimizer step), inputs, the KV cache, ``other`` (what stays allocated between steady steps beyond all
these: cuBLAS workspaces, the GradScaler's state, step counters) - and the rest of the peak:
``activations`` in forward, backward, prefill and decode, ``temporaries`` in the optimizer step.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ..breakdown import Breakdown
from ..errors import JobError, MemfitError, ModelNotFoundError
from ..job import Job
from ..reference import (build_model, cache_tensors, check_supported, make_batch, make_grad_scaler, make_optimizer,
                         infer, quiet_libraries as _quiet, require_torch, spec_from_config, train_step)
from ..units import GiB, fmt_gib
from .accounting import count_parameters, gradient_bytes, model_bytes, optimizer_state_bytes, tensor_bytes
from .recorder import PhaseRecorder

__all__ = ["measure", "find_max_batch", "measure_sweep", "SWEEP_PRECISIONS", "CPU_NOTE"]

#: ``tf32`` is ``32-true`` with TF32 matmuls and convolutions allowed.
SWEEP_PRECISIONS = ("32-true", "tf32", "16-mixed", "bf16-mixed", "bf16-true")

CPU_NOTE = ("CPU run, tensor-level accounting: no caching allocator, no CUDA context; peak reserved and "
            "device total equal the peak of live tensor bytes")

_TRAIN_PHASES = ("forward", "backward", "optimizer_step")
_INFER_PHASES = ("prefill", "decode")


# --------------------------------------------------------------------------------------------- public
def measure(job: Job | dict[str, Any], model: Any = None, *, steps: int = 3, out: str | Path | None = None,
            progress: bool = True, device: Any = None, spec: Any = None,
            gpu_memory_bytes: int | None = None) -> Breakdown:
    """Run ``job`` for real and return its measured :class:`Breakdown`.

    ``model``: an ``nn.Module`` to measure instead of building the job's model (see
    :func:`memfit.reference.forward_loss` for the protocol a plain module follows). ``steps``: training
    steps (or inference calls), the first one a warm-up. ``out``: write the record JSON there.
    ``device``: ``cuda``, ``cuda:N`` or ``cpu``; by default the current CUDA device. Without one it refuses:
    a CPU run is asked for with ``device="cpu"`` (``--cpu``), for tiny models (it counts tensors, see
    :data:`CPU_NOTE`), and is refused when the estimate says it needs more than the host's free memory. ``spec``: a ModelSpec (or
    :class:`memfit.reference.ConfigSpec`) to use instead of resolving ``job.model``.

    ``gpu_memory_bytes``: rehearse a card of that size (what its driver reports as total) on this bigger
    GPU: the allocator is capped at the card less this process's CUDA context, measured at start (see
    :mod:`memfit.measurer.card`); the Breakdown then has ``gpu_memory_bytes``, ``fits`` and
    ``headroom_bytes`` set, its device total is context + peak reserved, and ``extras["card"]`` holds the
    context, the fraction and the limit applied. The job's ``expandable_segments`` is applied to this
    process's allocator while CUDA is not initialised yet; once it is, another setting raises a
    :class:`MemfitError` (use a fresh process: the CLI or ``python -m memfit.measurer.worker``).

    Running out of memory is an answer: the Breakdown then has ``extras["fits"] = False``, the phase it
    failed in and a note that starts with "does not fit".
    """
    torch = require_torch()
    if isinstance(job, dict):
        job = Job.from_dict(job)
    check_supported(job)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise JobError(f"steps must be a whole number >= 1 (the first one warms up); got {steps!r}")
    dev = _resolve_device(torch, device)
    if spec is None:
        spec = _spec_for_user_model(job, model) if model is not None else resolve_spec(job.model)
    _check_lengths(job, spec)
    if dev.type == "cpu" and model is None:
        check_host_memory(job, spec)
    from .meters import CpuMeter, CudaMeter

    card = allocator = None
    if gpu_memory_bytes is not None and dev.type != "cuda":
        raise MemfitError("rehearsing a card (--gpu-memory / gpu_memory_bytes) needs a CUDA GPU; on the CPU "
                          "measure without it")
    if dev.type == "cuda":
        from .card import apply_allocator_setting

        # before anything initialises CUDA (the meter asks for the current device): the allocator's setting can
        # only be chosen then (measured: `memfit measure --expandable-segments` refused itself when it came after)
        allocator = apply_allocator_setting(torch, job.expandable_segments)
    meter = CudaMeter(dev) if dev.type == "cuda" else CpuMeter()
    if dev.type == "cuda":
        from .card import rehearse_card, release_card

        if gpu_memory_bytes is not None:
            card = rehearse_card(torch, meter, _card_bytes(gpu_memory_bytes))
    try:
        bd = _Run(job, spec, model, meter, steps, progress).execute()
    finally:
        if card is not None:
            release_card(torch, meter)
    if allocator is not None:
        bd.extras["allocator_setting"] = allocator
    if card is not None:
        _judge(bd, card)
    if out is not None:
        from .env import environment
        from .record import write_record

        write_record(out, job, bd, environment(meter.device))
    return bd


def _card_bytes(gpu_memory_bytes: Any) -> int:
    if isinstance(gpu_memory_bytes, bool) or not isinstance(gpu_memory_bytes, int) or gpu_memory_bytes <= 0:
        raise JobError(f"gpu_memory_bytes must be a whole number of bytes > 0 (e.g. 24 * 2**30); got {gpu_memory_bytes!r}")
    return gpu_memory_bytes


def _require_cuda(dev: Any) -> None:
    if dev.type != "cuda":
        raise MemfitError("find_max_batch rehearses a card and needs a CUDA GPU")


def _judge(bd: Breakdown, card: dict[str, Any]) -> None:
    """Fill the card fields of a rehearsed Breakdown: fits, headroom (card - context - peak reserved)."""
    fits = bool(bd.extras.get("fits", True))
    bd.gpu_memory_bytes = card["gpu_memory_bytes"]
    bd.fits = fits
    if fits:
        bd.device_total_bytes = card["cuda_context_bytes"] + bd.peak_reserved_bytes
        bd.headroom_bytes = card["gpu_memory_bytes"] - bd.device_total_bytes
    else:
        bd.device_total_bytes = card["gpu_memory_bytes"]
        bd.headroom_bytes = None  # how much more it needed is not known from an out-of-memory error
    bd.extras["card"] = dict(card)


def find_max_batch(job: Job | dict[str, Any], gpu_memory_bytes: int, *, start: int | None = None,
                   steps: int | None = None, limit: int = 4096, device: Any = None, spec: Any = None,
                   on_trial: Any = None) -> dict[str, Any]:
    """The largest micro-batch of ``job`` that really runs on a card of ``gpu_memory_bytes``, rehearsed on
    this GPU (see :func:`measure`'s ``gpu_memory_bytes``).

    The model is built once (at batch 1 - the build does not depend on the batch); each trial then makes
    a fresh optimizer and fresh inputs for its batch and runs ``steps`` reference steps (default: 2 for
    training - step 1 creates the optimizer state, step 2 is steady - and 1 ``generate()``/prefill call for
    inference). A trial passes when its steps complete; an out-of-memory error fails it, and everything
    it made is freed (``gc.collect()``, ``empty_cache()``, peak stats reset) before the next. The search is
    :func:`memfit.measurer.fit.search_max_batch` (``start`` is a hint where to begin; it never changes the
    answer). ``on_trial(entry)`` is called after each trial. A trial after an out-of-memory failure here runs on
    the address space that failure left, and can pass where a fresh process fails (up to 6 batches above on the
    rehearsed OLMoE pairs): :func:`memfit.measurer.fresh.confirmed_max_batch` (what ``memfit measure
    --find-max-batch`` answers) runs this search in a worker and checks its boundary in fresh processes.

    Returns ``{"max_batch_size", "model_fits", "trials": [{batch_size, ok, peak_allocated_bytes,
    peak_reserved_bytes, device_total_bytes, seconds, ...}], "boundary": Breakdown dict at the answer (or
    None), "card", "allocator_setting", "steps", "start", "build_seconds", "note"}``.
    """
    torch = require_torch()
    if isinstance(job, dict):
        job = Job.from_dict(job)
    check_supported(job)
    cap = _card_bytes(gpu_memory_bytes)
    training = job.task == "train"
    if steps is None:
        steps = 2 if training else 1
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise JobError(f"steps must be a whole number >= 1; got {steps!r}")
    dev = _resolve_device(torch, device)
    _require_cuda(dev)
    if spec is None:
        spec = resolve_spec(job.model)
    _check_lengths(job, spec)
    from .card import apply_allocator_setting, rehearse_card, release_card
    from .fit import search_max_batch
    from .meters import CudaMeter, Nvml

    allocator = apply_allocator_setting(torch, job.expandable_segments)  # before the meter initialises CUDA
    meter = CudaMeter(dev)
    card = rehearse_card(torch, meter, cap)
    nvml = Nvml(dev)
    result: dict[str, Any] = {"gpu_memory_bytes": cap, "card": card, "allocator_setting": allocator,
                              "steps": steps, "start": start, "limit": limit, "trials": [], "boundary": None}
    model = None
    breakdowns: dict[int, Breakdown] = {}
    caught: list[str] = []
    try:
        meter.start()
        t0 = time.perf_counter()
        oom = None
        with _quiet(caught):
            try:
                model = build_model(job.replace(batch_size=1), spec, dev)
            except BaseException as exc:  # noqa: BLE001 - only out-of-memory is caught
                if not _is_oom(exc):
                    raise
                oom = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        torch.cuda.synchronize(dev)
        result["build_seconds"] = round(time.perf_counter() - t0, 3)
        result["load_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        if model is None:
            gc.collect()
            torch.cuda.empty_cache()
            result.update(max_batch_size=0, model_fits=False, oom_message=oom,
                          note=f"does not fit: building the model needs more than the "
                               f"{card['allocator_limit_bytes'] / GiB:.2f} GiB the card leaves after the CUDA context")
            return result
        result["model_fits"] = True
        result["weights_allocated_bytes"] = int(torch.cuda.memory_allocated(dev))

        def trial(b: int) -> bool:
            t = time.perf_counter()
            bd = _Run(job.replace(batch_size=b), spec, None, meter, steps, False, prebuilt=model).execute()
            for p in model.parameters():
                p.grad = None
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            ok = bool(bd.extras.get("fits", True))
            _judge(bd, card)
            entry = {"batch_size": b, "ok": ok, "peak_allocated_bytes": bd.peak_allocated_bytes,
                     "peak_reserved_bytes": bd.peak_reserved_bytes, "device_total_bytes": bd.device_total_bytes,
                     "seconds": round(time.perf_counter() - t, 3),
                     "num_alloc_retries": bd.extras.get("allocator", {}).get("num_alloc_retries")}
            if ok:
                entry["peak_phase"] = bd.peak_phase
                if bd.extras.get("nvml_process_used_bytes"):
                    entry["nvml_process_used_bytes"] = bd.extras["nvml_process_used_bytes"]
            else:
                entry["oom_phase"] = bd.extras.get("oom_phase")
                entry["oom_request_bytes"] = bd.extras.get("oom_request_bytes")
            breakdowns[b] = bd
            result["trials"].append(entry)
            if on_trial is not None:
                on_trial(entry)
            return ok

        best, _ = search_max_batch(trial, start=start, limit=limit)
        result["max_batch_size"] = best
        # a self-check of the cap: the allocator never held more than its limit
        result["cap_respected"] = all(t["peak_reserved_bytes"] <= card["allocator_limit_bytes"]
                                      for t in result["trials"])
        if best:
            result["boundary"] = breakdowns[best].to_dict()
        result["note"] = (f"largest micro-batch that runs: {best}" if best else
                          "does not fit: the model loads, but batch 1 runs out of memory")
        used = nvml.process_used()
        if used is not None:
            result["nvml_process_used_at_end_bytes"] = used
        return result
    finally:
        model = None
        breakdowns.clear()
        gc.collect()
        torch.cuda.empty_cache()
        release_card(torch, meter)
        if caught:
            result["warnings"] = caught


def measure_sweep(job: Job | dict[str, Any], precisions: tuple[str, ...] = SWEEP_PRECISIONS, *,
                  out: str | Path | None = None, **kwargs: Any) -> list[tuple[str, Breakdown]]:
    """Measure ``job`` once per precision; ``tf32`` is ``32-true`` with TF32 allowed (restored after).

    The runs share one process: each frees everything and empties the allocator's cache before the next,
    but what CUDA keeps for the process (the CUDA context, cuBLAS workspaces made by the first run) stays;
    for runs that start from nothing, use one process per job (``validation/run_records.py``).
    ``out`` writes one JSON list of records, each with its ``label``.
    """
    torch = require_torch()
    if isinstance(job, dict):
        job = Job.from_dict(job)
    results: list[tuple[str, Breakdown]] = []
    for label in precisions:
        if label == "tf32":
            with _tf32(torch):
                bd = measure(job.replace(precision="32-true"), **kwargs)
            bd.extras["tf32"] = True
        else:
            bd = measure(job.replace(precision=label), **kwargs)
        results.append((label, bd))
    if out is not None:
        from .env import environment
        from .record import make_record, write_json

        env = environment(kwargs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        records = []
        for label, bd in results:
            rec = make_record(Job.from_dict(bd.job), bd, env)
            rec["label"] = label
            rec.setdefault("name", label)  # what `memfit compare --measured FILE --name LABEL` picks
            if label == "tf32":  # the job estimate and trace read: 32-true (TF32 changes no byte)
                rec["job"]["precision"] = "32-true"
            records.append(rec)
        write_json(out, records)
    return results


def _check_lengths(job: Job, spec: Any) -> None:
    """A sequence past a learned position table: the one-line error before anything is built."""
    from ..checks import refuse_past_position_table

    refuse_past_position_table(job, spec)


def resolve_spec(name: str) -> Any:
    """The ModelSpec for ``job.model``: memfit.models.load_model where it is importable; else (while the
    registry is not there) a :class:`~memfit.reference.ConfigSpec` read from a local config.json."""
    try:
        from ..models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        return load_model(name)
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot read {str(path)!r}: {exc}") from None
        return spec_from_config(config, name=name)
    raise ModelNotFoundError(f"cannot resolve model {name!r}: memfit.models is not importable here and it is not "
                             "a path to a config.json")


# --------------------------------------------------------------------------------------------- helpers
def host_available_bytes() -> int | None:
    """Memory the host can still give (``MemAvailable`` of /proc/meminfo, Linux), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


#: Share of the host's available memory a CPU measurement may plan to use (the rest: Python, torch, the OS).
CPU_RUN_MEMORY_SHARE = 0.8


def check_host_memory(job: Job, spec: Any, available: int | None = None) -> None:
    """Refuse a CPU run whose estimated peak (live tensors, what the CPU run holds) is more than
    :data:`CPU_RUN_MEMORY_SHARE` of the host's available memory. Silent when either is unknown."""
    available = host_available_bytes() if available is None else available
    if not available:
        return
    try:
        from ..estimator import estimate

        need = estimate(job, spec).peak_allocated_bytes if hasattr(spec, "blocks") else estimate(job).peak_allocated_bytes
    except Exception:  # noqa: BLE001 - no estimate (a config the estimator cannot count): nothing to check
        return
    if need > CPU_RUN_MEMORY_SHARE * available:
        raise MemfitError(f"a CPU run of this job needs about {need / 2**30:.1f} GiB and the host has "
                          f"{available / 2**30:.1f} GiB available; measure it on a GPU, or use `memfit estimate` "
                          "/ `memfit trace` (no GPU needed)")


def _resolve_device(torch: Any, device: Any):
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        raise MemfitError("no CUDA device is visible to torch; measure needs a GPU, or --cpu (device='cpu') to run "
                          "a tiny job on the CPU; `memfit estimate` and `memfit trace` need no GPU")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MemfitError("no CUDA device is visible to torch; measure on the CPU with device='cpu' (--cpu) "
                          "and a tiny model")
    if dev.type not in ("cuda", "cpu"):
        raise JobError(f"measure runs on cuda or cpu, not {dev.type}")
    return dev


def _spec_for_user_model(job: Job, model: Any) -> Any:
    """A spec for a user's module, from its own config (head, vocabulary, labels); None for a plain module.

    ``job.model`` is only a label here: it is not resolved (no registry or Hub lookup)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        head = "seq_cls" if type(inner).__name__.endswith("ForSequenceClassification") else "causal_lm"
        return spec_from_config(config.to_dict(), name=job.model, head=head)
    return None


def _vocab_size(spec: Any, model: Any) -> int | None:
    if model is not None:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = getattr(inner, "config", None)
        if getattr(config, "vocab_size", None):
            return int(config.vocab_size)
        emb = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
        if emb is None:  # a plain module: its first embedding table
            emb = next((m for m in inner.modules() if hasattr(m, "num_embeddings")), None)
        if emb is not None and hasattr(emb, "num_embeddings"):
            return int(emb.num_embeddings)
    return getattr(spec, "vocab_size", None)


_OOM_TEXT = ("out of memory", "can't allocate memory")


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return isinstance(exc, (RuntimeError, MemoryError)) and any(t in str(exc).lower() for t in _OOM_TEXT)


_UNIT = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def _requested_bytes(message: str) -> int | None:
    m = re.search(r"Tried to allocate ([0-9.]+) (B|KiB|MiB|GiB|TiB)", message)
    return int(float(m.group(1)) * _UNIT[m.group(2)]) if m else None


@contextlib.contextmanager
def _tf32(torch: Any) -> Iterator[None]:
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class _Progress:
    """A transient rich progress bar on stderr, shown only once the run has taken more than a second."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total
        self._lock = threading.Lock()
        self._started = self._closed = False
        self._bar = self._task = self._timer = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                 console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task("measure: building the model", total=self.total)
            self._timer = threading.Timer(1.0, self._start)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _start(self) -> None:
        with self._lock:
            if not self._closed and not self._started:
                self._bar.start()
                self._started = True

    def update(self, description: str, advance: int = 0) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=f"measure: {description}", advance=advance)

    def __exit__(self, *exc: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._closed = True
            if self._started:
                self._bar.stop()


# --------------------------------------------------------------------------------------------- recorder
class _Recorder(PhaseRecorder):
    """The phase hooks (:class:`PhaseRecorder`) plus what one device's run keeps besides: the load's peak,
    the gradients at the end of backward, the KV cache at prefill and decode, NVML's view once per step."""

    def __init__(self, meter: Any, nvml: Any = None) -> None:
        super().__init__(meter)
        self.nvml = nvml
        self.device = meter.device
        self.model: Any = None
        self.load_peak = 0
        self.nvml_process = 0
        self.nvml_device = 0
        self.grads_after_backward = 0
        self.kv: dict[str, int] = {}
        self._decode_calls = 0

    # load -------------------------------------------------------------------------------------
    def end_load(self) -> None:
        m = self.meter
        self.load_peak = m.peak()
        self.after["after_load"] = m.current()
        self.load_reserved = m.peak_reserved()
        used = m.device_used()
        self.load_device_used = used
        self.phase = "end"

    # hooks ------------------------------------------------------------------------------------
    def on_phase(self, name: str) -> None:
        if name == "prefill":
            self._decode_calls = 0
        super().on_phase(name)

    def on_decode_step(self, cache: Any) -> None:
        self._decode_calls += 1
        if not self.recording:
            return
        kv = tensor_bytes(cache_tensors(cache), self.device)
        if self._decode_calls == 1:
            self.kv["prefill"] = kv  # the prompt's keys and values, complete when the first logits exist
        self.kv["decode"] = kv

    def _close(self, phase: str, next_name: str) -> None:
        super()._close(phase, next_name)
        if phase == "backward" and self.model is not None:
            self.grads_after_backward = gradient_bytes(self.model, self.device)
        if next_name == "end" and self.nvml is not None:  # once per step: NVML calls take milliseconds
            self.nvml_process = max(self.nvml_process, self.nvml.process_used() or 0)
            self.nvml_device = max(self.nvml_device, self.nvml.device_used() or 0)


# --------------------------------------------------------------------------------------------- run
class _Run:
    def __init__(self, job: Job, spec: Any, user_model: Any, meter: Any, steps: int, progress: bool,
                 prebuilt: Any = None) -> None:
        self.job, self.spec, self.user_model, self.meter = job, spec, user_model, meter
        self.prebuilt = prebuilt  # a model built by build_model earlier (find_max_batch builds it once)
        self.steps, self.progress = steps, progress
        self.device = meter.device
        self.training = job.task == "train"
        self.model = self.optimizer = self.batch = self.scaler = None
        self.recorder: _Recorder | None = None
        self.times: list[float] = []
        self.warnings: list[str] = []
        self.extras: dict[str, Any] = {}
        self.first_measured = 1 if steps > 1 else 0

    def execute(self) -> Breakdown:
        meter = self.meter
        nvml = None
        meter.start()
        try:
            if meter.kind == "cuda-allocator":
                from .meters import Nvml

                nvml = Nvml(self.device)
                self.extras["device_used_at_start_bytes"] = meter.device_used()
            self.recorder = _Recorder(meter, nvml)
            oom = None
            with _Progress(self.progress, self.steps + 1) as bar, _quiet(self.warnings):
                try:
                    self._load(bar)
                    self._steps(bar)
                except BaseException as exc:  # noqa: BLE001 - only out-of-memory is caught, the rest re-raised
                    if not _is_oom(exc):
                        raise
                    text = str(exc).strip()
                    oom = {"phase": self.recorder.phase,
                           "message": text.splitlines()[0][:500] if text else type(exc).__name__,
                           "request_bytes": _requested_bytes(text)}
                # the exception and its traceback (which holds the step's tensors) are gone here
                bd = self._oom_breakdown(oom) if oom is not None else self._breakdown()
        finally:
            meter.stop()
            self._free()
        return bd

    # ------------------------------------------------------------------------------------------
    def _load(self, bar: _Progress) -> None:
        job, rec = self.job, self.recorder
        rec.phase = "load"
        if self.prebuilt is not None:
            self.model = self.prebuilt
        else:
            self.model = build_model(job, self.spec, self.device, user_model=self.user_model)
        self.user_model = None  # measure holds the model through self.model only (so it can be freed)
        self.meter.adopt(_model_tensors(self.model))
        if self.training:
            self.optimizer = make_optimizer(job, self.model)
            self.scaler = make_grad_scaler(job, self.device)
        num_labels = None
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if getattr(self.spec, "head", None) == "seq_cls":
            num_labels = getattr(getattr(inner, "config", None), "num_labels", None)
        self.batch = make_batch(job, self.spec, self.device, vocab_size=_vocab_size(self.spec, self.model),
                                num_labels=num_labels)
        if job.task == "infer" and job.new_tokens > 0 and getattr(self.spec, "head", "causal_lm") != "causal_lm":
            raise JobError("new_tokens > 0 generates text and needs a causal_lm head")
        self.meter.synchronize()
        rec.model = self.model
        rec.end_load()
        bar.update("built", advance=1)

    def _steps(self, bar: _Progress) -> None:
        job, rec, meter = self.job, self.recorder, self.meter
        first_measured = 1 if self.steps > 1 else 0
        for i in range(self.steps):
            if i == first_measured:
                rec.start_window()
            bar.update(f"step {i + 1}/{self.steps}" + (" (warm-up)" if i < first_measured else ""))
            meter.synchronize()
            t0 = time.perf_counter()
            if self.training:
                train_step(job, self.model, self.optimizer, self.batch, self.scaler, hooks=rec)
            else:
                infer(job, self.model, self.batch, hooks=rec)
            meter.synchronize()
            self.times.append(time.perf_counter() - t0)
            bar.update(f"step {i + 1}/{self.steps}", advance=1)
        rec.finish()
        self.first_measured = first_measured

    def _free(self) -> None:
        self.model = self.optimizer = self.batch = self.scaler = None
        if self.recorder is not None:
            self.recorder.model = None
        gc.collect()
        try:
            self.meter.free_all()
        except Exception:  # noqa: BLE001 - freeing must not hide the answer
            pass

    # ------------------------------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        job = self.job
        base, trainable, lora = count_parameters(self.model) if self.model is not None else (0, 0, 0)
        if not self.training:
            trainable = 0  # nothing is trained in an inference run, whatever requires_grad says
        if self.model is None and getattr(self.spec, "parameters", None):
            base = int(self.spec.parameters)
        return {"engine": "measure", "model": job.model, "job": job.to_dict(), "parameters": base,
                "trainable_parameters": trainable, "measurement": self.meter.kind}

    def _environment_extras(self) -> dict[str, Any]:
        from .env import environment

        env = environment(self.device)
        keep = ("gpu_name", "driver", "torch_cuda", "torch", "transformers", "peft", "bitsandbytes",
                "PYTORCH_CUDA_ALLOC_CONF")
        out = {k: env.get(k) for k in keep if k in env}
        out["device"] = env.get("gpu_name") or "cpu"
        return out

    def _breakdown(self) -> Breakdown:
        job, rec, meter = self.job, self.recorder, self.meter
        training = self.training
        steady = {p: rec.phases[p] for p in (_TRAIN_PHASES if training else _INFER_PHASES) if p in rec.phases}
        peak_phase = max(steady, key=lambda p: steady[p])
        peak = steady[peak_phase]
        mb = model_bytes(self.model, self.device)
        comps: dict[str, int] = {"weights": mb.weights}
        if mb.lora_adapters:
            comps["lora_adapters"] = mb.lora_adapters
        if mb.quantization_state:
            comps["quantization_state"] = mb.quantization_state
        paged = 0
        if training:
            states, paged = optimizer_state_bytes(self.optimizer, self.device, exclude=mb.storages)
            comps["optimizer_states"] = states
            comps["gradients"] = rec.grads_after_backward if peak_phase in ("backward", "optimizer_step") else 0
        else:
            comps["kv_cache"] = rec.kv.get(peak_phase, 0)
        comps["inputs"] = tensor_bytes(self.batch.values(), self.device, exclude=mb.storages)
        # Bytes that stay allocated between steps but are none of the above (cuBLAS workspaces, GradScaler
        # state, step counters): "other". Only when the window started after a warm-up step.
        persistent = comps.get("weights", 0) + comps.get("lora_adapters", 0) + comps.get("quantization_state", 0) \
            + comps.get("optimizer_states", 0) + comps["inputs"]
        if self.first_measured and rec.window_start > persistent:
            comps["other"] = rec.window_start - persistent
        rest = peak - sum(comps.values())
        rest_name = "temporaries" if peak_phase == "optimizer_step" else "activations"
        comps[rest_name] = max(rest, 0)
        notes: list[str] = []
        if rest < 0:
            notes.append(f"the named components exceed the measured peak by {fmt_gib(-rest)}: an accounting "
                         "mismatch, please report it")
        cpu = meter.kind == "cpu-tensors"
        if cpu:
            notes.append(CPU_NOTE)
        if self.first_measured == 0:
            notes.append("one step only: the peak includes the warm-up (optimizer state created in the step); "
                         "use steps >= 2 for the steady state")
        if rec.load_peak > peak:
            notes.append(f"loading peaked at {fmt_gib(rec.load_peak)}, above the steady-state peak of "
                         f"{fmt_gib(peak)}")
        if peak_phase == "backward":
            notes.append("the backward peak is split with all gradients present at the end of backward; "
                         "if it came earlier, part of activations is counted as gradients")
        if paged:
            notes.append(f"the paged optimizer keeps {fmt_gib(paged)} of state in CUDA unified memory, outside "
                         "PyTorch's allocator and outside these numbers")
        measured = self.times[self.first_measured:] or self.times
        step_time = statistics.median(measured) if measured else None
        tokens = self._tokens_per_step()
        extras: dict[str, Any] = {
            "fits": True,
            "allocated_between_steps_bytes": rec.window_start,
            "steps": self.steps,
            "warmup_steps": self.first_measured,
            "step_time_s": step_time,
            "step_times_s": [round(t, 6) for t in self.times],
            "tokens_per_step": tokens,
            "tokens_per_s": (tokens / step_time) if step_time else None,
            "load_peak_bytes": rec.load_peak,
            "boundary_allocated_bytes": dict(rec.after),
            "gradients_after_backward_bytes": rec.grads_after_backward if training else 0,
            "lora_parameters": count_parameters(self.model)[2],
        }
        if paged:
            extras["optimizer_paged_bytes"] = paged
        if not training and rec.kv:
            extras["kv_cache_bytes"] = dict(rec.kv)
        if not cpu:
            extras["allocator"] = meter.allocator_stats()
            if rec.nvml_process:
                extras["nvml_process_used_bytes"] = rec.nvml_process
            if rec.nvml_device:
                extras["nvml_device_used_bytes"] = rec.nvml_device
        extras.update(self.extras)
        extras.update(self._environment_extras())
        if self.warnings:
            extras["warnings"] = list(self.warnings)
        reserved = peak if cpu else max(rec.peak_reserved, peak)
        device_total = peak if cpu else max(rec.device_used, reserved)
        return Breakdown(**self._common(), components=comps, peak_allocated_bytes=peak,
                         peak_reserved_bytes=reserved, device_total_bytes=device_total, peak_phase=peak_phase,
                         phases={"load": rec.load_peak, **steady}, notes=notes, extras=extras)

    def _tokens_per_step(self) -> int:
        job = self.job
        if self.training:
            return job.batch_size * job.seq_len
        if job.new_tokens:
            return job.batch_size * job.new_tokens  # generated tokens per generate() call
        return job.batch_size * job.prompt_len

    def _oom_breakdown(self, oom: dict[str, Any]) -> Breakdown:
        rec, meter = self.recorder, self.meter
        peak = max([rec.load_peak, rec.between, meter.peak(), *rec.phases.values()])
        comps: dict[str, int] = {}
        if self.model is not None:
            mb = model_bytes(self.model, self.device)
            comps["weights"] = mb.weights
            if mb.lora_adapters:
                comps["lora_adapters"] = mb.lora_adapters
            if mb.quantization_state:
                comps["quantization_state"] = mb.quantization_state
            if self.optimizer is not None:
                states = optimizer_state_bytes(self.optimizer, self.device, mb.storages)[0]
                if states:
                    comps["optimizer_states"] = states
            grads = gradient_bytes(self.model, self.device)
            if grads:
                comps["gradients"] = grads
        else:
            # the model was being built: what was allocated when it failed is (partly built) weights
            comps["weights"] = meter.current()
        named = dict(comps)
        comps["other"] = max(peak - sum(named.values()), 0)
        capacity = meter.capacity() or peak
        largest = max(named, key=lambda k: named[k]) if named else "other"
        size = (named or comps)[largest]
        phase = oom["phase"]
        notes = [f"does not fit: it needed more than {capacity / GiB:.2f} GiB at {phase}; largest component so far: "
                 f"{largest} {size / GiB:.2f} GiB"]
        if meter.kind == "cpu-tensors":
            notes.append(CPU_NOTE)
        extras: dict[str, Any] = {"fits": False, "oom_phase": phase, "oom_message": oom["message"],
                                  "oom_request_bytes": oom["request_bytes"], "steps": self.steps,
                                  "steps_completed": len(self.times)}
        if meter.kind != "cpu-tensors":
            extras["allocator"] = meter.allocator_stats()
        extras.update(self.extras)
        extras.update(self._environment_extras())
        if self.warnings:
            extras["warnings"] = list(self.warnings)
        reserved = max(rec.peak_reserved, meter.peak_reserved(), peak)
        return Breakdown(**self._common(), components=comps, peak_allocated_bytes=peak,
                         peak_reserved_bytes=reserved, device_total_bytes=max(capacity, reserved),
                         peak_phase=phase, phases={"load": rec.load_peak, **rec.phases}, notes=notes, extras=extras)


def _model_tensors(model: Any) -> Iterator[Any]:
    yield from model.parameters()
    yield from model.buffers()
