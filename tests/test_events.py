"""The estimate's event stream and its replay through the caching-allocator model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memfit.estimator import _spec, _stream, estimate, fits_on, max_batch_size
from memfit.estimator.events import CUDA_CONTEXT_BYTES, Stream, account, replay
from memfit.job import Job

GIB = 2**30
H100 = 85_017_493_504  # an H100 80GB HBM3 as torch.cuda.mem_get_info reports it
GOLDEN = json.loads((Path(__file__).parent / "data" / "moments_peak_allocated.json").read_text())


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: "-".join(str(v) for v in c["job"].values())[:60])
def test_stream_peak_is_the_closed_form_moments_peak(case):
    """Peak allocated of 120 jobs (train/infer, all precisions, LoRA, checkpointing, quantized, MoE, encoders)
    as the closed-form moments gave it before the stream existed (memfit 29ba5ca). Tolerance 0.01%: the batch
    (3 x int64 per token) now stays alive through the optimizer step and the prompt ids through generate()'s
    prefill, as in the real run; nothing else may move (entries with a "note" were re-pinned when a rule was
    corrected on purpose)."""
    bd = estimate(Job.from_dict(case["job"]))
    want = case["peak_allocated_bytes"]
    assert abs(bd.peak_allocated_bytes - want) <= 1e-4 * want
    assert sum(bd.components.values()) == bd.peak_allocated_bytes


@pytest.mark.parametrize("job", [
    Job(model="llama-3.2-1b", task="train", precision="bf16-mixed", batch_size=2, seq_len=512),
    Job(model="qwen2.5-0.5b", task="train", method="lora", gradient_checkpointing=True, seq_len=512),
    Job(model="gemma-3-1b", task="infer", precision="bf16-true", prompt_len=256, new_tokens=16, batch_size=2),
])
def test_every_tensor_but_the_persistent_ones_is_freed(job):
    """Weights, optimizer states, adapters, quant state, the batch and the cuBLAS workspaces stay; every other
    allocation of the stream has its free (exact count)."""
    spec = _spec(job, None)
    stream, *_ = _stream(spec, job)
    alive: dict[int, str] = {}
    for op in stream.ops:
        if op[0] == 0:
            alive[op[1]] = op[3]
        elif op[0] == 1:
            del alive[op[1]]
    assert set(alive.values()) <= {"weights", "optimizer_states", "lora_adapters", "quantization_state",
                                   "temporaries", "autocast_cache"}
    leftover_temps = sum(1 for c in alive.values() if c == "temporaries")
    # training: the batch (3) + 2 workspaces (the autograd thread has its own handle); inference: 1 workspace
    # (every matmul on the main thread; the prompt ids and generate()'s mask are freed)
    assert leftover_temps == (5 if job.task == "train" else 1)


def test_account_and_replay_of_a_small_stream():
    """Hand-made stream: the accounting is exact; the allocator's reserve follows its segment rules
    (a 5 MiB request takes a 20 MiB segment; a 16 MiB one does not fit the 15 MiB left and gets its own)."""
    s = Stream()
    s.phase("forward")
    a = s.alloc(5 << 20, "activations")
    b = s.alloc(16 << 20, "activations")
    s.free(a)
    s.reset_peaks()
    s.phase("backward")
    c = s.alloc(3 << 20, "gradients")
    s.free(b)
    s.free(c)
    r = replay(s)
    assert r.peak_allocated_bytes == (16 << 20) + (3 << 20)
    assert r.components == {"activations": 16 << 20, "gradients": 3 << 20}
    assert r.peak_phase == "backward"
    assert r.peak_reserved_bytes == (20 << 20) + (16 << 20)  # the 3 MiB request reuses the 20 MiB segment
    assert account(s).peak_allocated_bytes == r.peak_allocated_bytes
    capped = replay(s, capacity_bytes=25 << 20)
    assert not capped.completed and capped.failed_request_bytes == 16 << 20 and capped.failed_phase == "forward"


@pytest.mark.parametrize("job,card", [
    (Job(model="qwen2.5-0.5b", task="train", precision="bf16-true", seq_len=1024), 24 * GIB),
    (Job(model="llama-3.2-1b", task="train", method="lora", gradient_checkpointing=True, seq_len=2048), 16 * GIB),
    (Job(model="llama-3.2-1b", task="infer", precision="bf16-true", prompt_len=1024, new_tokens=0), 12 * GIB),
])
def test_capped_replay_fits_at_max_batch_size_and_not_one_more(job, card):
    """max_batch_size is the largest batch whose capped replay completes: exact at b, failing at b + 1."""
    b = max_batch_size(job, card)
    assert b >= 1
    at = estimate(job.replace(batch_size=b), gpu_memory_bytes=card)
    over = estimate(job.replace(batch_size=b + 1), gpu_memory_bytes=card)
    assert at.fits is True and at.headroom_bytes >= 0
    assert over.fits is False
    assert over.extras["decided_by"]  # the request that failed names its component
    assert fits_on(job.replace(batch_size=b), card) and not fits_on(job.replace(batch_size=b + 1), card)


@pytest.mark.parametrize("job", [
    Job(model="llama-3.2-1b", task="train", precision="bf16-true", batch_size=4, seq_len=1024),
    Job(model="llama-3.2-1b", task="train", precision="bf16-mixed", gradient_checkpointing=True, batch_size=8,
        seq_len=1024),
    Job(model="qwen2.5-0.5b", task="train", method="lora", batch_size=4, seq_len=2048),
    Job(model="gemma-3-1b", task="infer", precision="bf16-true", prompt_len=1024, new_tokens=32, batch_size=8),
])
def test_expandable_segments_never_reserve_more_than_default(job):
    default = estimate(job)
    expandable = estimate(job.replace(expandable_segments=True))
    assert expandable.peak_allocated_bytes == default.peak_allocated_bytes
    assert expandable.peak_reserved_bytes <= default.peak_reserved_bytes
    assert expandable.peak_reserved_bytes >= expandable.peak_allocated_bytes


def test_reserve_comes_from_the_replay_not_a_ratio():
    """Reserved is at least allocated and varies with the run's shape (no fixed factor): the measured records
    span reserved/allocated of 1.01 to 1.40, so two different runs must not share one ratio."""
    a = estimate(Job(model="llama-3.2-1b", task="train", precision="bf16-true", batch_size=4, seq_len=1024))
    b = estimate(Job(model="llama-3.2-1b", task="train", precision="bf16-true", gradient_checkpointing=True,
                     batch_size=8, seq_len=1024))
    for bd in (a, b):
        assert bd.peak_reserved_bytes >= bd.peak_allocated_bytes
        assert bd.device_total_bytes == bd.peak_reserved_bytes + CUDA_CONTEXT_BYTES
    ra = a.peak_reserved_bytes / a.peak_allocated_bytes
    rb = b.peak_reserved_bytes / b.peak_allocated_bytes
    assert abs(ra - rb) > 1e-3


def test_llama_8b_full_bf16_fits_an_80gb_card_now():
    """The issue's case: full bf16 Llama-3.1-8B, seq 2048, checkpointing, AdamW on an H100 80GB. The fitted ratio
    said it did not fit even at batch 1 (device total 88.5 GiB); it runs at batch 6 (measured reserve 78.2 GiB).
    The replay must at least say batch 1 fits with the 74.85 GiB peak allocated memfit has always given."""
    job = Job(model="llama-3.1-8b", task="train", precision="bf16-true", seq_len=2048, gradient_checkpointing=True)
    one = estimate(job, gpu_memory_bytes=H100)
    assert one.fits is True
    assert abs(one.peak_allocated_bytes / GIB - 74.85) < 0.01
    assert one.device_total_bytes < 88.5 * GIB
    assert max_batch_size(job, H100) >= 1


@pytest.mark.xfail(strict=True, reason="the decode stream does not yet reproduce the fragmentation that stops "
                                       "Gemma-3-1B generate() at 71 sequences on 16 GiB (the replay says 122)")
def test_gemma_generate_limit_on_16gb_is_71():
    job = Job(model="gemma-3-1b", task="infer", precision="bf16-true", prompt_len=2048, new_tokens=128)
    assert max_batch_size(job, 16 * GIB) == 71


def test_fragmentation_note_names_expandable_segments():
    """A run whose tensors fit but whose replay fails says so and what expandable_segments gives."""
    # batch 7: its tensors fit the H100 with the context, its allocator does not (the H200 boundary search measured
    # 7 failing on an 80 GiB cap, 6 running)
    job = Job(model="llama-3.1-8b", task="train", precision="bf16-true", seq_len=2048, gradient_checkpointing=True,
              batch_size=7)
    bd = estimate(job, gpu_memory_bytes=H100)
    if bd.fits:
        pytest.skip("the replay fits this batch: no fragmentation verdict to check")
    assert any("fragmentation" in n and "expandable_segments" in n for n in bd.notes)
    assert "fits_with_expandable_segments" in bd.extras
