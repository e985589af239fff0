"""Golden numbers for the analytical estimator: exact bytes where the answer is exact, measured
probes within a stated tolerance where it is not."""

import json
import time
from pathlib import Path

import pytest

from memfit import Job
from memfit.estimator import estimate, max_batch_size, model_states
from memfit.estimator import states as st
from memfit.models.families import spec_from_config

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "validation" / "probes" / "layer_probe.json"

LLAMA_PROBE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 1024,
               "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4,
               "num_hidden_layers": 2, "vocab_size": 128256, "max_position_embeddings": 2048,
               "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu"}


@pytest.fixture(scope="module")
def probe_spec():
    return spec_from_config(dict(LLAMA_PROBE), name="probe-llama")


def test_mlp_example_of_the_source_article():
    """Article 004's SimpleMLP: 51,008,010 parameters. After loading: 204.03 MB (the article agrees).
    After one Adam step current PyTorch holds weights + grads + 2 Adam moments = 4x (816.13 MB); the
    article printed 629.54 MB (see README: its 'after training' figures do not match PyTorch)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    with torch.device("meta"):
        mlp = nn.Sequential(nn.Linear(784, 8192), nn.ReLU(), nn.Linear(8192, 4096), nn.ReLU(),
                            nn.Linear(4096, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(),
                            nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))
    n = sum(p.numel() for p in mlp.parameters())
    assert n == 51_008_010
    adam = model_states(n, precision="32-true", optimizer="adam")
    assert adam["weights"] / 1e6 == pytest.approx(204.03, abs=0.01)
    assert sum(adam.values()) / 1e6 == pytest.approx(816.13, abs=0.01)
    sgd = model_states(n, precision="32-true", optimizer="sgd")
    assert sum(sgd.values()) / 1e6 == pytest.approx(408.06, abs=0.01)


def test_mixed_precision_7b_table():
    """Article 000's LLaMA-2-7B table totals 112 GB of model states (14 + 28 + 14 + 28 + 28). The total is
    right but the split is not: under AMP the fp32 parameters are the master copy and gradients are fp32."""
    s = model_states(7_000_000_000, precision="bf16-mixed", optimizer="adamw")
    assert s["weights"] == 28_000_000_000
    assert s["gradients"] == 28_000_000_000
    assert s["optimizer_states"] == 56_000_000_000
    assert sum(s.values()) == 112_000_000_000


def test_states_follow_precision(probe_spec):
    n = probe_spec.parameters
    for precision, pb in (("32-true", 4), ("bf16-mixed", 4), ("bf16-true", 2), ("16-true", 2)):
        job = Job(model="x", precision=precision)
        assert st.weight_bytes(probe_spec, job) == n * pb
        assert st.gradient_bytes(probe_spec, job) == n * pb
        assert st.optimizer_state_bytes(probe_spec, job) == 2 * n * pb
    job = Job(model="x", precision="bf16-mixed")
    assert st.autocast_cache_bytes(probe_spec, job) == 2 * st.linear_weight_params(probe_spec)
    assert st.optimizer_state_bytes(probe_spec, Job(model="x", optimizer="sgd")) == 0
    assert st.optimizer_state_bytes(probe_spec, Job(model="x", optimizer="sgd-momentum")) == n * 4


def test_lora_counts_match_peft():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(LLAMA_PROBE, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=256)
    spec = spec_from_config(dict(cfg), name="tiny")
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
        lora = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        job = Job(model="tiny", method="lora", lora_rank=8, lora_targets=targets)
        assert st.trainable_params(spec, job) == trainable
        assert all(p.dtype == torch.float32 for p in lora.parameters() if p.requires_grad)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed", "32-true"])
def test_matches_h100_probe_within_2_percent(probe_spec, precision):
    """The 2-layer, 128k-vocabulary probe measured on an H100 (validation/probes/layer_probe.json):
    the estimated peak of each phase is within 2% of the measured one (the estimate's per-op rules are
    not fitted to it; 2% leaves room for the few MiB of small tensors the estimate does not list)."""
    runs = [r for r in json.loads(PROBE.read_text())["runs"]
            if r.get("vocab") == 128256 and r["precision"] == precision]
    assert runs
    r = runs[0]
    bd = estimate(Job(model="probe", precision=precision, batch_size=r["B"], seq_len=r["S"]), probe_spec)
    assert bd.phases["forward"] == pytest.approx(r["fwd_peak"], rel=0.02)
    assert bd.phases["backward"] == pytest.approx(r["bwd_peak"], rel=0.02)
    assert bd.phases["optimizer_step"] == pytest.approx(r["step_peak"], rel=0.02)
    assert bd.peak_allocated_bytes == pytest.approx(max(r["fwd_peak"], r["bwd_peak"], r["step_peak"]), rel=0.02)


def test_components_sum_to_peak_and_phase(probe_spec):
    bd = estimate(Job(model="probe", precision="bf16-true", batch_size=2, seq_len=512), probe_spec)
    assert sum(bd.components.values()) == bd.peak_allocated_bytes
    assert bd.peak_phase == "backward"
    assert bd.peak_reserved_bytes > bd.peak_allocated_bytes
    assert bd.device_total_bytes > bd.peak_reserved_bytes


def test_checkpointing_and_eager(probe_spec):
    job = Job(model="probe", precision="bf16-true", batch_size=4, seq_len=2048)
    base = estimate(job, probe_spec).phases["forward"]
    assert estimate(job.replace(gradient_checkpointing=True), probe_spec).phases["forward"] < base
    assert estimate(job.replace(attention="eager"), probe_spec).phases["forward"] > base


def test_inference_kv_cache_grows_with_new_tokens(probe_spec):
    from memfit.estimator import _kv_bytes_per_token

    job = Job(model="probe", task="infer", precision="bf16-true", batch_size=4, prompt_len=512, new_tokens=4096)
    # per token: 2 layers x 2 (k, v) x 4 kv heads x 64 dims x 2 bytes
    assert _kv_bytes_per_token(probe_spec, job, 1000) == 1000 * 2 * 2 * 4 * 64 * 2
    bd = estimate(job, probe_spec)
    assert bd.peak_phase == "decode"
    assert bd.components["kv_cache"] >= 4 * _kv_bytes_per_token(probe_spec, job, 512 + 4096 - 1)


def test_max_batch_size_is_largest_that_fits(probe_spec):
    job = Job(model="probe", precision="bf16-true", seq_len=2048)
    cap = 20 << 30
    n = max_batch_size(job, cap, spec=probe_spec)
    assert n >= 1
    assert estimate(job.replace(batch_size=n), probe_spec).device_total_bytes <= cap
    assert estimate(job.replace(batch_size=n + 1), probe_spec).device_total_bytes > cap


@pytest.mark.parametrize("model_type, kw", [
    ("mixtral", dict(hidden_size=64, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
                     num_attention_heads=4, num_key_value_heads=2)),
    ("olmoe", dict(hidden_size=64, intermediate_size=48, num_experts=6, num_experts_per_tok=2,
                   num_attention_heads=4, num_key_value_heads=4)),
])
def test_lora_all_linear_on_fused_experts_matches_peft(model_type, kw):
    """PEFT's all-linear wraps transformers 5's fused expert tensors (ParamWrapper): the adapter count
    rule in states.fused_lora_params must match PEFT on shapes it was not read off."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, num_hidden_layers=2, vocab_size=128, **kw)
    spec = spec_from_config(cfg.to_dict() | {"architectures": None}, name="tiny-moe")
    model = AutoModelForCausalLM.from_config(cfg)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert st.trainable_params(spec, Job(model="tiny-moe", method="lora", lora_rank=4)) == trainable


#: Measured generate() peaks on the H200 (validation/records): name -> (record file, measured batch).
_GENERATE_PEAKS = {"gemma-3-1b-generate-2048": "h200-boundaries.json", "mistral-7b-generate": "h200-boundaries.json",
                   "qwen2.5-1.5b-decode-512": "h200-boundaries.json", "w-olmoe-gen-p1024-n128": "h200-worst.json",
                   "w-llama-3.2-1b-gen-fp32-n512": "h200-worst.json"}


@pytest.mark.parametrize("name", sorted(_GENERATE_PEAKS))
def test_generate_prefill_peak_counts_what_the_forward_keeps(name):
    """The prefill of generate() peaks in a layer's MLP (or an MoE block's routed rows) with the embedding
    output, the layer's input, its residual and normed copy, the rotary tables and the cache so far alive
    (the op-by-op prefill stream). Measured peaks of Gemma 3 (sliding/global, 262k vocabulary), Mistral,
    a long Qwen2.5 decode, OLMoE (grouped_mm experts) and an fp32 Llama (SDPA's math kernel: scores, repeated
    k and v) within 1 % (the closed form's "two residuals and the widest intermediate" was 3-6 % under on
    each). These records drove the rule: fitted, not held out."""
    data = json.loads((ROOT / "validation" / "records" / _GENERATE_PEAKS[name]).read_text())
    rec = next(r for r in (data if isinstance(data, list) else [data]) if r.get("name") == name)
    bd = rec["breakdown"]
    est = estimate(Job.from_dict(bd["job"]))
    assert est.peak_phase == "prefill"
    assert abs(est.peak_allocated_bytes / bd["peak_allocated_bytes"] - 1) < 0.01


#: Measured uncapped inference runs (steps >= 2) whose peak reserved the replay reproduces: record file -> names.
_RESERVED_RUNS = {"h100-single-a.json": ["gemma-3-1b-generate"],
                  "h100-trace-check.json": ["trace-check-llama-3.2-1b-infer-full-bf16-true-b1",
                                            "trace-check-llama-3.2-1b-infer-full-bf16-true-b4"],
                  "h100-single-b.json": ["mistral-7b-generate", "llama-3.1-8b-prefill"],
                  "h200-worst.json": ["w-gemma-3-1b-gen-p2048-n128", "w-qwen2.5-0.5b-gen-fp32-n1024",
                                      "w-llama-3.1-8b-gen-p8192-n32"]}


@pytest.mark.parametrize("name", [n for names in _RESERVED_RUNS.values() for n in names])
def test_inference_peak_reserved_replays_the_measured_runs(name):
    """Peak reserved of generate() and prefill runs within 1 % of the measured one (most within 0.1 %): the
    op-by-op prefill, one cuBLAS workspace, and the tied head's weight that building the model allocates and
    frees (its segment stays cached: every tied model's load peak is its weights plus one embedding). These
    records drove the rules (fitted, not held out); before them the worst of these was 14 % under."""
    f = next(k for k, v in _RESERVED_RUNS.items() if name in v)
    data = json.loads((ROOT / "validation" / "records" / f).read_text())
    rec = next(r for r in (data if isinstance(data, list) else [data]) if r.get("name") == name)
    bd = rec.get("breakdown") or rec
    est = estimate(Job.from_dict(bd["job"]))
    assert abs(est.peak_reserved_bytes / bd["peak_reserved_bytes"] - 1) < 0.01


def test_fp32_gqa_decode_counts_the_math_kernels_repeated_cache():
    """fp32 grouped-query decode runs SDPA's math kernel, which repeats the cache's k and v to every query head
    and scales k^T: three context-long tensors per step (trace: (8, 2, 7, 319, 64) clones). Measured Qwen2.5-0.5B
    fp32, 1024 new tokens, peaks in decode within 1 % (was 4.3 % under). Fitted on this record."""
    data = json.loads((ROOT / "validation" / "records" / "h200-worst.json").read_text())
    bd = next(r for r in data if r.get("name") == "w-qwen2.5-0.5b-gen-fp32-n1024")["breakdown"]
    est = estimate(Job.from_dict(bd["job"]))
    assert est.peak_phase == "decode"
    assert abs(est.peak_allocated_bytes / bd["peak_allocated_bytes"] - 1) < 0.01


#: Bytes one token leaves saved for backward in one layer (the second layer of the config: sliding-window for
#: Gemma 3, global for Gemma 2), as the trace counts them: the activations alive at the start of backward of a
#: 2-layer config minus those of its 1-layer copy (batch 1, seq 512, bf16-true unless named; tracer/engine.py
#: on transformers 5.17, peft 0.21; issue 15).
TRACED_LAYER_BYTES = [
    ("llama-3.2-1b", {}, 108680),  # no copy of the attention output before o_proj (cuDNN writes q's layout)
    ("llama-3.2-1b", {"precision": "32-true"}, 278536),
    ("llama-3.2-1b", {"method": "lora", "precision": "bf16-mixed"}, 117096),  # PEFT's fresh 16-bit adapter inputs
    ("distilbert-sst2", {"precision": "32-true"}, 49984),  # memory-efficient kernel: (B, S, H, D) output
    ("gpt2", {"precision": "bf16-mixed"}, 66112),  # gelu_new's pow keeps x.float(), not x
    ("gpt2", {"precision": "32-true"}, 87616),
    ("phi-3-mini", {}, 157832),  # q built by torch.cat: the output is copied
    ("pythia-160m", {}, 27704),
    ("qwen3-0.6b", {"precision": "bf16-mixed"}, 82088),
    ("bert-base-uncased", {"precision": "bf16-mixed"}, 32320),
    ("gemma-3-1b", {"precision": "bf16-mixed"}, 121692),  # a sliding layer at its window: mask, k repeated
    ("gemma-3-1b", {"seq_len": 520}, 116444),  # the mask padded to 16 keys, every head
    ("gemma-2-2b", {}, 169080),  # softcap under sdpa runs the fused kernel
]


@pytest.mark.parametrize("model, kw, traced", TRACED_LAYER_BYTES, ids=lambda x: str(x)[:40])
def test_layer_replay_matches_the_traced_layer(model, kw, traced):
    from memfit.estimator import _act_mode, _dropout
    from memfit.estimator.layers import Mode, saved_bytes_per_token
    from memfit.models import load_model

    job = Job(model=model, **{"precision": "bf16-true", "batch_size": 1, "seq_len": 512, **kw})
    spec = load_model(model)
    mode = Mode(precision=_act_mode(job), trainable_base=not job.is_lora, lora_targets=st.lora_targets(spec, job),
                lora_rank=job.lora_rank, attention=job.attention, seq_len=job.seq_len, dropout=_dropout(spec))
    second = spec.layer_blocks[1] if spec.layer_blocks else len(spec.blocks) - 1
    got = saved_bytes_per_token(spec, second, mode)
    assert abs(got - traced) <= 0.002 * traced, (got, traced)


def test_wrapped_fused_experts_keep_their_gathered_inputs():
    """PEFT's all-linear wraps OLMoE's fused expert tensors (ParamWrapper): their merged weights take gradients,
    so each routed copy of a token keeps its gathered input, as full fine-tuning does and attention-only LoRA
    does not (traced: olmoe-1b-7b LoRA all-linear bf16, 31.32 GiB measured and traced, 30.41 estimated without)."""
    from memfit.estimator import _act_mode, _train_mode
    from memfit.estimator.layers import saved_bytes_per_token
    from memfit.models import load_model

    spec = load_model("olmoe-1b-7b")
    bi = next(i for i, b in enumerate(spec.blocks) if b.moe is not None)
    moe = spec.blocks[bi].moe
    wrapped = Job(model="olmoe-1b-7b", method="lora", lora_targets="all-linear", precision="bf16-true",
                  batch_size=1, seq_len=1024)
    attn = wrapped.replace(lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert st.lora_wraps_fused(wrapped, spec) and not st.lora_wraps_fused(attn, spec)
    got = {name: saved_bytes_per_token(spec, bi, _train_mode(spec, job, _act_mode(job), 1024))
           for name, job in (("wrapped", wrapped), ("attn", attn))}
    assert got["wrapped"] - got["attn"] == pytest.approx(moe.top_k * spec.hidden_size * 2)


def test_moe_decode_gathers_expert_weights_as_batched_mm():
    """generate() decodes fused-expert MoE models with batched_mm on a GPU: each (token, expert) pair copies
    that expert's gate/up and down weights, and the decode step's peak holds both copies of one layer."""
    from memfit.estimator import _decode_expert_gathers
    from memfit.models import load_model

    spec = load_model("olmoe-1b-7b")
    moe = next(b for b in spec.blocks if b.moe is not None)
    m = moe.moe
    up, down = _decode_expert_gathers(spec, moe, 8, 2)
    assert up == 8 * m.top_k * 2 * m.expert_intermediate_size * spec.hidden_size * 2
    assert down == 8 * m.top_k * m.expert_intermediate_size * spec.hidden_size * 2
    assert _decode_expert_gathers(load_model("llama-3.2-1b"), load_model("llama-3.2-1b").blocks[0], 8, 2) == ()
    job = Job(model="olmoe-1b-7b", task="infer", precision="bf16-true", batch_size=64, prompt_len=128,
              new_tokens=4)
    bd = estimate(job)
    # the decode phase peaks above the weights and the cache by at least both copies of one layer
    assert bd.phases["decode"] - bd.components["weights"] - bd.components["kv_cache"] >= up / 8 * 64 + down / 8 * 64
    prefill_only = estimate(job.replace(new_tokens=0))
    assert bd.phases["decode"] > prefill_only.peak_allocated_bytes


def test_prefill_only_sliding_mask_is_not_per_sequence():
    """A forward without an attention mask broadcasts the sliding-window mask ([1, 1, P, P], expanded to the
    batch as a view); generate() passes a mask and materialises [B, 1, P, P]."""
    from memfit.estimator import _sliding_mask_bytes
    from memfit.models import load_model

    spec = load_model("phi-3-mini")
    prefill = Job(model="phi-3-mini", task="infer", precision="bf16-true", batch_size=47, prompt_len=2048,
                  new_tokens=0)
    assert _sliding_mask_bytes(spec, prefill, 47, 2048) == 2048 * 2048
    assert _sliding_mask_bytes(spec, prefill.replace(new_tokens=8), 47, 2048) == 47 * 2048 * 2048
    assert _sliding_mask_bytes(spec, prefill, 47, 1024) == 0  # within the window: the causal mask is skipped
@pytest.mark.parametrize("seq_len, score_tensors", [(2048, 3), (1024, 2)])
def test_math_attention_backward_makes_the_scores_gradients_after_the_later_ops_released(seq_len, score_tensors):
    """fp32 grouped-query attention runs sdpa's math kernel. Its backward peaks at the softmax backward: the later
    ops' saved tensors released, the kept probabilities, their gradient, the scores' gradient and, past the
    persistent kernel's 1024 keys, CUDA's ``grad * output`` (layers.softmax_backward_scratch)."""
    from memfit.estimator.layers import Mode, layer_forward_tensors, math_softmax_backward
    from memfit.models import load_model

    spec = load_model("mistral-7b-v0.3")
    mode = Mode(precision="32", trainable_base=False, lora_targets=frozenset(), lora_rank=16, attention="sdpa",
                seq_len=seq_len, dropout=0.0)
    released, v_at, p_at, made = math_softmax_backward(spec, 0, mode)
    tensors = layer_forward_tensors(spec, 0, mode)
    score = spec.blocks[0].attention.num_heads * seq_len * 4  # fp32 (B, heads, S, S), per token
    assert tensors[p_at][:2] == (score, True)  # the probabilities, kept
    assert tensors[v_at][1] and v_at < p_at  # the repeated v, kept until the second bmm's backward
    assert released and min(released) > p_at and all(tensors[j][1] for j in released)
    assert sorted(j for j, t in enumerate(tensors) if t[1] and j > p_at) == list(released)
    assert [x for x in made if x == score] == [score] * score_tensors
    # the 16-bit attention of the same model keeps no score matrix: no such moment
    assert math_softmax_backward(spec, 0, Mode(precision="true", trainable_base=False, lora_targets=frozenset(),
                                               lora_rank=16, attention="sdpa", seq_len=seq_len, dropout=0.0)) is None


def test_checkpointed_qlora_math_attention_matches_the_h200_runs():
    """Checkpointed QLoRA (and fp32 LoRA) of mistral-7b keep an fp32 stream: the math attention kernel, whose
    recomputed softmax holds 2.25 score-sized tensors and whose softmax backward four (validation/jobs/
    qlora-math.yaml). The fitted runs of validation/records/h200-qlora-math.json (held-out runs left out) within
    2 % of their measured peak allocated, forward and backward (they were 2.8 / 5.1 % under before the rule;
    b4-s1024 peaks at its MLP's backward, 1.9 % over)."""
    data = json.loads((ROOT / "validation" / "records" / "h200-qlora-math.json").read_text())
    rows = [r for r in data if not r.get("holdout") and r["job"]["model"] == "mistral-7b-v0.3"]
    assert len(rows) >= 4
    for r in rows:
        bd = r["breakdown"]
        est = estimate(Job.from_dict(r["job"]))
        assert abs(est.peak_allocated_bytes / bd["peak_allocated_bytes"] - 1) < 0.02, r["name"]
        for phase in ("forward", "backward"):
            assert abs(est.phases[phase] / bd["phases"][phase] - 1) < 0.02, (r["name"], phase)


def test_rms_norm_frees_its_fp32_input_after_the_product_and_casts_before_the_weight():
    """transformers 5.17 LlamaRMSNorm as the checkpointed forward runs it (no grad; traced on OLMoE LoRA, the same
    order as its H100 allocator history): ``x.to(float32)``, ``pow``, ``x * rsqrt`` (the fp32 input goes once this
    product exists), ``.to(input_dtype)`` (a 16-bit cast of its own when the weight is frozen), ``self.weight *``
    (the output; the cast goes then)."""
    from memfit.estimator.layers import Mode, _Replay

    r = _Replay(Mode(precision="true", trainable_base=False, lora_targets=frozenset({"q_proj"}), lora_rank=16,
                     attention="sdpa", seq_len=2048, dropout=0.0))
    r.new("x", 4096, 2)
    r.norm("x", "y", "rms")
    made = [k for k in r.order if r.base.get(k) == k and k != "x"]
    x32, sq, var, rs, h, back, y = made
    assert (r.size[x32], r.dtype[x32]) == (4096, 4) and r.until[x32] == h
    assert (r.size[back], r.dtype[back]) == (4096, 2) and r.until[back] == y and r.until[h] == y
    assert x32 in r.saved and back not in r.saved
