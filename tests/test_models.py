"""memfit.models: exact parameter counts against transformers, name resolution, errors.

The golden number for every registry entry is PyTorch's own count: the model is built with
``transformers`` on the meta device (no memory, no weights) and ``sum(p.numel() for p in
model.parameters())`` (tied weights are one Parameter, counted once) must equal ``spec.parameters``
exactly. Each layer is checked too: its parameter count, and its ``nn.Linear`` / ``Conv1D`` modules
(leaf name, in/out features, bias) against the spec's module linears. Building every entry, DeepSeek-V3
and Llama-3.1-405B included, takes a few seconds on two cores: meta tensors allocate nothing and
transformers 5 keeps MoE experts as two fused tensors per layer, so no layer-scaling shortcut is needed.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import time

import pytest

from memfit.errors import ConfigError, ModelNotFoundError
from memfit.models import families, list_models, load_model, registry_names, spec_from_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REGISTRY = registry_names()


# ---------------------------------------------------------------------------------------------- helpers

def _build(spec):
    """The spec's architecture built by transformers from the spec's config, on the meta device."""
    cls = getattr(transformers, spec.architecture)
    config = transformers.AutoConfig.for_model(**spec.config)
    with torch.device("meta"):
        return cls(config)


def _layers(model, n_layers):
    """The ModuleList holding the decoder / encoder layers."""
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise AssertionError(f"no ModuleList of {n_layers} layers in {type(model).__name__}")


def _module_linears(layer):
    """Counter of (leaf name, in, out, bias) over the nn.Linear and Conv1D modules of one layer."""
    found = collections.Counter()
    for name, module in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear):
            found[(leaf, module.in_features, module.out_features, module.bias is not None)] += 1
        elif type(module).__name__ == "Conv1D":  # GPT-2: weight stored as (in, out)
            found[(leaf, module.weight.shape[0], module.weight.shape[1], module.bias is not None)] += 1
    return found


def _check_against_transformers(spec):
    model = _build(spec)
    assert spec.parameters == sum(p.numel() for p in model.parameters())

    layers = _layers(model, spec.num_layers)
    assert len(spec.layer_blocks) == spec.num_layers
    assert sum(b.count for b in spec.blocks) == spec.num_layers
    for i, layer in enumerate(layers):
        block = spec.blocks[spec.layer_blocks[i]]
        assert sum(p.numel() for p in layer.parameters()) == block.layer_params, f"layer {i}"

        want = collections.Counter()
        for lin in block.linears:
            if lin.is_module:
                want[(lin.name, lin.in_features, lin.out_features, lin.bias)] += lin.count
        assert _module_linears(layer) == want, f"layer {i}"

        # fused MoE weights and routers: plain Parameters of the right size, under the spec's name
        loose = {n: p.numel() for n, p in layer.named_parameters()
                 if not isinstance(layer.get_submodule(n.rsplit(".", 1)[0]) if "." in n else layer,
                                   torch.nn.Linear)}
        for lin in block.linears:
            if not lin.is_module:
                sizes = [size for n, size in loose.items()
                         if n.split(".")[-1] == lin.name or n.endswith(f"{lin.name}.weight")]
                assert lin.weight_params in sizes, f"layer {i}: {lin.name}"

        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "sliding_window") and block.attention.kind == "mha":
            assert attn.sliding_window == block.attention.sliding_window, f"layer {i} sliding window"


# ------------------------------------------------------------------------- every registry entry, exactly

@pytest.mark.parametrize("name", REGISTRY)
def test_registry_entry_matches_transformers(name):
    _check_against_transformers(load_model(name))


# --------------------------------------------------- each family's options, on tiny configs

_S = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
          num_key_value_heads=2, vocab_size=100)
_BERT = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=100,
             max_position_embeddings=34, pad_token_id=1)
_DSV = dict(_S, num_key_value_heads=4, first_k_dense_replace=1, moe_intermediate_size=16, n_routed_experts=8,
            num_experts_per_tok=2, n_shared_experts=2, kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=6)
TINY = {
    "llama": dict(model_type="llama", **_S),
    "llama-bias-headdim-tied": dict(model_type="llama", **_S, attention_bias=True, mlp_bias=True, head_dim=32,
                                    tie_word_embeddings=True),
    "llama-seqcls": dict(model_type="llama", architectures=["LlamaForSequenceClassification"], num_labels=5, **_S),
    "llama-base": dict(model_type="llama", architectures=["LlamaModel"], **_S),
    "mistral": dict(model_type="mistral", **_S),
    "mixtral": dict(model_type="mixtral", **_S, num_local_experts=4),
    "qwen2-sliding": dict(model_type="qwen2", **_S, use_sliding_window=True, sliding_window=16, max_window_layers=1),
    "qwen3-bias": dict(model_type="qwen3", **_S, head_dim=8, attention_bias=True),
    "qwen2_moe-mlp-only": dict(model_type="qwen2_moe", **_S, moe_intermediate_size=32,
                               shared_expert_intermediate_size=48, num_experts=4, mlp_only_layers=[1],
                               num_experts_per_tok=2),
    "qwen2_moe-sparse-step": dict(model_type="qwen2_moe", **_S, moe_intermediate_size=32,
                                  shared_expert_intermediate_size=48, num_experts=4, decoder_sparse_step=2,
                                  num_experts_per_tok=2, qkv_bias=False, use_sliding_window=True,
                                  sliding_window=8, max_window_layers=2),
    "qwen3_moe": dict(model_type="qwen3_moe", **_S, moe_intermediate_size=32, num_experts=4, head_dim=8,
                      mlp_only_layers=[0], num_experts_per_tok=2),
    "gemma": dict(model_type="gemma", **_S, head_dim=32),
    "gemma2": dict(model_type="gemma2", **_S, head_dim=32),
    "gemma3_text-layer-types": dict(model_type="gemma3_text", **_S, head_dim=32,
                                    layer_types=["full_attention", "sliding_attention", "full_attention"]),
    "gemma3-multimodal": dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
                              text_config=dict(model_type="gemma3_text", **_S, head_dim=32, sliding_window_pattern=2)),
    "phi3": dict(model_type="phi3", **_S, pad_token_id=0, sliding_window=8),
    "olmo": dict(model_type="olmo", **_S),
    "olmo2": dict(model_type="olmo2", **_S),
    "olmoe": dict(model_type="olmoe", **_S, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3-q-lora-bias": dict(model_type="deepseek_v3", **_DSV, q_lora_rank=24, n_group=2, topk_group=1,
                                    attention_bias=True),
    "deepseek_v2-no-q-lora-mlp-bias": dict(model_type="deepseek_v2", **_DSV, q_lora_rank=None, mlp_bias=True),
    "gpt2-seqcls-3-labels": dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                                 n_inner=100, architectures=["GPT2ForSequenceClassification"],
                                 id2label={"0": "a", "1": "b", "2": "c"}),
    "gpt_neox-no-bias-tied": dict(model_type="gpt_neox", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, vocab_size=100, attention_bias=False,
                                  tie_word_embeddings=True, use_parallel_residual=False),
    "opt-350m-style": dict(model_type="opt", num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                           vocab_size=100, max_position_embeddings=32, pad_token_id=1, word_embed_proj_dim=32,
                           do_layer_norm_before=False, enable_bias=False, layer_norm_elementwise_affine=False),
    "opt-seqcls": dict(model_type="opt", num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                       vocab_size=100, max_position_embeddings=32, pad_token_id=1,
                       architectures=["OPTForSequenceClassification"]),
    "falcon-new-arch-bias": dict(model_type="falcon", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                 vocab_size=100, new_decoder_architecture=True, num_kv_heads=2, bias=True),
    "falcon-sequential-mha-alibi": dict(model_type="falcon", num_hidden_layers=2, hidden_size=64,
                                        num_attention_heads=4, vocab_size=100, multi_query=False, parallel_attn=False,
                                        alibi=True, ffn_hidden_size=96),
    "falcon-new-arch-one-ln": dict(model_type="falcon", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                   vocab_size=100, new_decoder_architecture=True, num_kv_heads=2,
                                   num_ln_in_parallel_attn=1),
    "bert-seqcls": dict(model_type="bert", **_BERT, architectures=["BertForSequenceClassification"], num_labels=3),
    "bert-base-model": dict(model_type="bert", **_BERT, architectures=["BertModel"]),
    "roberta-seqcls": dict(model_type="roberta", **_BERT, architectures=["RobertaForSequenceClassification"]),
    "roberta-mlm-untied": dict(model_type="roberta", **_BERT, architectures=["RobertaForMaskedLM"],
                               tie_word_embeddings=False),
    "distilbert-mlm": dict(model_type="distilbert", n_layers=2, dim=64, hidden_dim=128, n_heads=4, vocab_size=100,
                           max_position_embeddings=32, architectures=["DistilBertForMaskedLM"]),
    "distilbert-mlm-untied": dict(model_type="distilbert", n_layers=2, dim=64, hidden_dim=128, n_heads=4,
                                  vocab_size=100, max_position_embeddings=32, architectures=["DistilBertForMaskedLM"],
                                  tie_word_embeddings=False),
    "bert-mlm-untied": dict(model_type="bert", **_BERT, architectures=["BertForMaskedLM"], tie_word_embeddings=False),
    "granite-bias-tied": dict(model_type="granite", **_S, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "granitemoe-attention-bias": dict(model_type="granitemoe", **_S, num_local_experts=4, num_experts_per_tok=2,
                                      attention_bias=True),
    "gpt_oss-default-layers": dict(model_type="gpt_oss", **_S, head_dim=16, num_local_experts=4,
                                   num_experts_per_tok=2),
    "gpt_oss-layer-types-no-bias": dict(model_type="gpt_oss", **_S, head_dim=16, num_local_experts=4,
                                        num_experts_per_tok=2, attention_bias=False, sliding_window=8,
                                        layer_types=["full_attention", "sliding_attention", "full_attention"]),
    "llama4_text-interleaved-moe": dict(model_type="llama4_text", **_S, head_dim=16, intermediate_size_mlp=96,
                                        num_local_experts=4, interleave_moe_layer_step=2, attention_chunk_size=16,
                                        no_rope_layer_interval=2),
    "llama4-multimodal": dict(model_type="llama4", architectures=["Llama4ForConditionalGeneration"],
                              text_config=dict(model_type="llama4_text", **_S, head_dim=16, intermediate_size_mlp=96,
                                               num_local_experts=4, attention_bias=True)),
}


@pytest.mark.parametrize("case", list(TINY))
def test_family_option_matches_transformers(case):
    _check_against_transformers(spec_from_config(TINY[case], name=case))


# ------------------------------------------------------------------------------- what the spec says

def test_sliding_window_layers_follow_the_family_pattern():
    gemma3 = load_model("gemma-3-1b")
    windows = [gemma3.blocks[b].attention.sliding_window for b in gemma3.layer_blocks]
    assert windows[:6] == [512] * 5 + [None]
    assert windows.count(None) == 26 // 6
    gemma2 = load_model("gemma-2-9b")
    assert [gemma2.blocks[b].attention.sliding_window for b in gemma2.layer_blocks[:4]] == [4096, None, 4096, None]
    assert gemma2.blocks[0].norms_per_layer == 4 and gemma2.final_logit_softcapping == 30.0
    assert all(b.attention.sliding_window == 4096 for b in load_model("mistral-7b-v0.1").blocks)
    assert all(b.attention.sliding_window is None for b in load_model("mistral-7b-v0.3").blocks)
    assert all(b.attention.sliding_window is None for b in load_model("qwen2.5-7b").blocks)


def test_moe_blocks_describe_experts_routers_and_shared_experts():
    ds = load_model("deepseek-v3")
    assert [b.count for b in ds.blocks] == [3, 58]
    dense, moe = ds.blocks
    assert dense.moe is None and dense.mlp.intermediate_size == 18432
    assert moe.mlp is None and moe.moe.num_experts == 256 and moe.moe.num_shared_experts == 1
    assert moe.attention.kind == "mla" and moe.attention.kv_lora_rank == 512 and moe.attention.head_dim == 192
    by_role = {lin.role: lin for lin in moe.linears}
    assert not by_role["expert_gate_up"].is_module and by_role["expert_gate_up"].count == 256
    assert by_role["router"].fp32 and not by_role["router"].is_module
    assert by_role["shared_up"].out_features == 2048

    qwen_moe = load_model("qwen1.5-moe-a2.7b")
    gate = next(lin for lin in qwen_moe.blocks[0].linears if lin.role == "shared_router")
    assert (gate.name, gate.out_features, gate.is_module) == ("shared_expert_gate", 1, True)
    assert qwen_moe.blocks[0].moe.shared_expert_gate

    lite = load_model("deepseek-v2-lite")
    assert lite.blocks[1].attention.q_lora_rank == 0
    assert "q_proj" in {lin.name for lin in lite.blocks[1].linears}


def test_heads_ties_and_dtypes():
    tied = load_model("llama-3.2-1b")
    assert tied.tie_word_embeddings and tied.head_params == 0 and tied.lm_head_params == 128256 * 2048
    assert load_model("llama-3.1-8b").head_params == 128256 * 4096
    sst2 = load_model("distilbert-sst2")
    assert (sst2.head, sst2.num_labels, sst2.is_encoder) == ("seq_cls", 2, True)
    assert sst2.head_params == 768 * 768 + 768 + 768 * 2 + 2
    assert load_model("bert-base-uncased").head == "masked_lm"
    assert load_model("qwen2.5-7b").torch_dtype == "bfloat16"
    gemma3 = load_model("gemma-3-4b")
    assert (gemma3.model_type, gemma3.architecture, gemma3.vocab_size) == ("gemma3_text", "Gemma3ForCausalLM", 262208)
    assert gemma3.torch_dtype == "bfloat16"
    assert spec_from_config({**TINY["llama"], "dtype": "float16"}, name="x").torch_dtype == "float16"
    assert spec_from_config(TINY["llama"], name="x").torch_dtype == "float32"


def test_gpt2_and_opt_position_embeddings():
    gpt2 = load_model("gpt2")
    assert gpt2.embedding_params == (50257 + 1024) * 768
    assert [lin.name for lin in gpt2.blocks[0].linears] == ["c_attn", "c_proj", "c_fc", "c_proj"]
    opt = load_model("opt-125m")
    assert opt.embedding_params == 50272 * 768 + (2048 + 2) * 768


def test_served_families_describe_sinks_chunks_nope_and_experts():
    oss = load_model("gpt-oss-20b")
    assert [oss.blocks[b].attention.sliding_window for b in oss.layer_blocks[:4]] == [128, None, 128, None]
    assert all(b.attention.sinks and b.moe.num_experts == 32 and b.moe.top_k == 4 for b in oss.blocks)
    by_name = {lin.name: lin for lin in oss.blocks[0].linears}
    assert by_name["gate_up_proj"].bias and by_name["router"].bias and not by_name["router"].is_module
    assert oss.checkpoint_quantization == "mxfp4" and load_model("gpt-oss-120b").num_layers == 36

    scout = load_model("llama-4-scout-17b-16e")
    assert (scout.model_type, scout.architecture) == ("llama4_text", "Llama4ForCausalLM")
    kinds = [(scout.blocks[b].attention.chunked, scout.blocks[b].attention.rope) for b in scout.layer_blocks]
    assert kinds[:4] == [(True, True)] * 3 + [(False, False)] and kinds.count((False, False)) == 12
    assert {scout.blocks[b].attention.sliding_window for b in scout.layer_blocks} == {8192, None}
    moe = scout.blocks[0].moe
    assert (moe.num_experts, moe.top_k, moe.routed_copies, moe.shared_intermediate_size) == (16, 1, 16, 8192)
    router = next(lin for lin in scout.blocks[0].linears if lin.role == "router")
    assert router.is_module and router.name == "router"

    granite_moe = load_model("granite-3.1-3b-a800m")
    assert next(lin for lin in granite_moe.blocks[0].linears if lin.role == "router").name == "router"
    assert load_model("granite-3.1-8b").tie_word_embeddings


# ----------------------------------------------------------------------------------- name resolution

def test_registry_name_is_case_insensitive_and_hub_ids_alias_it():
    assert load_model("Llama-3.1-8B").name == "llama-3.1-8b"
    assert load_model("meta-llama/Llama-3.1-8B").name == "llama-3.1-8b"
    assert load_model("META-LLAMA/META-LLAMA-3.1-8B").name == "llama-3.1-8b"
    assert load_model("mistral-7b").name == "mistral-7b-v0.3"
    assert load_model("  gpt2  ").name == "gpt2"
    assert load_model("gpt2") is load_model("gpt2")  # cached


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_CHECKPOINT_QUANTIZATIONS = {"awq", "gptq", "gptq-int8", "fp8", "nf4", "mxfp4"}
_SIZE_FREE_KEYS = {"max_position_embeddings", "sliding_window", "rope_theta", "rope_scaling", "eos_token_id",
                   "bos_token_id", "pad_token_id", "torch_dtype"}
"""Config keys an alias may override: none changes a parameter (checked below all the same)."""


def test_every_served_hub_id_resolves_offline_to_its_entry(monkeypatch):
    import memfit.models as models

    def no_hub(ref):
        raise AssertionError(f"{ref} went to the Hub")

    monkeypatch.setattr(models, "_from_hub", no_hub)
    aliases = models.hub_aliases()
    assert len(aliases) >= 100
    registry_keys = {k.lower() for name in REGISTRY for k in (name, models._index()[name]["hf_id"],
                                                               *models._index()[name].get("aliases", ()))}
    seen = set()
    for hub, entry in aliases.items():
        assert _HUB_ID.match(hub) and "--" not in hub and not hub.endswith((".", "-")), hub
        assert hub.lower() not in registry_keys and hub.lower() not in seen, f"{hub} listed twice"
        seen.add(hub.lower())
        assert entry["source"] == f"https://huggingface.co/{hub}", hub
        assert entry["model"] in REGISTRY, hub
        assert set(entry) <= {"model", "source", "quantization", "overrides", "multimodal", "note"}, hub
        assert entry.get("quantization", "awq") in _CHECKPOINT_QUANTIZATIONS, hub
        assert set(entry.get("overrides", {})) <= _SIZE_FREE_KEYS, hub
        spec, base = load_model(hub.upper()), load_model(entry["model"])
        assert spec.name == entry["model"] and spec.source == entry["source"]
        assert spec.blocks == base.blocks and spec.parameters == base.parameters, hub
        assert spec.checkpoint_quantization == entry.get("quantization", base.checkpoint_quantization)
        for key, value in entry.get("overrides", {}).items():
            assert spec.config[key] == value, hub
        assert spec.multimodal == entry.get("multimodal", base.multimodal), hub


def test_served_ids_keep_their_own_config_keys_and_quantization():
    from memfit.models import hub_alias

    instruct, base = load_model("qwen/qwen2.5-7b-instruct"), load_model("Qwen/Qwen2.5-7B")
    assert (instruct.max_position_embeddings, base.max_position_embeddings) == (32768, 131072)
    assert instruct.parameters == base.parameters == 7_615_616_512
    awq = load_model("hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4")
    assert (awq.name, awq.checkpoint_quantization) == ("llama-3.1-8b", "awq")
    assert load_model("meta-llama/Llama-3.1-8B-Instruct").checkpoint_quantization == ""
    assert load_model("Qwen/Qwen2.5-7B-Instruct-GPTQ-Int8").checkpoint_quantization == "gptq-int8"
    assert hub_alias(" neuralmagic/meta-llama-3.1-8b-instruct-fp8 ") == {
        "hub_id": "neuralmagic/Meta-Llama-3.1-8B-Instruct-FP8", "model": "llama-3.1-8b", "quantization": "fp8",
        "source": "https://huggingface.co/neuralmagic/Meta-Llama-3.1-8B-Instruct-FP8",
        "note": "llm-compressor FP8 weights and activations"}
    assert hub_alias("meta-llama/Llama-3.1-8B") is None  # a registry entry's own id, not a served alias
    # the Qwen 72B AWQ/GPTQ repos pad intermediate_size, so they are not aliases of the 72B entry
    assert hub_alias("Qwen/Qwen2.5-72B-Instruct-AWQ") is None
    assert spec_from_config({**TINY["llama"], "quantization_config": {"quant_method": "gptq", "bits": 8}},
                            name="x").checkpoint_quantization == "gptq-int8"


def test_local_file_and_folder(tmp_path):
    config = dict(TINY["llama"], architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_file = load_model(str(tmp_path / "config.json"))
    from_folder = load_model(str(tmp_path))
    assert from_file.parameters == from_folder.parameters == spec_from_config(config, name="x").parameters
    assert from_folder.source == str((tmp_path / "config.json").resolve())

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load_model(str(empty))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(str(tmp_path / "bad.json"))


def test_hub_id_is_fetched_with_huggingface_hub(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    (tmp_path / "config.json").write_text(json.dumps(TINY["olmo2"]))
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(tmp_path / "config.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    spec = load_model("someone/tiny-olmo2-for-memfit-tests")
    assert calls == [("someone/tiny-olmo2-for-memfit-tests", "config.json")]
    assert spec.model_type == "olmo2" and spec.source == "https://huggingface.co/someone/tiny-olmo2-for-memfit-tests"


def test_unknown_model_names_close_builtin_names(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("no network in tests")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelNotFoundError) as err:
        load_model("lama-3.1-8b")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "unknown model 'lama-3.1-8b': not a built-in name, a local config.json, or a reachable Hub id"
    )
    assert "close built-in names: llama-3.1-8b" in message


def test_unknown_model_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ModelNotFoundError, match="close built-in names: qwen2.5-7b"):
        load_model("qwen2.5-7bb")


# -------------------------------------------------------------------------------------- config errors

@pytest.mark.parametrize(("config", "message"), [
    ({"model_type": "llama", "num_hidden_layers": 2}, "has no hidden_size (or n_embd/d_model)"),
    ({"model_type": "llama", "hidden_size": "4096", "num_hidden_layers": 2},
     "hidden_size must be an integer, got '4096'"),
    ({"model_type": "llama", "hidden_size": 4096.0, "num_hidden_layers": 2}, "hidden_size must be an integer"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": True}, "num_hidden_layers must be an integer"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 0}, "num_hidden_layers must be at least 1"),
    ({"model_type": "llama", "hidden_size": 64}, "has no num_hidden_layers"),
    ({"model_type": "llama", "hidden_size": 60, "num_hidden_layers": 2, "num_attention_heads": 8}, "not divisible"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
      "num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"model_type": "foo", "hidden_size": 64}, "model_type 'foo' is not supported; supported: bert, "),
    ({"hidden_size": 64}, "has no model_type"),
    ({**TINY["llama"], "architectures": ["LlamaForTokenClassification"]}, "architecture 'LlamaForTokenClassification'"),
    ({"model_type": "gemma3"}, "needs a text_config"),
    ({**TINY["gemma2"], "layer_types": ["sliding_attention"]}, "layer_types must be a list of 3 strings"),
    ([], "must be a JSON object"),
])
def test_malformed_configs_raise_one_line_config_errors(config, message):
    with pytest.raises(ConfigError) as err:
        spec_from_config(config, name="bad")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ the registry

def test_list_models_covers_the_registry():
    rows = list_models()
    assert len(rows) >= 45
    assert {r["name"] for r in rows} == set(REGISTRY)
    assert all(set(r) == {"name", "model_type", "architecture", "parameters", "hf_id", "source"} for r in rows)
    assert rows == sorted(rows, key=lambda r: (r["model_type"], r["parameters"], r["name"]))
    multimodal = {"gemma3", "llama4"}  # wrappers: their entries report the text model_type
    assert {r["model_type"] for r in rows} >= set(families.SUPPORTED_MODEL_TYPES) - multimodal


def test_registry_files_and_index_agree():
    from memfit.models import _REGISTRY_DIR, _index

    files = {p.stem for p in _REGISTRY_DIR.glob("*.json")} - {"index", "aliases"}
    assert files == set(_index())
    seen: dict[str, str] = {}
    for name, entry in _index().items():
        assert name == name.lower() and " " not in name
        assert entry["hf_id"] and entry["source"].startswith("https://") and entry["note"]
        for alias in (name, entry["hf_id"], *entry.get("aliases", ())):
            assert seen.setdefault(alias.lower(), name) == name, f"{alias} names two entries"


def test_models_package_is_torch_free_and_fast():
    code = (
        "import sys, time\n"
        "import memfit.models as m\n"
        "t = time.perf_counter(); m.load_model('llama-3.1-405b'); m.load_model('deepseek-v3')\n"
        "elapsed = time.perf_counter() - t\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
        "print(elapsed)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 0.02  # two entries, cold: each well under 10 ms


def test_loading_one_entry_is_well_under_10_ms():
    best = float("inf")
    for _ in range(3):
        load_model.cache_clear()
        start = time.perf_counter()
        load_model("llama-3.1-405b")
        best = min(best, time.perf_counter() - start)
    assert best < 0.010
