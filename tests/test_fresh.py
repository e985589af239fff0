"""The fresh-process check of a searched boundary (memfit.measurer.fresh) and ``memfit measure --find-max-batch``'s
use of it, without a GPU: the fresh runs and the worker's search are stood in for."""

from __future__ import annotations

import json

import pytest

from memfit.cli import main
from memfit.measurer import fresh as fr

GiB = 1 << 30


def _fresh(truth):
    """A fresh run that answers from ``truth`` (batch -> runs), recording what it was asked."""
    asked = []

    def run(b):
        asked.append(b)
        return truth(b)

    return run, asked


def test_a_boundary_reached_after_a_failure_is_rerun_fresh_and_followed_down():
    # boundaries-14's OLMoE pair: the search ran 17 right after 18 failed; fresh processes fail 17 and 16, run 15
    run, asked = _fresh(lambda b: b <= 15)
    out = fr.confirm_boundary([(18, False), (17, True)], run)
    assert out == {"max_batch_size": 15, "fresh_trials": [(17, False), (16, False), (15, True)], "settled": True}
    assert asked == [17, 16, 15]


def test_a_fresh_run_that_confirms_the_boundary_also_checks_an_unclean_failure_above():
    # 6 ran after 8 had failed, and 7 failed after that: both are rechecked; the answer stands at 6
    run, asked = _fresh(lambda b: b <= 6)
    out = fr.confirm_boundary([(1, True), (2, True), (4, True), (8, False), (6, True), (7, False)], run)
    assert out["max_batch_size"] == 6 and asked == [6, 7] and out["settled"]
    # where 7 runs fresh the answer moves up, and 8 (a clean failure: the first) is not rerun
    run, asked = _fresh(lambda b: b <= 7)
    out = fr.confirm_boundary([(1, True), (2, True), (4, True), (8, False), (6, True), (7, False)], run)
    assert out["max_batch_size"] == 7 and asked == [6, 7]


def test_clean_verdicts_need_no_fresh_run_and_a_clean_boundary_under_an_unclean_failure_gets_one():
    run, asked = _fresh(lambda b: True)
    assert fr.confirm_boundary([(3, True), (4, False)], run) == {"max_batch_size": 3, "fresh_trials": [],
                                                                 "settled": True}
    assert asked == []
    # 5 ran before any failure; 6 failed after 7 had: 6 is run fresh, and upwards while it runs
    run, asked = _fresh(lambda b: b <= 6)
    out = fr.confirm_boundary([(4, True), (5, True), (7, False), (6, False)], run)
    assert out["max_batch_size"] == 6 and asked == [6]  # 7's failure was the first: clean, so no further run


def test_fresh_runs_stop_at_the_limit_and_say_the_boundary_is_not_settled():
    run, asked = _fresh(lambda b: b <= 2)
    out = fr.confirm_boundary([(18, False), (17, True)], run, max_runs=3)
    assert asked == [17, 16, 15] and not out["settled"] and out["max_batch_size"] == 0
    assert fr.first_fresh(fr.clean_verdicts([(1, False)])) is None  # nothing fits, proven at 1
    assert fr.clean_verdicts([(2, True), (3, False), (2, True)]) == {2: (True, False), 3: (False, True)}


def _search_record(trials, steps=2):
    return {"kind": "boundary", "max_batch_size": max([b for b, ok in trials if ok], default=0),
            "find_max_batch": {"steps": steps, "model_fits": True, "trials": [
                {"batch_size": b, "ok": ok} for b, ok in trials],
                "card": {"cuda_context_bytes": 700 << 20, "allocator_limit_bytes": 23 * GiB},
                "allocator_setting": {"expandable_segments": False}},
            "breakdown": {"peak_reserved_bytes": 1, "fits": True}}


def test_measure_find_max_batch_takes_the_fresh_processes_answer(monkeypatch, capsys):
    asked = []

    def search(job, card, **kw):
        assert card == 24 * GiB and job.model == "llama-3.2-1b"
        for b, ok in [(18, False), (17, True)]:
            kw["on_trial"]({"batch_size": b, "ok": ok, "seconds": 1.0, "peak_reserved_bytes": 20 * GiB})
        return _search_record([(18, False), (17, True)])

    def trial(job, card, b, *, steps):
        asked.append((b, steps))
        return {"batch_size": b, "ok": b <= 15, "peak_reserved_bytes": 2 * GiB, "device_total_bytes": 3 * GiB,
                "record": {"breakdown": {"peak_reserved_bytes": 2 * GiB, "fits": b <= 15, "batch": b}}}

    monkeypatch.setattr(fr, "search_in_worker", search)
    monkeypatch.setattr(fr, "worker_trial", trial)
    assert main(["measure", "llama-3.2-1b", "--gpu-memory", "24GiB", "--find-max-batch"]) == 0
    out = capsys.readouterr().out
    assert "largest micro-batch that runs: 15 (the search's process ran 17" in out
    assert "batch    16: out of memory in a fresh process" in out
    assert asked == [(17, 2), (16, 2), (15, 2)]
    assert main(["measure", "llama-3.2-1b", "--gpu-memory", "24GiB", "--find-max-batch", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert (rec["max_batch_size"], rec["search_max_batch_size"], rec["fresh_settled"]) == (15, 17, True)
    assert [t["batch_size"] for t in rec["fresh_trials"]] == [17, 16, 15]
    assert rec["boundary"]["batch"] == 15  # the run at the answer is the fresh one
    assert rec["steps"] == 2 and [t["batch_size"] for t in rec["trials"]] == [18, 17]  # find_max_batch's keys
    # the note names the answer, not the search's (the first GPU run of this path, session 16, printed 17 there)
    assert rec["note"].startswith("largest micro-batch that runs: 15 (")


def test_measure_find_max_batch_without_the_fresh_check_keeps_the_in_process_search(monkeypatch, capsys):
    import memfit.measurer.engine as engine

    def boom(*a, **k):
        raise AssertionError("no worker process without the fresh check")

    monkeypatch.setattr(fr, "search_in_worker", boom)
    monkeypatch.setattr(engine, "find_max_batch", lambda job, card, **kw: {
        "max_batch_size": 4, "trials": [], "card": {"cuda_context_bytes": 0, "allocator_limit_bytes": card},
        "allocator_setting": {"expandable_segments": False}, "note": "largest micro-batch that runs: 4"})
    assert main(["measure", "llama-3.2-1b", "--gpu-memory", "24GiB", "--find-max-batch", "--no-fresh-check"]) == 0
    assert "largest micro-batch that runs: 4" in capsys.readouterr().out


def test_a_worker_that_rejects_the_job_gives_its_one_line_error(monkeypatch, capsys):
    def run_worker(args, timeout, on_line=None):
        return 2, "memfit: error: measuring needs a CUDA GPU: none is visible\n"

    monkeypatch.setattr(fr, "_run_worker", run_worker)
    assert main(["measure", "llama-3.2-1b", "--gpu-memory", "24GiB", "--find-max-batch"]) != 0
    err = capsys.readouterr().err
    assert "measuring needs a CUDA GPU" in err and "Traceback" not in err


def test_plan_prints_the_lora_checkpointing_note_only_where_a_candidate_is_of_that_kind(capsys):
    from memfit.verdict import lora_ckpt_note

    args = ["plan", "olmoe-1b-7b", "--method", "lora", "--lora-targets", "q_proj,k_proj,v_proj,o_proj",
            "--gradient-checkpointing", "--precision", "bf16-true", "--gpu-memory", "40GiB", "--vary", "batch"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "note: MoE LoRA with checkpointing: on 6 of 9" in out and "by 2 to 8 batches" in out
    assert main(["plan", "llama-3.2-1b", "--batch-size", "8", "--seq-len", "2048", "--gpu", "rtx-4090"]) == 0
    assert "note:" not in capsys.readouterr().out  # full fine-tuning: no note
    from memfit.job import Job

    assert lora_ckpt_note(Job(model="qwen3-8b", method="lora", gradient_checkpointing=True)).startswith(
        "note: LoRA with checkpointing: on 1 of 79")
    assert lora_ckpt_note(Job(model="qwen3-8b", method="lora")) is None


def test_plan_verify_marks_the_first_candidates_with_the_capped_trace_s_verdict(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    args = ["plan", "llama-3.2-1b", "--method", "lora", "--gradient-checkpointing", "--precision", "bf16-true",
            "--seq-len", "1024", "--batch-size", "8", "--gpu-memory", "16GiB", "--top", "2", "--verify", "1"]
    assert main(args + ["--json"]) == 0
    cands = json.loads(capsys.readouterr().out)["candidates"]
    assert isinstance(cands[0]["verified_by_trace"], bool) and "verified_by_trace" not in cands[1]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    row = [ln for ln in out if ln.startswith(" 1 ")][0]
    assert "[trace: runs]" in row or "[trace: out of memory]" in row
    assert "[trace:" not in [ln for ln in out if ln.startswith(" 2 ")][0]


def test_a_fresh_run_that_gives_no_verdict_leaves_the_search_s_answer_unsettled(monkeypatch, capsys):
    from memfit.errors import MemfitError

    monkeypatch.setattr(fr, "search_in_worker", lambda job, card, **kw: _search_record([(18, False), (17, True)]))

    def trial(job, card, b, *, steps):
        raise MemfitError(f"the fresh run of batch {b} failed (timed out): ")

    monkeypatch.setattr(fr, "worker_trial", trial)
    assert main(["measure", "llama-3.2-1b", "--gpu-memory", "24GiB", "--find-max-batch"]) == 0
    out = capsys.readouterr().out
    assert "largest micro-batch that runs: 17\n" in out and "a fresh run gave no verdict" in out
    assert "clean" not in out and "confirmed" not in out
    run, asked = _fresh(lambda b: None)
    assert fr.confirm_boundary([(18, False), (17, True)], run) == {"max_batch_size": 17, "fresh_trials": [],
                                                                   "settled": False}
