"""Make a fake run on the CPU take the code paths a CUDA run takes, where they change memory.

Why not fake tensors on ``cuda``: a CPU-only torch build can create them, but autograd cannot run their
backward: ``InputMetadata`` asks the CUDA device guard for a stream (none is registered without CUDA) and
the engine asks ``at::accelerator`` for the current stream (``getAccelerator`` finds none). Registering a
fake CUDA backend is possible only through private C++ state, and process-wide. So the trace fakes the
``cpu`` device and emulates the four CUDA behaviours that decide memory:

1. **autocast** (:func:`cuda_autocast_policy`): ``torch.autocast("cpu")`` follows CPU op lists that differ
   from CUDA's (on CUDA ``softmax``/``log_softmax``/``sum`` of a bf16 input return fp32, ``layer_norm``,
   ``rms_norm``, ``exp``, ``pow`` run in fp32, ``einsum``/``addmv`` run in 16 bits; on the CPU ``cat``/
   ``stack`` promote and ``cross_entropy_loss`` casts its input). While tracing, the ``AutocastCPU``
   kernels of every op on either list are replaced with Python kernels that apply CUDA's policy
   (``aten/src/ATen/autocast_mode.h``: ``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``,
   ``AT_FORALL_FP32_SET_OPT_DTYPE``, ``AT_FORALL_PROMOTE``); ops whose policy is the same on both devices
   (``linear``, ``matmul``, ``mm``, ``bmm``, the losses...) keep their C++ kernel and its weight-cast cache.
2. **scaled_dot_product_attention** (:class:`SdpaEmulation`): the CPU build would run the math backend
   (which keeps the S x S score matrix). The emulation replaces the op's composite kernel (so recomputed,
   checkpointed layers use it too), picks the backend CUDA picks on an H100
   (``sdp_utils.cpp``: flash for fp16/bf16 without a mask and head_dim <= 256, else memory-efficient, else
   math; cuDNN first where torch prefers it) and replaces the call with an autograd function that
   allocates and saves what that kernel does: the output (in the layout the kernel writes) and the fp32
   softmax statistics, and in backward the gradients plus the kernel's scratch (``softmax_d``, the fp32
   ``dq_accum``, the expanded dK/dV of grouped-query attention) - measured on the H100 to the byte.
   It also gives ``dropout`` and fp16 ``softmax`` their CUDA kernels, and ``_grouped_mm`` (MoE experts) a
   fake kernel for every dtype (:func:`_cuda_composites`, :func:`_grouped_mm_meta`).
3. **optimizer foreach** (:func:`cuda_foreach_default`): torch.optim picks the multi-tensor (``foreach``)
   implementation for CUDA parameters; the fake parameters are made eligible for it.
4. **GradScaler** (:func:`fake_safe_grad_scaler`): ``scaler.step`` reads ``found_inf`` with ``.item()``, which
   fake tensors cannot answer; the trace assumes no inf/NaN and steps.

cuBLAS workspaces are added by the tracker (see :data:`memfit.tracer.tracker.CUBLAS_WORKSPACE_BYTES`), and
the reads of tensor values fake tensors cannot answer (``.item()``, ``bool()``) are answered there too.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

__all__ = ["cuda_autocast_policy", "SdpaEmulation", "cuda_foreach_default", "fake_safe_grad_scaler",
           "choose_sdpa_backend", "SDPA_BACKENDS", "DEFAULT_SDPA_PREFERENCE", "EFFICIENT_SDPA_SUPPORTS_GQA"]

# ------------------------------------------------------------------------------------ autocast policy
#: CUDA's autocast lists (``aten/src/ATen/autocast_mode.h``, torch 2.13), op -> policy.
_CUDA_LOWER = (
    "_convolution", "_convolution.deprecated", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "cudnn_convolution",
    "cudnn_convolution_transpose", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv",
    "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
)
_CUDA_FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "binary_cross_entropy", "dist", "pdist", "cdist",
    "renorm", "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
    "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
    "_upsample_bicubic2d_aa",
)
_CUDA_FP32_SET_OPT_DTYPE = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
)
_CUDA_PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
                 "tensordot", "scatter_add")
#: fp32_append_dtype: redispatch to the overload that takes a dtype, with fp32.
_CUDA_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
#: Ops whose CPU autocast kernel does what the CUDA one does: keep the C++ kernel (and its weight-cast cache).
_SAME_ON_CPU = frozenset((
    "addbmm", "addmm", "baddbmm", "bmm", "mm", "matmul", "linear", "linalg_vecdot", "prelu", "conv1d", "conv2d",
    "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input",
    "_convolution.deprecated", "scaled_dot_product_attention", "binary_cross_entropy_with_logits", "cdist",
    "cosine_embedding_loss", "hinge_embedding_loss", "huber_loss", "kl_div", "l1_loss", "margin_ranking_loss",
    "mse_loss", "multi_margin_loss", "multilabel_margin_loss", "nll_loss", "nll_loss2d", "poisson_nll_loss",
    "smooth_l1_loss", "soft_margin_loss", "triplet_margin_loss",
))


def _op(torch: Any, name: str):
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base)
    return getattr(packet, overload or "default")


class _Policy:
    """Python autocast kernels with CUDA's cast policies (``autocast_mode.h``'s ``WrapFunction_``)."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def eligible(self, t: Any) -> bool:
        torch = self.torch
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64

    def cast(self, value: Any, dtype: Any) -> Any:
        """``cached_cast`` without the cache (the ops that need a Python kernel rarely take weights)."""
        torch = self.torch
        if self.eligible(value) and value.dtype != dtype:
            return value.to(dtype)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return type(value)(self.cast(v, dtype) for v in value)
        return value

    def kernel(self, name: str, policy: str):
        torch = self.torch
        op = _op(torch, name)
        exclude = self.exclude
        schema = op._schema
        dtype_pos = None
        dtype_kwarg_only = False
        for i, a in enumerate(schema.arguments):
            if a.name == "dtype":
                dtype_pos, dtype_kwarg_only = i, a.kwarg_only
        if policy == "append_dtype":
            target = _op(torch, _CUDA_APPEND_DTYPE[name])

        def redispatch(fn, *args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                return fn(*args, **kwargs)

        if policy == "lower":
            def k(*args, **kwargs):
                dtype = torch.get_autocast_dtype("cpu")
                args = tuple(self.cast(a, dtype) for a in args)
                kwargs = {key: self.cast(v, dtype) for key, v in kwargs.items()}
                return redispatch(op, *args, **kwargs)
        elif policy == "fp32":
            def k(*args, **kwargs):
                args = tuple(self.cast(a, torch.float32) for a in args)
                kwargs = {key: self.cast(v, torch.float32) for key, v in kwargs.items()}
                return redispatch(op, *args, **kwargs)
        elif policy == "set_opt_dtype":
            def k(*args, **kwargs):
                if args and self.eligible(args[0]):
                    if dtype_kwarg_only or dtype_pos is None or dtype_pos >= len(args):
                        if kwargs.get("dtype") is None:
                            kwargs = dict(kwargs, dtype=torch.float32)
                    elif args[dtype_pos] is None:
                        args = args[:dtype_pos] + (torch.float32,) + args[dtype_pos + 1:]
                return redispatch(op, *args, **kwargs)
        elif policy == "promote":
            def k(*args, **kwargs):
                flat = [a for a in list(args) + list(kwargs.values()) if self.eligible(a)]
                if not flat:
                    return redispatch(op, *args, **kwargs)
                widest = flat[0].dtype
                for a in flat[1:]:
                    widest = torch.promote_types(widest, a.dtype)
                args = tuple(self.cast(a, widest) for a in args)
                kwargs = {key: self.cast(v, widest) for key, v in kwargs.items()}
                return redispatch(op, *args, **kwargs)
        elif policy == "append_dtype":
            def k(*args, **kwargs):
                if args and self.eligible(args[0]):
                    return redispatch(target, *args, **kwargs, dtype=torch.float32)
                return redispatch(op, *args, **kwargs)
        else:
            raise ValueError(f"unknown autocast policy {policy!r}")
        return k


def _cuda_policies() -> dict[str, str]:
    pol: dict[str, str] = {}
    for names, p in ((_CUDA_LOWER, "lower"), (_CUDA_FP32, "fp32"), (_CUDA_FP32_SET_OPT_DTYPE, "set_opt_dtype"),
                     (_CUDA_PROMOTE, "promote")):
        for n in names:
            pol[n] = p
    for n in _CUDA_APPEND_DTYPE:
        pol[n] = "append_dtype"
    return pol


@contextlib.contextmanager
def cuda_autocast_policy(torch: Any) -> Iterator[None]:
    """While active, ``torch.autocast("cpu", dtype)`` casts as ``torch.autocast("cuda", dtype)`` would."""
    policies = _cuda_policies()
    registered_cpu = {n.split("::", 1)[1] for n in
                      torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCPU") if n.startswith("aten::")}
    lib = torch.library.Library("aten", "IMPL")
    pol = _Policy(torch)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
            for name in sorted(set(policies) | registered_cpu):
                if name in _SAME_ON_CPU and name in registered_cpu:
                    continue
                policy = policies.get(name)
                try:
                    _op(torch, name)
                except (AttributeError, RuntimeError):
                    continue  # an op this torch does not have
                if policy is None:
                    # Not on CUDA's lists: CUDA autocast falls through (ops it decomposes into still autocast).
                    lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
                else:
                    lib.impl(name, pol.kernel(name, policy), "AutocastCPU")
        yield
    finally:
        lib._destroy()


# ------------------------------------------------------------------------------------ sdpa
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def _round_up(n: int, m: int) -> int:
    return m * ((n + m - 1) // m)


#: Which fused kernel torch puts first on an H100: ``cudnn`` where torch prefers cuDNN attention (torch >= 2.10
#: with cuDNN > 9.15, ``check_prefer_cudnn_attention``; the reference H100 runs torch 2.11 + cuDNN 9.19 and
#: took it: its output has q's layout), else ``flash``. Their memory differs only in the output's layout.
DEFAULT_SDPA_PREFERENCE = "cudnn"

#: Whether the memory-efficient kernel takes grouped-query attention (``enable_gqa`` with fewer k/v heads).
#: torch 2.11 on the reference H100 does not: fp32 GQA attention falls to the math backend there (measured:
#: a 1B Llama at 2048 tokens keeps the fp32 score matrices, 12.9 GiB of activations).
EFFICIENT_SDPA_SUPPORTS_GQA = False


def choose_sdpa_backend(torch: Any, q: Any, k: Any, v: Any, attn_mask: Any, is_causal: bool,
                        prefer: str = DEFAULT_SDPA_PREFERENCE) -> str:
    """The backend ``scaled_dot_product_attention`` takes on an H100 (sm90) for these inputs.

    ``sdp_utils.cpp`` (``select_sdp_backend``): flash needs fp16/bf16, no ``attn_mask``, equal head dims of at
    most 256 and, when causal, as many queries as keys; memory-efficient takes fp32 too and masks, with head
    dims divisible by 8 (16-bit) or 4 (fp32), and (see :data:`EFFICIENT_SDPA_SUPPORTS_GQA`) equal head counts;
    else math. ``prefer="cudnn"`` puts cuDNN first, as torch does on H100 with cuDNN newer than 9.15
    (``check_prefer_cudnn_attention``); for these inputs cuDNN takes what flash takes.
    """
    half = q.dtype in (torch.float16, torch.bfloat16)
    d_q, d_k, d_v = q.shape[-1], k.shape[-1], v.shape[-1]
    same_d = d_q == d_k == d_v
    causal_square = not is_causal or q.shape[-2] == k.shape[-2]
    if half and attn_mask is None and same_d and d_q <= 256 and causal_square:
        return "cudnn" if prefer == "cudnn" else "flash"
    align = 8 if half else 4
    gqa = q.dim() == 4 and k.dim() == 4 and q.shape[1] != k.shape[1]
    if q.dtype in (torch.float16, torch.bfloat16, torch.float32) and d_q == d_k and d_q % align == 0 \
            and d_v % align == 0 and (EFFICIENT_SDPA_SUPPORTS_GQA or not gqa):
        return "efficient"
    return "math"


class SdpaEmulation:
    """``aten::scaled_dot_product_attention`` as its CUDA kernel allocates.

    Used through :meth:`installed`. ``prefer``: ``cudnn`` (default) or ``flash``; ``force`` picks a backend
    regardless (``flash`` for a job that asks for flash-attn 2: its memory is flash's). ``calls`` counts the
    backends taken.
    """

    def __init__(self, torch: Any, prefer: str = DEFAULT_SDPA_PREFERENCE, force: str | None = None,
                 workspace: Any = None) -> None:
        self.torch = torch
        self.prefer = prefer
        self.force = force
        self.calls: dict[str, int] = {}
        self.workspace = workspace  # callable(nbytes) -> None: a transient allocation inside a kernel
        self._fn = self._autograd_function()
        self.__name__ = "scaled_dot_product_attention_as_on_cuda"

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """While active, ``aten::scaled_dot_product_attention`` runs this emulation (its
        ``CompositeImplicitAutograd`` kernel is replaced, so every caller and every recomputation of a
        checkpointed layer goes through it) and ``aten::_grouped_mm`` accepts every dtype on fake tensors
        (:func:`_grouped_mm_meta`)."""
        torch = self.torch
        import warnings

        lib = torch.library.Library("aten", "IMPL")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
                lib.impl("scaled_dot_product_attention", self, "CompositeImplicitAutograd")
                if hasattr(torch.ops.aten, "_grouped_mm"):
                    lib.impl("_grouped_mm", _grouped_mm_meta, "Meta")
                for name, kernel in _cuda_composites(torch).items():
                    lib.impl(name, kernel, "CompositeImplicitAutograd")
            yield
        finally:
            lib._destroy()

    # -------------------------------------------------------------------------------------------
    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        # Autocast (sdpa is lower_precision_fp on both devices) has already cast q, k, v: the autocast kernel
        # sits above this composite one.
        torch = self.torch
        backend = self.force or choose_sdpa_backend(torch, query, key, value, attn_mask, is_causal, self.prefer)
        if backend == "flash" and attn_mask is not None:
            backend = "efficient"
        self.calls[backend] = self.calls.get(backend, 0) + 1
        if backend == "math":
            if dropout_p == 0.0:
                return self._math(query, key, value, attn_mask, is_causal, scale, enable_gqa)
            return torch.ops.aten._scaled_dot_product_attention_math(
                query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]
        if attn_mask is not None:
            attn_mask = self._efficient_mask(attn_mask, query, key)
        return self._fn.apply(query, key, value, attn_mask, backend)

    def _math(self, query, key, value, attn_mask, is_causal, scale, enable_gqa):
        """``_scaled_dot_product_attention_math`` (attention.cpp) as it runs on a device, without dropout: 16-bit
        q, k and v upcast to fp32, q and k scaled by the square root of the scale, a causal or boolean mask made additive (``where``), k and v
        repeated for grouped-query attention, ``attn = q @ k^T``, the mask added in place (fake tensors count as
        tensor subclasses, for which ATen adds out of place: one more score-sized tensor than the device makes),
        ``_safe_softmax``, ``attn @ v``."""
        torch = self.torch
        e = query.shape[-1]
        factor = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(e))
        origin = query.dtype
        if origin in (torch.float16, torch.bfloat16):
            # "keep query, key, value in high precision": the kernel computes in fp32 and casts back (seen in
            # torch 2.13's own composite on the CPU: _to_copy to float32 of q, k and v, bmm, _safe_softmax and
            # the second bmm in fp32, the weights and the output cast to the inputs' dtype)
            query, key, value = query.float(), key.float(), value.float()
        q = query * factor
        mask = attn_mask
        if is_causal:
            mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        if mask is not None and mask.dtype == torch.bool:
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            mask = torch.where(mask.logical_not(), float("-inf"), zero)
        k, v = key, value
        if enable_gqa and query.dim() == 4 and key.shape[-3] != query.shape[-3]:
            k = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
            v = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
        attn = torch.matmul(q, k.transpose(-2, -1) * factor)
        if mask is not None:
            attn.add_(mask)
        attn = torch.ops.aten._safe_softmax(attn, -1)
        if attn.dtype != origin:
            del_weights = attn.to(origin)  # the kernel's second output, dropped by the caller
            del del_weights
        return torch.matmul(attn, v).to(origin)

    def _efficient_mask(self, mask, query, key):
        """``convert_boolean_attn_mask`` + ``preprocess_mask`` (attention.cpp): an additive mask of q's dtype,
        expanded to (B, H, L, S) and padded to a multiple of 16 keys (materialized then)."""
        torch = self.torch
        if mask.dtype == torch.bool:
            new = torch.zeros_like(mask, dtype=query.dtype)
            mask = new.masked_fill_(mask.logical_not(), float("-inf"))
        shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        mask = mask.expand(shape)
        last = shape[-1]
        if last % 16:
            pad = 16 - last % 16
            mask = torch.nn.functional.pad(mask, (0, pad))[..., :last]
        elif any(s % 16 for s in mask.stride()[:3]):
            mask = mask.contiguous()
        return mask

    def _autograd_function(self):
        torch = self.torch
        emu = self

        class _FusedAttention(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, bias, backend):
                B, H, L, _ = q.shape
                Dv = v.shape[-1]
                if backend == "efficient":
                    # the cutlass kernel writes (B, L, H, Dv) and hands back its transpose; log-sum-exp rows
                    # padded to 32.
                    out = torch.empty((B, L, H, Dv), dtype=q.dtype, device=q.device).transpose(1, 2)
                    lse = torch.empty((B, H, _round_up(L, 32)), dtype=torch.float32, device=q.device)
                else:
                    # flash and cuDNN allocate the output with q's memory layout (empty_like), and keep the
                    # softmax statistics in fp32: flash (B, H, L), cuDNN (B, H, L, 1).
                    order = sorted(range(4), key=lambda d: -q.stride(d))
                    out = torch.empty_permuted((B, H, L, Dv), order, dtype=q.dtype, device=q.device)
                    stats = (B, H, L, 1) if backend == "cudnn" else (B, H, L)
                    lse = torch.empty(stats, dtype=torch.float32, device=q.device)
                ctx.backend = backend
                ctx.save_for_backward(q, k, v, out, lse, bias)
                ctx.mark_non_differentiable(lse)
                return out, lse

            @staticmethod
            def backward(ctx, grad_out, _grad_lse):
                q, k, v, out, lse, bias = ctx.saved_tensors
                B, H, L, D = q.shape
                Hk, S = k.shape[1], k.shape[2]
                dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
                scratch = []
                if ctx.backend in ("flash", "cudnn"):
                    # pytorch_flash::mha_bwd: softmax_d (B, H, L_128) and dq_accum (B, L_128, H, D_32) in fp32,
                    # and for grouped-query attention dK/dV expanded to all H heads before their sum. cuDNN's
                    # backward takes the same (measured on the H100: 64.25 MiB for B1 H32/8 L2048 D128).
                    scratch.append(B * H * _round_up(L, 128) * 4)
                    scratch.append(B * _round_up(L, 128) * H * _round_up(D, 32) * 4)
                    if Hk != H:
                        scratch.append(B * S * H * D * k.element_size())
                        scratch.append(B * S * H * v.shape[-1] * v.element_size())
                elif ctx.backend == "efficient":
                    # the cutlass kernel's delta (B, H, L) in fp32.
                    scratch.append(B * H * _round_up(L, 32) * 4)
                if emu.workspace is not None and scratch:
                    emu.workspace(scratch)
                return dq, dk, dv, None, None

        class _Apply:
            @staticmethod
            def apply(q, k, v, bias, backend):
                out, lse = _FusedAttention.apply(q, k, v, bias, backend)
                del lse
                return out

        return _Apply


def _cuda_composites(torch: Any) -> dict[str, Any]:
    """Composite ops whose C++ code takes another branch on a CUDA tensor, where that changes memory.

    - ``dropout`` (``Dropout.cpp``): on CUDA ``native_dropout``, which keeps a bool mask (1 byte an element)
      for backward; elsewhere a noise tensor in the input's dtype (2 or 4 bytes an element).
    - ``softmax`` / ``log_softmax`` with ``dtype=float32`` of an fp16 input (``SoftMax.cpp``): on CUDA one
      ``_softmax(x, half_to_float=True)``; elsewhere an fp32 copy of the input first.
    """
    aten = torch.ops.aten

    def dropout(input, p, train):
        if train and 0 < p < 1 and input.numel() > 0:
            return aten.native_dropout(input, p, train)[0]
        return input if not train or p == 0 else input * 0.0

    def softmax(input, dim, dtype=None):
        if input.dtype == torch.float16 and dtype == torch.float32:
            return aten._softmax(input, dim, True)
        return aten._softmax(input.to(dtype) if dtype is not None else input, dim, False)

    def log_softmax(input, dim, dtype=None):
        if input.dtype == torch.float16 and dtype == torch.float32:
            return aten._log_softmax(input, dim, True)
        return aten._log_softmax(input.to(dtype) if dtype is not None else input, dim, False)

    return {"dropout": dropout, "softmax.int": softmax, "log_softmax.int": log_softmax}


def _grouped_mm_meta(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """Fake-tensor kernel of ``aten::_grouped_mm`` for every dtype.

    PyTorch's meta kernel accepts only bf16 with the fast kernel's strides; on CUDA other dtypes (the fp32
    expert weights of a ``*-mixed`` MoE) and other layouts take ``_grouped_mm_fallback``, one matmul per group
    into one output. Its memory is that output, shaped by ``_meta_grouped_mm_common``'s rules.
    """
    import torch

    a2, b2 = mat_a.dim() == 2, mat_b.dim() == 2
    if a2 and b2:
        shape = (offs.shape[0], mat_a.shape[0], mat_b.shape[1])
    elif a2:
        shape = (mat_a.shape[0], mat_b.shape[-1])
    elif b2:
        shape = (mat_a.shape[1], mat_b.shape[1])
    else:
        shape = (mat_a.shape[0], mat_a.shape[1], mat_b.shape[-1])
    return torch.empty(shape, dtype=out_dtype or mat_a.dtype, device=mat_a.device)


# ------------------------------------------------------------------------------------ optimizer
@contextlib.contextmanager
def cuda_foreach_default(torch: Any) -> Iterator[None]:
    """torch.optim chooses ``foreach`` for the fake parameters as it does for CUDA parameters."""
    from torch._subclasses.fake_tensor import FakeTensor
    import torch.optim.optimizer as optmod

    types = optmod._foreach_supported_types
    added = FakeTensor not in types
    old_devices = optmod._get_foreach_kernels_supported_devices
    if added:
        types.append(FakeTensor)
    optmod._get_foreach_kernels_supported_devices = lambda: list(old_devices()) + ["cpu"]
    try:
        yield
    finally:
        optmod._get_foreach_kernels_supported_devices = old_devices
        if added and FakeTensor in types:
            types.remove(FakeTensor)


@contextlib.contextmanager
def fake_safe_grad_scaler(torch: Any) -> Iterator[None]:
    """``GradScaler.step`` without reading ``found_inf`` (the trace assumes finite gradients)."""
    scaler_cls = torch.amp.GradScaler
    original = scaler_cls._maybe_opt_step

    def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        return optimizer.step(*args, **kwargs)

    scaler_cls._maybe_opt_step = _maybe_opt_step
    try:
        yield
    finally:
        scaler_cls._maybe_opt_step = original

