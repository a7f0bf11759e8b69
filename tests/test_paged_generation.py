"""Model-level paged generation: ``generate()`` with our PagedCache and ``generate_batch`` on our paged kernels,
token-identical to eager generation (tiny random configs, CPU reference backend; GPU variants behind ``gpu``)."""

from __future__ import annotations

import collections
import copy
import functools

import pytest
import torch
import transformers
from packaging.version import Version

import hf_attn_plugin
from hf_attn_plugin import PagedCache, paged_ops
from hf_attn_plugin.paged import OutOfPagesError, num_pages_for_budget
from tests.models import COMMON, DECODERS, make_pair

# transformers 5.24 renamed generate's cache argument; 5.17 only knows the old name.
CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
PAGE = 4
NEW_TOKENS = 12  # past Mistral's / Qwen2's sliding window of 4


def _prompts(lengths=(9, 5, 2), vocab=128, seed=1):
    """Left-padded batch: ``input_ids``, ``attention_mask``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, ids.shape[1] - n :] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _greedy(model, ids, mask, **kwargs):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kwargs
    )


@pytest.fixture(scope="module")
def pairs():
    return {family: make_pair(DECODERS[family]()) for family in ("llama", "mistral", "qwen2")}


# --------------------------------------------------------------------------- (a) generate() with PagedCache
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_generate_matches_eager_left_padded(pairs, family):
    ours, eager = pairs[family]
    ids, mask = _prompts()
    cache = PagedCache(ours, max_batch_size=4, num_pages=32, page_size=PAGE)
    out = _greedy(ours, ids, mask, **{CACHE_KWARG: cache})
    assert torch.equal(out, _greedy(eager, ids, mask))

    # Memory: every row holds its padded prompt + all but the last new token, in ceil(len / PAGE) pages.
    length = ids.shape[1] + NEW_TOKENS - 1
    assert cache.get_seq_length() == length
    assert cache.pages_in_use == ids.shape[0] * -(-length // PAGE)
    assert cache.waste() < PAGE / length
    cache.kv.check_invariants()

    # reset() returns every page; the same cache serves the next generate() exactly.
    cache.reset()
    assert cache.pages_in_use == 0 and cache.get_seq_length() == 0
    assert torch.equal(_greedy(ours, ids, mask, **{CACHE_KWARG: cache}), out)


def test_generate_unpadded_batch(pairs):
    ours, eager = pairs["llama"]
    ids, mask = _prompts(lengths=(6, 6))
    cache = PagedCache(ours, max_batch_size=2, num_pages=16, page_size=PAGE)
    assert torch.equal(_greedy(ours, ids, None, **{CACHE_KWARG: cache}), _greedy(eager, ids, None))


def test_beam_search_forks_pages(pairs):
    ours, eager = pairs["llama"]
    ids, mask = _prompts(lengths=(7, 4))
    cache = PagedCache(ours, max_batch_size=6, num_pages=64, page_size=PAGE)
    out = _greedy(ours, ids, mask, num_beams=3, **{CACHE_KWARG: cache})
    assert torch.equal(out, _greedy(eager, ids, mask, num_beams=3))
    cache.kv.check_invariants()


def test_attention_reads_the_pools_in_place(pairs, monkeypatch):
    """The attention call gets the cache's own pools (no gathered copy) and never the dense op; each forward step
    is planned once (paged_ops.plan) and run per layer (paged_ops.run)."""
    ours, _ = pairs["llama"]
    ids, mask = _prompts()
    cache = PagedCache(ours, max_batch_size=4, num_pages=32, page_size=PAGE)
    pools = {p.data_ptr() for p in cache.kv.k_pools + cache.kv.v_pools}
    calls, plans = [], []
    real_run, real_plan = paged_ops.run, paged_ops.plan

    def spy_run(q, k_pool, v_pool, plan, params):
        calls.append((k_pool.data_ptr(), v_pool.data_ptr(), plan))
        return real_run(q, k_pool, v_pool, plan, params)

    def spy_plan(*args, **kwargs):
        plans.append(real_plan(*args, **kwargs))
        return plans[-1]

    def dense(*args, **kwargs):
        raise AssertionError("dense attention called on a paged step")

    monkeypatch.setattr(paged_ops, "run", spy_run)
    monkeypatch.setattr(paged_ops, "plan", spy_plan)
    monkeypatch.setattr("hf_attn_plugin.ops.attention", dense)
    _greedy(ours, ids, mask, **{CACHE_KWARG: cache})
    layers = ours.config.num_hidden_layers
    assert len(calls) == NEW_TOKENS * layers
    assert all(k in pools and v in pools for k, v, _ in calls)
    assert len(plans) == NEW_TOKENS  # one plan per forward step, shared by its layers
    assert [plan for _, _, plan in calls] == [plan for plan in plans for _ in range(layers)]


def test_generate_on_the_triton_kernels(pairs, triton_backend, monkeypatch):
    """The Triton paged kernels (interpreter on CPU) under generate(): a model with full and sliding layers gives
    eager's tokens; each step's plan holds one launch per kind of layer."""
    ours, eager = pairs["qwen2"]
    ids, mask = _prompts()
    cache = PagedCache(ours, max_batch_size=4, num_pages=32, page_size=PAGE)
    plans = []
    real_plan = paged_ops.plan
    monkeypatch.setattr(paged_ops, "plan", lambda *a, **k: plans.append(real_plan(*a, **k)) or plans[-1])
    assert torch.equal(_greedy(ours, ids, mask, **{CACHE_KWARG: cache}), _greedy(eager, ids, mask))
    assert len(plans) == NEW_TOKENS
    assert all(len(plan.kernel.launches) == 2 for plan in plans)  # full and sliding layers


@pytest.mark.parametrize("max_blocks", [0, 8], ids=["indices", "block_table"])
def test_generate_batch_on_the_triton_kernels(max_blocks, triton_backend, no_gather):
    """generate_batch on the Triton paged kernels (interpreter on CPU): eager's tokens, on both step layouts."""
    ours, eager = _cb_pair("llama")
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
    config = transformers.GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb_config = _cb_config(max_blocks_per_request=max_blocks) if max_blocks else None
    results = hf_attn_plugin.generate_batch(ours, prompts, config, continuous_batching_config=cb_config,
                                            engine="transformers")
    assert [r.generated_tokens for r in results.values()] == _expected(eager, prompts, 4)


def test_both_page_readers_offer_the_declared_protocol(pairs):
    from hf_attn_plugin.integration.continuous_batching import InPlacePagedUpdate
    from hf_attn_plugin.integration.paged_cache import PagedReader, paged_reader_of

    cache = PagedCache(pairs["llama"][0], max_batch_size=1, num_pages=4, page_size=PAGE)
    assert all(isinstance(paged_reader_of(layer.keys), PagedReader) for layer in cache.layers)
    assert "attend" in vars(InPlacePagedUpdate) and issubclass(InPlacePagedUpdate, PagedReader)
    assert paged_reader_of(torch.zeros(1)) is None


def test_out_of_pages_raises_typed_error(pairs):
    ours, _ = pairs["llama"]
    ids, mask = _prompts()
    cache = PagedCache(ours, max_batch_size=4, num_pages=8, page_size=PAGE)  # 3 rows need 3 x 6 pages
    with pytest.raises(OutOfPagesError):
        _greedy(ours, ids, mask, **{CACHE_KWARG: cache})
    cache.kv.check_invariants()  # nothing leaked or overwritten
    cache.reset()
    assert cache.pages_in_use == 0


def test_batch_larger_than_cache_refused(pairs):
    ours, _ = pairs["llama"]
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="max_batch_size"):
        _greedy(ours, ids, mask, **{CACHE_KWARG: PagedCache(ours, max_batch_size=2, num_pages=32)})


def test_memory_budget_sizing(pairs):
    ours, _ = pairs["llama"]
    cache = PagedCache(ours, max_batch_size=2, memory_gib=0.001, page_size=16)
    cfg = ours.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = num_pages_for_budget(0.001, num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                                    head_dim=head_dim, page_size=16, dtype=ours.dtype)
    assert cache.num_pages == expected and cache.page_size == 16 and cache.pages_in_use == 0


# --------------------------------------------------------------------------- (b) continuous batching
CB_PROMPT_LENGTHS = (5, 17, 9, 33, 3)


def _cb_config(**kwargs):
    return transformers.ContinuousBatchingConfig(**kwargs)


@pytest.fixture
def no_gather(monkeypatch):
    """Make transformers' own gathering cache update fail: our path must never use it."""
    def gather(*args, **kwargs):
        raise AssertionError("transformers gathered the KV history")

    try:  # 5.19+: the allocators' update (write + index_select)
        from transformers.generation.continuous_batching.cache_allocators.full_attention import (
            FullAttentionCacheAllocator,
        )
        monkeypatch.setattr(FullAttentionCacheAllocator, "update", gather)
    except ImportError:  # 5.17-5.18: the cache's update (for sliding layers we still call it: their window)
        from transformers.generation.continuous_batching import PagedAttentionCache

        real = PagedAttentionCache.update

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if self.sliding_windows[layer_idx] == 1:
                gather()
            return real(self, key_states, value_states, layer_idx, *args, **kwargs)

        monkeypatch.setattr(PagedAttentionCache, "update", update)


def _expected(eager, prompts, new_tokens):
    outputs = (eager.generate(torch.tensor([p], device=eager.device), max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, eos_token_id=None)  # as generate_batch's eos_token_id=-1: no stop
               for p in prompts)
    return [out[0, len(p):].tolist() for out, p in zip(outputs, prompts)]


def _cb_pair(family, sliding_window: int | None = None):
    if family == "qwen2" and sliding_window is None:  # full attention only
        return make_pair(transformers.Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2))
    config = DECODERS[family]()
    if sliding_window is not None:
        config.sliding_window = sliding_window
    return make_pair(config)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("max_batch_tokens", [16, None], ids=["chunked_prefill", "default"])
def test_generate_batch_matches_eager(family, max_batch_tokens, no_gather):
    ours, eager = _cb_pair(family)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in CB_PROMPT_LENGTHS]
    config = transformers.GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb_config = _cb_config(max_batch_tokens=max_batch_tokens) if max_batch_tokens else None
    results = hf_attn_plugin.generate_batch(ours, prompts, config, continuous_batching_config=cb_config,
                                            engine="transformers")
    assert [r.error for r in results.values()] == [None] * len(prompts)
    assert [r.generated_tokens for r in results.values()] == _expected(eager, prompts, 10)
    assert ours.config._attn_implementation == "plugin"  # nothing left switched


def test_continuous_batching_context_manager(no_gather):
    ours, eager = _cb_pair("llama")
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
    config = transformers.GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with hf_attn_plugin.continuous_batching_context(ours) as model:
        results = model.generate_batch(prompts, config)
    assert [r.generated_tokens for r in results.values()] == _expected(eager, prompts, 6)
    assert "init_continuous_batching" not in vars(ours)  # the shadowing attribute is gone


def test_continuous_batching_needs_plugin_model():
    _, eager = make_pair(DECODERS["llama"]())
    with pytest.raises(ValueError, match="plugin"):
        with hf_attn_plugin.continuous_batching_context(eager):
            pass


@pytest.mark.parametrize("max_blocks", [8, None], ids=["decode_fast_path", "default_indices"])
def test_generate_batch_decode_steps_read_block_tables(max_blocks, no_gather, monkeypatch):
    """With max_blocks_per_request > 0, decode-only steps use transformers' block tables directly (our manager
    turns that path back on for "plugin"); by default every step goes through the index lists. Both
    token-identical to eager."""
    from hf_attn_plugin.integration import continuous_batching as cb

    calls = []
    original = cb._step_from_block_table
    monkeypatch.setattr(cb, "_step_from_block_table", lambda *a: calls.append(1) or original(*a))
    ours, eager = _cb_pair("llama")
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [3, 4]]
    config = transformers.GenerationConfig(max_new_tokens=7, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb_config = transformers.ContinuousBatchingConfig(max_blocks_per_request=max_blocks)
    results = hf_attn_plugin.generate_batch(ours, prompts, config, continuous_batching_config=cb_config)
    assert [r.generated_tokens for r in results.values()] == _expected(eager, prompts, 7)
    assert bool(calls) == (max_blocks is not None)


def test_generate_batch_never_switches_to_flash(no_gather, monkeypatch):
    """transformers' manager switches a non-flash model to flash attention when flash-attn is installed; ours keeps
    "plugin" (the issue: never fall back silently) and restores it afterwards."""
    from transformers.generation.continuous_batching import continuous_api

    monkeypatch.setattr(continuous_api, "is_flash_attn_3_available", lambda **kwargs: True)
    monkeypatch.setattr(continuous_api, "is_flash_attn_2_available", lambda **kwargs: True)
    ours, eager = _cb_pair("llama")
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    config = transformers.GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)
    results = hf_attn_plugin.generate_batch(ours, prompts, config, engine="transformers")
    assert [r.generated_tokens for r in results.values()] == _expected(eager, prompts, 5)
    assert ours.config._attn_implementation == "plugin"


# --------------------------------------------------------------------------- (b2) shared prompt prefixes
SHARED_PAGES = 3  # complete pages of the shared prefix (plus one token of the next page)


def _shared_prefix_prompts(page_size: int):
    """One prefix of several pages + distinct suffixes of different lengths (a system prompt + questions)."""
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 128, (SHARED_PAGES * page_size + 1,), generator=gen).tolist()
    return [prefix + torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 4, 6, 2, 9)]


class _BatchRecorder:
    """What ``generate_batch`` ran on our path: tokens through the model (prefill + decode) and, over every step, the
    most requests that read one KV page (a shared page has several readers)."""

    def __init__(self, model, monkeypatch):
        from hf_attn_plugin.integration import continuous_batching as cb

        self.model_tokens, self.max_readers = 0, 0
        model.model.embed_tokens.register_forward_hook(self._count_tokens)  # the model is the test's own
        for name in ("_step_from_indices", "_step_from_block_table"):  # every step is built by one of them
            monkeypatch.setattr(cb, name, functools.partial(self._record_step, getattr(cb, name)))

    def _count_tokens(self, module, args, output):
        self.model_tokens += args[0].numel()

    def _record_step(self, build, page_size, *args):
        step = build(page_size, *args)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return step  # a CUDA graph being captured: no host reads (replayed steps are not seen either)
        pages = (-(-step.seq_lens // page_size)).tolist()
        readers = collections.Counter(p for b, n in enumerate(pages) for p in step.block_tables[b, :n].tolist())
        self.max_readers = max(self.max_readers, *readers.values(), 0)
        return step

    def run(self, model, prompts, new_tokens, page_size, **fields) -> list[list[int]]:
        from hf_attn_plugin.integration import compat

        self.model_tokens, self.max_readers = 0, 0
        config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                                               pad_token_id=0)
        cb_config = compat.continuous_batching_config(page_size=page_size, **fields)
        results = hf_attn_plugin.generate_batch(model, prompts, config, continuous_batching_config=cb_config)
        assert [r.error for r in results.values()] == [None] * len(prompts)
        return [r.generated_tokens for r in results.values()]


SHARING_VARIANTS = {  # ContinuousBatchingConfig fields; the first request alone in the first step unless said
    "prefill_skipped": {},
    "chunked_prefill": {"max_batch_tokens": 8},
    "one_first_step": {"max_batch_tokens": 256},  # every prompt in the first step: deduplicated after it
    "block_table_decode": {"max_blocks_per_request": 8},
}


def _check_prefix_sharing(model, eager, variant, fields, page_size, monkeypatch):
    prompts = _shared_prefix_prompts(page_size)
    fields = dict(fields)
    # transformers schedules prompts sharing prefixes in descending order: the first one fills the first step
    fields.setdefault("max_batch_tokens", len(max(prompts)))
    recorder = _BatchRecorder(model, monkeypatch)
    unshared = recorder.run(model, prompts, 6, page_size, allow_block_sharing=False, **fields)
    unshared_tokens, unshared_readers = recorder.model_tokens, recorder.max_readers
    shared = recorder.run(model, prompts, 6, page_size, allow_block_sharing=True, **fields)

    assert shared == unshared == _expected(eager, prompts, 6)
    if fields.get("use_cuda_graph"):
        return  # replayed steps run no Python: nothing counted
    assert unshared_readers == 1 and unshared_tokens == sum(map(len, prompts)) + 5 * len(prompts)
    assert recorder.max_readers == len(prompts)  # the prefix's pages: read by every request
    if variant in ("prefill_skipped", "block_table_decode"):  # each later request skipped the complete pages
        assert unshared_tokens - recorder.model_tokens == (len(prompts) - 1) * SHARED_PAGES * page_size
    elif variant == "one_first_step":  # all computed in one step, the duplicates' pages dropped after it
        assert recorder.model_tokens == unshared_tokens


@pytest.mark.parametrize("variant", list(SHARING_VARIANTS))
def test_generate_batch_shares_prompt_prefixes(variant, no_gather, monkeypatch):
    """transformers' prefix sharing (complete pages hashed; later requests with the same prefix reference them and
    skip their prefill; identical pages computed in one step are deduplicated after it) runs on our in-place path:
    greedy tokens with sharing == without == eager per request, and sharing did happen (several requests read one
    page in one step; fewer tokens prefilled where a request found the prefix already cached)."""
    ours, eager = _cb_pair("llama")
    _check_prefix_sharing(ours, eager, variant, SHARING_VARIANTS[variant], 4, monkeypatch)


def test_generate_batch_identical_whole_page_prompts(no_gather, monkeypatch):
    """Identical prompts of whole pages: every page of a later prompt is cached. transformers still runs at least
    its last token (5.24 recomputes the last page; 5.17 rewrites the last token into the last shared page, the same
    values): eager's tokens, fewer tokens run than without sharing."""
    ours, eager = _cb_pair("llama")
    prompt = torch.randint(3, 128, (4 * 4,), generator=torch.Generator().manual_seed(4)).tolist()
    prompts = [prompt] * 3 + [prompt[:10]]
    recorder = _BatchRecorder(ours, monkeypatch)
    shared = recorder.run(ours, prompts, 5, 4, max_batch_tokens=len(prompt))
    assert shared == _expected(eager, prompts, 5)
    assert recorder.model_tokens <= sum(map(len, prompts)) + 4 * len(prompts) - 2 * 3 * 4  # 3 pages skipped twice
    assert recorder.max_readers == 4


# --------------------------------------------------------------------------- (b3) sliding-window models
WINDOW_LAYOUTS = {  # (sliding_window, page_size): how transformers' ring buffer of a window lies in pages
    "ring_of_two_pages": (8, 4),  # decode steps read in place (window a whole number of pages)
    "ring_of_one_page": (4, 4),
    "window_inside_a_page": (4, 16),  # every step through transformers' read of the window
}
WINDOW_PROMPT_LENGTHS = (5, 17, 9, 33, 3, 1, 12)  # shorter than, equal to, and past the windows; one-token prompt


@pytest.mark.parametrize(("family", "layout", "max_batch_tokens"), [
    ("qwen2", "ring_of_two_pages", None), ("qwen2", "ring_of_two_pages", 16), ("qwen2", "ring_of_one_page", None),
    ("qwen2", "window_inside_a_page", 16), ("mistral", "ring_of_two_pages", 16), ("gemma2", "ring_of_two_pages", None),
    ("gemma3", "ring_of_two_pages", 16), ("gpt_oss", "ring_of_two_pages", None),
])
def test_generate_batch_sliding_window_models(family, layout, max_batch_tokens, no_gather, monkeypatch):
    """Models with sliding-window layers (Qwen2 / Gemma2 / Gemma3 / GPT-OSS alternate windowed and global layers,
    Mistral windows every layer; softcap, sinks) under generate_batch: eager's greedy tokens per request.
    transformers keeps each window in a ring of pages (KV memory bounded by the window); decode steps read it in
    place when the window is a whole number of pages, over at most window / page + 1 pages per sequence and layer;
    other steps (prefill, chunked prefill) read the window through transformers and run our varlen kernel."""
    _check_sliding_window(family, *WINDOW_LAYOUTS[layout], max_batch_tokens, WINDOW_PROMPT_LENGTHS, 14, monkeypatch)


def test_generate_batch_sliding_window_on_the_triton_kernels(triton_backend, no_gather, monkeypatch):
    """The window ring read in place by the Triton paged kernels (interpreter on CPU), a wrapped window included."""
    _check_sliding_window("qwen2", 8, 4, None, (9, 3), 6, monkeypatch)


def _check_sliding_window(family, window, page, max_batch_tokens, lengths, new_tokens, monkeypatch, device="cpu",
                          **fields):
    from hf_attn_plugin.integration import compat, continuous_batching as cb

    ours, eager = (m.to(device) for m in _cb_pair(family, sliding_window=window))
    in_place = []
    real = cb._step_from_window

    def record(page_size, *args):
        step = real(page_size, *args)
        pages = (-(-step.seq_lens // page_size)).tolist()
        in_place.append(max(pages))
        assert all(n <= window // page_size + 1 for n in pages)  # only the window's pages
        return step

    monkeypatch.setattr(cb, "_step_from_window", record)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in lengths]
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                                           pad_token_id=0)
    cb_config = compat.continuous_batching_config(page_size=page, max_batch_tokens=max_batch_tokens, **fields)
    results = hf_attn_plugin.generate_batch(ours, prompts, config, continuous_batching_config=cb_config)
    assert [r.error for r in results.values()] == [None] * len(prompts)
    assert [r.generated_tokens for r in results.values()] == _expected(eager, prompts, new_tokens)
    if fields.get("use_cuda_graph"):
        return  # captured steps read the window through transformers; replays run no Python
    if window % page:
        assert in_place == []
    else:  # every decode step of the window layers, once per step; windows that wrap read one page twice
        assert len(in_place) >= new_tokens - 1 and max(in_place) == window // page + 1


# --------------------------------------------------------------------------- (c) transformers versions: compat.py
def test_batch_lengths_under_both_releases_names():
    """5.19+ names the lengths max_length_q/k (the key length per layer type), 5.17-5.18 max_seqlen_q/k."""
    from hf_attn_plugin.integration import compat

    cu = {"full_attention": torch.tensor([0, 5]), "sliding_attention": torch.tensor([0, 4])}
    new = dict(cu_seq_lens_k=cu, max_length_q=3, max_length_k={"full_attention": 5, "sliding_attention": 4})
    cu_k, max_q, max_k = compat.batch_lengths(new, "sliding_attention")
    assert cu_k is cu["sliding_attention"] and (max_q, max_k) == (3, 4)
    old = dict(cu_seq_lens_k=cu["full_attention"], max_seqlen_q=2, max_seqlen_k=5)
    cu_k, max_q, max_k = compat.batch_lengths(old, "full_attention")
    assert cu_k is cu["full_attention"] and (max_q, max_k) == (2, 5)


def test_paged_name_registered_only_where_transformers_calls_it():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from hf_attn_plugin.integration import compat
    from hf_attn_plugin.integration.continuous_batching import paged_plugin_attention

    legacy = Version(transformers.__version__).release < (5, 19)
    assert compat.CACHE_UPDATE_REGIME is not legacy
    assert (ALL_ATTENTION_FUNCTIONS.get("paged|plugin") is paged_plugin_attention) is legacy


def test_transformers_private_attributes_only_in_compat():
    """compat.py is the one place that touches transformers' private attributes and compares its versions."""
    import pathlib
    import re

    root = pathlib.Path(hf_attn_plugin.__file__).parent
    private = re.compile(r"[.'\"](_global_mapping|_local_mapping|_attn_implementation|"
                         r"_cached_continuous_batching_manager|_create_batch_processor|_original_attn_impl)\b|"
                         r"TRANSFORMERS_VERSION\.release")
    offenders = [f"{path.relative_to(root)}:{n}" for folder in ("integration", "conversion")
                 for path in sorted((root / folder).glob("*.py")) if path.name != "compat.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert offenders == []


def test_step_from_block_table():
    """Slots of the new tokens from the block table; a padding sequence (length 0) writes nothing."""
    from hf_attn_plugin.integration.continuous_batching import _memoised_step

    tables = torch.tensor([[[7, 2, -1], [4, -1, -1], [-1, -1, -1]]], dtype=torch.int32)  # [groups, N, max_blocks]
    kwargs = {"cu_seq_lens_q": torch.tensor([0, 1, 2, 2], dtype=torch.int32),
              "cu_seq_lens_k": torch.tensor([0, 6, 7, 7], dtype=torch.int32), "block_table": tables,
              "read_index": [torch.empty(0, dtype=torch.long)], "write_index": [torch.empty(0, dtype=torch.long)]}
    step = _memoised_step((None, None, -1), 0, 4, 0, kwargs, 1, 1)[1]
    # sequence 0: 6 tokens, the new one at position 5 -> page 2, offset 1; sequence 1: position 0 -> page 4
    assert step.slots.tolist() == [2 * 4 + 1, 4 * 4 + 0, -1]
    assert step.seq_lens.tolist() == [6, 1, 0] and step.max_seqlen_q == 1
    assert torch.equal(step.block_tables, tables[0])


def test_step_memo_rebuilds_when_index_buffers_are_refilled_in_place():
    """Block tables are shared by the layers of one forward, never across steps, even when transformers refills
    the same (static) index tensors in place between steps."""
    from hf_attn_plugin.integration.continuous_batching import _memoised_step

    cu_q = torch.tensor([0, 2], dtype=torch.int32)
    kwargs = {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": torch.tensor([0, 6], dtype=torch.int32),
              "read_index": [torch.arange(6)], "write_index": [torch.tensor([4, 5])]}
    memo = _memoised_step((None, None, -1), 0, 4, 0, kwargs, 2, 6)
    assert _memoised_step(memo, 0, 4, 1, kwargs, 2, 6)[1] is memo[1]  # next layer, same step: reused
    kwargs["read_index"][0].copy_(torch.arange(8, 14))  # next step, same buffers refilled
    kwargs["write_index"][0].copy_(torch.tensor([12, 13]))
    again = _memoised_step(_memoised_step(memo, 0, 4, 1, kwargs, 2, 6), 0, 4, 0, kwargs, 2, 6)
    assert again[1] is not memo[1]
    assert again[1].block_tables.tolist() == [[2, 3]] and again[1].slots.tolist() == [12, 13]


# --------------------------------------------------------------------------- GPU (Triton paged kernels)
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_generate_paged_cache_gpu(pairs, family):
    ours, eager = (copy.deepcopy(m).cuda() for m in pairs[family])
    ids, mask = (t.cuda() for t in _prompts())
    cache = PagedCache(ours, max_batch_size=4, num_pages=64, page_size=16)
    assert torch.equal(_greedy(ours, ids, mask, **{CACHE_KWARG: cache}), _greedy(eager, ids, mask))


GPU_BATCHING = {  # ContinuousBatchingConfig fields of each GPU variant
    "default": {},
    "graphs": {"use_cuda_graph": True, "num_blocks": 64},  # every step captured (padded shapes)
    "graphs_async": {"use_cuda_graph": True, "use_async_batching": True, "num_blocks": 64},
    "blocktable": {"max_blocks_per_request": 8},  # decode-only steps through the block table
    "blocktable_decode_graphs": {"max_blocks_per_request": 8, "use_cuda_graph": (False, True), "num_blocks": 64},
}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(GPU_BATCHING))
def test_generate_batch_gpu(variant):
    """Our paged path under transformers' CUDA graphs, async batching and block-table decode steps: each
    token-identical to eager."""
    ours, eager = (m.cuda() for m in _cb_pair("llama"))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in CB_PROMPT_LENGTHS]
    config = transformers.GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb_config = transformers.ContinuousBatchingConfig(**GPU_BATCHING[variant])
    results = hf_attn_plugin.generate_batch(ours, prompts, config, continuous_batching_config=cb_config)
    assert [r.error for r in results.values()] == [None] * len(prompts)
    assert [r.generated_tokens for r in results.values()] == _expected(eager, prompts, 10)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["prefill_skipped", "block_table_decode", "graphs"])
def test_generate_batch_shared_prefix_gpu(variant, no_gather, monkeypatch):
    """Prefix sharing on the Triton paged kernels (pages of 16): eager's tokens with and without sharing, and
    pages read by several requests."""
    ours, eager = (m.cuda() for m in _cb_pair("llama"))
    fields = {**SHARING_VARIANTS, "graphs": {"use_cuda_graph": True, "num_blocks": 64}}[variant]
    _check_prefix_sharing(ours, eager, variant, fields, 16, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize(("family", "window", "page"), [("qwen2", 32, 16), ("gemma2", 32, 16), ("gpt_oss", 48, 16),
                                                         ("mistral", 40, 16)])
def test_generate_batch_sliding_window_gpu(family, window, page, no_gather, monkeypatch):
    """Sliding-window models on the Triton kernels: in-place ring reads on decode steps (windows of whole pages),
    transformers' window read + our varlen kernel elsewhere (mistral: 40 is not a multiple of 16)."""
    _check_sliding_window(family, window, page, 64, (20, 70, 33, 150, 5), 40, monkeypatch, device="cuda")


def test_generate_batch_refuses_cuda_graphs_with_sliding_layers():
    """transformers' CUDA graphs over a model with sliding layers failed token identity on the H200 (5.17): refused
    before anything runs, with the way out; models without sliding layers keep graphs."""
    from transformers import ContinuousBatchingConfig

    ours, _ = _cb_pair("qwen2", sliding_window=32)
    prompts = [[5, 6, 7, 8]]
    config = transformers.GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with pytest.raises(NotImplementedError, match="use_cuda_graph off"):
        hf_attn_plugin.generate_batch(ours, prompts, config,
                                      continuous_batching_config=ContinuousBatchingConfig(use_cuda_graph=True))
    full, _ = _cb_pair("qwen2")
    from hf_attn_plugin.integration import continuous_batching as cb

    assert cb._has_sliding_layers(ours) and not cb._has_sliding_layers(full)


def test_sliding_layers_refuse_cuda_graph_capture(monkeypatch):
    """transformers' own manager (5.17-5.18's plain model.generate_batch) reaches the sliding branch without our
    init check: a capture in progress is refused there too."""
    from hf_attn_plugin.integration import continuous_batching as cb

    cb._refuse_sliding_capture("layer 0")  # not capturing: nothing happens
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(NotImplementedError, match="layer 0: .*use_cuda_graph off"):
        cb._refuse_sliding_capture("layer 0")
