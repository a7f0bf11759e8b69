"""Our continuous-batching engine (hf_attn_plugin/integration/engine.py) behind ``hf_attn_plugin.generate_batch``:
greedy tokens equal to ``model.generate`` eager per request, admission and page reuse, fallbacks to transformers'
engine, errors; on the GPU: CUDA graphs replayed, tokens equal to transformers' engine."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers

import hf_attn_plugin
from hf_attn_plugin.integration import engine as E
from tests.models import COMMON, DECODERS, make_pair

LENGTHS = (9, 5, 2, 17, 1, 30, 12)


def _family(name: str, **fields):
    """A tiny config of ``name`` (``fields``: changes, e.g. the layer count, made before layer types are derived)."""
    common = {**COMMON, **fields}
    if name == "qwen2":  # full attention (GQA); the DECODERS entry has a sliding layer
        return transformers.Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2)
    if name == "llama":
        return transformers.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2)
    assert not fields, "fields only for llama and qwen2"
    return DECODERS[name]()


def _prompts(lengths=LENGTHS, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=gen).tolist() for n in lengths]


def _config(new_tokens=10, eos=-1, **kwargs):
    return transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0,
                                         **kwargs)


def _eager(eager, prompts, new_tokens, eos=None, **kwargs):
    outs = []
    for p in prompts:
        out = eager.generate(torch.tensor([p], device=eager.device), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=eos, **kwargs)
        outs.append(out[0, len(p):].tolist())
    return outs


def _tokens(results):
    return [r.generated_tokens for r in results.values()]


@pytest.fixture(autouse=True)
def _fresh_engines():
    yield
    E._ENGINES.clear()


SMALL = E.EngineConfig(max_batch_size=3, num_pages=10, max_batch_tokens=24)  # fewer slots/pages than the requests


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_greedy_tokens_equal_eager(family):
    """More requests than slots, prompts of different lengths, several prompts per prefill forward: eager's tokens
    per request, request ids and prompts as transformers' engine reports them."""
    ours, eager = make_pair(_family(family))
    prompts = _prompts()
    results = hf_attn_plugin.generate_batch(ours, prompts, _config(), engine="plugin", engine_config=SMALL)
    assert list(results) == [f"req_{i}" for i in range(len(prompts))]
    assert [r.prompt_ids for r in results.values()] == prompts
    assert [r.error for r in results.values()] == [None] * len(prompts)
    assert all(r.is_finished() for r in results.values())
    assert _tokens(results) == _eager(eager, prompts, 10)
    stats = E.cached_engine(ours).stats
    assert stats["prefill_forwards"] > 1 and stats["decode_steps"] > 0


def test_same_outputs_as_transformers_engine():
    """Ids, prompts and tokens match transformers' engine (with our attention) on the same call."""
    ours, _ = make_pair(_family("llama"))
    prompts = _prompts((4, 11, 3))
    mine = hf_attn_plugin.generate_batch(ours, prompts, _config(6), engine="plugin")
    theirs = hf_attn_plugin.generate_batch(ours, prompts, _config(6), engine="transformers")
    assert list(mine) == list(theirs)
    for a, b in zip(mine.values(), theirs.values()):
        assert (a.request_id, a.prompt_ids, a.generated_tokens, a.status) == \
               (b.request_id, b.prompt_ids, b.generated_tokens, b.status)


def test_on_the_triton_kernels(triton_backend):
    """The Triton paged kernels (interpreter on CPU): the decode kernel over padded buckets, the varlen prefill."""
    ours, eager = make_pair(_family("qwen2"))
    prompts = _prompts((9, 5, 2, 17))
    results = hf_attn_plugin.generate_batch(ours, prompts, _config(5), engine="plugin",
                                            engine_config=E.EngineConfig(max_batch_size=3, num_pages=12))
    assert _tokens(results) == _eager(eager, prompts, 5)


def test_eos_stops_each_request_where_eager_does():
    """An EOS token ends each request at its own step (EOS included, as transformers reports it); eager's tokens cut
    at their first EOS. Pages of finished requests return at once."""
    ours, eager = make_pair(_family("llama"))
    prompts = _prompts()
    free_run = _eager(eager, prompts, 12)
    eos = free_run[0][3]  # a token request 0 produces at its 4th step
    expected = []
    for tokens in free_run:
        expected.append(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)
    assert len({len(t) for t in expected}) > 1  # the stops really differ
    results = hf_attn_plugin.generate_batch(ours, prompts, _config(12, eos=eos), engine="plugin", engine_config=SMALL)
    assert _tokens(results) == expected
    assert _tokens(results) == _eager(eager, prompts, 12, eos=eos)


def test_one_new_token_finishes_at_prefill():
    ours, eager = make_pair(_family("llama"))
    prompts = _prompts((3, 8))
    results = hf_attn_plugin.generate_batch(ours, prompts, _config(1), engine="plugin")
    assert _tokens(results) == _eager(eager, prompts, 1)
    assert E.cached_engine(ours).stats["decode_steps"] == 0


def test_admission_and_page_reuse():
    """Three slots and 9 usable pages for seven requests: at most three run at once, pages are handed out again after
    requests finish (more pages released than exist), and all of them are back in the pool at the end."""
    ours, eager = make_pair(_family("llama"))
    prompts = _prompts()
    results = hf_attn_plugin.generate_batch(ours, prompts, _config(10), engine="plugin", engine_config=SMALL)
    assert _tokens(results) == _eager(eager, prompts, 10)
    eng = E.cached_engine(ours)
    assert eng.stats["max_running"] == 3
    assert eng.stats["pages_released"] > eng.usable_pages
    assert eng.pool.num_free_pages == eng.usable_pages  # only the scratch page is held
    assert eng.pool.seq_ids == [eng.scratch_sid]
    eng.pool.check_invariants()


def test_pages_bound_admission():
    """Requests whose worst case (prompt + max_new_tokens) cannot all be promised wait: with pages for one request at
    a time, one runs at a time even though slots are free."""
    ours, eager = make_pair(_family("llama"))
    prompts = _prompts((20, 25, 18))
    config = E.EngineConfig(max_batch_size=4, num_pages=4, page_size=16)  # 3 usable; each request needs 2
    results = hf_attn_plugin.generate_batch(ours, prompts, _config(8), engine="plugin", engine_config=config)
    assert _tokens(results) == _eager(eager, prompts, 8)
    assert E.cached_engine(ours).stats["max_running"] == 1


def test_engine_is_reused_and_rebuilt():
    """A second call with the same config reuses the engine (pool, graphs); another config builds a new one."""
    ours, eager = make_pair(_family("llama"))
    prompts = _prompts((5, 7))
    hf_attn_plugin.generate_batch(ours, prompts, _config(3), engine="plugin")
    first = E.cached_engine(ours)
    results = hf_attn_plugin.generate_batch(ours, prompts[::-1], _config(3), engine="plugin")
    assert E.cached_engine(ours) is first
    assert _tokens(results) == _eager(eager, prompts[::-1], 3)
    hf_attn_plugin.generate_batch(ours, prompts, _config(3), engine="plugin", engine_config=E.EngineConfig(page_size=8))
    assert E.cached_engine(ours) is not first and E.cached_engine(ours).pool.page_size == 8
    E.release_engine(ours)
    assert E.cached_engine(ours) is None


def test_engine_built_under_inference_mode_serves_later_calls():
    """A first call inside torch.inference_mode (common around serving) must not leave the cached engine's pages as
    inference tensors that a later call outside it cannot write."""
    ours, eager = make_pair(_family("llama"))
    prompts = _prompts((5, 7))
    with torch.inference_mode():
        inside = hf_attn_plugin.generate_batch(ours, prompts, _config(4), engine="plugin")
    outside = hf_attn_plugin.generate_batch(ours, prompts, _config(4), engine="plugin")
    assert _tokens(inside) == _tokens(outside) == _eager(eager, prompts, 4)


def test_cached_engine_does_not_keep_the_model_alive():
    import gc
    import weakref

    ours, _ = make_pair(_family("llama"))
    hf_attn_plugin.generate_batch(ours, _prompts((3,)), _config(2), engine="plugin")
    model = weakref.ref(ours)
    del ours
    gc.collect()
    assert model() is None and not E._ENGINES


def test_auto_picks_our_engine_for_greedy_calls(monkeypatch):
    ours, eager = make_pair(_family("llama"))
    prompts = _prompts((5, 7))
    results = hf_attn_plugin.generate_batch(ours, prompts, _config(4))
    assert E.cached_engine(ours) is not None
    assert _tokens(results) == _eager(eager, prompts, 4)


def _forbid_our_engine(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("our engine ran a call it does not support")

    monkeypatch.setattr(E.Engine, "generate", refuse)


@pytest.mark.parametrize(("options", "reason"), [
    (dict(suppress_tokens=[44, 5, 83]), "SuppressTokensLogitsProcessor"),
    (dict(continuous_batching_config=transformers.ContinuousBatchingConfig(max_batch_tokens=64)),
     "continuous_batching_config"),
])
def test_fallback_to_transformers_engine_keeps_outputs_correct(options, reason, monkeypatch, caplog):
    """Options our engine does not implement run on transformers' engine (never ignored): eager's tokens under the
    same option, and the reason in a DEBUG log line."""
    _forbid_our_engine(monkeypatch)
    ours, eager = make_pair(_family("llama"))
    prompts = _prompts((5, 9, 3))
    options = dict(options)
    gen_options = {k: options.pop(k) for k in list(options) if k != "continuous_batching_config"}
    with caplog.at_level(logging.DEBUG, logger=E.__name__):
        results = hf_attn_plugin.generate_batch(ours, prompts, _config(6, **gen_options), **options)
    assert _tokens(results) == _eager(eager, prompts, 6, **gen_options)
    if gen_options:
        assert _tokens(results) != _eager(eager, prompts, 6)  # the option matters here
    assert any("transformers' engine" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_fallback_is_transformers_engine_as_is(monkeypatch):
    """A processor transformers' engine itself drops (repetition penalty, with its own warning) is not silently
    dropped by ours: the call runs there and returns exactly what engine='transformers' returns."""
    ours, _ = make_pair(_family("llama"))
    prompts = _prompts((5, 9, 3))
    expected = _tokens(hf_attn_plugin.generate_batch(ours, prompts, _config(6, repetition_penalty=1.3),
                                                     engine="transformers"))
    _forbid_our_engine(monkeypatch)
    assert _tokens(hf_attn_plugin.generate_batch(ours, prompts, _config(6, repetition_penalty=1.3))) == expected


def _sampling(new_tokens=6, **fields):
    return transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=True, eos_token_id=-1, pad_token_id=0,
                                         **fields)


def test_sampling_with_top_k_1_is_greedy():
    """do_sample=True runs on our engine (temperature / top-k / top-p, then multinomial): with top_k=1 it must give
    eager's greedy tokens, prefill and decode steps alike."""
    ours, eager = make_pair(_family("llama"))
    prompts = _prompts()
    config = _sampling(8, top_k=1, temperature=0.7)
    assert E.unsupported(ours, config) is None
    results = hf_attn_plugin.generate_batch(ours, prompts, config, engine_config=SMALL)
    assert E.cached_engine(ours) is not None
    assert _tokens(results) == _eager(eager, prompts, 8)


def test_sampling_is_seeded_and_stays_in_top_k():
    """Sampled tokens come from torch's default generator (a seed reproduces a call), the first one of each request
    among the 3 most likely tokens after its prompt (top_k=3), and a hot temperature leaves the greedy path."""
    ours, eager = make_pair(_family("llama"))
    prompts = _prompts()
    config = _sampling(8, top_k=3, temperature=5.0)
    torch.manual_seed(11)
    first = _tokens(hf_attn_plugin.generate_batch(ours, prompts, config, engine="plugin"))
    torch.manual_seed(11)
    assert _tokens(hf_attn_plugin.generate_batch(ours, prompts, config, engine="plugin")) == first
    for prompt, tokens in zip(prompts, first):
        with torch.no_grad():
            logits = eager(torch.tensor([prompt])).logits[0, -1]
        assert tokens[0] in logits.topk(3).indices.tolist()
    assert first != _eager(eager, prompts, 8)


def test_sampling_with_another_processor_falls_back(monkeypatch):
    _forbid_our_engine(monkeypatch)
    ours, _ = make_pair(_family("llama"))
    config = _sampling(4, top_k=5, min_p=0.1)
    assert "MinPLogitsWarper" in E.unsupported(ours, config)
    results = hf_attn_plugin.generate_batch(ours, _prompts((5, 9)), config)
    assert [len(t) for t in _tokens(results)] == [4, 4]
    with pytest.raises(NotImplementedError, match="MinPLogitsWarper"):
        hf_attn_plugin.generate_batch(ours, _prompts((5, 9)), config, engine="plugin")


def test_sliding_window_models():
    """Sliding-window layers: transformers' engine by default (window-bounded KV memory there); ours on request,
    whole history kept and the window applied by the kernel: eager's tokens."""
    ours, eager = make_pair(DECODERS["mistral"]())
    assert E.unsupported(ours, _config()).startswith("sliding-window")
    prompts = _prompts((9, 5, 12))
    results = hf_attn_plugin.generate_batch(ours, prompts, _config(8), engine="plugin")
    assert _tokens(results) == _eager(eager, prompts, 8)


def test_explicit_engine_refuses_what_it_cannot_do():
    ours, _ = make_pair(_family("llama"))
    with pytest.raises(NotImplementedError, match="repetition_penalty|RepetitionPenalty.*engine='transformers'"):
        hf_attn_plugin.generate_batch(ours, [[1, 2]], _config(2, repetition_penalty=1.2), engine="plugin")
    with pytest.raises(NotImplementedError, match="record_timestamps"):
        hf_attn_plugin.generate_batch(ours, [[1, 2]], _config(2), engine="plugin", record_timestamps=True)


def test_errors():
    ours, eager = make_pair(_family("llama"))
    with pytest.raises(ValueError, match=r"req_1 needs 40 tokens \(30 prompt \+ max_new_tokens=10.*EngineConfig"):
        hf_attn_plugin.generate_batch(ours, _prompts((3, 30)), _config(10), engine="plugin",
                                      engine_config=E.EngineConfig(max_seq_len=32))
    with pytest.raises(ValueError, match="req_0 needs .* 3 pages"):
        hf_attn_plugin.generate_batch(ours, _prompts((40,)), _config(8), engine="plugin",
                                      engine_config=E.EngineConfig(num_pages=3))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        hf_attn_plugin.generate_batch(ours, [[1, 2], []], _config(2))
    with pytest.raises(TypeError, match="list of prompts"):
        hf_attn_plugin.generate_batch(ours, torch.tensor([[1, 2]]), _config(2))
    assert hf_attn_plugin.generate_batch(ours, [], _config(2)) == {}
    with pytest.raises(ValueError, match="attn_implementation='plugin', got 'eager'"):
        hf_attn_plugin.generate_batch(eager, [[1, 2]], _config(2))
    with pytest.raises(ValueError, match="engine must be one of"):
        hf_attn_plugin.generate_batch(ours, [[1, 2]], _config(2), engine="vllm")
    with pytest.raises(ValueError, match="engine_config sizes our engine"):
        hf_attn_plugin.generate_batch(ours, [[1, 2]], _config(2), engine="transformers",
                                      engine_config=E.EngineConfig())
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        E.EngineConfig(page_size=12)
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer"):
        E.EngineConfig(max_batch_size=0)


def test_progress_bar(capsys):
    ours, _ = make_pair(_family("llama"))
    hf_attn_plugin.generate_batch(ours, _prompts((3, 4)), _config(2), engine="plugin", progress_bar=True)
    assert "Solving 2 requests" in capsys.readouterr().err
    hf_attn_plugin.generate_batch(ours, _prompts((3, 4)), _config(2), engine="plugin")  # 5.24's default: no bar
    assert "Solving" not in capsys.readouterr().err


def test_failed_call_returns_its_pages(monkeypatch):
    """An error in the middle of a call (here the 3rd decode step) propagates, and the cached engine's pool gets every
    page back: the next call runs on it."""
    ours, eager = make_pair(_family("llama"))
    prompts = _prompts()
    real, calls = E.Engine._decode, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(self, *args)

    monkeypatch.setattr(E.Engine, "_decode", failing)
    with pytest.raises(RuntimeError, match="boom"):
        hf_attn_plugin.generate_batch(ours, prompts, _config(6), engine="plugin", engine_config=SMALL)
    eng = E.cached_engine(ours)
    assert eng.pool.seq_ids == [eng.scratch_sid] and eng.pool.num_free_pages == eng.usable_pages
    eng.pool.check_invariants()
    results = hf_attn_plugin.generate_batch(ours, prompts, _config(6), engine="plugin", engine_config=SMALL)
    assert E.cached_engine(ours) is eng
    assert _tokens(results) == _eager(eager, prompts, 6)


def test_buckets():
    assert E._buckets(1) == [1]
    assert E._buckets(6) == [1, 2, 4, 6]
    assert E._buckets(8) == [1, 2, 4, 8]


class _FakeGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on the CPU: "capturing" records the step, a replay runs it again and
    writes into the output tensor of the capture (a graph's static output), reading the static input buffers."""

    capturing = None

    def __init__(self):
        self.step, self.out = None, None

    def replay(self):
        for static, fresh in zip(self.out, self.step()):
            static.copy_(fresh)


def test_graph_bookkeeping_on_cpu(monkeypatch):
    """The CUDA-graph branch of the loop with a stand-in graph (CPU): every bucket captured once at warm-up, every
    decode step a replay of its bucket reading the refilled static buffers, eager's tokens."""
    import contextlib

    real_step = E.Engine._decode_step

    def decode_step(self, bucket):
        out = real_step(self, bucket)
        graph = _FakeGraph.capturing
        if graph is not None:
            graph.step, graph.out = (lambda: real_step(self, bucket)), out
        return out

    @contextlib.contextmanager
    def capture(graph):
        _FakeGraph.capturing = graph
        try:
            yield
        finally:
            _FakeGraph.capturing = None

    class Event:
        def __init__(self, **kwargs):
            pass

        def record(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    monkeypatch.setattr(E.Engine, "_decode_step", decode_step)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    ours, eager = make_pair(_family("llama"))
    config = E.EngineConfig(max_batch_size=5, num_pages=40)
    eng = E._ENGINES[ours] = E.Engine(ours, config, 64)
    eng.use_graphs, eng._events = True, (Event(), Event())
    prompts = _prompts()
    results = hf_attn_plugin.generate_batch(ours, prompts, _config(9), engine="plugin", engine_config=config)
    assert E.cached_engine(ours) is eng
    assert sorted(eng.graphs) == eng.buckets == [1, 2, 4, 5]
    assert eng.stats["graph_replays"] == eng.stats["decode_steps"] > 0
    assert _tokens(results) == _eager(eager, prompts, 9)
    assert eng.busy_fraction() > 0


# --------------------------------------------------------------------------- GPU: CUDA graphs
def _gpu_model(family: str, dtype):
    config = _family(family, num_hidden_layers=3)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="plugin",
                                                          dtype=dtype)
    return model.cuda().eval()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graphed_engine_matches_transformers_engine_gpu(family, dtype):
    """CUDA-graphed decode steps (every bucket captured, replays counted) give the tokens of transformers' engine
    with our attention: all of them in fp32. In bf16, where other batch shapes round differently and one flipped
    token changes the rest of a request, exactly those of our engine without graphs (same kernels, same shapes),
    and the first token (one prefill forward) of transformers' engine for at least 2/3 of the requests (garbage
    from a stale graph buffer would agree on about 1/128)."""
    model = _gpu_model(family, dtype)
    prompts = _prompts(tuple(range(3, 120, 7)), seed=5)  # 17 requests
    config = E.EngineConfig(max_batch_size=8, num_pages=64)  # admission in waves
    mine = hf_attn_plugin.generate_batch(model, prompts, _config(24), engine="plugin", engine_config=config)
    eng = E.cached_engine(model)
    assert eng.use_graphs and sorted(eng.graphs) == eng.buckets
    assert eng.stats["graph_replays"] == eng.stats["decode_steps"] > 0
    assert 0 < eng.busy_fraction() <= 1
    eng.pool.check_invariants()
    theirs = hf_attn_plugin.generate_batch(model, prompts, _config(24), engine="transformers")
    if dtype == torch.float32:
        assert _tokens(mine) == _tokens(theirs)
    else:
        first = sum(a[0] == b[0] for a, b in zip(_tokens(mine), _tokens(theirs)))
        assert first >= 2 * len(prompts) // 3
        eager_steps = hf_attn_plugin.generate_batch(model, prompts, _config(24), engine="plugin",
                                                    engine_config=E.EngineConfig(max_batch_size=8, num_pages=64,
                                                                                 cuda_graphs=False))
        assert E.cached_engine(model).stats["graph_replays"] == 0
        assert _tokens(eager_steps) == _tokens(mine)


@pytest.mark.gpu
def test_sliding_window_model_in_graphs_gpu():
    """engine='plugin' on a sliding-window model (Mistral, window 32 over prompts up to 90 tokens): the window is a
    kernel parameter inside the captured graphs; eager's greedy tokens per request (fp32)."""
    config = DECODERS["mistral"]()
    config.sliding_window = 32
    ours, eager = (m.cuda() for m in make_pair(config))
    prompts = _prompts((20, 70, 33, 90, 5), seed=7)
    results = hf_attn_plugin.generate_batch(ours, prompts, _config(40), engine="plugin",
                                            engine_config=E.EngineConfig(max_batch_size=4))
    assert E.cached_engine(ours).stats["graph_replays"] > 0
    assert _tokens(results) == _eager(eager, prompts, 40)


@pytest.mark.gpu
def test_sampling_reads_the_graphs_logits_gpu():
    """do_sample=True samples from the logits the graphs leave in their static outputs: with top_k=1 the greedy run's
    tokens (fp32: no ties), every decode step a replay."""
    model = _gpu_model("llama", torch.float32)
    prompts = _prompts(tuple(range(3, 60, 7)), seed=6)
    config = E.EngineConfig(max_batch_size=4, num_pages=48)
    greedy = hf_attn_plugin.generate_batch(model, prompts, _config(16), engine="plugin", engine_config=config)
    sampled = hf_attn_plugin.generate_batch(model, prompts, _sampling(16, top_k=1), engine="plugin",
                                            engine_config=config)
    stats = E.cached_engine(model).stats
    assert stats["graph_replays"] == stats["decode_steps"] > 0
    assert _tokens(sampled) == _tokens(greedy)
