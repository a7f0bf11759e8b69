"""Launch configs (kernels/configs.py): lookup order, opt-in tuning and its persistence, the switches; CPU tests
mock the benchmark (``do_bench`` returns what ``launch`` returns: the "time" of each candidate). The GPU tests run
every config of the shipped tables (and every paged candidate) through its kernel against the oracles."""

from __future__ import annotations

import json

import pytest
import torch
import triton
import triton.testing

from hf_attn_plugin.kernels import configs
from hf_attn_plugin.kernels.configs import Config, Key, Table

from .helpers import DEVICE, load_file, needs_kernels

C_DEFAULT = configs._GPU[("fwd", 128)][0]
C_A = Config(128, 128, 8, 3)
C_B = Config(128, 128, 4, 2, warp_spec=True)
C_W = Config(128, 32, 4, 4)


class PTXASError(RuntimeError):  # what triton.runtime.errors raises when ptxas fails on a candidate
    pass


def fwd_key(seq=2048, group=4, dtype=torch.bfloat16, causal=True, **features):
    """Keyword key as the flash kernels pass it (raw lengths)."""
    return dict(dtype=dtype, causal=causal, seq_q=seq, seq_k=seq, group=group, **features)


def K(seq=2048, group=4, **kw):
    return Key.make("fwd", 128, **fwd_key(seq, group, **kw))


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A pretend sm90 GPU named "Test GPU 80GB" with a table of our own, a private cache dir, tuning off."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "gpu_arch", lambda: "sm90")
    monkeypatch.setattr(configs, "_gpu_name", lambda: "Test GPU 80GB")
    monkeypatch.setattr(configs.torch.cuda, "is_current_stream_capturing", lambda: False)
    for name in ("HF_ATTN_PLUGIN_AUTOTUNE", "HF_ATTN_PLUGIN_TUNE_CACHE", "HF_ATTN_PLUGIN_VERBOSE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    tables = tmp_path / "tuned"
    tables.mkdir()
    table = Table({K(16384): C_A, K(1024): C_B, K(4096, window=True): C_W}, {"source": "test"})
    (tables / "sm90.json").write_text(configs.dumps_table(table.to_json()))
    monkeypatch.setattr(configs, "_TABLE_DIR", tables)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: fn())
    configs.clear_cache()
    yield tmp_path
    configs.clear_cache()


def timed(times, calls=None):
    """A launch whose "time" is ``times[cfg]`` (slow for unlisted candidates); records the configs launched."""

    def launch(cfg):
        if calls is not None:
            calls.append(cfg)
        return times.get(cfg, 10.0)

    return launch


def no_launch(cfg):
    pytest.fail(f"tuned ({cfg}) where no tuning may happen")


# ------------------------------------------------------------------------------------------- keys and tables
def test_key_buckets_lengths_dtypes_and_group():
    assert K(16).seq_q == configs.SHORT_Q == K(1).seq_q  # decode and short calls: one bucket, never tuned
    short = dict(fwd_key(), seq_q=1)
    assert Key.make("fwd", 128, **dict(short, seq_k=100)) == Key.make("fwd", 128, **dict(short, seq_k=30000))
    assert K(17).seq_q == 128 and K(3000).seq_q == 4096 and K(10**6).seq_q == 32768
    assert K(group=3).group == 4 and K(group=16).group == 8 and K(group=1).group == 1
    assert K(dtype=torch.float16) == K(dtype=torch.bfloat16) != K(dtype=torch.float32)
    assert Key.make("fwd", 32, **fwd_key()).dim == 64 and Key.make("fwd", 256, **fwd_key()).dim == 256
    assert K(window=True, sinks=True).features == ("window", "sinks") and K(window=True).plain() == K()
    with pytest.raises(TypeError, match="unknown launch-config key features"):
        Key.make("fwd", 128, **fwd_key(), alibi=True)


def test_config_and_table_round_trip_by_value():
    cfg = Config(64, 128, 4, 2, warp_spec=True)
    assert cfg.to_json() == {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 2, "warp_spec": True}
    assert Config.from_json(cfg.to_json()) == cfg
    paged = Config(16, 64, 4, 2, min_split_keys=48)
    assert Config.from_json(paged.to_json()) == paged and paged.to_json()["min_split_keys"] == 48
    table = Table({K(): cfg, K(512, window=True): paged}, {"source": "x"})
    again = Table.from_json(json.loads(configs.dumps_table(table.to_json())))
    assert again.entries == table.entries and again.meta["source"] == "x"
    with pytest.raises(ValueError, match="unknown launch-config fields"):
        Config.from_json({"block_m": 1, "block_n": 1, "num_warps": 1, "num_stages": 1, "blockm": 2})
    with pytest.raises(ValueError, match="format"):
        Table.from_json({"format": 99, "entries": []})


def test_table_lookup_exact_then_nearest_then_plain():
    table = Table({K(16384): C_A, K(1024): C_B, K(1024, group=1): C_W, K(4096, window=True): C_DEFAULT})
    assert table.lookup(K(16384)) == (C_A, "exact")
    assert table.lookup(K(12000)) == (C_A, "exact")  # bucket 16384
    assert table.lookup(K(6000)) == (C_A, "nearest")  # bucket 8192: 1 octave from 16k, 3 from 1k
    assert table.lookup(K(2048)) == (C_B, "nearest")  # 1 octave from 1k, 3 from 16k
    assert table.lookup(K(1024, group=8)) == (C_B, "nearest")  # group 4 is 1 octave away, group 1 three
    assert table.lookup(K(1024, group=2)) == (C_W, "nearest")  # a tie (1 octave each): the smaller group
    assert table.lookup(K(1024, group=1)) == (C_W, "exact")
    assert table.lookup(K(8192, window=True)) == (C_DEFAULT, "nearest")  # same features first
    assert table.lookup(K(8192, softcap=True)) == (C_A, "plain")  # no softcap entry: the plain family
    assert table.lookup(K(dtype=torch.float32)) is None  # fp32 never takes a 16-bit entry
    assert table.lookup(K(causal=False)) is None
    assert table.lookup(Key.make("bwd_dq", 128, **fwd_key())) is None
    # short calls borrow only from short-call entries: none here
    assert table.lookup(Key.make("fwd", 128, **dict(fwd_key(), seq_q=1, seq_k=16384))) is None
    decode = Key.make("fwd", 128, **dict(fwd_key(), seq_q=1, seq_k=100))
    table.entries[decode] = C_W
    assert table.lookup(Key.make("fwd", 128, **dict(fwd_key(), seq_q=16, seq_k=30000))) == (C_W, "exact")
    assert table.lookup(K(128)) == (C_B, "nearest")  # and long calls never take a short-call entry


def test_pick_order_user_then_table_then_default(gpu):
    assert configs.pick("fwd", 128, fwd_key(16384), no_launch) == C_A  # exact
    assert configs.pick("fwd", 128, fwd_key(700), no_launch) == C_B  # nearest (1k)
    assert configs.pick("fwd", 128, fwd_key(3000, window=True), no_launch) == C_W  # nearest of the window entries
    assert configs.pick("fwd", 128, fwd_key(3000, sinks=True, softcap=True), no_launch) == C_B  # plain, nearest
    assert configs.pick("fwd", 128, fwd_key(dtype=torch.float32), no_launch) == C_DEFAULT  # no fp32 entry
    assert configs.pick("bwd_dq", 128, fwd_key(), no_launch) == configs._GPU[("bwd_dq", 128)][0]
    # a persisted result for the exact key wins over the table
    path = configs.user_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(configs.dumps_table(Table({K(700): C_W}).to_json()))
    configs.clear_cache()
    assert configs.pick("fwd", 128, fwd_key(700), no_launch) == C_W
    assert configs.pick("fwd", 128, fwd_key(16384), no_launch) == C_A


def test_without_a_table_the_default_and_no_tuning(gpu, monkeypatch):
    monkeypatch.setattr(configs, "gpu_arch", lambda: "sm120")  # no table shipped for it
    assert configs.pick("fwd", 128, fwd_key(16384), no_launch) == C_DEFAULT
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "0")
    assert configs.pick("fwd", 128, fwd_key(300), no_launch) == C_DEFAULT


def test_autotune_opt_in_tunes_once_and_persists(gpu, monkeypatch):
    """HF_ATTN_PLUGIN_AUTOTUNE=1: a key the tables miss is tuned, saved, and a new process reuses it untuned."""
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "1")
    fastest = configs._GPU[("fwd", 128)][2]
    calls = []
    assert configs.pick("fwd", 128, fwd_key(3000), timed({fastest: 1.0}, calls)) == fastest
    assert set(calls) == set(configs._GPU[("fwd", 128)])  # every candidate launched
    assert configs.pick("fwd", 128, fwd_key(3100), no_launch) == fastest  # same bucket: process cache
    path = configs.user_cache_path()
    assert path.parent == gpu / "xdg" / "hf_attn_plugin"
    assert "Test-GPU-80GB" in path.name and f"triton-{triton.__version__}" in path.name
    assert f"hf_attn_plugin-{configs._package_version()}" in path.name
    saved = Table.from_json(json.loads(path.read_text()))
    assert saved.entries == {K(3000): fastest} and saved.meta["gpu"] == "Test GPU 80GB"
    # a new process without tuning: the persisted result, no benchmark
    configs.clear_cache()
    monkeypatch.delenv("HF_ATTN_PLUGIN_AUTOTUNE")
    assert configs.pick("fwd", 128, fwd_key(3000), no_launch) == fastest
    # a second tuned key is added to the same file (read again first: another process may have written)
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "1")
    configs.pick("bwd_dq", 128, fwd_key(3000), timed({}))
    assert set(Table.from_json(json.loads(path.read_text())).entries) == {K(3000), Key.make("bwd_dq", 128,
                                                                                              **fwd_key(3000))}


def test_autotune_leaves_exact_table_entries_alone(gpu, monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "1")
    assert configs.pick("fwd", 128, fwd_key(16384), no_launch) == C_A
    calls = []
    configs.pick("fwd", 128, fwd_key(8192), timed({}, calls))  # only "nearest": tuned
    assert calls


@pytest.mark.parametrize("q_len", [1, 7, 16])
def test_short_queries_never_tune(gpu, monkeypatch, q_len):
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "1")
    key = dict(fwd_key(), seq_q=q_len, seq_k=5000)
    assert configs.pick("fwd", 128, key, no_launch) == C_DEFAULT  # the table has no short-call entry
    assert not configs.user_cache_path().exists()
    calls = []
    configs.pick("fwd", 128, dict(key, seq_q=17), timed({}, calls))  # 17 rows: tuned
    assert calls


def test_capture_never_tunes_and_does_not_cache(gpu, monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "1")
    monkeypatch.setattr(configs.torch.cuda, "is_current_stream_capturing", lambda: True)
    assert configs.pick("fwd", 128, fwd_key(3000), no_launch) == C_B  # the lookup (nearest: 1k)
    monkeypatch.setattr(configs.torch.cuda, "is_current_stream_capturing", lambda: False)
    fastest = configs._GPU[("fwd", 128)][3]
    assert configs.pick("fwd", 128, fwd_key(3000), timed({fastest: 0.5})) == fastest  # tuned after the capture


def test_persistence_switch(gpu, monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "1")
    monkeypatch.setenv("HF_ATTN_PLUGIN_TUNE_CACHE", "0")
    fastest = configs._GPU[("fwd", 128)][1]
    assert configs.pick("fwd", 128, fwd_key(3000), timed({fastest: 0.5})) == fastest
    assert not (gpu / "xdg").exists()  # nothing written
    # and nothing read: a persisted result is ignored while the switch is off
    monkeypatch.delenv("HF_ATTN_PLUGIN_TUNE_CACHE")
    path = configs.user_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(configs.dumps_table(Table({K(300): C_W}).to_json()))
    monkeypatch.setenv("HF_ATTN_PLUGIN_TUNE_CACHE", "0")
    monkeypatch.delenv("HF_ATTN_PLUGIN_AUTOTUNE")
    configs.clear_cache()
    assert configs.pick("fwd", 128, fwd_key(300), no_launch) == C_B


def test_cache_file_is_keyed_by_gpu_triton_and_package(gpu, monkeypatch):
    first = configs.user_cache_path()
    monkeypatch.setattr(configs, "_gpu_name", lambda: "Other GPU")
    assert configs.user_cache_path() != first
    monkeypatch.setattr(configs, "_package_version", lambda: "9.9.9")
    assert "9.9.9" in configs.user_cache_path().name
    monkeypatch.setattr(triton, "__version__", "0.0.1")
    assert "triton-0.0.1" in configs.user_cache_path().name
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(gpu / "home"))
    assert configs.cache_dir() == gpu / "home" / ".cache" / "hf_attn_plugin"


def test_corrupt_user_file_is_ignored_with_a_warning(gpu):
    path = configs.user_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="ignoring the tuning results"):
        assert configs.pick("fwd", 128, fwd_key(16384), no_launch) == C_A


def test_bad_switch_values_are_refused(gpu, monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="HF_ATTN_PLUGIN_AUTOTUNE='yes': expected 0 or 1"):
        configs.pick("fwd", 128, fwd_key(3000), timed({}))


def test_pick_skips_candidates_the_compiler_rejects(gpu, monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "1")
    options = configs.candidates("fwd", 128)
    broken, fastest = options[1], options[2]

    def launch(cfg):
        if cfg == broken:
            raise PTXASError("ptxas failed with error code -11")
        return 1.0 if cfg == fastest else 2.0

    assert configs.pick("fwd", 128, fwd_key(3000), launch) == fastest


def test_pick_raises_real_errors(gpu, monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "1")

    def launch(cfg):
        raise ValueError("a bug, not an unusable tile shape")

    with pytest.raises(ValueError, match="a bug"):
        configs.pick("fwd", 128, fwd_key(3000), launch)


class OutOfResources(RuntimeError):  # what Triton raises at launch when a config needs more shared memory than the GPU has
    pass


def test_float32_at_the_256_bucket_starts_from_a_tile_that_fits(gpu):
    """float32 inputs at head dims padded to 256 overflowed shared memory with the lists' defaults (seen on the H200:
    294944 > 232448 bytes), and launch_fitting compiled and rejected the float32 tiles one by one: the GPU tests of
    fp32 at D 160/192 never finished within 240 s (sessions 6-7). float32 keys there now start from the small tile;
    16-bit keys keep the list's default."""
    for kind in ("fwd", "bwd_dq", "bwd_dkdv"):
        options = configs.candidates(kind, 256)
        fp32 = configs.pick(kind, 256, fwd_key(600, dtype=torch.float32))
        assert fp32 in options and fp32 != options[0] and fp32.num_stages == 1
        assert configs.pick(kind, 256, fwd_key(600, dtype=torch.bfloat16)) == options[0]
        assert configs.pick(kind, 128, fwd_key(600, dtype=torch.float32)) == configs.candidates(kind, 128)[0]


def test_launch_fitting_replaces_a_config_the_gpu_cannot_hold(gpu):
    """A config the GPU rejects for its resources: the next candidate that runs is used and remembered for the key."""
    key = fwd_key(600, dtype=torch.float32)
    picked = configs.candidates("fwd", 256)[0]
    ran = []

    def launch(cfg):
        if cfg == picked:
            raise OutOfResources("out of resource: shared memory, Required: 294944, Hardware limit: 232448")
        ran.append(cfg)
        return "ran"

    assert configs.launch_fitting("fwd", 256, key, picked, launch) == "ran"
    assert ran == [configs.candidates("fwd", 256)[1]]
    assert configs.pick("fwd", 256, key) == ran[0]  # remembered: later calls go straight to it


def test_launch_fitting_raises_real_errors_and_gives_up_when_nothing_fits(gpu):
    key = fwd_key(600, dtype=torch.float32)

    def bug(cfg):
        raise ValueError("a bug, not an unusable tile shape")

    with pytest.raises(ValueError, match="a bug"):
        configs.launch_fitting("fwd", 256, key, configs.pick("fwd", 256, key), bug)

    def nothing_fits(cfg):
        raise OutOfResources("out of resource: shared memory")

    with pytest.raises(OutOfResources):
        configs.launch_fitting("fwd", 256, key, configs.pick("fwd", 256, key), nothing_fits)


def test_interpreter_uses_fixed_small_configs(monkeypatch):
    monkeypatch.setattr(configs, "interpreting", lambda: True)
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "1")
    for kind in ("fwd", "bwd_dq", "bwd_dkdv", "paged_decode", "paged_prefill"):
        assert configs.pick(kind, 128, fwd_key(16384), no_launch) == configs._INTERPRET[kind]


@needs_kernels
def test_paged_kernels_take_their_config_from_the_config_system(monkeypatch):
    """paged_attention asks configs.pick (kind by decode/prefill, head-dim bucket, lengths, group) and runs with
    the answer: its rows give the prefill tokens per program (block_m // padded group)."""
    from hf_attn_plugin.kernels import paged

    dev = DEVICE
    asked = []
    real = configs.pick

    def spy(kind, block_d, key, launch=None):
        asked.append((kind, block_d, dict(key)))
        return real(kind, block_d, key, launch)

    monkeypatch.setattr(configs, "pick", spy)
    page, hkv, hq, d = 16, 2, 4, 16
    k_pool = torch.randn(8, page, hkv, d, device=dev)
    v_pool = torch.randn_like(k_pool)
    bt = torch.arange(8, device=dev, dtype=torch.int32).view(2, 4)
    seq_lens = torch.tensor([40, 64], device=dev, dtype=torch.int32)
    q = torch.randn(2, hq, d, device=dev)
    paged.paged_attention(q, k_pool, v_pool, bt, seq_lens, None, 1, None, None, 0.25, True, 0, 0.0, 1,
                          return_partials=True)
    cu = torch.tensor([0, 5, 12], device=dev, dtype=torch.int32)
    q = torch.randn(12, hq, d, device=dev)
    paged.paged_attention(q, k_pool, v_pool, bt, seq_lens, cu, 7, None, None, 0.25, True, 8, 0.0, 1,
                          return_partials=True)
    (k1, d1, key1), (k2, _, key2) = asked
    assert (k1, d1, k2) == ("paged_decode", 16, "paged_prefill")
    assert key1["seq_q"] == 1 and key1["seq_k"] == 64 and key1["group"] == 2 and key1["dtype"] == torch.float32
    assert key2["seq_q"] == 7 and key2["window"] and not key1["window"]


def test_shipped_tables_are_valid():
    """Every shipped table loads, says where its numbers come from, and names kernels and head-dim buckets that
    exist (the GPU test below runs each config)."""
    files = sorted(configs._TABLE_DIR.glob("*.json"))
    assert any(f.stem == "sm90" for f in files)
    for f in files:
        data = json.loads(f.read_text())
        table = Table.from_json(data, str(f))
        assert data.get("source") and data.get("arch") == f.stem and len(table) > 0
        for key in table.entries:
            assert (key.kind, key.dim) in configs._GPU and key.dtype in ("16bit", "fp32"), key
        for key, cfg in table.entries.items():  # Gluon forwards: plain 16-bit keys, each with a Triton fallback
            if cfg.gluon >= 0:
                assert cfg in configs._GPU[(key.kind, key.dim)] and not key.features and key.dtype == "16bit", key
                assert key in table.fallbacks, f"{f}: Gluon entry {key.to_json()} without a Triton fallback"


# ------------------------------------------------------------------------------------------- Gluon forward configs
G3 = Config(128, 128, 4, 2, gluon=3)  # a Gluon forward variant (D=128)


def test_gluon_configs_round_trip_and_refuse_nonsense():
    assert G3.to_json() == {"block_m": 128, "block_n": 128, "num_warps": 4, "num_stages": 2, "gluon": 3}
    assert Config.from_json(G3.to_json()) == G3 and "gluon" not in C_A.to_json() and C_A.gluon == -1
    with pytest.raises(ValueError, match="Gluon forward variant"):
        Config(128, 128, 4, 2, gluon=4)
    with pytest.raises(ValueError, match="leave warp_spec False"):
        Config(128, 128, 4, 2, True, gluon=1)
    # an entry naming a Gluon variant carries its Triton fallback through the JSON
    table = Table({K(): G3, K(16384): C_A}, {"source": "x"}, {K(): C_B})
    data = json.loads(configs.dumps_table(table.to_json({K(): {"evidence": "e"}})))
    row = next(r for r in data["entries"] if "fallback" in r)
    assert row["config"]["gluon"] == 3 and row["fallback"] == C_B.to_json() and row["evidence"] == "e"
    again = Table.from_json(data)
    assert again.entries == table.entries and again.fallbacks == {K(): C_B}
    for bad in ({K(): G3}, {K(16384): C_B}):  # a Gluon fallback; a fallback of a Triton entry
        entries = {K(): G3, K(16384): C_A}
        with pytest.raises(ValueError, match="fallback"):
            Table(entries, fallbacks=bad)
        rows = Table(entries).to_json()
        for r in rows["entries"]:
            fb = bad.get(Key.from_json(r["key"]))
            if fb is not None:
                r["fallback"] = fb.to_json()
        with pytest.raises(ValueError, match="sm90.json: fallback"):
            Table.from_json(rows, "sm90.json")


def test_gluon_candidates_follow_the_triton_ones_and_never_default(monkeypatch):
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    for (kind, dim), options in configs._GPU.items():
        assert options[0].gluon == -1, (kind, dim)  # the default runs everywhere
        variants = [c.gluon for c in options if c.gluon >= 0]
        if kind in ("fwd", "bwd_dkdv") and dim in (64, 128):
            assert variants == (list(configs.GLUON_VARIANTS) if kind == "fwd" else [0, 1, 2])  # bwd: gluon_bwd.py
            first = next(i for i, c in enumerate(options) if c.gluon >= 0)
            assert all(c.gluon >= 0 for c in options[first:])  # after every Triton candidate
        else:
            assert not variants, (kind, dim)
        assert configs.triton_default(kind, dim) == options[0]
    assert all(c.gluon == -1 for c in configs._INTERPRET.values())


def test_table_lookup_triton_only_uses_the_recorded_fallbacks():
    table = Table({K(16384): G3, K(1024): C_B, K(8192, group=1): G3, K(4096, causal=False): G3},
                  fallbacks={K(16384): C_A})
    assert table.lookup(K(16384)) == (G3, "exact")
    assert table.lookup(K(16384), triton_only=True) == (C_A, "exact")  # the entry's fallback
    assert table.lookup(K(8192), triton_only=True) == (C_A, "nearest")
    assert table.lookup(K(8192, window=True)) == (G3, "plain")  # features borrow the plain entry ...
    assert table.lookup(K(8192, window=True), triton_only=True) == (C_A, "plain")  # ... and its fallback
    # Gluon entries without a fallback are left out of the Triton view: the nearest Triton entry instead
    assert table.lookup(K(8192, group=1)) == (G3, "exact")
    assert table.lookup(K(8192, group=1), triton_only=True) == (C_A, "nearest")
    assert table.lookup(K(4096, causal=False), triton_only=True) is None  # no Triton entry: the caller's default
    assert table.triton_view() == {K(16384): C_A, K(1024): C_B}


def test_pick_triton_only(gpu, monkeypatch):
    """What the flash forward asks when the picked Gluon config cannot run a call: the table's Triton fallback,
    cached apart from the plain pick; only Triton candidates tuned, and that result not persisted."""
    table = Table({K(16384): G3, K(1024): C_B}, {"source": "test"}, {K(16384): C_A})
    (gpu / "tuned" / "sm90.json").write_text(configs.dumps_table(table.to_json()))
    configs.clear_cache()
    assert configs.pick("fwd", 128, fwd_key(16384), no_launch) == G3
    assert configs.pick("fwd", 128, fwd_key(16384), no_launch, triton_only=True) == C_A
    assert configs.pick("fwd", 128, fwd_key(16000), no_launch) == G3  # the plain answer is still cached
    assert configs.pick("fwd", 128, K(16384), no_launch, triton_only=True) == C_A  # a Key as well as raw values
    # a candidate list of Gluon configs only (a test forcing one): the real default
    with monkeypatch.context() as m:
        m.setattr(configs, "candidates", lambda kind, block_d: (G3,))
        assert configs.pick("fwd", 96, fwd_key(300), no_launch) == G3
        assert configs.pick("fwd", 96, fwd_key(300), no_launch, triton_only=True) == C_DEFAULT
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "1")
    calls = []
    fastest = configs._GPU[("fwd", 128)][1]
    gluon_fast = {c: 0.1 for c in configs._GPU[("fwd", 128)] if c.gluon >= 0}
    assert configs.pick("fwd", 128, fwd_key(3000), timed({**gluon_fast, fastest: 1.0}, calls),
                        triton_only=True) == fastest
    assert calls and all(c.gluon < 0 for c in calls)
    assert not configs.user_cache_path().exists()


def test_tuned_gluon_winner_is_persisted_with_its_triton_fallback(gpu, monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "1")
    options = configs._GPU[("fwd", 128)]
    g2 = next(c for c in options if c.gluon == 2)
    triton_best = options[3]
    assert configs.pick("fwd", 128, fwd_key(3000), timed({g2: 0.5, triton_best: 0.8})) == g2
    saved = Table.from_json(json.loads(configs.user_cache_path().read_text()))
    assert saved.entries == {K(3000): g2} and saved.fallbacks == {K(3000): triton_best}
    configs.clear_cache()
    monkeypatch.delenv("HF_ATTN_PLUGIN_AUTOTUNE")
    assert configs.pick("fwd", 128, fwd_key(3000), no_launch) == g2  # user entry
    assert configs.pick("fwd", 128, fwd_key(3000), no_launch, triton_only=True) == triton_best  # its fallback
    # re-tuned to a Triton winner: the stale fallback goes
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "1")
    monkeypatch.setenv("HF_ATTN_PLUGIN_TUNE_CACHE", "1")
    configs._persist(K(3000), triton_best)
    saved = Table.from_json(json.loads(configs.user_cache_path().read_text()))
    assert saved.entries == {K(3000): triton_best} and not saved.fallbacks


def test_gluon_switch(monkeypatch):
    monkeypatch.delenv("HF_ATTN_PLUGIN_GLUON", raising=False)
    assert configs.gluon_enabled()
    monkeypatch.setenv("HF_ATTN_PLUGIN_GLUON", "0")
    assert not configs.gluon_enabled()
    monkeypatch.setenv("HF_ATTN_PLUGIN_GLUON", "off")
    with pytest.raises(ValueError, match="HF_ATTN_PLUGIN_GLUON='off': expected 0 or 1"):
        configs.gluon_enabled()


def test_tune_skips_candidates_the_call_cannot_run(gpu, monkeypatch):
    """A launch raises configs.Unsupported for a Gluon variant it cannot run (flash does for features, other GPUs):
    the tuner skips it like a config the compiler rejects."""
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "1")
    calls = []

    def launch(cfg):
        calls.append(cfg)
        if cfg.gluon >= 0:
            raise configs.Unsupported("the Gluon forward does not support window")
        return 1.0 if cfg == C_W else 2.0

    assert configs.pick("fwd", 128, fwd_key(3000), launch) == C_W
    assert any(c.gluon >= 0 for c in calls)


# ------------------------------------------------------------------------------------------------- GPU
def _shipped_entries():
    if not torch.cuda.is_available():
        return []
    table = configs.shipped_table(configs.gpu_arch())  # the entries' configs, then the Gluon entries' fallbacks
    return sorted([*table.entries.items(), *table.fallbacks.items()], key=lambda kv: configs._sort_key(kv[0]))


@pytest.mark.gpu
def test_gpu_every_shipped_table_config_runs(monkeypatch):
    """Each entry's config (and Triton fallback), forced for its kernel (the others at their defaults), compiles,
    runs and matches the oracles at the entry's head-dim bucket, causality, GQA ratio and features (bf16; fp16
    shares the entries). Gluon configs run the Gluon forward (plain keys: every shipped Gluon entry is one)."""
    from .test_flash_kernels import run_case
    from .test_paged import _check, _random_paged, _sinks

    from hf_attn_plugin.kernels import flash

    entries = _shipped_entries()
    if not entries:
        pytest.skip(f"no table shipped for {configs.gpu_arch()}")
    dtype = torch.bfloat16
    for key, cfg in entries:
        hkv = 2
        hq = hkv * key.group
        feats = dict(window=96 if key.window else 0, softcap=20.0 if key.softcap else 0.0)
        try:
            if key.kind.startswith("paged"):
                lens = [300, 77]
                k_pool, v_pool, bt, seq_lens, _ = _random_paged(lens, hkv, key.dim, 16, dtype)
                sinks = _sinks(hq) if key.sinks else None
                if key.kind == "paged_decode":
                    q = torch.randn(len(lens), hq, key.dim, device="cuda", dtype=dtype)
                    _check(q, k_pool, v_pool, bt, seq_lens, sinks=sinks, causal=key.causal, config=cfg, **feats)
                else:
                    cu = torch.tensor([0, 130, 170], device="cuda", dtype=torch.int32)
                    q = torch.randn(170, hq, key.dim, device="cuda", dtype=dtype)
                    _check(q, k_pool, v_pool, bt, seq_lens, cu=cu, max_q=130, sinks=sinks, causal=key.causal,
                           config=cfg, **feats)
            else:
                def forced(kind, block_d, key=key, cfg=cfg):
                    return (cfg,) if kind == key.kind else configs._GPU[(kind, configs._dim_bucket(block_d))][:1]

                monkeypatch.setattr(configs, "candidates", forced)
                run_case(flash, device="cuda", dtype=dtype, D=key.dim, B=2, Sq=333, Hq=hq, Hkv=hkv,
                         causal=key.causal, sinks=key.sinks, dropout_p=0.1 if key.dropout else 0.0, **feats)
        except Exception as exc:
            pytest.fail(f"shipped entry {key.to_json()} -> {cfg}: {type(exc).__name__}: {exc}")
        finally:
            monkeypatch.undo()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["paged_decode", "paged_prefill"])
def test_gpu_every_paged_candidate_runs(kind):
    from .test_paged import _check, _random_paged

    for (k, dim), options in configs._GPU.items():
        if k != kind:
            continue
        for cfg in options:
            lens = [700, 90]
            k_pool, v_pool, bt, seq_lens, _ = _random_paged(lens, 2, dim, 16, torch.bfloat16)
            try:
                if kind == "paged_decode":
                    q = torch.randn(2, 8, dim, device="cuda", dtype=torch.bfloat16)
                    _check(q, k_pool, v_pool, bt, seq_lens, num_splits=4, config=cfg)
                else:
                    cu = torch.tensor([0, 200, 260], device="cuda", dtype=torch.int32)
                    q = torch.randn(260, 8, dim, device="cuda", dtype=torch.bfloat16)
                    _check(q, k_pool, v_pool, bt, seq_lens, cu=cu, max_q=200, config=cfg)
            except Exception as exc:
                pytest.fail(f"{kind} D={dim} {cfg}: {type(exc).__name__}: {exc}")


def test_tune_tables_writes_a_table_the_lookup_reads(tmp_path):
    """benchmarks/tune_tables.py's output (here from made-up timings) loads as a table with its evidence."""
    tune_tables = load_file("benchmarks/tune_tables.py")
    assert tune_tables.cases([128, 64], [True, False], [4, 1], [16384, 128])[:3] == [
        (128, True, 4, 16384), (128, True, 4, 128), (128, True, 1, 16384)]
    default, other = configs._GPU[("fwd", 128)][:2]
    key = Key.make("fwd", 128, **fwd_key(1024))
    results = {key: ([(other, 0.5), (default, 0.7)], (128, True, 4, 1024)),
               Key.make("bwd_dq", 128, **fwd_key(1024)): ([], (128, True, 4, 1024))}  # nothing usable: left out
    out = tmp_path / "sm90.json"

    class Args:
        pass

    tune_tables.write_table(str(out), results, "sm90", "Test GPU", Args(), 1, 2)
    table = Table.from_json(json.loads(out.read_text()))
    assert table.entries == {key: other} and table.lookup(key) == (other, "exact")
    row = json.loads(out.read_text())["entries"][0]
    assert "0.5000 ms; default 0.7000 ms" in row["evidence"] and "1 of 2 cases" in table.meta["source"]
    # a Gluon winner: the entry records the fastest Triton candidate as its fallback
    g3 = next(c for c in configs._GPU[("fwd", 128)] if c.gluon == 3)
    results = {key: ([(g3, 0.4), (other, 0.5), (default, 0.7)], (128, True, 4, 1024))}
    tune_tables.write_table(str(out), results, "sm90", "Test GPU", Args(), 1, 2)
    table = Table.from_json(json.loads(out.read_text()))
    assert table.entries == {key: g3} and table.fallbacks == {key: other}
    assert table.lookup(key, triton_only=True) == (other, "exact")
    row = json.loads(out.read_text())["entries"][0]
    assert "runner-up " + tune_tables._short(other) in row["evidence"] and "gluon_ws3" in tune_tables._short(g3)
    assert "fallback (best Triton) " + tune_tables._short(other) + " 0.5000 ms" in row["evidence"]


def test_tune_tables_merge_replaces_only_the_tuned_entries(tmp_path, monkeypatch):
    """``tune_tables.py --kinds K --merge``: the shipped table with the run's entries put in (same key replaced, new
    key added), every other entry and its evidence kept, the table valid."""
    tune_tables = load_file("benchmarks/tune_tables.py")
    shipped_dir = tmp_path / "shipped"
    shipped_dir.mkdir()
    old, new, other = Config(64, 32, 8, 2), Config(32, 128, 8, 3, two_pass=True), Config(128, 32, 8, 1)
    kept_key = Key.make("bwd_dq", 256, **fwd_key(1024))
    replaced_key = Key.make("bwd_dkdv", 256, **fwd_key(1024))
    added_key = Key.make("bwd_dkdv", 256, **fwd_key(4096))
    shipped = Table({kept_key: other, replaced_key: old}, {"source": "seed"})
    (shipped_dir / "sm90.json").write_text(configs.dumps_table(shipped.to_json(
        {kept_key: {"evidence": "kept"}, replaced_key: {"evidence": "old"}})))
    monkeypatch.setattr(configs, "_TABLE_DIR", shipped_dir)
    tuned = tmp_path / "sm90.json"
    tuned.write_text(configs.dumps_table(Table({replaced_key: new, added_key: new}, {"source": "run"}).to_json(
        {replaced_key: {"evidence": "tuned 1k"}, added_key: {"evidence": "tuned 4k"}})))
    path, taken = tune_tables.merge_into_shipped(str(tuned), "sm90", ["bwd_dkdv"])
    assert taken == 2 and path.endswith("sm90.merged.json")
    data = json.loads(open(path).read())
    merged = Table.from_json(data)
    assert merged.entries == {kept_key: other, replaced_key: new, added_key: new}
    evidence = {Key.from_json(row["key"]): row["evidence"] for row in data["entries"]}
    assert evidence == {kept_key: "kept", replaced_key: "tuned 1k", added_key: "tuned 4k"}
    assert data["source"].startswith("seed; 2 entries of bwd_dkdv from run")
