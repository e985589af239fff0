"""Per-GPU memory of multi-GPU training: DDP, FSDP (FSDP1), FSDP2, DeepSpeed ZeRO 1-3, offload, and
Megatron-style tensor / pipeline / sequence / expert parallelism. No torch.

One rank is one event stream, built by the single-GPU builder (``memfit.estimator._train``) with a
:class:`RankView`: the stage's layers, activations scaled for tensor and sequence parallelism, the earlier
micro-batches a pipeline stage holds, the loss on the last stage only, and the model states as the engine lays
them out, emitted by one hook class per engine (:class:`_ReplicatedStates`, :class:`_FSDPStates`,
:class:`_Zero12States`, :class:`_Zero3States`; plain DDP keeps the single-GPU states and adds its reducer
buckets). The stream's accounting gives peak allocated, its replay through the caching-allocator model peak
reserved, and its replay under a card's cap the fit (:func:`estimate_parallel`, :func:`fits_parallel`).

The stream is the one accounting: the closed-form moments that once stood beside it (and drifted from the
single-GPU rules whenever those moved) are gone. Each engine term below cites the source it was read from:

- torch DDP (``torch/nn/parallel/distributed.py``, ``torch/csrc/distributed/c10d/reducer.cpp``),
- FSDP2 ``fully_shard`` (``torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py``, ``_fsdp_collectives.py``),
- FSDP1 (``torch/distributed/fsdp/_runtime_utils.py``, ``_flat_param.py``),
- DeepSpeed 0.19 ZeRO (``deepspeed/runtime/zero/stage_1_and_2.py``, ``stage3.py``,
  ``partitioned_param_coordinator.py``, ``config.py``),
- Megatron-LM (Shoeybi et al. 2019; Narayanan et al. 2021, 1F1B; Korthikanti et al. 2022, activations with
  tensor and sequence parallelism).

The rank reported is the most loaded one: with pipeline parallelism each stage is estimated (the first holds
the embedding and the most micro-batches in flight, the last the head and the logits) and the largest wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..breakdown import Breakdown
from ..errors import JobError
from ..job import Job
from ..models.spec import ModelSpec
from . import states as st
from .events import cuda_context_bytes

__all__ = ["estimate_parallel", "zero_model_states", "megatron_activation_bytes", "Layout", "layout"]

#: NCCL communicator buffers and the collectives' kernels, outside PyTorch's allocator (device total only):
#: NCCL_BUFFSIZE (4 MiB) per channel and peer; a rough figure for one data-parallel communicator.
NCCL_CONTEXT_BYTES = 384 << 20

#: torch DDP's ``bucket_cap_mb`` default and the first bucket's cap (``dist._DEFAULT_FIRST_BUCKET_BYTES``).
DDP_FIRST_BUCKET_BYTES = 1 << 20

_ENGINE_COMPUTES_16 = ("fsdp", "fsdp2", "zero1", "zero2", "zero3")

#: Megatron's column-parallel linears (output split over the TP group); the row-parallel ones (o, down)
#: are split on their input. Both hold 1/t of the weight. Routers stay replicated.
_REPLICATED_ROLES = ("router", "shared_router")


# --------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """How the GPUs of a job are divided: data parallel x tensor parallel x pipeline stages."""

    gpus: int
    dp: int
    tp: int
    pp: int
    ep: int
    shard: int
    """GPUs the model states are sharded over (FSDP/ZeRO: the data-parallel group; HYBRID_SHARD: a node)."""
    sp: bool
    microbatches: int


def layout(job: Job) -> Layout:
    tp, pp, ep = job.tensor_parallel, job.pipeline_parallel, job.expert_parallel
    dp = job.gpus // (tp * pp)
    shard = dp
    if job.strategy == "fsdp" and job.fsdp_sharding == "HYBRID_SHARD":
        shard = max(1, min(dp, job.gpus_per_node // math.gcd(job.gpus_per_node, tp * pp)))
    if job.strategy in ("ddp", "single") or (job.strategy == "fsdp" and job.fsdp_sharding == "NO_SHARD"):
        shard = 1
    mb = job.pipeline_microbatches if job.pipeline_microbatches is not None else pp
    return Layout(gpus=job.gpus, dp=dp, tp=tp, pp=pp, ep=ep, shard=shard, sp=job.sequence_parallel, microbatches=mb)


@dataclass
class _Stage:
    """The parameters one rank holds before any sharding (after TP, PP and EP splits), as element counts."""

    index: int
    layers: list[int]
    """Model-order layer indices on this stage."""
    layer_params: list[float]
    layer_trainable: list[float]
    embed: float
    head: float
    """lm_head (or its tied copy on the last stage) and the final norm."""
    head_trainable: float
    embed_trainable: float
    layer_max: list[float]
    """The largest parameter of each layer (elements)."""
    first: bool
    last: bool
    in_flight: int
    """Micro-batches whose activations this stage holds at its peak (1F1B: pp - stage)."""

    memo: dict = field(default_factory=dict, repr=False, compare=False)
    """Sums computed once per estimate (the moments ask for them once per layer: without it the estimate
    is quadratic in the layer count)."""

    @property
    def params(self) -> float:
        if "params" not in self.memo:
            self.memo["params"] = sum(self.layer_params) + self.embed + self.head
        return self.memo["params"]

    @property
    def trainable(self) -> float:
        if "trainable" not in self.memo:
            self.memo["trainable"] = sum(self.layer_trainable) + self.head_trainable + self.embed_trainable
        return self.memo["trainable"]

    def params_through(self, k: int) -> float:
        """``sum(layer_params[:k + 1])``, from a prefix table made once."""
        if "prefix" not in self.memo:
            acc, table = 0.0, []
            for p in self.layer_params:
                acc += p
                table.append(acc)
            self.memo["prefix"] = table
        return self.memo["prefix"][k] if k >= 0 else 0.0

    def trainable_from(self, k: int) -> float:
        """``sum(layer_trainable[k:])``, from a suffix table made once."""
        if "suffix" not in self.memo:
            acc, table = 0.0, [0.0] * (len(self.layer_trainable) + 1)
            for i in range(len(self.layer_trainable) - 1, -1, -1):
                acc += self.layer_trainable[i]
                table[i] = acc
            self.memo["suffix"] = table
        return self.memo["suffix"][k]


def _layer_order(spec: ModelSpec) -> list[int]:
    if spec.layer_blocks and len(spec.layer_blocks) == spec.num_layers:
        return list(spec.layer_blocks)
    return [i for i, b in enumerate(spec.blocks) for _ in range(b.count)]


def _block_params_on_rank(spec: ModelSpec, bi: int, lay: Layout) -> float:
    """A layer's parameters on one rank: Megatron splits every linear over the TP group (column-parallel
    q/k/v/gate/up, row-parallel o/down), experts over the EP group; norms and routers are replicated
    (Shoeybi et al. 2019, section 3)."""
    b = spec.blocks[bi]
    total = float(b.other_params)
    for lin in b.linears:
        n = float(lin.params)
        if lin.role.startswith("expert"):
            n /= lay.ep
        if lin.role not in _REPLICATED_ROLES:
            n /= lay.tp
        total += n
    return total


def _stages(spec: ModelSpec, job: Job, lay: Layout) -> list[_Stage]:
    """Split the layers over the pipeline stages (the first ``L % pp`` stages take one more), the embedding
    on the first stage, the head on the last (a tied embedding is kept there too: Megatron's shared word
    embeddings). Vocabulary-parallel embedding and head hold 1/t of the table."""
    order = _layer_order(spec)
    L = len(order)
    if lay.pp > L:
        raise JobError(f"pipeline_parallel ({lay.pp}) is more than the model's {L} layers")
    per, extra = divmod(L, lay.pp)
    lora_per_layer = st.lora_adapter_params(spec, job) / max(1, L) if job.is_lora else 0.0
    tied_head = spec.tie_word_embeddings and spec.head in ("causal_lm", "masked_lm")
    vocab_table = spec.vocab_size * spec.hidden_size
    stages = []
    start = 0
    for s in range(lay.pp):
        n = per + (1 if s < extra else 0)
        idx = list(range(start, start + n))
        start += n
        layer_p = [_block_params_on_rank(spec, order[i], lay) for i in idx]
        layer_t = [lora_per_layer / lay.tp] * n if job.is_lora else list(layer_p)
        first, last = s == 0, s == lay.pp - 1
        embed = 0.0
        if first:
            embed = (spec.embedding_params - vocab_table) + vocab_table / lay.tp if spec.embedding_params >= vocab_table \
                else spec.embedding_params / lay.tp
        head = 0.0
        if last:
            head = spec.final_params + spec.head_params / lay.tp
            if tied_head and not first:
                head += vocab_table / lay.tp
        trainable = not job.is_lora
        # a tied head's gradient is the embedding's: it arrives with the head's backward, at the start
        head_t = head + (vocab_table / lay.tp if tied_head and first and last else 0.0)
        embed_t = embed - (vocab_table / lay.tp if tied_head and first and last else 0.0)
        layer_max = [max([lin.params / (lay.tp if lin.role not in _REPLICATED_ROLES else 1)
                          for lin in spec.blocks[order[i]].linears] or [0]) for i in idx]
        stages.append(_Stage(index=s, layers=idx, layer_params=layer_p, layer_trainable=layer_t, embed=embed,
                             layer_max=layer_max,
                             head=head, head_trainable=head_t if trainable else 0.0,
                             embed_trainable=embed_t if trainable else 0.0, first=first, last=last,
                             in_flight=max(1, min(lay.pp - s, lay.microbatches))))
    return stages


# --------------------------------------------------------------------------------------------- activations
def _tp_activation_factor(lay: Layout) -> float:
    """Share of a layer's saved activations one TP rank keeps (Korthikanti et al. 2022, eq. 2-4: per layer
    sbh(34 + 5as/h) bytes without parallelism; with tensor parallelism the 24 sbh inside attention and MLP are
    split and the 10 sbh of norms, dropout masks and residual inputs are replicated; with sequence
    parallelism everything is split): (10 + 24/t)/34, or 1/t with sequence parallelism."""
    if lay.tp == 1:
        return 1.0
    if lay.sp:
        return 1.0 / lay.tp
    return (10 + 24 / lay.tp) / 34


# --------------------------------------------------------------------------------------------- dtypes
def _compute_bytes(job: Job) -> int:
    return 4 if job.precision == "32-true" else 2


def _storage_bytes(job: Job) -> int:
    """Bytes per stored weight: DeepSpeed's bf16/fp16 engines keep 16-bit parameters (the fp32 copy is the
    master partition); torch DDP and FSDP keep the precision's storage dtype (fp32 for ``*-mixed``)."""
    if job.strategy.startswith("zero"):
        return _compute_bytes(job)
    return st.param_bytes(job.precision)


def _master_bytes(job: Job) -> int:
    """DeepSpeed's master partition: fp32 (``single_partition_of_fp32_groups`` / ``fp32_partitioned_groups_flat``,
    cloned from the 16-bit partition), bf16 with ``bf16_master_weights_and_grads`` (memfit's bf16-true)."""
    return 2 if job.precision in ("bf16-true", "16-true") else 4


def _opt_bytes_per_elem(spec: ModelSpec, job: Job, dtype_precision: str) -> tuple[float, float]:
    """(optimizer-state bytes, optimizer-step scratch bytes) per trainable element, with the states in the dtype
    of ``dtype_precision`` (torch.optim allocates them like the parameter they track)."""
    j = job.replace(strategy="single", gpus=1, gpus_per_node=1, offload="none", offload_device="cpu",
                    precision=dtype_precision,
                    tensor_parallel=1, pipeline_parallel=1, expert_parallel=1, sequence_parallel=False)
    n = st.trainable_params(spec, j)
    if n == 0:
        return 0.0, 0.0
    return st.optimizer_state_bytes(spec, j) / n, st.optimizer_step_temp_bytes(spec, j) / n


# --------------------------------------------------------------------------------------------- engine terms
def ddp_bucket_bytes(grad_bytes: float, lay: Layout) -> float:
    """DDP's reducer buckets: flat tensors of every trainable parameter's gradient (in its dtype), made at
    construction and kept for the process (``Reducer::initialize_buckets``; ``bucket_cap_mb`` decides how many,
    not how much: together they hold one full copy of the gradients). With ``gradient_as_bucket_view`` the
    ``.grad`` tensors are views into them instead of separate tensors. None without data parallelism."""
    return grad_bytes if lay.dp > 1 else 0.0


def fsdp2_root_params(stage: _Stage) -> float:
    """Elements in FSDP2's root group (``fully_shard(model)`` after the decoder layers): what no layer owns -
    embeddings, final norm, head. The root never reshards after forward (``FSDPState._lazy_init`` sets its
    ``post_forward_mesh_info`` to None), so its gathered parameters live from forward to the end of backward."""
    return stage.embed + stage.head


def zero_ipg_bucket_bytes(job: Job, cb: int) -> float:
    """DeepSpeed's independent-partition-gradient bucket: ``reduce_bucket_size`` elements of the gradient dtype
    (``setup_buckets`` in stage_1_and_2.py allocates it at the first gradient hook of a backward and frees it in
    ``_release_ipg_buffers``; a second one with ``overlap_comm``; stage3.py allocates one at init and keeps it)."""
    from ..deepspeed_config import zero_option

    rbs = zero_option(job, "reduce_bucket_size")
    if not zero_option(job, "contiguous_gradients"):
        return 0.0
    n = 2 if (zero_option(job, "overlap_comm") and job.strategy != "zero3") else 1
    return float(rbs) * cb * n


def zero3_persistent_params(spec: ModelSpec, job: Job, stage: _Stage, lay: Layout) -> float:
    """Parameters ZeRO-3 never partitions: those of at most ``stage3_param_persistence_threshold`` elements
    (default 1e5; norms and biases), kept whole on every rank (``ds_persist`` in
    deepspeed/runtime/zero/parameter_offload.py tests each parameter's ``ds_numel``).

    The test sees the tensor this rank holds: after tensor (and expert) parallelism has split a linear,
    its weight and bias are 1/t of their full size, and that share is what persists and what is counted.
    Weight and bias are separate parameters, each tested on its own."""
    from ..deepspeed_config import zero_option

    thr = zero_option(job, "stage3_param_persistence_threshold")
    order = _layer_order(spec)
    total = 0.0
    for i in stage.layers:
        b = spec.blocks[order[i]]
        if b.other_params and thr >= spec.hidden_size:
            total += b.other_params
        for lin in b.linears:
            split = (lay.tp if lin.role not in _REPLICATED_ROLES else 1) * (lay.ep if lin.role.startswith("expert") else 1)
            weight = lin.in_features * lin.out_features * lin.count / split
            bias = lin.out_features * lin.count / split if lin.bias else 0.0
            total += (weight if weight <= thr else 0.0) + (bias if bias <= thr else 0.0)
    if stage.last and spec.final_params <= thr:
        total += spec.final_params
    return total


def zero3_gathered_at_loss(spec: ModelSpec, job: Job, stage: _Stage) -> tuple[float, list[float]]:
    """Gathered (16-bit, full) parameters ZeRO-3 still holds when the loss is computed, and how much of each
    layer: ``partitioned_param_coordinator.__params_to_release`` keeps a module's parameters when the trace
    shows them used again within ``stage3_max_reuse_distance`` elements (default 1e9). A module at the end of
    forward is next used in backward after about twice the parameters that follow it; the lm_head (used
    again first) and the last layers are kept, at most ``stage3_max_live_parameters``."""
    from ..deepspeed_config import zero_option

    dist = zero_option(job, "stage3_max_reuse_distance")
    live = zero_option(job, "stage3_max_live_parameters")
    kept_layers = [0.0] * len(stage.layers)
    head = stage.head if stage.last else 0.0
    kept = head if head <= live else 0.0
    suffix = head
    for k in range(len(stage.layers) - 1, -1, -1):
        p = stage.layer_params[k]
        if 2 * suffix >= dist or kept + p > live:
            break
        kept_layers[k] = p
        kept += p
        suffix += p
    return head if head <= live else 0.0, kept_layers


# --------------------------------------------------------------------------------------------- per strategy
def _largest_param(spec: ModelSpec, lay: Layout) -> float:
    biggest = spec.vocab_size * spec.hidden_size / lay.tp
    for b in spec.blocks:
        for lin in b.linears:
            biggest = max(biggest, lin.in_features * lin.out_features / lay.tp)
    return biggest


# --------------------------------------------------------------------------------------------- the rank's stream
@dataclass
class RankView:
    """What :func:`memfit.estimator._train` needs to build one rank's event stream instead of one GPU's."""

    layers: list[int]
    """Block index of each layer this rank runs (its pipeline stage), in model order."""
    amode: str
    """Activation mode (:func:`_activation_mode`: the sharding engines compute in 16 bits without autocast)."""
    autocast: bool
    """Whether autocast's weight-cast cache exists (torch DDP under ``*-mixed`` only)."""
    last: bool
    """The last pipeline stage: final norm, head, logits and loss."""
    tp_share: float
    """Share of vocabulary-, MLP-width- and weight-sized tensors one TP rank holds (1/t)."""
    act_share: float
    """Share of a layer's saved activations (:func:`_tp_activation_factor`)."""
    seq_share: float
    """Share of residual-stream tensors (1/t with sequence parallelism, else 1)."""
    in_flight: int
    """Micro-batches whose activations the stage holds at its peak (1F1B)."""
    recv_bytes: float
    """The activation received from the previous stage / sent to the next (stages before the last)."""
    states: object | None
    """The engine's model-state hooks (:class:`_EngineStates`); None: the single-GPU states."""
    load_extra: tuple = ()
    """(bytes, component) allocated after the model loads (DDP's reducer buckets)."""
    grad_views: bool = False
    """DDP ``gradient_as_bucket_view``: the ``.grad`` tensors are views into the buckets."""
    first: bool = True
    """The first pipeline stage: the embedding and what its stage keeps."""


def _whole(pieces: list[float]) -> list[int]:
    """``pieces`` as whole bytes adding up to ``int(sum(pieces))`` (cumulative flooring: a term split into
    many tensors keeps the moments' byte count instead of gaining or losing a byte per tensor)."""
    out, acc, done = [], 0.0, 0
    for x in pieces:
        acc += x
        n = int(acc) - done
        out.append(n)
        done += n
    return out


def _even(total: float, n: int) -> list[int]:
    """``total`` bytes in ``n`` equal tensors (whole bytes)."""
    return _whole([total / max(1, n)] * max(1, n))


def _chunks(total: float, cap: float) -> list[int]:
    """``total`` bytes in pieces of at most ``cap`` (DDP's 25 MiB buckets, ZeRO-3's sub-groups), whole bytes."""
    if total <= 0:
        return []
    if cap <= 0 or total <= cap:
        return _whole([total])
    n = int(total // cap)
    out = [cap] * n
    if total - n * cap > 0:
        out.append(total - n * cap)
    return _whole(out)


class _EngineStates:
    """Model-state events of one rank, called by ``_train`` at the points of a step (default: nothing).

    Positions ``i`` are indices into the stage's layer list. The tensors are the engine's own layout (flat
    buffers, per-parameter shards, per-layer all-gathers), so the allocator replay sees what the engine asks
    for. Offload (``CPUOffloadPolicy`` / ``CPUOffload(offload_params=True)``; DeepSpeed ``offload_optimizer`` and
    ``offload_param``): what moves to pinned host memory is not emitted; with ZeRO-1/2 offload the reduced
    gradients go straight to the host partition (``copy_grads_in_partition``) and a 16-bit buffer of the
    largest parameter (``temp_grad_buffer_for_gpu_offload``) is made at init."""

    def __init__(self, spec: ModelSpec, job: Job, lay: Layout, stage: _Stage):
        from . import _block_param_elems

        self.spec, self.job, self.lay, self.stage = spec, job, lay, stage
        self.S = lay.shard
        self.cb = _compute_bytes(job)
        self.wb = _storage_bytes(job)
        strat = job.strategy
        self.lora = job.is_lora
        self.lora_params = st.lora_adapter_params(spec, job) / lay.tp / lay.pp if self.lora else 0.0
        self.adapter_b = 4 if strat in ("ddp", "fsdp", "fsdp2") else self.cb
        self.trainable = stage.trainable
        self.tb = self.adapter_b if self.lora else self.wb
        opt_prec = job.precision if strat in ("ddp", "fsdp", "fsdp2") else (
            "bf16-true" if _master_bytes(job) == 2 else "32-true")
        if self.lora and strat in ("ddp", "fsdp", "fsdp2"):
            opt_prec = "32-true"
        self.opt_per, self.opt_tmp_per = _opt_bytes_per_elem(spec, job, opt_prec)
        order = _layer_order(spec)
        self._shapes = [_block_param_elems(spec, spec.blocks[order[i]]) for i in stage.layers]
        self.n_states = {"adamw": 2, "adam": 2, "adafactor": 2}.get(job.optimizer, 1)

    def layer_pieces(self, i: int, total: float) -> list[float]:
        """Layer ``i``'s parameter tensors, scaled to add up to ``total`` bytes (one tensor per parameter)."""
        from . import _scaled

        return _whole(_scaled(list(self._shapes[i]), total))

    def load(self, s) -> None: ...
    def forward_start(self, s) -> None: ...
    def pre_forward(self, s, i: int) -> None: ...
    def post_forward(self, s, i: int) -> None: ...
    def pre_head(self, s) -> None: ...
    def backward_start(self, s) -> None: ...
    def head_grads(self, s) -> list[int]: return []
    def pre_backward(self, s, i: int) -> None: ...
    def layer_grads(self, s, i: int) -> list[int]: return []
    def post_backward(self, s, i: int) -> None: ...
    def end_grads(self, s) -> list[int]: return []
    def after_backward(self, s) -> None: ...
    def step(self, s, step: int) -> None: ...


class _ReplicatedStates(_EngineStates):
    """torch DDP (and FSDP ``NO_SHARD``) where the rank's tensors are not the single-GPU ones (TP/PP): every
    parameter whole, autograd's ``.grad`` per parameter as backward reaches it (the head's first, the
    embedding's last), optimizer states per parameter from the first step, the foreach scratch at each step;
    DDP's reducer buckets come in ``RankView.load_extra``."""

    def __init__(self, *a):
        super().__init__(*a)
        self.views = self.job.strategy == "ddp" and self.job.gradient_as_bucket_view and self.lay.dp > 1
        self.grads: list[int] = []
        self.states: list[int] = []

    def load(self, s) -> None:
        stg = self.stage
        s.alloc(stg.embed * self.wb, "weights")
        for i, p in enumerate(stg.layer_params):
            for x in self.layer_pieces(i, p * self.wb):
                s.alloc(x, "weights")
        s.alloc(stg.head * self.wb, "weights")
        for x in _even(self.lora_params * self.adapter_b, len(stg.layers)):
            s.alloc(x, "lora_adapters")

    def _grad(self, s, n: float) -> None:
        if not self.views:
            self.grads.append(s.alloc(n, "gradients"))

    def head_grads(self, s) -> list[int]:
        self._grad(s, self.stage.head_trainable * self.tb)
        return []

    def layer_grads(self, s, i: int) -> list[int]:
        t = self.stage.layer_trainable[i] * self.tb
        if self.lora:
            self._grad(s, t)
        else:
            for x in self.layer_pieces(i, t):
                self._grad(s, x)
        return []

    def end_grads(self, s) -> list[int]:
        self._grad(s, self.stage.embed_trainable * self.tb)
        return []

    def step(self, s, step: int) -> None:
        if step == 0:
            self.states = [s.alloc(x, "optimizer_states") for x in _even(self.trainable * self.opt_per, self.n_states)]
        sc = s.alloc(self.trainable * self.opt_tmp_per, "temporaries")
        s.free(sc)
        s.free_all(self.grads)
        self.grads = []


class _FSDPStates(_EngineStates):
    """FSDP2 ``fully_shard`` per decoder layer plus the root (FSDP1: one ``FlatParameter`` per wrapped layer).
    Shards (1/S, the storage dtype: fp32 shards under ``MixedPrecisionPolicy``) at load: FSDP2 one
    per parameter (``FSDPParam._init_sharded_param``), FSDP1 one flat tensor per layer (``FlatParamHandle``).
    Each layer's 16-bit all-gather is alive from its pre-forward to its post-forward and again from its
    pre-backward (prefetched one layer ahead, ``_backward_prefetch``) to its post-backward, or from forward
    to backward without ``reshard_after_forward``; the root's from the start of forward to the end of
    backward. In backward, a layer's unsharded gradients (compute dtype) live until its post-backward, which
    builds the reduce-scatter input (``reduce_dtype``), held until the next layer's reduce-scatter.

    FSDP2 gathers in two steps (torch 2.13 ``_fsdp_collectives.py`` ``foreach_all_gather`` /
    ``foreach_all_gather_copy_out``): one flat all-gather output per group, copied out into per-parameter
    unsharded tensors. In backward the flat output is freed right after the copy-out; in forward
    (``FSDPParamGroup.wait_for_unshard``, implicit prefetching) it is kept until the next group's copy-out, and
    the last one until the root's post-forward (``FSDPState._post_forward``), i.e. through the loss. FSDP1
    all-gathers straight into the ``FlatParameter``'s padded unsharded tensor."""

    def __init__(self, *a):
        super().__init__(*a)
        job = self.job
        self.reshard = (job.reshard_after_forward if job.strategy == "fsdp2"
                        else job.fsdp_sharding in ("FULL_SHARD", "HYBRID_SHARD"))
        self.on_gpu = job.offload == "none"
        self.rb = 4 if job.precision in ("16-mixed", "bf16-mixed") else self.cb
        n = len(self.stage.layers)
        self.gathered: list[list[int] | None] = [None] * n
        self.prefetched: dict[int, int] = {}  # backward prefetch: the all-gather output, not yet copied out
        self.pending = -1  # FSDP2 forward: the last all-gather output, freed at the next copy-out
        self.root: list[int] = []
        self.unsharded: list[int] = []  # this layer's
        self.root_unsharded: list[int] = []
        self.rs = -1  # the last reduce-scatter input
        self.grads: list[int] = []
        self.states: list[int] = []
        self.flat = job.strategy == "fsdp"

    def load(self, s) -> None:
        if not self.on_gpu:
            return
        stg, S = self.stage, self.S
        s.alloc(fsdp2_root_params(stg) * self.wb / S, "weights")
        for i, p in enumerate(stg.layer_params):
            pieces = [p * self.wb / S] if self.flat else self.layer_pieces(i, p * self.wb / S)
            for x in pieces:
                s.alloc(x, "weights")
        for x in _even(self.lora_params * self.adapter_b / S, len(stg.layers)):
            s.alloc(x, "weights")

    def _unshard(self, s, nbytes: float, pieces, flat: int = -1) -> list[int]:
        """One group's all-gather: FSDP1 the unsharded flat parameter; FSDP2 the flat output (``flat`` when
        prefetched), then the per-parameter copy-out. Returns the unsharded tensors; the FSDP2 flat output is
        left in ``self.pending`` (freed at the next copy-out, or at once in backward by :meth:`_gather`)."""
        if self.flat:
            return [flat if flat >= 0 else s.alloc(nbytes, "gathered_weights")]
        if flat < 0:
            flat = s.alloc(nbytes, "gathered_weights")
        s.free(self.pending)  # the previous forward all-gather output, kept until this copy-out
        self.pending = flat
        return [s.alloc(x, "gathered_weights") for x in pieces]

    def forward_start(self, s) -> None:
        stg = self.stage
        root = fsdp2_root_params(stg) * self.cb
        self.root = self._unshard(s, root, _whole([stg.embed * self.cb, stg.head * self.cb]))

    def _gather(self, s, i: int, forward: bool) -> None:
        if self.gathered[i] is None:
            nbytes = self.stage.layer_params[i] * self.cb
            self.gathered[i] = self._unshard(s, nbytes, None if self.flat else self.layer_pieces(i, nbytes),
                                             self.prefetched.pop(i, -1))
            if not forward:  # backward: the all-gather output is freed right after its copy-out
                s.free(self.pending)
                self.pending = -1

    def _reshard(self, s, i: int) -> None:
        s.free_all(self.gathered[i] or [])
        self.gathered[i] = None

    def pre_forward(self, s, i: int) -> None:
        self._gather(s, i, forward=True)

    def post_forward(self, s, i: int) -> None:
        if self.reshard:
            self._reshard(s, i)

    def _sharded_grad(self, s, n: float) -> None:
        if self.on_gpu:
            self.grads.append(s.alloc(n * self.tb / self.S, "gradients"))

    def head_grads(self, s) -> list[int]:
        t = self.stage.head_trainable
        self.root_unsharded.append(s.alloc(t * self.cb, "communication_buffers"))
        self._sharded_grad(s, t)
        return []

    def backward_start(self, s) -> None:
        s.free(self.pending)  # the last forward all-gather output: freed at the root's post-forward
        self.pending = -1

    def pre_backward(self, s, i: int) -> None:
        self._gather(s, i, forward=False)
        if self.reshard and i > 0 and self.gathered[i - 1] is None and i - 1 not in self.prefetched:
            # backward prefetch of the layer before: its all-gather output, copied out at its pre-backward
            self.prefetched[i - 1] = s.alloc(self.stage.layer_params[i - 1] * self.cb, "gathered_weights")

    def layer_grads(self, s, i: int) -> list[int]:
        t = self.stage.layer_trainable[i]
        self.unsharded = [s.alloc(t * self.cb, "communication_buffers")]
        self._sharded_grad(s, t)
        return []

    def post_backward(self, s, i: int) -> None:
        self._reshard(s, i)
        s.free(self.rs)
        self.rs = s.alloc(self.stage.layer_trainable[i] * self.rb, "communication_buffers")
        s.free_all(self.unsharded)
        self.unsharded = []

    def end_grads(self, s) -> list[int]:
        s.free(self.rs)
        stg = self.stage
        self.root_unsharded.append(s.alloc(stg.embed_trainable * self.cb, "communication_buffers"))
        self._sharded_grad(s, stg.embed_trainable)
        self.rs = s.alloc((stg.head_trainable + stg.embed_trainable) * self.rb, "communication_buffers")
        return []

    def after_backward(self, s) -> None:
        s.free(self.rs)
        self.rs = -1
        s.free_all(self.root_unsharded)
        self.root_unsharded = []
        s.free_all(self.root)
        self.root = []

    def step(self, s, step: int) -> None:
        if self.on_gpu:
            if step == 0:
                f = self.opt_per / self.n_states / self.S  # each state like the shard it tracks
                sizes = [x * f for i, p in enumerate(self.stage.layer_trainable)
                         for x in ([p] if self.flat or self.lora else self.layer_pieces(i, p)) * self.n_states]
                root_t = self.stage.head_trainable + self.stage.embed_trainable
                sizes += [root_t * f] * self.n_states
                self.states += [s.alloc(x, "optimizer_states") for x in _whole(sizes)]
            sc = s.alloc(self.trainable * self.opt_tmp_per / self.S, "temporaries")
            s.free(sc)
        s.free_all(self.grads)
        self.grads = []


class _Zero12States(_EngineStates):
    """DeepSpeed ZeRO-1/2 (``DeepSpeedZeroOptimizer``, deepspeed/runtime/zero/stage_1_and_2.py): the 16-bit parameters in one
    flat buffer (``bit16_groups_flat``; a frozen LoRA base stays per parameter), the fp32 master partition
    (``single_partition_of_fp32_groups``) made at init, the IPG bucket(s) (``reduce_bucket_size``, two with
    ``overlap_comm``) from the first gradient of a backward to its end. Stage 1 keeps each ``.grad`` until the
    end of backward, then copies them into the bucket one by one (each copy frees the original: the
    gradient becomes a view into the bucket), and ``grads_in_partition`` (1/S) is made when the first bucket
    is reduced; stage 2 makes ``grads_in_partition`` at the first hook and keeps one fresh gradient at a time.
    The step flattens the partition's gradients, casts them to fp32, and runs the optimizer on the fp32
    partition (its states one flat tensor each, from the first step)."""

    def __init__(self, *a):
        super().__init__(*a)
        job = self.job
        self.off = job.offload != "none"
        self.zero1 = job.strategy == "zero1"
        from ..deepspeed_config import zero_option

        n = 2 if zero_option(job, "overlap_comm") else 1
        total = zero_ipg_bucket_bytes(job, self.cb)
        self.buckets = [total / n] * n if total else []
        self.bucket_total = total
        self.part_bytes = 0.0 if self.off else self.trainable * self.cb / self.S
        self.bucket_h: list[int] = []
        self.part = -1
        self.fresh = -1
        self.head_g: list[tuple[int, float]] = []  # stage 1's per-parameter .grad (handle, bytes)
        self.layer_g: list[list[tuple[int, float]]] = [[] for _ in self.stage.layers]
        self.embed_g: list[tuple[int, float]] = []
        self.states: list[int] = []

    def load(self, s) -> None:
        stg = self.stage
        if self.lora:  # only the trainable adapters are flattened; the frozen base stays as loaded
            s.alloc(stg.embed * self.cb, "weights")
            for i, p in enumerate(stg.layer_params):
                for x in self.layer_pieces(i, p * self.cb):
                    s.alloc(x, "weights")
            s.alloc(stg.head * self.cb, "weights")
            s.alloc(self.lora_params * self.cb, "weights")
        else:
            s.alloc(stg.params * self.cb, "weights")
        if not self.off:
            s.alloc(self.trainable * _master_bytes(self.job) / self.S, "master_weights")
        else:  # temp_grad_buffer_for_gpu_offload: the largest parameter, 16-bit, made at init
            s.alloc(_largest_param(self.spec, self.lay) * self.cb, "communication_buffers")

    def backward_start(self, s) -> None:
        self.bucket_h = [s.alloc(b, "communication_buffers") for b in self.buckets]
        if not self.zero1:
            self.part = s.alloc(self.part_bytes, "gradients")

    def _grad(self, s, n: float, into: list) -> None:
        if self.zero1 and n > 0:
            into.append((s.alloc(n, "gradients"), n))

    def head_grads(self, s) -> list[int]:
        self._grad(s, self.stage.head_trainable * self.cb, self.head_g)
        return []

    def layer_grads(self, s, i: int) -> list[int]:
        if self.zero1:
            t = self.stage.layer_trainable[i] * self.cb
            for x in ([t] if self.lora else self.layer_pieces(i, t)):
                self._grad(s, x, self.layer_g[i])
        elif self.trainable:
            # the fresh 16-bit gradient of one parameter before the hook copies it into the bucket
            self.fresh = s.alloc(self.stage.layer_max[i] * self.cb, "gradients")
        return []

    def post_backward(self, s, i: int) -> None:
        s.free(self.fresh)
        self.fresh = -1

    def end_grads(self, s) -> list[int]:
        if not self.zero1:
            return []
        self._grad(s, self.stage.embed_trainable * self.cb, self.embed_g)
        # reduce_gradients: parameter order (embedding, layers, head); each copy into the bucket frees the
        # .grad; the first full bucket is reduced into grads_in_partition
        order = self.embed_g + [g for lg in self.layer_g for g in lg] + self.head_g
        self.head_g, self.embed_g = [], []
        self.layer_g = [[] for _ in self.stage.layers]
        room = self.bucket_total
        k = 0
        while k < len(order) and order[k][1] <= room:
            room -= order[k][1]
            s.free(order[k][0])
            k += 1
        self.part = s.alloc(self.part_bytes, "gradients")
        for h, _ in order[k:]:
            s.free(h)
        return []

    def after_backward(self, s) -> None:
        s.free_all(self.bucket_h)
        self.bucket_h = []

    def step(self, s, step: int) -> None:
        if not self.off and self.trainable:
            S = self.S
            if step == 0:
                self.states = [s.alloc(x, "optimizer_states")
                               for x in _even(self.trainable * self.opt_per / S, self.n_states)]
            flat = s.alloc(self.trainable * self.cb / S, "temporaries")
            fp32 = s.alloc(self.trainable * 4 / S, "gradients")
            s.free(self.part)
            s.free(flat)
            sc = s.alloc(self.trainable * self.opt_tmp_per / S, "temporaries")
            s.free(sc)
            s.free(fp32)
        else:
            s.free(self.part)
        self.part = -1


class _Zero3States(_EngineStates):
    """DeepSpeed ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``, deepspeed/runtime/zero/stage3.py): the 16-bit partitions
    flattened per sub-group (``fp16_partitioned_groups_flat``, ``sub_group_size`` elements), the small
    persistent parameters whole, the fp32 master per sub-group, the flat gradient partition buffer and the
    IPG bucket, all made at init. Each layer's parameters are all-gathered at its pre-forward and released
    at its post-forward unless kept for reuse (:func:`zero3_gathered_at_loss`), gathered again in backward
    with ``stage3_prefetch_bucket_size`` fetched ahead; one fresh 16-bit gradient exists at a time before
    the hook copies it into the bucket. The step walks the sub-groups (flattened 16-bit gradients, their
    fp32 copy, the optimizer's scratch)."""

    def __init__(self, *a):
        super().__init__(*a)
        from ..deepspeed_config import zero_option

        job, stg = self.job, self.stage
        self.off_opt = job.offload != "none"
        self.off_par = job.offload == "optimizer+params"
        self.head_b, self.kept_layers = zero3_gathered_at_loss(self.spec, job, stg)
        self.persist = zero3_persistent_params(self.spec, job, stg, self.lay)
        self.prefetch_b = float(zero_option(job, "stage3_prefetch_bucket_size")) * self.cb
        self.sg_elems = float(zero_option(job, "sub_group_size"))
        self.gathered: list[int] = [-1] * len(stg.layers)
        self.head = self.prefetch = self.fresh = -1
        self.states: list[int] = []

    def _groups(self, per_elem: float) -> list[int]:
        """The rank's partition of the trainable parameters in ``sub_group_size`` groups, ``per_elem`` bytes each."""
        return _chunks(self.trainable / self.S * per_elem, self.sg_elems * per_elem)

    def load(self, s) -> None:
        stg, S, cb = self.stage, self.S, self.cb
        if not self.off_par:
            for x in _chunks((stg.params - self.persist) * cb / S, self.sg_elems * cb):
                s.alloc(x, "weights")
        for x in _even(self.persist * cb, len(stg.layers)):
            s.alloc(x, "weights")
        s.alloc(self.lora_params * cb / S, "weights")
        if not self.off_opt:
            for x in self._groups(_master_bytes(self.job)):
                s.alloc(x, "master_weights")
            s.alloc(self.trainable * cb / S, "gradients")  # grad_partitions_flat_buffer
        s.alloc(zero_ipg_bucket_bytes(self.job, cb), "communication_buffers")

    def pre_forward(self, s, i: int) -> None:
        if self.gathered[i] < 0:
            self.gathered[i] = s.alloc(self.stage.layer_params[i] * self.cb, "gathered_weights")

    def post_forward(self, s, i: int) -> None:
        if not self.kept_layers[i]:
            s.free(self.gathered[i])
            self.gathered[i] = -1

    def pre_head(self, s) -> None:
        self.head = s.alloc(self.head_b * self.cb, "gathered_weights")

    def head_grads(self, s) -> list[int]:
        s.free(self.head)
        self.head = -1
        return []

    def pre_backward(self, s, i: int) -> None:
        self.pre_forward(s, i)
        self.prefetch = s.alloc(self.prefetch_b, "gathered_weights")

    def layer_grads(self, s, i: int) -> list[int]:
        self.fresh = s.alloc(self.stage.layer_max[i] * self.cb, "communication_buffers")
        return []

    def post_backward(self, s, i: int) -> None:
        s.free(self.fresh)
        s.free(self.prefetch)
        s.free(self.gathered[i])
        self.fresh = self.prefetch = self.gathered[i] = -1

    def step(self, s, step: int) -> None:
        if self.off_opt or not self.trainable:
            return
        if step == 0:
            for x in self._groups(self.opt_per):
                self.states += [s.alloc(y, "optimizer_states") for y in _even(x, self.n_states)]
        for x in self._groups(1.0):
            flat = s.alloc(x * self.cb, "temporaries")
            fp32 = s.alloc(x * 4, "temporaries")
            s.free(flat)
            sc = s.alloc(x * self.opt_tmp_per, "temporaries")
            s.free(sc)
            s.free(fp32)


def _rank_view(spec: ModelSpec, job: Job, lay: Layout, stage: _Stage, amode: str) -> RankView:
    """The rank's :class:`RankView`: DDP without TP/PP keeps the single-GPU stream's own states (the rank is
    that GPU plus its reducer buckets); every other layout gets its engine's hooks."""
    order = _layer_order(spec)
    strat = job.strategy
    plain_ddp = strat == "ddp" and lay.tp == 1 and lay.pp == 1
    seq_share = 1.0 / lay.tp if lay.sp else 1.0
    res = 4 if amode in ("32", "mixed") else 2
    T = job.batch_size * job.seq_len
    load_extra: tuple = ()
    views = strat == "ddp" and job.gradient_as_bucket_view and lay.dp > 1
    if strat == "ddp" and lay.dp > 1:
        grads = (st.gradient_bytes(spec, _single(job)) if plain_ddp else
                 stage.trainable * (4 if job.is_lora else _storage_bytes(job)))
        load_extra = tuple((n, "gradients" if views else "communication_buffers")
                           for n in _chunks(grads, DDP_BUCKET_BYTES))
    if plain_ddp:
        states = None
    elif strat == "ddp" or (strat == "fsdp" and job.fsdp_sharding == "NO_SHARD"):
        states = _ReplicatedStates(spec, job, lay, stage)
    elif strat in ("fsdp", "fsdp2"):
        states = _FSDPStates(spec, job, lay, stage)
    elif strat == "zero3":
        states = _Zero3States(spec, job, lay, stage)
    else:
        states = _Zero12States(spec, job, lay, stage)
    if plain_ddp:
        from . import _layer_order as single_order  # the single-GPU stream's own layer order

        layers = single_order(spec)
    else:
        layers = [order[i] for i in stage.layers]
    return RankView(layers=layers, amode=amode,
                    autocast=amode == "mixed" and strat == "ddp", last=stage.last, tp_share=1.0 / lay.tp,
                    act_share=_tp_activation_factor(lay), seq_share=seq_share, in_flight=stage.in_flight,
                    recv_bytes=0.0 if stage.last else T * spec.hidden_size * res * seq_share, states=states,
                    load_extra=load_extra, grad_views=views, first=stage.first)


def _single(job: Job) -> Job:
    from . import _spec_job_for_single

    return _spec_job_for_single(job)


def rank_stream(spec: ModelSpec, job: Job, lay: Layout, stage: _Stage, amode: str):
    """One rank's event stream (a warm-up step, then the measured one) and its accounting."""
    from . import _train
    from .events import build

    # the single-GPU job of the same micro-batch: what _train's own terms (inputs, activations) are read from
    return build(lambda s: _train(spec, _single(job), s, rank=_rank_view(spec, job, lay, stage, amode)))


# --------------------------------------------------------------------------------------------- host memory
def host_bytes_per_rank(spec: ModelSpec, job: Job, lay: Layout, stage: _Stage) -> float:
    """Pinned host memory one rank takes for offloaded state.

    - ZeRO-1/2 ``offload_optimizer``: fp32 master partition, optimizer states, the fp32 gradient partition
      (``single_partition_of_fp32_groups[i].grad``, pinned), the 16-bit partition buffer
      (``param_buffer_of_bit16_for_cpu_offload_groups``) and ``temp_grad_buffer_for_cpu_offload`` (largest
      parameter);
    - ZeRO-3: master, states, the fp32 gradient of each sub-group and the 16-bit gradient partitions
      (``grad_partitions_flat_buffer`` is made on the offload device); ``offload_param`` adds the 16-bit
      parameter partitions;
    - ZeRO-Infinity (nvme): the state lives on NVMe; the host keeps DeepSpeed's aio swap buffers
      (``offload_optimizer.buffer_count`` 4 sub-groups of fp32, ``offload_param.buffer_count`` 5 x
      ``buffer_size`` 1e8 16-bit elements);
    - FSDP/FSDP2 CPU offload: the sharded parameters, gradients and the optimizer states.
    """
    if job.offload == "none":
        return 0.0
    S = lay.shard
    t = stage.trainable
    cb = _compute_bytes(job)
    if job.strategy in ("fsdp", "fsdp2"):
        wb = _storage_bytes(job)
        opt_per, _ = _opt_bytes_per_elem(spec, job, job.precision)
        return stage.params * wb / S + t * wb / S + t * opt_per / S
    from ..deepspeed_config import zero_option

    md = _master_bytes(job)
    opt_per, _ = _opt_bytes_per_elem(spec, job, "bf16-true" if md == 2 else "32-true")
    if job.offload_device == "nvme":
        sg = min(float(zero_option(job, "sub_group_size")), t / S)
        host = 4 * sg * 4.0
        if job.offload == "optimizer+params":
            host += 5 * 1e8 * cb
        return host + t * cb / S
    host = t * md / S + t * opt_per / S + t * 4 / S
    if job.strategy in ("zero1", "zero2"):
        host += t * cb / S + _largest_param(spec, lay) * cb
    else:
        host += t * cb / S
        if job.offload == "optimizer+params":
            host += stage.params * cb / S
    return host


def nvme_bytes_per_rank(spec: ModelSpec, job: Job, lay: Layout, stage: _Stage) -> float:
    """NVMe space one rank's swap files take under ZeRO-Infinity (``offload_device nvme``, stage 3).

    ``offload_optimizer.device: nvme`` swaps each sub-group's fp32 master partition, its optimizer states and
    its fp32 gradients out to files (deepspeed/runtime/swap_tensor/partitioned_optimizer_swapper.py, 0.16);
    ``offload_param.device: nvme`` swaps the 16-bit parameter partitions too
    (partitioned_param_swapper.py). Each rank writes its own 1/S partition; nothing of it stays on the GPU.
    """
    if job.offload_device != "nvme" or job.offload == "none":
        return 0.0
    S = lay.shard
    t = stage.trainable
    md = _master_bytes(job)
    opt_per, _ = _opt_bytes_per_elem(spec, job, "bf16-true" if md == 2 else "32-true")
    total = t * (md + opt_per + 4) / S
    if job.offload == "optimizer+params":
        total += stage.params * _compute_bytes(job) / S
    return total


# --------------------------------------------------------------------------------------------- public
def _activation_mode(job: Job) -> str:
    from . import _act_mode

    if job.strategy in _ENGINE_COMPUTES_16 and job.precision in ("16-mixed", "bf16-mixed"):
        return "true"  # MixedPrecisionPolicy / DeepSpeed bf16: 16-bit weights in compute, no autocast
    return _act_mode(job)


#: DDP's gradient buckets (``bucket_cap_mb=25``, ``torch/nn/parallel/distributed.py``).
DDP_BUCKET_BYTES = 25 << 20


def _parallel_job(job: Job, spec: ModelSpec) -> Job:
    """``job`` as the multi-GPU estimate runs it (or a one-line JobError where it cannot)."""
    if job.task != "train":
        raise JobError("multi-GPU strategies apply to training; for inference use gpus: 1")
    if job.quantization != "none" and job.strategy != "ddp":
        raise JobError(f"a quantized base with {job.strategy} is not estimated yet; use strategy ddp (QLoRA per GPU)")
    if job.strategy.startswith("zero") and job.optimizer in ("adamw-8bit", "paged-adamw-8bit", "paged-adamw"):
        raise JobError(f"{job.optimizer} keeps its own state layout; DeepSpeed ZeRO partitions torch optimizers "
                       "(adamw, adam, sgd, lion, adafactor)")
    if job.strategy == "single":
        job = job.replace(strategy="ddp")
    return job


def _rank_streams(job: Job, spec: ModelSpec):
    """(layout, [(stage, stream, accounting)] for every pipeline stage): each stage's rank as a stream."""
    from .events import account

    lay = layout(job)
    amode = _activation_mode(job)
    out = []
    for stage in _stages(spec, job, lay):
        stream = rank_stream(spec, job, lay, stage, amode)
        stream.accounted = account(stream)
        out.append((stage, stream, stream.accounted))
    return lay, out


def _rank_overhead_bytes(job: Job) -> int:
    """What a rank's process holds outside PyTorch's allocator: the CUDA context and NCCL's buffers."""
    return cuda_context_bytes(job.task) + (NCCL_CONTEXT_BYTES if job.gpus > 1 else 0)


def _capped_replays(ranks, capacity_bytes: int, expandable: bool, memo=None, key=None):
    """Replay every stage's stream under the cap, most loaded first: (None, None, replays by stage index) when
    all complete, else the first that fails and its replay. Each must complete with new large segments at
    decreasing and at increasing addresses, as a single-GPU training run must (:func:`memfit.estimator.fits_on`).
    A stage whose tensors alone pass the cap fails without a replay. ``memo`` / ``key``: a
    :class:`memfit.estimator.Memo` and the job's key in it (a fresh memo when none)."""
    if memo is None:
        from . import Memo

        memo = Memo()
    done = {}
    for stage, stream, acc in sorted(ranks, key=lambda r: -r[2].peak_allocated_bytes):
        if acc.peak_allocated_bytes > capacity_bytes:
            return stage, None, done
        r = memo.verdict((key, stage.index), stream, capacity_bytes, expandable, True)
        done[stage.index] = r
        if not r.completed:
            return stage, r, done
    return None, None, done


def _ranks_of(job: Job, spec: ModelSpec, memo):
    """(key in ``memo`` or None, layout, ranks): :func:`_rank_streams`, through the memo when there is one."""
    if memo is None:
        return (None, *_rank_streams(job, spec))
    key, (lay, ranks) = memo.ranks(spec, job)
    return key, lay, ranks


def fits_parallel(job: Job, spec: ModelSpec, gpu_memory_bytes: int, memo=None) -> bool:
    """Whether every rank of a multi-GPU job completes its steps with the allocator capped at the card less
    the CUDA context and NCCL's buffers (the capped replay of each pipeline stage's stream). ``memo``: a
    :class:`memfit.estimator.Memo`."""
    job = _parallel_job(job, spec)
    key, _, ranks = _ranks_of(job, spec, memo)
    failed, _, _ = _capped_replays(ranks, gpu_memory_bytes - _rank_overhead_bytes(job),
                                   bool(getattr(job, "expandable_segments", False)), memo, key)
    return failed is None


def estimate_parallel(job: Job, spec: ModelSpec, *, gpu_memory_bytes: int | None = None, memo=None) -> Breakdown:
    """Per-GPU estimate of a multi-GPU training job: the most loaded rank's :class:`Breakdown`.

    Each pipeline stage's rank is an event stream (:func:`rank_stream`): its accounting gives peak allocated
    and the components at that moment, its replay through the caching-allocator model gives peak reserved
    (the most loaded rank's are reported). With ``gpu_memory_bytes`` every stage's stream is replayed again
    with the allocator capped at the card less the CUDA context and NCCL's buffers: ``fits`` says whether
    every rank completes its steps. ``memo`` (a :class:`memfit.estimator.Memo`) reuses streams and replays."""
    from . import Memo

    job = _parallel_job(job, spec)
    memo = memo if memo is not None else Memo()
    key, lay, ranks = _ranks_of(job, spec, memo)
    per_stage = [{"stage": stage.index, "layers": len(stage.layers), "peak_allocated_bytes": acc.peak_allocated_bytes,
                  "peak_phase": acc.peak_phase} for stage, _, acc in ranks]
    stage, stream, acc = max(ranks, key=lambda r: r[2].peak_allocated_bytes)
    comps = dict(acc.components)
    peak = acc.peak_allocated_bytes
    phase = acc.peak_phase
    phases = {k: v for k, v in acc.phases.items() if k in ("forward", "backward", "optimizer_step")}
    expandable = bool(getattr(job, "expandable_segments", False))
    skey = (key, stage.index)
    nccl = NCCL_CONTEXT_BYTES if job.gpus > 1 else 0
    ctx = _rank_overhead_bytes(job)
    extras_fit: dict = {"events": len(stream), "allocator": "expandable_segments" if expandable else "default",
                        "largest_component": max(comps, key=comps.get) if comps else ""}
    fit_notes: list[str] = []
    fits = headroom = None
    if gpu_memory_bytes is None:
        reserved = memo.replay(skey, stream, None, expandable).peak_reserved_bytes
    else:
        failed, capped, done = _capped_replays(ranks, gpu_memory_bytes - ctx, expandable, memo, key)
        fits = failed is None
        if fits:
            # the most loaded stage's capped replay, made above (every stage completed)
            reserved = done[stage.index].peak_reserved_bytes
            extras_fit["decided_by"] = extras_fit["largest_component"]
        else:
            reserved = memo.replay(skey, stream, None, expandable).peak_reserved_bytes
            _, fstream, facc = next(r for r in ranks if r[0] is failed)
            if capped is None:  # the tensors alone pass the cap: replay to find the request that fails
                capped = memo.replay((key, failed.index), fstream, gpu_memory_bytes - ctx, expandable)
            if capped.extras.get("order") == "up":
                from . import ONE_ORDER_NOTE

                fit_notes.append(ONE_ORDER_NOTE)
            where = f" (pipeline stage {failed.index + 1} of {lay.pp})" if lay.pp > 1 else ""
            extras_fit.update(decided_by=capped.failed_component, failed_request_bytes=capped.failed_request_bytes,
                              failed_phase=capped.failed_phase)
            fit_notes.append(f"out of memory in {capped.failed_phase or 'load'}{where}: a "
                             f"{capped.failed_request_bytes / 2**30:.2f} GiB request ({capped.failed_component}) "
                             f"with {capped.reserved_at_failure_bytes / 2**30:.2f} GiB reserved")
            if facc.peak_allocated_bytes + ctx <= gpu_memory_bytes:
                line = (f"fails through fragmentation only: peak allocated {facc.peak_allocated_bytes / 2**30:.2f} "
                        "GiB plus the CUDA "
                        "context and NCCL fits the card, but the caching allocator's free blocks do not fit the "
                        "next request")
                if not expandable:
                    alt = memo.replay((key, failed.index), fstream, gpu_memory_bytes - ctx, True)
                    extras_fit["fits_with_expandable_segments"] = alt.completed
                    line += "; with expandable_segments: true it " + ("runs" if alt.completed else "still does not fit")
                fit_notes.append(line)
        headroom = gpu_memory_bytes - (reserved + ctx)
    total = reserved + ctx
    host_rank = host_bytes_per_rank(spec, job, lay, stage)
    nvme_rank = nvme_bytes_per_rank(spec, job, lay, stage)
    ranks_per_node = job.gpus_per_node
    notes = [f"most loaded rank: pipeline stage {stage.index + 1} of {lay.pp}" if lay.pp > 1 else
             f"every rank holds the same ({job.strategy}, {lay.dp}-way data parallel"
             + (f" x {lay.tp}-way tensor parallel" if lay.tp > 1 else "") + ")"]
    if job.offload != "none":
        notes.append(f"host memory: {host_rank / 2**30:.2f} GiB pinned per rank, x {ranks_per_node} ranks per node")
    if nvme_rank:
        notes.append(f"NVMe (ZeRO-Infinity swap files): {nvme_rank / 2**30:.2f} GiB per rank, "
                     f"x {ranks_per_node} ranks per node")
    if job.strategy in ("fsdp2", "fsdp") and job.precision in ("16-mixed", "bf16-mixed"):
        notes.append("mixed precision by the engine: fp32 shards, 16-bit gathered layers, no autocast")
    if job.strategy.startswith("zero") and job.precision in ("16-mixed", "bf16-mixed"):
        notes.append("DeepSpeed bf16/fp16: 16-bit parameters and gradients, fp32 master partition and optimizer states")
    extras = {"layout": {"dp": lay.dp, "tp": lay.tp, "pp": lay.pp, "ep": lay.ep, "shard": lay.shard,
                         "sequence_parallel": lay.sp, "microbatches_in_flight": stage.in_flight},
              "stages": per_stage, "host_bytes_per_rank": int(host_rank), "nccl_context_bytes": nccl,
              "nvme_bytes_per_rank": int(nvme_rank), **extras_fit}
    return Breakdown(
        engine="estimate", model=spec.name, job=job.to_dict(), parameters=spec.parameters,
        trainable_parameters=st.trainable_params(spec, job.replace(strategy="single", gpus=1, gpus_per_node=1,
                                                                   offload="none", offload_device="cpu",
                                                                   tensor_parallel=1,
                                                                   pipeline_parallel=1, expert_parallel=1,
                                                                   sequence_parallel=False)),
        components=comps, peak_allocated_bytes=peak, peak_reserved_bytes=reserved, device_total_bytes=total,
        peak_phase=phase, phases=phases, host_bytes=int(host_rank * ranks_per_node),
        nvme_bytes=int(nvme_rank * ranks_per_node), notes=notes + fit_notes, gpu_memory_bytes=gpu_memory_bytes,
        fits=fits, headroom_bytes=headroom, extras=extras)


# --------------------------------------------------------------------------------------------- closed forms
def zero_model_states(parameters: float, gpus: int, stage: int, *, param_bytes: int = 2, grad_bytes: int = 2,
                      optimizer_bytes: int = 12) -> dict[str, float]:
    """Model states per GPU in the ZeRO paper's notation (Rajbhandari et al. 2020, section 5 and Figure 1):
    mixed-precision Adam keeps 2 bytes of parameters, 2 of gradients and K = 12 of optimizer states (fp32
    master, momentum, variance) per parameter; stage 1 partitions the K, stage 2 the gradients too, stage 3
    the parameters too, over Nd GPUs. Stage 0 is the data-parallel baseline. Pure arithmetic (bytes)."""
    nd = float(gpus)
    psi = float(parameters)
    p = psi * param_bytes
    g = psi * grad_bytes
    k = psi * optimizer_bytes
    if stage == 0:
        parts = (p, g, k)
    elif stage == 1:
        parts = (p, g, k / nd)
    elif stage == 2:
        parts = (p, g / nd, k / nd)
    elif stage == 3:
        parts = (p / nd, g / nd, k / nd)
    else:
        raise JobError(f"ZeRO stage must be 0-3; got {stage}")
    return {"parameters": parts[0], "gradients": parts[1], "optimizer_states": parts[2], "total": sum(parts)}


def megatron_activation_bytes(*, seq_len: int, batch_size: int, hidden_size: int, num_heads: int,
                              tensor_parallel: int = 1, sequence_parallel: bool = False,
                              selective_recompute: bool = False) -> float:
    """Activation bytes of one transformer layer in 16-bit training (Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models", Table 2): sbh(34 + 5as/h) without parallelism;
    sbh(10 + 24/t + 5as/(ht)) with tensor parallelism; sbh/t (34 + 5as/h) with sequence parallelism too;
    selective recomputation drops the 5as/h attention term."""
    s, b, h, a, t = seq_len, batch_size, hidden_size, num_heads, tensor_parallel
    attn = 0.0 if selective_recompute else 5 * a * s / h
    if t == 1:
        return s * b * h * (34 + attn)
    if sequence_parallel:
        return s * b * h * (34 + attn) / t
    return s * b * h * (10 + 24 / t + attn / t)
