"""Timed runs for the step-time model, and the rule that splits them into fitted and held-out runs.

The rule, fixed before fitting: a run is *fitted* only if it is an H100 record whose own ``holdout`` flag
is false; every record flagged ``holdout`` and every H200 record (``h200-*.json``) is held out. A run
is not a timing run (dropped from both) when it failed, has no ``step_time_s``, or its allocator had to
free its cache and retry (``num_alloc_retries > 0``): those ran at a memory cap and time the allocator;
nor when another process held more than 1 GiB of the GPU during the run (NVML's device use less this
process's use): concurrent runs share the SMs and the time is not the job's. Where a record ran a batch
other than its job's (the boundary runner's largest batch), the batch is ``tokens_per_step / seq_len``.

The planning scenarios' runs (``*plan-scenarios*.json``, :mod:`run_plan_scenarios`: each candidate measured
one at a time on an H200 under the card's cap) are timing runs too, held out by the same rule (H200); one whose
allocator retried (``num_alloc_retries > 0``, recorded from 2026-12-02 on) or that ran out of memory is dropped.
Except :data:`FITTED_SCENARIO_FILES`: those runs showed what the model lacked (LoRA's and QLoRA's cost grows
with the tokens) and were then fitted on, so they are no longer held out.

Session 5 (2026-12-02): the errors of every run above had been seen by then, so the model (kernel counts per
layer, per-tensor optimizer launches, paged and LLM.int8 costs) was refitted on ALL of them
(:data:`REFIT_ALL` true: every run is fitted) and a new held-out set was measured afterwards: the files of
:data:`HELD_OUT_FILES`, written (jobs and scenarios) before the refit and run after it, are held out and
never fitted on.

Session 8 (2026-12-03): the held-out scenario files 4 and 5 showed one ranking error five times over (the planner
put checkpointing at a large micro-batch ahead of no checkpointing at a small one; the runs said the opposite).
The model then counted backward kernels apart from forward ones (``launch_bwd``) and the fit weighs the ratios
between candidates of one scenario (:mod:`fit_steptime`); those two files drove that change and are fitted on
from then on. :data:`HELD_OUT_FILES` is now the scenario file measured after that refit.
"""


from __future__ import annotations

import glob
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Planning-scenario files whose runs drove a change of the model and are fitted on (see the module note).
FITTED_SCENARIO_FILES = ("h200-plan-scenarios-2.json",)
#: Session 5: every run of the files present before it is fitted on; these (measured after the refit) are held out.
REFIT_ALL = True
#: Session 8: measured after the session-8 refit (jobs written before they ran), never fitted on.
HELD_OUT_FILES = ("h200-plan-scenarios-6.json", "h200-boundaries-11.json")


def _held(name: str, old_rule: bool) -> bool:
    if name in HELD_OUT_FILES:
        return True
    return False if REFIT_ALL else old_rule


def timed_runs(pattern: str = "records/*.json") -> list[dict]:
    """``{"name", "file", "job", "seconds", "gpu", "held_out"}`` for each timing run in the records."""
    out = []
    for f in sorted(glob.glob(str(HERE / pattern))):
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "scenarios" in data:
            out.extend(_scenario_runs(data, Path(f).name))
            continue
        recs = data if isinstance(data, list) else data.get("records", [])
        for r in recs:
            if not isinstance(r, dict) or r.get("status") != "ok" or not isinstance(r.get("breakdown"), dict):
                continue
            ex = r["breakdown"].get("extras") or {}
            t = ex.get("step_time_s")
            if not t or (ex.get("allocator") or {}).get("num_alloc_retries", 0) > 0:
                continue
            shared = (ex.get("nvml_device_used_bytes") or 0) - (ex.get("nvml_process_used_bytes") or 0)
            if shared > 2**30:
                continue
            job = dict(r["job"])
            tps = ex.get("tokens_per_step")
            if tps and job.get("task", "train") == "train" and job.get("seq_len"):
                job["batch_size"] = max(1, round(tps / job["seq_len"]))
            name = Path(f).name
            gpu = "h200" if "H200" in str(ex.get("gpu_name", "")) else "h100-80gb"
            held = _held(name, bool(r.get("holdout")) or name.startswith("h200-") or gpu != "h100-80gb")
            out.append({"name": r["name"], "file": name, "job": job, "seconds": float(t), "gpu": gpu,
                        "held_out": held})
    return out


def _scenario_runs(data: dict, name: str) -> list[dict]:
    """The timing runs of one planning-scenarios file (see the module note)."""
    out = []
    for sc in data.get("scenarios", []):
        for c in sc.get("candidates", []):
            m = c.get("measured") or {}
            if m.get("status") != "ok" or m.get("fits") is not True or not m.get("step_time_s"):
                continue
            if (m.get("num_alloc_retries") or 0) > 0:
                continue
            gpu = "h200" if "H200" in str(m.get("gpu_name", "")) else "h100-80gb"
            out.append({"name": f"plan:{sc['name']}#{c.get('rank')}", "file": name, "job": dict(c["job"]),
                        "seconds": float(m["step_time_s"]), "gpu": gpu,
                        "held_out": _held(name, name not in FITTED_SCENARIO_FILES)})
    return out
