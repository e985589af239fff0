"""The fit verdict and rehearsing a card: the search for the largest batch (a pure function, checked with
fake trials), the cap arithmetic, the runner's job list and scheduling, the measure/worker argument
handling, and find_max_batch's trial plumbing on the CPU with a faked CUDA layer (no GPU here).

Tolerances: none in this file except where stated; the search and the cap are exact integer arithmetic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from memfit.cli import main
from memfit.errors import JobError, MemfitError
from memfit.measurer.fit import allocator_limit_bytes, cap_fraction, first_step, search_max_batch

REPO = Path(__file__).resolve().parents[1]
GiB = 1 << 30


# ------------------------------------------------------------------------------------------- search
@pytest.mark.parametrize("boundary", [0, 1, 2, 3, 7, 31, 64, 100, 288, 1000, 4096])
@pytest.mark.parametrize("start", [None, 1, 2, 5, 63, 64, 288, 290, 400, 5000])
def test_search_finds_the_boundary_from_any_hint(boundary, start):
    calls = []

    def trial(b):
        calls.append(b)
        return b <= boundary

    best, tried = search_max_batch(trial, start=start, limit=4096)
    assert best == boundary
    assert len(calls) == len(set(calls)) == len(tried)  # each batch at most once
    assert all(b in range(1, 4097) for b in calls)
    if 0 < best < 4096:  # proven: best runs, best + 1 does not
        assert (best, True) in tried and (best + 1, False) in tried
    if best == 0:
        assert (1, False) in tried


def test_search_cost_is_small_near_a_good_hint():
    # an exact hint below 64 costs two trials; a hint 5 % off at batch 300 costs at most 8
    assert len(search_max_batch(lambda b: b <= 12, start=12)[1]) == 2
    assert len(search_max_batch(lambda b: b <= 315, start=300)[1]) <= 8
    # without a hint: doubling, then bisection
    assert [b for b, _ in search_max_batch(lambda b: b <= 20)[1]][:6] == [1, 2, 4, 8, 16, 32]


def test_search_stops_at_the_limit_and_checks_its_arguments():
    assert search_max_batch(lambda b: True, start=3, limit=10)[0] == 10
    assert first_step(31) == 1 and first_step(64) == 2 and first_step(320) == 10
    for bad in ({"start": 0}, {"start": True}, {"limit": 0}):
        with pytest.raises(JobError):
            search_max_batch(lambda b: True, **bad)


# ------------------------------------------------------------------------------------------- cap
def test_cap_fraction_is_card_less_context_over_total():
    total = 150_754_820_096  # an H200 as the driver reports it (catalog)
    ctx = 520 * 2**20
    f = cap_fraction(24 * GiB, ctx, total)
    assert f == (24 * GiB - ctx) / total
    # the allocator's limit: size_t(fraction * total), within one byte of card - context (float rounding)
    assert abs(allocator_limit_bytes(f, total) - (24 * GiB - ctx)) <= 1
    assert cap_fraction(total, 0, total) == 1.0


def test_cap_fraction_refuses_impossible_cards():
    with pytest.raises(JobError, match="larger than the GPU"):
        cap_fraction(200 * GiB, GiB, 150 * GiB)
    with pytest.raises(JobError, match="CUDA context"):
        cap_fraction(GiB // 2, GiB, 150 * GiB)
    with pytest.raises(JobError):
        cap_fraction(24.5, 0, 150 * GiB)


def test_allocator_conf_keeps_other_options():
    from memfit.measurer.card import _expandable_in, allocator_conf_for

    assert allocator_conf_for(True) == "expandable_segments:True"
    conf = allocator_conf_for(False, "max_split_size_mb:128,expandable_segments:True")
    assert conf == "max_split_size_mb:128,expandable_segments:False"
    assert _expandable_in("garbage_collection_threshold:0.6,expandable_segments:True")
    assert not _expandable_in(conf) and not _expandable_in(None)


# ------------------------------------------------------------------------------------------- units
def test_bare_number_is_an_error_that_names_the_units():
    from memfit.units import parse_card_memory

    with pytest.raises(JobError, match=r"24GiB .* or 24GB"):
        parse_card_memory("24")
    assert parse_card_memory("24GiB") == 24 * GiB
    assert parse_card_memory("24GB") == 24 * 10**9
    assert parse_card_memory(1000) == 1000  # ints from code are bytes
    with pytest.raises(JobError):
        parse_card_memory("0GiB")


# ------------------------------------------------------------------------------------------- measure CLI
@pytest.mark.parametrize("argv,needle", [
    (["measure", "gpt2", "--gpu-memory", "24"], "no unit"),
    (["measure", "gpt2", "--find-max-batch"], "needs a card"),
    (["measure", "gpt2", "--gpu-memory", "24GiB", "--cpu"], "drop --cpu"),
    (["measure", "gpt2", "--start", "4"], "add --find-max-batch"),
    (["measure", "gpt2", "--no-fresh-check"], "--no-fresh-check is an option of --find-max-batch"),
    (["measure", "gpt2", "--gpu", "no-such-card"], "unknown GPU"),
    (["measure", "gpt2", "--gpu-memory", "24GiB", "--sweep", "precision"], "--sweep"),
    (["measure", "gpt2", "--gpu-memory", "24GiB", "--find-max-batch", "--start", "0"], "--start"),
])
def test_measure_card_arguments_fail_in_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_measure_rehearsal_needs_cuda_on_the_cpu(capsys):
    pytest.importorskip("torch")
    from memfit.measurer import measure

    with pytest.raises(MemfitError, match="CUDA"):
        measure({"model": "gpt2"}, device="cpu", gpu_memory_bytes=24 * GiB)


def test_worker_reads_the_card_from_flag_or_json():
    import argparse

    from memfit.measurer.worker import _card

    ns = argparse.Namespace(gpu_memory=None)
    assert _card(ns, {"gpu_memory_bytes": 123}) == 123
    assert _card(ns, {"gpu_memory": "16GiB"}) == 16 * GiB
    assert _card(ns, {}) is None
    assert _card(argparse.Namespace(gpu_memory="24GiB"), {"gpu_memory_bytes": 1}) == 24 * GiB  # the flag wins
    with pytest.raises(JobError):
        _card(ns, {"gpu_memory_bytes": "24GiB"})


# ------------------------------------------------------------------------------------------- runner
def _runner():
    sys.path.insert(0, str(REPO / "validation"))
    import run_boundaries

    return run_boundaries


def test_boundaries_job_list_meets_the_brief():
    rb = _runner()
    entries = rb.load_boundary_entries(REPO / "validation" / "jobs" / "boundaries.yaml")
    assert len(entries) >= 36
    jobs = [e["job"] for e in entries]
    held = sum(e["holdout"] for e in entries)
    assert 0.25 <= held / len(entries) <= 0.42
    exp = sum(j["expandable_segments"] for j in jobs)
    assert 0.25 <= exp / len(entries) <= 0.42
    cards = {e["gpu_memory_bytes"] for e in entries}
    assert min(cards) == 16 * GiB and max(cards) == 80 * GiB
    assert {j["method"] for j in jobs if j["task"] == "train"} >= {"full", "lora", "qlora"}
    assert all("bitsandbytes" in e["needs"] for e in entries if e["job"]["method"] == "qlora")
    assert any(j["task"] == "infer" and j["new_tokens"] >= 512 for j in jobs)  # long decode
    assert any(j["task"] == "infer" and j["new_tokens"] == 0 and j["prompt_len"] >= 4096 for j in jobs)
    assert any(j["model"] in ("olmoe-1b-7b", "qwen1.5-moe-a2.7b") for j in jobs)
    assert any(j["model"] in ("gemma-3-1b", "gemma-2-2b") for j in jobs)
    # the two cases
    assert any(j["model"] == "llama-3.1-8b" and j["method"] == "full" and j["seq_len"] == 2048
               and j["gradient_checkpointing"] and e["gpu_memory_bytes"] == 80 * GiB for e, j in zip(entries, jobs))
    assert any(j["model"] == "gemma-3-1b" and j["task"] == "infer" and j["prompt_len"] == 2048
               and j["new_tokens"] == 128 and e["gpu_memory_bytes"] == 16 * GiB for e, j in zip(entries, jobs))
    # holdouts in every class
    for cls in (lambda j: j["task"] == "infer", lambda j: j["method"] == "lora", lambda j: j["method"] == "full",
                lambda j: j["method"] == "qlora", lambda j: j["expandable_segments"]):
        assert any(e["holdout"] for e, j in zip(entries, jobs) if cls(j))


def test_boundaries_loader_rejects_bad_entries(tmp_path):
    rb = _runner()
    p = tmp_path / "b.yaml"
    for text, needle in [
        ("- {name: a, job: {model: gpt2}}\n", "gpu_memory"),
        ("- {name: a, gpu_memory: 24, job: {model: gpt2}}\n", "no unit"),
        ("- {name: a, gpu_memory: 24GiB, start: 0, job: {model: gpt2}}\n", "start"),
        ("- {name: a, gpu_memory: 24GiB, needs: flash, job: {model: gpt2}}\n", "needs"),
        ("- {name: a, gpu_memory: 24GiB, colour: red, job: {model: gpt2}}\n", "unknown key"),
    ]:
        p.write_text(text)
        with pytest.raises(JobError, match=needle):
            rb.load_boundary_entries(p)


def test_launch_keeps_the_sum_of_cards_within_the_budget():
    rb = _runner()
    e = lambda n, g: {"name": n, "gpu_memory_bytes": g * GiB}  # noqa: E731
    pending = [e("big", 80), e("a", 24), e("b", 16)]
    kw = {"parallel_bytes": 128 * GiB, "parallel": 5}
    assert rb.launchable(pending, 0, 0, **kw)["name"] == "big"
    assert rb.launchable(pending[1:], 110 * GiB, 2, **kw)["name"] == "b"  # 24 does not fit, 16 does
    assert rb.launchable(pending[1:], 120 * GiB, 2, **kw) is None
    assert rb.launchable([e("huge", 140)], 0, 0, **kw)["name"] == "huge"  # alone on an idle GPU
    assert rb.launchable([e("huge", 140)], 16 * GiB, 1, **kw) is None
    assert rb.launchable(pending, 0, 5, **kw) is None
    assert rb.launchable(pending, 60 * GiB, 1, head_only=True, **kw) is None  # the big one waited long enough


def test_runner_writes_error_records_and_skips_missing_needs(tmp_path):
    """On a machine without a GPU every worker fails with a one-line error: the runner still writes one
    record per entry run and lists the skipped one."""
    pytest.importorskip("torch")
    import importlib.util
    import subprocess

    jobs = tmp_path / "b.yaml"
    jobs.write_text("- {name: t1, gpu_memory: 16GiB, start: 2, job: {model: gpt2}}\n"
                    "- {name: q1, gpu_memory: 16GiB, needs: bitsandbytes, job: {model: llama-3.2-1b, method: qlora}}\n")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(REPO / "validation" / "run_boundaries.py"), str(jobs), "--out", str(out),
                          "--timeout", "120"], capture_output=True, text=True, timeout=300)
    records = json.loads((out / "boundaries-b.json").read_text())
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    import torch

    if torch.cuda.is_available():  # pragma: no cover - not on the CPU machine
        pytest.skip("this checks the CPU failure path")
    assert [r["name"] for r in records] == (["t1", "q1"] if has_bnb else ["t1"])
    assert records[0]["status"] == "error" and "CUDA" in records[0]["error"]["stderr_tail"]
    if not has_bnb:
        assert "q1" in res.stdout and "skipped" in res.stdout
    assert "t1" in (out / "log-boundaries.txt").read_text()


# ------------------------------------------------------------------------------------------- plumbing
def test_find_max_batch_trials_on_the_cpu_with_a_faked_cuda_layer(monkeypatch):
    """find_max_batch's own loop (model built once, fresh optimizer and inputs per trial, OOM caught and
    freed, grads cleared, the answer's Breakdown kept) on a tiny CPU model. CUDA is faked: the cap and the
    context are stubs and an out-of-memory error is raised for batches above 5."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memfit import reference as R
    from memfit.measurer import card as C
    from memfit.measurer import engine as E
    from memfit.measurer import meters as M

    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 256, "max_position_embeddings": 256}
    fake_card = {"gpu_memory_bytes": 16 * GiB, "cuda_context_bytes": 500 * 2**20, "allocator_limit_bytes": 15 * GiB,
                 "memory_fraction": 0.1, "context_method": "fake", "gpu_total_memory_bytes": 150 * GiB}
    monkeypatch.setattr(E, "_resolve_device", lambda torch, device: torch.device("cpu"))
    monkeypatch.setattr(E, "_require_cuda", lambda dev: None)
    monkeypatch.setattr(C, "apply_allocator_setting", lambda torch, e: {"expandable_segments": e})
    monkeypatch.setattr(C, "rehearse_card", lambda torch, meter, n: dict(fake_card))
    released = []
    monkeypatch.setattr(C, "release_card", lambda torch, meter: released.append(True))
    monkeypatch.setattr(M, "CudaMeter", lambda dev: M.CpuMeter())
    monkeypatch.setattr(M, "Nvml", lambda dev: type("N", (), {"process_used": lambda self: None})())
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    real_step = E.train_step
    models = []

    def step(job, model, optimizer, batch, scaler=None, hooks=None):
        models.append(id(model))
        assert all(p.grad is None for p in model.parameters())  # a trial starts with no gradients
        if job.batch_size > 5:
            hooks.on_phase("forward")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(job, model, optimizer, batch, scaler, hooks=hooks)

    monkeypatch.setattr(E, "train_step", step)
    seen = []
    res = E.find_max_batch({"model": "tiny", "seq_len": 16, "precision": "32-true"}, 16 * GiB, start=3,
                           spec=R.spec_from_config(dict(llama), name="tiny"), on_trial=seen.append)
    assert res["max_batch_size"] == 5 and res["model_fits"] is True
    assert [(t["batch_size"], t["ok"]) for t in res["trials"]] == [(3, True), (4, True), (6, False), (5, True)]
    assert seen == res["trials"]
    assert len(set(models)) == 1  # the model is built once
    assert res["trials"][2]["oom_phase"] == "forward" and res["trials"][2]["oom_request_bytes"] == 2 * GiB
    b = res["boundary"]
    assert b["job"]["batch_size"] == 5 and b["fits"] is True and b["gpu_memory_bytes"] == 16 * GiB
    assert b["device_total_bytes"] == fake_card["cuda_context_bytes"] + b["peak_reserved_bytes"]
    assert b["headroom_bytes"] == 16 * GiB - b["device_total_bytes"]
    assert res["steps"] == 2 and released == [True]


# ------------------------------------------------------------------------------------------- estimate CLI
def _est_json(argv, capsys):
    rc = main(argv + ["--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_estimate_verdict_json_agrees_with_the_device_total(capsys):
    from memfit.estimator import estimate
    from memfit.job import Job

    base = ["estimate", "llama-3.2-1b", "--precision", "bf16-true", "--seq-len", "1024"]
    bd = estimate(Job(model="llama-3.2-1b", precision="bf16-true", seq_len=1024))
    total = bd.device_total_bytes
    rc, d = _est_json(base + ["--gpu-memory", "80GiB"], capsys)
    assert rc == 0 and d["fits"] is True and d["gpu_memory_bytes"] == 80 * GiB
    assert d["headroom_bytes"] == 80 * GiB - d["device_total_bytes"]
    assert d["device_total_bytes"] == total
    # a card a little smaller than the allocated peak plus the CUDA context: no replay can fit it (a card just
    # under the uncapped device total may still fit: under a cap the allocator frees its cache and retries)
    need = bd.peak_allocated_bytes + (bd.device_total_bytes - bd.peak_reserved_bytes)
    small = f"{(need - 2**20) / 10**9:.6f}GB"
    rc, d = _est_json(base + ["--gpu-memory", small], capsys)
    assert rc == 1 and d["fits"] is False and d["headroom_bytes"] < 0


def test_estimate_verdict_line_names_the_card_and_component(capsys):
    assert main(["estimate", "gemma-3-1b", "--task", "infer", "--prompt-len", "2048", "--new-tokens", "128",
                 "--precision", "bf16-true", "--gpu", "rtx-4090"]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith(("FITS", "DOES NOT FIT"))]
    assert line and "23.65 GiB card" in line[0] and "headroom" in line[0] and "largest component" in line[0]


def test_verdict_prefers_the_engines_answer():
    from memfit.breakdown import Breakdown
    from memfit.verdict import verdict

    b = Breakdown(engine="estimate", model="m", job={}, parameters=0, trainable_parameters=0,
                  components={"weights": 10, "activations": 30}, peak_allocated_bytes=40, peak_reserved_bytes=50, peak_phase="backward",
                  device_total_bytes=60)
    v = verdict(b, 100)
    assert (v["fits"], v["headroom_bytes"], v["basis"], v["deciding_component"]) == (True, 40, "device_total", "activations")
    assert verdict(b, 59)["fits"] is False
    b.fits, b.gpu_memory_bytes, b.headroom_bytes = False, 100, -5  # the allocator replay says no
    assert (verdict(b, 100)["fits"], verdict(b, 100)["headroom_bytes"], verdict(b, 100)["basis"]) == (False, -5, "engine")
    assert verdict(b, 200)["basis"] == "device_total"  # judged for another card: not the engine's answer


def test_estimate_max_batch_size_takes_the_card(capsys):
    from memfit.estimator import max_batch_size
    from memfit.gpus import get_gpu
    from memfit.job import Job

    rc, d = _est_json(["estimate", "llama-3.2-1b", "--precision", "bf16-true", "--max-batch-size", "--gpu", "rtx-4090"],
                      capsys)
    card = get_gpu("rtx-4090").memory_bytes
    assert d["gpu_memory_bytes"] == card
    assert d["max_batch_size"] == max_batch_size(Job(model="llama-3.2-1b", precision="bf16-true"), card)


def test_estimate_expandable_segments_flag_sets_the_job_field(capsys):
    rc, d = _est_json(["estimate", "gpt2", "--expandable-segments"], capsys)
    assert d["job"]["expandable_segments"] is True
    rc, d = _est_json(["estimate", "gpt2"], capsys)
    assert d["job"]["expandable_segments"] is False


def test_estimate_unit_error_is_one_line(capsys):
    assert main(["estimate", "gpt2", "--gpu-memory", "24"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "24GiB" in err and "24GB" in err


def test_gpus_lists_the_catalog(capsys):
    from memfit.gpus import all_gpus

    assert main(["gpus", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data] == [g.name for g in all_gpus()]
    h100 = next(r for r in data if r["name"] == "h100-80gb")
    assert h100["memory_bytes"] == 85029158912 and h100["bf16_tflops"] == 989
    assert main(["gpus"]) == 0
    assert "rtx-4090" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- scoring
def _scorer():
    sys.path.insert(0, str(REPO / "validation"))
    import score_fit

    return score_fit


def test_scorer_bars_catch_answers_above_or_far_below():
    sf = _scorer()
    row = lambda d, err=0.01: {"diff": d, "reserved_error": err, "device_error": err, "holdout": False}  # noqa: E731
    ok = [row(0)] * 17 + [row(-1)] * 3
    assert sf.bars_missed(sf.summarize(ok)) == []
    assert any("above" in m for m in sf.bars_missed(sf.summarize(ok + [row(1)])))
    assert any("more than one below" in m for m in sf.bars_missed(sf.summarize(ok + [row(-2)])))
    assert any("exact on" in m for m in sf.bars_missed(sf.summarize([row(0)] * 8 + [row(-1)] * 2)))
    assert any("reserved_worst" in m for m in sf.bars_missed(sf.summarize(ok + [row(0, 0.09)])))


def test_scorer_reads_a_boundary_record(tmp_path):
    sf = _scorer()
    from memfit.estimator import estimate, max_batch_size
    from memfit.job import Job

    job = Job(model="llama-3.2-1b", precision="bf16-true", seq_len=1024)
    card = 24 * GiB
    b = max_batch_size(job, card)
    est = estimate(job.replace(batch_size=b))
    rec = {"kind": "boundary", "name": "x", "status": "ok", "holdout": True, "job": job.to_dict(),
           "gpu_memory_bytes": card, "max_batch_size": b,
           "breakdown": {"peak_reserved_bytes": int(est.peak_reserved_bytes * 1.01),
                         "device_total_bytes": est.device_total_bytes}}
    p = tmp_path / "r.json"
    p.write_text(json.dumps([rec, {"kind": "boundary", "name": "y", "status": "timeout", "job": job.to_dict()}]))
    row = sf.score_pair(sf.load_records([p])[0])
    assert row["diff"] == 0 and row["reserved_error"] == pytest.approx(1 / 1.01 - 1) and row["device_error"] == 0
    assert sf.score_pair(sf.load_records([p])[1]) is None
    assert row["trials"] == 0 and row["trials_disagree"] == []


def test_scorer_checks_the_verdict_at_every_measured_trial(tmp_path):
    sf = _scorer()
    from memfit.estimator import max_batch_size
    from memfit.job import Job

    job = Job(model="llama-3.2-1b", precision="bf16-true", seq_len=1024)
    card = 24 * GiB
    b = max_batch_size(job, card)
    rec = {"kind": "boundary", "name": "x", "status": "ok", "job": job.to_dict(), "gpu_memory_bytes": card,
           "max_batch_size": b, "find_max_batch": {"trials": [{"batch_size": b, "ok": True},
                                                              {"batch_size": b + 1, "ok": False}]}}
    row = sf.score_pair(rec)
    assert row["trials"] == 2 and row["trials_disagree"] == []
    rec["find_max_batch"]["trials"][1]["ok"] = True  # a trial memfit's verdict contradicts
    row = sf.score_pair(rec)
    assert row["trials_disagree"] == [b + 1]
    s = sf.summarize([row])
    assert (s["trials"], s["trials_agree"]) == (2, 1)
    assert "agrees with 1 of 2 measured trials; not with x B=%d" % (b + 1) in sf.render([row], [])


BOUNDARY_RECORDS = sorted((REPO / "validation" / "records").glob("*boundar*.json"))
FIT_PROBES = sorted((REPO / "validation" / "records").glob("*fit-probes*.json"))


def _replay_judges_the_card() -> bool:
    """Whether estimate() takes the card (the allocator replay with the card's limit); before it does,
    max_batch_size compares a device total with the card, which the first H200 boundaries show misses
    the bars (exact on 18 of 38, 5 above; reserved median error 7.3 %)."""
    import inspect

    from memfit.estimator import estimate

    return "gpu_memory_bytes" in inspect.signature(estimate).parameters


@pytest.fixture(scope="module")
def committed_rows():
    sf = _scorer()
    rows = [r for r in (sf.score_pair(x) for x in sf.load_records(BOUNDARY_RECORDS + FIT_PROBES)) if r is not None]
    assert len(rows) >= 20
    return sf, rows


@pytest.mark.skipif(not BOUNDARY_RECORDS, reason="no rehearsed-boundary record committed yet")
def test_fit_answers_no_worse_than_today(committed_rows):
    """A guard on the committed boundaries (191 pairs: 159 on an H200, boundaries-13's 15 and boundaries-14's 17 on
    an H100, with fresh-process probes, and session 13's fresh runs wherever a boundary's verdict had followed a
    failure in its process, validation/records/h100-fit-probes-15*.json, and session 16's two, h100-fit-probes-16.json,
    which fail one above Gemma-3-1B generate-2048-exp's 84 and Qwen2.5-7B generate-1k 24 GiB's 43 and change
    nothing; the three 80 GiB pairs still want an H200): exact on 157, above on 9 (six OLMoE LoRA
    pairs with checkpointing, 18 vs 15 down to 48 vs 40, where the estimate's stream is not the real one and the
    capped trace answers the fresh boundaries; Llama-3.1-8B LoRA 24 GiB 2 vs 1; Gemma-3-1B generate-512 295 vs 291
    and generate-2048 72 vs 71 on 16 GiB), more than one below on 4 (Llama-3.2-3B generate-256, Qwen3-1.7B
    generate-512, Qwen2.5-7B LoRA 48 GiB, Granite-3.1-8B LoRA 1k 48 GiB). Without the two-order training verdict
    (``TRAINING_BOTH_ORDERS``): exact 152, above 17. ``--verify`` (the capped trace's veto):
    validation/verify_fit.py."""
    sf, rows = committed_rows
    s = sf.summarize(rows)
    assert s["exact"] >= 157 and s["above"] <= 9 and s["further_below"] <= 4, s


@pytest.mark.skipif(not BOUNDARY_RECORDS, reason="no rehearsed-boundary record committed yet")
@pytest.mark.xfail(strict=True, reason="issue 9 is open: the replay answers 157 of 191 boundaries exactly, 9 above "
                   "(six of them OLMoE LoRA with checkpointing), 4 more than one below, and reserved worst 12.0% "
                   "(validation/fit-vs-boundaries-*.txt); this flags the day the bars are met")
def test_fit_answers_meet_the_bars_on_the_committed_boundaries(committed_rows):
    """Bars (issue): never above the real boundary, exact on >= 85 % (the rest one below); reserved at the
    boundary median |error| <= 2 %, worst <= 8 %; device total median <= 2.5 %."""
    sf, rows = committed_rows
    assert sf.bars_missed(sf.summarize(rows)) == []


def test_scorer_takes_a_first_trial_probe_above_the_search(tmp_path):
    # a pair's search ended at B, but a fresh process ran B + 3 (not monotone in the batch): the real boundary is
    # the largest batch measured to run; a probe of another job or card does not count
    sf = _scorer()
    from memfit.estimator import estimate, max_batch_size
    from memfit.job import Job

    job = Job(model="llama-3.2-1b", precision="bf16-true", seq_len=1024)
    card = 24 * GiB
    b = max_batch_size(job, card)
    est = estimate(job.replace(batch_size=b))
    bd = {"peak_reserved_bytes": est.peak_reserved_bytes, "device_total_bytes": est.device_total_bytes}
    rec = {"kind": "boundary", "name": "x", "status": "ok", "job": job.to_dict(), "gpu_memory_bytes": card,
           "max_batch_size": b - 3, "breakdown": bd}
    probe = {"kind": "probe", "pair": "x", "batch_size": b, "ok": True,
             "record": {"breakdown": {**bd, "job": job.replace(batch_size=b).to_dict(), "gpu_memory_bytes": card}}}
    other = {**probe, "record": {"breakdown": {**bd, "job": job.replace(seq_len=512).to_dict(),
                                               "gpu_memory_bytes": card}}}
    p = tmp_path / "r.json"
    p.write_text(json.dumps([rec, other]))
    assert sf.score_pair(sf.load_records([p])[0])["diff"] == 3
    p.write_text(json.dumps([rec, probe]))
    row = sf.score_pair(sf.load_records([p])[0])
    assert row["diff"] == 0 and row["measured"] == b and row["probes"] == 1 and row["trials"] == 1


def test_scorer_takes_a_probe_that_gave_no_verdict_as_none():
    # a worker that never ran (a crash, a timeout, an 80 GiB card asked of a 79 GiB GPU) leaves ``record`` None and
    # ``ok`` false: no verdict, not an out-of-memory failure (validation/records/h100-fit-probes-16.log)
    sf = _scorer()
    assert sf.probe_verdict({"ok": False, "record": None}, 2) == (None, None)
    # a hand-made probe whose record did not come back but whose exit status decided (h200-fit-probes.json)
    assert sf.probe_verdict({"ok": False, "record": None, "evidence": "exit status 1: 'does not fit'"}, 1)[0] is False
    bd = {"peak_reserved_bytes": 1, "extras": {"steps": 2}}
    assert sf.probe_verdict({"ok": False, "record": {"breakdown": bd}}, 2) == (False, bd)


def test_scorer_reads_a_probe_of_more_steps_only_as_far_as_the_search_s_steps():
    # an inference search runs one step a trial; a fresh two-step probe that fails in its second step ran the
    # search's job (a failure there is another job's: the second step runs on the first one's leftovers), one that
    # fails in its first did not; a probe of fewer steps that ran says nothing about the search's steps
    sf = _scorer()
    bd = {"peak_reserved_bytes": 1, "device_total_bytes": 2}

    def probe(ok, steps, done=None):
        extras = {"steps": steps, **({} if done is None else {"steps_completed": done})}
        return {"kind": "probe", "ok": ok, "batch_size": 5, "record": {"breakdown": {**bd, "extras": extras}}}

    assert sf.probe_verdict(probe(False, 2, 1), 1) == (True, None)
    assert sf.probe_verdict(probe(False, 2, 0), 1) == (False, None)
    assert sf.probe_verdict(probe(True, 2), 1) == (True, None)
    assert sf.probe_verdict(probe(True, 1), 2) == (None, None)
    assert sf.probe_verdict(probe(False, 1, 0), 2) == (False, None)
    assert sf.probe_verdict(probe(False, 2, 1), 2)[0] is False  # same steps: the probe's own verdict
    assert sf.probe_verdict(probe(True, 2), 2)[1]["peak_reserved_bytes"] == 1
    assert sf.probe_verdict(probe(False, 3, 1), 2) == (False, None)  # failed within the search's two steps


def test_fresh_boundaries_plans_a_fresh_run_where_a_verdict_followed_a_failure():
    # a trial counts as clean when no failure came before it in its process: the boundary 17 after 18 failed is
    # rechecked at 17 (up if it runs, down if not); a clean 5 under a 6 that failed after 7 is rechecked at 6, upwards;
    # a search whose failures all came after its boundary's run needs nothing; where fresh runs failed at every batch
    # the search ran, it goes on down
    sys.path.insert(0, str(REPO / "validation" / "probes"))
    import fresh_boundaries as fb

    def rec(name, trials, probes=(), card=40 * GiB):
        return {"name": name, "status": "ok", "max_batch_size": 1, "gpu_memory_bytes": card,
                "job": {"task": "train"}, "find_max_batch": {"steps": 2, "trials": [
                    {"batch_size": b, "ok": bool(ok)} for b, ok in trials]},
                "probes": [{"batch_size": b, "ok": ok} for b, ok in probes]}

    recs = [rec("a", [(18, 0), (17, 1)]), rec("b", [(4, 1), (5, 1), (7, 0), (6, 0)]), rec("c", [(3, 1), (4, 0)]),
            rec("d", [(47, 0), (46, 1)], probes=[(46, False)]), rec("e", [(2, 0), (1, 1)], card=80 * GiB),
            rec("f", [(18, 0), (17, 1)], probes=[(17, True)])]
    chains, left = fb.plan(recs, 74 * GiB, None)
    assert [(r["name"], b, d) for r, b, d in chains] == [("a", 17, 0), ("b", 6, 1), ("d", 45, -1)]
    assert [n for n, _, _ in left] == ["e"]
    assert fb.steps_for(recs[0]) == 2 and fb.steps_for({"job": {"task": "infer"}}) == 1
    # a probe is read as the scorer reads it: a two-step inference probe that failed in its second step ran the
    # one-step search's job, so the boundary is clean and the unclean failure above it is what gets rerun
    two = {"batch_size": 84, "ok": False, "record": {"breakdown": {"extras": {"steps": 2, "steps_completed": 1}}}}
    inf = rec("g", [(95, 0), (83, 1), (89, 0), (86, 0), (84, 1), (85, 0)], card=16 * GiB)
    inf["find_max_batch"]["steps"], inf["job"]["task"], inf["probes"] = 1, "infer", [two]
    chains, _ = fb.plan([inf], 74 * GiB, None)
    assert [(r["name"], b, d) for r, b, d in chains] == [("g", 85, 1)]


@pytest.mark.skipif(not BOUNDARY_RECORDS, reason="no rehearsed-boundary record committed yet")
def test_committed_boundaries_are_proven_and_capped():
    """Each measured boundary B is proven by its own trials (B ran, B + 1 ran out of memory), the allocator
    never reserved more than its cap, the allocator setting is the job's (seen in the segments), and the
    device total at B is the measured context plus the peak reserved. Exact: these are the records' own
    integers."""
    sf = _scorer()
    recs = [r for r in sf.load_records(BOUNDARY_RECORDS) if r.get("status") == "ok"]
    assert recs
    for r in recs:
        fm, b = r["find_max_batch"], r["max_batch_size"]
        tried = {t["batch_size"]: t["ok"] for t in fm["trials"]}
        assert tried[b] is True and tried.get(b + 1) is False, r["name"]
        assert all(not ok for n, ok in tried.items() if n > b) and all(ok for n, ok in tried.items() if n < b)
        assert fm["cap_respected"] is True
        assert all(t["peak_reserved_bytes"] <= fm["card"]["allocator_limit_bytes"] for t in fm["trials"])
        seen = fm["card"].get("expandable_segments_seen")
        assert seen is None or seen == r["job"]["expandable_segments"], r["name"]
        bd = r["breakdown"]
        assert bd["job"]["batch_size"] == b and bd["fits"] is True
        assert bd["device_total_bytes"] == fm["card"]["cuda_context_bytes"] + bd["peak_reserved_bytes"]
        assert bd["headroom_bytes"] == r["gpu_memory_bytes"] - bd["device_total_bytes"] >= 0


#: Inference boundaries whose every trial the one-call stream reproduces. They drove the op-by-op prefill
#: stream (fitted, not held out): generate() with a growing cache, a long decode, plain prefills with a 150k and
#: a soft-capped 256k vocabulary.
INFER_TRIAL_RECORDS = ["gemma-3-1b-generate-2048", "qwen2.5-1.5b-decode-512", "qwen3-4b-prefill-4k",
                       "gemma-2-2b-prefill-4k", "llama-3.2-1b-prefill-8k"]


@pytest.mark.skipif(not BOUNDARY_RECORDS, reason="no rehearsed-boundary record committed yet")
@pytest.mark.parametrize("name", INFER_TRIAL_RECORDS)
def test_inference_replay_agrees_with_every_measured_trial(name):
    """Each trial of the rehearsed search (a batch that ran, or ran out of memory, on the capped H200) gets
    the same verdict from the estimate's one-call inference stream replayed at that trial's allocator limit
    (``measure --find-max-batch`` runs one generate() per trial after ``empty_cache``). Where a trial ran out
    of memory the replay fails on the same request (within 0.5 %: the request is the layer's widest tensor or
    the logits) and, where the real allocator freed its cache once before failing, the reserve it failed with
    is within 256 MiB (mostly within 64 MiB, the replay keeping both cuBLAS workspaces; the worst, Gemma 2 at
    batch 4, is 224 MiB under). Gemma 3's largest trials freed it twice and reserved 0.9 GiB less than the
    replay: the verdict and the request still agree there."""
    from memfit.estimator import _spec, _stream
    from memfit.estimator.events import replay
    from memfit.job import Job

    rec = next(r for r in _scorer().load_records(BOUNDARY_RECORDS) if r.get("name") == name)
    fm = rec["find_max_batch"]
    job = Job.from_dict(rec["job"])
    spec = _spec(job, None)
    for trial in fm["trials"]:
        stream = _stream(spec, job.replace(batch_size=trial["batch_size"]), fit=True)[0]
        run = replay(stream, capacity_bytes=fm["card"]["allocator_limit_bytes"],
                     expandable_segments=job.expandable_segments)
        assert run.completed is trial["ok"], (name, trial["batch_size"])
        if not trial["ok"]:
            assert abs(run.failed_request_bytes / trial["oom_request_bytes"] - 1) < 5e-3, (name, trial["batch_size"])
            if trial["num_alloc_retries"] <= 1:
                assert abs(run.peak_reserved_bytes - trial["peak_reserved_bytes"]) <= 256 << 20, \
                    (name, trial["batch_size"])


def test_allocator_setting_cannot_switch_once_cuda_runs(monkeypatch):
    """In-process: CUDA already initialised with the other setting is a one-line error naming the way out;
    before CUDA starts the setting is applied (environment and torch's setter)."""
    from types import SimpleNamespace

    from memfit.measurer.card import apply_allocator_setting

    applied = []
    state = {"conf": "expandable_segments:False", "init": True}
    fake = SimpleNamespace(
        _C=SimpleNamespace(_accelerator_getAllocatorSettings=lambda: state["conf"],
                           _accelerator_setAllocatorSettings=lambda c: (applied.append(c), state.update(conf=c))),
        cuda=SimpleNamespace(is_initialized=lambda: state["init"]))
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    with pytest.raises(MemfitError, match="fresh process") as exc:
        apply_allocator_setting(fake, True)
    assert "\n" not in str(exc.value)
    assert apply_allocator_setting(fake, False)["expandable_segments"] is False  # same setting: fine
    state["init"] = False
    got = apply_allocator_setting(fake, True)
    assert applied == ["expandable_segments:True"] and got["allocator_settings"] == "expandable_segments:True"
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


HISTORIES_5 = REPO / "validation" / "probes" / "histories-5"


@pytest.mark.skipif(not (HISTORIES_5 / "phi3-prefill4k-b44-cap.json.gz").exists(), reason="no allocator history")
@pytest.mark.parametrize("name", ["phi3-prefill4k-b44-cap", "phi3-prefill4k-b42-cap"])
def test_phi3_prefill_replay_follows_the_real_allocator_history(name):
    """Phi-3's fused ``qkv_proj`` output is one tensor that q, k and v are views of, alive until the attention
    returns (the real history: one 3168 MiB segment per layer 0 at batch 44, where the MLP's 2816 MiB ``silu``
    output later lands). The estimate's one-call stream replayed under the history's own allocator limit
    completes, frees its cache and retries twice as the real allocator did (``num_alloc_retries`` 2: once in
    layer 1's MLP, once for the 11 GiB logits), and peaks within 16 MiB of the real reserve (the real one also
    caches the two 16 MiB sliding-window mask segments, which the stream keeps as one)."""
    import gzip

    from memfit.allocator import CachingAllocatorModel
    from memfit.estimator import _spec, _stream
    from memfit.job import Job

    rec = json.loads(gzip.open(HISTORIES_5 / f"{name}.json.gz", "rt").read())
    job = Job.from_dict(rec["job"])
    stream = _stream(_spec(job, None), job, fit=True)[0]
    alloc = CachingAllocatorModel(rec["limit_bytes"], on_oom="raise")
    assert alloc.run(stream.ops) == -1
    real = rec["breakdown"]
    assert alloc.num_alloc_retries == real["extras"]["allocator"]["num_alloc_retries"] == 2
    assert 0 <= real["peak_reserved_bytes"] - alloc.peak_reserved <= 16 << 20
    assert abs(alloc.peak_allocated - real["peak_allocated_bytes"]) <= 1 << 20


def test_phi3_prefill_4k_boundary_on_a_24gib_card():
    """h4-phi-3-mini-prefill-4k (validation/records/h200-boundaries-4.json, h200-fit-probes-4.json): batch 44
    runs on a rehearsed 24 GiB card, 45 does not; the replay used to stop at 42 (q, k and v as three tensors)."""
    from memfit.estimator import fits_on, max_batch_size
    from memfit.job import Job

    job = Job.from_dict({"model": "phi-3-mini", "task": "infer", "precision": "bf16-true", "prompt_len": 4096,
                         "new_tokens": 0, "batch_size": 1})
    assert max_batch_size(job, 24 << 30) == 44
    assert not fits_on(job.replace(batch_size=45), 24 << 30)


def test_the_lora_checkpointing_note_states_the_committed_figures(capsys):
    """The --max-batch-size notes for LoRA with checkpointing cite counts, MoE models and dense ones apart: they
    must be what the committed validation/verify-fit.json and boundary records say (this test fails when new pairs
    change them)."""
    import re

    from memfit.cli import main
    from memfit.models import load_model

    jobs = {}
    for f in BOUNDARY_RECORDS:
        for r in json.loads(f.read_text()):
            if isinstance(r, dict) and "name" in r and "job" in r:
                jobs[r["name"]] = r["job"]
    rows = json.loads((REPO / "validation" / "verify-fit.json").read_text())
    kind = [r for r in rows if jobs[r["name"]]["method"] in ("lora", "qlora") and jobs[r["name"]]["gradient_checkpointing"]]

    def is_moe(r):
        return any(b.moe for b in load_model(jobs[r["name"]]["model"]).blocks)

    for model, moe in (("qwen3-8b", False), ("olmoe-1b-7b", True)):
        mine = [r for r in kind if is_moe(r) == moe]
        above = [r for r in mine if r["estimate"] > r["measured"]]
        main(["estimate", model, "--method", "lora", "--gradient-checkpointing", "--precision", "bf16-true",
              "--gpu-memory", "40GiB", "--max-batch-size"])
        note = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note:") and "checkpointing" in ln]
        assert note, "the note is printed"
        m = re.search(r"on (\d+) of (\d+) rehearsed", note[0])
        assert (int(m.group(1)), int(m.group(2))) == (len(above), len(mine)), model
        assert not [r for r in mine if min(r["estimate"], r["verified"]) > r["measured"]]
        by = sorted(r["estimate"] - r["measured"] for r in above)
        if moe:
            assert f"by {by[0]} to {by[-1]} batches" in note[0]
            exact = sum(r["verified"] == r["measured"] for r in above)
            below = sum(r["verified"] == r["measured"] - 1 for r in above)
            assert f"answered {exact} of those {len(above)} exactly and one a batch below" in note[0] and below == 1
            olmoe = [r for r in mine if jobs[r["name"]]["model"].startswith("olmoe")]
            assert sorted(r["name"] for r in above) == sorted(r["name"] for r in olmoe)  # "every OLMoE one"
        else:
            assert by == [1] and "by one batch" in note[0]


def test_a_training_verdict_holds_under_both_segment_address_orders(monkeypatch):
    """A training run must complete with new large segments at decreasing and at increasing addresses (which of
    several equal-size cached blocks a request takes depends on them; ``TRAINING_BOTH_ORDERS``). Qwen3-8B LoRA
    with checkpointing on 40 GiB at batch 5 completes in the model's order only: it does not fit (real boundary 4,
    h6-qwen3-8b-lora-ckpt), and with the rule off it would. An inference verdict follows the one order:
    Qwen2.5-3B generate on 24 GiB at its real boundary 273 fails at increasing addresses."""
    import memfit.estimator as est
    from memfit import Job
    from memfit.estimator import _stream, estimate, fits_on, max_batch_size
    from memfit.estimator.events import cuda_context_bytes, replay
    from memfit.models import load_model

    job = Job(model="qwen3-8b", method="lora", lora_rank=16, precision="bf16-true", seq_len=2048,
              gradient_checkpointing=True, batch_size=5)
    cap = 40 * GiB - cuda_context_bytes("train", "none")
    stream = _stream(load_model("qwen3-8b"), job, fit=True)[0]
    assert replay(stream, capacity_bytes=cap).completed
    assert not replay(stream, capacity_bytes=cap, large_addresses="up").completed
    assert est.TRAINING_BOTH_ORDERS is True
    assert not fits_on(job, 40 * GiB)
    bd = estimate(job, gpu_memory_bytes=40 * GiB)
    assert bd.fits is False and est.ONE_ORDER_NOTE in bd.notes
    assert max_batch_size(job, 40 * GiB) == 4
    assert fits_on(job.replace(batch_size=4), 40 * GiB)
    monkeypatch.setattr(est, "TRAINING_BOTH_ORDERS", False)
    assert fits_on(job, 40 * GiB) and estimate(job, gpu_memory_bytes=40 * GiB).fits
    monkeypatch.undo()

    inf = Job(model="qwen2.5-3b", task="infer", precision="bf16-true", prompt_len=512, new_tokens=128, batch_size=273)
    icap = 24 * GiB - cuda_context_bytes("infer", "none")
    istream = _stream(load_model("qwen2.5-3b"), inf, fit=True)[0]
    assert not replay(istream, capacity_bytes=icap, large_addresses="up").completed
    assert fits_on(inf, 24 * GiB) and estimate(inf, gpu_memory_bytes=24 * GiB).fits
