"""Paged-attention custom ops and the direct API (inference only: no autograd).

Two entry points, each a ``torch.library`` custom op with a fake registration (so ``torch.compile``
sees one opaque call). Eager calls without autograd run the same implementation directly, skipping the
dispatcher's host cost; CUDA graphs capture the kernels either way:

* :func:`write_kv` ``(k_pool, v_pool, k_new, v_new, slot_mapping)``: store new tokens' K/V in their
  slots (mutates the pools).
* :func:`paged_attention` ``(q, k_pool, v_pool, block_tables, seq_lens, ...) -> out``: attention of
  new query tokens over the paged cache (which already holds them: call :func:`write_kv` first).

A model runs many layers over one step's block tables: its integration (``PagedCache``, continuous batching)
builds the step's :class:`PagedPlan` once (:func:`plan`: backend, direct or op path, and on the Triton
backend the kernels' split counts, head padding, grids and partial buffers) and calls :func:`run` per layer
with the layer's pools and :class:`~hf_attn_plugin.kernels.params.AttentionParams`. :func:`paged_attention`
is one call's checks, plan and run.

Layout (see :mod:`hf_attn_plugin.paged.allocator`): pools ``[num_pages, page_size, H_kv, D]``;
``block_tables`` int32 ``[num_seqs, max_pages_per_seq]``; ``seq_lens`` int32 ``[num_seqs]`` counts
the cached tokens including the new ones; ``slot_mapping`` int64 ``[T]`` = ``page * page_size +
offset`` (``-1``: skip). q/out are ``[T, H_q, D]``; decode is one token per sequence (``T ==
num_seqs``, ``cu_seqlens_q=None``), prefill/chunked prefill pass ``cu_seqlens_q`` int32
``[num_seqs + 1]`` (rows of q per sequence; ``cu_seqlens_q[-1] == T``).

Semantics: :func:`hf_attn_plugin.reference.attention_reference` on each sequence's gathered
cache ``[1, L, H_kv, D]`` with one segment ``(0, 0, n, k_start, L)`` (bottom-right aligned: the
``n`` new tokens are the last ``n`` positions). The backend follows
:func:`hf_attn_plugin.ops.backend_for`: Triton kernels on CUDA (or CPU under ``TRITON_INTERPRET=1``
with ``HF_ATTN_PLUGIN_BACKEND=triton``), the gathering reference elsewhere.

Checks: :func:`write_kv` and :func:`paged_attention` check shapes, dtypes and devices on every call, and the
values of index tensors (slots, block-table entries, lengths, ``k_starts``, ``cu_seqlens_q``) as
``HF_ATTN_PLUGIN_CHECKS`` says (:mod:`hf_attn_plugin._checks`): by default without a synchronisation, and not
at all for the tensors of a :class:`~hf_attn_plugin.paged.StepPlan` (the allocator built them), so the decode
hot path pays nothing. :func:`plan`/:func:`run`, ``write_kv_trusted`` and ``paged_attention_trusted`` skip every
check (integration code that built its arguments itself).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import reference
from ._checks import CHEAP, FULL, OFF, built_facts, checks_level, integer, require
from .kernels.params import AttentionParams
from .ops import backend_for

__all__ = ["PagedPlan", "paged_attention", "write_kv", "gather_kv", "paged_attention_reference",
           "paged_attention_trusted", "plan", "run", "write_kv_trusted"]


# --------------------------------------------------------------------------- reference path
def gather_kv(pool: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first ``length`` cached tokens as a contiguous ``[1, length, H_kv, D]``.

    The reference path (it reads the table back to the host): the pages ``length`` covers are checked.
    """
    page_size = pool.shape[1]
    length = integer("length", length)
    if block_table.dim() != 1 or block_table.is_floating_point() or block_table.is_complex():
        raise ValueError(f"gather_kv: block_table must be one integer row, got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if pool.dim() != 4 or page_size <= 0 or length > block_table.shape[0] * page_size:
        raise ValueError(f"gather_kv: {length} tokens do not fit {block_table.shape[0]} pages of pool "
                         f"{tuple(pool.shape)}")
    num_pages = -(-length // page_size)
    pages = block_table[:num_pages].to(device=pool.device, dtype=torch.long)
    if num_pages and not bool(((pages >= 0) & (pages < pool.shape[0])).all()):
        raise ValueError(f"gather_kv: block_table entries {pages.tolist()} are not all pages in [0, {pool.shape[0]})")
    return pool.index_select(0, pages).flatten(0, 1)[:length].unsqueeze(0)


def paged_attention_reference(
    q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, scale, causal, window, softcap
) -> torch.Tensor:
    """Gather each sequence's pages and run :func:`attention_reference` on it (the CPU path / oracle)."""
    num_seqs = seq_lens.shape[0]
    lens = seq_lens.tolist()
    cu = cu_seqlens_q.tolist() if cu_seqlens_q is not None else list(range(num_seqs + 1))
    starts = k_starts.tolist() if k_starts is not None else [0] * num_seqs
    out = torch.zeros_like(q)
    for b in range(num_seqs):
        q0, q1, length = cu[b], cu[b + 1], lens[b]
        if q1 == q0:
            continue
        k = gather_kv(k_pool, block_tables[b], length)
        v = gather_kv(v_pool, block_tables[b], length)
        seg = torch.tensor([[0, 0, q1 - q0, starts[b], length]], dtype=torch.int32)
        o, _ = reference.attention_reference(
            q[q0:q1].unsqueeze(0), k, v, scale=scale, causal=causal, window=window or None,
            softcap=softcap or None, sinks=sinks, segments=seg,
        )
        out[q0:q1] = o[0]
    return out


def _write_kv_reference(k_pool, v_pool, k_new, v_new, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(torch.long)
    page_size = k_pool.shape[1]
    where = (slots // page_size, slots % page_size)  # any pool strides (a flat view needs contiguous pools)
    for pool, new in ((k_pool, k_new), (v_pool, v_new)):
        pool.index_put_(where, new[keep].to(pool.dtype))


# --------------------------------------------------------------------------- custom ops
def _write_kv_impl(k_pool, v_pool, k_new, v_new, slot_mapping) -> None:
    if backend_for(k_pool.device) == "triton":
        from .kernels import paged

        paged.write_kv(k_pool, v_pool, k_new, v_new, slot_mapping)
    else:
        _write_kv_reference(k_pool, v_pool, k_new, v_new, slot_mapping)


@torch.library.custom_op("hf_attn_plugin::paged_write_kv", mutates_args=("k_pool", "v_pool"))
def _write_kv_op(
    k_pool: torch.Tensor, v_pool: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    _write_kv_impl(k_pool, v_pool, k_new, v_new, slot_mapping)


@_write_kv_op.register_fake
def _(k_pool, v_pool, k_new, v_new, slot_mapping):
    return None


def _paged_attention_impl(q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, scale, causal,
                          window, softcap, num_splits, max_seqlen_q) -> torch.Tensor:
    step = _plan(q, k_pool, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, k_starts, num_splits, direct=True)
    return _run_direct(q, k_pool, v_pool, step, _params(scale, causal, window, softcap, sinks))


@torch.library.custom_op("hf_attn_plugin::paged_attention", mutates_args=())
def _paged_attention_op(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    k_starts: Optional[torch.Tensor],
    sinks: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    window: int,
    softcap: float,
    num_splits: int,
    max_seqlen_q: int,
) -> torch.Tensor:
    return _paged_attention_impl(q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, scale,
                                 causal, window, softcap, num_splits, max_seqlen_q)


@_paged_attention_op.register_fake
def _(q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, scale, causal, window, softcap,
      num_splits, max_seqlen_q):
    return torch.empty_like(q)


def _direct(*tensors: torch.Tensor) -> bool:
    """Run an op's implementation directly (skipping the ``torch.library`` dispatcher, ~50-150 us a call on the
    host) when nothing needs the op boundary: not traced by dynamo, plain tensors (no fake/functional tensors
    from ``make_fx``/export), and no autograd (the ops have no backward; through the op a ``requires_grad``
    input raises instead of silently returning a tensor without history)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) is torch.Tensor and not (grad and t.requires_grad) for t in tensors)


def write_kv_trusted(k_pool, v_pool, k_new, v_new, slot_mapping) -> None:
    """:func:`write_kv` without the argument checks (for callers that built the arguments themselves)."""
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    k_new, v_new = k_new.to(k_pool.dtype), v_new.to(v_pool.dtype)
    if _direct(k_pool, k_new, v_new):
        _write_kv_impl(k_pool, v_pool, k_new, v_new, slot_mapping)
    else:
        _write_kv_op(k_pool, v_pool, k_new, v_new, slot_mapping)


def paged_attention_trusted(q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, scale: float,
                     causal: bool, window: int, softcap: float, num_splits: int, max_seqlen_q: int) -> torch.Tensor:
    """:func:`paged_attention` without the argument checks (one call's :func:`plan` and :func:`run`): every argument
    normalised (``window``/``softcap``/``num_splits`` 0 = off/auto, host ``max_seqlen_q``)."""
    step = plan(q, k_pool, block_tables, seq_lens, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
                k_starts=k_starts, num_splits=num_splits)
    return run(q, k_pool, v_pool, step, _params(scale, causal, window, softcap, sinks))


# --------------------------------------------------------------------------- plan / run
class PagedPlan:
    """One step of paged attention, shared by every layer of the step: the step's index tensors and, on the
    Triton backend, the kernels' launch geometry (:class:`hf_attn_plugin.kernels.paged.Plan`: split counts, head
    padding, grids, partial buffers). Built by :func:`plan`, read by :func:`run`."""

    __slots__ = ("q_shape", "dtype", "block_tables", "seq_lens", "cu_seqlens_q", "max_seqlen_q", "k_starts",
                 "num_splits", "kernel", "direct")

    def __init__(self, q_shape, dtype, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, k_starts, num_splits,
                 kernel, direct):
        self.q_shape, self.dtype = q_shape, dtype
        self.block_tables, self.seq_lens, self.cu_seqlens_q = block_tables, seq_lens, cu_seqlens_q
        self.max_seqlen_q, self.k_starts, self.num_splits = max_seqlen_q, k_starts, num_splits
        self.kernel = kernel  # kernels.paged.Plan on the Triton backend, None on the reference backend
        self.direct = direct  # eager without autograd: run the implementation, not the custom op


def _plan(q, k_pool, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, k_starts, num_splits, direct) -> PagedPlan:
    kernel = None
    if backend_for(q.device) == "triton":
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"paged_attention: the Triton paged kernels take float16, bfloat16 or float32, got "
                             f"{q.dtype}: use HF_ATTN_PLUGIN_BACKEND=reference for it")
        if q.dtype == torch.bfloat16 and q.device.type != "cuda":
            raise ValueError("paged_attention: bfloat16 on the Triton interpreter (CPU tensors) gives wrong results "
                             "(an upstream interpreter bug in bf16 tl.dot): use float32 or float16 under "
                             "TRITON_INTERPRET=1, or HF_ATTN_PLUGIN_BACKEND=reference")
        if direct:  # the custom op (compile, autograd) plans inside its implementation, on real tensors
            from .kernels import paged

            kernel = paged.Plan(q.shape, q.dtype, q.device, k_pool.shape, block_tables, seq_lens, cu_seqlens_q,
                                max_seqlen_q, k_starts, num_splits)
    return PagedPlan(q.shape, q.dtype, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, k_starts, num_splits,
                     kernel, direct)


def plan(q: torch.Tensor, k_pool: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, *,
         cu_seqlens_q: torch.Tensor | None = None, max_seqlen_q: int = 1, k_starts: torch.Tensor | None = None,
         num_splits: int = 0) -> PagedPlan:
    """The step's :class:`PagedPlan`, for every layer whose query has ``q``'s shape and dtype and whose pools have
    ``k_pool``'s shape. Arguments as :func:`paged_attention` takes them, already checked and normalised (the
    allocator's :class:`~hf_attn_plugin.paged.StepPlan` or integration code built them): host ``max_seqlen_q``
    (1 for decode), ``num_splits`` 0 = auto, ``q`` with a unit last stride. Users call :func:`paged_attention`.

    In eager mode without autograd the layers' :func:`run` calls launch the kernels directly (no
    ``torch.library`` dispatch: ~50-150 us a call on the host); under ``torch.compile``, for tensor subclasses
    (fake/functional tensors) or inputs that require grad they go through the custom op (opaque to dynamo; it
    has no backward, so a ``requires_grad`` input raises instead of silently losing its history).
    """
    direct = (not torch.compiler.is_compiling() and type(q) is torch.Tensor and type(k_pool) is torch.Tensor
              and not (torch.is_grad_enabled() and (q.requires_grad or k_pool.requires_grad)))
    return _plan(q, k_pool, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, k_starts, num_splits, direct)


def run(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: PagedPlan, params) -> torch.Tensor:
    """One layer's paged attention: ``q`` ``[T, Hq, D]`` over ``k_pool``/``v_pool`` with the step's ``plan``;
    returns ``[T, Hq, D]``. ``params``: the layer's attention parameters (``scale``, ``causal``, ``window``,
    ``softcap``, ``sinks``; 0 or ``None`` mean off), e.g. the integration's ``AttentionCall``."""
    if q.shape != plan.q_shape or q.dtype != plan.dtype:
        raise ValueError(f"paged run: q is {q.dtype} {tuple(q.shape)}, the step was planned for {plan.dtype} "
                         f"{tuple(plan.q_shape)}: plan each step (and each query shape) once")
    sinks = params.sinks
    if plan.direct and (sinks is None or not (sinks.requires_grad and torch.is_grad_enabled())):
        return _run_direct(q, k_pool, v_pool, plan, params)
    return _paged_attention_op(
        q, k_pool, v_pool, plan.block_tables, plan.seq_lens, plan.cu_seqlens_q, plan.k_starts, sinks,
        float(params.scale), bool(params.causal), int(params.window or 0), float(params.softcap or 0.0),
        plan.num_splits, plan.max_seqlen_q,
    )


def _run_direct(q, k_pool, v_pool, plan: PagedPlan, params) -> torch.Tensor:
    if plan.kernel is not None:
        return plan.kernel.run(q, k_pool, v_pool, params)
    return paged_attention_reference(
        q, k_pool, v_pool, plan.block_tables, plan.seq_lens, plan.cu_seqlens_q, plan.k_starts, params.sinks,
        params.scale, params.causal, params.window or 0, params.softcap or 0.0,
    )


def _params(scale: float, causal: bool, window: int, softcap: float, sinks: torch.Tensor | None):
    """The parameters :func:`run` reads, for the flat signatures (the custom op, the public function)."""
    return AttentionParams(scale, causal, window, softcap, sinks)


# --------------------------------------------------------------------------- argument checks
# Metadata (shapes, dtypes, devices) is checked on every call: it costs nothing. Values of index tensors are
# checked by HF_ATTN_PLUGIN_CHECKS (see hf_attn_plugin._checks): device-side by default, skipped for tensors
# the package built itself (StepPlan), all of them with one read-back under "full".
def _check_pools(fn: str, k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"{fn}: k_pool and v_pool must both be [num_pages, page_size, H_kv, D], got "
                         f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    if min(k_pool.shape[1:]) <= 0:
        raise ValueError(f"{fn}: pools {tuple(k_pool.shape)} need page_size, H_kv and D >= 1")
    if not k_pool.is_floating_point() or k_pool.dtype != v_pool.dtype:
        raise ValueError(f"{fn}: pools must share one floating dtype, got {k_pool.dtype} and {v_pool.dtype}")
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError(f"{fn}: the pools' last dimension (head_dim) must be contiguous")


def _check_devices(fn: str, device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{fn}: {name} is on {t.device}, expected {device} (every tensor on one device)")


def _check_index(fn: str, name: str, t: torch.Tensor | None, shape: tuple, dtypes=(torch.int32,)) -> torch.Tensor:
    """An index tensor of ``shape`` (``None`` entries: any size) and dtype, made contiguous (kernels read it
    with unit stride)."""
    if t is None:
        return None
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{fn}: {name} must be [{want}], got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{fn}: {name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    return t if t.is_contiguous() else t.contiguous()


def _check_slot_values(slot_mapping: torch.Tensor, num_slots: int, level: int) -> None:
    facts = built_facts(slot_mapping) if level == CHEAP else None
    if facts is not None:
        if facts["num_slots"] > num_slots:
            raise ValueError(f"write_kv: slot_mapping was planned for {facts['num_slots']} slots, the pools hold "
                             f"{num_slots}: pass the pools of the cache that made the plan")
        return
    msg = f"write_kv: slot_mapping has a slot >= {num_slots} (the pools' num_pages * page_size); -1 skips a token"
    conds = [(slot_mapping < num_slots, msg)]
    if level == FULL:
        srt = slot_mapping.sort().values
        conds.append(((srt[1:] != srt[:-1]) | (srt[1:] < 0), "write_kv: slot_mapping holds a slot twice"))
    require(conds, host=level == FULL or slot_mapping.device.type == "cpu")


def _check_attention_values(block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, num_tokens: int, num_pages: int,
                            page_size: int, max_seqlen_q: int, level: int, synced: bool) -> None:
    conds = []
    cheap = level == CHEAP
    bt_facts, sl_facts = (built_facts(block_tables), built_facts(seq_lens)) if cheap else (None, None)
    width = block_tables.shape[1]
    capacity = width * page_size
    if bt_facts is not None and sl_facts is not None:
        if bt_facts["num_pages"] > num_pages or sl_facts["max_len"] > capacity:
            raise ValueError(f"paged_attention: block_tables/seq_lens were planned for {bt_facts['num_pages']} "
                             f"pages, the pools hold {num_pages}: pass the pools of the cache that made the plan")
    else:
        conds.append(((seq_lens >= 0) & (seq_lens <= capacity),
                      f"paged_attention: seq_lens must be in [0, {capacity}] (block_tables has {width} pages of "
                      f"{page_size} tokens per sequence)"))
        cols = torch.arange(width, device=block_tables.device, dtype=torch.int32)
        used = cols[None, :] * page_size < seq_lens[:, None]  # entries the kernels read
        conds.append((~used | ((block_tables >= 0) & (block_tables < num_pages)),
                      f"paged_attention: a block_tables entry within seq_lens is not a page in [0, {num_pages})"))
    if k_starts is not None and (not cheap or built_facts(k_starts) is None):
        conds.append((k_starts >= 0, "paged_attention: k_starts must be >= 0"))
    if cu_seqlens_q is not None:
        cu_facts = built_facts(cu_seqlens_q) if cheap else None
        if cu_facts is not None:
            if cu_facts["total"] != num_tokens or cu_facts["max_count"] > max_seqlen_q:
                raise ValueError(f"paged_attention: cu_seqlens_q was planned for {cu_facts['total']} tokens of at "
                                 f"most {cu_facts['max_count']} per sequence; q has {num_tokens} tokens and "
                                 f"max_seqlen_q={max_seqlen_q}")
        else:
            counts = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
            conds += [
                ((cu_seqlens_q[:1] == 0) & (cu_seqlens_q[-1:] == num_tokens),
                 f"paged_attention: cu_seqlens_q must start at 0 and end at q's token count {num_tokens}"),
                (counts >= 0, "paged_attention: cu_seqlens_q must be non-decreasing"),
                (counts <= max_seqlen_q,
                 f"paged_attention: a sequence has more than max_seqlen_q={max_seqlen_q} query tokens"),
            ]
    if sinks is not None and not cheap:  # +inf: NaN on the kernels, 0 on the reference
        conds.append((sinks != float("inf"), "paged_attention: sinks must not be +inf"))
    require(conds, host=level == FULL or synced or seq_lens.device.type == "cpu")


# --------------------------------------------------------------------------- public API
def write_kv(
    k_pool: torch.Tensor, v_pool: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``k_new``/``v_new`` ``[T, H_kv, D]`` into ``k_pool``/``v_pool`` at ``slot_mapping`` ``[T]``.

    ``slot = page * page_size + offset`` (int64 or int32); negative slots are skipped (padding tokens).
    Slots must be distinct (the allocator guarantees it). Slots past the pools are refused (see
    ``HF_ATTN_PLUGIN_CHECKS`` in :mod:`hf_attn_plugin._checks`).
    """
    fn = "write_kv"
    _check_pools(fn, k_pool, v_pool)
    if k_new.shape != v_new.shape or k_new.dim() != 3:
        raise ValueError(f"{fn}: k_new/v_new must both be [T, H_kv, D], got {tuple(k_new.shape)} and "
                         f"{tuple(v_new.shape)}")
    if k_pool.shape[2:] != k_new.shape[1:]:
        raise ValueError(f"{fn}: pools {tuple(k_pool.shape)} do not match new tokens {tuple(k_new.shape)}")
    if not (k_new.is_floating_point() and v_new.is_floating_point()):
        raise ValueError(f"{fn}: k_new/v_new must be floating point, got {k_new.dtype} and {v_new.dtype}")
    slot_mapping = _check_index(fn, "slot_mapping", slot_mapping, (k_new.shape[0],), (torch.int64, torch.int32))
    _check_devices(fn, k_pool.device, v_pool=v_pool, k_new=k_new, v_new=v_new, slot_mapping=slot_mapping)
    level = checks_level()
    if level != OFF:
        _check_slot_values(slot_mapping, k_pool.shape[0] * k_pool.shape[1], level)
    write_kv_trusted(k_pool, v_pool, k_new, v_new, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    k_starts: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of ``q`` ``[T, H_q, D]`` over a paged KV cache; returns ``[T, H_q, D]`` (q's dtype).

    * decode: ``cu_seqlens_q=None``, ``T == num_seqs`` (query ``b`` is sequence ``b``'s last token).
      Sync-free and of a fixed grid for given shapes and ``num_splits``: CUDA-graph capturable.
    * prefill / chunked prefill / mixed: ``cu_seqlens_q`` int32 ``[num_seqs+1]`` (``0 .. T``,
      non-decreasing); ``max_seqlen_q`` (host int) bounds the per-sequence query count (read from
      ``cu_seqlens_q`` when omitted: a sync).
    * ``k_starts`` int32 ``[num_seqs]`` (>= 0): cached positions before it are padding (left-padded batches).
    * ``window`` (keys ``j > pos - window``; ``None``/0: off), ``softcap`` (``None``/0: off), ``sinks``
      ``[H_q]``: as in :mod:`hf_attn_plugin.reference`. ``scale`` defaults to ``D ** -0.5``.
    * ``num_splits``: split-K factor over the context (``None``: from shapes and the SM count).

    ``seq_lens`` must fit the block table (``<= max_pages_per_seq * page_size``) and the table's entries
    that ``seq_lens`` covers must be pages of the pools; checked as ``HF_ATTN_PLUGIN_CHECKS`` says
    (:mod:`hf_attn_plugin._checks`).
    """
    fn = "paged_attention"
    _check_pools(fn, k_pool, v_pool)
    if q.dim() != 3 or min(q.shape[1:]) <= 0:
        raise ValueError(f"{fn}: q must be [T, Hq, D] with Hq, D >= 1, got {tuple(q.shape)}")
    if q.shape[-1] != k_pool.shape[-1] or q.shape[1] % k_pool.shape[2]:
        raise ValueError(f"{fn}: q {tuple(q.shape)} does not fit pools {tuple(k_pool.shape)} (head_dim, GQA grouping)")
    if q.dtype != k_pool.dtype:
        raise ValueError(f"{fn}: dtypes differ: q {q.dtype}, pools {k_pool.dtype}")
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    seq_lens = _check_index(fn, "seq_lens", seq_lens, (None,))
    block_tables = _check_index(fn, "block_tables", block_tables, (num_seqs, None))
    cu_seqlens_q = _check_index(fn, "cu_seqlens_q", cu_seqlens_q, (num_seqs + 1,))
    k_starts = _check_index(fn, "k_starts", k_starts, (num_seqs,))
    if cu_seqlens_q is None and q.shape[0] != num_seqs:
        raise ValueError(f"{fn}: decode takes one query per sequence: q has {q.shape[0]} tokens, {num_seqs} "
                         "sequences (pass cu_seqlens_q for several tokens per sequence)")
    if sinks is not None and (sinks.shape != (q.shape[1],) or not sinks.is_floating_point()):
        raise ValueError(f"{fn}: sinks must be floating [Hq={q.shape[1]}], got {sinks.dtype} {tuple(sinks.shape)}")
    _check_devices(fn, q.device, k_pool=k_pool, v_pool=v_pool, block_tables=block_tables, seq_lens=seq_lens,
                   cu_seqlens_q=cu_seqlens_q, k_starts=k_starts, sinks=sinks)
    window = integer("window", window) if window is not None else 0
    num_splits = integer("num_splits", num_splits) if num_splits is not None else 0
    softcap = float(softcap) if softcap is not None else 0.0
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"{fn}: softcap must be a finite number >= 0 (0 or None: off), got {softcap}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    synced = False
    if cu_seqlens_q is None:
        max_seqlen_q = 1
    elif max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if num_seqs > 0 else 0
        synced = True
    else:  # a loose bound is fine, but it sizes the grid: no sequence has more than T query tokens
        max_seqlen_q = min(integer("max_seqlen_q", max_seqlen_q), q.shape[0])
    level = checks_level()
    if level != OFF:
        _check_attention_values(block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, q.shape[0], k_pool.shape[0],
                                k_pool.shape[1], max_seqlen_q, level, synced)
    return paged_attention_trusted(
        q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks,
        float(q.shape[-1] ** -0.5 if scale is None else scale), bool(causal), window, softcap, num_splits,
        max(max_seqlen_q, 0),
    )
