"""The attention function registered as ``"plugin"``: transformers' call -> one normalised description -> one op.

transformers calls ``fn(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)``
with ``query`` ``[B, Hq, Sq, D]`` (a transposed view of ``[B, Sq, Hq, D]`` memory), ``key``/``value``
``[B, Hkv, Sk, D]`` (already concatenated with the cache, never repeated for GQA; ``value`` ``[B, Hkv, Sk, Dv]`` under
multi-head latent attention, DeepSeek-V2/V3) and expects ``([B, Sq, Hq, Dv], None)``. :func:`describe_call` gathers
everything that shapes the computation into one :class:`~hf_attn_plugin.ops.AttentionParams`; :func:`plugin_attention`
runs it through :func:`hf_attn_plugin.ops.attention_trusted` (the segments are built here, so their values are not
re-checked), or, for decode-shaped calls over a cache, through :func:`hf_attn_plugin.decode_ops.attention`. A page
pool of a ``PagedCache`` is read through its block tables. Nothing here branches on the model family.
"""

from __future__ import annotations

import weakref

import torch

from .. import _checks, decode_ops, ops
from .compat import is_compiling, max_length_kwarg
from .masks import segments_from_cu_seqlens, segments_from_documents, segments_from_key_mask
from .paged_cache import paged_reader_of

try:  # tensor parallelism: transformers' plans hand over DTensors in some cases (see _local_sinks)
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without torch.distributed: no DTensor can arrive
    DTensor = Shard = None

__all__ = ["AttentionCall", "describe_call", "describe_paged_call", "plugin_attention"]


# Deprecated name of ops.AttentionParams (what describe_call returns): normalised fields, window 0 / softcap 0.0 for
# none (not None), and dropout_p for the former dropout.
AttentionCall = ops.AttentionParams


def plugin_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry point for ``attn_implementation="plugin"``."""
    if DTensor is not None and any(isinstance(t, DTensor) for t in (query, key, value)):
        placements = [tuple(t.placements) for t in (query, key, value) if isinstance(t, DTensor)]
        raise NotImplementedError(
            f"attn_implementation='plugin' received query/key/value as DTensors (placements {placements}). Its "
            "kernels run on each rank's local heads: use a tensor-parallel plan whose q/k/v projections return "
            "local tensors (transformers' 'colwise' style, as tp_plan='auto' does)."
        )
    reader = paged_reader_of(key)
    if reader is not None:  # a paged cache handed us its page pools: attend through its block tables in place
        call = describe_paged_call(module, query, dropout, scaling, kwargs)
        return reader.attend(call, query, attention_mask), None
    call = describe_call(module, query, key, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    dtype = _compute_dtype(q, k)
    if not q.dtype == k.dtype == v.dtype == dtype:  # the common case: one dtype (a no-op .to costs host time)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    # Decode and short chunks over a cache (inference): the GQA-packed split-K kernel reads the cache in place.
    # Segments here come from the key mask unless cu_seq_lens_q packed sequences (position_ids need Sq == Sk).
    key_segments = call.segments if kwargs.get("cu_seq_lens_q") is None else None
    if (not dropout and (call.segments is None or key_segments is not None)
            and decode_ops.applies(q, k, v, causal=call.causal, sinks=call.sinks, key_segments=key_segments)):
        return decode_ops.attention(q, k, v, call, key_segments=key_segments), None
    out = ops.attention_trusted(q, k, v, call)  # segments built here: valid by construction, no value checks
    return out, None


def _compute_dtype(q: torch.Tensor, k: torch.Tensor) -> torch.dtype:
    """The dtype the kernels run in.

    Under autocast, the autocast dtype: Llama-style rotary embeddings return fp32 q/k while v is already
    bf16, and a custom op gets no autocast cast of its own. Otherwise the key's (the cache's) dtype, e.g.
    for fp32 queries from upcast norms against a bf16 cache.
    """
    device = q.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return k.dtype


_MASK_DTYPES = (torch.bool, torch.int32)  # what plugin_mask returns: a key mask, or packed document indices


def describe_call(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    is_causal: bool | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    output_attentions: bool = False,
    **kwargs,
) -> ops.AttentionParams:
    """Normalise transformers' kwargs into :class:`~hf_attn_plugin.ops.AttentionParams`, refusing what we cannot do
    exactly."""
    model = type(module).__name__
    if output_attentions:
        raise NotImplementedError(
            f"{model}: attn_implementation='plugin' never materialises attention weights, so "
            "output_attentions=True is not available. Load the model with attn_implementation='eager' "
            "(or call model.set_attn_implementation('eager')) to inspect attention weights."
        )
    if dropout and not 0.0 < float(dropout) < 1.0:
        raise ValueError(f"{model}: attention dropout must be in [0, 1), got {dropout}")
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype not in _MASK_DTYPES):
        raise NotImplementedError(
            f"{model}: attn_implementation='plugin' received a custom {attention_mask.dim()}-D "
            f"{attention_mask.dtype} attention mask. It supports 2-D padding masks (transformers builds them "
            "through the registered 'plugin' mask function); use 'eager' or 'sdpa' for arbitrary dense masks."
        )

    batch, heads_q, seqlen_q, head_dim = query.shape
    seqlen_k = key.shape[2]
    if DTensor is not None and isinstance(s_aux, DTensor):
        s_aux = _local_sinks(s_aux, heads_q)
    causal = bool(module.is_causal if is_causal is None else is_causal)
    segments, max_q, max_k = None, None, None
    if cu_seq_lens_q is not None:
        if batch != 1:
            raise ValueError(f"{model}: cu_seq_lens_q/k describe sequences packed into one row, got batch {batch}")
        cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
        max_q = max_length_kwarg(kwargs, "q")
        max_k = max_length_kwarg(kwargs, "k") or max_q
        # The user's data collator wrote these: check them once per forward pass (the memo), not per layer.
        segments = _memoised(cu_seq_lens_q, seqlen_q, module, lambda: _checked_cu_segments(
            cu_seq_lens_q, cu_k, seqlen_q, seqlen_k, max_q, max_k))
    elif attention_mask is not None and attention_mask.dtype == torch.int32:
        # Packed documents, as transformers detected them from position_ids (masks.packed_documents): its rule
        # of each release, not ours; position_ids themselves are never read here.
        segments, max_q = _memoised(attention_mask, seqlen_q, module, lambda: segments_from_documents(attention_mask))
        max_k = max_q
    elif attention_mask is not None:
        segments = _memoised(attention_mask, seqlen_q, module,
                             lambda: segments_from_key_mask(attention_mask, seqlen_q))

    return ops.AttentionParams.create(
        head_dim, scale=scaling, causal=causal, window=sliding_window, softcap=softcap, sinks=s_aux,
        segments=segments, max_seqlen_q=max_q, max_seqlen_k=max_k, dropout_p=dropout,
    )


def _local_sinks(sinks: "DTensor", heads_q: int) -> torch.Tensor:
    """This rank's sinks from a DTensor (transformers 5.17's 'colwise' sinks rule without 'local_params').

    ``Shard(0)`` over a 1-D mesh holds this rank's contiguous block of heads, the block the colwise q_proj
    shard gives it, so the local tensor is exactly the sinks of the local query heads.
    """
    local = sinks.to_local()
    if tuple(sinks.placements) != (Shard(0),) or local.shape != (heads_q,):
        raise ValueError(
            f"attn_implementation='plugin' received the attention sinks (s_aux) as a DTensor with placements "
            f"{tuple(sinks.placements)} and {local.numel()} local entries for {heads_q} local query heads: under "
            "tensor parallelism the sinks must be sharded over heads exactly like q_proj. Shard them with a "
            "'colwise' rule (plus 'local_params' on self_attn where transformers has it)."
        )
    return local


# What shapes a paged call (the reader knows the layout: positions, cu_seq_lens, masks are not needed).
_PAGED_FEATURES = ("sliding_window", "softcap", "s_aux", "is_causal", "output_attentions")
_PAGED_CALLS = weakref.WeakKeyDictionary()  # module -> (key, AttentionParams)


def describe_paged_call(module: torch.nn.Module, query: torch.Tensor, dropout: float, scaling, kwargs: dict):
    """:func:`describe_call` for a paged reader's call (no mask, no packing), memoised per module.

    Every step calls each layer with the same features, so the params are built (and checked)
    once per layer, not once per layer and step. Tensors (``s_aux``) are keyed by identity.
    """
    if dropout:
        raise NotImplementedError(
            f"{type(module).__name__}: attention dropout ({dropout}) with a paged KV cache is not supported by "
            "attn_implementation='plugin' (a paged cache serves inference): call model.eval() before generating, "
            "or train without the paged cache."
        )
    features = {name: kwargs[name] for name in _PAGED_FEATURES if kwargs.get(name) is not None}
    key = (query.shape[-1], module.is_causal, dropout, scaling,
           *((name, ("tensor", id(v)) if isinstance(v, torch.Tensor) else v) for name, v in features.items()))
    cached = None if is_compiling() else _PAGED_CALLS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    call = describe_call(module, query, query, None, dropout=dropout, scaling=scaling, **features)
    if not is_compiling():
        _PAGED_CALLS[module] = (key, call)  # the call holds s_aux itself, so its id stays valid while cached
    return call


def _checked_cu_segments(cu_q, cu_k, seqlen_q, seqlen_k, max_q, max_k) -> torch.Tensor:
    segments = segments_from_cu_seqlens(cu_q, cu_k)
    if cu_q.dim() != 1 or cu_k.shape != cu_q.shape:
        raise ValueError(f"cu_seq_lens_q/k must be 1-D of one length, got {tuple(cu_q.shape)} and {tuple(cu_k.shape)}")
    level = _checks.checks_level()
    if level != _checks.OFF:
        host = level == _checks.FULL or (cu_q.device.type == "cpu" and not is_compiling())
        ops.check_segments(segments, 1, seqlen_q, seqlen_k, max_q or seqlen_q, max_k or seqlen_k, host=host)
    return segments


# Every layer of a forward pass receives the same mask / cu_seq_lens tensor: derive segments once. A few
# entries, so that models alternating two masks (sliding and full layers) keep both.
_MEMO: list = []  # [weakref to the tensor, key, value, modules that used the entry]
_MEMO_SIZE = 4


def _memoised(tensor: torch.Tensor, seqlen_q: int, module: torch.nn.Module, compute):
    """``compute()``, reused while ``tensor`` is the same, unmodified tensor.

    "Unmodified" comes from the version counter; inference tensors (``torch.inference_mode``) have none, so
    for them an entry lives for one forward pass: a layer that meets its own entry again starts a new one.
    """
    if is_compiling():
        return compute()
    versioned = not tensor.is_inference()
    key = (tensor.data_ptr(), tensor._version if versioned else None, tuple(tensor.shape), tensor.device, seqlen_q)
    for i, (ref, entry_key, value, modules) in enumerate(_MEMO):
        if ref() is tensor and entry_key == key:
            if versioned or module not in modules:
                modules.add(module)
                return value
            del _MEMO[i]
            break
    value = compute()
    _MEMO.insert(0, (weakref.ref(tensor), key, value, weakref.WeakSet([module])))
    del _MEMO[_MEMO_SIZE:]
    return value
