"""The reference run: the one training step and the one inference call that memfit's numbers describe.

DESIGN.md defines it: a Hugging Face ``transformers`` model in a plain PyTorch loop - forward with labels (the
model computes the loss), backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)`` - and, for inference,
``generate()`` with the default dynamic cache or one forward over the prompt. ``measure`` runs these functions
on a real device; ``trace`` runs the same functions on fake tensors. So they are device-agnostic: the device is
an argument, nothing here calls ``.cuda()`` or ``torch.cuda`` (the bitsandbytes base, which only exists on a
GPU, is the one exception and is kept in :func:`_build_quantized_base`).

torch, transformers and peft are imported inside the functions; importing this module is cheap.

The ``spec`` argument is a :class:`memfit.models.ModelSpec` or anything with the same few attributes:
``config`` (the raw config.json dict), ``head`` (``causal_lm``, ``seq_cls`` or ``masked_lm``), ``vocab_size``,
``num_labels`` and ``name``.

Phase hooks: :func:`train_step` and :func:`infer` accept ``hooks``, any object with an ``on_phase(name)``
method. It is called at each phase boundary, before the phase starts:

- training: ``forward`` (the forward pass, the loss included), ``backward``, ``optimizer_step`` (the step and
  ``zero_grad``), then ``end``;
- inference: ``prefill`` (the forward over the prompt), ``decode`` (called when the first token's logits are
  ready, so it covers every later token), then ``end``. During ``generate`` the hooks object may also have
  ``on_decode_step(cache)``, called once per generated token with the model's KV cache object (or None).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Iterator

from .errors import JobError, MissingDependencyError
from .job import Job

__all__ = [
    "require_torch", "weight_dtype", "autocast_dtype", "build_config", "build_model", "make_optimizer",
    "make_batch", "train_step", "infer", "forward_loss", "cache_tensors", "ConfigSpec", "spec_from_config",
    "ATTN_IMPLEMENTATIONS", "quiet_libraries",
]

TORCH_MISSING = "torch is not installed; install it with: pip install 'memfit[measure]'"

#: job.attention -> transformers' ``attn_implementation``.
ATTN_IMPLEMENTATIONS = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}

#: Storage dtype of the weights for each precision (Lightning's meaning): the ``*-mixed`` precisions keep
#: fp32 weights and compute under autocast; the ``*-true`` precisions store the weights in that dtype.
_WEIGHT_DTYPE = {"32-true": "float32", "16-mixed": "float32", "bf16-mixed": "float32",
                 "bf16-true": "bfloat16", "16-true": "float16"}
_AUTOCAST_DTYPE = {"16-mixed": "float16", "bf16-mixed": "bfloat16"}

#: Learning rate of every reference optimizer; it changes no memory, it only keeps the update finite.
LR = 1e-5


# --------------------------------------------------------------------------------------------- imports
def require_torch():
    """Import torch or raise :class:`MissingDependencyError` with the install line."""
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(TORCH_MISSING) from exc
    return torch


def _require(module: str, install: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{module} is not installed; install it with: {install}") from exc


def _transformers():
    return _require("transformers", "pip install 'memfit[measure]'")


def _peft():
    return _require("peft", "pip install 'memfit[measure]'")


def _bitsandbytes():
    return _require("bitsandbytes", "pip install bitsandbytes (it needs a CUDA GPU)")


# --------------------------------------------------------------------------------------------- dtypes
def weight_dtype(precision: str):
    """torch dtype the weights are stored in for a Lightning precision name."""
    torch = require_torch()
    return getattr(torch, _WEIGHT_DTYPE[precision])


def autocast_dtype(precision: str):
    """torch dtype autocast computes in for ``*-mixed`` precisions; None for ``*-true`` (no autocast)."""
    torch = require_torch()
    name = _AUTOCAST_DTYPE.get(precision)
    return getattr(torch, name) if name else None


def _autocast(device_type: str, precision: str):
    torch = require_torch()
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


@contextlib.contextmanager
def quiet_libraries(caught: list[str]) -> Iterator[None]:
    """Keep transformers' log and Python warnings off the terminal while the reference run runs (measure and
    trace both wrap it in this); append each warning's first line (200 characters), once, to ``caught``, up
    to 20 lines."""
    verbosity = None
    try:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        hf_logging = None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in seen:
                text = str(w.message).strip()
                line = f"{w.category.__name__}: {text.splitlines()[0][:200] if text else ''}"
                if line not in caught and len(caught) < 20:
                    caught.append(line)
            if hf_logging is not None and verbosity is not None:
                hf_logging.set_verbosity(verbosity)


def _phase(hooks: Any, name: str) -> None:
    if hooks is not None:
        hooks.on_phase(name)


# --------------------------------------------------------------------------------------------- spec
class ConfigSpec:
    """The few facts of a model the reference run needs, read from a config.json dict.

    A stand-in for :class:`memfit.models.ModelSpec` where only the config is at hand (tests, a local
    config.json while the registry is not importable). It counts no parameters: ``parameters`` is None and
    the engines count them on the built model.
    """

    __slots__ = ("name", "config", "head", "model_type", "architecture", "vocab_size", "num_labels", "parameters")

    def __init__(self, config: dict[str, Any], name: str = "", head: str | None = None) -> None:
        if not isinstance(config, dict) or "model_type" not in config:
            raise JobError(f"{name or 'the model'}: config.json needs a model_type")
        self.config = dict(config)
        self.name = name or config.get("_name_or_path") or config["model_type"]
        self.model_type = config["model_type"]
        archs = config.get("architectures") or []
        self.architecture = archs[0] if archs else ""
        if head is None:
            head = "seq_cls" if self.architecture.endswith("ForSequenceClassification") else "causal_lm"
        self.head = head
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        self.vocab_size = int(text.get("vocab_size") or config.get("vocab_size") or 0)
        labels = config.get("id2label")
        self.num_labels = int(config.get("num_labels") or (len(labels) if labels else 2))
        self.parameters = None

    def __repr__(self) -> str:
        return f"ConfigSpec(name={self.name!r}, model_type={self.model_type!r}, head={self.head!r})"


def spec_from_config(config: dict[str, Any], name: str = "", head: str | None = None) -> ConfigSpec:
    """A :class:`ConfigSpec` from a raw config.json dict."""
    return ConfigSpec(config, name=name, head=head)


# --------------------------------------------------------------------------------------------- model
def check_supported(job: Job) -> None:
    """Raise :class:`JobError` for job fields the single-device reference run cannot reproduce."""
    if job.gpus > 1 or job.strategy != "single":
        raise JobError(f"the reference run uses one device; {job.gpus} GPUs with {job.strategy} are not measured "
                       "yet (use memfit estimate for multi-GPU jobs)")
    if job.offload != "none":
        raise JobError(f"offload {job.offload!r} is not part of the single-device reference run; use offload: none")
    if job.quantization in ("nf4", "fp4") and job.quant_group_size != 64:
        raise JobError(f"bitsandbytes (through transformers) quantizes 4-bit weights in blocks of 64; "
                       f"quant_group_size {job.quant_group_size} cannot be reproduced (use 64)")
    if job.quantization in ("fp8", "gptq", "awq"):
        raise JobError(f"{job.quantization} weights need a pre-quantized checkpoint; the reference run builds random "
                       "weights and can quantize only with bitsandbytes (int8, nf4, fp4)")
    if job.task == "infer" and job.kv_cache_dtype not in ("auto", _kv_dtype_name(job.precision)):
        raise JobError(f"the reference run keeps the default dynamic cache in the compute dtype; kv_cache_dtype "
                       f"{job.kv_cache_dtype} is not measured (use kv_cache_dtype: auto)")


def _kv_dtype_name(precision: str) -> str:
    return {"32-true": "fp32", "16-mixed": "fp16", "16-true": "fp16"}.get(precision, "bf16")


def build_config(job: Job, spec: Any):
    """The transformers config object for ``spec``: the config.json as it is, plus what the job decides."""
    transformers = _transformers()
    raw = _text_part(dict(spec.config)) if spec.head == "causal_lm" else dict(spec.config)
    model_type = raw.pop("model_type", None) or getattr(spec, "model_type", None)
    if not model_type:
        raise JobError(f"{spec.name}: config.json has no model_type; transformers cannot build it")
    try:
        config = transformers.AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError) as exc:
        raise JobError(f"{spec.name}: transformers {transformers.__version__} cannot build a {model_type!r} "
                       f"config ({exc}); upgrade transformers") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if spec.head == "seq_cls":
        config.num_labels = int(getattr(spec, "num_labels", 2) or 2)
        if getattr(text, "pad_token_id", None) is None:
            # Sequence classification pools the last non-pad token and refuses batches > 1 without a pad id.
            # Which token id it is changes no memory.
            text.pad_token_id = 0
            config.pad_token_id = 0
    if job.task == "train":
        # Training never needs the KV cache; with use_cache on, a forward would build one and keep it.
        config.use_cache = False
        text.use_cache = False
    return config


def _text_part(raw: dict[str, Any]) -> dict[str, Any]:
    """A multimodal config's language model (Gemma 3's ``text_config``): what memfit counts and measures.

    A ``*ForConditionalGeneration`` config holding a ``text_config`` is built as its text-only causal LM (no
    vision tower); the top-level dtype carries over.
    """
    text = raw.get("text_config")
    archs = raw.get("architectures") or []
    if not isinstance(text, dict) or not any("ForConditionalGeneration" in str(a) for a in archs):
        return raw
    text = dict(text)
    if raw.get("model_type") == "gemma3":
        text.setdefault("model_type", "gemma3_text")
    if "model_type" not in text:
        return raw
    for key in ("torch_dtype", "dtype"):
        if key in raw and key not in text:
            text[key] = raw[key]
    return text


def _head_class(spec: Any):
    transformers = _transformers()
    if spec.head == "causal_lm":
        return transformers.AutoModelForCausalLM
    if spec.head == "seq_cls":
        return transformers.AutoModelForSequenceClassification
    if spec.head == "masked_lm":
        return transformers.AutoModelForMaskedLM
    raise JobError(f"{spec.name}: the reference run needs a causal_lm, seq_cls or masked_lm head, not {spec.head!r}")


def _attn_implementation(job: Job) -> str:
    impl = ATTN_IMPLEMENTATIONS[job.attention]
    if impl == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise MissingDependencyError("flash-attn is not installed; install it with: pip install flash-attn "
                                         "(CUDA only), or use attention: sdpa")
    return impl


def build_model(job: Job, spec: Any, device: Any, *, user_model: Any = None):
    """The reference model on ``device``, with random weights (nothing is downloaded).

    - the class follows ``spec.head`` (``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` /
      ``AutoModelForMaskedLM``),
      built ``from_config`` directly on ``device`` in the storage dtype of ``job.precision``
      (fp32 for ``32-true`` and ``*-mixed``, bf16 for ``bf16-true``, fp16 for ``16-true``);
    - the config is used as configured (dropout kept); ``attn_implementation`` follows ``job.attention``;
      training sets ``use_cache=False`` and ``model.train()``, inference ``model.eval()``;
    - gradient checkpointing is the non-reentrant kind;
    - ``int8``/``nf4``/``fp4`` bases are quantized by bitsandbytes through transformers' own loading path
      (CUDA only); QLoRA training then runs ``peft.prepare_model_for_kbit_training`` (which upcasts the
      non-quantized 16-bit parameters to fp32, as the usual QLoRA recipe does);
    - LoRA wraps the model with ``peft.get_peft_model`` (``lora_dropout=0``; PEFT keeps the adapters in fp32
      when the base is 16-bit, its default ``autocast_adapter_dtype``).

    ``user_model`` (an ``nn.Module``) replaces the built model: it is moved to ``device``, cast to the
    storage dtype for the ``*-true`` 16-bit precisions, and gets gradient checkpointing (if it supports it)
    and LoRA (unless it already is a PEFT model) as the job says. It is not quantized.
    """
    torch = require_torch()
    check_supported(job)
    training = job.task == "train"
    quantized = job.quantization in ("int8", "nf4", "fp4")
    if user_model is not None:
        model = _prepare_user_model(job, user_model, device)
    elif quantized:
        model = _build_quantized_base(job, spec, device)
    else:
        config = build_config(job, spec)
        cls = _head_class(spec)
        with torch.device(device):
            model = cls.from_config(config, dtype=weight_dtype(job.precision),
                                    attn_implementation=_attn_implementation(job))
    if training:
        if quantized and user_model is None:
            peft = _peft()
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=job.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        elif job.gradient_checkpointing:
            _enable_checkpointing(model)
    if job.is_lora and not _is_peft_model(model):
        model = _apply_lora(job, spec, model, device)
    model.train(training)  # dropout as configured; transformers checkpoints layers only in training mode
    return model


def _enable_checkpointing(model: Any) -> None:
    """Non-reentrant checkpointing of every decoder layer (transformers' own switch, under either name)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise JobError("gradient_checkpointing needs a transformers model (gradient_checkpointing_enable()); "
                       "turn it off for this module")


def _is_peft_model(model: Any) -> bool:
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


def _prepare_user_model(job: Job, model: Any, device: Any):
    torch = require_torch()
    if not isinstance(model, torch.nn.Module):
        raise JobError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    model = model.to(device)
    if job.precision in ("bf16-true", "16-true"):
        model = model.to(weight_dtype(job.precision))
    if job.task == "train" and hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False
    return model


def _apply_lora(job: Job, spec: Any, model: Any, device: Any):
    torch = require_torch()
    peft = _peft()
    head = getattr(spec, "head", "causal_lm") if spec is not None else "causal_lm"
    # PEFT has no masked-LM task type: a plain LoRA model (task_type None) wraps it.
    task_type = {"seq_cls": peft.TaskType.SEQ_CLS, "masked_lm": None}.get(head, peft.TaskType.CAUSAL_LM)
    targets = job.lora_targets if job.lora_targets == "all-linear" else list(job.lora_targets)
    extra: dict[str, Any] = {}
    if head == "seq_cls" and targets == "all-linear":
        # PEFT trains the classification head in full (modules_to_save = classifier / score); all-linear would
        # also put adapters on it, which PEFT refuses (DistilBERT, RoBERTa). PEFT matches modules_to_save by
        # suffix, so DistilBERT's pre_classifier is trained in full too. The head keeps no adapters.
        extra["exclude_modules"] = r"(.*\.)?\w*(classifier|score)(\..*)?"
    config = peft.LoraConfig(r=job.lora_rank, lora_alpha=job.lora_alpha or 2 * job.lora_rank, lora_dropout=0.0,
                             target_modules=targets, task_type=task_type, **extra)
    try:
        with torch.device(device):
            return peft.get_peft_model(model, config)
    except ValueError as exc:
        raise JobError(f"LoRA targets {targets!r} do not fit this model: {str(exc).splitlines()[0]}") from None


def _build_quantized_base(job: Job, spec: Any, device: Any):
    """An int8 / nf4 / fp4 base quantized by bitsandbytes, as ``from_pretrained(quantization_config=...)`` does.

    bitsandbytes quantizes while loading a checkpoint, so this writes the random weights (built on the CPU in
    the storage dtype) to a temporary folder with ``save_pretrained`` and loads them back with a
    ``BitsAndBytesConfig``: the quantized layers, their quantization state and the modules transformers
    leaves unquantized (the lm_head) are exactly what a user loading a real checkpoint gets. The temporary
    folder needs disk for the model in 16 bits (16 GB for an 8B model) and the CPU needs it in RAM once.
    """
    torch = require_torch()
    transformers = _transformers()
    _bitsandbytes()
    import tempfile

    four_bit = job.quantization in ("nf4", "fp4")
    # Compute dtype of the quantized matmuls: fp16 for the fp16 precisions, else bf16 (QLoRA's choice).
    compute = torch.float16 if job.precision in ("16-mixed", "16-true") else torch.bfloat16
    if four_bit:
        qconfig = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=job.quantization, bnb_4bit_use_double_quant=job.double_quant,
            bnb_4bit_compute_dtype=compute)
    else:
        qconfig = transformers.BitsAndBytesConfig(load_in_8bit=True)
    # Non-quantized parameters (embeddings, norms, lm_head) load in the precision's storage dtype; for
    # *-mixed that is fp32, bitsandbytes only replaces the linear layers.
    dtype = weight_dtype(job.precision)
    config = build_config(job, spec)
    cls = _head_class(spec)
    attn = _attn_implementation(job)
    hf_logging = transformers.utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards", "Loading weights"
    try:
        import os

        # Random init is fast on the GPU and slow on the CPU; the folder lives in RAM where there is one.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(prefix="memfit-base-", dir=shm) as tmp:
            with torch.device(device):
                fp_model = cls.from_config(config, dtype=compute if dtype == torch.float32 else dtype,
                                           attn_implementation=attn)
            savable_generation_config(fp_model)
            fp_model.save_pretrained(tmp)
            del fp_model
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            model = cls.from_pretrained(tmp, quantization_config=qconfig, dtype=dtype,
                                        device_map={"": str(device)}, attn_implementation=attn)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if job.task == "train":
        model.config.use_cache = False
    return model


def savable_generation_config(model) -> None:
    """Let ``save_pretrained`` write a model built for training: Gemma 2's generation config names the hybrid
    cache, and with training's ``use_cache=False`` it no longer validates (transformers refuses to save it:
    "cache_implementation will have no effect"). The QLoRA load's copy exists only to be reloaded quantized,
    so the cache setting, which holds no memory, is dropped."""
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "cache_implementation", None) is not None:
        gen.cache_implementation = None


# --------------------------------------------------------------------------------------------- optimizer
_LION_CLASS = None


def lion_class():
    """memfit's Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2).

    State: one ``exp_avg`` tensor per parameter, in the parameter's dtype and shape. The update walks the
    parameters one at a time; each holds one temporary the size of the parameter (in its dtype): the
    interpolation ``beta1 * exp_avg + (1 - beta1) * grad``, signed in place. Everything else is in place.
    """
    global _LION_CLASS
    if _LION_CLASS is not None:
        return _LION_CLASS
    torch = require_torch()

    class Lion(torch.optim.Optimizer):
        def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                     weight_decay: float = 0.0) -> None:
            super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    exp_avg = state["exp_avg"]
                    if wd:
                        p.mul_(1 - lr * wd)
                    update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()  # the one temporary
                    p.add_(update, alpha=-lr)
                    del update
                    exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
            return loss

    _LION_CLASS = Lion
    return Lion


def make_optimizer(job: Job, model: Any):
    """The job's optimizer over the parameters that require grad, with library defaults besides ``lr``.

    torch's AdamW/Adam/SGD/Adafactor choose their ``foreach`` implementation themselves (multi-tensor on
    CUDA, per-parameter on the CPU); the bitsandbytes ones (adamw-8bit, paged-adamw-8bit, paged-adamw) need
    bitsandbytes and a CUDA GPU.
    """
    torch = require_torch()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise JobError("the model has no trainable parameters; nothing for the optimizer to update")
    name = job.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, lr=LR)
    if name == "adam":
        return torch.optim.Adam(params, lr=LR)
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=0.0)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=LR, momentum=0.9)
    if name == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise MissingDependencyError("torch.optim.Adafactor needs torch >= 2.5; upgrade torch")
        return torch.optim.Adafactor(params, lr=LR)
    if name == "lion":
        return lion_class()(params, lr=LR)
    bnb = _bitsandbytes()
    if name == "adamw-8bit":
        return bnb.optim.AdamW8bit(params, lr=LR)
    if name == "paged-adamw-8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=LR)
    if name == "paged-adamw":
        return bnb.optim.PagedAdamW(params, lr=LR)
    raise JobError(f"unknown optimizer {name!r}")  # pragma: no cover - Job validates it


def make_grad_scaler(job: Job, device: Any):
    """A ``torch.amp.GradScaler`` for ``16-mixed`` (fp16 gradients underflow without loss scaling), else None."""
    torch = require_torch()
    if job.precision != "16-mixed" or job.task != "train":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


# --------------------------------------------------------------------------------------------- batch
def make_batch(job: Job, spec: Any, device: Any, *, vocab_size: int | None = None,
               num_labels: int | None = None) -> dict[str, Any]:
    """Random token ids (fixed seed), no attention mask.

    Training: ``input_ids`` of shape (batch_size, seq_len) and ``labels``: the same tensor for a causal LM
    (the model shifts them) and a masked LM (every position is a target; no tokens are masked, which
    changes no memory), one class per sequence for sequence classification. Inference: ``input_ids``
    of shape (batch_size, prompt_len). ``vocab_size``/``num_labels`` override the spec's (for user models).
    """
    torch = require_torch()
    vocab = int(vocab_size or getattr(spec, "vocab_size", 0) or 0)
    if vocab < 1:
        raise JobError("cannot make token ids: the vocabulary size is unknown")
    gen = torch.Generator().manual_seed(0)
    cols = job.seq_len if job.task == "train" else job.prompt_len
    ids = torch.randint(0, vocab, (job.batch_size, cols), generator=gen).to(device)
    batch: dict[str, Any] = {"input_ids": ids}
    if job.task == "train":
        if getattr(spec, "head", "causal_lm") == "seq_cls":
            n = int(num_labels or getattr(spec, "num_labels", 2) or 2)
            batch["labels"] = torch.randint(0, n, (job.batch_size,), generator=gen).to(device)
        else:
            batch["labels"] = ids
    return batch


# --------------------------------------------------------------------------------------------- steps
def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def forward_loss(model: Any, batch: dict[str, Any]):
    """Forward with labels, return the loss and nothing else (the output object is dropped here).

    The protocol for any ``nn.Module``: it is called as ``model(input_ids=..., labels=...)`` when its forward
    takes ``labels`` (or ``**kwargs``), else ``model(input_ids=...)``, else ``model(ids)``. The loss is the
    output's ``.loss`` (or ``["loss"]``); an output without one - a tensor, or a tuple whose first item is
    a tensor - gets the stand-in loss ``output.float().pow(2).mean()``.
    """
    ids, labels = batch["input_ids"], batch.get("labels")
    fwd = getattr(model, "forward", model)
    if labels is not None and _accepts(fwd, "labels"):
        out = model(input_ids=ids, labels=labels)
    elif _accepts(fwd, "input_ids"):
        out = model(input_ids=ids)
    else:
        out = model(ids)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None:
        first = out if hasattr(out, "float") else out[0]
        if hasattr(first, "logits"):
            first = first.logits
        loss = first.float().pow(2).mean()
        del first
    del out
    return loss


def train_step(job: Job, model: Any, optimizer: Any, batch: dict[str, Any], scaler: Any = None,
               hooks: Any = None):
    """One reference training step; returns the detached loss.

    Forward (under autocast for ``*-mixed``) with the loss computed by the model, backward (through the
    ``GradScaler`` for ``16-mixed``), ``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``.
    """
    device_type = batch["input_ids"].device.type
    _phase(hooks, "forward")
    with _autocast(device_type, job.precision):
        loss = forward_loss(model, batch)
    _phase(hooks, "backward")
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    loss = loss.detach()
    _phase(hooks, "optimizer_step")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _phase(hooks, "end")
    return loss


def cache_tensors(cache: Any) -> list[Any]:
    """The key/value tensors held by a transformers cache object (any version's layout)."""
    torch = require_torch()
    found: list[Any] = []
    if cache is None:
        return found
    layers = getattr(cache, "layers", None)
    holders = list(layers) if layers is not None else [cache]
    for holder in holders:
        for attr in ("keys", "values", "key_cache", "value_cache"):
            v = getattr(holder, attr, None)
            items = v if isinstance(v, (list, tuple)) else [v]
            found.extend(t for t in items if isinstance(t, torch.Tensor) and t.numel() > 0)
    return found


def _generation_probe(hooks: Any, model: Any):
    """A LogitsProcessor that signals the decode phase and hands the KV cache to ``hooks.on_decode_step``.

    transformers calls logits processors once per generated token, right after that token's forward, so
    the first call marks the end of the prefill. The cache is seen by a forward pre-hook (it is an argument
    of every forward ``generate`` makes) and held by weak reference only.
    """
    transformers = _transformers()
    cache_cls = getattr(transformers, "Cache", None)

    class _Probe(transformers.LogitsProcessor):
        def __init__(self) -> None:
            self.calls = 0
            self._cache_ref = None
            target = model.get_base_model() if hasattr(model, "get_base_model") else model
            self._handle = target.register_forward_pre_hook(self._see, with_kwargs=True)

        def _see(self, module, args, kwargs):
            if self._cache_ref is None and cache_cls is not None:
                for v in kwargs.values():
                    if isinstance(v, cache_cls):
                        self._cache_ref = weakref.ref(v)
                        break
            return None

        def __call__(self, input_ids, scores):
            if self.calls == 0:
                _phase(hooks, "decode")
            self.calls += 1
            step = getattr(hooks, "on_decode_step", None)
            if step is not None:
                step(self._cache_ref() if self._cache_ref is not None else None)
            return scores

        def remove(self) -> None:
            self._handle.remove()

    return _Probe()


def infer(job: Job, model: Any, batch: dict[str, Any], hooks: Any = None) -> None:
    """One reference inference call under ``torch.inference_mode()``.

    ``new_tokens == 0``: one forward over the prompt without a cache, its logits kept alive to the end.
    ``new_tokens > 0``: greedy ``generate()`` of exactly ``new_tokens`` tokens with the default dynamic
    cache. ``*-mixed`` precisions run under autocast over fp32 weights; ``*-true`` in that dtype.

    The prompt is unpadded, so ``generate()`` gets an all-ones attention mask: without one it infers the
    mask from ``pad_token_id`` (``transformers`` 5.17 ``generation/utils.py``
    ``_prepare_attention_mask_for_generation``: ``inputs.ne(pad_token_id)`` when the pad id occurs in the
    inputs and differs from eos), so a random prompt that happens to contain token 0 would run the padded
    path - a ``[B, 1, P, P]`` boolean mask built for sdpa, k and v repeated to every head (``repeat_kv``), the
    memory-efficient kernel instead of cuDNN/flash - which is not the reference run (measured: the
    mistral-7b-generate boundary record, 5 zeros among its random prompt ids, peak allocated +1032 bytes a
    prompt token, reserved -2 GiB at batch 112 against the unpadded stream).
    """
    torch = require_torch()
    ids = batch["input_ids"]
    with torch.inference_mode(), _autocast(ids.device.type, job.precision):
        _phase(hooks, "prefill")
        if job.new_tokens == 0:
            fwd = getattr(model, "forward", model)
            out = model(input_ids=ids, use_cache=False) if _accepts(fwd, "use_cache") else model(input_ids=ids)
            logits = getattr(out, "logits", out)  # keep the logits alive to the end, like a real caller
            _phase(hooks, "end")
            del out, logits
            return None
        if not hasattr(model, "generate"):
            raise JobError("new_tokens > 0 needs a model with generate(); use new_tokens: 0 for one forward")
        transformers = _transformers()
        probe = _generation_probe(hooks, model)
        try:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=job.new_tokens, min_new_tokens=job.new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=0,
                                 logits_processor=transformers.LogitsProcessorList([probe]))
        finally:
            probe.remove()
        _phase(hooks, "end")
        del out
    return None
