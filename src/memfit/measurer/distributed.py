"""Measure a multi-GPU training job under torchrun: every rank runs the reference step and records its peaks.

    torchrun --standalone --nproc_per_node N -m memfit.measurer.distributed JOB OUTDIR [--steps S] [--warmup W]

JOB is a job JSON file (or a record holding one under ``job``) or inline JSON; rank 0 writes
``OUTDIR/record.json``: the job, a Breakdown of the most loaded rank (``peak_allocated_bytes`` is the largest
over the ranks) whose ``extras["ranks"]`` holds every rank's own breakdown, and the environment.

What runs on each rank (the reference run of :mod:`memfit.reference`, wrapped by the job's engine):

- ``ddp``: the model built on ``cuda:LOCAL_RANK`` and wrapped in ``DistributedDataParallel(device_ids=[rank],
  bucket_cap_mb=job.bucket_cap_mb, gradient_as_bucket_view=job.gradient_as_bucket_view)``; the step is
  :func:`memfit.reference.train_step` (autocast for ``*-mixed``).
- ``fsdp2``: ``fully_shard`` on every decoder layer (the model's ``_no_split_modules`` classes) and on the root,
  ``reshard_after_forward=job.reshard_after_forward``; ``*-mixed`` builds fp32 weights and shards them with
  ``MixedPrecisionPolicy(param_dtype=bf16|fp16, reduce_dtype=fp32)`` (no autocast: the gathered layers are
  16-bit); ``*-true`` builds 16-bit weights and shards them as they are.
- ``fsdp``: FSDP1 ``FullyShardedDataParallel`` with ``transformer_auto_wrap_policy`` on the decoder layers,
  ``ShardingStrategy[job.fsdp_sharding]`` and ``MixedPrecision(param_dtype=16-bit, reduce_dtype=fp32)`` for
  ``*-mixed``.
- ``zero1``/``zero2``/``zero3``: ``deepspeed.initialize`` with :func:`memfit.deepspeed_config.ds_config_for_job`
  and the job's torch optimizer; the step is ``engine(**batch).loss``, ``engine.backward(loss)``,
  ``engine.step()``.

``--simulate-rank R`` (no torchrun) runs rank R of the job alone on one device under PyTorch's fake process
group (``torch.testing._internal.distributed.fake_pg``): every allocation of that rank happens as in the real job,
the collectives move no data and allocate nothing of their own, and they complete at once (no stream waits). The
record says so (``measurement: cuda-allocator-simulated``) and the scorer leaves it out: it is a check of an
engine's layout where no multi-GPU machine is at hand, not evidence. DDP (with an in-place comm hook), FSDP2 and
ZeRO-1/2 run this way; ZeRO-3 does not (DeepSpeed compares lists across ranks while it partitions).

The first ``--warmup`` steps (default 2: the optimizer state is created in step 1, DDP rebuilds its buckets
and ZeRO-3 records its parameter trace in step 2) are not measured; peaks are the max over the rest, per
phase (forward, backward, optimizer_step), each rank on its own device.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from ..errors import JobError, MemfitError
from ..job import Job
from .recorder import PhaseRecorder

__all__ = ["main", "run_rank"]

_PHASES = ("forward", "backward", "optimizer_step")
#: the 16-bit compute of a *-mixed job under an engine that casts the gathered weights itself (no autocast)
_TRUE = {"bf16-mixed": "bf16-true", "16-mixed": "16-true"}


# --------------------------------------------------------------------------------------------- meter
class _Meter:
    """Allocated/reserved peaks of this rank's device (CUDA); on the CPU, live tensor bytes counted by
    :class:`memfit.measurer.meters.CpuMeter` (no allocator: a check of the engines' layouts, not a record)."""

    def __init__(self, torch: Any, device: Any) -> None:
        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"
        self.cpu = None
        if not self.cuda:
            self.cpu = _cpu_meter()

    def start(self) -> None:
        if self.cpu is not None:
            self.cpu.start()

    def stop(self) -> None:
        if self.cpu is not None:
            self.cpu.stop()

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def current(self) -> int:
        return int(self.torch.cuda.memory_allocated(self.device)) if self.cuda else self.cpu.current()

    def peak(self) -> int:
        return int(self.torch.cuda.max_memory_allocated(self.device)) if self.cuda else self.cpu.peak()

    def peak_reserved(self) -> int:
        return int(self.torch.cuda.max_memory_reserved(self.device)) if self.cuda else self.cpu.peak()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.cpu.reset_peak()

    def device_used(self) -> int:
        if not self.cuda:
            return 0
        free, total = self.torch.cuda.mem_get_info(self.device)
        return int(total - free)


def _cpu_meter():
    """memfit's CpuMeter counting the local shards of DTensors too (FSDP2's parameters, gradients and optimizer
    states are DTensors: a dispatch mode sees them, not the local tensors their ops allocate)."""
    from .meters import CpuMeter

    meter = CpuMeter()
    see = meter.tracker.see

    def see_local(t: Any) -> None:
        local = getattr(t, "_local_tensor", None)
        see(local if local is not None else t)

    meter.tracker.see = see_local  # type: ignore[method-assign]
    return meter


# --------------------------------------------------------------------------------------------- build
def _single(job: Job, precision: str | None = None) -> Job:
    """The one-device job whose model each rank builds (the engine wraps it afterwards)."""
    return job.replace(gpus=1, gpus_per_node=1, strategy="single", offload="none",
                       precision=precision or job.precision)


def _layer_classes(model: Any) -> set[type]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    classes = {type(m) for m in inner.modules() if type(m).__name__ in names}
    if not classes:
        raise JobError(f"{type(inner).__name__} names no decoder-layer class (_no_split_modules); "
                       "cannot wrap its layers")
    return classes


def _half(torch: Any, precision: str):
    return torch.float16 if precision in ("16-mixed", "16-true") else torch.bfloat16


def _build_ddp(torch: Any, job: Job, spec: Any, device: Any):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ..reference import build_model, make_optimizer

    single = _single(job)
    model = build_model(single, spec, device)
    ids = [device.index] if device.type == "cuda" else None
    wrapped = DDP(model, device_ids=ids, bucket_cap_mb=job.bucket_cap_mb,
                  gradient_as_bucket_view=job.gradient_as_bucket_view)
    if os.environ.get("MEMFIT_SIMULATED") == "1":
        # the fake process group's all-reduce returns no result: reduce in place (nothing) and hand the bucket back
        def _in_place(state, bucket):  # noqa: ANN001 - DDP checks the annotations: none given
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        wrapped.register_comm_hook(None, _in_place)
    return wrapped, make_optimizer(single, wrapped), single


def _build_fsdp2(torch: Any, job: Job, spec: Any, device: Any):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..reference import build_model, make_optimizer

    mixed = job.precision in ("16-mixed", "bf16-mixed")
    single = _single(job)
    model = build_model(single, spec, device)
    kwargs: dict[str, Any] = {"reshard_after_forward": job.reshard_after_forward}
    if mixed:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=_half(torch, job.precision), reduce_dtype=torch.float32)
    if job.offload != "none":
        from torch.distributed.fsdp import CPUOffloadPolicy

        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    classes = _layer_classes(model)
    for m in list(model.modules()):
        if type(m) in classes:
            fully_shard(m, **kwargs)
    fully_shard(model, **kwargs)
    # MixedPrecisionPolicy computes in 16 bits: the step runs without autocast, like a *-true run
    step_job = single.replace(precision=_TRUE[job.precision]) if mixed else single
    return model, make_optimizer(single, model), step_job


def _build_fsdp1(torch: Any, job: Job, spec: Any, device: Any):
    import functools

    from torch.distributed.fsdp import CPUOffload, FullyShardedDataParallel as FSDP, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from ..reference import build_model, make_optimizer

    mixed = job.precision in ("16-mixed", "bf16-mixed")
    single = _single(job)
    model = build_model(single, spec, device)
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=_layer_classes(model))
    mp = MixedPrecision(param_dtype=_half(torch, job.precision), reduce_dtype=torch.float32) if mixed else None
    wrapped = FSDP(model, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy[job.fsdp_sharding],
                   mixed_precision=mp, device_id=device if device.type == "cuda" else None,
                   use_orig_params=True, limit_all_gathers=True,
                   cpu_offload=CPUOffload(offload_params=True) if job.offload != "none" else None)
    step_job = single.replace(precision=_TRUE[job.precision]) if mixed else single
    return wrapped, make_optimizer(single, wrapped), step_job


def _build_deepspeed(torch: Any, job: Job, spec: Any, device: Any):
    try:
        import deepspeed
    except ImportError as exc:
        raise MemfitError("deepspeed is not installed; pip install deepspeed (DS_BUILD_OPS=0 is enough)") from exc
    from ..deepspeed_config import ds_config_for_job
    from ..reference import LR, build_model

    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        deepspeed.utils.logger.setLevel(logging.WARNING)
    except AttributeError:  # pragma: no cover
        pass
    # DeepSpeed keeps the model in its 16-bit dtype itself (engine casts the module): build it that way
    build_precision = {"bf16-mixed": "bf16-true", "16-mixed": "16-true"}.get(job.precision, job.precision)
    single = _single(job, build_precision)
    model = build_model(single, spec, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _torch_optimizer(torch, job, params, LR)
    cfg = ds_config_for_job(job)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg,
                                                   dist_init_required=False)
    step_job = single.replace(precision=build_precision)
    return engine, optimizer, step_job


def _torch_optimizer(torch: Any, job: Job, params: list[Any], lr: float):
    if job.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if job.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    if job.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if job.optimizer == "sgd-momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise JobError(f"the DeepSpeed measurement runs adamw, adam, sgd or sgd-momentum, not {job.optimizer}")


def _deepspeed_step(engine: Any, batch: dict[str, Any], hooks: Any) -> Any:
    from ..reference import forward_loss

    hooks.on_phase("forward")
    loss = forward_loss(engine, batch)
    hooks.on_phase("backward")
    engine.backward(loss)
    loss = loss.detach()
    hooks.on_phase("optimizer_step")
    engine.step()
    hooks.on_phase("end")
    return loss


# --------------------------------------------------------------------------------------------- accounting
def _storages(tensors: Any, device: Any, seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.device.type != device.type or (device.index is not None and local.device.index not in (None, device.index)):
            continue
        try:
            st = local.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if st.nbytes() == 0 or st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def _components(strategy: str, model: Any, optimizer: Any, batch: dict[str, Any], device: Any) -> dict[str, int]:
    """What this rank holds between steps, by kind (distinct storages on its device)."""
    seen: set[int] = set()
    comps: dict[str, int] = {}
    if strategy.startswith("zero"):
        module = model.module
        weights = []
        for p in module.parameters():
            weights.append(p.ds_tensor if hasattr(p, "ds_tensor") else p)
        comps["weights"] = _storages(weights, device, seen)
        inner = getattr(optimizer, "optimizer", None)
        masters = []
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            masters.extend(getattr(optimizer, name, None) or [])
        comps["master_weights"] = _storages(masters, device, seen)
        states = []
        if inner is not None:
            for st in inner.state.values():
                states.extend(v for v in st.values() if hasattr(v, "dim") and v.dim() > 0)
        comps["optimizer_states"] = _storages(states, device, seen)
    else:
        comps["weights"] = _storages(list(model.parameters()) + list(model.buffers()), device, seen)
        states = []
        for st in optimizer.state.values():
            states.extend(v for v in st.values() if hasattr(v, "dim") and v.dim() > 0)
        comps["optimizer_states"] = _storages(states, device, seen)
    comps["inputs"] = _storages(batch.values(), device, seen)
    return {k: v for k, v in comps.items() if v}


# --------------------------------------------------------------------------------------------- run
def run_rank(job: Job, *, steps: int = 4, warmup: int = 2) -> dict[str, Any]:
    """Run ``job`` on this rank (torch.distributed already initialized); return this rank's result."""
    import torch
    import torch.distributed as dist

    from .engine import resolve_spec

    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    meter = _Meter(torch, device)
    if meter.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    spec = resolve_spec(job.model)
    builders = {"ddp": _build_ddp, "fsdp2": _build_fsdp2, "fsdp": _build_fsdp1,
                "zero1": _build_deepspeed, "zero2": _build_deepspeed, "zero3": _build_deepspeed}
    if job.strategy not in builders:
        raise JobError(f"strategy {job.strategy} is not measured on several GPUs")
    if job.tensor_parallel > 1 or job.pipeline_parallel > 1 or job.expert_parallel > 1 or job.sequence_parallel:
        raise JobError("tensor/pipeline/expert/sequence parallelism is estimated, not measured (Megatron is not "
                       "part of the reference run)")
    if job.task != "train":
        raise JobError("the multi-GPU measurement runs training jobs")
    t0 = time.perf_counter()
    meter.start()
    try:
        return _run(job, spec, builders, meter, device, rank, local, steps, warmup, t0)
    finally:
        meter.stop()


def _run(job: Job, spec: Any, builders: dict, meter: _Meter, device: Any, rank: int, local: int, steps: int,
         warmup: int, t0: float) -> dict[str, Any]:
    import torch

    from ..reference import make_batch, make_grad_scaler, train_step

    model, optimizer, step_job = builders[job.strategy](torch, job, spec, device)
    load_s = time.perf_counter() - t0
    load_peak = meter.peak()
    gc.collect()
    if meter.cuda:
        torch.cuda.empty_cache()
    inner = model.module if hasattr(model, "module") else model
    vocab = getattr(getattr(inner, "config", None), "vocab_size", None)
    if hasattr(inner, "get_base_model"):
        vocab = getattr(inner.get_base_model().config, "vocab_size", vocab)
    batch = make_batch(step_job, spec, device, vocab_size=vocab)
    scaler = make_grad_scaler(step_job, device) if job.strategy in ("ddp",) else None
    rec = PhaseRecorder(meter, sync=True)  # collectives run on streams of their own: wait at each boundary
    deepspeed = job.strategy.startswith("zero")
    # allocated bytes as each decoder layer's forward starts (the last step): activations and gathered weights
    layer_alloc: list[int] = []
    handles = []
    if meter.cuda:
        classes = _layer_classes(inner)
        for m in inner.modules():
            if type(m) in classes:
                handles.append(m.register_forward_pre_hook(
                    lambda *_: layer_alloc.append(int(torch.cuda.memory_allocated(device)))))
    times: list[float] = []
    losses: list[float] = []
    for i in range(steps):
        if i == warmup:
            rec.start_window()
        meter.synchronize()
        t = time.perf_counter()
        layer_alloc.clear()
        if deepspeed:
            loss = _deepspeed_step(model, batch, rec)
        else:
            loss = train_step(step_job, model, optimizer, batch, scaler, hooks=rec)
        meter.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    rec.finish()
    for h in handles:
        h.remove()
    allocator = {}
    if meter.cuda:
        stats = torch.cuda.memory_stats(device)
        allocator = {k: int(stats[k]) for k in ("num_alloc_retries", "num_ooms", "segment.all.peak",
                                                 "requested_bytes.all.peak", "inactive_split_bytes.all.peak")
                     if k in stats}
    comps = _components(job.strategy, model, optimizer, batch, device)
    steady = {p: rec.phases[p] for p in _PHASES if p in rec.phases}
    peak_phase = max(steady, key=steady.get) if steady else "forward"
    peak = steady.get(peak_phase, 0)
    named = sum(comps.values())
    if rec.window_start > named:
        comps["other"] = rec.window_start - named
    rest = peak - sum(comps.values())
    comps["temporaries" if peak_phase == "optimizer_step" else "activations"] = max(rest, 0)
    host_pinned = 0
    try:
        import psutil

        host_pinned = int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - host memory is a side fact
        pass
    measured = times[warmup:] or times
    return {
        "rank": rank, "local_rank": local, "device": str(device),
        "components": comps, "peak_allocated_bytes": peak,
        "peak_reserved_bytes": max(rec.peak_reserved, peak), "device_total_bytes": max(rec.device_used, rec.peak_reserved, peak),
        "peak_phase": peak_phase, "phases": {"load": load_peak, **steady},
        "boundary_allocated_bytes": dict(rec.after), "allocated_between_steps_bytes": rec.window_start,
        "step_time_s": statistics.median(measured) if measured else None, "step_times_s": [round(x, 4) for x in times],
        "load_s": round(load_s, 2), "losses": losses, "host_rss_bytes": host_pinned,
        "layer_forward_allocated_bytes": list(layer_alloc), "allocator": allocator,
    }


def _breakdown(job: Job, ranks: list[dict[str, Any]], env: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    from ..breakdown import Breakdown

    top = max(ranks, key=lambda r: r["peak_allocated_bytes"])
    extras = {
        "fits": True, "most_loaded_rank": top["rank"], "world_size": len(ranks),
        "ranks": ranks, "steps": steps, "warmup_steps": warmup, "step_time_s": top["step_time_s"],
        "tokens_per_step": job.batch_size * job.seq_len * len(ranks),
        "boundary_allocated_bytes": top["boundary_allocated_bytes"],
        "allocated_between_steps_bytes": top["allocated_between_steps_bytes"],
        "device": env.get("gpu_name") or "cpu",
        **{k: env.get(k) for k in ("gpu_name", "driver", "torch_cuda", "torch", "transformers", "peft", "deepspeed")
           if k in env},
    }
    bd = Breakdown(engine="measure", model=job.model, job=job.to_dict(), parameters=env.get("_parameters", 0),
                   trainable_parameters=env.get("_trainable", 0), components=top["components"],
                   peak_allocated_bytes=top["peak_allocated_bytes"], peak_reserved_bytes=top["peak_reserved_bytes"],
                   device_total_bytes=top["device_total_bytes"], peak_phase=top["peak_phase"], phases=top["phases"],
                   host_bytes=sum(r.get("host_rss_bytes", 0) for r in ranks) if job.offload != "none" else 0,
                   measurement="cuda-allocator" if top["device"].startswith("cuda") else "cpu-none",
                   notes=[f"most loaded of {len(ranks)} ranks: rank {top['rank']}"], extras=extras)
    return bd.to_dict()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memfit.measurer.distributed", description=__doc__.splitlines()[0])
    ap.add_argument("job", help="job JSON file, or inline JSON text")
    ap.add_argument("outdir", help="rank 0 writes OUTDIR/record.json")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--simulate-rank", type=int, default=None, metavar="R",
                    help="run rank R alone under a fake process group (one device, collectives skipped)")
    args = ap.parse_args(argv)

    from .record import read_job_argument

    try:
        job = Job.from_dict(read_job_argument(args.job)[0])
    except (OSError, ValueError, MemfitError) as exc:
        print(f"memfit: error: cannot read the job {args.job!r}: {exc}", file=sys.stderr)
        return 2
    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    cuda = torch.cuda.is_available()
    simulated = args.simulate_rank is not None
    if cuda:
        torch.cuda.set_device(0 if simulated else int(os.environ.get("LOCAL_RANK", "0")))
    if simulated:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if job.strategy == "zero3":
            print("memfit: error: ZeRO-3 cannot be simulated (DeepSpeed checks lists across ranks); use torchrun",
                  file=sys.stderr)
            return 2
        if not 0 <= args.simulate_rank < job.gpus:
            print(f"memfit: error: --simulate-rank must be 0..{job.gpus - 1}", file=sys.stderr)
            return 2
        os.environ["LOCAL_RANK"] = "0"
        os.environ["MEMFIT_SIMULATED"] = "1"
        os.environ.setdefault("RANK", str(args.simulate_rank))
        os.environ.setdefault("WORLD_SIZE", str(job.gpus))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29555")
        dist.init_process_group("fake", store=FakeStore(), rank=args.simulate_rank, world_size=job.gpus)
    else:
        dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    status = 0
    try:
        if world != job.gpus:
            raise JobError(f"the job asks for {job.gpus} GPUs but torchrun started {world} processes")
        try:
            result: dict[str, Any] = run_rank(job, steps=args.steps, warmup=args.warmup)
        except MemfitError as exc:
            result = {"rank": dist.get_rank(), "error": f"{exc}"}
            status = 2
        except Exception as exc:  # noqa: BLE001 - an OOM on one rank is a result; report, then gather
            msg = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
            oom = "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
            result = {"rank": dist.get_rank(), "error": f"{type(exc).__name__}: {msg}", "oom": oom}
            import traceback

            traceback.print_exc()
            status = 1
        if simulated:
            gathered: list[Any] = [result]
        else:
            gathered = [None] * world
            dist.all_gather_object(gathered, result)
        if dist.get_rank() == 0 or simulated:
            from .env import environment
            from .record import utc_now, write_json
            from .. import __version__

            env = environment(torch.device("cuda", 0) if cuda else None)
            try:
                from importlib import metadata

                env["deepspeed"] = metadata.version("deepspeed")
            except Exception:  # noqa: BLE001
                env["deepspeed"] = None
            env["world_size"] = world
            record: dict[str, Any] = {"job": job.to_dict(), "env": env, "created": utc_now(),
                                      "memfit_version": __version__}
            errors = [r for r in gathered if "error" in r]
            if errors:
                record["error"] = {"ranks": errors}
                if all(r.get("oom") for r in errors):
                    record["breakdown"] = None
                    record["status"] = "oom"
            else:
                from ..models import load_model

                try:
                    spec = load_model(job.model)
                    from ..estimator import states as st

                    env_extra = {"_parameters": spec.parameters, "_trainable": st.trainable_params(spec, job)}
                except Exception:  # noqa: BLE001
                    env_extra = {}
                record["breakdown"] = _breakdown(job, gathered, {**env, **env_extra}, args.steps, args.warmup)
                if simulated:
                    bd = record["breakdown"]
                    bd["measurement"] = "cuda-allocator-simulated" if cuda else "cpu-simulated"
                    bd["notes"].append(f"simulated: rank {args.simulate_rank} of {job.gpus} alone under a fake process "
                                       "group (collectives skipped); not scored")
                    bd["extras"]["simulated_rank"] = args.simulate_rank
            write_json(Path(args.outdir) / "record.json", record)
            print(json.dumps({"ranks": [{k: r.get(k) for k in ("rank", "peak_allocated_bytes", "peak_phase", "error")}
                                        for r in gathered]}))
    finally:
        if not simulated:
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001
                pass
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
