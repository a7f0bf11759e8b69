"""Continuous batching (``generate_batch``) through our paged kernels, on transformers' own pages.

transformers >= 5.19 only lets ``"paged|eager"``, ``"sdpa"`` and flash names run continuous batching,
and its non-flash path gathers each sequence's whole KV history with ``index_select`` in every layer
and step. This module gives ``"plugin"`` models an explicit, supported entry point instead::

    import hf_attn_plugin
    outputs = hf_attn_plugin.generate_batch(model, prompts, generation_config, max_new_tokens=128)

    with hf_attn_plugin.continuous_batching_context(model):  # model.generate_batch, init_continuous_batching,
        outputs = model.generate_batch(prompts)  # continuous_batching_context_manager: our manager

Nothing global changes: the model keeps ``attn_implementation="plugin"``, and only the manager this
module creates (a :class:`PluginContinuousBatchingManager`) accepts it. That manager replaces the
``update`` of *its own* ``PagedAttentionCache`` with :class:`InPlacePagedUpdate`, which writes the new
K/V into HF's pages (:func:`~hf_attn_plugin.paged_ops.write_kv` at HF's write slots) and hands
``plugin_attention`` the layer's page views (``[pages, page_size, H_kv, D]``, HF's own memory) tagged
with a reader that calls :func:`~hf_attn_plugin.paged_ops.paged_attention` over block tables
derived from HF's indices. No K/V copy is made per step.

HF's layout (``FullAttentionCacheAllocator``): one flat buffer; a layer's K (and V) tokens form a view
whose rows are slots ``page * page_size + offset``. Two kinds of step reach us:

* mixed / prefill steps: ``write_index`` holds the new tokens' slots, ``read_index`` the slots of every
  cached token of each sequence in position order (sequences concatenated along ``cu_seq_lens_k``);
  block tables are derived from them on the device, once per step;
* decode-only steps through transformers' "decode fast path", when ``ContinuousBatchingConfig(
  max_blocks_per_request=N)`` asks for it: ``block_table`` ``[groups, batch, N]`` lists each sequence's
  pages, which is what our decode kernel reads; the new token's slot is derived from it. transformers
  keeps this path for flash attention only and turns it off for any other name; our manager turns it
  back on for ``"plugin"`` when the config asks explicitly.

Every input is derived with device operations of static shape, so transformers' CUDA graphs
(``ContinuousBatchingConfig(use_cuda_graph=...)``) and async batching capture and replay our path.
Neither is on by default: transformers' defaults for a non-flash attention are kept (measured on an
H200, docs/paged.md: for a 128-request batch the index path without graphs was the fastest; graphs pay
for transformers' warm-up of the largest mixed step, which attends over the whole cache).
Sliding-window layers (their own layer group) live in transformers' ring buffer: each request holds at most
``ceil(window / page_size)`` pages, position ``p`` in slot ``p % window`` (KV memory bounded by the window).
Decode-only steps of a window that is a whole number of pages read the ring in place (:func:`_step_from_window`:
block tables in position order, at most ``window / page_size + 1`` pages per sequence); other steps use
transformers' own read of the window (at most ``window - 1`` cached tokens per sequence, copied, read before the
new tokens are written) and our varlen kernel through :func:`~hf_attn_plugin.integration.attention.plugin_attention`.
transformers' CUDA graphs over sliding layers are refused (they failed their GPU test; :func:`_sliding_graphs_refusal`).

Shared prompt prefixes: transformers' prefix sharing (``ContinuousBatchingConfig(allow_block_sharing=True)``, its
default; full-attention models only) runs unchanged here. It shares complete pages only, and a request writes
after its shared pages (5.17 rewrites a whole-page prompt's last token into its last shared page, the same
values), so our block tables simply list a shared page for several sequences: no copy-on-write is needed.

transformers 5.17-5.18 switch a ``"plugin"`` model to ``"paged|plugin"`` and hand that attention
function the new K/V plus ``cache=``; :func:`paged_plugin_attention`, registered under that name on
import (those versions only: :func:`~hf_attn_plugin.integration.compat.register_paged_attention`), writes and
attends in place the same way. A plain ``model.generate_batch`` works there too, on transformers' own manager
(without the decode fast path). Which regime runs, and the manager subclass, live in
:mod:`~hf_attn_plugin.integration.compat`.

Each step's paged-attention plan (:func:`hf_attn_plugin.paged_ops.plan`) is built by its first layer and run by
every layer (:func:`hf_attn_plugin.paged_ops.run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref

import torch

from .. import paged_ops
from ..paged_ops import write_kv_trusted
from . import compat
from .attention import describe_paged_call, plugin_attention
from .paged_cache import tag_pool
from .registration import ATTN_IMPLEMENTATION

__all__ = [
    "InPlacePagedUpdate", "PAGED_ATTN_IMPLEMENTATION", "continuous_batching_context", "generate_batch",
    "init_continuous_batching", "paged_plugin_attention",
]

PAGED_ATTN_IMPLEMENTATION = compat.paged_attention_name(ATTN_IMPLEMENTATION)  # what 5.17-5.18 switch "plugin" to


@dataclasses.dataclass
class _Step:
    """One step's paged-attention inputs for one allocator (shared by the layers of its group)."""

    slots: torch.Tensor  # int64 [T]: where the new tokens go (page-view slots)
    block_tables: torch.Tensor  # int32 [N, max_pages]
    seq_lens: torch.Tensor  # int32 [N]
    cu_seqlens_q: torch.Tensor  # int32 [N + 1]
    max_seqlen_q: int
    plan: paged_ops.PagedPlan | None = None  # built by the step's first attention call (it knows q's shape)


class InPlacePagedUpdate:
    """Replacement for one ``PagedAttentionCache.update``: write in place, return page views tagged with this
    object, the :class:`~hf_attn_plugin.integration.paged_cache.PagedReader` of the layer being run."""

    def __init__(self, cache):
        self.cache = cache
        self._memos: dict = {}  # layer group -> (step key, _Step, layer that built or last reused it)
        self._current: tuple | None = None  # (k_pages, v_pages, _Step) of the layer being run

    def __call__(self, key_states, value_states, layer_idx: int, kwargs: dict):
        allocator = self.cache.layer_to_allocator[layer_idx]
        group = allocator.index
        kwargs["cu_seq_lens_k"], max_q, max_k = compat.batch_lengths(kwargs, allocator.layer_type)
        as_tokens = lambda t: t[0].transpose(0, 1)  # noqa: E731  [1, H_kv, T, D] -> [T, H_kv, D]
        sentinel = None
        if allocator.layer_type != "full_attention":  # sliding window: transformers' ring buffer (module doc)
            _refuse_sliding_capture(f"layer {layer_idx}")
            pages = None
            if _window_in_place(allocator.sliding_window, allocator.tokens_per_page, max_q):
                pages = compat.window_page_views(allocator, layer_idx)
            if pages is None:
                _use_key_lengths(kwargs, kwargs["cu_seq_lens_k"], max_k)
                k, v = allocator.update(as_tokens(key_states), as_tokens(value_states), layer_idx,
                                        kwargs["read_index"][group], kwargs["write_index"][group])
                return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            sentinel = allocator.sentinel_index
            k_pages, v_pages = pages
        else:
            k_pages, v_pages = allocator.get_cache_for_block_table(layer_idx)
        memo = _memoised_step(self._memos.get(group, (None, None, -1)), group, k_pages.shape[1], layer_idx, kwargs,
                              max_q, max_k, sentinel)
        self._memos[group] = memo
        step = memo[1]
        write_kv_trusted(k_pages, v_pages, as_tokens(key_states), as_tokens(value_states), step.slots)
        self._current = (k_pages, v_pages, step)
        tag_pool(k_pages, self)
        return k_pages, v_pages

    def attend(self, params, query: torch.Tensor, attention_mask) -> torch.Tensor:
        return _attend(params, query, *self._current)


def _attend(params, query: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, step: _Step) -> torch.Tensor:
    """``query`` ``[1, Hq, T, D]`` (sequences packed along T) over the pages -> ``[1, T, Hq, D]``; the step's first
    call plans it (every argument is built by us: no checks)."""
    if step.slots.numel() != query.shape[2]:
        raise RuntimeError(f"{query.shape[2]} query tokens for {step.slots.numel()} cache slots: transformers' batch "
                           "layout is not the one this version of hf_attn_plugin expects")
    q = query[0].transpose(0, 1).to(k_pages.dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if step.plan is None:
        step.plan = paged_ops.plan(q, k_pages, step.block_tables, step.seq_lens, cu_seqlens_q=step.cu_seqlens_q,
                                   max_seqlen_q=step.max_seqlen_q)
    return paged_ops.run(q, k_pages, v_pages, step.plan, params).unsqueeze(0)


def _memoised_step(memo: tuple, group: int, page_size: int, layer_idx: int, kwargs: dict, max_q: int,
                   max_k: int, sentinel: int | None = None) -> tuple:
    """``(key, _Step, layer_idx)`` for this step and layer group: later layers of one forward reuse the first's.
    ``sentinel``: the group is a sliding window's ring buffer read in place (:func:`_step_from_window`).

    Reuse needs the same index tensors (identity) *and* a later layer than the one that last used the memo: a
    forward runs its layers in increasing order, so a layer index that does not increase means a new step, even
    where transformers refills the same (static) index buffers in place from one step to the next.
    """
    block_table = kwargs.get("block_table")  # decode-only step: [groups, N, max_blocks]
    key = (group, kwargs["cu_seq_lens_q"], kwargs["write_index"][group] if block_table is None else block_table)
    if memo[0] is not None and layer_idx > memo[2] and all(a is b for a, b in zip(memo[0], key)):
        return memo[0], memo[1], layer_idx
    if block_table is not None:
        step = _step_from_block_table(page_size, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], block_table[group])
    elif sentinel is not None:
        step = _step_from_window(page_size, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"],
                                 kwargs["read_index"][group], kwargs["write_index"][group], int(max_k), sentinel)
    else:
        step = _step_from_indices(page_size, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"],
                                  kwargs["read_index"][group], kwargs["write_index"][group], int(max_q), int(max_k))
    return key, step, layer_idx


def _step_from_indices(page_size, cu_q, cu_k, read_index, write_index, max_q: int, max_k: int) -> _Step:
    """Block tables from HF's slot indices, on the device (no host sync, a few small ops).

    Token ``j`` of sequence ``b`` sits at slot ``by_position[cu_k[b] + j]`` (``read_index``; when nothing
    is cached yet, ``write_index``), so page ``p`` of ``b`` is ``by_position[cu_k[b] + p * page_size] //
    page_size``.
    """
    cu_k = cu_k.to(torch.int32)
    by_position = read_index if read_index.numel() else write_index
    max_pages = -(-max_k // page_size)
    first = cu_k[:-1, None] + page_size * torch.arange(max_pages, device=cu_k.device, dtype=torch.int32)
    rows = first.clamp(max=max(by_position.numel() - 1, 0)).long()
    tables = torch.where(first < cu_k[1:, None], by_position[rows] // page_size, 0).to(torch.int32)
    seq_lens = cu_k[1:] - cu_k[:-1]
    return _Step(write_index.long(), tables, seq_lens, cu_q.to(torch.int32), max_q)


def _step_from_block_table(page_size, cu_q, cu_k, tables) -> _Step:
    """A decode-only step from transformers' block table (``[N, max_blocks]``, ``-1`` past a sequence's pages).

    Each sequence has one new token, at position ``len - 1`` (``cu_k`` counts it), so its slot is
    ``tables[b, pos // page_size] * page_size + pos % page_size``; padding sequences (length 0, CUDA graphs)
    write nothing (slot ``-1``).
    """
    cu_k = cu_k.to(torch.int32)
    seq_lens = cu_k[1:] - cu_k[:-1]
    pos = (seq_lens - 1).clamp(min=0).long()
    page = tables.gather(1, (pos // page_size)[:, None]).squeeze(1).long()
    slots = torch.where(seq_lens > 0, page * page_size + pos % page_size, -1)
    return _Step(slots, tables.to(torch.int32), seq_lens, cu_q.to(torch.int32), 1)


def _window_in_place(window: int, page_size: int, max_q: int) -> bool:
    """Whether a sliding-window group's step is read in place from transformers' ring buffer: decode-only steps
    (writing a token overwrites only the one that just left its window) of a window that is a whole number of
    pages (the ring then wraps at a page boundary). Other steps take transformers' own read of the window (at most
    ``window - 1`` cached tokens per sequence, copied) and our varlen kernel. (CUDA-graph capture of sliding layers
    is refused: :func:`_refuse_sliding_capture`.)"""
    return max_q == 1 and window % page_size == 0


def _step_from_window(page_size, cu_q, cu_k, read_index, write_index, max_k: int, sentinel: int) -> _Step:
    """A decode-only step of a sliding-window group, read in place from transformers' ring buffer.

    transformers keeps position ``p`` of a request in slot ``p % window`` of its ``window / page_size`` pages.
    ``read_index`` lists each sequence's cached window in position order, then ``sentinel`` for the new token,
    whose slot is in ``write_index``; with it put in, ``by_position`` is the window in position order. Its first
    token sits at offset ``o`` of its page: the sequence is read as ``o`` leading slots + the window, over the
    ring's pages in position order (the first page read again last when ``o > 0``, for its first ``o`` slots):
    every ``page_size`` run of that layout lies in one page because the ring wraps at a page boundary. The
    leading slots need no mask: ``o > 0`` only once the window is full, and then the layer's window (the new
    token's last ``window`` keys) ends right after them.
    """
    cu_k = cu_k.to(torch.int32)
    seq_lens = cu_k[1:] - cu_k[:-1]
    if read_index.numel():
        by_position = read_index.masked_scatter(read_index == sentinel, write_index)
    else:  # nothing cached yet (one-token prompts): the new tokens' slots
        by_position = write_index
    last = max(by_position.numel() - 1, 0)
    offset = torch.where(seq_lens > 0, by_position[cu_k[:-1].long().clamp(max=last)] % page_size, 0).to(torch.int32)
    max_pages = -(-(max_k + page_size - 1) // page_size)
    token = page_size * torch.arange(max_pages, device=cu_k.device, dtype=torch.int32) - offset[:, None]
    rows = (cu_k[:-1, None] + token.clamp(min=0)).clamp(max=last).long()
    tables = torch.where(token < seq_lens[:, None], by_position[rows] // page_size, 0).to(torch.int32)
    return _Step(write_index.long(), tables, seq_lens + offset, cu_q.to(torch.int32), 1)


_LEGACY_MEMO = weakref.WeakKeyDictionary()  # 5.17 PagedAttentionCache -> {layer group: (step key, _Step, layer_idx)}


def paged_plugin_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cache=None, **kwargs):
    """``"paged|plugin"`` for transformers 5.17-5.18, whose continuous batching hands the attention
    function the new K/V and the ``PagedAttentionCache``: write them into its pages and attend in place.

    5.17 layout: ``cache.key_cache[i]`` is ``[(num_blocks + 2) * block_size, H_kv, D]`` per layer of a
    group; viewed as ``[num_blocks + 2, block_size, H_kv, D]`` its slots are those of ``read_index`` /
    ``write_index``.
    """
    if cache is None:
        raise ValueError(
            f"{PAGED_ATTN_IMPLEMENTATION!r} runs under continuous batching only; use {ATTN_IMPLEMENTATION!r}"
        )
    layer = module.layer_idx
    group, index = cache.layer_index_to_group_indices[layer]
    window = cache.sliding_windows[layer]  # 1: full attention
    layer_type = "full_attention" if window == 1 else "sliding_attention"
    kwargs["cu_seq_lens_k"], max_q, max_k = compat.batch_lengths(kwargs, layer_type)
    sentinel = None
    if window != 1:  # sliding window: transformers' ring buffer (module doc)
        _refuse_sliding_capture(f"{type(module).__name__} (layer {layer})")
        if not _window_in_place(window, cache.block_size, max_q):
            _use_key_lengths(kwargs, kwargs["cu_seq_lens_k"], max_k)
            k, v = cache.update(key, value, layer, kwargs["read_index"], kwargs["write_index"])  # [T, H_kv, D]
            k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            return plugin_attention(module, query, k, v, attention_mask, dropout, scaling, **kwargs)
        sentinel = cache.sentinel_index
    memos = _LEGACY_MEMO.setdefault(cache, {})
    memo = _memoised_step(memos.get(group, (None, None, -1)), group, cache.block_size, layer, kwargs, max_q, max_k,
                          sentinel)
    memos[group] = memo
    shape = (-1, cache.block_size, *cache.key_cache[index].shape[1:])
    k_pages, v_pages = cache.key_cache[index].view(shape), cache.value_cache[index].view(shape)
    as_tokens = lambda t: t[0].transpose(0, 1)  # noqa: E731  [1, H_kv, T, D] -> [T, H_kv, D]
    write_kv_trusted(k_pages, v_pages, as_tokens(key), as_tokens(value), memo[1].slots)
    call = describe_paged_call(module, query, dropout, scaling, kwargs)
    return _attend(call, query, k_pages, v_pages, memo[1]), None


def _use_key_lengths(kwargs: dict, cu_k: torch.Tensor, max_k: int) -> None:
    """Give a sliding layer's attention call its own key lengths (transformers passes one per layer type)."""
    kwargs["cu_seq_lens_k"] = cu_k
    for name in ("max_length_k", "max_seqlen_k"):  # 5.24 / 5.17
        if name in kwargs:
            kwargs[name] = max_k


def init_continuous_batching(model, generation_config=None, continuous_batching_config=None, workload_hints=None):
    """Like ``model.init_continuous_batching``, returning a manager that runs on our paged kernels."""
    from transformers import ContinuousBatchingConfig

    manager_cls = compat.manager_class(ATTN_IMPLEMENTATION, InPlacePagedUpdate)
    cached = compat.cached_manager(model)
    if isinstance(cached, manager_cls):
        return cached
    config = continuous_batching_config or ContinuousBatchingConfig()
    if getattr(config, "use_cuda_graph", None) and _has_sliding_layers(model):
        raise NotImplementedError(_sliding_graphs_refusal(type(model).__name__))
    gen_config = generation_config if generation_config is not None else model.generation_config
    if gen_config.eos_token_id is None:
        gen_config.eos_token_id = -1  # as transformers does: no EOS, generation stops at max_new_tokens
    return manager_cls(
        model=model,
        generation_config=gen_config,
        continuous_batching_config=config,
        workload_hints=workload_hints,
    )


def _sliding_graphs_refusal(model: str) -> str:
    return (
        f"{model}: transformers' CUDA graphs (ContinuousBatchingConfig(use_cuda_graph=True)) with sliding-window "
        "layers are not supported by attn_implementation='plugin' in continuous batching: that combination failed "
        "its GPU test on the H200 (transformers 5.17; not yet diagnosed). Leave use_cuda_graph off (transformers' "
        "default for a non-flash attention): sliding-window models run without graphs."
    )


def _refuse_sliding_capture(owner: str) -> None:
    """Sliding layers under CUDA-graph capture (transformers' own manager on 5.17-5.18 reaches us without
    :func:`init_continuous_batching`): refused, see :func:`_sliding_graphs_refusal` (``owner`` names the layer)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise NotImplementedError(_sliding_graphs_refusal(owner))


def _has_sliding_layers(model) -> bool:
    """Whether transformers' paged cache gives ``model`` a sliding-window group (its rule: ``layer_types`` when the
    config has them, else every layer once ``sliding_window`` is set)."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return any(t == "sliding_attention" for t in layer_types)
    return getattr(config, "sliding_window", None) is not None


@contextlib.contextmanager
def continuous_batching_context(model):
    """Within the block, ``model``'s continuous batching entry points run through our paged kernels.

    Only this model object is affected (its ``init_continuous_batching`` is shadowed by an instance
    attribute, removed on exit).
    """
    impl = compat.attn_implementation(model)
    if impl != ATTN_IMPLEMENTATION:
        raise ValueError(
            "hf_attn_plugin.continuous_batching_context needs a model with attn_implementation="
            f"{ATTN_IMPLEMENTATION!r}, got {impl!r}"
        )
    model.init_continuous_batching = functools.partial(init_continuous_batching, model)
    try:
        yield model
    finally:
        del model.init_continuous_batching


def generate_batch(model, inputs: list[list[int]], generation_config=None, *, engine: str = "auto",
                   engine_config=None, **kwargs):
    """``model.generate_batch(inputs, generation_config, **kwargs)`` on our paged kernels.

    Returns transformers' ``{request_id: GenerationOutput}``; see ``ContinuousMixin.generate_batch``.
    ``engine``: ``"plugin"``, our engine (:mod:`~hf_attn_plugin.integration.engine`: our page allocator and a
    CUDA-graphed decode step; greedy, or sampling with temperature / top-k / top-p; sized by ``engine_config``, an
    :class:`~hf_attn_plugin.integration.engine.EngineConfig`); ``"transformers"``, transformers' engine with our
    in-place paged attention (this module); ``"auto"`` (default): ours when it supports the call
    (:func:`~hf_attn_plugin.integration.engine.unsupported` says why not, logged at DEBUG level), else transformers'.
    """
    from .engine import run_engine  # imports this module

    outputs = run_engine(model, inputs, generation_config, engine, engine_config, kwargs)
    if outputs is not None:
        return outputs
    with continuous_batching_context(model):
        return model.generate_batch(inputs, generation_config=generation_config, **kwargs)


compat.register_paged_attention(ATTN_IMPLEMENTATION, paged_plugin_attention)  # 5.17-5.18 only
