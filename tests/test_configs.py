"""Launch-config tuning (kernels/configs.py) without a GPU: candidates a compiler rejects are skipped, other
errors surface, the winner is cached per key."""

from __future__ import annotations

import pytest
import triton.testing

from hf_attn_plugin.kernels import configs


class PTXASError(RuntimeError):  # what triton.runtime.errors raises when ptxas fails on a candidate
    pass


@pytest.fixture
def tuning(monkeypatch):
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv("HF_ATTN_PLUGIN_AUTOTUNE", raising=False)
    monkeypatch.setattr(configs, "CACHE", {})
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: fn())  # "time" = what launch returns


def test_pick_skips_candidates_the_compiler_rejects(tuning):
    options = configs.candidates("fwd", 128)
    broken, fastest = options[1], options[2]

    def launch(cfg):
        if cfg == broken:
            raise PTXASError("ptxas failed with error code -11")
        return 1.0 if cfg == fastest else 2.0  # do_bench (patched) returns what launch returns

    assert configs.pick("fwd", 128, ("key",), launch) == fastest
    assert configs.CACHE[("fwd", 128, "key")] == fastest
    assert configs.pick("fwd", 128, ("key",), lambda cfg: pytest.fail("cached: no new tuning")) == fastest


def test_pick_raises_real_errors(tuning):
    def launch(cfg):
        raise ValueError("a bug, not an unusable tile shape")

    with pytest.raises(ValueError, match="a bug"):
        configs.pick("fwd", 128, ("other",), launch)
