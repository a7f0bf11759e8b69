"""A ``transformers.Cache`` whose layers live in pages: ``model.generate(past_key_values=PagedCache(...))``.

Every layer stores its K/V in one preallocated pool ``[num_pages, page_size, H_kv, D]`` of a shared
:class:`~hf_attn_plugin.paged.PagePool`; a batch row is one paged sequence. One forward step:

1. the first layer's ``update`` asks the page pool for the step's pages (``PagePool.plan``: all
   layers share block tables, so pages are allocated once per step, all-or-nothing, raising
   :class:`~hf_attn_plugin.paged.OutOfPagesError` when they do not fit);
2. each layer's ``update`` writes its new K/V into its pools with :func:`~hf_attn_plugin.paged_ops.write_kv`
   and returns the *pools themselves*, tagged with the layer (:func:`tag_pool`);
3. ``plugin_attention`` recognises a tagged pool (:func:`paged_reader_of`) and calls the layer's
   :meth:`PagedLayer.attend` (the :class:`PagedReader` protocol). The step's first ``attend`` builds the
   step's paged-attention plan (:func:`~hf_attn_plugin.paged_ops.plan`: ``k_starts`` from the key mask,
   split counts, grids, partial buffers) and every layer runs it (:func:`~hf_attn_plugin.paged_ops.run`) over
   the block tables: K/V are read in place, never concatenated or gathered into a contiguous copy (the
   reference backend on CPU gathers, as the oracle; the Triton kernels on GPU do not).

Left padding: positions keep their meaning (pad tokens occupy slots, as in ``DynamicCache``), and the
first real slot of each row, from the ``"plugin"`` key mask, becomes ``k_starts``. Sliding-window
layers keep their whole history (the window is applied by the kernel, pages are not recycled).
Only ``attn_implementation="plugin"`` can read this cache: any other attention function would be
handed a page pool instead of a ``[B, H, S, D]`` tensor.
"""

from __future__ import annotations

import weakref
from typing import Protocol, runtime_checkable

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from .. import paged_ops
from .._checks import mark_built
from ..paged import PagePool, StepPlan
from ..paged_ops import write_kv

__all__ = ["PagedCache", "PagedReader", "paged_reader_of", "tag_pool"]

_TAG = "_hf_attn_plugin_paged_reader"  # attribute on a K page pool: weak reference to its reader
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


class PagedCache(Cache):
    """Paged KV cache for ``model.generate`` with ``attn_implementation="plugin"``.

    Args:
        model_or_config: the model (its config, dtype, device and tensor-parallel sharding are used) or a
            ``PretrainedConfig`` (refused while ``torch.distributed`` runs: only the model knows its TP sharding).
        max_batch_size: most rows (sequences) one ``generate`` call may have.
        num_pages / memory_gib: pool size, in pages or GiB for all layers' K and V (exactly one).
        page_size: tokens per page (a power of two).
        max_seq_len: bound on one sequence (prompt + new tokens); default: every page.
        dtype, device: default to the model's (required with a config: default float32 / CPU).

    A batch of ``B`` rows takes sequence slots on the first forward; :meth:`reset` frees every page,
    so one cache object serves successive ``generate`` calls. Beam search works through
    :meth:`reorder_cache`, which forks sequences (pages shared copy-on-write).
    """

    def __init__(
        self,
        model_or_config,
        max_batch_size: int,
        *,
        num_pages: int | None = None,
        memory_gib: float | None = None,
        page_size: int = 16,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
        config = (model.config if model is not None else model_or_config).get_text_config()
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        unsupported = sorted(set(layer_types) - set(_ATTENTION_LAYER_TYPES))
        if unsupported:
            raise NotImplementedError(
                f"PagedCache holds softmax-attention layers only; this config has layer types {unsupported}. "
                "Use transformers' DynamicCache for this model."
            )
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        kv_heads = _kv_heads_per_rank(model, getattr(config, "num_key_value_heads", None) or num_heads)
        if dtype is None:
            dtype = model.dtype if model is not None else torch.float32
        if device is None:
            device = model.device if model is not None else "cpu"

        self.kv = PagePool(
            len(layer_types), kv_heads, head_dim, num_pages=num_pages, memory_gib=memory_gib,
            page_size=page_size, max_seqs=2 * max_batch_size,  # headroom: a beam reorder forks before freeing
            max_seq_len=max_seq_len, dtype=dtype, device=device,
        )
        self.max_rows = max_batch_size
        self.seq_ids: list[int] = []
        self.plan: StepPlan | None = None
        self.attention_plan: paged_ops.PagedPlan | None = None  # the step's, built by its first attend
        self._steps = 0  # forward steps planned so far (each PagedLayer counts the steps it has written)
        super().__init__(layers=[PagedLayer(self, i, t == "sliding_attention") for i, t in enumerate(layer_types)])

    # ------------------------------------------------------------------ accounting
    @property
    def page_size(self) -> int:
        return self.kv.page_size

    @property
    def num_pages(self) -> int:
        return self.kv.num_pages

    @property
    def pages_in_use(self) -> int:
        return self.kv.num_pages - self.kv.num_free_pages

    def waste(self) -> float:
        """Allocated-but-unused slots / allocated slots (see :meth:`PagePool.waste`)."""
        return self.kv.waste()

    # ------------------------------------------------------------------ Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.seq_len(self.seq_ids[0]) if self.seq_ids else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.kv.max_pages_per_seq * self.kv.page_size

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids) if self.seq_ids else -1

    @property
    def is_compileable(self) -> bool:
        return False  # host-side page bookkeeping every step

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        """Free every sequence and page; the pools stay allocated for the next ``generate``."""
        for sid in self.seq_ids:
            self.kv.free(sid)
        self.seq_ids, self.plan, self.attention_plan = [], None, None
        self._steps = 0
        for layer in self.layers:
            layer.steps = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` continues old row ``beam_idx[i]`` (pages shared, copied on write)."""
        forks = [self.kv.fork(self.seq_ids[i]) for i in beam_idx.tolist()]
        for sid in self.seq_ids:
            self.kv.free(sid)
        self.seq_ids = forks

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PagedCache cannot be cropped (assisted generation): use DynamicCache for it")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PagedCache cannot repeat a filled batch: pass it empty to generate()")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("PagedCache cannot select batch rows: pass it empty to generate()")

    # ------------------------------------------------------------------ one step
    def _plan_for(self, layer: "PagedLayer", batch: int, num_new: int) -> StepPlan:
        """The current step's plan; the first layer to write in a new step allocates its pages."""
        if layer.steps == self._steps:  # this layer starts a step nobody has planned yet
            if not self.seq_ids:
                if batch > self.max_rows:
                    raise ValueError(f"batch of {batch} rows > PagedCache(max_batch_size={self.max_rows})")
                self.seq_ids = [self.kv.add_sequence() for _ in range(batch)]
            elif batch != len(self.seq_ids):
                raise ValueError(
                    f"PagedCache holds {len(self.seq_ids)} sequences but the step has {batch} rows; "
                    "call reset() before generating a new batch"
                )
            self.plan, self.attention_plan = self.kv.plan(self.seq_ids, [num_new] * batch), None
            self._steps += 1
        layer.steps += 1
        return self.plan

    def _attention_plan(self, q: torch.Tensor, key_mask: torch.Tensor | None) -> paged_ops.PagedPlan:
        """The step's paged-attention plan, built by its first attention call: every layer of a step has the same
        query shape, block tables and key mask (:meth:`PagedLayer.get_mask_sizes` gives sliding layers the whole
        history too), whose first real slot per row becomes ``k_starts``."""
        if self.attention_plan is None:
            plan = self.plan
            k_starts = None
            if key_mask is not None:  # >= 0 by construction: marked package-built
                k_starts = mark_built(torch.argmax(key_mask.to(torch.int32), dim=-1).to(torch.int32).to(q.device))
            self.attention_plan = paged_ops.plan(
                q, self.kv.k_pools[0], plan.block_tables, plan.seq_lens,
                cu_seqlens_q=None if plan.is_decode else plan.cu_seqlens_q, max_seqlen_q=plan.max_seqlen_q,
                k_starts=k_starts,
            )
        return self.attention_plan


_KEY_PROJECTIONS = ("k_proj", "qkv_proj", "query_key_value")  # modules whose output holds the keys, fused or not


def _kv_heads_per_rank(model: torch.nn.Module | None, kv_heads: int) -> int:
    """KV heads this process's attention layers write: ``kv_heads / tp_size`` when transformers' tensor
    parallelism shards the key projection by output (``"colwise"``), else all of them."""
    if model is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "PagedCache was built from a config while torch.distributed is running: under tensor parallelism "
                "each rank holds num_key_value_heads / tp_size KV heads, which only the model knows. Pass the "
                "model (PagedCache(model, ...))."
            )
        return kv_heads
    tp_size = getattr(model, "tp_size", None) or 1  # transformers 5.17-5.24: set by from_pretrained(tp_plan=...)
    plan = getattr(model, "tp_plan", None) or {}
    sharded = any(name.rsplit(".", 1)[-1] in _KEY_PROJECTIONS and style == "colwise" for name, style in plan.items())
    if tp_size == 1 or not sharded:
        return kv_heads
    if kv_heads % tp_size:
        raise ValueError(
            f"PagedCache: the model shards its {kv_heads} KV heads over {tp_size} tensor-parallel ranks, which "
            "does not divide evenly. Use a tp_size that divides num_key_value_heads."
        )
    return kv_heads // tp_size


class PagedLayer(CacheLayerMixin):
    """One layer's view of a :class:`PagedCache`: its K/V pools and the shared step plan."""

    is_compileable = False
    is_croppable = False

    def __init__(self, cache: PagedCache, layer_idx: int, is_sliding: bool):
        super().__init__()
        self._cache = weakref.ref(cache)
        self.layer_idx = layer_idx
        self.is_sliding = is_sliding
        self.steps = 0
        self.keys, self.values = cache.kv.k_pools[layer_idx], cache.kv.v_pools[layer_idx]
        tag_pool(self.keys, self)
        self.device, self.is_initialized = self.keys.device, True

    @property
    def cache(self) -> PagedCache:
        return self._cache()

    def lazy_initialization(self, key_states, value_states) -> None:  # pools exist from the start
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``[B, H_kv, S_new, D]`` into the pages; return the (tagged) pools for the attention call."""
        batch, heads, num_new, dim = key_states.shape
        plan = self.cache._plan_for(self, batch, num_new)
        flat = lambda t: t.transpose(1, 2).reshape(batch * num_new, heads, dim)  # noqa: E731 (sequence-major)
        write_kv(self.keys, self.values, flat(key_states), flat(value_states), plan.slot_mapping)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0  # whole history, sliding layers included

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length()

    def get_max_length(self) -> int:
        return self.cache.get_max_length()

    def reset(self) -> None:  # PagedCache.reset frees the pages of every layer at once
        pass

    def offload(self):
        raise NotImplementedError("PagedCache does not offload layers")

    prefetch = offload

    def attend(self, params, query: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of ``query`` ``[B, Hq, S, D]`` over this layer's pages; returns ``[B, S, Hq, D]``.

        ``params`` are the layer's :class:`~hf_attn_plugin.ops.AttentionParams` (scale, causality, window,
        softcap, sinks); ``attention_mask`` the ``"plugin"`` key mask or ``None``.
        """
        batch, heads, num_new, dim = query.shape
        q = query.transpose(1, 2).reshape(batch * num_new, heads, dim).to(self.keys.dtype)
        if q.stride(-1) != 1:
            q = q.contiguous()
        plan = self.cache._attention_plan(q, attention_mask)
        return paged_ops.run(q, self.keys, self.values, plan, params).view(batch, num_new, heads, dim)


@runtime_checkable
class PagedReader(Protocol):
    """What a cache offers when its update hands ``plugin_attention`` a page pool instead of ``[B, H, S, D]`` keys
    (:func:`tag_pool` marks the pool, :func:`paged_reader_of` finds the reader): ``PagedLayer`` (``PagedCache``)
    and ``InPlacePagedUpdate`` (continuous batching)."""

    def attend(self, params, query: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of transformers' ``query`` ``[B, Hq, S, D]`` over the pages the last ``update`` returned, with
        the layer's :class:`~hf_attn_plugin.ops.AttentionParams`; returns ``[B, S, Hq, D]``."""
        ...


def tag_pool(pool: torch.Tensor, reader: PagedReader) -> None:
    """Mark ``pool`` as a page pool read by ``reader``."""
    setattr(pool, _TAG, weakref.ref(reader))


def paged_reader_of(key: torch.Tensor) -> PagedReader | None:
    """The reader whose page pool ``key`` is (see :func:`tag_pool`), or ``None`` for an ordinary K tensor."""
    ref = getattr(key, _TAG, None)
    return ref() if ref is not None else None
