"""memfit serve: the engines' KV-cache accounting on cases worked by hand from their source, the API and CLI,
and the score against published start-up logs (validation/serving/logs)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.errors import JobError
from memfit.models import load_model
from memfit.serve import ServeConfig, fewest_gpus, min_utilization, serve
from memfit.serve import kv as K
from memfit.serve.memory import profile_peak, weights_on_rank

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


# ------------------------------------------------------------------ KV specs, pages and blocks (exact)
def test_full_attention_page_and_blocks_by_hand():
    """Llama-3.1-8B: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 131072 B per token; a 16-token
    page of one layer is 65536 B; V1 blocks = available // page // 32 (get_num_blocks)."""
    spec = load_model("llama-3.1-8b")
    layers = K.layer_kv_specs(spec, tp=1, element_bytes=2)
    assert sum(x.per_token_bytes for x in layers) == 32 * 8 * 128 * 2 * 2
    g = K.v1_groups(layers, 16)
    assert (len(g.groups), g.group_size, g.page_bytes) == (1, 32, 16 * 8 * 128 * 2 * 2)
    available = int(54.84 * GiB)
    assert K.v1_num_blocks(available, g) == available // 65536 // 32
    blocks = K.v1_num_blocks(available, g)
    assert K.v1_reported_tokens(blocks, g) == blocks * 16
    # one request of 8192 tokens needs 512 blocks: concurrency = blocks / 512
    assert K.v1_max_concurrency(blocks, g, 8192, 8192) == pytest.approx(blocks / 512)
    assert K.v1_max_model_len(blocks * 65536 * 32, g, 8192) == blocks * 16
    assert K.v0_block_bytes(layers, 16) == 16 * 131072


def test_tp_splits_and_replicates_kv_heads():
    """KV heads split over TP; with more ranks than heads each rank keeps one (max(1, 8 // 16))."""
    spec = load_model("llama-3.1-8b")
    per = lambda tp: sum(x.per_token_bytes for x in K.layer_kv_specs(spec, tp=tp, element_bytes=2))  # noqa: E731
    assert per(2) == per(1) // 2
    assert per(8) == 32 * 1 * 128 * 2 * 2
    assert per(16) == per(8)


def test_fp8_kv_halves_the_page():
    spec = load_model("llama-3.1-8b")
    e = K.kv_element_bytes("fp8_e4m3", 2)
    assert e == 1
    assert sum(x.per_token_bytes for x in K.layer_kv_specs(spec, element_bytes=e)) == 65536
    with pytest.raises(JobError):
        K.kv_element_bytes("int3", 2)


def test_mla_caches_one_latent_not_split_by_tp():
    """DeepSeek-V2-Lite: 27 layers x (kv_lora_rank 512 + rope 64) x 2 bytes, the same on every TP rank."""
    spec = load_model("deepseek-v2-lite")
    for tp in (1, 2, 8):
        layers = K.layer_kv_specs(spec, tp=tp, element_bytes=2)
        assert sum(x.per_token_bytes for x in layers) == 27 * 576 * 2
    assert K.sglang_cell_bytes(K.layer_kv_specs(spec, element_bytes=2)) == 27 * 576 * 2


def test_hybrid_sliding_window_groups_by_hand():
    """Gemma-3-27B: 52 sliding-window (1024) + 10 full layers, all of one page size. vLLM V1 (v0.10+) groups
    them in 10s (the fewer kind; 52 >= 1.5 x 10): ceil(52/10) = 6 sliding groups + 1 full group; blocks =
    available // page // 10; reported tokens = blocks // 7 x 16; one request of L tokens takes
    cdiv(L, 16) full blocks + 6 x (cdiv(min(1023 + T, L), 16) + 1) sliding blocks."""
    spec = load_model("gemma-3-27b")
    layers = K.layer_kv_specs(spec, element_bytes=2)
    assert sum(x.kind == "sliding" for x in layers) == 52 and sum(x.kind == "full" for x in layers) == 10
    g = K.v1_groups(layers, 16)
    assert g.group_size == 10 and len(g.groups) == 7
    page = 16 * 16 * 128 * 2 * 2
    assert g.page_bytes == page
    avail = 40 * GiB
    blocks = K.v1_num_blocks(avail, g)
    assert blocks == avail // page // 10
    assert K.v1_reported_tokens(blocks, g) == blocks // 7 * 16
    L, T = 32768, 8192
    per_req = math.ceil(L / 16) + 6 * (math.ceil(min(1023 + T, L) / 16) + 1)
    assert K.v1_blocks_per_request(g, L, T) == per_req
    assert K.v1_max_concurrency(blocks, g, L, T) == pytest.approx(blocks / per_req)
    # without the hybrid manager every layer is full attention: one group of 62
    g0 = K.v1_groups(layers, 16, hybrid=False)
    assert (len(g0.groups), g0.group_size) == (1, 62)


def test_pipeline_stage_layers_follow_get_pp_indices():
    """vLLM gives the remainder to the stages before the last: 30 layers over 4 -> 7, 8, 8, 7."""
    assert [len(K.layers_on_stage(30, 4, s)) for s in range(4)] == [7, 8, 8, 7]
    assert [K.layers_on_stage(32, 2, s) for s in range(2)] == [range(0, 16), range(16, 32)]


# ------------------------------------------------------------------ weights and the profile run
def test_weights_match_vllms_printed_load():
    """vLLM prints "Model loading took 14.9889 GiB" for Llama-3.1-8B (issue #10517, PR #17122): 8.03e9
    parameters x 2 bytes plus the rotary cos/sin cache (131072 x 128 x 2 bytes). Tolerance 0.001 GiB: the
    print's rounding."""
    spec = load_model("llama-3.1-8b")
    w = weights_on_rank(spec)
    assert w == spec.parameters * 2 + 131072 * 128 * 2
    assert w / GiB == pytest.approx(14.9888, abs=1e-3)
    # TP 2: linears and the vocabulary halve, norms and the rope cache do not
    w2 = weights_on_rank(spec, tp=2)
    assert w / 2 < w2 < w / 2 + 0.05 * GiB


def test_multimodal_weights_count_the_vision_tower():
    """vLLM and SGLang load the whole ``*ForConditionalGeneration``: Gemma-3-4B-it on SGLang printed "Load
    weight end ... mem usage=8.13 GB" (sglang-pr4826), the text model alone is 7.35 GiB; the SigLIP tower and
    projector (419,816,304 parameters, checked against transformers in test_served_models.py) are the rest.
    ``text_only`` leaves them out."""
    from memfit.models.vision import vision_tower

    spec = load_model("gemma-3-4b")
    tower = vision_tower(spec.multimodal, spec.hidden_size)
    assert tower.params == 419_816_304
    w = weights_on_rank(spec)
    assert w - weights_on_rank(spec, vision=False) == tower.params * 2
    assert w / GiB == pytest.approx(8.13, abs=0.01)
    est = serve("gemma-3-4b", engine="vllm", gpu="h100-80gb", max_model_len=8192)
    lean = serve("gemma-3-4b", engine="vllm", gpu="h100-80gb", max_model_len=8192, text_only=True)
    assert est.weights_bytes - lean.weights_bytes == tower.params * 2
    assert lean.kv_cache_tokens > est.kv_cache_tokens
    # on a later pipeline stage there is no tower
    assert weights_on_rank(spec, pp=2, stage=1) == weights_on_rank(spec, pp=2, stage=1, vision=False)


def test_quantized_weights_use_memfit_layouts():
    """AWQ (4-bit packed, fp16 scales + packed zeros per 128-row group) leaves the embedding, head and norms in
    16 bits; fp8 is one byte per weight plus a per-row fp32 scale."""
    from memfit.estimator import quant

    spec = load_model("llama-3.1-8b")
    full = weights_on_rank(spec)
    awq = weights_on_rank(spec, quantization="awq", group_size=128)
    fp8 = weights_on_rank(spec, quantization="fp8")
    linears = sum(lin.in_features * lin.out_features for b in spec.blocks for lin in b.linears) * 32
    assert full - awq == pytest.approx(linears * 2 - linears / 2 - linears / 128 * (2 + 0.5), rel=1e-3)
    assert fp8 < full and full - fp8 == pytest.approx(linears, rel=2e-3)
    assert quant.linear_bytes(4096, 4096, "none", element_bytes=2) == 4096 * 4096 * 2


def test_profile_peak_against_v0_logs():
    """The V0 profile run of Llama-3.1-8B over 20000 and 29000 tokens peaked 2.07 and 2.99 GiB over the
    weights (issue #10517: peak_torch_memory 17.06 / 17.98 GiB less 14.99 GiB of weights). Tolerance 1%:
    the prints have two decimals."""
    spec = load_model("llama-3.1-8b")
    for tokens, printed in ((20000, 17.06 - 14.9888), (29000, 17.98 - 14.9888)):
        peak, moment = profile_peak(spec, tokens=tokens, seqs=256, tp=1, sampler="v0")
        assert moment == "layer"
        assert peak / GiB == pytest.approx(printed, rel=0.01)


def test_v063_blocks_against_issue_10517():
    """vLLM 0.6.3 V0 on an RTX 3090 (23.58 GiB), utilization 0.9: 1952 and 1478 blocks for max_model_len 20000
    and 29000. The non-torch constant comes from this log (a fitting case, so the tolerance is the prints'
    rounding: 0.5% of blocks)."""
    spec = load_model("llama-3.1-8b")
    for length, blocks in ((20000, 1952), (29000, 1478)):
        est = serve(spec, engine="vllm", engine_version="0.6.3", gpu_memory=int(23.58 * GiB),
                    gpu_memory_utilization=0.9, max_model_len=length)
        assert est.rule == "v0-torch-peak"
        assert est.num_gpu_blocks == pytest.approx(blocks, rel=0.005)
        assert est.kv_cache_tokens == est.num_gpu_blocks * 16
    assert not serve(spec, engine="vllm", engine_version="0.6.3", gpu_memory=int(23.58 * GiB),
                     max_model_len=29000).fits  # vLLM refused to start: 29000 > 23648 tokens


def test_v1_against_held_out_llmd_logs():
    """llm-d's capacity-planner table (vLLM 0.11 V1, H100 reported as 79.18 GiB, utilization 0.9,
    max_model_len 16000, block size 128): Qwen3-32B at TP 1 prints weights 61.03, activation 5.64 and
    available KV 4.45 GiB; at TP 2 weights 30.59, activation 5.64 (the sampler is not split). The TP 1 row sets
    no constant; the TP 2 row set the non-torch constant, so only its weights and activation are checked. Tolerance: 1% on weights and
    activation, 2% on the KV memory (a small difference of large terms, printed to 0.01 GiB)."""
    one = serve("qwen3-32b", gpu_memory=int(79.18 * GiB), engine_version="0.11", max_model_len=16000, block_size=128)
    assert one.weights_bytes / GiB == pytest.approx(61.03, rel=0.01)
    assert one.activation_peak_bytes / GiB == pytest.approx(5.64, rel=0.01)
    assert one.kv_cache_bytes / GiB == pytest.approx(4.45, rel=0.02)
    two = serve("qwen3-32b", gpu_memory=int(79.18 * GiB), engine_version="0.11", max_model_len=16000,
                block_size=128, tensor_parallel=2)
    assert two.weights_bytes / GiB == pytest.approx(30.59, rel=0.01)
    assert two.activation_peak_bytes / GiB == pytest.approx(5.64, rel=0.01)


# ------------------------------------------------------------------ engines end to end
def test_v1_kv_is_total_times_util_minus_the_rest():
    est = serve("llama-3.1-8b", engine="vllm", gpu="h100-80gb", max_model_len=8192)
    rest = est.weights_bytes + est.activation_peak_bytes + est.non_torch_bytes
    assert est.kv_cache_bytes == int(est.gpu_memory_bytes * 0.9 - rest)
    assert est.num_gpu_blocks == est.kv_cache_bytes // (16 * 131072)
    assert not est.cuda_graph_deducted and est.cuda_graph_bytes > 0
    # the CUDA-graph estimate is deducted by default from v0.20 (envs.py default "1"), not in v0.19 (default "0")
    assert not serve("llama-3.1-8b", engine="vllm", gpu="h100-80gb", max_model_len=8192,
                     engine_version="0.19").cuda_graph_deducted
    assert serve("llama-3.1-8b", engine="vllm", gpu="h100-80gb", max_model_len=8192,
                 engine_version="0.20").cuda_graph_deducted
    new = serve("llama-3.1-8b", engine="vllm", gpu="h100-80gb", max_model_len=8192, engine_version="0.21")
    assert new.cuda_graph_deducted
    assert new.kv_cache_bytes == pytest.approx(est.kv_cache_bytes - new.cuda_graph_bytes, abs=2)
    eager = serve("llama-3.1-8b", engine="vllm", gpu="h100-80gb", max_model_len=8192, engine_version="0.21",
                  enforce_eager=True)
    assert eager.cuda_graph_bytes == 0


def test_sglang_kv_is_mem_fraction_of_free_memory_less_weights():
    """profile_max_num_token: rest = free_after_load - free_before x (1 - f) = free_before x f - weights."""
    est = serve("qwen2.5-32b", engine="sglang", gpu_memory=int(22.49 * GiB), tensor_parallel=4,
                mem_fraction_static=0.85, engine_version="0.4.3")
    free_before = est.gpu_memory_bytes - est.non_torch_bytes
    assert est.kv_cache_bytes == int(free_before * 0.85 - est.weights_bytes)
    assert est.kv_bytes_per_token == 2 * 128 * 64 * 2 * 2  # 8 KV heads / 4, head 128, 64 layers, K+V, bf16
    assert est.kv_cache_tokens == est.kv_cache_bytes // est.kv_bytes_per_token


def test_sglang_weights_are_the_segments_the_load_reserves():
    """SGLang's "Load weight end ... mem usage" is a drop in free memory after ``empty_cache``: whole allocator
    segments. QwQ-32B at TP 4 (sglang-llmsinclouds, printed 15.54 GB): o_proj is 5120 x 1280 x 2 = 12.5 MiB and
    takes a 14 MiB segment, gate_up 135 -> 136 MiB, down 67.5 -> 68, qkv 17.5 -> 18: 3.5 MiB a layer over the
    parameters, plus the float32 rope cache (131072 positions x 128 x 4)."""
    from memfit.serve.memory import reserved_bytes, weight_tensors_on_rank

    MiB = 1 << 20
    assert reserved_bytes([int(24.5 * MiB)]) == 26 * MiB
    assert reserved_bytes([3 * MiB, 3 * MiB]) == 20 * MiB  # 1-10 MiB requests share a 20 MiB segment
    assert reserved_bytes([4096 * 2] * 100) == 2 * MiB  # norms: one small-pool segment
    spec = load_model("Qwen/QwQ-32B")
    sizes = weight_tensors_on_rank(spec, tp=4)
    assert sum(sizes) == weights_on_rank(spec, tp=4)
    fp32 = weight_tensors_on_rank(spec, tp=4, rope_element_bytes=4)
    assert sum(fp32) - sum(sizes) == spec.max_position_embeddings * 128 * 2
    assert reserved_bytes(fp32) - sum(fp32) == pytest.approx(64 * 3.5 * MiB, rel=0.05)
    est = serve("Qwen/QwQ-32B", engine="sglang", gpu="l4", tensor_parallel=4, engine_version="0.4.3.post4",
                mem_fraction_static=0.85, max_num_batched_tokens=2048)
    assert est.weights_bytes == reserved_bytes(fp32)
    assert est.weights_bytes / GiB == pytest.approx(15.54, abs=0.01)
    old = serve("Qwen/QwQ-32B", engine="sglang", gpu="l4", tensor_parallel=4, engine_version="0.4.1",
                mem_fraction_static=0.85)
    assert old.weights_bytes == reserved_bytes(sizes)  # before v0.4.2 the rope cache is in the model dtype


def test_sglang_multimodal_mem_fraction():
    """Gemma-3-4B-it (sglang-pr4826): ModelRunner multiplies mem_fraction_static by 0.95 before v0.4.9;
    from v0.4.9 the default is scaled by the ViT's size (27 x 1152**2 against 24 x 1024**2: ratio 1.424,
    factor 0.95 x 0.9576), a stated fraction is left alone; text models are untouched."""
    from memfit.serve.sglang import multimodal_factor

    spec = load_model("gemma-3-4b")
    assert multimodal_factor(spec, (0, 4, 4), True)[0] == 0.95
    f, _ = multimodal_factor(spec, (0, 4, 9), False)
    assert f == pytest.approx(0.95 * (1 - 0.1 * (27 * 1152 ** 2 / (24 * 1024 ** 2) - 1)))
    assert multimodal_factor(spec, (0, 4, 9), True)[0] == 1.0
    assert multimodal_factor(load_model("llama-3.1-8b"), (0, 4, 4), False)[0] == 1.0
    est = serve(spec, engine="sglang", gpu_memory=int(139.8 * GiB), engine_version="0.4.4", mem_fraction_static=0.88)
    assert est.utilization == pytest.approx(0.88 * 0.95)
    free_before = est.gpu_memory_bytes - est.non_torch_bytes
    assert est.kv_cache_bytes == int(free_before * 0.88 * 0.95 - est.weights_bytes)


def test_sglang_default_mem_fraction_by_version():
    old = serve("llama-3.1-8b", engine="sglang", gpu="h100-80gb", engine_version="0.4")
    assert old.utilization == 0.88
    assert serve("llama-3.1-8b", engine="sglang", gpu="h100-80gb", engine_version="0.4", tensor_parallel=8).utilization == 0.81
    new = serve("llama-3.1-8b", engine="sglang", gpu="h100-80gb", engine_version="0.5")
    mib = new.gpu_memory_bytes / 2**20
    reserved = 512 + 1.5 * 8192 + 2 * 256 + 1 / 8 * 1024
    assert new.utilization == round((mib - reserved) / mib, 3)


def test_pipeline_parallel_takes_the_worst_rank():
    one = serve("llama-3.1-70b", engine="vllm", gpu="h100-80gb", tensor_parallel=4, max_model_len=8192)
    two = serve("llama-3.1-70b", engine="vllm", gpu="h100-80gb", tensor_parallel=4, pipeline_parallel=2,
                max_model_len=8192)
    assert len(two.ranks) == 2
    assert two.num_gpu_blocks == min(r["num_gpu_blocks"] for r in two.ranks)
    assert two.weights_bytes < one.weights_bytes


def test_min_utilization_is_the_smallest_that_holds_the_requests():
    res = min_utilization("llama-3.1-8b", requests=32, tokens=8192, engine="vllm", gpu="h100-80gb")
    u = res["utilization"]
    assert 0 < u < 0.9
    assert serve("llama-3.1-8b", gpu="h100-80gb", max_model_len=8192, gpu_memory_utilization=u).max_concurrency >= 32
    assert serve("llama-3.1-8b", gpu="h100-80gb", max_model_len=8192,
                 gpu_memory_utilization=round(u - 0.001, 3)).max_concurrency < 32
    s = min_utilization("llama-3.1-8b", requests=32, tokens=8192, engine="sglang", gpu="h100-80gb")
    f = s["utilization"]
    assert serve("llama-3.1-8b", engine="sglang", gpu="h100-80gb", max_model_len=8192,
                 mem_fraction_static=f).kv_cache_tokens >= 32 * 8192
    none = min_utilization("llama-3.1-70b", requests=1, tokens=8192, gpu="h100-80gb")
    assert none["utilization"] is None


def test_fewest_gpus():
    res = fewest_gpus("llama-3.1-70b", requests=16, tokens=8192, gpu="h100-80gb")
    assert res["gpus"] in (2, 4)
    tp = res["tensor_parallel"]
    assert serve("llama-3.1-70b", gpu="h100-80gb", tensor_parallel=tp, max_model_len=8192).max_concurrency >= 16
    if tp > 1:
        assert serve("llama-3.1-70b", gpu="h100-80gb", tensor_parallel=tp // 2,
                     max_model_len=8192).max_concurrency < 16


def test_bad_settings_are_one_line_errors():
    with pytest.raises(JobError):
        ServeConfig(engine="tgi", gpu_memory_bytes=GiB)
    with pytest.raises(JobError):
        serve("llama-3.1-8b", gpu="h100-80gb", gpu_memory_utilization=1.5)
    with pytest.raises(JobError):
        serve("llama-3.1-8b", gpu="h100-80gb", tensor_parallel=3)  # 32 heads
    with pytest.raises(JobError):
        serve("llama-3.1-8b", gpu="h100-80gb", engine_version="0.2.4")  # before what memfit follows
    with pytest.raises(JobError):
        serve("llama-3.1-8b")  # no card


def _cli(*argv):
    code = "import sys; from memfit.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


def test_cli_json_fields_and_no_torch():
    r = _cli("serve", "llama-3.1-8b", "--gpu", "h100-80gb", "--max-model-len", "8192", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("weights_bytes", "activation_peak_bytes", "non_torch_bytes", "cuda_graph_bytes", "kv_cache_bytes",
                "block_size", "num_gpu_blocks", "kv_cache_tokens", "max_concurrency", "max_model_len_fits"):
        assert key in out
    code = ("import sys; from memfit.serve import serve; serve('llama-3.1-8b', gpu='h100-80gb'); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert r.stdout.strip() == "False", r.stderr


def test_cli_serve_imports_only_its_own_command():
    """`memfit serve` in a fresh process imports only the serve command's module, neither torch nor the other
    commands (what its cold start rests on; the time itself is printed by benchmarks/serve_speed.py)."""
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    code = ("import sys; from memfit.cli import main; code = main(['serve', 'llama-3.1-8b', '--gpu', 'h100-80gb', "
            "'--max-model-len', '8192', '--json']); "
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'memfit.commands.'))), file=sys.stderr); "
            "sys.exit(code)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(r.stdout)["kv_cache_tokens"] > 0
    assert r.stderr.strip() == "['memfit.commands.serve']"


def test_cli_errors_exit_2_on_one_line():
    r = _cli("serve", "llama-3.1-8b", "--gpu", "h100-80gb", "--tensor-parallel", "3")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = _cli("serve", "llama-3.1-8b", "--gpu-memory", "24GiB", "--requests", "4", "--tokens", "4096")
    assert r.returncode == 0 and "gpu_memory_utilization >=" in r.stdout


# ------------------------------------------------------------------ the published logs
@pytest.fixture(scope="module")
def published():
    sys.path.insert(0, str(ROOT / "validation"))
    import score_serving

    result = score_serving.score()
    for r in result["rows"]:  # every log is either scored (tokens, else KV memory) or skipped with a reason
        assert r.get("skipped") or {"kv_cache_tokens", "kv_cache_memory_gib"} & set(r["error"])
    return result["summary"]


def test_published_held_out_logs_no_worse_than_today(published):
    """KV cache tokens on the held-out half of the published logs (validation/serving/holdout.json, decided
    before they were scored): 13 scored, median |error| 3.97% at the split, 3.74% after the second round, 77%
    within 10%; third round (LoRA, Unsloth ids, Kimi-K2) 17 scored, 3.67%, 82%; fourth round (GB10 card and
    defaults, Qwen2.5-14B FP8-dynamic alias, a new v0.7.1 log) 19 scored, 3.67%, 84%. Issue 13's brief then
    printed five dennislee Qwen2-7B errors, so those moved to the tuning half (holdout.json "moved"): 14 scored,
    2.70% / 93% before the FlashInfer-sampler and TP non-torch rules, 3.49% / 93% after (the held-out
    gpt-oss-120b TP 4 log's record now carries its printed FlashInfer sampler). The same brief printed the
    Kimi-K2 TP 8 error, used to check the symmetric INT4 layout, so it moved too: 13 scored, 3.34% / 92%.
    Session serve6 added eight logs, all held out by holdout-3.json before they were scored: 21 scored,
    2.07% / 90% (the eight alone 1.35% / 88%). The per-card default sequence count read from vLLM's
    ``_set_default_args_v1`` (v0.8.4+: 256 below 70 GiB) was found through one of the eight
    (vllm-tokenkaki-qwen3-8b-a100-40gb-v092, -21.65% -> +0.68%), which therefore moved to the tuning half
    (holdout-3.json "moved"): 20 scored, 1.73% / 95%. A regression guard a little below today's level."""
    held = published["held_out"]
    assert held["count"] >= 20
    assert held["median_abs_error"] <= 0.022
    assert held["within_10pct"] >= 0.90


def test_published_held_out_logs_meet_the_bars(published):
    """The issue's bars on the held-out logs: median |error| <= 3% and >= 90% within 10%. Met since the eight
    logs of holdout-3.json (session serve6) were added: 21 scored, 2.07%, 90% (19 of 21; the two beyond 10% were
    vllm-gh21348-qwen3-235b-fp8, +21.7%, and vllm-tokenkaki-qwen3-8b-a100-40gb-v092, -21.7%, since moved to tuning
    after it led to the per-card sequence default): 20 scored, 1.73%, 95%."""
    held = published["held_out"]
    assert held["median_abs_error"] <= 0.03 and held["within_10pct"] >= 0.90


def test_mxfp4_and_modules_to_not_convert():
    """MX FP4: two values a byte plus a one-byte scale per 32 (4.25 bits); gpt-oss checkpoints quantize the
    experts only (``modules_to_not_convert``: self_attn, router, embeddings, head)."""
    import dataclasses

    from memfit.serve import resolve_quantization, skipped_roles
    from memfit.serve.memory import mxfp4_bytes

    assert mxfp4_bytes(2880, 5760) == 2880 * 5760 // 2 + 5760 * 90
    spec = load_model("qwen3-30b-a3b")
    qc = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                               "model.embed_tokens", "lm_head"]}
    q = dataclasses.replace(spec, config={**spec.config, "quantization_config": qc})
    assert resolve_quantization(q, None)[0] == "mxfp4"
    assert {"q", "k", "v", "o"} <= skipped_roles(q)
    full = weights_on_rank(spec)
    packed = weights_on_rank(q, quantization="mxfp4", skip_roles=skipped_roles(q))
    experts = sum(lin.in_features * lin.out_features * lin.count for b in spec.blocks for lin in b.linears
                  if lin.role.startswith("expert")) * spec.num_layers
    assert full - packed == pytest.approx(experts * 2 - experts * (0.5 + 1 / 32), rel=1e-3)


def test_mxfp4_moe_on_hopper_keeps_the_checkpoint_scales():
    """vLLM's MXFP4 MoE on Hopper (quantization/mxfp4.py, v0.10.1+): the swizzled weights replace the
    checkpoint's, its scales stay registered next to the swizzled ones, the bf16 biases turn float32, and
    the per-rank expert width is padded to a multiple of 64. gpt-oss-20b: 24 layers x 32 experts, hidden
    2880, expert width 2880 (w13: 5760 rows of 2880 inputs, w2: 2880 rows of 2880 inputs). llm-d printed
    "Model loading took 13.47 GiB" on an H100 (gpt-oss-120b: 64.38)."""
    from memfit.serve.memory import mxfp4_bytes, mxfp4_moe_extra_bytes

    spec = load_model("gpt-oss-20b")
    per_expert = (5760 + 2880) * (2880 // 32) + 2 * (5760 + 2880)
    assert mxfp4_moe_extra_bytes(spec) == 24 * 32 * per_expert
    # TP 4: width 720 -> 768; w13 768 x 2 rows, w2 768 inputs
    pad = (mxfp4_bytes(2880, 2 * 768) - mxfp4_bytes(2880, 2 * 720)) + (mxfp4_bytes(768, 2880) - mxfp4_bytes(720, 2880))
    per_expert4 = pad + 2 * 768 * 90 + 2880 * (768 // 32) + 2 * (2 * 768 + 2880)
    assert mxfp4_moe_extra_bytes(spec, tp=4) == 24 * 32 * per_expert4
    h100 = serve("openai/gpt-oss-20b", gpu="h100-80gb", engine_version="0.11", max_model_len=16000)
    a100 = serve("openai/gpt-oss-20b", gpu="a100-80gb", engine_version="0.11", max_model_len=16000)
    assert h100.weights_bytes - a100.weights_bytes == mxfp4_moe_extra_bytes(spec)
    assert h100.weights_bytes / GiB == pytest.approx(13.47, abs=0.1)
    big = serve("openai/gpt-oss-120b", gpu="h100-80gb", engine_version="0.11", max_model_len=16000)
    assert big.weights_bytes / GiB == pytest.approx(64.38, abs=0.25)


def test_v0_08_profiles_mla_multimodal_and_sliding_models_without_chunked_prefill():
    """vLLM v0.8-v0.10 ``EngineArgs._set_default_args_v0``: chunked prefill stays off for MLA and multimodal
    models, and the long-context default skips sliding-window ones, so the profile run takes
    max(max_model_len, 2048) tokens (DeepSeek-R1 at 163840: vllm-pr14842)."""
    from memfit.serve.vllm import default_limits

    cfg = ServeConfig(engine="vllm", gpu_memory_bytes=80 * GiB, engine_mode="v0")
    r1 = load_model("deepseek-v3")
    assert default_limits(cfg, r1, (0, 8, 0), "v0", 163840)[1] == 163840
    assert default_limits(cfg, r1, (0, 7, 3), "v0", 163840)[1] == 163840
    assert default_limits(cfg, r1, (0, 6, 4), "v0", 163840)[1] == 512
    llama = load_model("llama-3.1-8b")
    assert default_limits(cfg, llama, (0, 8, 0), "v0", 131072)[1] == 512
    assert default_limits(cfg, load_model("gemma-3-4b"), (0, 8, 0), "v0", 131072)[1] == 131072
    assert default_limits(cfg, load_model("gemma-3-4b"), (0, 8, 0), "v0", 1024)[1] == 2048


# ------------------------------------------------------------------ LoRA slots and data parallelism
def test_lora_slots_by_hand_and_where_vllm_charges_them():
    """Llama-2-7B, 4 slots of rank 16 (vllm/lora/layers.py ``create_lora_weights``): per layer qkv stacks
    3 slices (a: 3 x 16 x 4096, b: 12288 x 16), o (16 x 4096 + 4096 x 16), gate_up 2 slices (2 x 16 x 4096
    + 22016 x 16), down (16 x 11008 + 4096 x 16); the embedding (256 x 4096 extra rows, (32000 + 256) x 16,
    4096 x 16) and logits processor (16 x 4096, 32000 padded to 256 -> 32000 x 16, 256 x 4096), x 4 slots
    x 2 bytes. V1 counts them in the weights; V0 builds them after measuring the weights, so its KV cache
    is the same as without LoRA."""
    from memfit.serve.memory import lora_bytes_on_rank

    spec = load_model("llama-2-7b")
    layer = (3 * 16 * 4096 + 12288 * 16) + (16 * 4096 + 4096 * 16) + (2 * 16 * 4096 + 22016 * 16) + \
        (16 * 11008 + 4096 * 16)
    emb = 256 * 4096 + (32000 + 256) * 16 + 4096 * 16
    head = 16 * 4096 + 32000 * 16 + 256 * 4096
    want = (32 * layer + emb + head) * 4 * 2
    assert lora_bytes_on_rank(spec, max_loras=4, max_lora_rank=16) == want
    # TP 2: column-parallel outputs and row-parallel inputs halve, the rest stays
    assert lora_bytes_on_rank(spec, tp=2, max_loras=4, max_lora_rank=16) < want
    kw = dict(gpu_memory="79.19GiB", max_model_len=4096)
    v1 = serve(spec, engine_version="0.9", **kw)
    v1_lora = serve(spec, engine_version="0.9", enable_lora=True, max_loras=4, max_lora_rank=16, **kw)
    assert v1_lora.weights_bytes - v1.weights_bytes == want
    assert v1_lora.kv_cache_bytes == v1.kv_cache_bytes - want
    v0 = serve(spec, engine_version="0.7", **kw)
    v0_lora = serve(spec, engine_version="0.7", enable_lora=True, max_loras=4, **kw)
    assert (v0_lora.weights_bytes, v0_lora.num_gpu_blocks) == (v0.weights_bytes, v0.num_gpu_blocks)
    assert any("LoRA" in n for n in v0_lora.notes)
    # before v0.6.5 V0 measured the free-memory drop / the torch peak, both of which include the slots
    old, old_lora = (serve(spec, engine_version="0.6.3", enable_lora=e, max_loras=4, **kw) for e in (False, True))
    assert old.kv_cache_bytes - old_lora.kv_cache_bytes == want
    # Qwen2 lists no embedding modules for LoRA: linears only
    qwen = load_model("qwen2.5-0.5b")
    per = (3 * 8 * 896 + (896 + 2 * 128) * 8) + (8 * 896 + 896 * 8) + (2 * 8 * 896 + 2 * 4864 * 8) + \
        (8 * 4864 + 896 * 8)
    assert lora_bytes_on_rank(qwen, max_loras=1, max_lora_rank=8) == 24 * per * 2


def test_data_parallel_splits_only_the_experts():
    """DP 8 with expert parallelism: every rank keeps the attention and embeddings whole and 1/8 of each
    MoE layer's experts; a dense model's DP ranks are plain copies (the same KV cache as one engine)."""
    moe = load_model("qwen3-30b-a3b")
    one = weights_on_rank(moe, quantization="none", element_bytes=2)
    ep8 = weights_on_rank(moe, quantization="none", element_bytes=2, moe_ranks=8, expert_parallel=True)
    tp8_experts = weights_on_rank(moe, quantization="none", element_bytes=2, moe_ranks=8)
    experts = sum(lin.count * lin.in_features * lin.out_features for b in moe.blocks for lin in b.linears
                  if lin.role.startswith("expert")) * 2 * moe.num_layers // len(moe.blocks)
    assert one - ep8 == experts - experts // 8  # 128 experts: 16 whole ones per rank
    assert tp8_experts == ep8  # widths split 8 ways hold the same bytes (768 / 8 = 96 rows)
    dense = serve("llama-3.1-8b", gpu="h100-80gb", engine_version="0.10", max_model_len=8192)
    dp = serve("llama-3.1-8b", gpu="h100-80gb", engine_version="0.10", max_model_len=8192, data_parallel=4)
    assert (dp.weights_bytes, dp.num_gpu_blocks) == (dense.weights_bytes, dense.num_gpu_blocks)
    with pytest.raises(JobError):
        serve("llama-3.1-8b", gpu="h100-80gb", engine_version="0.7", data_parallel=2)
    with pytest.raises(JobError):
        serve("llama-3.1-8b", engine="sglang", gpu="h100-80gb", enable_lora=True)


def test_kimi_k2_int4_experts_keep_the_rest_in_16_bits():
    """Kimi-K2-Thinking's compressed-tensors INT4 (group 32) covers the routed experts only: its ignore list
    (self_attn, shared_experts, mlp.(gate|up|gate_up|down)_proj, lm_head) keeps every other linear 16-bit."""
    from memfit.serve import resolve_quantization
    from memfit.serve import skipped_roles

    spec = load_model("moonshotai/Kimi-K2-Thinking")
    assert spec.parameters == 1_026_408_209_408
    # symmetric INT4 groups: no zero points (vLLM's CompressedTensorsWNA16MarlinMoEMethod, v0.11.0)
    assert resolve_quantization(spec, None) == ("int4-sym", 32, "w4a16")
    from memfit.estimator.quant import linear_bytes
    assert linear_bytes(7168, 2048, "int4-sym", group_size=32) == 7168 * 2048 // 2 + 7168 // 32 * 2048 * 2
    skip = skipped_roles(spec)
    assert {"gate", "up", "down", "shared_gate", "shared_up", "shared_down", "q_a", "kv_b", "o"} <= skip
    assert not any(r.startswith("expert") for r in skip)
    int4 = weights_on_rank(spec, tp=8, quantization="awq", group_size=32, skip_roles=skip)
    everything = weights_on_rank(spec, tp=8, quantization="awq", group_size=32)
    dense_mlp = 3 * 7168 * 18432 // 8  # layer 0's MLP on one rank
    assert int4 - everything > dense_mlp  # attention, shared experts and the dense MLP stay bf16


def test_v1_before_0_9_charges_the_cuda_context():
    """V1's determine_available_memory before PR #17122 adds all non-torch memory in use (the CUDA context
    too) to the torch peak, as V0 v0.6.3 did; from v0.9 the memory_profiling snapshot leaves it out."""
    from memfit.serve.vllm import CUDA_CONTEXT_V063_BYTES, NON_TORCH_TP1_BYTES

    old = serve("llama-3.1-8b", gpu="h100-80gb", engine_version="0.8.5", max_model_len=8192)
    new = serve("llama-3.1-8b", gpu="h100-80gb", engine_version="0.9", max_model_len=8192)
    assert (old.rule, new.rule) == ("v1-torch-peak", "memory-profiling")
    assert (old.non_torch_bytes, new.non_torch_bytes) == (CUDA_CONTEXT_V063_BYTES, NON_TORCH_TP1_BYTES)
    assert old.activation_peak_bytes == new.activation_peak_bytes
    assert abs(new.kv_cache_bytes - old.kv_cache_bytes - (CUDA_CONTEXT_V063_BYTES - NON_TORCH_TP1_BYTES)) <= 1


def test_v0_mla_cache_alignment_pads_entries_to_256_bytes():
    """VLLM_MLA_CUDA_MEM_ALIGN_KV_CACHE=1 (V0, PR #12676): a 576-element bf16 MLA entry (1152 B) is padded
    to 1280 B, so blocks shrink by 576/640; the same run without it (PR #14842) keeps 576."""
    spec = load_model("deepseek-v2-lite")
    layers = K.layer_kv_specs(spec, tp=1, element_bytes=2)
    assert {x.head_size for x in K.aligned_mla(layers)} == {640}
    kw = dict(gpu_memory="79.19GiB", engine_version="0.7.3", max_model_len=8192)
    plain = serve(spec, **kw)
    padded = serve(spec, mla_cuda_mem_align_kv_cache=True, **kw)
    assert padded.num_gpu_blocks == plain.kv_cache_bytes // (16 * 27 * 640 * 2)
    assert plain.num_gpu_blocks == plain.kv_cache_bytes // (16 * 27 * 576 * 2)


def test_cli_lora_and_data_parallel_flags_reach_the_estimate():
    """`memfit serve --enable-lora --max-loras N --max-lora-rank R` and `--data-parallel N` give what the
    library gives for the same keywords; the LoRA sizes without --enable-lora, and --fewest-gpus with DP,
    are one-line errors; --requests with DP spreads the requests over the engines."""
    from memfit.serve import min_utilization

    base = ("serve", "llama-2-7b", "--gpu", "h100-80gb", "--max-model-len", "4096", "--engine-version", "0.9")
    r = _cli(*base, "--enable-lora", "--max-loras", "4", "--max-lora-rank", "32", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = serve("llama-2-7b", gpu="h100-80gb", max_model_len=4096, engine_version="0.9", enable_lora=True,
                 max_loras=4, max_lora_rank=32)
    plain = serve("llama-2-7b", gpu="h100-80gb", max_model_len=4096, engine_version="0.9")
    assert out["kv_cache_tokens"] == want.kv_cache_tokens < plain.kv_cache_tokens
    assert out["lora_bytes"] == want.lora_bytes == want.weights_bytes - plain.weights_bytes > 0
    assert out["lora_in_weights"] is True
    text = _cli(*base, "--enable-lora", "--max-loras", "4")
    assert text.returncode == 0 and "LoRA slots" in text.stdout and "included in the weights" in text.stdout
    r = _cli(*base, "--max-loras", "4")
    assert r.returncode == 2 and "--enable-lora" in r.stderr and r.stderr.count("\n") == 1

    moe = ("serve", "qwen3-30b-a3b", "--gpu", "h100-80gb", "--max-model-len", "8192", "--engine-version", "0.10")
    r = _cli(*moe, "--data-parallel", "4", "--enable-expert-parallel", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = serve("qwen3-30b-a3b", gpu="h100-80gb", max_model_len=8192, engine_version="0.10", data_parallel=4,
                 enable_expert_parallel=True)
    one = serve("qwen3-30b-a3b", gpu="h100-80gb", max_model_len=8192, engine_version="0.10")
    assert out["data_parallel"] == 4 and out["kv_cache_tokens"] == want.kv_cache_tokens
    assert out["weights_bytes"] == want.weights_bytes < one.weights_bytes  # a quarter of the experts per rank
    text = _cli(*moe, "--data-parallel", "4")
    assert "on 4 GPU(s)" in text.stdout and "DP 4" in text.stdout, text.stdout
    r = _cli(*moe, "--data-parallel", "2", "--requests", "8", "--tokens", "8192", "--fewest-gpus")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    # 8 requests over 2 engines: each engine holds 4 (the smallest utilization where one engine fits 4)
    kw = dict(gpu="h100-80gb", engine_version="0.10", max_model_len=8192, data_parallel=2)
    two = min_utilization("qwen3-30b-a3b", requests=8, tokens=8192, **kw)
    u = two["utilization"]
    assert serve("qwen3-30b-a3b", gpu_memory_utilization=u, **kw).max_concurrency >= 4
    assert serve("qwen3-30b-a3b", gpu_memory_utilization=round(u - 0.001, 3), **kw).max_concurrency < 4


def test_unified_memory_gb10_takes_the_small_card_defaults():
    """vLLM sizes its V1 defaults from NVML's device memory, which a GB10 (DGX Spark, unified memory) does not
    report: 2048 batched tokens and 256 sequences there (vllm-guardkit-qwen3-30b-a3b-fp8-gb10 prints the 2048),
    while torch's 119.63 GiB is still the card's total for gpu_memory_utilization."""
    spark = serve("qwen3-8b", gpu="gb10", engine_version="0.13", max_model_len=8192)
    h200 = serve("qwen3-8b", gpu="h200", engine_version="0.13", max_model_len=8192)
    assert (spark.max_num_batched_tokens, spark.max_num_seqs) == (2048, 256)
    assert (h200.max_num_batched_tokens, h200.max_num_seqs) == (8192, 1024)
    assert spark.gpu_memory_bytes > 119 * 2 ** 30


def test_v1_serve_defaults_follow_each_versions_arg_utils():
    """``EngineArgs._set_default_args_v1`` as the wheels have it: v0.8.0-v0.8.3 test the device name for "h100" /
    "h200" (8192 tokens) and always take 1024 sequences; v0.8.4 gives the other cards 256; v0.8.5 tests
    ``>= 70 GiB`` instead of the name; v0.9.0+ excludes A100s from the large defaults (PR #17885)."""
    def limits(gpu, version):
        est = serve("qwen3-8b", gpu=gpu, engine_version=version, max_model_len=8192)
        return est.max_num_batched_tokens, est.max_num_seqs

    assert limits("a100-40gb", "0.8.0") == (2048, 1024)
    assert limits("a100-40gb", "0.8.4") == (2048, 256)
    assert limits("a100-40gb", "0.9.2") == (2048, 256)
    assert limits("h100-80gb", "0.8.0") == limits("h100-80gb", "0.9.2") == (8192, 1024)
    # an 80 GiB card that is neither H100 nor H200 nor A100: by name before v0.8.5, by memory after
    assert limits("a800-80gb", "0.8.4") == (2048, 256)
    assert limits("a800-80gb", "0.8.5") == limits("a800-80gb", "0.9.2") == (8192, 1024)
    # the A100 exclusion arrives with v0.9.0
    assert limits("a100-80gb", "0.8.5") == (8192, 1024)
    assert limits("a100-80gb", "0.9.0") == (2048, 256)


def test_vllm_07_keeps_mlas_absorbed_matrices():
    """vLLM v0.7.1-v0.7.3 (mla/utils.py process_weights_after_loading, absorption on by default) keep, per
    DeepSeek-R1 layer at TP 8 (16 heads, Lq 1536, Lkv 512, rope 64, hidden 7168, FP8 weights): the float32
    dequantized kv_b (512 x 16 x 256 x 4), W_QR in bf16 (1536 x 1024 x 2), and W_Q_UK (1536 x 8192) and W_UV_O
    (8192 x 7168) re-quantized to FP8 with float32 128 x 128 block scales; v0.8 keeps bf16 copies of kv_b."""
    from memfit.serve.memory import mla_absorbed_bytes

    spec = load_model("deepseek-ai/DeepSeek-R1")
    block = next(b for b in spec.blocks if b.attention.kind == "mla")
    want = 512 * 16 * 256 * 4 + 1536 * 1024 * 2 + (1536 * 8192 + 12 * 64 * 4) + (8192 * 7168 + 64 * 56 * 4)
    assert mla_absorbed_bytes(block, 8, "fp8", 2, 7168) == want
    # unquantized: kv_b is a view of the parameter, the absorbed matrices are in the model dtype
    assert mla_absorbed_bytes(block, 8, "none", 2, 7168) == 1536 * 1024 * 2 + (1536 * 8192 + 8192 * 7168) * 2
    kw = dict(gpu="h200", tensor_parallel=8, max_model_len=32768, engine_mode="v0")
    old, new = serve(spec, engine_version="0.7.3", **kw), serve(spec, engine_version="0.8.0", **kw)
    kv_b = 512 * 128 * 256 // 8 * 2  # v0.8's bf16 W_UK_T / W_UV copies, per layer
    assert old.weights_bytes - new.weights_bytes == 61 * (want - kv_b)
    assert old.num_gpu_blocks < new.num_gpu_blocks
    assert serve(spec, engine_version="0.7.0", **kw).weights_bytes == new.weights_bytes


def test_v0_mla_prefill_moment_from_the_source():
    """V0's MLA prefill (mla/common.py _forward_prefill, v0.8.0) at o_proj, DeepSeek-R1 at TP 8 (16 heads,
    qk 192 = 128 + 64, v 128, Lkv 512, Lq 1536, hidden 7168), per token: residual, normed input, output buffer
    and o_proj's output (4 x 7168), q_a out and its norm (2 x 1536), kv_a out (576), the latent and its norm
    (2 x 512), q (16 x 192), kv_b out (16 x 256), k and padded v (2 x 16 x 192), the cut output (16 x 128);
    v0.7.x has no output buffer. V1 and non-MLA models keep the generic moment."""
    from memfit.serve.memory import layer_peak_per_token, mla_v0_prefill_elements

    spec = load_model("deepseek-ai/DeepSeek-R1")
    block = next(b for b in spec.blocks if b.attention.kind == "mla")
    want = 4 * 7168 + 2 * 1536 + 576 + 2 * 512 + 16 * 192 + 16 * 256 + 2 * 16 * 192 + 16 * 128
    assert mla_v0_prefill_elements(block, 8, 7168, output_buffer=True) == want == 48704
    assert mla_v0_prefill_elements(block, 8, 7168, output_buffer=False) == want - 7168
    dense = next(b for b in spec.blocks if b.moe is None)  # the first dense layers: attention dominates there
    # at TP 8 o_proj's all-reduce adds its out-of-place result (one more 7168-wide row)
    assert layer_peak_per_token(dense, 8, 2, 7168, "0.8") == max(
        layer_peak_per_token(dense, 8, 2, 7168), (want + 7168) * 2)
    kw = dict(gpu="h200", tensor_parallel=8, max_model_len=163840, block_size=64)
    v0 = serve(spec, engine_version="0.8.0", engine_mode="v0", **kw)
    assert v0.activation_peak_moment == "layer" and v0.activation_peak_bytes >= 163840 * want * 2
    llama = load_model("llama-3.1-8b")
    b = llama.blocks[0]
    assert layer_peak_per_token(b, 1, 2, 4096, "0.8") == layer_peak_per_token(b, 1, 2, 4096)


def test_tp_all_reduce_is_out_of_place():
    """vLLM's TP all-reduce returns a new tensor (parallel_state.py GroupCoordinator.all_reduce, pynccl.py
    all_reduce's empty_like): at TP > 1 the o_proj and down_proj moments hold one more hidden-wide row per
    token; at TP 1 nothing changes. A MoE block at TP > 1 also has the combine moment after the experts."""
    from memfit.serve.memory import layer_peak_per_token, moe_combine_per_token

    llama = load_model("llama-3.1-8b")
    b = llama.blocks[0]
    H, I = 4096, 14336
    # TP 1: the MLP moment, 3H + 3 x I (gate_up and the activation)
    assert layer_peak_per_token(b, 1, 2, H) == (3 * H + 3 * I) * 2
    # TP 2: I/2 per rank, plus the reduced copy of down_proj's output
    assert layer_peak_per_token(b, 2, 2, H) == (3 * H + 3 * I // 2 + H) * 2
    r1 = load_model("deepseek-ai/DeepSeek-R1")
    moe = next(x for x in r1.blocks if x.moe is not None)
    assert moe_combine_per_token(moe, 1, 2, 7168) == 0
    assert moe_combine_per_token(moe, 8, 2, 7168) == 5 * 7168 * 2  # with shared experts


@pytest.mark.parametrize("flag", ["--data-parallel", "--tensor-parallel", "--max-model-len"])
def test_cli_zero_is_refused_not_read_as_unset(flag, capsys):
    # 0 used to be dropped with the flags not given (a falsy value), so `--data-parallel 0` ran as 1
    from memfit.cli import main

    assert main(["serve", "llama-3.1-8b", "--gpu", "h100-80gb", flag, "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be a whole number >= 1; got 0" in err[0]


def test_v1_flashinfer_sampler_moment():
    """vLLM V1 with FlashInfer's top-k/top-p (v1/sample/ops/topk_topp_sampler.py, v0.10.1.1 / v0.11.0): the
    profile's sampler moment holds the model-dtype logits, their fp32 copy, the top-k-masked logits and their
    softmax (e + 12 bytes per logit), against the fitted 38.4 of the PyTorch sort; V0 ignores the setting."""
    from memfit.errors import JobError
    from memfit.serve import serve
    from memfit.serve.memory import SAMPLER_V1_BYTES_PER_LOGIT, sampler_bytes_per_logit

    assert sampler_bytes_per_logit("v1", 2, "flashinfer") == 14
    assert sampler_bytes_per_logit("v1", 2) == SAMPLER_V1_BYTES_PER_LOGIT
    assert sampler_bytes_per_logit("v0", 2, "flashinfer") == sampler_bytes_per_logit("v0", 2)
    kw = dict(gpu="a100-80gb", engine_version="0.10.1.1", gpu_memory_utilization=0.25, max_model_len=16384)
    fi = serve("Qwen/Qwen2-7B-Instruct", sampler="flashinfer", **kw)
    native = serve("Qwen/Qwen2-7B-Instruct", **kw)
    # A100: 2048 batched tokens, 256 sequences; Qwen2-7B: hidden 3584, vocabulary 152064
    assert (fi.max_num_batched_tokens, fi.max_num_seqs) == (2048, 256)
    assert fi.activation_peak_moment == "sampler"
    assert fi.activation_peak_bytes == 2048 * 3584 * 2 + 256 * 152064 * 14
    assert native.activation_peak_bytes - fi.activation_peak_bytes == int(256 * 152064 * (SAMPLER_V1_BYTES_PER_LOGIT - 14))
    # the printed 5.01 GiB of vllm-dennislee-qwen2-7b-a100-80gb-u25 ("Using FlashInfer for top-p & top-k sampling.")
    assert fi.kv_cache_bytes / GiB == pytest.approx(5.01, rel=0.03)
    with pytest.raises(JobError):
        serve("Qwen/Qwen2-7B-Instruct", sampler="sorted", **kw)


def test_tp_non_torch_memory_by_board():
    """TP > 1 ranks: Hopper (and, assumed, Blackwell) boards are charged the H100-fitted 0.55 GiB, other cards
    the 0.20 GiB of the RTX 3090 log, which the A100 logs of dennislee22/vLLM-benchmarking (0.15 / 0.19 GiB left
    besides the profile peak) agree with."""
    from memfit.serve import serve
    from memfit.serve.vllm import NON_TORCH_TP_BYTES, NON_TORCH_TP_CONSUMER_BYTES, nvswitch_board

    assert nvswitch_board("NVIDIA H100 80GB HBM3") and nvswitch_board("h20") and nvswitch_board("NVIDIA B200")
    assert not nvswitch_board("NVIDIA A100 80GB (SXM4)") and not nvswitch_board("NVIDIA L40S")
    kw = dict(engine_version="0.11", tensor_parallel=2, max_model_len=8192)
    assert serve("llama-3.1-8b", gpu="h100-80gb", **kw).non_torch_bytes == NON_TORCH_TP_BYTES
    assert serve("llama-3.1-8b", gpu="a100-80gb", **kw).non_torch_bytes == NON_TORCH_TP_CONSUMER_BYTES
