"""The reference run's building blocks on tiny models, on the CPU (exact: dtypes, shapes, states, phases)."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memfit import reference as R  # noqa: E402
from memfit.errors import JobError, MissingDependencyError  # noqa: E402
from memfit.job import Job  # noqa: E402

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
         "max_position_embeddings": 256, "torch_dtype": "bfloat16"}
GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "n_head": 4,
        "n_positions": 128, "vocab_size": 256}


def spec(config=LLAMA, head=None):
    return R.spec_from_config(dict(config), name="tiny", head=head)


def job(**kw):
    base = {"model": "tiny", "seq_len": 16, "batch_size": 2}
    base.update(kw)
    return Job(**base)


# ------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("precision, dtype", [("32-true", torch.float32), ("bf16-mixed", torch.float32),
                                              ("16-mixed", torch.float32), ("bf16-true", torch.bfloat16),
                                              ("16-true", torch.float16)])
def test_weights_are_stored_in_the_precisions_dtype(precision, dtype):
    m = R.build_model(job(precision=precision), spec(), "cpu")
    assert {p.dtype for p in m.parameters()} == {dtype}
    assert m.training


def test_the_config_is_used_as_configured_and_use_cache_is_off_for_training():
    m = R.build_model(job(attention="eager"), spec(), "cpu")
    assert m.config._attn_implementation == "eager"
    assert m.config.use_cache is False
    assert m.config.vocab_size == 256 and m.config.num_hidden_layers == 2
    inf = R.build_model(job(task="infer"), spec(), "cpu")
    assert not inf.training


def test_gradient_checkpointing_is_enabled():
    m = R.build_model(job(gradient_checkpointing=True), spec(), "cpu")
    on = getattr(m, "is_activation_checkpointing", None)
    assert on if on is not None else m.is_gradient_checkpointing


def test_lora_trains_only_the_adapters():
    m = R.build_model(job(method="lora", lora_rank=4), spec(), "cpu")
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: 7 linears per llama layer (q k v o gate up down), A and B each, 2 layers
    assert len(trainable) == 7 * 2 * 2
    assert m.peft_config["default"].lora_alpha == 8  # alpha defaults to 2 r


def test_lora_with_a_target_list_and_a_seq_cls_head():
    cfg = dict(LLAMA, architectures=["LlamaForSequenceClassification"], num_labels=3)
    s = spec(cfg)
    assert s.head == "seq_cls" and s.num_labels == 3
    m = R.build_model(job(method="lora", lora_targets=["q_proj", "v_proj"]), s, "cpu")
    lora = [n for n, p in m.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(lora) == 2 * 2 * 2
    batch = R.make_batch(job(), s, "cpu")
    assert batch["labels"].shape == (2,) and int(batch["labels"].max()) < 3
    loss = R.train_step(job(method="lora"), m, R.make_optimizer(job(method="lora"), m), batch)
    assert torch.isfinite(loss)


def test_unsupported_fields_are_refused_before_building():
    with pytest.raises(JobError, match="one device"):
        R.build_model(job(gpus=2), spec(), "cpu")
    with pytest.raises(JobError, match="pre-quantized"):
        R.build_model(job(task="infer", quantization="gptq"), spec(), "cpu")
    with pytest.raises(JobError, match="kv_cache_dtype"):
        R.build_model(job(task="infer", kv_cache_dtype="fp8"), spec(), "cpu")


def test_quantized_bases_need_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="bitsandbytes"):
            R.build_model(job(method="qlora"), spec(), "cpu")
    else:  # pragma: no cover - the quantized path runs on a GPU only
        pytest.skip("bitsandbytes is installed; its path is exercised on a GPU")


# ------------------------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("name, cls", [("adamw", "AdamW"), ("adam", "Adam"), ("sgd", "SGD"),
                                       ("sgd-momentum", "SGD"), ("adafactor", "Adafactor"), ("lion", "Lion")])
def test_optimizers_are_the_named_ones(name, cls):
    j = job(optimizer=name)
    m = R.build_model(j, spec(), "cpu")
    opt = R.make_optimizer(j, m)
    assert type(opt).__name__ == cls
    momentum = opt.param_groups[0].get("momentum")
    if name == "sgd":
        assert momentum == 0
    if name == "sgd-momentum":
        assert momentum == 0.9


def test_lion_keeps_one_state_per_parameter_in_its_dtype():
    j = job(optimizer="lion", precision="bf16-true")
    m = R.build_model(j, spec(), "cpu")
    opt = R.make_optimizer(j, m)
    before = [p.detach().clone() for p in m.parameters()]
    R.train_step(j, m, opt, R.make_batch(j, spec(), "cpu"))
    params = list(m.parameters())
    assert len(opt.state) == len(params)
    for p in params:
        st = opt.state[p]
        assert list(st) == ["exp_avg"]
        assert st["exp_avg"].dtype == p.dtype == torch.bfloat16 and st["exp_avg"].shape == p.shape
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_bitsandbytes_optimizers_need_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        m = R.build_model(job(), spec(), "cpu")
        with pytest.raises(MissingDependencyError, match="bitsandbytes"):
            R.make_optimizer(job(optimizer="adamw-8bit"), m)
    else:  # pragma: no cover
        pytest.skip("bitsandbytes is installed")


# ------------------------------------------------------------------------------------------- batch, steps
def test_batch_is_seeded_random_ids_with_labels_equal_to_ids():
    a = R.make_batch(job(), spec(), "cpu")
    b = R.make_batch(job(), spec(), "cpu")
    assert a["input_ids"].shape == (2, 16) and a["input_ids"].dtype == torch.int64
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert a["labels"] is a["input_ids"]
    assert int(a["input_ids"].max()) < 256
    inf = R.make_batch(job(task="infer", prompt_len=8), spec(), "cpu")
    assert set(inf) == {"input_ids"} and inf["input_ids"].shape == (2, 8)


class Phases:
    def __init__(self):
        self.seen = []
        self.caches = []

    def on_phase(self, name):
        self.seen.append(name)

    def on_decode_step(self, cache):
        self.caches.append(sum(t.numel() for t in R.cache_tensors(cache)))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
def test_train_step_phases_and_state(precision):
    j = job(precision=precision)
    m = R.build_model(j, spec(), "cpu")
    opt = R.make_optimizer(j, m)
    hooks = Phases()
    loss = R.train_step(j, m, opt, R.make_batch(j, spec(), "cpu"), R.make_grad_scaler(j, "cpu"), hooks=hooks)
    assert hooks.seen == ["forward", "backward", "optimizer_step", "end"]
    assert not loss.requires_grad and torch.isfinite(loss)
    assert all(p.grad is None for p in m.parameters())  # zero_grad(set_to_none=True)
    assert len(opt.state) == len(list(m.parameters()))
    assert (R.make_grad_scaler(j, "cpu") is not None) == (precision == "16-mixed")


def test_gpt2_trains_and_generates():
    s = spec(GPT2)
    j = job(method="lora")
    m = R.build_model(j, s, "cpu")
    R.train_step(j, m, R.make_optimizer(j, m), R.make_batch(j, s, "cpu"))
    ji = job(task="infer", prompt_len=8, new_tokens=3)
    hooks = Phases()
    R.infer(ji, R.build_model(ji, s, "cpu"), R.make_batch(ji, s, "cpu"), hooks=hooks)
    assert hooks.seen == ["prefill", "decode", "end"]


def test_infer_phases_and_the_kv_cache_seen_while_decoding():
    j = job(task="infer", prompt_len=8, new_tokens=4, precision="bf16-true")
    m = R.build_model(j, spec(), "cpu")
    hooks = Phases()
    R.infer(j, m, R.make_batch(j, spec(), "cpu"), hooks=hooks)
    assert hooks.seen == ["prefill", "decode", "end"]
    # one call per generated token; the cache holds prompt + earlier tokens:
    # 2 layers x (k, v) x batch 2 x 2 kv heads x head_dim 16 = 256 elements per token
    assert hooks.caches == [256 * (8 + i) for i in range(4)]
    one = Phases()
    R.infer(job(task="infer", prompt_len=8), m, R.make_batch(job(task="infer", prompt_len=8), spec(), "cpu"),
            hooks=one)
    assert one.seen == ["prefill", "end"]


def test_generate_runs_unpadded_even_when_the_prompt_holds_the_pad_id():
    # generate() infers a padding mask from pad_token_id=0 when token 0 occurs in the prompt; the reference
    # prompt is unpadded, so every call of the model sees an all-ones mask (no padded sdpa path)
    j = job(task="infer", prompt_len=8, new_tokens=2, precision="bf16-true")
    m = R.build_model(j, spec(), "cpu")
    batch = R.make_batch(j, spec(), "cpu")
    batch["input_ids"][0, 3] = 0
    batch["input_ids"][1, 0] = 0
    masks = []
    handle = m.register_forward_pre_hook(lambda mod, args, kw: masks.append(kw.get("attention_mask")),
                                         with_kwargs=True)
    try:
        R.infer(j, m, batch)
    finally:
        handle.remove()
    assert len(masks) == 2  # the prefill and one decode step
    assert all(mk is not None and bool((mk == 1).all()) for mk in masks)


def test_forward_loss_protocol_for_plain_modules():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(256, 8)

        def forward(self, ids):
            return self.emb(ids)

    ids = torch.randint(0, 256, (2, 4))
    loss = R.forward_loss(Plain(), {"input_ids": ids, "labels": ids})
    assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.requires_grad


# ------------------------------------------------------------------------------------------- imports
def test_importing_reference_and_measurer_does_not_import_torch():
    code = ("import sys, memfit.reference, memfit.measurer, memfit.commands.measure; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_missing_torch_raises_the_install_line():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from memfit import reference\n"
            "from memfit.errors import MissingDependencyError\n"
            "try:\n    reference.require_torch()\nexcept MissingDependencyError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "torch is not installed; install it with: pip install 'memfit[measure]'"


def test_masked_lm_head_trains_with_labels_equal_to_ids():
    cfg = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 64}
    s = spec(cfg, head="masked_lm")
    for method in ("full", "lora"):
        j = job(method=method)
        m = R.build_model(j, s, "cpu")
        assert "MaskedLM" in type(m.get_base_model() if method == "lora" else m).__name__
        hooks = Phases()
        loss = R.train_step(j, m, R.make_optimizer(j, m), R.make_batch(j, s, "cpu"), hooks=hooks)
        assert torch.isfinite(loss) and hooks.seen[-1] == "end"


def test_seq_cls_lora_all_linear_leaves_the_head_to_modules_to_save():
    """DistilBERT's head (pre_classifier, classifier) would get adapters and a full copy; PEFT refuses both."""
    cfg = {"model_type": "distilbert", "architectures": ["DistilBertForSequenceClassification"], "dim": 64,
           "hidden_dim": 128, "n_layers": 2, "n_heads": 4, "vocab_size": 256, "max_position_embeddings": 64}
    s = spec(cfg)
    j = job(method="lora")
    m = R.build_model(j, s, "cpu")
    lora = {n for n, p in m.named_parameters() if "lora_" in n}
    assert lora and not any("classifier" in n for n in lora)
    assert any("classifier" in n and p.requires_grad for n, p in m.named_parameters())
    R.train_step(j, m, R.make_optimizer(j, m), R.make_batch(j, s, "cpu"))


def test_a_gemma2_training_copy_saves(tmp_path):
    # the QLoRA load saves a 16-bit copy and reloads it quantized; Gemma 2's hybrid-cache generation config
    # with training's use_cache=False made save_pretrained refuse (the gemma-2-2b QLoRA plan candidate failed)
    from memfit.job import Job
    from memfit.models import load_model
    from memfit.reference import _head_class, build_config, savable_generation_config

    job = Job(model="gemma-2-2b", method="qlora", batch_size=1, seq_len=64)
    spec = load_model("gemma-2-2b")
    cfg = build_config(job, spec)
    cfg.num_hidden_layers, cfg.layer_types = 2, cfg.layer_types[:2]
    cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size = 256, 64, 128
    model = _head_class(spec).from_config(cfg)
    savable_generation_config(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()
