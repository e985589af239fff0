"""Probe: bytes each decoder layer keeps for backward, per token, by family / precision / kernel.

Runs small random-weight models of each family with 2 and 4 layers on the GPU and records the allocated
bytes at the end of forward (loss computed, outputs dropped), so that (A(4) - A(2)) / 2 / tokens is
the per-layer saved-activation cost. Also records peak per phase. Output: one JSON list on stdout / file.
Used to check the estimator's per-layer accounting (not a validation record).
"""
import json, sys, time, os
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = {
    "llama": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    "qwen3": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000),
    "gemma2": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=32000),
    "gemma3_text": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=32000),
    "gpt2": dict(n_embd=1024, n_head=16, vocab_size=32000, n_positions=2048),
    "gpt_neox": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, vocab_size=32000),
    "opt": dict(hidden_size=1024, ffn_dim=4096, num_attention_heads=16, vocab_size=32000, word_embed_proj_dim=1024),
    "falcon": dict(hidden_size=1024, num_attention_heads=16, vocab_size=32000, new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False),
    "phi3": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000, pad_token_id=0),
    "mixtral": dict(hidden_size=1024, intermediate_size=1408, num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000),
    "qwen2_moe": dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704, shared_expert_intermediate_size=2816, num_experts=8, num_experts_per_tok=2, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    "deepseek_v3": dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=0, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, vocab_size=32000, n_group=1, topk_group=1),
}
LAYER_KEY = {"gpt2": "n_layer"}
DEVICE = "cuda"


def build(mt, layers, dtype, attn):
    kw = dict(FAMILIES[mt]); kw[LAYER_KEY.get(mt, "num_hidden_layers")] = layers
    for k in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        pass
    cfg = AutoConfig.for_model(mt, **kw)
    cfg._attn_implementation = attn
    with torch.device(DEVICE):
        try:
            m = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
        except ValueError:
            m = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager")
    return m


def run(mt, layers, prec, attn, B=2, S=512, ckpt=False, optname="adamw", vocab=None):
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    dtype = {"bf16-true": torch.bfloat16, "32-true": torch.float32, "bf16-mixed": torch.float32}[prec]
    if vocab:
        FAMILIES[mt]["vocab_size"] = vocab
    m = build(mt, layers, dtype, attn); m.train()
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in m.parameters()]
    opt = {"adamw": lambda: torch.optim.AdamW(params, lr=1e-5), "sgd": lambda: torch.optim.SGD(params, lr=1e-5),
           "sgdm": lambda: torch.optim.SGD(params, lr=1e-5, momentum=0.9),
           "adafactor": lambda: torch.optim.Adafactor(params, lr=1e-5),
           "adamw_fused": lambda: torch.optim.AdamW(params, lr=1e-5, fused=True)}[optname]()
    V = m.config.vocab_size
    ids = torch.randint(0, V, (B, S), device="cuda")
    rec = {"family": mt, "layers": layers, "precision": prec, "attn": attn, "B": B, "S": S, "ckpt": ckpt, "opt": optname, "vocab": V}
    W = torch.cuda.memory_allocated(); rec["weights"] = W
    rec["attn_impl"] = m.config._attn_implementation
    rec["param_bytes"] = sum(p.numel() * p.element_size() for p in m.parameters())
    for step in range(2):
        torch.cuda.reset_peak_memory_stats()
        a0 = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec.endswith("mixed")):
            loss = m(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        a1 = torch.cuda.memory_allocated(); p1 = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss.backward(); del loss
        a2 = torch.cuda.memory_allocated(); p2 = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step(); a3 = torch.cuda.memory_allocated(); p3 = torch.cuda.max_memory_allocated()
        opt.zero_grad(set_to_none=True)
        a4 = torch.cuda.memory_allocated()
    rec.update(start=a0, fwd_end=a1, fwd_peak=p1, bwd_end=a2, bwd_peak=p2, step_end=a3, step_peak=p3, after=a4,
               reserved=torch.cuda.memory_reserved())
    del m, opt, ids
    return rec


def main():
    out = []
    t0 = time.time()
    free, total = torch.cuda.mem_get_info()
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "gpu": torch.cuda.get_device_name(),
           "ctx_used_after_init": total - free, "total": total}
    print(json.dumps(env), flush=True)
    plans = []
    for mt in FAMILIES:
        for prec in ("bf16-true", "bf16-mixed", "32-true"):
            for L in (2, 4):
                plans.append((mt, L, prec, "sdpa", False))
        for L in (2, 4):
            plans.append((mt, L, "bf16-true", "eager", False))
            plans.append((mt, L, "bf16-true", "sdpa", True))
    for o in ("sgd", "sgdm", "adafactor", "adamw_fused"):
        for prec in ("bf16-true", "32-true"):
            plans.append(("llama", 2, prec, "sdpa", False, o))
    for prec in ("bf16-true", "bf16-mixed", "32-true"):
        plans.append(("llama", 2, prec, "sdpa", False, "adamw", 128256))
    plans.append(("llama", 2, "bf16-true", "sdpa", False, "adamw", 32000))
    for p in plans:
        try:
            r = run(*p[:4], ckpt=p[4], optname=(p[5] if len(p) > 5 else "adamw"), vocab=(p[6] if len(p) > 6 else None))
        except Exception as e:  # noqa
            r = {"family": p[0], "layers": p[1], "precision": p[2], "attn": p[3], "ckpt": p[4], "error": repr(e)[:300]}
        out.append(r)
        print(json.dumps(r), flush=True)
    free, total = torch.cuda.mem_get_info()
    env["end_used"] = total - free
    env["wall_s"] = time.time() - t0
    path = os.path.join(os.environ.get("OUT", "."), "layer_probe.json")
    json.dump({"env": env, "runs": out}, open(path, "w"), indent=1)
    print("wrote", path, env["wall_s"])


if __name__ == "__main__":
    main()
