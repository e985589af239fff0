"""The planner: jobs near a starting job that fit a card, ranked by estimated training speed.

Memory comes only from the estimator (:func:`fits` calls :func:`memfit.estimator.estimate` and the fit
verdict of :mod:`memfit.verdict`); speed from :mod:`memfit.plan.steptime`. The search keeps the global
batch (micro-batch x accumulation x data-parallel ranks) and moves the levers it is allowed to:
method, precision, optimizer, checkpointing, micro-batch, strategy, offload, tensor parallelism, the
attention kernel and the allocator setting.

Every candidate (a setting of the levers at one micro-batch) is timed first, in arithmetic; then the
candidates are walked fastest first, and the estimator is asked only about settings the walk reaches before
the list is full. A candidate whose floor (weights, optimizer states, gradients, the layers' kept activations
or the loss's fp32 scores: bytes the event stream holds at one moment) plus the CUDA context passes the card is
out without a stream or a replay.
Each candidate the walk reaches has its own verdict; a micro-batch above a failing one is taken not to fit
(memory does not fall as the micro-batch grows; where it does, a candidate is missed, never recommended). Each candidate returned as
fitting has its own estimate with its capped replay (:func:`fits`), which gives its device total.

The questions one call asks share a :class:`memfit.estimator.Memo` (dropped when the call returns): a job's
event stream is built once, each replay made once, and a replay under the card less the margin that never
reached its limit answers for the card itself; the verdict is asked before the breakdown, which then reuses
its replay. Settings that differ only in the allocator setting share their step times (the step-time model
does not read it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..errors import JobError, brief
from ..job import Job
from .steptime import BatchTimer, step_time

__all__ = ["Candidate", "PlanResult", "fits", "plan", "LEVERS", "max_seq_len", "min_gpus", "max_batch"]

LEVERS = ("method", "precision", "optimizer", "checkpointing", "batch", "strategy", "offload", "tp",
          "expandable", "attention")
# what a lever may move to by default (changing what is trained is opt-in: --vary method, optimizer)
_SAFE_OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit")
_ALL_OPTIMIZERS = _SAFE_OPTIMIZERS + ("paged-adamw", "adafactor", "sgd")
_NUMERICS = {"adamw-8bit": "8-bit optimizer states", "paged-adamw-8bit": "8-bit optimizer states",
             "qlora": "4-bit (NF4) frozen base", "bf16-true": "pure 16-bit weights", "16-true": "pure 16-bit weights",
             "adafactor": "factored second moments", "sgd": "a different optimizer", "lora": "trains adapters only"}


def _accepts_gpu_memory() -> bool:
    from ..estimator import estimate

    return "gpu_memory_bytes" in inspect.signature(estimate).parameters


_GPU_ARG: bool | None = None


def fits(job: Job, gpu_memory_bytes: int, spec=None, memo=None):
    """``(fits, breakdown)``: the estimator's answer for ``job`` on a card of ``gpu_memory_bytes``
    (``Breakdown.fits`` where the estimator fills it, else device total <= card, via :func:`memfit.verdict.verdict`).
    ``memo``: a :class:`memfit.estimator.Memo` (streams and replays shared with other questions about the model)."""
    global _GPU_ARG
    from ..estimator import estimate
    from ..verdict import verdict

    if _GPU_ARG is None:
        _GPU_ARG = _accepts_gpu_memory()
    if not _GPU_ARG:
        b = estimate(job, spec)
    elif memo is not None:
        b = estimate(job, spec, gpu_memory_bytes=gpu_memory_bytes, memo=memo)
    else:
        b = estimate(job, spec, gpu_memory_bytes=gpu_memory_bytes)
    return bool(verdict(b, gpu_memory_bytes)["fits"]), b


def _fits_first(job: Job, gpu_memory_bytes: int, spec, memo):
    """:func:`fits`, the verdict asked first (:func:`memfit.estimator.fits_on`, the same capped replay, without
    the rest of the estimate where it does not fit: ``(False, None)``); the estimate then reuses its replay."""
    from ..estimator import fits_on

    if not fits_on(job, gpu_memory_bytes, spec, memo=memo):
        return False, None
    return fits(job, gpu_memory_bytes, spec, memo)


@dataclass
class Candidate:
    """One job the planner considered, with its memory and speed."""

    job: Job
    fits: bool
    device_total_bytes: int
    headroom_bytes: int
    accumulation: int
    step_time_seconds: float
    tokens_per_second: float
    changes: list[str] = field(default_factory=list)
    numerics: list[str] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job.to_dict(), "fits": self.fits, "device_total_bytes": self.device_total_bytes,
                "headroom_bytes": self.headroom_bytes, "gradient_accumulation": self.accumulation,
                "step_time_seconds": self.step_time_seconds, "tokens_per_second": self.tokens_per_second,
                "changes": self.changes, "changes_numerics": self.numerics, "reason": self.reason}


@dataclass
class PlanResult:
    """Candidates best first (all fit), or the closest ones that do not (``fits`` false) when none fits."""

    candidates: list[Candidate]
    gpu_memory_bytes: int
    gpu: str | None
    global_batch: int
    evaluated: int
    """Candidates (a setting of the levers at one micro-batch) with a step time and an exact fit verdict:
    their own estimate (capped replay), or a floor (persistent states plus the CUDA context above the card)
    that proves no micro-batch of the setting fits."""
    judged: int = 0
    """Those plus the candidates given "does not fit" because a smaller micro-batch of their setting does not
    (memory does not fall as the micro-batch grows; never used to recommend one)."""
    timed: int = 0
    """Candidates given a step time: every setting at every micro-batch the global batch allows. The ones not
    judged are slower than every candidate returned."""
    estimator_calls: int = 0
    """Estimates (capped allocator replays) the search ran."""

    @property
    def any_fits(self) -> bool:
        return bool(self.candidates) and self.candidates[0].fits

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "gpu_memory_bytes": self.gpu_memory_bytes, "global_batch": self.global_batch,
                "fits": self.any_fits, "evaluated": self.evaluated, "judged": self.judged,
                "timed": self.timed, "estimator_calls": self.estimator_calls,
                "candidates": [c.to_dict() for c in self.candidates]}


#: Largest global batch a plan takes (as a job's micro-batch): 2**31 sequences have at most a few thousand
#: divisors, found in some 46,000 trial divisions; 10**20 would take hours.
_MAX_GLOBAL_BATCH = (1 << 31) - 1


def _divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order, by trial division up to its square root (a micro-batch of
    2**31 has at most a few thousand divisors; walking every number below it would take minutes)."""
    low, high = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            low.append(d)
            if d * d != n:
                high.append(n // d)
        d += 1
    return low + high[::-1]


def _levers(vary: Iterable[str] | None, keep: Iterable[str] | None) -> tuple[set[str], bool]:
    """(levers that may move, whether method/optimizer may change what is trained)."""
    for name in list(vary or []) + list(keep or []):
        if name not in LEVERS:
            raise JobError(f"unknown lever {name!r}; levers: {', '.join(LEVERS)}")
    if vary:
        return set(vary), True
    return set(LEVERS) - set(keep or []), False


def _settings(job: Job, levers: set[str], explicit: bool) -> list[dict[str, Any]]:
    """Field changes (without the micro-batch) the search tries, the starting job's own first."""
    train = job.task == "train"
    methods = [job.method]
    if "method" in levers and train:
        if explicit and "method" in levers:
            methods = ["full", "lora", "qlora"] if job.method == "full" else ["lora", "qlora"]
        elif job.method == "lora":
            methods = ["lora", "qlora"]
    precisions = [job.precision]
    if "precision" in levers:
        precisions = sorted({job.precision, "bf16-mixed", "bf16-true"} if job.precision != "16-true" else {job.precision, "bf16-true"})
    opts = [job.optimizer]
    if "optimizer" in levers and train:
        opts = list(dict.fromkeys([job.optimizer, *(_ALL_OPTIMIZERS if explicit else _SAFE_OPTIMIZERS)]))
    ckpts = [False, True] if ("checkpointing" in levers and train) else [job.gradient_checkpointing]
    exps = [False, True] if "expandable" in levers else [job.expandable_segments]
    attns = [job.attention] if "attention" not in levers or job.attention == "flash" else sorted({job.attention, "sdpa"})
    strategies = [job.strategy]
    if job.gpus > 1 and "strategy" in levers and train:
        strategies = ["ddp", "fsdp2", "zero1", "zero2", "zero3"]
    offloads = [job.offload]
    if "offload" in levers and train and job.gpus > 1:
        offloads = ["none", "optimizer"]
    tps = [job.tensor_parallel]
    if "tp" in levers and job.gpus > 1:
        per_node = job.gpus_per_node or job.gpus
        tps = [t for t in (1, 2, 4, 8) if t <= per_node and job.gpus % t == 0]
    out = []
    for m in methods:
        for p in precisions:
            for o in opts:
                if o != "adamw" and o == job.optimizer:
                    pass
                for c in ckpts:
                    for e in exps:
                        for a in attns:
                            for s in strategies:
                                for off in offloads:
                                    if off != "none" and s not in ("zero2", "zero3", "fsdp2"):
                                        continue
                                    for t in tps:
                                        ch = {"method": m, "precision": p, "optimizer": o, "gradient_checkpointing": c,
                                              "expandable_segments": e, "attention": a, "strategy": s, "offload": off,
                                              "tensor_parallel": t}
                                        if m == "qlora":
                                            # the QLoRA recipe: NF4 base, double quantization, bf16 compute
                                            ch.update(quantization="nf4", double_quant=True, precision="bf16-true")
                                        elif job.method == "qlora" and m != "qlora":
                                            ch.update(quantization="none")
                                        out.append(ch)
    # dedupe, keeping order
    seen, uniq = set(), []
    for ch in out:
        key = tuple(sorted(ch.items()))
        if key not in seen:
            seen.add(key)
            uniq.append(ch)
    return uniq


def _describe(start: Job, job: Job, accumulation: int) -> tuple[list[str], list[str]]:
    changes, numerics = [], []
    names = {"gradient_checkpointing": "checkpointing", "expandable_segments": "expandable_segments",
             "tensor_parallel": "tp"}
    for f in ("method", "quantization", "precision", "optimizer", "gradient_checkpointing", "attention", "strategy",
              "offload", "tensor_parallel", "expandable_segments"):
        a, b = getattr(start, f), getattr(job, f)
        if a != b:
            changes.append(f"{names.get(f, f)} {a} -> {b}")
            if f in ("method", "precision", "optimizer") and b in _NUMERICS:
                numerics.append(_NUMERICS[b])
    if job.batch_size != start.batch_size or accumulation != 1:
        changes.append(f"micro-batch {start.batch_size} -> {job.batch_size} x accumulation {accumulation}")
    return changes, numerics


def _timing_key(changes: dict[str, Any]) -> tuple:
    """What the step-time model (:mod:`memfit.plan.steptime`) reads of a setting (its field changes from the
    starting job): every change but the allocator setting (``expandable_segments`` decides where tensors land,
    not how long a step takes; neither steptime nor the :mod:`memfit.estimator.states` counts it calls read
    it), so a setting and its twin that differs only there share their step times (the same micro-batches:
    the layout is the same)."""
    return tuple(sorted((k, v) for k, v in changes.items() if k != "expandable_segments"))


class _Broken(Exception):
    """The estimator refused a setting (a JobError): it has no candidates."""


class _Setting:
    """One setting of the levers: its micro-batches, their step times, and what is known of their fit."""

    __slots__ = ("base", "sizes", "per_rank", "jobs", "verdicts", "fail_from", "floor_checked", "broken")

    def __init__(self, base: Job, sizes: list[int], per_rank: int):
        self.base, self.sizes, self.per_rank = base, sizes, per_rank
        self.jobs: dict[int, Job] = {}
        self.verdicts: dict[int, tuple[bool, Any]] = {}  # index -> (fits, Breakdown or None)
        self.fail_from = len(sizes)  # this index and every larger one do not fit (proven or by monotonicity)
        self.floor_checked = False
        self.broken = False  # the estimator refused the setting (JobError): no candidates

    def at(self, i: int) -> Job:
        j = self.jobs.get(i)
        if j is None:
            j = self.base.with_batch(self.sizes[i])  # a divisor of a validated batch, >= 1
            self.jobs[i] = j
        return j


def plan(job: Job, gpu=None, *, gpu_memory_bytes: int | None = None, global_batch: int | None = None,
         vary: Iterable[str] | None = None, keep: Iterable[str] | None = None, top: int = 10,
         spec=None, timing_gpu=None, min_headroom: float = 0.03) -> PlanResult:
    """Jobs like ``job`` that fit ``gpu`` (a catalog name or :class:`memfit.gpus.GPU`; or give
    ``gpu_memory_bytes`` alone, timed as an H100), best (highest estimated tokens/s) first.

    ``global_batch``: sequences per optimizer step to keep (default: the job's micro-batch x its
    data-parallel ranks). ``vary`` / ``keep``: which :data:`LEVERS` may move (default all that do not
    change what is trained). ``timing_gpu``: time on this card instead (rehearsing a small card on a big one).
    ``min_headroom``: a candidate must leave this fraction of the card free by the estimate (default 3%: in
    the first H200 rehearsal of the planning scenarios, validation/records/h200-plan-scenarios.json, the two
    candidates that ran out of memory had 2.1% and 2.6% estimated headroom; none with more failed).

    The search times every candidate first (pure arithmetic), then walks them fastest first and asks the
    estimator only about the ones that could still make the list: each recommended candidate has its own
    capped replay (:func:`fits`); a candidate is passed over without one when a sound floor (bytes its
    stream holds at one moment, plus the CUDA context, pass the card) or a smaller micro-batch of its setting that does not fit
    rules it out (memory does not fall as the micro-batch grows; where that fails, the candidate is only
    missed, never recommended)."""
    from ..checks import check_job_for_model
    from ..estimator import Memo, fits_on, floor_bytes
    from ..estimator.events import cuda_context_bytes
    from ..estimator.states import paged_optimizer_host_bytes
    from ..gpus import GPU, get_gpu
    from ..models import load_model

    if not isinstance(job, Job):
        raise JobError("plan() needs a memfit.Job")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise JobError(f"top (candidates to show) must be a whole number >= 1; got {brief(top)}")
    if global_batch is not None:
        if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
            raise JobError(f"global_batch must be a whole number >= 1; got {brief(global_batch)}")
        if global_batch > _MAX_GLOBAL_BATCH:  # its divisors are found by trial division to the square root
            raise JobError(f"global_batch must be at most {_MAX_GLOBAL_BATCH:,} sequences; got {brief(global_batch)}")
    card = gpu if isinstance(gpu, GPU) else (get_gpu(gpu) if gpu else None)
    mem = int(gpu_memory_bytes) if gpu_memory_bytes else (card.memory_bytes if card else None)
    if not mem or mem <= 0:
        raise JobError("plan needs a card: gpu='h100-80gb' (see `memfit gpus`) or gpu_memory_bytes")
    timing_card = card or get_gpu("h100-80gb")
    if not 0 <= min_headroom < 1:
        raise JobError(f"min_headroom is a fraction of the card in [0, 1); got {min_headroom!r}")
    budget = int(mem * (1 - min_headroom))  # the fit answer is asked for the card less the margin
    if timing_gpu is not None:
        timing_card = timing_gpu if isinstance(timing_gpu, GPU) else get_gpu(timing_gpu)
    spec = spec or load_model(job.model)
    levers, explicit = _levers(vary, keep)
    train = job.task == "train"
    gb = global_batch or job.batch_size * max(1, job.gpus // (job.tensor_parallel * job.pipeline_parallel))
    stats = {"replays": 0, "exact": 0, "inferred": 0}
    memo = Memo()  # streams and replays shared by the questions about this plan's jobs (only this call)

    # 1. every setting and micro-batch, timed (no memory work yet)
    settings: list[_Setting] = []
    entries: list[tuple[float, int, int, int, Any]] = []
    timed: dict[tuple, list] = {}  # step times of a setting's micro-batches, shared by its allocator-setting twin
    start = job.to_dict()
    for ch in _settings(job, levers, explicit):
        try:
            # job.replace(**ch) with the start's fields read once (its lists copied, as to_dict does)
            base = Job.from_dict({**{k: list(v) if isinstance(v, list) else v for k, v in start.items()}, **ch})
        except JobError:
            continue
        dp = max(1, base.gpus // (base.tensor_parallel * base.pipeline_parallel))
        if gb % dp:
            continue
        per_rank = gb // dp
        sizes = _divisors(per_rank) if ("batch" in levers and train) else [base.batch_size]
        try:
            check_job_for_model(base, spec)  # what it looks at does not depend on the micro-batch
            tkey = _timing_key(ch)
            times = timed.get(tkey)
            if times is None:
                timer = BatchTimer(base, spec, timing_card)
                times = timed[tkey] = [timer(mb, per_rank // mb) for mb in sizes]
        except JobError:
            continue
        s = _Setting(base, sizes, per_rank)
        settings.append(s)
        si = len(settings) - 1
        n_fields = len(_describe(job, base, 1)[0]) - (base.batch_size != job.batch_size)  # the levers it moves
        for i, mb in enumerate(sizes):
            acc = per_rank // mb
            t = times[i]
            # as len(_describe(job, s.at(i), acc)[0]): the levers, and the micro-batch line where it changes
            n_changes = n_fields + (mb != job.batch_size or acc != 1)
            entries.append((-t.tokens_per_second, n_changes, si, i, t))
    # fastest first; among equals fewer changes, then the order the settings were built in (a stable sort)
    entries.sort(key=lambda e: (e[0], e[1]))

    def floor_fails(s: _Setting) -> bool:
        """Settle by the floor (:func:`memfit.estimator.floor_bytes`) every micro-batch of ``s`` that cannot fit: it grows with
        the micro-batch, so those are the ones from the first that fails. Whether none is left."""
        if not s.floor_checked:
            s.floor_checked = True
            b = s.base
            room = budget - cuda_context_bytes(b.task) - paged_optimizer_host_bytes(spec, b)
            lo, hi = 0, len(s.sizes)  # the first index whose floor passes the room
            while lo < hi:
                mid = (lo + hi) // 2
                if floor_bytes(s.at(mid), spec) > room:
                    hi = mid
                else:
                    lo = mid + 1
            for i in range(lo, len(s.sizes)):
                if i not in s.verdicts:
                    stats["exact"] += 1
                    s.verdicts[i] = (False, None)
            s.fail_from = min(s.fail_from, lo)
        return s.fail_from == 0

    def decide(s: _Setting, i: int) -> bool:
        """Whether index ``i`` of ``s`` fits, by its own verdict (:func:`_fits_first`: the capped replay, then
        the estimate where it fits). The walk reaches a setting's micro-batches mostly largest (fastest)
        first, so each one it reaches is judged where it is, and a failure rules out every larger one of the
        setting (``fail_from``). Candidates the walk never reaches get no verdict: no boundary is searched for
        that the list does not need (a bisection, as before session 16, judged micro-batches too small to be
        listed: a fifth of the replays of the 14 comparison plans)."""
        if i >= s.fail_from:
            return False
        v = s.verdicts.get(i)
        if v is None:
            stats["replays"] += 1
            try:
                v = _fits_first(s.at(i), budget, spec, memo)
            except JobError:
                s.broken = True
                raise _Broken from None
            stats["exact"] += 1
            s.verdicts[i] = v
        if not v[0]:
            s.fail_from = i
        return v[0]

    # 2. the fastest first, each recommendation confirmed by its own estimate
    out: list[Candidate] = []
    for neg_tps, _, si, i, t in entries:
        if len(out) >= top:
            break
        s = settings[si]
        if s.broken or floor_fails(s) or i >= s.fail_from:
            continue
        mb = s.sizes[i]
        acc = s.per_rank // mb
        cj = s.at(i)
        changes, numerics = _describe(job, cj, acc)
        # the same speed and micro-batch with extra changes adds nothing (e.g. an allocator setting that
        # the estimate does not need)
        tps = -neg_tps
        if any(o.job.batch_size == mb and abs(o.tokens_per_second - tps) <= 1e-9 * tps
               and set(o.changes) < set(changes) for o in out):
            continue
        try:
            if not decide(s, i):
                continue
        except _Broken:
            continue
        if budget < mem:
            # a capped replay is not monotone in the cap either (a lower cap frees the cache earlier and can
            # pack better): what fits the card less the margin must also fit the card itself
            stats["replays"] += 1
            if not fits_on(cj, mem, spec, memo=memo):
                continue
        b = s.verdicts[i][1]
        out.append(Candidate(job=cj, fits=True, device_total_bytes=b.device_total_bytes,
                             headroom_bytes=mem - b.device_total_bytes, accumulation=acc,
                             step_time_seconds=t.seconds, tokens_per_second=t.tokens_per_second,
                             changes=changes, numerics=numerics, reason=t.reason))
    if not out:
        out = _closest(job, settings, spec, timing_card, mem, budget, top, min_headroom, stats, memo)
    for s in settings:
        stats["inferred"] += sum(1 for i in range(s.fail_from, len(s.sizes)) if i not in s.verdicts)
    return PlanResult(candidates=out, gpu_memory_bytes=mem, gpu=card.name if card else None, global_batch=gb,
                      evaluated=stats["exact"], judged=stats["exact"] + stats["inferred"], timed=len(entries),
                      estimator_calls=stats["replays"])


def _closest(job: Job, settings: list[_Setting], spec, timing_card, mem: int, budget: int, top: int,
             min_headroom: float, stats: dict[str, int], memo=None) -> list[Candidate]:
    """When nothing fits: the settings' smallest micro-batches with the smallest device totals (by their
    estimates), each saying by how much it misses. A setting whose floor (:func:`memfit.estimator.floor_bytes`) plus the CUDA context is
    above the ``top``-th smallest total found so far cannot be among them (the device total is at least
    that), so it is not estimated."""
    import bisect

    from ..estimator import floor_bytes
    from ..estimator.events import cuda_context_bytes
    from ..estimator.states import paged_optimizer_host_bytes

    pool = []
    for order, s in enumerate(settings):
        v = s.verdicts.get(0)
        if s.broken or (v is not None and v[0]):
            continue
        b = s.base
        pool.append((floor_bytes(s.at(0), spec) + cuda_context_bytes(b.task) + paged_optimizer_host_bytes(spec, b),
                     order, s))
    pool.sort(key=lambda t: (t[0], t[1]))
    found: list[tuple[int, int, _Setting]] = []
    devs: list[int] = []
    for floor, order, s in pool:
        if len(devs) >= top and floor > devs[top - 1]:
            break
        v = s.verdicts.get(0)
        if v is None or v[1] is None:
            stats["replays"] += 1
            try:
                v = fits(s.at(0), budget, spec, memo)
            except JobError:
                s.broken = True
                continue
            if 0 not in s.verdicts:
                stats["exact"] += 1
            s.verdicts[0] = v
        if v[0]:
            continue
        found.append((v[1].device_total_bytes, order, s))
        bisect.insort(devs, v[1].device_total_bytes)
    found.sort(key=lambda t: (t[0], t[1]))
    out = []
    for dev, _, s in found[:top]:
        cj, acc = s.at(0), s.per_rank // s.sizes[0]
        st = step_time(cj, spec, timing_card, accumulation=acc)
        ch, nu = _describe(job, cj, acc)
        out.append(Candidate(job=cj, fits=False, device_total_bytes=dev, headroom_bytes=mem - dev,
                             accumulation=acc, step_time_seconds=st.seconds,
                             tokens_per_second=st.tokens_per_second, changes=ch, numerics=nu,
                             reason=(f"too big by {(dev - mem) / 2**30:.2f} GiB" if dev > mem else
                                     f"fits with {(mem - dev) / 2**30:.2f} GiB, less than the "
                                     f"{100 * min_headroom:.0f}% margin")))
    return out


def max_seq_len(job: Job, gpu_memory_bytes: int, *, spec=None, limit: int = 1 << 20) -> int:
    """Longest training sequence (multiple of 128) at the job's micro-batch that fits (0 if none does), at most
    the model's learned position table where it has one (a longer sequence has no run)."""
    from ..boundary import largest_passing
    from ..models import load_model, spec_position_limit

    spec = spec or load_model(job.model)
    table = spec_position_limit(spec)
    if table and table[1]:
        limit = min(limit, table[0])
    if limit < 128:
        return 0
    units, _ = largest_passing(lambda u: fits(job.replace(seq_len=u * 128), gpu_memory_bytes, spec)[0],
                               limit=limit // 128)
    return units * 128


def min_gpus(job: Job, gpu_memory_bytes: int, *, spec=None, max_gpus: int = 64,
             gpus_per_node: int = 8) -> tuple[int, Job] | None:
    """Fewest GPUs (powers of two up to ``max_gpus``) on which ``job`` fits at its micro-batch, and the
    layout: the first of single / DDP / ZeRO-2 / FSDP2 / ZeRO-3 that fits at that count (None if none)."""
    from ..models import load_model

    spec = spec or load_model(job.model)
    n = 1
    while n <= max_gpus:
        strategies = ["single"] if n == 1 else (["ddp", "zero2", "fsdp2", "zero3"] if job.task == "train" else [])
        for s in strategies:
            try:
                cj = job.replace(gpus=n, gpus_per_node=min(n, gpus_per_node), strategy=s)
                if fits(cj, gpu_memory_bytes, spec)[0]:
                    return n, cj
            except JobError:
                continue
        n *= 2
    return None


def max_batch(job: Job, gpu_memory_bytes: int, *, spec=None, limit: int = 4096) -> int:
    """Largest micro-batch of ``job``'s layout that fits (0 if none), by the same fit answer."""
    from ..boundary import largest_passing
    from ..models import load_model

    spec = spec or load_model(job.model)
    return largest_passing(lambda b: fits(job.replace(batch_size=b), gpu_memory_bytes, spec)[0],
                           limit=max(1, limit))[0]
