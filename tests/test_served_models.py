"""The served families added for issue 13: ``estimate`` runs for each new registry entry, LoRA training and
inference, and its numbers are the model's own.

Exact checks (no tolerance): bf16 weights are 2 bytes per parameter; the KV cache after prefill (one new
token) is the hand count from the entry's ``config.json`` (2 x kv heads x head_dim x 2 bytes per token and
layer, sliding-window and chunked layers capped at their window, as transformers 5.17's ``DynamicCache``
keeps them), so a misread layer pattern (gpt-oss's alternating 128-token windows, Llama 4's chunked / NoPE
layers) fails it; LoRA trainable counts equal PEFT 0.21's on tiny configs of the three new MoE families.
Plausibility checks for training (bounds, not golden numbers): LoRA trains under 10% of the parameters
(PEFT wraps fused experts too in Mixtral-style families, which lifts small-expert models to a few percent),
activations are positive, weights hold at least 2 bytes per parameter.
"""

from __future__ import annotations

import json

import pytest

from memfit import Job
from memfit.estimator import estimate
from memfit.models import _REGISTRY_DIR, load_model

NEW_ENTRIES = [
    "llama-3-8b", "llama-3-70b", "llama-3.3-70b", "mistral-7b-v0.2", "mistral-small-24b", "phi-4",
    "granite-3.1-2b", "granite-3.1-8b", "granite-3.1-1b-a400m", "granite-3.1-3b-a800m",
    "deepseek-r1-distill-qwen-1.5b", "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-qwen-14b",
    "deepseek-r1-distill-qwen-32b", "deepseek-r1-distill-llama-8b", "deepseek-r1-distill-llama-70b",
    "gpt-oss-20b", "gpt-oss-120b", "llama-4-scout-17b-16e", "mixtral-8x22b-instruct", "qwen3-coder-480b-a35b",
]
PROMPT = 9216  # longer than gpt-oss's 128-token window and Llama 4's 8192-token chunks


def _kv_by_hand(name: str, tokens: int) -> int:
    """Prefill KV-cache bytes (bf16) straight from the registry config.json, one layer at a time. Right after
    the prefill every layer holds the whole prompt: transformers 5.17's ``DynamicSlidingWindowLayer.update``
    keeps a view of the ``torch.cat`` result, so the window applies from the first decode step on (issue 15)."""
    config = json.loads((_REGISTRY_DIR / f"{name}.json").read_text())
    config = config.get("text_config", config)
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if config["model_type"] == "gpt_oss":
        windows = [config["sliding_window"] if t == "sliding_attention" else None for t in config["layer_types"]]
    elif config["model_type"] == "llama4_text":  # every 4th layer global (NoPE), the rest chunked
        windows = [None if (i + 1) % 4 == 0 else config["attention_chunk_size"] for i in range(layers)]
    elif config["model_type"] in ("mistral", "phi3") and config.get("sliding_window"):
        windows = [config["sliding_window"]] * layers
    else:
        windows = [None] * layers
    assert len(windows) == layers
    return sum(2 * kv * head_dim * 2 * tokens for _ in windows)


@pytest.mark.parametrize("name", NEW_ENTRIES)
def test_new_entry_inference_estimate(name):
    spec = load_model(name)
    result = estimate(Job(model=name, task="infer", precision="bf16-true", prompt_len=PROMPT, new_tokens=1))
    assert result.parameters == spec.parameters
    assert result.components["weights"] == 2 * spec.parameters
    assert result.components["kv_cache"] == _kv_by_hand(name, PROMPT)
    assert result.peak_allocated_bytes >= sum(result.components.values()) - 1


@pytest.mark.parametrize("name", NEW_ENTRIES)
def test_new_entry_lora_training_estimate(name):
    spec = load_model(name)
    result = estimate(Job(model=name, task="train", method="lora", seq_len=1024, gradient_checkpointing=True))
    assert 0 < result.trainable_parameters < 0.1 * spec.parameters  # fused experts get adapters too
    assert result.components["lora_adapters"] > 0 and result.components["activations"] > 0
    assert result.peak_allocated_bytes > result.components["weights"] >= 2 * spec.parameters


def test_llama4_routes_every_token_through_every_expert_and_gpt_oss_runs_eagerly():
    """Llama 4's transformers MoE computes all 16 experts per token: its activations must exceed what a
    top-1 router would keep. gpt-oss has no sdpa path: asking for sdpa gives the eager estimate."""
    base = dict(model="llama-4-scout-17b-16e", task="train", method="lora", seq_len=512)
    scout = load_model("llama-4-scout-17b-16e")
    from dataclasses import replace

    top1 = replace(scout, blocks=tuple(replace(b, moe=replace(b.moe, all_experts=False)) if b.moe else b
                                       for b in scout.blocks))
    assert estimate(Job(**base)).components["activations"] > estimate(Job(**base), top1).components["activations"]
    oss = dict(model="gpt-oss-20b", task="train", method="lora", seq_len=1024)
    assert estimate(Job(**oss, attention="sdpa")).peak_allocated_bytes == \
        estimate(Job(**oss, attention="eager")).peak_allocated_bytes
    assert estimate(Job(**oss, attention="flash")).peak_allocated_bytes < \
        estimate(Job(**oss, attention="eager")).peak_allocated_bytes


@pytest.mark.parametrize("model_type, kw", [
    ("gpt_oss", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
    ("llama4_text", dict(head_dim=16, intermediate_size_mlp=96, num_local_experts=4)),
    ("granitemoe", dict(num_local_experts=4, num_experts_per_tok=2)),
])
def test_lora_all_linear_trainable_count_matches_peft(model_type, kw):
    """PEFT 0.21 wraps only these families' nn.Linear modules under all-linear (their fused experts are not
    in its v4 -> v5 MoE conversion table): memfit's trainable count must equal PEFT's exactly."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoConfig, AutoModelForCausalLM

    from memfit.estimator import states as st
    from memfit.models import spec_from_config

    cfg = AutoConfig.for_model(model_type, num_hidden_layers=2, hidden_size=64, intermediate_size=48,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128, **kw)
    spec = spec_from_config(cfg.to_dict() | {"architectures": None}, name="tiny")
    model = AutoModelForCausalLM.from_config(cfg)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert st.trainable_params(spec, Job(model="tiny", method="lora", lora_rank=4)) == trainable


# ------------------------------------------------------------------ vision towers (memfit.models.vision)
def _tower_params_by_transformers(config: dict) -> int:
    """Parameters of ``vision_tower`` and ``multi_modal_projector`` of the real transformers class, built
    on the meta device from the same config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    conf = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(conf)
    keep = ("vision_tower", "vision_model", "multi_modal_projector")
    return sum(p.numel() for n, p in model.named_parameters() if any(k in n.split(".") for k in keep))


@pytest.mark.parametrize("name", ["gemma-3-4b", "gemma-3-27b", "mistralai/Mistral-Small-3.2-24B-Instruct-2506",
                                  "llama-4-scout-17b-16e"])
def test_vision_tower_params_match_transformers(name):
    from memfit.models.vision import vision_tower

    spec = load_model(name)
    assert spec.multimodal.get("vision_config"), "the multimodal keys reach the spec"
    tower = vision_tower(spec.multimodal, spec.hidden_size)
    want = _tower_params_by_transformers({**spec.multimodal, "text_config": spec.config})
    assert tower.params == want
    assert tower.params_on_rank(2) < tower.params  # the encoder's linears split over TP


def test_vision_tower_llava_clip_and_siglip_head():
    """LLaVA's CLIP tower and projector, and a SigLIP tower with its attention-pooling head."""
    transformers = pytest.importorskip("transformers")
    from memfit.models.vision import vision_tower

    conf = transformers.LlavaConfig().to_dict()
    text = conf.pop("text_config")
    assert vision_tower(conf, text["hidden_size"]).params == _tower_params_by_transformers({**conf, "text_config": text})
    mm = {"model_type": "gemma3", "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 64,
          "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 8,
          "image_size": 32, "vision_use_head": True}}
    text = {"model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 300}
    assert vision_tower(mm, 32).params == _tower_params_by_transformers({**mm, "text_config": text, "mm_tokens_per_image": 4})


def test_vision_tower_absent_and_unknown():
    from memfit.errors import ConfigError
    from memfit.models.vision import vision_tower

    assert vision_tower({}, 4096) is None
    assert load_model("llama-3-8b").multimodal == {}
    mystery = {"model_type": "gemma3", "vision_config": {"model_type": "mystery_vit"}}
    with pytest.raises(ConfigError, match="not counted"):
        vision_tower(mystery, 2560)
    assert vision_tower(mystery, 2560, strict=False) is None
    with pytest.raises(ConfigError, match="whole number"):
        vision_tower({"model_type": "gemma3", "vision_config": {"model_type": "siglip_vision_model",
                                                                 "hidden_size": "wide"}}, 2560, strict=False)
