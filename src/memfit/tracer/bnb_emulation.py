"""bitsandbytes 4-bit linears on fake tensors: what ``Linear4bit`` and ``MatMul4Bit`` allocate and keep.

bitsandbytes runs CUDA kernels that fake tensors cannot execute, so a QLoRA job is traced with an emulation of
its 4-bit linears that makes the same tensors (shapes, dtypes, lifetimes) and computes nothing. It follows
bitsandbytes 0.50 (the version the measured records ran; read from its source, not copied):

- ``nn/modules.py`` ``Linear4bit.forward``: ``x.to(compute_dtype)`` (a 16-bit copy of an fp32 input),
  ``bnb.matmul_4bit(...)`` in the compute dtype, ``.to(inp_dtype)`` back; the weight is a ``Params4bit`` of
  ``uint8`` holding two values a byte, ``(numel + 1) // 2`` of them, with its ``QuantState``: one absmax per
  block of 64 (fp32, or 8-bit with an fp32 absmax per 256 of them, a 256-entry fp32 code and an fp32 offset
  under double quantization).
- ``autograd/_functions.py`` ``MatMul4Bit``: forward keeps no activation (``ctx.tensors = (None, B)``: the
  packed weight only); backward makes ``grad_A = grad_output @ dequantize_4bit(B).to(grad_output.dtype)``.
- ``backends/cuda/ops.py`` ``gemm_4bit`` for more than 1536 rows, and on an H100/H200 for most shapes past 64
  rows (``_gemm_4bit_use_custom_cuda``'s sm90 tiers: :func:`memfit.estimator.quant.bnb_dequantizes`), takes
  ``_dequant_linear_fallback``: the nested absmax dequantized to fp32 (``empty_like`` then ``+ offset``: two
  tensors), the whole weight dequantized into ``torch.empty(shape, dtype=A.dtype)``, then ``F.linear``; both are
  freed when the call returns. ``functional.dequantize_4bit`` (backward) makes the fp32 absmax (nested: one
  tensor, the offset added in place) and the weight in the quant state's dtype.
- ``optim/optimizer.py`` ``Optimizer2State`` (``AdamW8bit``, ``PagedAdamW8bit``, ``PagedAdamW``): see
  :func:`make_bnb_optimizer`.
- peft 0.21 ``tuners/lora/bnb.py`` ``Linear4bit.forward``: ``result = base_layer(x).clone()``, then per adapter
  ``output = lora_B(lora_A(dropout(x))) * scaling`` (the input first cast to the adapters' dtype and the output to
  the result's when autocast is off) and ``result = result + output``.

:func:`build_qlora_model` builds what ``memfit.reference.build_model`` builds for a 4-bit QLoRA job on a GPU: the
model in the storage dtype, its decoder linears replaced (not the LM head: transformers'
``modules_to_not_convert``), ``peft.prepare_model_for_kbit_training`` (freezes the base, upcasts the remaining
16-bit parameters to fp32), non-reentrant checkpointing, LoRA.
"""

from __future__ import annotations

import math
import types
from typing import Any

from ..estimator.quant import bnb_dequantizes

__all__ = ["build_qlora_model", "make_bnb_optimizer", "BLOCKSIZE"]

#: Weights per absmax block (bitsandbytes' default ``blocksize`` for 4-bit, the QLoRA paper's).
BLOCKSIZE = 64
#: Absmax values per fp32 constant under double quantization (``state2.blocksize``).
NESTED_BLOCKSIZE = 256


def _classes(torch: Any):
    nn = torch.nn

    class MatMul4BitEmulation(torch.autograd.Function):
        """``bnb.matmul_4bit`` for training shapes: the dequantized weight is a temporary of each call."""

        @staticmethod
        def forward(ctx, A, weight, layer):  # noqa: ANN001 - autograd.Function signature
            ctx.layer = layer  # the packed weight stays reachable, as ``ctx.tensors = (None, B)`` keeps it
            return layer._dequant_linear(A)

        @staticmethod
        def backward(ctx, grad_output):  # noqa: ANN001
            layer = ctx.layer
            absmax = layer._absmax_fp32(nested_offset_in_place=True)
            w = torch.empty(layer.out_features, layer.in_features, dtype=layer.compute_dtype,
                            device=grad_output.device)
            del absmax
            grad_a = torch.matmul(grad_output, w.to(grad_output.dtype))
            return grad_a, None, None

    class Linear4bitEmulation(nn.Linear):
        """A frozen 4-bit linear: packed ``uint8`` weight, its quantization state, bitsandbytes' forward."""

        def __init__(self, linear: Any, *, compute_dtype: Any, double_quant: bool, device: Any) -> None:
            nn.Module.__init__(self)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.compute_dtype = compute_dtype
            self.double_quant = double_quant
            numel = self.in_features * self.out_features
            self.weight = nn.Parameter(torch.empty((numel + 1) // 2, 1, dtype=torch.uint8, device=device),
                                       requires_grad=False)
            self.bias = (nn.Parameter(torch.empty(self.out_features, dtype=linear.bias.dtype, device=device),
                                      requires_grad=False) if linear.bias is not None else None)
            blocks = math.ceil(numel / BLOCKSIZE)
            if double_quant:
                self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
                self.register_buffer("absmax2", torch.empty(math.ceil(blocks / NESTED_BLOCKSIZE),
                                                            dtype=torch.float32, device=device))
                self.register_buffer("code2", torch.empty(256, dtype=torch.float32, device=device))
                self.register_buffer("offset", torch.empty((), dtype=torch.float32, device=device))
            else:
                self.register_buffer("absmax", torch.empty(blocks, dtype=torch.float32, device=device))

        def _absmax_fp32(self, nested_offset_in_place: bool = False):
            if not self.double_quant:
                return self.absmax
            dq = torch.empty(self.absmax.shape, dtype=torch.float32, device=self.absmax.device)
            if nested_offset_in_place:
                return dq  # functional.dequantize_4bit: ``absmax += offset``
            return dq + self.offset  # _dequant_linear_fallback: ``absmax = absmax_dq + absmax_offset``

        def _dequant_linear(self, a):
            rows = a.numel() // max(1, a.shape[-1])
            if bnb_dequantizes(rows, self.out_features, self.in_features):
                absmax = self._absmax_fp32()  # noqa: F841 - alive until the call returns, as in bitsandbytes
                w = torch.empty(self.out_features, self.in_features, dtype=a.dtype, device=a.device)
                return torch.nn.functional.linear(a, w, self.bias)
            # the fused kernel for few rows: no dequantized weight (an empty stand-in of the right output)
            return a.new_empty(*a.shape[:-1], self.out_features)

        def forward(self, x):  # noqa: D401 - nn.Module API
            inp_dtype = x.dtype
            x = x.to(self.compute_dtype)
            return MatMul4BitEmulation.apply(x, self.weight, self).to(inp_dtype)

    return Linear4bitEmulation


def _lora_4bit_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """peft 0.21 ``lora/bnb.py`` ``Linear4bit.forward`` for vanilla LoRA adapters (see the module docstring)."""
    import torch

    result = self.base_layer(x, *args, **kwargs).clone()
    for name in self.active_adapters:
        if name not in self.lora_A.keys():
            continue
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        dropout, scaling = self.lora_dropout[name], self.scaling[name]
        convert = not torch.is_autocast_enabled()
        if convert:
            expected = result.dtype
            x = self._cast_input_dtype(x, lora_a.weight.dtype)
        output = lora_b(lora_a(dropout(x))) * scaling
        if convert:
            output = output.to(expected)
        result = result + output
    return result


def build_qlora_model(job: Any, spec: Any, device: Any, empty_cache: Any = None) -> Any:
    """The reference QLoRA model of ``job`` (nf4 / fp4, training) with emulated 4-bit linears (see the module
    docstring). Built on the meta device and materialized on ``device`` module by module, so the load makes the
    packed weights, not the 16-bit ones they replace.

    ``empty_cache``: called where ``peft.prepare_model_for_kbit_training`` (peft 0.21 ``utils/other.py``,
    ``auto_clear_cache=True``) calls ``torch.cuda.empty_cache()`` after upcasting the 16-bit parameters to fp32 -
    on the GPU only (``torch.cuda.is_available()``), so a trace on the CPU passes its allocator model's release."""
    import torch

    from .. import reference as ref

    peft = ref._peft()
    linear_cls = _classes(torch)
    compute = torch.float16 if job.precision in ("16-mixed", "16-true") else torch.bfloat16
    config = ref.build_config(job, spec)
    cls = ref._head_class(spec)
    dtype = ref.weight_dtype(job.precision)
    with torch.device("meta"):
        model = cls.from_config(config, dtype=dtype, attn_implementation=ref._attn_implementation(job))
    out_emb = model.get_output_embeddings()
    swaps = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if isinstance(child, torch.nn.Linear) and child is not out_emb:
                swaps.append((mod, child_name, child))
    for parent, child_name, child in swaps:
        setattr(parent, child_name, linear_cls(child, compute_dtype=compute, double_quant=job.double_quant,
                                               device="meta"))
    model = model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.config.use_cache = False
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if empty_cache is not None:
        empty_cache()
    if job.gradient_checkpointing:
        ref._enable_checkpointing(model)
    model = ref._apply_lora(job, spec, model, device)
    for mod in model.modules():
        if isinstance(getattr(mod, "base_layer", None), linear_cls) and hasattr(mod, "lora_A"):
            mod.forward = types.MethodType(_lora_4bit_forward, mod)
    model.train(True)
    return model


def make_bnb_optimizer(job: Any, model: Any) -> Any:
    """A stand-in for the bitsandbytes Adam of ``job`` (``adamw-8bit``, ``paged-adamw-8bit``, ``paged-adamw``) that
    makes the state tensors the real one makes in PyTorch's allocator, when it makes them, and updates nothing.

    bitsandbytes 0.50 ``optim/optimizer.py``: ``Optimizer8bit.step`` walks the parameters with a gradient in order
    and, the first time, ``Optimizer2State.init_state``: two states per parameter, uint8 for 8-bit optimizers where
    the tensor has at least ``min_8bit_size`` (4096) elements (with an fp32 ``absmax`` per block each, plain
    ``torch.zeros`` on the device), fp32 otherwise and for the 32-bit ``PagedAdamW``. Each state comes from
    ``get_state_buffer``: ``torch.zeros_like`` on the device, unless the optimizer is paged and the tensor has at
    least 1e5 elements - then ``F.get_paged`` (``cudaMallocManaged``): unified memory outside PyTorch's allocator,
    which a trace does not count (its bytes are returned in ``host_bytes``). ``update_step`` runs fused in-place
    kernels (``optimizer_update_32bit`` / ``optimizer_update_8bit_blockwise``), no PyTorch tensors. The absmax
    block (256 values) and the size thresholds are the estimate's (:mod:`memfit.estimator.states`), which the
    measured paged run's device state bytes confirm."""
    import torch

    from ..estimator.states import PAGED_MIN_NUMEL

    params = [p for p in model.parameters() if p.requires_grad]
    paged = job.optimizer.startswith("paged")
    eight_bit = job.optimizer.endswith("8bit")

    class BnbAdamEmulation(torch.optim.Optimizer):
        def __init__(self, params_: Any) -> None:
            super().__init__(params_, dict(lr=1e-5))
            self.host_bytes = 0

        def _buffer(self, p: Any, dtype: Any) -> Any:
            if paged and p.numel() >= PAGED_MIN_NUMEL:
                self.host_bytes += p.numel() * torch.empty((), dtype=dtype).element_size()
                return torch.empty(p.shape, dtype=dtype, device="meta")  # unified memory: not in the allocator
            return torch.zeros_like(p, dtype=dtype)

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if state:
                        continue  # the update itself: in-place kernels
                    state["step"] = 0
                    if eight_bit and p.numel() >= 4096:
                        state["state1"] = self._buffer(p, torch.uint8)
                        state["state2"] = self._buffer(p, torch.uint8)
                        blocks = -(-p.numel() // 256)
                        state["absmax1"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)
                        state["absmax2"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)
                    else:
                        state["state1"] = self._buffer(p, torch.float32)
                        state["state2"] = self._buffer(p, torch.float32)
            return None

    return BnbAdamEmulation(params)
