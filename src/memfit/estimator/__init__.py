"""The analytical estimator: closed-form accounting of one job's GPU memory, no torch.

:func:`estimate` returns a :class:`~memfit.breakdown.Breakdown` for the reference run of DESIGN.md.
The peak is the largest of a few candidate moments (the loss at the end of forward, the start of
backward, each layer's backward, the optimizer step; prefill and decode for inference), each the
sum of what is alive then; the breakdown reports the winning moment, component by component.
"""

from __future__ import annotations

from functools import lru_cache

from ..models.spec import Block, ModelSpec
from . import quant
from . import states as st
from . import forward as fw

# Job and Breakdown are named in annotations only, and the layer tables (.layers) are built only for a training
# stream: imported where they are used, so `memfit serve` (which reaches .quant through this package) does not
# create their dataclasses at start-up. (``TYPE_CHECKING = False``: type checkers read the block, and the
# interpreter does not import typing for it.)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..breakdown import Breakdown
    from ..job import Job

__all__ = ["estimate", "max_batch_size", "fits_on", "model_states", "Memo", "floor_bytes"]

_MIXED = {"16-mixed": "mixed", "bf16-mixed": "mixed", "32-true": "32", "bf16-true": "true", "16-true": "true"}


def _spec(job: Job, spec: ModelSpec | None) -> ModelSpec:
    if spec is not None:
        return spec
    from ..models import load_model

    return load_model(job.model)


def _dropout(spec: ModelSpec) -> float:
    cfg = spec.config
    for key in ("resid_pdrop", "hidden_dropout_prob", "hidden_dropout", "dropout"):
        v = cfg.get(key)
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    return 0.0


def _act_mode(job: Job) -> str:
    """How activations are typed: a quantized base trained with the QLoRA recipe runs its residual stream
    in fp32 (``prepare_model_for_kbit_training`` upcast the embeddings and norms; bitsandbytes layers cast
    their output back to the input dtype), so it behaves like ``32-true`` around frozen linears."""
    mode = _MIXED[job.precision]
    if job.quantization != "none" and job.task == "train" and mode != "mixed":
        return "32"
    return mode


@lru_cache(maxsize=8192)
def _layer_saved(spec: ModelSpec, job_key: tuple) -> tuple[float, ...]:
    from .layers import Mode, saved_bytes_per_token

    precision, is_lora, targets, rank, attention, seq = job_key
    mode = Mode(precision=precision, trainable_base=not is_lora, lora_targets=targets, lora_rank=rank,
                attention=attention, seq_len=seq, dropout=_dropout(spec))
    return tuple(saved_bytes_per_token(spec, i, mode) for i in range(len(spec.blocks)))


def mlp_width(spec: ModelSpec) -> int:
    """Widest per-token MLP hidden size of any layer (routed experts count top_k times, or num_experts times
    with ``all_experts``, plus shared experts):
    what sizes a layer's backward scratch."""
    width = 0
    for b in spec.blocks:
        if b.moe is not None:
            width = max(width, b.moe.routed_copies * b.moe.expert_intermediate_size + b.moe.shared_intermediate_size)
        elif b.mlp is not None:
            width = max(width, b.mlp.intermediate_size)
    return width


_ENCODERS = ("bert", "roberta", "distilbert")


def _embedding_stage(spec: ModelSpec, T: int, res: int, first_input_saved: bool) -> tuple[list[float], float, bool]:
    """What the embedding stage of a training forward leaves: (tensors kept for backward, bytes of the embedding
    output a Python name holds until the layer stack has run, whether that tensor is the first layer's input).

    transformers 5.17: BERT, RoBERTa and DistilBERT sum the embeddings, LayerNorm them (the fp32 sum and the
    mean/rstd are kept) and apply dropout (its mask kept); GPT-2 (``embd_pdrop``) and OPT (``dropout``) drop out
    the sum of token and position embeddings. The model's forward keeps its ``inputs_embeds`` (or
    ``embedding_output``) name through the layer loop: the first layer's input itself in the Llama-style decoders
    and the encoders (already counted where the first layer saves it), a tensor of its own where the model adds
    or scales before the first layer (GPT-2, OPT, Gemma and Gemma 2's ``hidden_states * normalizer``)."""
    H = spec.hidden_size
    mt = spec.model_type
    p = _dropout(spec)
    kept: list[float] = []
    if mt in _ENCODERS:
        kept += [T * H * res, T * 8]  # LayerNorm's input (the embedding sum) and its mean/rstd
    if p > 0 and mt in _ENCODERS + ("gpt2", "opt"):
        kept.append(T * H)  # dropout mask, one byte an element
    same = mt not in ("gpt2", "opt", "gemma", "gemma2")
    held = 0.0 if (same and first_input_saved) else T * H * res
    return kept, held, same


def _mlp_backward_widths(spec: ModelSpec) -> int:
    """MLP-wide gradients alive at once in a layer's backward, beyond its saved activations.

    A gated MLP (``down(act(gate(x)) * up(x))``) or an MoE layer: ``mul``'s backward makes the gradients of
    both factors while the gradient of the product is still held (the product itself, kept by ``down``, is
    freed by then): two. A one-op activation between two linears (BERT, DistilBERT, RoBERTa, Pythia, OPT,
    Falcon: ``fc2(act(fc1(x)))``): the gradient of ``act``'s output is made by ``fc2``'s backward while its
    saved input is still alive; ``act``'s backward makes the next one only after ``fc2`` has released that
    input: one (traced: DistilBERT and BERT fp32 peak with one (T, intermediate) gradient and two (T, hidden)
    ones). GPT-2's ``gelu_new`` is a chain of Python ops whose ``mul`` backward makes two at once: two."""
    for b in spec.blocks:
        if b.moe is not None or b.mlp is None or b.mlp.gated or b.mlp.activation == "gelu_new":
            return 2
    return 1


def _train_mode(spec: ModelSpec, job: Job, amode: str, T: int):
    """The :class:`~memfit.estimator.layers.Mode` a training stream's layers are built in (``amode``:
    :func:`_act_mode`'s, ``T``: the micro-batch's tokens)."""
    from .layers import Mode

    quant4 = job.quantization in ("nf4", "fp4")
    return Mode(precision=amode, trainable_base=not job.is_lora, lora_targets=st.lora_targets(spec, job),
                lora_rank=job.lora_rank, attention=job.attention, seq_len=job.seq_len, dropout=_dropout(spec),
                quant4=quant4, rows=quant.bnb_row_tier(T) if quant4 else 0,
                double_quant=bool(job.double_quant) and quant4, quant_block=job.quant_group_size,
                experts_trained=not job.is_lora or st.lora_wraps_fused(job, spec))


def _logit_bytes(spec: ModelSpec, job: Job) -> int:
    return st.compute_bytes(job.precision)


def _layer_order(spec: ModelSpec) -> list[int]:
    """Block index of each layer, in the order the closed-form moments have always walked them (block by block)."""
    return [i for i, b in enumerate(spec.blocks) for _ in range(b.count)]


def _scaled(sizes: list[float], total: float) -> list[float]:
    """``sizes`` rescaled to add up to ``total`` (the shapes of a group of tensors, the bytes of its formula)."""
    have = sum(sizes)
    if total <= 0:
        return []
    if have <= 0:
        return [total]
    f = total / have
    return [x * f for x in sizes]


def _block_param_elems(spec: ModelSpec, b) -> list[int]:
    """Parameter tensors (elements) of one layer of block ``b``: each linear's weight and bias (fused expert
    tensors are one parameter), and the norms (``other_params`` split over the layer's norms)."""
    out: list[int] = []
    for lin in b.linears:
        if lin.is_module:
            for _ in range(lin.count):
                out.append(lin.in_features * lin.out_features)
                if lin.bias:
                    out.append(lin.out_features)
        else:
            out.append(lin.in_features * lin.out_features * lin.count)
            if lin.bias:
                out.append(lin.out_features * lin.count)
    if b.other_params:
        k = max(1, b.norms_per_layer)
        out += [b.other_params / k] * k
    return out


def _lora_elems(spec: ModelSpec, job: Job, b) -> list[int]:
    """LoRA A and B tensors (elements) of one layer: (r x in) and (out x r) per wrapped linear, the fused
    ``ParamWrapper`` shapes for expert tensors (see :func:`states.fused_lora_params`)."""
    targets = st.lora_targets(spec, job)
    r = job.lora_rank
    fused = st.lora_wraps_fused(job)
    out: list[int] = []
    for lin in b.linears:
        if lin.is_module and lin.name in targets:
            for _ in range(lin.count):
                out += [r * lin.in_features, r * lin.out_features]
        elif not lin.is_module and fused:
            mult = 2 if lin.role == "expert_gate_up" else 1
            out += [mult * r * lin.count * lin.in_features, mult * r * lin.count * lin.out_features]
    return out


def _weight_tensors(spec: ModelSpec, job: Job, layers: list[int], total: int) -> list[float]:
    """Bytes of each weight tensor as loaded (embeddings, each layer's, final norm, head), adding up to
    ``total`` (:func:`states.weight_bytes` less the adapters): packed bytes for quantized linears."""
    quantized = job.quantization != "none"
    ub = st.unquantized_param_bytes(job) if quantized else st.param_bytes(job.precision)
    qb = 0.5 if job.quantization in ("nf4", "fp4", "gptq", "awq") else 1
    out: list[float] = [spec.vocab_size * spec.hidden_size * ub]
    if spec.embedding_params > spec.vocab_size * spec.hidden_size:
        out.append((spec.embedding_params - spec.vocab_size * spec.hidden_size) * ub)
    for bi in layers:
        b = spec.blocks[bi]
        for lin in b.linears:
            n = lin.count if lin.is_module else 1
            w = lin.in_features * lin.out_features * (1 if lin.is_module else lin.count)
            out += [w * (qb if quantized and lin.is_module else ub)] * n
            if lin.bias:
                out += [lin.out_features * (1 if lin.is_module else lin.count) * ub] * n
        if b.other_params:
            k = max(1, b.norms_per_layer)
            out += [b.other_params / k * ub] * k
    if spec.final_params:
        out.append(spec.final_params * ub)
    if spec.head_params:
        out.append(spec.head_params * ub)
    if job.is_lora and job.task == "train" and spec.head == "seq_cls":
        out.append(spec.head_params * st.param_bytes(job.precision))
    diff = total - sum(out)
    if diff:
        i = max(range(len(out)), key=out.__getitem__)
        out[i] += diff
    return out


#: Job fields a stream's per-parameter tensors do not read (the micro-batch, and the allocator setting, which
#: no stream reads)
_NOT_STATIC = ("batch_size", "expandable_segments")
_STATIC_GET = None  # operator.attrgetter of the fields, made on first use


def _static_key(job: Job) -> tuple:
    """``job``'s fields but :data:`_NOT_STATIC`, as a key (lists as tuples)."""
    global _STATIC_GET
    if _STATIC_GET is None:
        from dataclasses import fields
        from operator import attrgetter

        _STATIC_GET = attrgetter(*(f.name for f in fields(job) if f.name not in _NOT_STATIC))
    vals = _STATIC_GET(job)
    if list in map(type, vals):
        vals = tuple(tuple(v) if isinstance(v, list) else v for v in vals)
    return vals


def _template_key(job: Job) -> tuple:
    """What a training stream's operations depend on (:meth:`Memo.stream` makes one micro-batch's stream from two
    others with the same key): the job's fields but the micro-batch and the allocator setting, and for a 4-bit base
    the row tier of bitsandbytes' matmul path (:func:`memfit.estimator.quant.bnb_row_tier`), the one rule of the
    training stream that reads the micro-batch's tokens for more than a size."""
    quant4 = job.quantization in ("nf4", "fp4")
    return _static_key(job), quant.bnb_row_tier(job.batch_size * job.seq_len) if quant4 else 0


#: make a training stream at a new micro-batch from two built streams of the same job (:meth:`Memo.stream`) instead
#: of building it (off: every stream built; validation/check_interpolated_streams.py compares the two)
_INTERPOLATE = True

#: job settings whose two template streams a Memo's per-job store keeps at once (the most recently made)
_TEMPLATES = 8

#: Steps the training stream replays: the first creates the optimizer state (its peak does not count, as in the
#: measure engine), the next is the steady state the reference peak is taken over.
TRAIN_STEPS = 2

#: copy identical layers' stretches of the stream (training's forward and backward, inference's prefill) instead
#: of building each (off: every layer built; tests/test_stream_repeat.py compares the two)
_REPEAT_LAYERS = True

#: make a decode's steps past its first three by :meth:`events.PyStream.extend` (each size affine in the step over
#: a stretch of steps) instead of step by step (off: every step built; tests/test_stream_repeat.py compares the two)
_EXTEND_DECODE = True

#: build a training stream's later steps as its first one's stretch again (:meth:`events.PyStream.again`) instead
#: of step by step (off: every step built; tests/test_stream_repeat.py compares the two)
_REPEAT_STEPS = True


def _train(spec: ModelSpec, job: Job, stream=None, steps: int = TRAIN_STEPS,
           rank=None, per_job: dict | None = None) -> tuple[dict[str, int], str, dict[str, int], list[str]]:
    """Build the training run's event stream (into ``stream`` when given) and account it: (components at the
    peak, peak phase, phase peaks, notes). The stream is the one description: the moments the estimate has
    always counted (the loss, its backward, each layer's backward, the end of backward, the optimizer step) are
    points of it.

    ``per_job``: a dict (a :class:`Memo`'s) keeping what the stream builds from the model and the job's fields
    but the micro-batch (its weight tensors, gradients and optimizer states), for the next micro-batch of the
    job (single GPU).

    ``rank`` (a :class:`memfit.estimator.parallel.RankView`) builds one rank of a multi-GPU job instead: its
    layers (a pipeline stage), activations scaled for tensor / sequence parallelism, the micro-batches in
    flight, the loss on the last stage only, and the model states laid out by the engine's hooks
    (``rank.states``; None keeps the single-GPU states, plus ``rank.load_extra`` such as DDP's buckets)."""
    from .events import PyStream, account

    s = stream if stream is not None else PyStream()
    T = job.batch_size * job.seq_len
    V, H = spec.vocab_size, spec.hidden_size
    amode = _act_mode(job) if rank is None else rank.amode
    hooks = rank.states if rank is not None else None
    tp_share = rank.tp_share if rank is not None else 1.0  # vocabulary, MLP width and weight-sized tensors
    act_share = rank.act_share if rank is not None else 1.0  # a layer's saved activations (TP)
    seq_share = rank.seq_share if rank is not None else 1.0  # residual-stream tensors (SP)
    has_head = rank is None or rank.last
    has_embedding = rank is None or rank.first
    e = 4 if amode == "32" else 2
    pb = st.param_bytes(job.precision)
    res = 4 if amode in ("32", "mixed") else 2
    notes: list[str] = []
    layers = _layer_order(spec) if rank is None else list(rank.layers)
    L = len(layers)

    weights = st.weight_bytes(spec, job)
    qstate = quant.quant_state_bytes(spec, job) if job.quantization != "none" else 0
    # LLM.int8's scratch, held through the step (4-bit linears make theirs per call, in the layer chains)
    qtemp = quant.dequant_temp_bytes(spec, job, T) if job.quantization not in ("none", "nf4", "fp4") else 0
    if job.quantization != "none" and amode == "32" and job.precision != "32-true":
        notes.append("the QLoRA recipe (prepare_model_for_kbit_training) upcasts embeddings, norms and the "
                     f"LM head to fp32: {(spec.parameters - quant.quantized_weight_params(spec)) * 2 / 2**30:.2f} GiB "
                     "more weights than 16-bit, and fp32 activations and logits")
    grads_total = st.gradient_bytes(spec, job)
    opt_states = st.optimizer_state_bytes(spec, job)
    cache = st.autocast_cache_bytes(spec, job) if rank is None or rank.autocast else 0
    frozen_casts: list[list[int]] = [[] for _ in layers]
    if cache and job.is_lora and job.gradient_checkpointing:
        # autocast caches casts of leaves that require grad only: a frozen base's 16-bit copies are made per
        # use, and under checkpointing nothing keeps them, so one layer's copies exist at a time (its backward)
        widest = max(range(len(spec.blocks)) if rank is None else sorted(set(layers)), key=lambda bi: sum(
            lin.in_features * lin.out_features * lin.count for lin in spec.blocks[bi].linears))
        casts = [2 * lin.in_features * lin.out_features * lin.count * tp_share for lin in spec.blocks[widest].linears]
        frozen_casts = [casts for _ in layers]
        cache = 2 * spec.lm_head_params if spec.head in ("causal_lm", "masked_lm") else 0
    ws = st.CUBLAS_WORKSPACE_BYTES
    ckpt = job.gradient_checkpointing

    quant4 = job.quantization in ("nf4", "fp4")
    # bitsandbytes dequantizes a 4-bit weight whole for a matmul of training shapes: a temporary of each call,
    # forward (layers._Replay.dequant4_scratch, quant.bnb_dequantizes) and backward (dq_back below)
    from .layers import layer_forward_tensors, math_softmax_backward

    mode = _train_mode(spec, job, amode, T)
    layer_tensors = {bi: [(bpt * T * act_share + fixed * tp_share, saved, held, until)
                          for bpt, saved, held, until, fixed in layer_forward_tensors(spec, bi, mode)]
                     for bi in set(layers)}
    merged = {bi: st.fused_lora_merged_bytes(spec, job, spec.blocks[bi]) * tp_share for bi in set(layers)}
    # the math attention kernel's softmax backward (layers.math_softmax_backward): the saved tensors released by
    # then, by index into the layer's tensors, and the tensors made there
    math_back = {bi: mb for bi in set(layers) if (mb := math_softmax_backward(spec, bi, mode)) is not None}
    layer_input = T * H * res * seq_share
    stash = {}
    if ckpt and job.quantization == "int8":
        # bitsandbytes' MatMul8bitLt stashes its input on ctx (not save_for_backward), outside the saved-tensor
        # hooks that non-reentrant checkpointing uses to drop activations: the distinct inputs of each layer's
        # int8 linears (attention input, attention output, MLP input, MLP hidden) stay alive through backward.
        for bi in set(layers):
            b = spec.blocks[bi]
            at = b.attention
            width = (b.moe.routed_copies * b.moe.expert_intermediate_size if b.moe is not None
                     else (b.mlp.intermediate_size if b.mlp is not None else 0))
            stash[bi] = [T * res * x * act_share for x in (H, at.num_heads * at.v_head_dim, H, width)]
    # final norm output kept for the head, and its fp32 input
    final_saved = [x * seq_share for x in [T * H * 4, T * H * res] + ([T * H * 2] if amode == "mixed" else [])]
    final_norm_temps = (spec.head == "causal_lm" and has_head and bool(layers)
                        and spec.blocks[layers[-1]].norm == "rms" and amode != "32")
    if job.is_lora and spec.head == "causal_lm" and amode != "mixed":
        # A frozen LM head (PEFT's "all-linear" leaves the output layer out; prepare_model_for_kbit_training
        # freezes every base parameter) keeps its weight for the input gradient, not its input, and the norm's
        # ``weight * h.to(input_dtype)`` with a frozen weight keeps the weight: only the norm's fp32 input stays
        # (``hidden_states.to(torch.float32)``, the stream itself under QLoRA's fp32 stream). Traced: QLoRA
        # mistral-7b keeps one (B, S, H) fp32 tensor after the last layer; measured: the end-of-forward
        # allocation of the three checkpointed QLoRA records was over by one such tensor with the second.
        final_saved = [T * H * 4 * seq_share]
    if spec.model_type in _ENCODERS and spec.head == "seq_cls":
        # no final norm: the pooler (BERT, RoBERTa's classifier dense) or pre_classifier (DistilBERT) takes
        # hidden_states[:, 0], a view whose Linear keeps the whole last hidden state - except under autocast,
        # where the Linear keeps its (batch, hidden) 16-bit cast (transformers 5.17 modeling_bert.py BertPooler,
        # modeling_distilbert.py DistilBertForSequenceClassification)
        final_saved = [] if amode == "mixed" else [T * H * res * seq_share]
    if not has_head:
        final_saved = []
    first = layer_tensors[layers[0]][0] if layers else (0.0, True, True)
    emb_saved, emb_held, emb_first = _embedding_stage(spec, T, res, first_input_saved=first[1] and not ckpt)
    if not has_embedding:  # a later pipeline stage: its input arrives from the previous stage (recv_bytes)
        emb_saved, emb_held = [], 0.0
    emb_saved = [x * seq_share for x in emb_saved]
    emb_held *= seq_share
    lm = spec.head in ("causal_lm", "masked_lm") and has_head  # ForMaskedLMLoss upcasts the same way
    TV = T * V * tp_share  # Megatron's vocab-parallel cross entropy keeps 1/t of the logits
    if lm and spec.final_logit_softcapping:
        notes.append("final logit soft-capping keeps one more vocab-sized tensor (tanh output)")

    def per_parameter() -> tuple:
        """The gradient, optimizer-state and step-scratch tensors (what the micro-batch does not change)."""
        # gradients, tensor by tensor, and the moment each arrives in backward
        if job.is_lora:
            per_layer = st.trainable_bytes(spec, job) / max(1, L)
            by_block = {bi: _scaled([x * 4 for x in _lora_elems(spec, job, spec.blocks[bi])], per_layer) for bi in set(layers)}
            layer_grads = [by_block[bi] for bi in layers]  # read only: a block's list is shared by its layers
            head_grads: list[float] = []
            embed_grads: list[float] = []
        else:
            by_block = {bi: [x * pb for x in _block_param_elems(spec, spec.blocks[bi])] for bi in set(layers)}
            layer_grads = [by_block[bi] for bi in layers]  # read only: a block's list is shared by its layers
            head_grads = [x * pb for x in ([spec.head_params] if spec.head_params else []) +
                          ([spec.final_params] if spec.final_params else [])]
            if spec.tie_word_embeddings and lm:
                head_grads.append(V * H * pb)
            late = grads_total - sum(head_grads) - sum(sum(g) for g in layer_grads)
            embed_grads = [late] if late > 0 else []
        # optimizer states and the foreach scratch follow ``model.parameters()``: embeddings, layers, final norm, head
        all_grads = embed_grads + [x for g in layer_grads for x in g] + head_grads[::-1]
        n_states = {"adamw": 2, "adam": 2, "adamw-8bit": 2, "paged-adamw-8bit": 2, "paged-adamw": 2,
                    "adafactor": 2}.get(job.optimizer, 1)
        state_tensors = _scaled([x for x in all_grads for _ in range(n_states)], opt_states)
        step_temp = st.optimizer_step_temp_bytes(spec, job)
        if job.optimizer in ("adamw", "adam"):
            scratch = _scaled(all_grads, step_temp)  # foreach sqrt: one denominator per parameter
        elif job.optimizer == "lion":
            scratch = [step_temp / 2, step_temp / 2]
        else:
            scratch = [step_temp]
        return layer_grads, head_grads, embed_grads, state_tensors, scratch

    # the same for every micro-batch of a job: kept where the caller asks (a planner asks about many)
    static = _static_key(job) if per_job is not None and rank is None else None
    if static is not None:
        got = per_job.get(("grads", static))
        if got is None:
            got = per_job[("grads", static)] = per_parameter()
        layer_grads, head_grads, embed_grads, state_tensors, scratch = got
    else:
        layer_grads, head_grads, embed_grads, state_tensors, scratch = per_parameter()
    if cache and not any(frozen_casts):  # each layer's 16-bit weight casts (read only: one tuple per block)
        per_block = {bi: tuple(2 * lin.in_features * lin.out_features * lin.count for lin in spec.blocks[bi].linears)
                     for bi in set(layers)}
        cache_layers = [per_block[bi] for bi in layers]
    else:
        cache_layers = [()] * len(layers)
    cache_head = cache - sum(sum(c) for c in cache_layers)
    if rank is not None:  # the head's cast is the single-GPU one (whatever layers this stage holds), split by TP
        if cache and not any(frozen_casts):
            cache_head = cache - sum(2 * lin.in_features * lin.out_features * lin.count
                                     for bi in _layer_order(spec) for lin in spec.blocks[bi].linears)
        cache_layers = [tuple(x * tp_share for x in c) for c in cache_layers]
        cache_head = cache_head * tp_share if has_head else 0
    dq_back: dict[int, list[float]] = {}
    if quant4:
        # MatMul4Bit.backward (bitsandbytes 0.50 autograd/_functions.py): ``grad_output @ dequantize_4bit(B)``, the
        # weight dequantized again whatever the rows (functional.dequantize_4bit: the nested absmax to fp32 - the
        # offset added in place - and the weight in the compute dtype), one linear at a time: the layer's largest
        for bi in set(layers):
            lins = [lin for lin in spec.blocks[bi].linears if lin.is_module]
            if lins:
                numel = max(lin.in_features * lin.out_features for lin in lins)
                blocks = -(-numel // job.quant_group_size)
                dq_back[bi] = ([4 * blocks * tp_share] if job.double_quant else []) + [2 * numel * tp_share]
    mw = mlp_width(spec)
    # a layer's backward scratch: MLP-wide gradients and two hidden-sized ones (see _mlp_backward_widths)
    transient = [T * e * mw * tp_share] * _mlp_backward_widths(spec) + [T * e * H * seq_share, T * e * H * seq_share]
    if rank is not None and rank.grad_views:  # DDP gradient_as_bucket_view: the .grad are views into the buckets
        head_grads, layer_grads, embed_grads = [], [[] for _ in layers], []

    # Identical layers emit identical stretches of the stream, their handles offset: a layer whose inputs are
    # those of the layer before it (same block data, same per-layer tensors, the same shape of kept handles) is
    # copied from that layer's stretch (events.Stream.repeat) instead of being built again, the same stream
    # (tests/test_stream_repeat.py builds every registry model both ways). ``layer_class``: one int per
    # distinct block data.
    classes: dict[tuple, int] = {}
    layer_class = {bi: classes.setdefault((tuple(layer_tensors[bi]), merged[bi], tuple(stash.get(bi, ())),
                                           math_back.get(bi), tuple(dq_back.get(bi, ()))), len(classes))
                   for bi in set(layers)}
    repeat = hooks is None and _REPEAT_LAYERS
    if repeat:  # what else a layer's forward and backward read, by position
        fwd_static = [(layer_class[bi], cache_layers[i]) for i, bi in enumerate(layers)]
        bwd_static = [(tuple(frozen_casts[i]), tuple(layer_grads[i])) for i in range(L)]
        fwd_sigs: list = [None] * L

    # ---------------------------------------------------------------------------------------- load
    s.phase("load")
    lora = st.lora_adapter_params(spec, job) * 4 if job.is_lora else 0
    if hooks is not None:
        hooks.load(s)
    else:
        tensors = per_job.get(("weights", static)) if static is not None else None
        if tensors is None:
            tensors = _weight_tensors(spec, job, layers, weights - lora)
            if static is not None:
                per_job[("weights", static)] = tensors
        s.alloc_all(tensors, "weights")
        if spec.tie_word_embeddings and spec.head == "causal_lm" and job.quantization == "none":
            # building the model makes the head's own weight before tie_weights() points it at the embedding: one
            # embedding-sized tensor, freed, its segment left cached (as inference's load; measured: the load peak
            # of llama-3.2-3b full bf16 is its weights plus 751.5 MiB). This is the user's run, built then trained,
            # and find_max_batch's first trial: llama-3.2-3b-full-ckpt B=6 and gemma-2-2b-lora B=1 (first trials)
            # reserve 41.79 / 15.40 GiB measured, 42.41 / 15.39 with it, 46.81 / 14.46 without. A later trial runs
            # after empty_cache() released it: qwen2.5-3b-lora-ckpt B=2 (second trial) 14.35 measured, 14.77 with,
            # 14.34 without. The estimate describes the first.
            s.free(s.alloc(V * H * st.param_bytes(job.precision), "weights"))
        if lora:
            adapters = per_job.get(("lora", static)) if static is not None else None
            if adapters is None:
                by_block = {bi: [x * 4 for x in _lora_elems(spec, job, spec.blocks[bi])] for bi in set(layers)}
                adapters = [x for bi in layers for x in by_block[bi]]
                if static is not None:
                    per_job[("lora", static)] = adapters
            s.alloc_all(adapters, "lora_adapters")
    if qstate:
        for bi in layers:
            s.alloc(qstate / max(1, L), "quantization_state")
    for n, comp in (rank.load_extra if rank is not None else ()):
        s.alloc(n, comp)
    for _ in range(3):
        s.alloc(T * 8, "temporaries")  # input_ids, the padded labels and the shifted labels (int64)

    first_step = None  # (start, end) of the first step's stretch, for again()
    for step in range(steps):
        if step == 1:
            s.reset_peaks()
        if first_step is not None and s.again(*first_step):
            continue  # a later step: the first one's stretch again, without what it made to keep
        at_step = s.mark()
        s.phase("forward")
        if step == 0:
            # the cuBLAS workspace of the forward's thread, at its first matmul; the backward runs on autograd's
            # device thread, whose handle gets its own at the first backward matmul (below)
            s.alloc(ws / 2, "temporaries")
            if hooks is not None:
                s.alloc(ws / 2, "temporaries")
        q = s.alloc(qtemp, "temporaries")
        waiting: list[int] = []
        if rank is not None:
            # pipeline: the activation received from the previous stage, and the earlier micro-batches' kept
            # activations waiting for their backward (1F1B holds ``in_flight`` micro-batches on this stage)
            waiting.append(s.alloc(rank.recv_bytes, "temporaries"))
            for _ in range(rank.in_flight - 1):
                for bi in layers:
                    if ckpt:
                        waiting.append(s.alloc(layer_input + sum(stash.get(bi, ())), "activations"))
                    else:
                        waiting += [s.alloc(n, "activations") for n, saved, _held, _until in layer_tensors[bi] if saved]
        if hooks is not None:
            hooks.forward_start(s)
        emb = [s.alloc(x, "activations") for x in emb_saved]
        emb_out = s.alloc(emb_held, "temporaries") if emb_held and not (ckpt and emb_first) else -1
        kept: list[list[int]] = []
        kept_at: list[dict[int, int]] = []  # each layer's saved tensors (non-checkpointed): index -> handle
        caches: list[list[int]] = []
        carry = -1  # checkpointing: the previous layer's output, which is this layer's saved input
        fwd = None  # the layer before, for repeat: (signature, mark, caches, kept, kept_at, carry in, carry out)
        for i, bi in enumerate(layers):
            if repeat:
                sig = fwd_sigs[i] = (fwd_static[i], carry >= 0, i == 0)
                at = s.mark()
                if fwd is not None and fwd[0] == sig:
                    # the template layer's handles -> this layer's: made in the layer, offset by d; its
                    # carried input (made before it), this layer's; -1 (no tensor) stays
                    _, _, c_t, mine_t, at_t, cin_t, cout_t = fwd
                    got = s.repeat_map(fwd[1], (), (), (c_t, mine_t), cin_t, carry)
                    if got is not None:
                        d, c_new, k_new = got
                        cin = carry
                        caches.append(c_new)
                        kept.append(k_new)
                        # kept_at is read by the math kernel's softmax backward only (the template's, unread, else)
                        kept_at.append({j: h + d if h >= 0 else -1 for j, h in at_t.items()} if bi in math_back
                                       else at_t)
                        carry = cout_t + d if cout_t >= 0 else -1
                        fwd = (sig, at, caches[-1], kept[-1], kept_at[-1], cin, carry)
                        continue
                cin = carry
            if hooks is not None:
                hooks.pre_forward(s, i)
            caches.append([s.alloc(c, "autocast_cache") for c in cache_layers[i]])
            mine: list[int] = []
            mine_at: dict[int, int] = {}
            if ckpt:
                mine.append(carry if carry >= 0 else s.alloc(layer_input, "activations"))
                carry = -1
            pending, held, scoped = -1, [], {}
            last = len(layer_tensors[bi]) - 1
            for j, (n, saved, hold, until) in enumerate(layer_tensors[bi]):
                if i == 0 and j == 0 and emb_out >= 0 and emb_first:
                    continue  # the first layer's input is the embedding output, held above
                if (ckpt and j == last and not saved and not hold and until is None
                        and abs(n - layer_input) < 1):
                    # the layer's output (the second residual sum) is the tensor the next checkpointed layer keeps
                    # as its input: made while the sum's operands are alive, freed after it (traced, transformers
                    # 5.17 decoder layers: the output, then the MLP output and the first residual sum freed), not
                    # freed and made again at the next layer's start
                    carry = s.alloc(n, "activations")
                    s.free(pending)
                    pending = -1
                    s.free_all(scoped.pop(j, ()))
                    continue
                if saved and not ckpt:
                    h = s.alloc(n, "activations")
                    mine.append(h)
                    mine_at[j] = h
                elif hold:  # a Python name keeps it until the layer returns
                    held.append(s.alloc(n, "temporaries"))
                elif until is not None:  # its op frees it once a later tensor exists (see layer_forward_tensors)
                    scoped.setdefault(until, []).append(s.alloc(n, "temporaries"))
                else:
                    h = s.alloc(n, "temporaries")
                    s.free(pending)
                    pending = h
                s.free_all(scoped.pop(j, ()))
            s.free(pending)
            for left in scoped.values():
                s.free_all(left)
            s.free_all(held)
            if not ckpt:
                mine.append(s.alloc(merged[bi], "activations"))
            # the int8 linears' stashed inputs, one tensor each (made within the layer, kept past its return)
            mine += [s.alloc(x, "activations") for x in stash.get(bi, ())]
            kept.append(mine)
            kept_at.append(mine_at)
            if repeat:
                fwd = (sig, at, caches[-1], mine, mine_at, cin, carry)
            if hooks is not None:
                hooks.post_forward(s, i)
        if hooks is not None:
            hooks.pre_head(s)
        fin = [s.alloc(x, "activations") for x in final_saved[:1]]
        norm32 = []
        if final_norm_temps:
            # LlamaRMSNorm (transformers 5.17): ``hidden_states.pow(2).mean(-1)`` frees its fp32 square once the mean
            # exists; ``hidden_states * torch.rsqrt(variance)`` is fp32 too, freed after its cast back. Traced (llama-3.2-1b
            # full bf16): the freed (B, S, H) fp32 block is where the backward thread's cuBLAS workspace lands
            # when it is that size, instead of the head's vocab-sized block.
            s.free(s.alloc(T * H * 4 * seq_share, "temporaries"))
            norm32.append(s.alloc(T * H * 4 * seq_share, "temporaries"))
        fin += [s.alloc(x, "activations") for x in final_saved[1:]]
        s.free_all(norm32)
        s.free(carry)  # the last layer's output: the final norm's input, dropped once the norm returns
        s.free(emb_out)
        ch = s.alloc(cache_head, "autocast_cache")
        plain = lm and _plain_ce_mlm(spec, job)
        if plain:  # autocast's fp32 copy of the scores stays with the 16-bit log_softmax output
            logits = s.alloc(TV * e, "logits_and_loss")
            up = s.alloc(TV * 4, "logits_and_loss")
            logsm, tanh = s.alloc(TV * e, "logits_and_loss"), -1
            s.free(logits)
        elif lm:
            logits = s.alloc(TV * e, "logits_and_loss")
            tanh = -1
            # Granite's ``logits / logits_scaling`` (fw.LOGITS_SCALED) is not emitted in training yet: its
            # embedding and residual multipliers' temporaries are missing from these layers too, and the division
            # alone moved h6-granite-3.1-2b-full-ckpt's answer above the real boundary (15 vs 14; the trace, which
            # has all three, is exact there)
            if spec.final_logit_softcapping:
                # transformers 5.17 Gemma2ForCausalLM: ``logits / cap``, ``tanh`` (its output kept for backward),
                # ``* cap``, one op at a time before the loss upcasts (traced: gemma-2-2b LoRA bf16)
                scaled = s.alloc(TV * e, "logits_and_loss")
                s.free(logits)
                tanh = s.alloc(TV * e, "logits_and_loss")
                s.free(scaled)
                logits = s.alloc(TV * e, "logits_and_loss")
            up = s.alloc(TV * 4, "logits_and_loss") if e != 4 else -1
            logsm = s.alloc(TV * 4, "logits_and_loss")
            s.free(up)
            s.free(logits)
        elif has_head:
            logsm, tanh = s.alloc(T * spec.num_labels * 4, "logits_and_loss"), -1
        else:  # not the last pipeline stage: no head, no loss
            logsm = tanh = -1
        s.phase("backward")
        if hooks is not None:
            hooks.backward_start(s)
        if ckpt:
            s.free(ch)
            for c in caches:
                s.free_all(c)
        logit_grad = -1
        if plain:  # one fp32 gradient of the scores, then its cast back to 16 bits
            g1 = s.alloc(TV * 4, "logits_and_loss")
            s.free(logsm)
            s.free(up)
            g3 = s.alloc(TV * e, "logits_and_loss")
            s.free(g1)
            s.free(g3)
        elif lm:  # nll_loss backward, log_softmax backward, then .float()'s backward casts the gradient back
            g1, g2 = s.alloc(TV * 4, "logits_and_loss"), s.alloc(TV * 4, "logits_and_loss")
            s.free(g1)
            s.free(logsm)
            g3 = s.alloc(TV * e, "logits_and_loss") if e != 4 else -1
            if tanh >= 0:  # the soft-cap's backward: ``* cap``, tanh's, ``/ cap``, each freeing the one before
                if g3 < 0:
                    g3, g2 = g2, -1
                else:
                    s.free(g2)
                    g2 = -1
                for k in range(3):
                    nxt = s.alloc(TV * e, "logits_and_loss")
                    s.free(g3)
                    g3 = nxt
                    if k == 1:  # tanh's backward has used its saved output
                        s.free(tanh)
            s.free(g2)
            logit_grad = g3
        elif has_head:
            g1 = s.alloc(T * spec.num_labels * 4, "logits_and_loss")
            s.free(g1)
            s.free(logsm)
        if not ckpt:
            s.free(ch)
        # The head's weight gradient (``grad_logits^T @ hidden``, aten.mm) is made while the logits' gradient is
        # alive: the linear's backward reads it for the input gradient and the weight gradient alike. Traced
        # (qwen2.5-0.5b full bf16, tied head): the mm lands in the vocab-sized block the log_softmax backward
        # has just freed, splitting it; the next step's log_softmax backward then needs a new segment
        # (trace 16.90 GiB reserved, measured 16.92 for the same stream under a paged optimizer).
        grads = s.alloc_all(head_grads, "gradients") if hooks is None else hooks.head_grads(s)
        if step == 0 and hooks is None:
            # The backward thread's cuBLAS workspace (``CublasHandlePool.cpp``: one per handle and stream, kept),
            # requested by the first backward matmul after its output exists: the head's weight gradient. It
            # stays where it lands, often in a vocab-sized block just freed, which a later step then cannot
            # reuse whole (traced, as the tracer's ``_cublas`` does; the reserve it explains is measured).
            s.alloc(ws / 2, "temporaries")
        s.free(logit_grad)
        s.free_all(fin)
        bwd = None  # the layer after, for repeat: (signature, mark, kept, kept_at, caches, gradients made)
        for i in range(L - 1, -1, -1):
            bi = layers[i]
            live = kept[i]
            live_at = kept_at[i]
            if repeat:
                # the forward's signature fixes the shape of the handles it kept (where a -1 is, kept_at's keys)
                sig = (fwd_sigs[i], bwd_static[i])
                at = s.mark()
                n_grads = len(grads)
                if bwd is not None and bwd[0] == sig:
                    # the tensors of the forward it frees: the template layer's, position by position
                    # (kept_at's handles are among kept's)
                    got = s.repeat_map(bwd[1], (bwd[2], bwd[4]), (live, caches[i]), (bwd[5],), -2, -2)
                    if got is not None:
                        grads += got[1]
                        bwd = (sig, at, live, live_at, caches[i], grads[n_grads:])
                        continue
            if hooks is not None:
                hooks.pre_backward(s, i)
            pre: list[int] = []
            if ckpt:  # recompute the layer's forward, keeping what backward needs
                # The gradient arriving at the layer's output exists before the recompute starts
                # (torch.utils.checkpoint recomputes when backward first unpacks a saved tensor). Traced: under
                # QLoRA's fp32 stream two (B, S, H) fp32 gradients are alive through each layer's recompute
                # (mistral-7b, whose peak is the recomputed math-kernel attention). Only there: a 16-bit full
                # fine-tuning trace keeps one 16-bit gradient, and that stream is outside this rule's evidence.
                if job.quantization != "none" and job.is_lora and amode == "32":
                    pre = [s.alloc(x, "temporaries") for x in transient[-2:]]
                s.free_all(live)
                live = []
                live_at = {}
                pending, held, scoped = -1, [], {}
                for j, (n, saved, hold, until) in enumerate(layer_tensors[bi]):
                    h = s.alloc(n, "activations" if saved else "temporaries")
                    if saved:
                        live.append(h)
                        live_at[j] = h
                    elif hold:
                        held.append(h)
                    elif until is not None:
                        scoped.setdefault(until, []).append(h)
                    else:
                        s.free(pending)
                        pending = h
                    s.free_all(scoped.pop(j, ()))
                s.free(pending)
                for left in scoped.values():
                    s.free_all(left)
                s.free_all(held)
                live.append(s.alloc(merged[bi], "activations"))
            tmp = pre + [s.alloc(x, "temporaries") for x in (transient[:-len(pre)] if pre else transient) + frozen_casts[i]
                         + dq_back.get(bi, [])]
            # the layer's weight gradients in the order its backward makes them: the last-used module's first
            # (down_proj before q_proj; LoRA's B before its A), the reverse of ``model.parameters()``. Traced
            # (llama-3.1-8b full, B6 S2048): the step's optimizer states then fill the same holes the trace's do
            # (its capped replay passes the card the measured run passes; forward order left it failing)
            grads += (s.alloc_all(layer_grads[i][::-1], "gradients") if hooks is None
                      else hooks.layer_grads(s, i))
            mb = math_back.get(bi)
            if mb is None:
                s.free_all(tmp)
            else:
                # the softmax backward of the math attention kernel, after the later ops' backward: their saved
                # tensors released, the two hidden-sized gradients still alive (the residual's and the one
                # arriving at the layer), the probabilities' gradient, CUDA's ``grad * output`` and the result
                hidden = pre or tmp[len(transient) - 2:len(transient)]
                s.free_all([h for h in tmp if h not in hidden])
                released, v_at, p_at, made = mb
                v_exp, probs = live_at.get(v_at, -1), live_at.get(p_at, -1)
                gone = [live_at[j] for j in released if j in live_at]
                s.free_all(gone)
                g_probs, g_v = (s.alloc(x * T * act_share, "temporaries") for x in made[:2])
                s.free(v_exp)  # the second bmm's node releases the repeated v
                g_scores, g_tmp = (s.alloc(x * T * act_share, "temporaries") for x in made[2:])
                s.free_all((g_tmp, g_probs, probs))  # the softmax node is done
                s.free_all((g_scores, g_v))
                gone = set(gone) | {v_exp, probs}
                live = [h for h in live if h not in gone]
                s.free_all(hidden)
            s.free_all(live)
            if not ckpt:
                s.free_all(caches[i])
            if repeat:
                bwd = (sig, at, kept[i], kept_at[i], caches[i], grads[n_grads:])
            if hooks is not None:
                hooks.post_backward(s, i)
        s.free_all(emb)
        # end of backward: the embedding gradient arrives last
        t = s.alloc(T * H * e * seq_share, "temporaries")
        grads += s.alloc_all(embed_grads, "gradients") if hooks is None else hooks.end_grads(s)
        s.free(t)
        s.free(q)
        s.free_all(waiting)
        if hooks is not None:
            hooks.after_backward(s)
        s.phase("optimizer_step")
        if hooks is not None:
            hooks.step(s, step)
        else:
            if step == 0:
                s.alloc_all(state_tensors, "optimizer_states")
            sc = s.alloc_all(scratch, "temporaries")
            s.free_all(sc)
        s.free_all(grads)  # zero_grad(set_to_none=True)
        s.phase("end")
        if step == 0 and hooks is None and rank is None and _REPEAT_STEPS:
            # every later step is this one without the tensors it keeps (the optimizer states, the cuBLAS
            # workspaces): Stream.again copies it so (tests/test_stream_repeat.py builds it both ways)
            first_step = (at_step, s.mark())

    if job.optimizer in ("paged-adamw-8bit", "paged-adamw"):
        notes.append("paged optimizer states live in CUDA unified memory: not in PyTorch's allocator, "
                     "resident on the GPU while it has room, paged to the host under pressure")
    r = s.accounted = account(s)
    phases = {k: v for k, v in r.phases.items() if k in ("forward", "backward", "optimizer_step")}
    return r.components, r.peak_phase, phases, notes


def _kv_bytes_per_token(spec: ModelSpec, job: Job, total_len: int) -> float:
    """Keys and values kept by ``DynamicCache`` for one sequence of ``total_len`` tokens: per layer
    2 x kv_heads x head_dim (values: v_head_dim) elements per token; sliding-window layers keep at most
    the window; MLA layers in ``transformers`` cache the decompressed per-head keys and values."""
    e = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}.get(job.kv_cache_dtype, st.compute_bytes(job.precision))
    total = 0.0
    for b in spec.blocks:
        at = b.attention
        kvh = at.num_heads if at.kind == "mla" else at.num_kv_heads
        per_tok = kvh * (at.head_dim + at.v_head_dim) * e
        length = min(total_len, at.sliding_window) if at.sliding_window else total_len
        total += per_tok * length * b.count
    return total


def _forward_temporaries(s, tensors, tokens: int, budget: float) -> None:
    """The layer's forward op by op (the tensors of :func:`layers.layer_tensors_per_token`, none kept): each
    lives until the next one exists, so the allocator sees the real sequence of sizes. A pair that would exceed
    ``budget`` (the layer's widest moment, which the peak counts) is left out: the order of sizes is what this
    adds, the peak stays the closed-form one."""
    pending, held = -1, 0.0
    for bpt, _saved in tensors:
        n = bpt * tokens
        if n + held > budget:
            continue
        h = s.alloc(n, "activations")
        s.free(pending)
        pending, held = h, n
    s.free(pending)


_PLAIN_CE_MLM = ("bert", "roberta", "distilbert")


def _plain_ce_mlm(spec: ModelSpec, job: Job) -> bool:
    """Whether the masked-LM loss is ``nn.CrossEntropyLoss()(scores.view(-1, V), labels.view(-1))`` on the
    16-bit scores under autocast (``transformers`` 5.17 ``modeling_bert.py`` ``BertForMaskedLM.forward``,
    ``modeling_roberta.py`` ``RobertaForMaskedLM.forward``, ``modeling_distilbert.py``
    ``DistilBertForMaskedLM.forward``) rather than ``ForMaskedLMLoss``'s explicit ``.float()``: at the loss
    backward 10 bytes per logit are live (autocast's fp32 copy, the 16-bit log_softmax output, one fp32
    gradient), not 12."""
    return (spec.head == "masked_lm" and spec.model_type in _PLAIN_CE_MLM
            and st.compute_bytes(job.precision) != 4)


def _sliding_mask_bytes(spec: ModelSpec, job: Job, batch: int, prompt_len: int) -> int:
    """The boolean sliding-window mask the prefill builds for SDPA when the prompt is longer than a layer's
    window: ``[batch, 1, P, P]`` one byte each, alive through the prefill (``transformers`` 5.17
    ``masking_utils.create_sliding_window_causal_mask`` -> ``sdpa_mask``: a causal mask without padding may be
    skipped for ``is_causal``, a window narrower than the prompt cannot). Eager attention is not counted here.

    Only ``generate()`` passes an attention mask (all ones): its padding term makes the mask depend on the batch,
    so ``[batch, 1, P, P]`` is materialised. A forward without one (the prefill-only reference call) evaluates
    the mask function by broadcasting to ``[1, 1, P, P]`` and ``expand``s it to the batch, a view (``sdpa_mask``,
    "Option 1"): ``P x P`` bytes. Measured: phi-3-mini prefill of 2048 tokens at batch 47 holds one 4 MiB mask
    (validation/probes/memory_history.py), not 47 of them."""
    if job.attention != "sdpa":
        return 0
    windows = [b.attention.sliding_window for b in spec.blocks if b.attention.sliding_window]
    if not windows or prompt_len <= min(windows):
        return 0
    return (batch if job.new_tokens > 0 else 1) * prompt_len * prompt_len


def _kv_stored_len(window: int | None, total_len: int, prefill: bool) -> int:
    """Tokens of storage one layer's cached keys (or values) hold at ``total_len`` tokens.

    ``transformers`` 5.17 ``cache_utils.DynamicSlidingWindowLayer.update`` keeps
    ``torch.cat([keys, new])[:, :, -window + 1:, :]``: a view, so the whole ``cat`` result stays allocated.
    After the prefill that is the whole prompt on every layer, sliding or not; from the first decode step on
    the ``cat`` is of at most ``window - 1`` cached tokens plus the new one, so ``min(total_len, window)``."""
    if not window or prefill:
        return total_len
    return min(total_len, window)


def _kv_layer_bytes(spec: ModelSpec, job: Job, bi: int, total_len: int, prefill: bool = False) -> tuple[int, int]:
    """Keys and values of one layer of block ``bi`` for one sequence at ``total_len`` tokens (see
    :func:`_kv_bytes_per_token`): two tensors, capped at a sliding window except right after the prefill
    (:func:`_kv_stored_len`)."""
    e = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}.get(job.kv_cache_dtype, st.compute_bytes(job.precision))
    at = spec.blocks[bi].attention
    kvh = at.num_heads if at.kind == "mla" else at.num_kv_heads
    length = _kv_stored_len(at.sliding_window, total_len, prefill)
    return kvh * at.head_dim * e * length, kvh * at.v_head_dim * e * length


def _decode_expert_gathers(spec: ModelSpec, b: Block, batch: int, e: int) -> tuple[int, ...]:
    """The expert-weight copies one decode step of an MoE block makes on a GPU: ``()`` where none.

    ``generate()`` swaps the default ``grouped_mm`` experts for ``batched_mm`` around its decode loop on any
    non-CPU device (``transformers`` 5.17 ``generation/utils.py`` ``_optimize_model_for_decode``), and
    ``integrations/moe.py`` ``batched_mm_experts_forward`` gathers the weights of every (token, expert) pair:
    ``gate_up_proj[expert_ids]`` (``up_proj`` without a gate), then ``down_proj[expert_ids]`` while the first
    copy is still bound. Returns (the gate/up copy, the down copy) in bytes; the prefill keeps ``grouped_mm``.
    Measured: OLMoE-1B-7B generate at batch 110 on a 48 GiB card ran out of memory asking for the 3.44 GiB down
    copy with the 6.88 GiB gate/up copy alive (validation/probes/memory_history.py, fit-miss histories)."""
    if not fw.fused_experts(b):
        return ()
    rows = batch * b.moe.top_k
    inter = b.moe.expert_intermediate_size
    H = spec.hidden_size
    return rows * (2 * inter if fw.experts_gated(b) else inter) * H * e, rows * H * inter * e


def _decode_stretches(spec: ModelSpec, layers, prompt_len: int, new_tokens: int) -> list[tuple[int, int]]:
    """The decode steps ``1 .. new_tokens - 1`` cut into stretches ``(first, last)`` over which every size a
    step makes is affine in the step: the caches (:func:`_kv_stored_len`), ``generate()``'s ids and mask and the
    math kernel's tensors grow by the same bytes each step, except that a sliding layer's cache stops at its
    window: a stretch ends at the step whose length reaches a window, the next starts after it."""
    last = new_tokens - 1
    cuts = sorted({w - prompt_len for bi in set(layers) if (w := spec.blocks[bi].attention.sliding_window)
                   and 1 <= w - prompt_len < last})
    out, lo = [], 1
    for c in cuts + [last]:
        if c >= lo:
            out.append((lo, c))
            lo = c + 1
    return out


def _infer(spec: ModelSpec, job: Job, stream=None, calls: int = 2) -> tuple[dict[str, int], str, dict[str, int], list[str]]:
    """Build the inference run's event stream (a warm-up call, then the measured one) and account it.

    Prefill runs the layers one after another (each layer's transients freed before the next); ``generate()``
    keeps each layer's keys and values in ``DynamicCache``, which grows them by ``torch.cat`` every decode step:
    a new tensor one token longer, the old one freed (``transformers`` 5 ``DynamicLayer.update``)."""
    from .events import PyStream, account

    s = stream if stream is not None else PyStream()
    B, P, N = job.batch_size, job.prompt_len, job.new_tokens
    V, H = spec.vocab_size, spec.hidden_size
    e = st.compute_bytes(job.precision)
    res = 4 if job.precision in ("32-true", "16-mixed", "bf16-mixed") else 2
    weights = st.weight_bytes(spec, job)
    qstate = quant.quant_state_bytes(spec, job) if job.quantization != "none" else 0
    # Under inference_mode autocast does not keep its cast cache (measured: llama-3.2-1b bf16-mixed prefill
    # holds no 16-bit weight copies); one linear's 16-bit copy exists at a time.
    cache = 2 * max([lin.in_features * lin.out_features for b in spec.blocks for lin in b.linears]
                    + [spec.lm_head_params]) if st.autocast_cache_bytes(spec, job) else 0
    notes: list[str] = []
    I_eff = 0
    qkv = 0
    for b in spec.blocks:
        at = b.attention
        qkv = max(qkv, at.num_heads * (at.head_dim + at.v_head_dim) + 2 * at.num_kv_heads * at.head_dim)
        if b.moe is not None:
            # experts run one at a time, except where every token goes through all of them at once (Llama 4)
            I_eff = max(I_eff, b.moe.expert_intermediate_size * 3 * (b.moe.num_experts if b.moe.all_experts else 1),
                        b.moe.shared_intermediate_size * 3)
        elif b.mlp is not None:
            I_eff = max(I_eff, b.mlp.intermediate_size * (3 if b.mlp.gated else 2))
    nh = max(b.attention.num_heads for b in spec.blocks)

    def layer_transient(tokens: int) -> list[float]:
        """A layer's live temporaries at its widest: the residual and its normed copy, and the MLP's (or
        q/k/v's) widest intermediate; eager attention's scores instead when they are larger."""
        t = [tokens * H * res, tokens * H * res, tokens * max(I_eff, qkv) * e]
        if job.attention == "eager":
            alt = [tokens * H * res, tokens * H * res, tokens * qkv * e, B * nh * (tokens // B) * (4 + e)]
            if sum(alt) > sum(t):
                t = alt
        return t

    layers = spec.layer_blocks or tuple(_layer_order(spec))
    L = len(layers)
    mixed = _MIXED[job.precision] == "mixed"
    step_shape = fw.PrefillShape(tokens=B, batch=B, prompt=1, e=e, r=res, mixed=mixed, attention=job.attention,
                                 use_cache=True)
    math_blocks = [spec.blocks[bi].attention for bi in set(layers) if fw.math_sdpa(step_shape, spec.blocks[bi].attention)]

    def math_kv(length: int) -> list[float]:
        """The math kernel's context-long decode tensors of the widest such layer (none without it)."""
        if not math_blocks:
            return []
        at = max(math_blocks, key=lambda a: a.num_heads * (2 * a.head_dim + a.v_head_dim))
        n = B * at.num_heads * length * e
        return [n * at.head_dim, n * at.v_head_dim, n * at.head_dim]
    moe_width = {bi: (max(b.moe.expert_intermediate_size * 3 * (b.moe.num_experts if b.moe.all_experts else 1),
                          b.moe.shared_intermediate_size * 3) if b.moe is not None else 0)
                 for bi, b in enumerate(spec.blocks)}
    decode_gathers = {bi: _decode_expert_gathers(spec, b, B, e) for bi, b in enumerate(spec.blocks)}
    gathers = any(decode_gathers[bi] for bi in layers)  # else each step's cache growth is one Stream.regrow
    blocks_used = list(dict.fromkeys(layers))  # the blocks the layers use, in first-use order
    final_norm = spec.blocks[layers[-1]].norm if layers else "rms"
    vocab_out = V if spec.head in ("causal_lm", "masked_lm") else 0
    s.phase("load")
    s.alloc_all(_weight_tensors(spec, job, list(layers), weights), "weights")
    if qstate:
        for _ in layers:
            s.alloc(qstate / max(1, L), "weights")
    s.alloc(cache, "autocast_cache")
    if spec.tie_word_embeddings and spec.head == "causal_lm" and calls > 1 and job.quantization == "none":
        # building the model makes the head's own weight before tie_weights() points it at the embedding: one
        # embedding-sized tensor, freed, its segment left cached (measured: the load peak of every tied model
        # is its weights plus one embedding: Llama-3.2-1B +501 MiB, Gemma-3-1B +576, Qwen3-4B +741). The card
        # verdict's single call follows find_max_batch, which empties the cache after loading.
        s.free(s.alloc(spec.vocab_size * spec.hidden_size * st.param_bytes(job.precision), "weights"))
    prompt_ids = s.alloc(B * P * 8, "temporaries")
    for call in range(calls):
        if call == 1:
            s.reset_peaks()
        s.phase("prefill")
        if call == 0:
            # one cuBLAS handle's workspace: inference runs every matmul on the main thread (training's backward
            # adds the autograd thread's handle). Measured: 32 MiB "other" on 20 of 23 generate/prefill records.
            s.alloc(st.CUBLAS_HANDLE_WORKSPACE_BYTES, "temporaries")
        T = B * P
        sh = fw.PrefillShape(tokens=T, batch=B, prompt=P, e=e, r=res, mixed=mixed, attention=job.attention,
                             use_cache=N > 0, quantization=job.quantization)
        # generate() builds the attention mask (ones, int64) and grows it with input_ids every step
        ids = amask = -1
        if N > 0:
            ids = s.alloc(B * P * 8, "temporaries")
            amask = s.alloc(B * P * 8, "temporaries")
        mask = s.alloc(_sliding_mask_bytes(spec, job, B, P), "activations" if N == 0 else "temporaries")
        emb = fw.embed(s, spec, sh)
        rope = fw.rope_tables(s, spec, sh)
        x = emb
        kv: list[list[int]] = []
        before = None  # the layer before, for Stream.repeat: (signature, mark, its input, its output, its cache)
        for i, bi in enumerate(layers):
            kvb = tuple(B * n for n in _kv_layer_bytes(spec, job, bi, P, prefill=True))
            if _REPEAT_LAYERS:
                # a layer of the same block, cache sizes and input rule as the one before emits its stretch again
                # (the one tensor from before it that it frees is its input)
                sig = (bi, kvb, i > 0)
                at = s.mark()
                if before is not None and before[0] == sig:
                    _, mark, x_t, out_t, cached_t = before
                    made = out_t >= mark[1] and all(h < 0 or h >= mark[1] for h in cached_t)  # in the stretch
                    d = s.repeat(mark, {x_t: x}) if made else None
                    if d is not None:
                        before = (sig, at, x, out_t + d, [h + d if h >= 0 else -1 for h in cached_t])
                        x = before[3]
                        kv.append(before[4])
                        continue
            x_in = x
            x, cached = fw.decoder_layer(s, spec, spec.blocks[bi], sh, x, kvb, free_input=i > 0,
                                         moe_width=moe_width[bi])
            kv.append(cached)
            if _REPEAT_LAYERS:
                before = (sig, at, x_in, x, cached)
        hn = fw.norm(s, T * H, sh, final_norm)
        if x != emb:
            s.free(x)
        s.free(emb)
        s.free_all(rope)
        s.free(mask)
        if N == 0:
            s.phase("head")
            logits = (fw.logits_head(s, spec, sh, T, vocab_out) if vocab_out
                      else s.alloc(B * spec.num_labels * 4, "logits_and_loss"))
            s.free(hn)
            s.free(logits)
            continue
        # the last position's logits and generate()'s fp32 copy of them
        out = [fw.logits_head(s, spec, sh, B, V)]
        s.free(hn)
        out.append(s.alloc(B * V * 4, "logits_and_loss"))
        s.phase("decode")
        step_transient = layer_transient(B)  # the same every step
        held = [out, [ids, amask]]  # the step's logits and generate()'s id and mask tensors, made anew each step

        def decode_step(step: int) -> None:
            length = P + step
            # one token per sequence: the layers' transients are tiny and alike, one set stands for them all
            # (with fp32 grouped-query attention the math kernel repeats the cache's k and v to every head and
            # scales k^T: three context-long tensors)
            tmp = s.alloc_all(step_transient + math_kv(length), "activations")
            # the layers of one block grow by the same sizes: computed once a step
            sizes_of = {bi: [B * x for x in _kv_layer_bytes(spec, job, bi, length)] for bi in blocks_used}
            if not gathers:  # every layer's growth in one call
                s.regrow(kv, [sizes_of[bi] for bi in layers], "kv_cache")
            for i, bi in enumerate(layers if gathers else ()):  # MoE expert gathers between the layers' growth
                new = s.alloc_all(sizes_of[bi], "kv_cache")
                s.free_all(kv[i])
                kv[i] = new
                if decode_gathers[bi]:
                    up, down = decode_gathers[bi]
                    a = s.alloc(up, "activations")
                    d = s.alloc(down, "activations")  # down_proj[expert_ids] while the gate/up copy is alive
                    s.free(a)
                    s.free(d)
            s.free_all(tmp)
            s.free_all(held[0])
            held[0] = [s.alloc(x, "logits_and_loss") for x in (B * V * e, B * V * 4)]
            grown = [s.alloc(B * length * 8, "temporaries"), s.alloc(B * length * 8, "temporaries")]
            s.free_all(held[1])  # the ids, then the mask
            held[1] = grown

        extend = getattr(s, "extend", None) if _EXTEND_DECODE else None
        for lo, hi in _decode_stretches(spec, layers, P, N):
            # the steps lo..hi: each size affine in the step (a sliding window's cap reached only at an end)
            step = lo
            if extend is not None and hi - lo >= 3:
                decode_step(lo)  # it frees the prefill's (or the stretch before's) tensors: not a template
                a = s.mark()
                decode_step(lo + 1)
                b = s.mark()
                decode_step(lo + 2)
                d = extend(a, b, s.mark(), hi - lo - 2)
                step = lo + 3
                if d is not None:  # the state is that of the last step made: the second template's, shifted
                    for t in kv + held:
                        t[:] = [h + d if h >= b[1] else h for h in t]
                    step = hi + 1
            for k in range(step, hi + 1):
                decode_step(k)
        out, (ids, amask) = held
        s.free_all(out)
        s.free(ids)
        s.free(amask)
        for pair in kv:
            s.free_all(pair)
    s.free(prompt_ids)
    r = s.accounted = account(s)
    phases = {k: v for k, v in r.phases.items() if k in ("prefill", "head", "decode")}
    return r.components, r.peak_phase, phases, notes


def _stream(spec: ModelSpec, job: Job, *, fit: bool = False, per_job: dict | None = None):
    """The job's event stream and its accounting: (stream, components, peak phase, phases, notes).

    ``fit``: the stream a card's verdict replays. For inference that is one call after the model is loaded
    (what ``measure --find-max-batch`` runs per trial, and what a user's first ``generate()`` does), not the
    warm-up call plus the measured one: under a cap the warm-up's cached segments change where the second
    call's tensors land (a 12 GiB logits segment kept from the warm-up takes the next prefill's small
    tensors and cannot be reused for the next logits)."""
    from .events import build

    got = []
    if job.task == "train":
        stream = build(lambda s: got.append(_train(spec, job, s, per_job=per_job)))
    else:
        stream = build(lambda s: got.append(_infer(spec, job, s, calls=1 if fit else 2)))
    comps, phase, phases, notes = got[-1]
    return stream, comps, phase, phases, notes


def _spec_job_for_single(job: Job) -> Job:
    """The same job on one GPU (the per-rank micro-batch, no sharding): what a multi-GPU rank builds on."""
    return job.replace(strategy="single", gpus=1, gpus_per_node=1, offload="none", offload_device="cpu", tensor_parallel=1,
                       pipeline_parallel=1, expert_parallel=1, sequence_parallel=False)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def floor_bytes(job: Job, spec: ModelSpec) -> int:
    """A floor under the bytes live at one moment of ``job``'s event stream (single GPU only; 0 otherwise),
    from the counts the stream is built from, without building it: what the planner rules a micro-batch out
    by (with the CUDA context, past the card) before any stream or replay.

    The stream (:func:`_train`) loads the weights and never frees them (:func:`~memfit.estimator.states.weight_bytes`;
    the adapters apart, to stay a floor); the optimizer states (:func:`~memfit.estimator.states.optimizer_state_bytes`),
    made at the first step, stay. In full fine-tuning every gradient (:func:`~memfit.estimator.states.gradient_bytes`)
    is alive with them at the optimizer step. At the start of the second step's backward every layer still holds
    what its forward kept (:func:`_floor_terms`), and with a language-model head the loss holds 12 bytes per token
    and vocabulary entry: the fp32 log-softmax and two fp32 gradients of the scores (10 on the plain masked-LM
    path, :func:`_plain_ce_mlm`: autocast's fp32 copy, the 16-bit log-softmax, one fp32 gradient). With
    checkpointing, once the last layer's forward is recomputed, the other layers' inputs and its saved tensors are
    alive with a full fine-tune's head gradients. Inference loads the same weights. The
    capped replay cannot complete when this plus the CUDA context passes the card: the allocator's reserve is
    never below what is allocated. Less 1 MiB for the whole-byte rounding of each tensor in the stream."""
    if job.strategy != "single" or job.gpus > 1:
        return 0
    T = job.batch_size * job.seq_len
    quant4 = job.quantization in ("nf4", "fp4")
    k = (spec, _static_key(job), quant.bnb_row_tier(T) if quant4 else 0)
    terms = _FLOORS.get(k)
    if terms is None:
        if len(_FLOORS) >= 4096:
            _FLOORS.clear()
        terms = _FLOORS[k] = _floor_terms(spec, job)
    if len(terms) == 1:
        return terms[0]
    if len(terms) == 4:
        at_step, base, per_token, fixed = terms
        return max(0, int(max(at_step, base + per_token * T + fixed)) - 2**20)
    # checkpointing: every layer keeps its input, one tensor of T x ``one`` bytes (less 1)
    at_step, base, loss, one, n, rec_per_token, rec_fixed = terms
    kept = max(0.0, T * one - 1)
    return max(0, int(max(at_step, base + n * kept + loss * T, base + (n - 1) * kept + rec_per_token * T + rec_fixed))
               - 2**20)


#: floor_bytes' terms by (model, the job's fields but the micro-batch, the 4-bit row tier): the planner asks
#: for several micro-batches of each setting
_FLOORS: dict = {}


def _floor_terms(spec: ModelSpec, job: Job) -> tuple:
    """:func:`floor_bytes`'s parts that do not depend on the micro-batch's tokens ``T`` (the 4-bit row tier
    apart, which is part of the key): ``(bytes,)`` for inference; for training (the optimizer step's bytes,
    the weights and states under the backward, the backward's bytes per token, its fixed bytes); with
    checkpointing (the optimizer step's bytes, the weights and states, the loss's bytes per token, a layer
    input's bytes per token, the layers, and the last layer's recompute: per token, fixed).

    The layers' bytes at two moments of the second step's backward (:func:`_train`, single GPU). At its start,
    what every layer's forward kept: with checkpointing each layer's input (the tensor the layer before it
    made, the first layer's its own); without, each layer's saved tensors and its merged fused-LoRA weights,
    the first layer's first tensor left out (the embedding output where the model hands it over), and
    autocast's casts of the weights (mixed precision), which backward frees layer by layer. With
    checkpointing, also once the last layer's forward is recomputed: the other layers' inputs and that layer's
    saved tensors and merged weights."""
    weights = st.weight_bytes(spec, job)
    if job.task != "train":
        return (max(0, weights - 2**20),)
    if job.is_lora:
        weights -= st.lora_adapter_params(spec, job) * 4
        if spec.head == "seq_cls":
            weights -= spec.head_params * st.param_bytes(job.precision)
    states = st.optimizer_state_bytes(spec, job)
    at_step = weights + states + (0 if job.is_lora else st.gradient_bytes(spec, job))
    loss = 0
    if spec.head in ("causal_lm", "masked_lm"):
        loss = (10 if _plain_ce_mlm(spec, job) else 12) * spec.vocab_size
    layers = _layer_order(spec)
    if not layers:
        return at_step, weights + states, float(loss), 0.0
    if spec.model_type == "gpt_oss" and job.attention == "sdpa":
        job = job.replace(attention="eager")  # as estimate() and fits_on() run it
    amode = _act_mode(job)
    mode = _train_mode(spec, job, amode, job.batch_size * job.seq_len)

    def saved(bi: int) -> tuple[float, float]:
        per_token, fixed, _first = _saved_sums(spec, bi, mode)
        return per_token, fixed + st.fused_lora_merged_bytes(spec, job, spec.blocks[bi])

    if job.gradient_checkpointing:
        # at the recompute of the last layer: the other layers' inputs and its saved tensors, and a full
        # fine-tune's head weight gradients (made before the layers' backward)
        pt, fx = saved(layers[-1])
        if not job.is_lora:
            pb = st.param_bytes(job.precision)
            fx += (spec.head_params + spec.final_params) * pb
            if spec.tie_word_embeddings and spec.head in ("causal_lm", "masked_lm"):
                fx += spec.vocab_size * spec.hidden_size * pb
        one = (4 if amode in ("32", "mixed") else 2) * spec.hidden_size
        return at_step, weights + states, float(loss), one, len(layers), pt, fx
    per_block = {bi: saved(bi) for bi in set(layers)}
    per_token = sum(per_block[bi][0] for bi in layers)
    fixed = sum(per_block[bi][1] for bi in layers)
    _pt, _fx, first = _saved_sums(spec, layers[0], mode)
    per_token -= first[0]
    fixed -= first[1]
    # autocast's 16-bit weight casts (mixed precision): every layer's and the head's, freed only in backward
    fixed += st.autocast_cache_bytes(spec, job)
    return at_step, weights + states, per_token + loss, fixed


@lru_cache(maxsize=4096)
def _saved_sums(spec: ModelSpec, block_index: int, mode) -> tuple[float, float, tuple[float, float]]:
    """Of one layer's forward tensors (:func:`~memfit.estimator.layers.layer_forward_tensors`), the saved ones:
    bytes per token, bytes that do not scale, and the first tensor's two if it is saved ((0, 0) if not)."""
    from .layers import layer_forward_tensors

    tensors = layer_forward_tensors(spec, block_index, mode)
    kept = [(bpt, fixed) for bpt, saved, _h, _u, fixed in tensors if saved]
    first = (tensors[0][0], tensors[0][4]) if tensors and tensors[0][1] else (0.0, 0.0)
    return sum(k[0] for k in kept), sum(k[1] for k in kept), first


_SHARED: dict = {}  # ModelSpec -> its per-job dict (_shared_per_job), the most recently asked last
_SHARED_MODELS = 4  # models kept
_SHARED_JOBS = 96  # entries kept per model (up to three per job setting)


def _shared_per_job(spec: ModelSpec) -> dict:
    """The per-parameter tensors (_train's ``per_job``: weights, gradients, optimizer states, the same for every
    micro-batch of a job) that estimates without a Memo share: a sweep of micro-batches (``estimate`` per batch
    size, as a caller searching a batch does) builds them once. Pure functions of the model and the job's
    fields but the micro-batch; bounded (the least recently asked model goes first, a model's entries are
    dropped together when they pass :data:`_SHARED_JOBS`)."""
    d = _SHARED.pop(spec, None)
    if d is None or len(d) > _SHARED_JOBS:
        d = {}
    _SHARED[spec] = d
    while len(_SHARED) > _SHARED_MODELS:
        del _SHARED[next(iter(_SHARED))]
    return d


class Memo:
    """What the estimates of several jobs of one model share, for a caller that asks about many (the planner
    keeps one per ``plan()`` call; nothing is kept between calls): each job's event stream and accounting, made
    once (the allocator setting is not part of the stream: jobs differing only in ``expandable_segments`` share
    it), and each replay of it, by allocator setting and limit; and what a training stream builds the same for
    every micro-batch of a job (its weight tensors, gradients and optimizer states). Pass it to :func:`estimate` and
    :func:`fits_on`; their answers are the ones they give without it, field by field.

    A replay under a limit that never reached it (:attr:`~memfit.estimator.events.ReplayResult.limit_reached`
    false) is the unlimited run, and so it is the run under every larger limit: the limit enters the allocator
    model only where a new segment (or mapping) is asked for, ``alloc_block``'s check, and the estimate's
    allocator setting has no garbage-collection threshold (the one rule that reads the limit elsewhere). With
    the default setting the unlimited reserve never falls, and each check asks for the reserve it then reaches,
    so the unlimited peak reserve ``P`` says it outright: every limit of at least ``P`` is never reached."""

    __slots__ = ("_streams", "_ranks", "_replays", "_free", "_keep", "_peaks", "_spec", "_per_job")

    #: streams (and multi-GPU jobs' rank streams) kept at once, the most recently made: a stream of a large
    #: model holds tens of thousands of events, and a caller's questions about one job come together
    KEEP_STREAMS = 16

    def __init__(self, per_job: dict | None = None) -> None:
        self._keep = self.KEEP_STREAMS
        self._streams: dict = {}
        self._ranks: dict = {}
        self._replays: dict = {}  # (stream key, expandable, limit or None, address order) -> ReplayResult
        self._free: dict = {}  # (stream key, expandable, address order) -> a replay under a limit it never
        # reached (or unlimited)
        self._peaks: dict = {}  # stream key -> its peak allocated bytes
        self._spec: ModelSpec | None = None  # the one model it is for (jobs are keyed by their fields only)
        # what a training stream builds the same for every micro-batch (_train's per_job): this Memo's own, or the
        # one an estimate without a Memo shares with the next about the same model (_shared_per_job)
        self._per_job: dict = per_job if per_job is not None else {}

    @staticmethod
    def key(job: Job, **extra) -> tuple:
        """The job's fields but the allocator setting (what its stream depends on), with ``extra``."""
        return (job.batch_size, _static_key(job)) + tuple(sorted(extra.items()))

    def stream(self, spec: ModelSpec, job: Job, fit: bool = False):
        """:func:`_stream`, once per job (the caller copies what it changes: the notes)."""
        self._for(spec)
        k = self.key(job, fit=fit and job.task != "train")
        r = self._kept(self._streams, k, lambda: self._make(spec, job, fit))
        self._peaks[k] = sum(r[1][1].values())
        return r

    def _make(self, spec: ModelSpec, job: Job, fit: bool):
        """:func:`_stream` of ``job``; for a single-GPU training job whose setting has been built at two other
        micro-batches, made from those two instead (``Stream.interpolate``: a training stream's operations are the
        same at every micro-batch of a setting, :func:`_template_key`, and each size is affine in it), then
        accounted: the stream the build would make, byte for byte (validation/check_interpolated_streams.py
        checks it over the registry). The first two builds of a setting are kept as its templates."""
        if not (_INTERPOLATE and job.task == "train" and job.strategy == "single" and job.gpus == 1):
            return _stream(spec, job, fit=fit, per_job=self._per_job)
        store = self._per_job.get("templates")
        if store is None:
            store = self._per_job["templates"] = {}
        tkey = _template_key(job)
        got = store.pop(tkey, None) or []
        store[tkey] = got  # the most recently asked last
        while len(store) > _TEMPLATES:
            del store[next(iter(store))]
        if len(got) == 2:
            (ba, ra), (bb, rb) = got
            s = ra[0].interpolate(rb[0], ba, bb, job.batch_size)
            if s is not None:
                from .events import account

                acc = s.accounted = account(s)
                phases = {n: v for n, v in acc.phases.items() if n in ("forward", "backward", "optimizer_step")}
                return s, acc.components, acc.peak_phase, phases, list(ra[4])
        out = _stream(spec, job, fit=fit, per_job=self._per_job)
        if (len(got) < 2 and hasattr(out[0], "interpolate") and all(b != job.batch_size for b, _ in got)
                and (not got or got[0][1][4] == out[4])):
            got.append((job.batch_size, out))
        return out

    def _for(self, spec: ModelSpec) -> None:
        if self._spec is None:
            self._spec = spec
        elif spec is not self._spec:
            raise ValueError("a Memo serves one model (one ModelSpec); make another for another model")

    def _kept(self, made: dict, k, make):
        """``(k, made[k])``, made now if it is not kept; the least recently used one beyond
        :attr:`KEEP_STREAMS` is let go (its replays' results stay)."""
        r = made.pop(k, None)
        if r is None:
            r = (k, make())
            while len(made) >= self._keep:
                del made[next(iter(made))]
        made[k] = r
        return r

    def ranks(self, spec: ModelSpec, job: Job):
        """:func:`memfit.estimator.parallel._rank_streams`, once per job."""
        from .parallel import _rank_streams

        self._for(spec)
        return self._kept(self._ranks, self.key(job), lambda: _rank_streams(job, spec))

    def peak_allocated(self, spec: ModelSpec, job: Job, fit: bool = False) -> tuple[tuple, int]:
        """(key, the stream's peak allocated bytes), kept after the stream itself is let go."""
        self._for(spec)
        k = self.key(job, fit=fit and job.task != "train")
        peak = self._peaks.get(k)
        if peak is None:
            self.stream(spec, job, fit)
            peak = self._peaks[k]
        return k, peak

    def known(self, key, capacity_bytes: int | None, expandable: bool, large_addresses: str = "down"):
        """The replay of the stream under ``key`` with this limit if it was made, or is known without making it
        (the class note); else None."""
        from . import events

        if capacity_bytes is not None:
            capacity_bytes = max(0, int(capacity_bytes))
        r = self._replays.get((key, expandable, capacity_bytes, large_addresses))
        if r is None and capacity_bytes is not None and not events._FULL_REPLAY:
            free = self._free.get((key, expandable, large_addresses))
            if free is not None and free[0] <= capacity_bytes:
                r = free[1]
        return r

    def replay(self, key, stream, capacity_bytes: int | None, expandable: bool, large_addresses: str = "down"):
        """:func:`memfit.estimator.events.replay` of the stream under ``key``, once per limit (and address order),
        and not at all under a limit that a run already replayed shows is never reached (the class note). A copy."""
        from dataclasses import replace as replace_

        from .events import replay

        if capacity_bytes is not None:
            capacity_bytes = max(0, int(capacity_bytes))
        r = self.known(key, capacity_bytes, expandable, large_addresses)
        if r is None:
            r = replay(stream, capacity_bytes=capacity_bytes, expandable_segments=expandable,
                       uncapped=self._uncapped(key, expandable, large_addresses), large_addresses=large_addresses)
            self._keep_replay(key, capacity_bytes, expandable, large_addresses, r)
        return replace_(r, components=dict(r.components), phases=dict(r.phases), extras=dict(r.extras))

    def _uncapped(self, key, expandable: bool, large_addresses: str):
        return None if expandable else self._replays.get((key, False, None, large_addresses))

    def _spared(self, key, capacity_bytes: int, large_addresses: str) -> bool:
        """Whether the default setting's replay in this order under ``capacity_bytes`` needs no run: the uncapped
        one is known and stays within the limit (:func:`memfit.estimator.events.replay` then copies it)."""
        u = self._uncapped(key, False, large_addresses)
        return u is not None and u.completed and u.peak_reserved_bytes <= capacity_bytes

    def _keep_replay(self, key, capacity_bytes: int | None, expandable: bool, large_addresses: str, r) -> None:
        self._replays[(key, expandable, capacity_bytes, large_addresses)] = r
        if r.completed and not r.limit_reached:
            # the smallest limit known never to be reached: the peak reserve (default setting, the class
            # note), else the limit this run had (expandable segments map less than they check; the
            # unlimited expandable replay is a stand-in, not the capped mode's run: none)
            at = r.peak_reserved_bytes if not expandable else capacity_bytes
            old = self._free.get((key, expandable, large_addresses))
            if at is not None and (old is None or at < old[0]):
                self._free[(key, expandable, large_addresses)] = (at, r)

    def verdict(self, key, stream, capacity_bytes: int, expandable: bool, training: bool):
        """The capped replay that decides whether the run fits: the replay under ``capacity_bytes``, and (with
        :data:`TRAINING_BOTH_ORDERS`, on) for a training run with the default setting that completes, also the one
        with new large segments at increasing addresses, which decides when it fails (:func:`fits_on`).

        Where neither is known and another core is free (:func:`_two_cores`), both orders replay at once, the second
        on a thread of the compiled replay's own beside the first, stopped when the first fails
        (:func:`memfit.estimator.events.replay_both`). The same replays, the same answers."""
        capacity_bytes = max(0, int(capacity_bytes))
        if (_both_orders(training, expandable) and _two_cores()
                and self.known(key, capacity_bytes, False) is None
                and self.known(key, capacity_bytes, False, "up") is None
                and not self._spared(key, capacity_bytes, "down") and not self._spared(key, capacity_bytes, "up")):
            from .events import replay_both

            got = replay_both(stream, capacity_bytes)
            if got is not None:
                for order, r in zip(("down", "up"), got):
                    if r is not None:
                        self._keep_replay(key, capacity_bytes, False, order, r)
        r = self.replay(key, stream, capacity_bytes, expandable)
        if _second_order(r, training, expandable):
            up = self.replay(key, stream, capacity_bytes, expandable, "up")
            if not up.completed:
                up.extras["order"] = "up"
                return up
        return r

    def known_verdict(self, key, capacity_bytes: int, expandable: bool, training: bool):
        """:meth:`verdict`'s replay if it is known without replaying (:meth:`known`), else None."""
        r = self.known(key, capacity_bytes, expandable)
        if r is None or not _second_order(r, training, expandable):
            return r
        up = self.known(key, capacity_bytes, expandable, "up")
        return up if up is None or not up.completed else r


_CORES: list = []  # [whether this process may run on two cores], once asked


def _two_cores() -> bool:
    """Whether a verdict's two orders may replay at once (:func:`memfit.estimator.events.replay_both`): this
    process may run on two cores or more, and ``MEMFIT_NO_THREADS`` is not set."""
    if not _CORES:
        import os

        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
        _CORES.append(n > 1 and os.environ.get("MEMFIT_NO_THREADS", "") in ("", "0"))
    return _CORES[0]


def _both_orders(training: bool, expandable: bool) -> bool:
    """Whether a verdict is decided by both orders of new large segments' addresses: a training run with the
    default setting (:data:`TRAINING_BOTH_ORDERS`)."""
    return training and not expandable and TRAINING_BOTH_ORDERS


def _second_order(r, training: bool, expandable: bool) -> bool:
    """Whether the verdict also needs the replay with new large segments at increasing addresses: ``r`` (the
    first order's) completed, where both orders decide (:func:`_both_orders`)."""
    return r.completed and _both_orders(training, expandable)


#: Whether a training run's verdict (default allocator setting) also needs the replay with new large segments at
#: increasing addresses to complete (:func:`fits_on`). Chosen on the 159 H200 boundaries (exact 128 -> 133, above
#: 13 -> 7); on boundaries-13's 15 pairs, held out (H100, with fresh-process first trials where the searches and
#: memfit disagreed), above 3 -> 1, one below 1 -> 3, exact 11 either way
#: (validation/fit-vs-boundaries-13-heldout*.txt).
#: ``validation/score_fit.py --one-order`` scores the verdict without it.
TRAINING_BOTH_ORDERS = True

#: the verdict's note when a training run completes in one order of segment addresses only (:func:`fits_on`)
ONE_ORDER_NOTE = ("the run completes with new allocator segments at decreasing addresses but not at increasing ones "
                  "(equal-size cached blocks are taken lowest address first, and which order the driver gives is not "
                  "known): counted as does not fit")


def estimate(job: Job, spec: ModelSpec | None = None, *, gpu_memory_bytes: int | None = None,
             memo: Memo | None = None) -> Breakdown:
    """Estimate the per-GPU memory of ``job`` (single GPU) without torch.

    The run's event stream (:mod:`memfit.estimator.events`) gives peak allocated and its components; its
    replay through the caching-allocator model gives peak reserved, and the device total is that plus the CUDA
    context. With ``gpu_memory_bytes`` (a card's total memory) the replay is also run with the allocator capped
    at the card less the CUDA context: ``fits`` says whether the run completes, ``headroom_bytes`` what is left.
    ``spec`` skips the model lookup (the planner passes it when it sweeps batch sizes); ``memo`` (a
    :class:`Memo`) reuses streams and replays already made for it.
    """
    from ..breakdown import Breakdown
    from .events import cuda_context_bytes

    spec = _spec(job, spec)
    from ..checks import check_job_for_model

    remarks = check_job_for_model(job, spec)  # raises where no run exists
    if job.strategy != "single" or job.gpus > 1:
        from .parallel import estimate_parallel  # DDP, FSDP, ZeRO, offload, TP/PP/SP/EP: per rank

        bd = estimate_parallel(job, spec, gpu_memory_bytes=gpu_memory_bytes, memo=memo)
        bd.notes.extend(remarks)
        return bd
    # Gemma 2 under sdpa runs transformers 5.17's sdpa path, training and inference alike
    # (Gemma2PreTrainedModel._supports_sdpa = True; integrations/sdpa_attention.py drops the soft-capping), as traced
    if spec.model_type == "gpt_oss" and job.attention == "sdpa":
        job = job.replace(attention="eager")  # GptOssPreTrainedModel._supports_sdpa = False (attention sinks)
    memo = memo if memo is not None else Memo(per_job=_shared_per_job(spec))
    key, (stream, comps, phase, phases, notes) = memo.stream(spec, job)
    comps, phases, notes = dict(comps), dict(phases), list(notes)
    peak = sum(comps.values())
    expandable = bool(getattr(job, "expandable_segments", False))
    ctx = cuda_context_bytes(job.task, job.quantization)
    # paged optimizer state is CUDA unified memory: resident on the GPU while there is room, so nvidia-smi
    # counts it even though PyTorch's allocator does not
    paged = st.paged_optimizer_host_bytes(spec, job)
    extras: dict = {"events": len(stream), "allocator": "expandable_segments" if expandable else "default",
                    "largest_component": max(comps, key=comps.get) if comps else ""}
    fits = headroom = None
    if gpu_memory_bytes is None:
        reserved = memo.replay(key, stream, None, expandable).peak_reserved_bytes
    else:
        fkey, fit_stream = key, stream
        if job.task != "train":
            fkey, (fit_stream, *_) = memo.stream(spec, job, fit=True)
        # the capped replay first: where it completes its reserve is the answer and the unlimited one is not
        # needed (where that one stays within the cap the two are the same run, events.replay)
        capped = memo.verdict(fkey, fit_stream, gpu_memory_bytes - ctx - paged, expandable, job.task == "train")
        fits = capped.completed
        if fits:
            reserved = capped.peak_reserved_bytes  # what the card would show: cached segments freed under pressure
            extras["decided_by"] = extras["largest_component"]
        else:
            if capped.extras.get("order") == "up":
                notes.append(ONE_ORDER_NOTE)
            reserved = memo.replay(key, stream, None, expandable).peak_reserved_bytes
            extras.update(decided_by=capped.failed_component, failed_request_bytes=capped.failed_request_bytes,
                          failed_phase=capped.failed_phase)
            notes.append(f"out of memory in {capped.failed_phase or 'load'}: a {_gib(capped.failed_request_bytes)} "
                         f"request ({capped.failed_component}) with {_gib(capped.reserved_at_failure_bytes)} reserved")
            if peak + ctx + paged <= gpu_memory_bytes:
                line = (f"fails through fragmentation only: peak allocated {_gib(peak)} plus the CUDA context fits "
                        f"the card, but the caching allocator's free blocks do not fit the next request")
                if not expandable:
                    alt = memo.replay(fkey, fit_stream, gpu_memory_bytes - ctx - paged, True)
                    extras["fits_with_expandable_segments"] = alt.completed
                    line += ("; with expandable_segments: true it " +
                             ("runs" if alt.completed else "still does not fit"))
                notes.append(line)
        headroom = gpu_memory_bytes - (reserved + ctx + paged)
    total = reserved + ctx + paged
    return Breakdown(
        engine="estimate", model=spec.name, job=job.to_dict(), parameters=spec.parameters,
        trainable_parameters=st.trainable_params(spec, job), components=comps, peak_allocated_bytes=peak,
        peak_reserved_bytes=reserved, device_total_bytes=total, peak_phase=phase, phases=phases,
        host_bytes=paged, notes=notes + remarks, gpu_memory_bytes=gpu_memory_bytes, fits=fits, headroom_bytes=headroom,
        extras=extras)


def fits_on(job: Job, gpu_memory_bytes: int, spec: ModelSpec | None = None, *, memo: Memo | None = None) -> bool:
    """Whether the reference run of ``job`` completes with the allocator capped at the card less the CUDA
    context (the replay of the estimate's event stream, not a comparison of totals). ``memo``: as :func:`estimate`.

    A training run with the default allocator setting must complete twice: with new large segments at
    decreasing addresses (the model's order, which the H200 allocator histories follow) and at increasing ones
    (:data:`TRAINING_BOTH_ORDERS`). Addresses decide which of several equal-size cached blocks a request takes
    (the lowest), and a training step reuses many: each layer's blocks, the loss's vocabulary-sized ones in the
    second step. Which order the driver gives is not known once segments have been freed (the model's load, an
    out-of-memory retry); on the rehearsed boundaries a run that completes in one order only is often one that a
    fresh process on the card fails. Inference verdicts follow the one order, which the decode and prefill
    boundaries match."""
    from ..checks import check_job_for_model

    spec = _spec(job, spec)
    check_job_for_model(job, spec)  # an impossible job is an error here as in estimate(), not a verdict
    return _fits_on(job, gpu_memory_bytes, spec, memo)


def _fits_on(job: Job, gpu_memory_bytes: int, spec: ModelSpec, memo: Memo | None = None) -> bool:
    """:func:`fits_on` for a job already checked against ``spec``."""
    from .events import cuda_context_bytes

    if job.strategy != "single" or job.gpus > 1:  # every rank's stream, replayed under the cap
        from .parallel import fits_parallel

        return fits_parallel(job, spec, gpu_memory_bytes, memo=memo)
    if spec.model_type == "gpt_oss" and job.attention == "sdpa":
        job = job.replace(attention="eager")
    cap = gpu_memory_bytes - cuda_context_bytes(job.task, job.quantization) - st.paged_optimizer_host_bytes(spec, job)
    expandable = bool(getattr(job, "expandable_segments", False))
    memo = memo if memo is not None else Memo(per_job=_shared_per_job(spec))
    key, peak = memo.peak_allocated(spec, job, fit=True)
    if peak > cap:
        return False  # the tensors alone do not fit: no replay needed
    train = job.task == "train"
    r = memo.known_verdict(key, cap, expandable, train)
    if r is None:
        r = memo.verdict(key, memo.stream(spec, job, fit=True)[1][0], cap, expandable, train)
    return r.completed


def max_batch_size(job: Job, gpu_memory_bytes: int, *, limit: int = 1 << 16, spec: ModelSpec | None = None) -> int:
    """Largest micro-batch (for inference: number of sequences) that runs on a card of ``gpu_memory_bytes``:
    the capped replay of its event stream completes (0 if none does). The search doubles from 1, then bisects
    (:func:`memfit.boundary.largest_passing`)."""
    from ..boundary import largest_passing

    from ..checks import check_job_for_model

    spec = _spec(job, spec)
    check_job_for_model(job, spec)  # what the check looks at does not depend on the batch: once
    limit = max(1, int(limit))
    return largest_passing(lambda b: _fits_on(job.replace(batch_size=b), gpu_memory_bytes, spec), limit=limit)[0]


def model_states(parameters: int, *, precision: str = "32-true", optimizer: str = "adamw",
                 trainable: int | None = None) -> dict[str, int]:
    """Weights, gradients and optimizer states of any model from its parameter count (bytes).

    For a plain ``nn.Module`` (no ModelSpec): ``trainable`` defaults to all parameters. Factored
    optimizers (adafactor) need matrix shapes and are not supported here."""
    from ..errors import JobError as _JobError

    if optimizer == "adafactor":
        raise _JobError("adafactor's state depends on matrix shapes; estimate a ModelSpec instead")
    trainable = parameters if trainable is None else trainable
    pb = st.param_bytes(precision)
    per_param_state = {"adamw": 2 * pb, "adam": 2 * pb, "sgd": 0, "sgd-momentum": pb, "lion": pb,
                       "adamw-8bit": 2, "paged-adamw-8bit": 0, "paged-adamw": 0}
    if optimizer not in per_param_state:
        raise _JobError(f"unknown optimizer {optimizer!r}; one of {', '.join(per_param_state)} or adafactor")
    return {"weights": parameters * pb, "gradients": trainable * pb,
            "optimizer_states": trainable * per_param_state[optimizer],
            "autocast_cache": 0}
