"""Step-time model against measured H100/H200 steps (validation/records), held-out runs apart.

The held-out rule is fixed in validation/steptime_data.py (records' own holdout flags plus every H200
record, except the planning-scenario files the model was refitted on). The issue's bars: median |error|
<= 15% and >= 80% within 30% on the held-out runs. With the held-out planning scenarios measured after the
2026-12-02 refit (h200-plan-scenarios-3) the held-out runs are at 15.1% / 88% (86 runs): the median misses
the bar by a hair, kept as a strict xfail; a guard holds today's level.
"""

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "validation"))

from score_steptime import scored, summary  # noqa: E402

from memfit.job import Job  # noqa: E402
from memfit.plan.steptime import step_time  # noqa: E402


@pytest.fixture(scope="module")
def held_out():
    rows = [r for r in scored() if r["held_out"]]
    assert len(rows) >= 20
    return summary(rows)


def test_held_out_no_worse_than_today(held_out):
    # session 8: sets 4 and 5 drove the session-8 refit and are fitted on now; the held-out runs are the 34 of
    # h200-plan-scenarios-6.json and the one of h200-boundaries-11.json, measured after it: median 6.8%, 91% within 30%
    assert held_out["median"] <= 0.08
    assert held_out["within30"] >= 0.90


def test_held_out_meets_issue_bars(held_out):
    assert held_out["median"] <= 0.15 and held_out["within30"] >= 0.80


def test_monotone_and_fast():
    from memfit.models import load_model

    spec = load_model("llama-3.2-1b")
    j = Job(model="llama-3.2-1b", batch_size=2, seq_len=1024)
    a, b = step_time(j, spec, "h100-80gb"), step_time(j.replace(batch_size=4), spec, "h100-80gb")
    assert b.seconds > a.seconds  # more tokens, more time
    assert step_time(j.replace(gradient_checkpointing=True), spec, "h100-80gb").seconds > a.seconds
    assert step_time(j, spec, "rtx-4090").seconds > a.seconds  # slower card
    t0 = time.perf_counter()
    for _ in range(200):
        step_time(j, spec, "h100-80gb")
    assert (time.perf_counter() - t0) / 200 < 1e-3  # pure Python, well under a millisecond


def test_batch_timer_is_step_time():
    # BatchTimer derives all micro-batches from batch 1 and 2 (the features are affine in the batch);
    # it must agree with step_time to rounding (1e-9 relative)
    from memfit.models import load_model
    from memfit.plan.steptime import BatchTimer

    for model, kw in (("llama-3.2-1b", {}), ("qwen3-4b", {"method": "qlora", "quantization": "nf4",
                                                           "precision": "bf16-true", "gradient_checkpointing": True}),
                      ("llama-3.2-1b", {"gpus": 4, "gpus_per_node": 4, "strategy": "ddp"}),
                      ("llama-3.1-8b", {"gpus": 16, "gpus_per_node": 8, "strategy": "zero3", "offload": "optimizer"})):
        spec = load_model(model)
        j = Job(model=model, seq_len=1024, **kw)
        t = BatchTimer(j, spec, "rtx-4090")
        for b, a in ((1, 1), (3, 2), (8, 4)):
            want = step_time(j.replace(batch_size=b), spec, "rtx-4090", accumulation=a)
            got = t(b, a)
            assert abs(got.seconds / want.seconds - 1) < 1e-9
            assert set(got.parts) == set(want.parts)  # collectives and offload where step_time has them


def test_annotate_fills_the_breakdown():
    from memfit.estimator import estimate
    from memfit.plan.steptime import annotate

    j = Job(model="gpt2", batch_size=2, seq_len=512)
    b = annotate(estimate(j), j, "a100-80gb")
    assert b.step_time_seconds > 0 and abs(b.tokens_per_second * b.step_time_seconds - 1024) < 1e-6


def test_tensor_parallel_and_replicas():
    # a TP group splits the matmuls (a step of the same micro-batch is faster per replica, with its all-reduces
    # on top); tokens/s is the whole job's: replicas x a replica's tokens
    from memfit.models import load_model

    spec = load_model("llama-3.1-8b")
    one = Job(model="llama-3.1-8b", batch_size=2, seq_len=2048, gradient_checkpointing=True)
    dp8 = one.replace(gpus=8, strategy="fsdp2")
    tp2 = dp8.replace(tensor_parallel=2)
    a, b, c = (step_time(j, spec, "h100-80gb") for j in (one, dp8, tp2))
    assert c.seconds < b.seconds and c.parts["tp_comm"] > 0 and "tp_comm" not in {k for k, v in b.parts.items() if v}
    assert abs(b.tokens_per_second * b.seconds - 8 * 2 * 2048) < 1e-6 * b.tokens_per_second
    assert abs(c.tokens_per_second * c.seconds - 4 * 2 * 2048) < 1e-6 * c.tokens_per_second
    assert b.parts["optimizer"] < a.parts["optimizer"] / 7  # FSDP: each rank steps 1/8 of the states


def test_backward_launches_are_their_own_kind():
    # the forward (and a checkpointed recompute) count into ``launch``, the backward into ``launch_bwd`` (x2);
    # inference has no backward
    from memfit.gpus import get_gpu
    from memfit.models import load_model
    from memfit.plan.steptime import features

    spec, gpu = load_model("llama-3.2-1b"), get_gpu("h100-80gb")
    j = Job(model="llama-3.2-1b", batch_size=2, seq_len=1024)
    f, fc = features(j, spec, gpu), features(j.replace(gradient_checkpointing=True), spec, gpu)
    assert f["launch"] > 0 and f["launch_bwd"] == 2 * f["launch"]
    assert fc["launch"] == 2 * f["launch"] and fc["launch_bwd"] == f["launch_bwd"]
    inf = features(Job(model="llama-3.2-1b", task="infer", batch_size=2, prompt_len=512, new_tokens=0), spec, gpu)
    assert inf["launch_bwd"] == 0 and inf["launch"] == f["launch"]
