"""The planner: never a candidate the fit answer would not run; ranking, global batch and CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from memfit.errors import JobError
from memfit.job import Job
from memfit.plan import fits, max_seq_len, plan

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=hs.sampled_from(["gpt2", "qwen2.5-0.5b", "llama-3.2-1b", "qwen3-1.7b"]),
       batch=hs.sampled_from([1, 2, 4, 8, 12]), seq=hs.sampled_from([256, 512, 1024, 2048]),
       method=hs.sampled_from(["full", "lora"]), card_gib=hs.integers(6, 80),
       vary=hs.sampled_from([None, ["batch", "checkpointing"], ["method", "batch", "optimizer"]]))
def test_every_candidate_fits(model, batch, seq, method, card_gib, vary):
    job = Job(model=model, batch_size=batch, seq_len=seq, method=method)
    mem = card_gib * GiB
    res = plan(job, gpu_memory_bytes=mem, vary=vary, top=5)
    budget = int(mem * 0.97)  # the default 3% margin
    for c in res.candidates:
        ok, b = fits(c.job, mem)
        assert fits(c.job, budget)[0] == c.fits  # the planner's verdict is the estimator's, with the margin
        if c.fits:
            assert ok  # and so it fits the card itself
            assert b.device_total_bytes <= mem or b.fits
            # the global batch is kept: micro-batch x accumulation
            assert c.job.batch_size * c.accumulation == res.global_batch
    speeds = [c.tokens_per_second for c in res.candidates if c.fits]
    assert speeds == sorted(speeds, reverse=True)


def test_nothing_fits_says_by_how_much():
    res = plan(Job(model="llama-3.1-8b", batch_size=4, seq_len=2048), gpu_memory_bytes=8 * GiB, top=3)
    assert not res.any_fits and res.candidates
    assert all(c.headroom_bytes < 0 and "too big by" in c.reason for c in res.candidates)


def test_margin_is_kept():
    job = Job(model="llama-3.2-1b", batch_size=8, seq_len=1024, precision="bf16-true")
    res = plan(job, gpu_memory_bytes=24 * GiB, keep=["optimizer"], top=10)
    assert res.any_fits and all(c.headroom_bytes >= 0.03 * 24 * GiB for c in res.candidates)
    loose = plan(job, gpu_memory_bytes=24 * GiB, keep=["optimizer"], top=10, min_headroom=0.0)
    assert min(c.headroom_bytes for c in loose.candidates) <= min(c.headroom_bytes for c in res.candidates)


def test_keep_and_vary():
    job = Job(model="qwen2.5-0.5b", batch_size=8, seq_len=1024)
    res = plan(job, "rtx-4090", keep=["precision", "optimizer", "expandable", "checkpointing"], top=20)
    assert res.any_fits
    for c in res.candidates:
        assert (c.job.precision, c.job.optimizer, c.job.gradient_checkpointing) == (job.precision, job.optimizer, False)
    res = plan(job, "rtx-4090", global_batch=16, top=5)
    assert all(c.job.batch_size * c.accumulation == 16 for c in res.candidates)


def test_max_seq_len_is_the_boundary():
    job = Job(model="qwen2.5-0.5b", batch_size=1)
    n = max_seq_len(job, 24 * GiB)
    assert n > 0 and fits(job.replace(seq_len=n), 24 * GiB)[0] and not fits(job.replace(seq_len=n + 128), 24 * GiB)[0]


def test_cli_json():
    out = subprocess.run([sys.executable, "-c", "import sys; from memfit.cli import main; sys.exit(main())", "plan",
                          "qwen2.5-0.5b", "--batch-size", "8", "--seq-len", "1024", "--gpu", "rtx-4090", "--json",
                          "--top", "3"], capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    c = data["candidates"][0]
    assert c["fits"] and c["job"]["model"] == "qwen2.5-0.5b" and c["step_time_seconds"] > 0
    assert {"device_total_bytes", "tokens_per_second", "changes"} <= set(c)
    bad = subprocess.run([sys.executable, "-c", "import sys; from memfit.cli import main; sys.exit(main())", "plan",
                          "qwen2.5-0.5b", "--gpu", "h1000"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src")})
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_min_gpus_and_max_batch_are_boundaries():
    from memfit.plan import max_batch, min_gpus

    job = Job(model="llama-3.2-1b", seq_len=1024, precision="bf16-true")
    n = max_batch(job, 24 * GiB)
    assert n > 0 and fits(job.replace(batch_size=n), 24 * GiB)[0]
    assert not fits(job.replace(batch_size=n + 1), 24 * GiB)[0]
    r = min_gpus(Job(model="llama-3.1-8b", seq_len=1024, precision="bf16-true"), 24 * GiB)
    assert r is not None
    count, layout = r
    assert count > 1 and fits(layout, 24 * GiB)[0] and layout.gpus == count


def test_divisors_match_the_definition_and_stay_quick_for_huge_batches():
    from memfit.plan.search import _divisors

    for n in list(range(1, 200)) + [720, 1024, 9973, 65536]:
        assert _divisors(n) == [d for d in range(1, n + 1) if n % d == 0]
    assert _divisors(2**31 - 1) == [1, 2**31 - 1]  # a prime: walking every number would take minutes
    assert len(_divisors(2**30)) == 31


def test_plan_answers_for_the_largest_batch_a_job_allows():
    res = plan(Job(model="gpt2", batch_size=2**31 - 1), gpu_memory_bytes=24 * GiB, vary=["batch"], top=3)
    assert all(c.job.batch_size in (1, 2**31 - 1) for c in res.candidates)


def test_floor_is_below_the_peak():
    # the floor the search rules candidates out by (no replay) must never pass what the stream allocates
    from memfit.estimator import estimate
    from memfit.estimator import floor_bytes as _floor_bytes
    from memfit.models import load_model

    for model in ("gpt2", "qwen2.5-0.5b", "llama-3.2-1b", "gemma-2-2b", "bert-base-uncased"):
        spec = load_model(model)
        for kw in ({}, {"precision": "bf16-true"}, {"optimizer": "adamw-8bit"}, {"optimizer": "paged-adamw-8bit"},
                   {"optimizer": "sgd", "precision": "32-true"}, {"optimizer": "adafactor"},
                   {"gradient_checkpointing": True}, {"method": "lora"}, {"method": "lora", "precision": "bf16-true"},
                   {"method": "qlora", "quantization": "nf4", "precision": "bf16-true"},
                   {"task": "infer", "prompt_len": 128, "new_tokens": 16}):
            for batch in (1, 3):
                job = Job(model=model, batch_size=batch, seq_len=256, **kw)
                floor = _floor_bytes(job, spec)
                peak = estimate(job, spec).peak_allocated_bytes
                assert 0 < floor <= peak, (model, kw, batch)
    # where the loss's vocabulary-sized tensors are most of the peak (a large vocabulary, a small model,
    # checkpointed activations): the floor's 8 bytes per token and entry must stay below what is allocated
    for model in ("qwen2.5-0.5b", "gemma-2-2b"):
        spec = load_model(model)
        for kw in ({"method": "lora"}, {"optimizer": "sgd"}):
            job = Job(model=model, batch_size=16, seq_len=1024, gradient_checkpointing=True, **kw)
            assert _floor_bytes(job, spec) <= estimate(job, spec).peak_allocated_bytes, (model, kw)
    assert _floor_bytes(Job(model="gpt2", gpus=2, strategy="ddp"), load_model("gpt2")) == 0  # single GPU only


@pytest.mark.parametrize("model", ["gpt2", "llama-3.2-1b", "gemma-3-1b", "olmoe-1b-7b", "falcon-7b", "phi-3-mini",
                                   "qwen3-4b", "gpt-oss-20b", "distilbert-sst2", "mistral-7b-v0.3"])
def test_floor_with_the_layers_activations_stays_below_the_peak(model):
    # the floor counts what every layer's forward keeps for backward (saved tensors, or the checkpointed layer
    # inputs): it must stay a floor wherever activations are most of the peak (a long sequence, a large batch)
    from memfit.estimator import estimate
    from memfit.estimator import floor_bytes as _floor_bytes
    from memfit.models import load_model

    spec = load_model(model)
    for kw in ({}, {"precision": "bf16-true"}, {"precision": "32-true", "optimizer": "sgd"},
               {"gradient_checkpointing": True}, {"method": "lora", "precision": "bf16-true"},
               {"method": "lora", "lora_targets": ["q_proj", "v_proj"], "precision": "bf16-true"},
               {"method": "lora", "precision": "bf16-mixed", "attention": "eager"},
               {"method": "qlora", "quantization": "nf4", "precision": "bf16-true"},
               {"method": "qlora", "quantization": "nf4", "precision": "bf16-true", "gradient_checkpointing": True},
               {"method": "lora", "quantization": "int8", "precision": "bf16-true", "gradient_checkpointing": True},
               {"attention": "eager", "precision": "bf16-true"}):
        for batch, seq in ((1, 128), (8, 2048)):
            try:
                job = Job(model=model, batch_size=batch, seq_len=seq, **kw)
                peak = estimate(job, spec).peak_allocated_bytes
            except JobError:
                continue  # a job the model has no run for
            assert 0 < _floor_bytes(job, spec) <= peak, (kw, batch, seq)


def _every_candidate(job, mem, vary, top):
    """The plan by brute force: every setting at every micro-batch judged by its own estimate, ranked as
    plan() ranks (its step-time arithmetic, fewer changes first on ties, the same de-duplication)."""
    from memfit.models import load_model
    from memfit.plan.search import _describe, _divisors, _levers, _settings
    from memfit.plan.steptime import BatchTimer

    spec = load_model(job.model)
    budget = int(mem * 0.97)
    rows = []
    for ch in _settings(job, *_levers(vary, None)):
        base = job.replace(**ch)
        timer = BatchTimer(base, spec, "h100-80gb")
        for mb in _divisors(job.batch_size):
            cj = base.replace(batch_size=mb)
            ok, b = fits(cj, budget, spec)
            t = timer(mb, job.batch_size // mb)
            if ok:
                rows.append((cj, job.batch_size // mb, t.tokens_per_second, b.device_total_bytes))
    rows.sort(key=lambda r: (-r[2], len(_describe(job, r[0], r[1])[0])))
    out = []
    for cj, acc, tps, dev in rows:
        changes = _describe(job, cj, acc)[0]
        if len(out) < top and not any(o[0].batch_size == cj.batch_size and abs(o[2] - tps) <= 1e-9 * tps
                                       and set(o[4]) < set(changes) for o in out):
            out.append((cj, acc, tps, dev, changes))
    return [(c[0].to_dict(), c[1], c[3]) for c in out]


def test_the_walk_returns_what_judging_every_candidate_returns():
    # the search asks the estimator about few candidates; where memory grows with the micro-batch (these
    # jobs) its answer is the brute-force one: same candidates, order and device totals
    for job, gib, vary in ((Job(model="qwen2.5-0.5b", batch_size=32, seq_len=1024), 12, ["batch", "checkpointing", "expandable"]),
                           (Job(model="llama-3.2-1b", batch_size=16, seq_len=2048, method="lora"), 16,
                            ["batch", "checkpointing", "optimizer"]),
                           (Job(model="gpt2", batch_size=64, seq_len=1024), 8, None)):
        res = plan(job, gpu_memory_bytes=gib * GiB, vary=vary, top=6)
        got = [(c.job.to_dict(), c.accumulation, c.device_total_bytes) for c in res.candidates]
        assert got == _every_candidate(job, gib * GiB, vary, 6)
        assert res.evaluated <= res.judged <= res.timed and res.estimator_calls < res.timed


def test_a_candidate_that_fits_the_margin_but_not_the_card_is_not_recommended(monkeypatch):
    # found by the property test above: a job fitted 97% of a 15 GiB card but not the card itself (the capped
    # replay is not monotone in the cap). That example moved with the allocator stream's rules, so the case is
    # made here: the card itself refuses every job, the card less the margin does not, and nothing may be
    # recommended as fitting.
    import memfit.estimator as estimator

    job = Job(model="llama-3.2-1b", batch_size=1, seq_len=2048, method="lora")
    mem = 24 * GiB
    assert fits(job, int(mem * 0.97))[0]
    real = estimator.fits_on
    calls = []

    def card_refuses(j, gpu_memory_bytes, *args, **kwargs):
        if gpu_memory_bytes == mem:
            calls.append(j)
            return False
        return real(j, gpu_memory_bytes, *args, **kwargs)

    monkeypatch.setattr(estimator, "fits_on", card_refuses)  # the planner imports it where it asks
    res = plan(job, gpu_memory_bytes=mem, top=5)
    assert calls  # the card itself was asked
    assert not any(c.fits for c in res.candidates)
