"""Our own continuous-batching engine behind :func:`hf_attn_plugin.generate_batch` (offline: every request is known).

transformers' continuous-batching loop spends most of each step on the host (input preparation, then the model
forward launched layer by layer: the GPU idles ~90% of a decode step on a 1B model). This engine runs the same
requests on our page allocator and paged kernels with a host-light loop:

* **Pages** (:class:`~hf_attn_plugin.paged.PagePool`): one pool per layer, block tables, sequence slots. A request
  is admitted when a slot is free and the pages of its worst case (prompt + ``max_new_tokens``) are not promised
  to running requests, so a running request never runs out of pages (no preemption); its pages are taken as it
  grows and all return to the pool the step it finishes.
* **Prefill**: waiting requests are admitted in order and their prompts run through the model in one varlen
  forward (several prompts packed along one row, at most ``max_batch_tokens`` tokens unless a single prompt is
  longer), K/V written into the pages, the first token taken from each prompt's last logits.
* **Decode**: all running sequences, one token each, in ONE forward per step. The batch is padded to a bucket
  (1, 2, 4, ... up to ``max_batch_size``); padding rows write nothing (slot ``-1``) and read one scratch page.
  On CUDA each bucket's step (the whole model forward + the greedy argmax) is a CUDA graph, captured once
  (``warmup=True``: all buckets before the first request) over static input buffers (token ids, positions,
  write slots, block tables, sequence lengths) that are refilled in place before each replay; the paged-attention
  plan (split count, partial buffers) is built once per bucket, before its capture. Page allocation and every
  other piece of bookkeeping happens on the host between replays. On CPU the same step runs without graphs.
* **Sampling**: greedy (the graphs' argmax), or ``do_sample=True`` with temperature / top-k / top-p (transformers'
  own warpers on the step's logits, then ``torch.multinomial``, outside the graph). Anything else (beams, several
  return sequences, other logits processors such as a repetition penalty, ``continuous_batching_config``,
  timestamps, a persistent manager, tensor parallelism) runs transformers' engine instead (``engine="auto"``, the
  default; the reason is logged at DEBUG level) or is refused (``engine="plugin"``); :func:`unsupported` names it.
  Sliding-window models go to transformers' engine under ``"auto"`` (it keeps only the window's KV);
  ``engine="plugin"`` runs them here, the kernel applying each layer's window over the whole history.

The engine (pools, graphs) is cached per model and reused by later calls with the same :class:`EngineConfig`
whose requests fit it; :func:`release_engine` frees it. Model code runs unchanged: the forward receives our
:class:`_EngineCache` (a ``transformers.Cache``), whose ``update`` writes K/V into the pages and returns the pools
tagged for ``plugin_attention``, which calls its ``attend`` (the :class:`~.paged_cache.PagedReader` protocol,
:func:`~hf_attn_plugin.paged_ops.plan` / :func:`~hf_attn_plugin.paged_ops.run`).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import time
import weakref

import torch
from transformers import Cache

from ..paged import PagePool, bytes_per_page
from ..paged_ops import write_kv_trusted
from . import compat
from .continuous_batching import _attend, _has_sliding_layers, _Step
from .paged_cache import tag_pool
from .registration import ATTN_IMPLEMENTATION

__all__ = ["Engine", "EngineConfig", "cached_engine", "release_engine", "run_engine", "unsupported"]

logger = logging.getLogger(__name__)

ENGINES = ("auto", "plugin", "transformers")
# generate_batch keywords of transformers' engine: None = ours supports the keyword at any value; otherwise the
# values ours supports (anything else: transformers' engine).
_SAMPLING_WARPERS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper")  # what do_sample may add
_KNOWN_KWARGS = {"max_new_tokens": None, "progress_bar": None, "warmup": None, "record_timestamps": (False,),
                 "persistent_manager": (False,), "continuous_batching_config": (None,)}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Sizes of our engine (``generate_batch(..., engine_config=EngineConfig(...))``).

    Args:
        max_batch_size: sequences decoded at once (sequence slots); CUDA graphs are captured for the buckets
            1, 2, 4, ... up to it.
        page_size: tokens per KV page (a power of two).
        num_pages: pages in the pool (one is kept as the padding rows' scratch page). Default: enough for
            ``max_batch_size`` sequences of ``max_seq_len`` tokens, on CUDA at most ``memory_fraction`` of the
            free memory.
        memory_fraction: CUDA only, see ``num_pages``.
        max_seq_len: most tokens of one sequence (prompt + new tokens): sets the block tables' width. Default: the
            model's ``max_position_embeddings`` capped at 4096, or the longest request of the call when longer.
        max_batch_tokens: prompt tokens per prefill forward (a longer prompt runs alone). Default 8192 on CUDA,
            512 on CPU.
        cuda_graphs: capture the decode step in CUDA graphs (CUDA only; ``False``: the same step, eager).
    """

    max_batch_size: int = 256
    page_size: int = 16
    num_pages: int | None = None
    memory_fraction: float = 0.25
    max_seq_len: int | None = None
    max_batch_tokens: int | None = None
    cuda_graphs: bool = True

    def __post_init__(self):
        for name in ("max_batch_size", "page_size", "num_pages", "max_seq_len", "max_batch_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"EngineConfig.page_size must be a power of two, got {self.page_size}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"EngineConfig.memory_fraction must be in (0, 1], got {self.memory_fraction}")


# --------------------------------------------------------------------------- what the engine supports
def unsupported(model, generation_config=None, **kwargs) -> str | None:
    """Why our engine cannot run this ``generate_batch`` call (``None``: it can). ``kwargs``: the call's keywords
    (those of transformers' ``generate_batch``)."""
    gen = generation_config if generation_config is not None else model.generation_config
    for name, value in kwargs.items():
        if name not in _KNOWN_KWARGS:
            return f"keyword {name}={value!r} is not implemented by our engine"
        allowed = _KNOWN_KWARGS[name]
        if allowed is not None and value not in allowed:
            shown = repr(value) if isinstance(value, (bool, int, float, str)) else type(value).__name__ + "(...)"
            return f"{name}={shown} configures transformers' engine"
    for name in ("num_beams", "num_return_sequences"):
        if (getattr(gen, name, None) or 1) != 1:
            return f"{name}={getattr(gen, name)} (our engine runs one sequence per request)"
    max_new = kwargs.get("max_new_tokens")
    if (max_new if max_new is not None else gen.max_new_tokens) is None:
        return "max_new_tokens is not set (our engine reserves each request's pages up front)"
    try:
        processors = compat.logits_processors(model, gen)
    except Exception as error:  # noqa: BLE001  a transformers release with another signature: do not guess
        return f"could not check the generation config's logits processors ({type(error).__name__}: {error})"
    sampling = bool(getattr(gen, "do_sample", False))
    others = [p for p in processors if not (sampling and type(p).__name__ in _SAMPLING_WARPERS)]
    if others:
        names = ", ".join(sorted({type(p).__name__ for p in others}))
        return (f"the generation config asks for logits processors ({names}; ours applies temperature, top_k and "
                "top_p when sampling, nothing else)")
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if set(layer_types) - {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(set(layer_types))} (our engine holds softmax-attention layers only)"
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "torch.distributed is running (tensor parallelism: transformers' engine)"
    if model.device.type not in ("cuda", "cpu"):
        return f"the model is on {model.device.type} (our engine runs on CUDA or the CPU)"
    if _has_sliding_layers(model):  # last: the one reason engine="plugin" overrides
        return ("sliding-window layers (transformers' engine keeps their KV memory within the window; ours keeps the "
                "whole history: pass engine='plugin' to run them on ours anyway)")
    return None


def _not_plugin(model) -> str | None:
    impl = compat.attn_implementation(model)
    if impl != ATTN_IMPLEMENTATION:
        return (f"hf_attn_plugin.generate_batch needs a model with attn_implementation={ATTN_IMPLEMENTATION!r}, got "
                f"{impl!r}: load it with attn_implementation={ATTN_IMPLEMENTATION!r} or call "
                f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r})")
    return None


def run_engine(model, inputs, generation_config, engine: str, engine_config: EngineConfig | None, kwargs: dict):
    """:func:`hf_attn_plugin.generate_batch`'s choice: our engine's ``{request_id: GenerationOutput}``, or ``None``
    when transformers' engine must run the call (``engine="auto"`` and :func:`unsupported` says why)."""
    if engine not in ENGINES:
        raise ValueError(f"generate_batch: engine must be one of {ENGINES}, got {engine!r}")
    if engine_config is not None and not isinstance(engine_config, EngineConfig):
        raise TypeError(f"generate_batch: engine_config must be a hf_attn_plugin EngineConfig, got "
                        f"{type(engine_config).__name__}")
    if engine == "transformers":
        if engine_config is not None:
            raise ValueError("generate_batch: engine_config sizes our engine; transformers' engine takes "
                             "continuous_batching_config")
        return None
    problem = _not_plugin(model)
    if problem:
        raise ValueError(problem)
    reason = unsupported(model, generation_config, **kwargs)
    if engine == "plugin" and reason is not None and not reason.startswith("sliding-window"):
        raise NotImplementedError(f"generate_batch(engine='plugin'): {reason}. Use engine='transformers' (or the "
                                  "default engine='auto', which picks it for such calls).")
    if engine == "auto" and reason is not None:
        if engine_config is not None:
            raise ValueError(f"generate_batch: engine_config was given but our engine cannot run this call: {reason}")
        logger.debug("generate_batch: transformers' engine runs this call: %s", reason)
        return None
    gen = generation_config if generation_config is not None else model.generation_config
    max_new = kwargs.get("max_new_tokens")
    max_new = gen.max_new_tokens if max_new is None else max_new
    progress = kwargs.get("progress_bar")
    if progress is None:  # transformers' default of the installed release
        param = inspect.signature(type(model).generate_batch).parameters.get("progress_bar")
        progress = bool(param.default) if param is not None and param.default is not inspect.Parameter.empty else False
    prompts = _prompts(inputs)
    if not prompts:
        return {}
    config = engine_config or EngineConfig()
    needed = max(len(p) for p in prompts) + max_new
    eng = _engine_for(model, config, needed)
    if kwargs.get("warmup", True):
        eng.warm_up()
    sampler = _sampler(compat.logits_processors(model, gen)) if gen.do_sample else None
    return eng.generate(prompts, int(max_new), _eos_ids(gen), progress_bar=progress, sampler=sampler)


def _sampler(warpers: list):
    """``do_sample=True``: logits ``[N, V]`` -> tokens ``[N]`` as ``generate`` samples, with transformers' own
    temperature / top-k / top-p warpers (they read the scores only) and ``torch.multinomial`` on torch's default
    generator of the device (``torch.manual_seed`` makes a call reproducible)."""
    def sample(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        for warper in warpers:
            scores = warper(None, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)

    return sample


def _prompts(inputs) -> list[list[int]]:
    if isinstance(inputs, torch.Tensor) or not isinstance(inputs, (list, tuple)):
        raise TypeError(f"generate_batch: inputs must be a list of prompts (lists of token ids), got "
                        f"{type(inputs).__name__}")
    prompts = []
    for i, prompt in enumerate(inputs):
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if not ids:
            raise ValueError(f"generate_batch: prompt {i} is empty: every request needs at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError(f"generate_batch: prompt {i} must hold integer token ids, got {ids[:4]}...")
        prompts.append(ids)
    return prompts


def _eos_ids(gen) -> set[int]:
    """EOS ids of the generation config (none: no stop), as ``hf_attn_plugin.generate_batch`` on transformers' engine
    reads them (our manager sets a missing EOS to -1 before transformers would look at the model config)."""
    eos = gen.eos_token_id
    if eos is None:
        return set()
    eos = [eos] if isinstance(eos, int) else list(eos)
    return {int(e) for e in eos if int(e) >= 0}


# --------------------------------------------------------------------------- engines cached per model
_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _engine_for(model, config: EngineConfig, needed_len: int) -> "Engine":
    eng = _ENGINES.get(model)
    if eng is not None and eng.fits(model, config, needed_len):
        return eng
    if eng is not None:
        release_engine(model)
    with torch.inference_mode(False):  # ordinary tensors: a later call outside inference_mode may write them
        eng = _ENGINES[model] = Engine(model, config, needed_len)
    return eng


def cached_engine(model) -> "Engine | None":
    """The engine the last ``generate_batch`` call on ``model`` ran on (its pool, graphs and :attr:`Engine.stats`),
    or ``None``."""
    return _ENGINES.get(model)


def release_engine(model) -> None:
    """Free ``model``'s cached engine (its KV pool and CUDA graphs)."""
    eng = _ENGINES.pop(model, None)
    if eng is not None:
        eng.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _EngineCache(Cache):
    """The ``transformers.Cache`` our forwards receive: ``update`` writes the new K/V at the step's slots and returns
    the layer's page pools, tagged so that ``plugin_attention`` calls :meth:`attend` over the step's block tables."""

    def __init__(self, pool: PagePool):
        super().__init__(layers=[])
        self.pool = pool
        self.step: _Step | None = None
        self._current: tuple | None = None
        for k_pool in pool.k_pools:
            tag_pool(k_pool, self)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        k_pool, v_pool = self.pool.k_pools[layer_idx], self.pool.v_pools[layer_idx]
        as_tokens = lambda t: t[0].transpose(0, 1)  # noqa: E731  [1, H_kv, T, D] -> [T, H_kv, D]
        write_kv_trusted(k_pool, v_pool, as_tokens(key_states), as_tokens(value_states), self.step.slots)
        self._current = (k_pool, v_pool)
        return k_pool, v_pool

    def attend(self, params, query: torch.Tensor, attention_mask) -> torch.Tensor:
        return _attend(params, query, *self._current, self.step)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are passed explicitly

    @property
    def is_compileable(self) -> bool:
        return False


@dataclasses.dataclass
class _Request:
    index: int
    request_id: str
    prompt: list[int]
    max_new: int
    reserve: int  # worst-case pages (prompt + max_new tokens)
    created: float
    sid: int = -1
    length: int = 0  # tokens in the cache
    tokens: list[int] = dataclasses.field(default_factory=list)
    started: float = -1.0


def _buckets(max_batch_size: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


class Engine:
    """Page pool, static decode buffers, CUDA graphs and the request loop of one model (see the module doc)."""

    def __init__(self, model, config: EngineConfig, needed_len: int):
        text = model.config.get_text_config()
        self._model, self.config = weakref.ref(model), config  # weak: the cache of engines is keyed by the model
        self.key = self._key(model)
        device, dtype = model.device, model.dtype
        layers = text.num_hidden_layers
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        ps = config.page_size
        max_len = config.max_seq_len
        if max_len is None:
            max_len = max(min(getattr(text, "max_position_embeddings", None) or 4096, 4096), needed_len)
        self.max_seq_len = -(-max_len // ps) * ps
        width = self.max_seq_len // ps
        num_pages = config.num_pages
        if num_pages is None:
            num_pages = config.max_batch_size * width + 1
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)  # + what torch's allocator holds unused (an earlier run's)
                free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
                per_page = bytes_per_page(layers, kv_heads, head_dim, ps, dtype)
                num_pages = max(2, min(num_pages, int(free * config.memory_fraction) // per_page))
        if num_pages < 2:
            raise ValueError(f"EngineConfig(num_pages={num_pages}): the engine needs a scratch page and at least one "
                             "page for requests")
        self.pool = PagePool(layers, kv_heads, head_dim, num_pages=num_pages, page_size=ps,
                             max_seqs=config.max_batch_size + 1, max_pages_per_seq=width, dtype=dtype, device=device)
        self.scratch_sid = self.pool.add_sequence()  # the padding rows' page, never freed
        self.pool.append_slots(self.scratch_sid, 1)
        self.scratch_page = self.pool.pages(self.scratch_sid)[0]
        self.usable_pages = num_pages - 1
        self.cache = _EngineCache(self.pool)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.24 / 5.17
        self.device = device
        self.max_batch_tokens = config.max_batch_tokens or (8192 if device.type == "cuda" else 512)
        self.use_graphs = config.cuda_graphs and device.type == "cuda"
        self.buckets = _buckets(config.max_batch_size)
        bmax = self.buckets[-1]
        # A 4-D mask makes transformers' mask builders return at once (none is needed: the pages say it all).
        self.mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        # Static decode inputs (every bucket uses the first B rows), refilled in place before each step.
        self.d_ints = torch.zeros(3, bmax, dtype=torch.int64, device=device)  # token ids, positions, write slots
        self.d_lens = torch.ones(bmax, dtype=torch.int32, device=device)
        self.d_tables = torch.zeros(bmax, width, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self.h_ints = torch.zeros(3, bmax, dtype=torch.int64, pin_memory=pin)
        self.h_lens = torch.ones(bmax, dtype=torch.int32, pin_memory=pin)
        self.h_tables = torch.zeros(bmax, width, dtype=torch.int32, pin_memory=pin)
        self._set_padding(0, bmax)
        self.d_ints.copy_(self.h_ints)
        self.d_tables.copy_(self.h_tables)
        self.steps: dict[int, _Step] = {}  # bucket -> its decode _Step (plan built once, kept)
        self.graphs: dict[int, tuple] = {}  # bucket -> (CUDAGraph, (logits, greedy tokens): its static outputs)
        self.stats = collections.Counter()  # of the last generate() call
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
            if self.use_graphs else None

    # ------------------------------------------------------------------ reuse
    @staticmethod
    def _key(model) -> tuple:
        weight = model.get_input_embeddings().weight
        return (model.device, model.dtype, weight.data_ptr(), compat.attn_implementation(model))

    def fits(self, model, config: EngineConfig, needed_len: int) -> bool:
        return (self._model() is model and self.key == self._key(model) and self.config == config
                and needed_len <= self.max_seq_len)

    def close(self) -> None:
        self.graphs.clear()
        self.steps.clear()

    # ------------------------------------------------------------------ the request loop
    def generate(self, prompts: list[list[int]], max_new: int, eos: set[int], progress_bar: bool = False,
                 sampler=None) -> dict:
        """Run the requests; ``sampler``: logits ``[N, V]`` -> tokens ``[N]`` (``None``: greedy, the graphs' argmax)."""
        from tqdm import tqdm
        from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

        if max_new < 1:
            raise ValueError(f"generate_batch: max_new_tokens must be >= 1, got {max_new}")
        ps = self.pool.page_size
        now = time.perf_counter()
        requests = [_Request(i, f"req_{i}", p, max_new, -(-(len(p) + max_new) // ps), now)
                    for i, p in enumerate(prompts)]
        for r in requests:
            total = len(r.prompt) + max_new
            if total > self.max_seq_len or r.reserve > self.usable_pages:
                raise ValueError(
                    f"generate_batch: request {r.request_id} needs {total} tokens ({len(r.prompt)} prompt + "
                    f"max_new_tokens={max_new}, {r.reserve} pages of {ps}), but the engine's cache holds at most "
                    f"{self.max_seq_len} tokens per sequence and {self.usable_pages} pages: shorten the prompt or "
                    "lower max_new_tokens, or pass a larger engine_config=EngineConfig(max_seq_len=..., "
                    "num_pages=...)")
        waiting = collections.deque(requests)
        running: list[_Request] = []
        promised = 0  # worst-case pages of the running requests
        outputs = {}
        output_fields = {f.name for f in dataclasses.fields(GenerationOutput)}  # lifespan: not in every release
        self.stats = collections.Counter()
        bar = tqdm(total=len(requests), disable=not progress_bar, desc=f"Solving {len(requests)} requests",
                              unit="request")

        def finish(r: _Request) -> None:
            nonlocal promised
            self.stats["pages_released"] += len(self.pool.pages(r.sid))
            self.pool.free(r.sid)
            promised -= r.reserve
            fields = dict(request_id=r.request_id, prompt_ids=list(r.prompt), generated_tokens=r.tokens, error=None,
                          status=RequestStatus.FINISHED, created_time=r.created,
                          lifespan=(r.started, time.perf_counter()))
            outputs[r.index] = GenerationOutput(**{k: v for k, v in fields.items() if k in output_fields})
            bar.update(1)

        def accept(r: _Request, token: int) -> bool:
            r.tokens.append(token)
            return token in eos or len(r.tokens) >= r.max_new

        try:
            with torch.no_grad(), bar:
                while waiting or running:
                    admitted, budget = [], 0
                    while waiting and len(running) + len(admitted) < self.config.max_batch_size:
                        r = waiting[0]
                        if promised + r.reserve > self.usable_pages:
                            break
                        if admitted and budget + len(r.prompt) > self.max_batch_tokens:
                            break
                        waiting.popleft()
                        admitted.append(r)
                        budget += len(r.prompt)
                        promised += r.reserve
                    if admitted:
                        for r, token in zip(admitted, self._prefill(admitted, sampler)):
                            (finish if accept(r, token) else running.append)(r)
                        continue
                    if not running:  # cannot happen: every request fits an empty pool (checked above)
                        raise RuntimeError("generate_batch: no request can be admitted into an empty cache")
                    self.stats["max_running"] = max(self.stats["max_running"], len(running))
                    tokens = self._decode(running, sampler)
                    still = []
                    for r, token in zip(running, tokens):
                        r.length += 1
                        (finish if accept(r, token) else still.append)(r)
                    running = still
        except BaseException:  # leave the cached engine clean for the next call: every request's pages back
            for sid in self.pool.seq_ids:
                if sid != self.scratch_sid:
                    self.pool.free(sid)
            raise
        return {outputs[i].request_id: outputs[i] for i in range(len(requests))}

    # ------------------------------------------------------------------ prefill: varlen, eager
    def _prefill(self, admitted: list[_Request], sampler=None) -> list[int]:
        pool, dev = self.pool, self.device
        now = time.perf_counter()
        for r in admitted:
            r.sid, r.started = pool.add_sequence(), now
        plan = pool.plan([r.sid for r in admitted], [len(r.prompt) for r in admitted])
        for r in admitted:
            r.length = len(r.prompt)
        ids = torch.tensor([t for r in admitted for t in r.prompt], dtype=torch.int64)
        pos = torch.cat([torch.arange(len(r.prompt), dtype=torch.int64) for r in admitted])
        last = torch.tensor([len(r.prompt) for r in admitted], dtype=torch.int64).cumsum(0) - 1
        ids, pos, last = ids.to(dev, non_blocking=True), pos.to(dev, non_blocking=True), last.to(dev, non_blocking=True)
        self.cache.step = _Step(plan.slot_mapping, plan.block_tables, plan.seq_lens, plan.cu_seqlens_q,
                                plan.max_seqlen_q)
        logits = self._forward(ids[None], pos[None], last)
        self.stats["prefill_forwards"] += 1
        self.stats["prefill_tokens"] += ids.numel()
        return (logits.argmax(-1) if sampler is None else sampler(logits)).tolist()

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, keep=0) -> torch.Tensor:
        out = self._model()(input_ids=ids, position_ids=pos, attention_mask=self.mask, use_cache=True,
                         logits_to_keep=keep, **{self.cache_kw: self.cache})
        return out.logits[0]

    # ------------------------------------------------------------------ decode: one token per sequence, bucketed
    def _set_padding(self, start: int, stop: int) -> None:
        """Host rows ``start:stop`` as padding: token 0 at position 0, no write, one key read from the scratch page."""
        self.h_ints[:, start:stop] = 0
        self.h_ints[2, start:stop] = -1
        self.h_lens[start:stop] = 1
        self.h_tables[start:stop] = 0
        self.h_tables[start:stop, 0] = self.scratch_page

    def _decode(self, running: list[_Request], sampler=None) -> list[int]:
        start = time.perf_counter()
        n = len(running)
        bucket = next(b for b in self.buckets if b >= n)
        pool = self.pool
        slots = [pool.append_slots(r.sid, 1)[0] for r in running]
        rows = torch.tensor([pool.row(r.sid) for r in running], dtype=torch.int64)
        self.h_ints[:, :n] = torch.tensor([[r.tokens[-1] for r in running], [r.length for r in running], slots])
        self.h_lens[:n] = torch.tensor([r.length + 1 for r in running], dtype=torch.int32)
        torch.index_select(pool.block_tables_host, 0, rows, out=self.h_tables[:n])
        self._set_padding(n, bucket)
        self.d_ints[:, :bucket].copy_(self.h_ints[:, :bucket], non_blocking=True)
        self.d_lens[:bucket].copy_(self.h_lens[:bucket], non_blocking=True)
        self.d_tables[:bucket].copy_(self.h_tables[:bucket], non_blocking=True)
        if self.use_graphs:
            graph, out = self.graphs.get(bucket) or self._capture(bucket)
            began, ended = self._events
            began.record()
            graph.replay()
            ended.record()
            self.stats["graph_replays"] += 1
        else:
            out = self._decode_step(bucket)
        logits, greedy = out
        tokens = (greedy[:n] if sampler is None else sampler(logits[:n])).tolist()  # waits for the step
        if self.use_graphs:
            self.stats["decode_gpu_ms"] += began.elapsed_time(ended)
        self.stats["decode_wall_ms"] += 1e3 * (time.perf_counter() - start)
        self.stats["decode_steps"] += 1
        return tokens

    def busy_fraction(self) -> float | None:
        """GPU time of the last call's decode graphs / wall time of its decode steps (host work included); ``None``
        without graphs."""
        if not self.stats["decode_wall_ms"] or not self.use_graphs:
            return None
        return self.stats["decode_gpu_ms"] / self.stats["decode_wall_ms"]

    def _decode_step(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step a graph captures: the whole forward over the static buffers' first ``bucket`` rows; returns the
        logits ``[bucket, V]`` and their argmax."""
        step = self.steps.get(bucket)
        if step is None:  # its plan is built by the first attend and kept: static tensors, fixed split count
            step = self.steps[bucket] = _Step(self.d_ints[2, :bucket], self.d_tables[:bucket], self.d_lens[:bucket],
                                              None, 1)
        self.cache.step = step
        logits = self._forward(self.d_ints[0, :bucket][None], self.d_ints[1, :bucket][None])
        return logits, logits.argmax(-1)

    def _capture(self, bucket: int) -> tuple:
        """Warm the bucket's step up on a side stream (kernels compiled, plan and its buffers built outside the
        graph), then capture it. The static buffers hold the current step (or padding): the warm-up runs it and
        writes its K/V, the replay that follows writes the same values again."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._decode_step(bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._decode_step(bucket)
        self.graphs[bucket] = (graph, out)
        self.stats["graphs_captured"] += 1
        return graph, out

    def warm_up(self) -> None:
        """Capture every bucket's graph now (CUDA, graphs on; already captured ones are kept): all rows padding."""
        if not self.use_graphs or len(self.graphs) == len(self.buckets):
            return
        with torch.no_grad():
            self._set_padding(0, self.buckets[-1])
            self.d_ints.copy_(self.h_ints)
            self.d_lens.copy_(self.h_lens)
            self.d_tables.copy_(self.h_tables)
            for bucket in reversed(self.buckets):
                if bucket not in self.graphs:
                    self._capture(bucket)
            torch.cuda.synchronize(self.device)
