"""The trace engine: exact bytes where the answer is exact, the CUDA behaviours it emulates, its fallbacks.

Everything runs on tiny models (a 2-layer Llama and GPT-2 with a 1000-token vocabulary): a trace of one
takes well under a second. The real-GPU comparison (median |error| of the peak) lives in validation/.
"""

from __future__ import annotations

import json
import sys

import pytest

from memfit import Job
from memfit.errors import JobError
from memfit.tracer.allocator import (LARGE_SEGMENT_BYTES, SMALL_SEGMENT_BYTES, CachingAllocatorModel, round_size,
                                     segment_size)

MiB = 1 << 20

TINY_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
    "max_position_embeddings": 512, "tie_word_embeddings": False,
}
TINY_GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "n_head": 4,
             "vocab_size": 1000, "n_positions": 512}


# --------------------------------------------------------------------------------------------- allocator
def test_round_size_is_a_multiple_of_512_and_at_least_512():
    assert round_size(1) == 512
    assert round_size(512) == 512
    assert round_size(513) == 1024
    assert round_size(4 * MiB + 1) == 4 * MiB + 512


def test_segment_sizes_follow_the_pools():
    assert segment_size(512) == SMALL_SEGMENT_BYTES          # small requests share 2 MiB segments
    assert segment_size(1 * MiB) == SMALL_SEGMENT_BYTES
    assert segment_size(1 * MiB + 512) == LARGE_SEGMENT_BYTES  # 1..10 MiB share 20 MiB segments
    assert segment_size(10 * MiB) == 10 * MiB               # from 10 MiB: own segment, rounded to 2 MiB
    assert segment_size(11 * MiB) == 12 * MiB


def test_small_requests_pack_into_one_segment_and_blocks_are_reused():
    sim = CachingAllocatorModel()
    blocks = [sim.malloc(100) for _ in range(4)]
    assert sim.allocated == 4 * 512 and sim.reserved == SMALL_SEGMENT_BYTES
    sim.free(blocks[1])
    again = sim.malloc(300)  # best fit: the freed 512-byte hole, not the segment's tail
    assert again.addr == blocks[1].addr
    assert sim.reserved == SMALL_SEGMENT_BYTES


def test_an_unsplit_large_block_counts_whole():
    # A 2 MiB request carves a 20 MiB segment; after it is freed, a 19.5 MiB request takes the merged
    # 20 MiB block whole (the 0.5 MiB left is not worth splitting off in the large pool): allocated counts it all.
    sim = CachingAllocatorModel()
    b = sim.malloc(2 * MiB)
    assert sim.allocated == 2 * MiB and sim.reserved == 20 * MiB
    sim.free(b)
    assert sim.allocated == 0
    big = sim.malloc(19 * MiB + MiB // 2)
    assert big.size == 20 * MiB and sim.allocated == 20 * MiB and sim.reserved == 20 * MiB


def test_freed_neighbours_merge():
    sim = CachingAllocatorModel()
    a, b, c = sim.malloc(2 * MiB), sim.malloc(2 * MiB), sim.malloc(2 * MiB)
    sim.free(a)
    sim.free(b)
    d = sim.malloc(4 * MiB)  # fits only in a + b merged
    assert d.addr == a.addr and sim.reserved == 20 * MiB
    sim.free(c)
    sim.free(d)
    assert sim.allocated == 0 and sim.peak_allocated == 6 * MiB


# --------------------------------------------------------------------------------------------- traces
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from memfit.reference import spec_from_config  # noqa: E402
from memfit.tracer import trace  # noqa: E402


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama") / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return str(path)


def _job(path, **kw):
    kw.setdefault("seq_len", 64)
    return Job(model=path, **kw)


def _spec(config=TINY_LLAMA):
    return spec_from_config(config, name="tiny")


def _param_bytes(config, dtype, predicate=lambda name: True):
    """Every parameter's own block (512-byte multiple), counted as the allocator rounds it."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**config), dtype=dtype)
    return sum(round_size(p.numel() * p.element_size()) for n, p in model.named_parameters() if predicate(n))


def test_weights_are_the_parameters_to_the_byte(llama_path):
    bd = trace(_job(llama_path, precision="bf16-true"), spec=_spec(), fallback=False)
    buffers = 2 * 512  # the rotary embedding's inv_freq and original_inv_freq (32 fp32 each)
    assert bd.engine == "trace" and bd.measurement == "fake-tensors"
    assert bd.components["weights"] == _param_bytes(TINY_LLAMA, torch.bfloat16) + buffers
    assert bd.parameters == _count(TINY_LLAMA)


def _count(config):
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    return sum(p.numel() for p in model.parameters())


def test_adamw_states_are_exactly_two_fp32_copies_of_the_parameters(llama_path):
    bd = trace(_job(llama_path, precision="bf16-mixed", optimizer="adamw"), spec=_spec(), fallback=False)
    assert bd.components["optimizer_states"] == 2 * _param_bytes(TINY_LLAMA, torch.float32)


def test_every_component_is_in_whole_blocks_and_they_add_up(llama_path):
    bd = trace(_job(llama_path), spec=_spec(), fallback=False)
    assert all(v % 512 == 0 for v in bd.components.values())
    assert sum(bd.components.values()) == bd.peak_allocated_bytes
    assert bd.peak_reserved_bytes >= bd.peak_allocated_bytes
    assert bd.device_total_bytes > bd.peak_reserved_bytes


def test_foreach_adamw_step_holds_one_temporary_as_large_as_all_parameters(llama_path):
    # On CUDA torch.optim picks the multi-tensor AdamW, whose _foreach_sqrt makes a copy of every exp_avg_sq
    # at once; the trace takes that path on its fake CPU parameters too.
    bd = trace(_job(llama_path, precision="32-true"), spec=_spec(), fallback=False)
    params = _param_bytes(TINY_LLAMA, torch.float32)
    assert bd.peak_phase == "optimizer_step"
    assert bd.components["temporaries"] >= params


def _shapes_saved(path, attention):
    from memfit.tracer.engine import _TraceRun

    run = _TraceRun(torch, _job(path, seq_len=96, attention=attention), _spec(), None, cuda=True, sdpa="cudnn",
                    steps=1)
    run.execute()
    return [r.shape for r in run.tracker.records if r.phase == "forward"]


def test_sdpa_keeps_no_score_matrix_but_eager_does(llama_path):
    S, H = 96, TINY_LLAMA["num_attention_heads"]
    scores = (1, H, S, S)  # (batch, heads, queries, keys)
    assert scores not in _shapes_saved(llama_path, "sdpa")
    assert _shapes_saved(llama_path, "eager").count(scores) >= TINY_LLAMA["num_hidden_layers"]


def test_sdpa_takes_the_kernel_cuda_takes(llama_path):
    bf16 = trace(_job(llama_path, precision="bf16-mixed"), spec=_spec(), fallback=False)
    assert set(bf16.extras["sdpa_backends"]) == {"cudnn"}
    flash = trace(_job(llama_path, precision="bf16-mixed"), spec=_spec(), fallback=False, sdpa="flash")
    assert set(flash.extras["sdpa_backends"]) == {"flash"}
    # fp32 with grouped-query attention: no fused kernel takes it on the H100, the math backend runs.
    fp32 = trace(_job(llama_path, precision="32-true"), spec=_spec(), fallback=False)
    assert set(fp32.extras["sdpa_backends"]) == {"math"}


def test_cuda_autocast_policy_on_the_cpu():
    from memfit.tracer.cuda_emulation import cuda_autocast_policy

    x = torch.randn(4, 8)
    w = torch.randn(8, 8, requires_grad=True)
    with cuda_autocast_policy(torch), torch.autocast("cpu", dtype=torch.bfloat16):
        y = x @ w
        assert y.dtype == torch.bfloat16
        assert torch.softmax(y, -1).dtype == torch.float32       # fp32_set_opt_dtype on CUDA
        assert torch.nn.functional.layer_norm(y, (8,)).dtype == torch.float32  # fp32 list on CUDA
        assert torch.einsum("ij,jk->ik", x, w).dtype == torch.bfloat16  # lower precision on CUDA only
    with torch.autocast("cpu", dtype=torch.bfloat16):  # restored afterwards: the CPU's own lists
        assert torch.softmax(x @ w, -1).dtype == torch.bfloat16


def test_trace_of_the_cpu_run_matches_a_real_cpu_run(llama_path):
    """Without the CUDA emulation the trace counts what a real CPU run's tensors take: exactly."""
    pytest.importorskip("memfit.measurer.engine")
    from memfit.measurer.engine import measure

    job = _job(llama_path, precision="32-true", attention="eager")
    real = measure(job, device="cpu", spec=_spec(), progress=False, steps=2)
    fake = trace(job, spec=_spec(), fallback=False, cuda=False)
    assert fake.peak_allocated_bytes == real.peak_allocated_bytes
    assert fake.phases == real.phases


def test_timeline_is_compact_and_holds_the_peak(llama_path):
    bd = trace(_job(llama_path), spec=_spec(), fallback=False)
    tl = bd.extras["timeline"]
    assert 0 < len(tl) <= 2000
    assert max(p[2] for p in tl) == bd.peak_allocated_bytes
    assert {p[1] for p in tl} >= {"forward", "backward", "optimizer_step"}


def test_checkpointing_lora_and_gpt2_trace(llama_path, tmp_path):
    ckpt = trace(_job(llama_path, gradient_checkpointing=True), spec=_spec(), fallback=False)
    plain = trace(_job(llama_path), spec=_spec(), fallback=False)
    assert ckpt.phases["forward"] < plain.phases["forward"]
    lora = trace(_job(llama_path, method="lora", precision="bf16-true"), spec=_spec(), fallback=False)
    assert lora.components["lora_adapters"] > 0 and lora.trainable_parameters < lora.parameters
    gpt2 = trace(Job(model="tiny-gpt2", seq_len=64), spec=_spec(TINY_GPT2), fallback=False)
    assert gpt2.engine == "trace" and gpt2.components["logits_and_loss"] > 0


def test_generate_keeps_a_kv_cache(llama_path):
    bd = trace(_job(llama_path, task="infer", prompt_len=32, new_tokens=4, batch_size=2), spec=_spec(),
               fallback=False)
    assert bd.components.get("kv_cache", 0) > 0
    assert set(bd.phases) == {"load", "prefill", "decode"}


def test_a_users_module_is_traced_and_left_alone(llama_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TINY_LLAMA))
    before = next(model.parameters()).detach().clone()
    bd = trace(_job(llama_path), model=model, fallback=False)
    assert bd.engine == "trace" and bd.parameters == sum(p.numel() for p in model.parameters())
    first = next(model.parameters())
    assert type(first) is torch.nn.Parameter and torch.equal(first.detach(), before)


def test_bitsandbytes_jobs_fall_back_to_the_estimate(llama_path):
    job = _job(llama_path, method="lora", quantization="int8", precision="bf16-true")
    bd = trace(job, spec=_spec())
    assert bd.engine == "estimate"
    assert bd.notes[0].startswith("trace could not run:") and "bitsandbytes" in bd.notes[0]
    from memfit.tracer import TraceUnsupportedError

    with pytest.raises(TraceUnsupportedError):
        trace(job, spec=_spec(), fallback=False)


@pytest.mark.parametrize("optimizer", ["paged-adamw", "paged-adamw-8bit", "adamw-8bit"])
def test_bitsandbytes_optimizers_are_traced_with_their_device_states(tmp_path, optimizer):
    """A bitsandbytes Adam is traced with its fused kernels emulated: what it puts in PyTorch's allocator (the
    states of small tensors, uint8 states and absmax) is the estimate's device state to the block, a paged one's
    unified memory is outside the reserve and in ``host_bytes`` (the same bytes as the estimate's), and the
    reserve the paged run leaves to PyTorch is the stateless SGD run's plus those blocks."""
    from memfit.estimator import estimate

    config = dict(TINY_LLAMA, vocab_size=2048)  # embedding and head of 131072 elements: paged (>= 1e5)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    job = _job(str(path), precision="bf16-true", optimizer=optimizer)
    bd = trace(job, spec=_spec(config), fallback=False)
    est = estimate(job)
    assert bd.engine == "trace"
    assert bd.host_bytes == est.host_bytes
    assert (bd.host_bytes > 0) is optimizer.startswith("paged")
    assert bd.components["optimizer_states"] == pytest.approx(est.components["optimizer_states"], rel=0.02,
                                                              abs=16 << 10)
    sgd = trace(job.replace(optimizer="sgd"), spec=_spec(config), fallback=False)
    assert bd.device_total_bytes - bd.peak_reserved_bytes == sgd.device_total_bytes - sgd.peak_reserved_bytes + bd.host_bytes


def test_qlora_is_traced_with_emulated_4bit_linears(llama_path):
    """nf4 QLoRA training runs on fake tensors with bitsandbytes' 4-bit linears emulated: the packed weights
    and their quantization state are what the estimate counts, the matmuls' dequantized weights are temporaries."""
    from memfit.estimator import estimate

    for dq in (True, False):
        job = _job(llama_path, method="qlora", precision="bf16-true", double_quant=dq, gradient_checkpointing=True)
        bd = trace(job, spec=_spec(), fallback=False)
        est = estimate(job)
        assert bd.engine == "trace"
        for key in ("weights", "quantization_state", "lora_adapters"):
            assert bd.components[key] == pytest.approx(est.components[key], rel=0.05, abs=64 << 10), key
        assert bd.peak_allocated_bytes == pytest.approx(est.peak_allocated_bytes, rel=0.15)


def test_qlora_load_empties_the_cache_where_peft_does(llama_path):
    """peft 0.21 prepare_model_for_kbit_training calls torch.cuda.empty_cache() after upcasting the 16-bit
    parameters to fp32 (auto_clear_cache): the emulated build calls its release there, once, after the upcast."""
    import torch

    from memfit.tracer.bnb_emulation import build_qlora_model

    seen = []
    job = _job(llama_path, method="qlora", precision="bf16-true", gradient_checkpointing=True)
    model = build_qlora_model(job, _spec(), "cpu", empty_cache=lambda: seen.append("empty_cache"))
    assert seen == ["empty_cache"]
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)


def test_without_torch_it_says_how_to_install(llama_path, monkeypatch):
    from memfit.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingDependencyError, match=r"memfit\[trace\]"):
        trace(_job(llama_path), spec=_spec())


def test_cli_json_and_plot(llama_path, tmp_path, capsys):
    from memfit.cli import main

    assert main(["trace", llama_path, "--seq-len", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["engine"] == "trace" and out["peak_allocated_bytes"] == sum(out["components"].values())
    pytest.importorskip("matplotlib")
    svg = tmp_path / "timeline.svg"
    assert main(["trace", llama_path, "--seq-len", "64", "--plot", str(svg)]) == 0
    printed = capsys.readouterr().out
    assert svg.read_text().lstrip().startswith("<?xml") and "peak" in printed


def test_opt_traces_past_its_layerdrop_coin():
    """OPT's decoder draws a LayerDrop coin in training (``torch.rand([]) < layerdrop``): data-dependent for fake
    tensors. With layerdrop 0 the trace runs (the estimate is not shown instead) and keeps the layers' dropout."""
    bd = trace(Job(model="opt-125m", batch_size=1, seq_len=128, precision="bf16-true"))
    assert bd.engine == "trace", bd.notes
    assert bd.peak_allocated_bytes > 0


def test_the_math_kernel_emulation_computes_16_bit_attention_in_fp32():
    """torch's ``_scaled_dot_product_attention_math`` upcasts 16-bit q, k and v to fp32 and runs both products in
    fp32 (its own composite, op by op on the CPU); the trace's emulation must too, or a bf16 model on the math
    path traces half its score bytes (Falcon-7B LoRA: 35.97 instead of 46.51 GiB)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from memfit.tracer.cuda_emulation import SdpaEmulation

    class Dtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.bmm.default, torch.ops.aten._safe_softmax.default):
                self.seen.append((str(func), out.dtype))
            return out

    q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    with Dtypes() as mine:
        out = SdpaEmulation(torch)._math(q, q.clone(), q.clone(), mask, False, None, False)
    with Dtypes() as theirs:
        ref = torch.ops.aten._scaled_dot_product_attention_math(q, q.clone(), q.clone(), mask, 0.0, False, None)[0]
    assert out.dtype == ref.dtype == torch.bfloat16
    assert mine.seen == theirs.seen and {d for _, d in mine.seen} == {torch.float32}


@pytest.mark.parametrize("keys, backward_tensors", [(2048, 4), (1024, 3)])
def test_the_math_kernels_softmax_allocates_as_on_cuda(keys, backward_tensors):
    """``_safe_softmax`` as the device runs it (its CompositeExplicitAutograd kernel, torch 2.13 op by op):
    softmax, a bool ``isneginf`` mask and a ``where`` written into the softmax output: beyond its input 1.25
    score-sized tensors at once, one when it returns. Its backward on CUDA makes ``grad * output`` before the
    kernel where rows exceed the persistent kernel's 1024 elements: with the kept output, the incoming gradient
    and the result four, else three (fake tensors' kernels make none of the temporaries)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memfit.tracer.tracker import Tracker

    tr = Tracker(torch, cuda=True)
    n = 2 * 8 * keys * 4  # bytes of one (1, 2, 8, keys) fp32 tensor
    with FakeTensorMode():
        x = torch.empty(1, 2, 8, keys, requires_grad=True)  # made before the tracker: not counted
        with tr.mode():
            tr.start_window()
            y = torch.ops.aten._safe_softmax(x, -1)
            forward, held = tr.peak, tr.current()
            g = torch.ones_like(y)
            tr.start_window()
            y.backward(g)
            backward = tr.peak
    # the row mask (B, H, L, 1) and the scalar zero take one 512-byte block each
    assert forward == n + n // 4 + 2 * 512
    assert held == n
    assert backward == backward_tensors * n


def test_trace_judges_a_card_through_the_capped_allocator(llama_path):
    """trace(job, gpu_memory_bytes=card): the traced step's allocations go through the allocator model capped at
    the card less the CUDA context; fits is whether every request was served there, with the first refused one."""
    from memfit.estimator.events import cuda_context_bytes

    job = _job(llama_path, precision="bf16-true")
    free = trace(job, spec=_spec(), fallback=False)
    ctx = cuda_context_bytes("train", "none")
    big = ctx + 4 * free.peak_reserved_bytes
    roomy = trace(job, spec=_spec(), fallback=False, gpu_memory_bytes=big)
    assert roomy.fits is True and roomy.gpu_memory_bytes == big
    assert roomy.device_total_bytes == roomy.peak_reserved_bytes + ctx
    assert roomy.headroom_bytes == big - roomy.device_total_bytes > 0
    assert roomy.peak_allocated_bytes == free.peak_allocated_bytes
    tight = trace(job, spec=_spec(), fallback=False, gpu_memory_bytes=ctx + free.peak_allocated_bytes // 2)
    assert tight.fits is False and tight.headroom_bytes < 0
    oom = tight.extras["first_oom"]
    assert oom["bytes"] > 0 and oom["reserved_bytes"] <= free.peak_allocated_bytes // 2
    assert tight.notes[0].startswith("does not fit a ") and oom["phase"] in tight.notes[0]
    # where the trace cannot run (multi-GPU), its fallback is the estimate judged on the same card
    ddp = trace(Job(model="llama-3.2-1b", gpus=2, strategy="ddp"), gpu_memory_bytes=24 << 30)
    assert ddp.engine == "estimate" and ddp.gpu_memory_bytes == 24 << 30 and ddp.fits is False
    below = trace(job, spec=_spec(), fallback=False, gpu_memory_bytes=ctx // 2)  # smaller than the context
    assert below.fits is False and below.extras["first_oom"]["reserved_bytes"] == 0
    with pytest.raises(JobError):
        trace(job, spec=_spec(), fallback=False, gpu_memory_bytes=0)


def test_trace_cli_prints_the_verdict_and_exits_1_when_it_does_not_fit(llama_path, capsys):
    from memfit.cli import main

    from memfit.estimator.events import cuda_context_bytes

    card = cuda_context_bytes("train", "none") + (64 << 10)  # 64 KiB past the context: not even the weights
    assert main(["trace", llama_path, "--seq-len", "64", "--gpu-memory", f"{card}B", "--no-chart"]) == 1
    assert "DOES NOT FIT on a 0.75 GiB card" in capsys.readouterr().out
    assert main(["trace", llama_path, "--seq-len", "64", "--gpu-memory", "512MiB", "--no-chart"]) == 1  # < context
    assert "DOES NOT FIT on a 0.50 GiB card" in capsys.readouterr().out
    assert main(["trace", llama_path, "--seq-len", "64", "--gpu-memory", "24GiB", "--no-chart"]) == 0
    assert "FITS on a 24.00 GiB card" in capsys.readouterr().out


def test_verified_max_batch_size_is_the_traces_boundary_searched_from_the_estimate(llama_path, tmp_path):
    """--max-batch-size --verify: the largest batch both engines run; the trace checks the estimate's answer first
    and, where it fails there, the search goes down with the trace (never above the estimate)."""
    from memfit.estimator import max_batch_size
    from memfit.estimator.events import cuda_context_bytes
    from memfit.tracer.verify import verified_max_batch_size

    job = _job(llama_path, precision="bf16-true", seq_len=256)
    one = trace(job, spec=_spec(), fallback=False)
    card = cuda_context_bytes("train", "none") + 3 * one.peak_reserved_bytes
    v = verified_max_batch_size(job, card)
    b = v["max_batch_size"]
    assert b >= 1 and v["estimate_max_batch_size"] == max_batch_size(job, card)
    assert v["trials"][0][0] == v["estimate_max_batch_size"]
    est = v["estimate_max_batch_size"]
    assert b <= est and trace(job.replace(batch_size=b), fallback=False, gpu_memory_bytes=card).fits
    if b < est:
        assert not trace(job.replace(batch_size=b + 1), fallback=False, gpu_memory_bytes=card).fits
        assert v["first_oom"] is not None and v["first_oom"]["bytes"] > 0
    else:
        assert v["trials"] == [(est, True)]
    with pytest.raises(JobError, match="training jobs only"):
        verified_max_batch_size(_job(llama_path, task="infer", prompt_len=32, new_tokens=2), card)
    with pytest.raises(JobError, match="single-GPU"):
        verified_max_batch_size(_job(llama_path, gpus=2, strategy="ddp"), card)


def test_verify_goes_down_where_the_trace_vetoes_and_never_above_the_estimate(monkeypatch):
    """The search logic on its own: a stand-in trace that runs up to batch 3, against estimates of 7 and 2."""
    from memfit.breakdown import Breakdown
    from memfit.tracer import engine, verify
    import memfit.estimator as est_mod

    def fake_trace(job, fallback=False, gpu_memory_bytes=None):
        ok = job.batch_size <= 3
        return Breakdown(engine="trace", model=job.model, job=job.to_dict(), parameters=1, trainable_parameters=1,
                         components={}, peak_allocated_bytes=1, peak_reserved_bytes=1, device_total_bytes=1,
                         peak_phase="backward", phases={}, fits=ok,
                         extras={} if ok else {"first_oom": {"bytes": job.batch_size}})

    monkeypatch.setattr(engine, "trace", fake_trace)
    job = Job(model="llama-3.2-1b", seq_len=256)
    for est, want, traced in ((7, 3, [(7, False), (6, False), (5, False), (4, False), (3, True)]),
                              (2, 2, [(2, True)])):
        monkeypatch.setattr(est_mod, "max_batch_size", lambda *a, _e=est, **k: _e)
        v = verify.verified_max_batch_size(job, 24 << 30)
        assert v["max_batch_size"] == want and v["estimate_max_batch_size"] == est
        assert (want, True) in v["trials"] and (est == want or (want + 1, False) in v["trials"])
        assert v["trials"][0] == traced[0]
        assert all(b <= est for b, _ in v["trials"])
        assert (v["first_oom"] is None) == (est <= 3)


def test_verify_needs_max_batch_size(llama_path, capsys):
    from memfit.cli import main

    assert main(["estimate", "llama-3.2-1b", "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-batch-size" in err[0]
