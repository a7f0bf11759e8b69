"""convert-to-gqa on tiny random checkpoints of every family in the table (CPU, no downloads)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from hf_attn_plugin.conversion import FAMILIES, ConversionError, convert_to_gqa
from hf_attn_plugin.conversion import api as conversion_api
from hf_attn_plugin.conversion.evaluation import text_token_ids, verify_conversion
from hf_attn_plugin.conversion.families import HeadGeometry, family_for
from hf_attn_plugin.conversion.pooling import convert_segments, similarity_groups, grouping_cost, pairwise_cost

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, vocab_size=96)
CONFIGS: dict[str, tuple[type, dict]] = {
    "llama": (transformers.LlamaConfig, {}),
    "llama_gqa": (transformers.LlamaConfig, {"num_key_value_heads": 4}),  # already GQA: 4 -> 2
    "mistral": (transformers.MistralConfig, {"sliding_window": 8}),
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 2, "num_experts_per_tok": 1}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 16}),
    "gemma": (transformers.GemmaConfig, {"head_dim": 16}),  # explicit head_dim != hidden / heads
    "gemma2": (transformers.Gemma2Config, {"head_dim": 16}),
    "gemma3": (transformers.Gemma3TextConfig, {"head_dim": 16, "sliding_window": 8}),
    "phi3": (transformers.Phi3Config, {"pad_token_id": 0}),
    "olmo2": (transformers.Olmo2Config, {"pad_token_id": 0}),
}
TOKENS = torch.tensor([[3, 17, 42, 5, 88, 1, 60, 23, 9, 71, 33, 14]])
EXTRA_FILES = {"README.md": b"# tiny model\n", "LICENSE": b"kept byte for byte\x00\xff"}  # allow-listed: copied
NOT_COPIED = {"tokenizer_extra/notes.txt": b"not part of a checkpoint"}


def _attn() -> str:
    return "plugin" if "plugin" in transformers.AttentionInterface._global_mapping else "eager"


def _save_tiny(name: str, path: Path, sharded: bool, seed: int = 0) -> Path:
    config_cls, overrides = CONFIGS[name]
    kv = overrides.get("num_key_value_heads", SMALL["num_attention_heads"])
    config = config_cls(**{**SMALL, "num_key_value_heads": kv, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases and norms start at 0/1: randomise them so pooling them is actually tested
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias") or "norm" in param_name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path, max_shard_size="60KB" if sharded else "1GB")
    for rel, data in {**EXTRA_FILES, **NOT_COPIED}.items():
        (path / rel).parent.mkdir(exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _logits(path: Path, attn: str = "eager") -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def _kv_heads_of(state: dict[str, torch.Tensor], config: dict, name: str) -> torch.Tensor:
    """K and V rows of layer 0 (split out of Phi-3's fused qkv), as [2 * H_kv * D, ...]."""
    family = family_for(config)
    geometry = HeadGeometry.from_config(family, config)
    prefix = "model.layers.0.self_attn."
    if "qkv_proj" in family.projections.values():
        q = geometry.num_heads * geometry.head_dim
        return state[prefix + f"qkv_proj.{name}"][q:]
    return torch.cat([state[prefix + f"k_proj.{name}"], state[prefix + f"v_proj.{name}"]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    root = tmp_path_factory.mktemp("src")
    return {
        (name, sharded): _save_tiny(name, root / f"{name}-{'sharded' if sharded else 'single'}", sharded)
        for name in CONFIGS
        for sharded in (False, True)
    }


def test_every_family_in_the_table_is_tested():
    tested = {t for cls, _ in CONFIGS.values() for t in [cls.model_type]}
    assert tested == {t for family in FAMILIES for t in family.model_types}


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_convert_family(name, sharded, checkpoints, tmp_path):
    src = checkpoints[(name, sharded)]
    dst = tmp_path / "gqa"
    report = convert_to_gqa(src, dst, num_kv_heads=2, progress=False)
    config = json.loads((dst / "config.json").read_text())
    src_config = json.loads((src / "config.json").read_text())

    # config: only the KV head count changes
    assert config == {**src_config, "num_key_value_heads": 2}
    assert AutoConfig.from_pretrained(dst).num_key_value_heads == 2

    # attention tensors have exactly the shapes the modeling code builds for the new config; dtypes are kept
    out, before = _tensors(dst), _tensors(src)
    expected = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dst)).state_dict()
    attention = [k for k in out if family_for(config).classify(k) is not None]
    assert {k: tuple(out[k].shape) for k in attention} == {k: tuple(expected[k].shape) for k in attention}
    assert all(out[k].dtype == before[k].dtype for k in out)

    # pooled K/V (and biases) are the exact mean of each group of adjacent source heads; the rest is untouched
    d = report.geometry.head_dim
    for param in ("weight", "bias"):
        if param == "bias" and not src_config.get("attention_bias", name == "qwen2"):
            continue
        src_kv = _kv_heads_of(before, src_config, param)
        pooled = src_kv.unflatten(0, (2, 2, -1, d)).mean(dim=2).flatten(1, 2)  # [k|v, G, group, D, ...]
        assert torch.equal(_kv_heads_of(out, config, param), pooled.flatten(0, 1))
    changed = {c.name for c in report.changes}
    assert all(torch.equal(out[k], before[k]) for k in out if k not in changed)
    assert changed and all("k_" in n or "v_" in n or "qkv" in n for n in changed)

    # index json, other files byte for byte, loads and runs
    if sharded:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(out)
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in out.values())
        assert all((dst / f).is_file() for f in index["weight_map"].values())
    for rel in [*EXTRA_FILES, "generation_config.json"]:
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    assert not (dst / "tokenizer_extra").exists() and report.skipped == ["tokenizer_extra/"]
    logits = _logits(dst, _attn())
    assert logits.shape == (1, TOKENS.shape[1], SMALL["vocab_size"]) and torch.isfinite(logits).all()


def test_olmo2_k_norm_is_pooled_per_head(checkpoints, tmp_path):
    src = checkpoints[("olmo2", True)]
    convert_to_gqa(src, tmp_path / "o", num_kv_heads=2, progress=False)
    name = "model.layers.1.self_attn.k_norm.weight"
    before, after = _tensors(src)[name], _tensors(tmp_path / "o")[name]
    assert after.shape == (2 * 8,)
    assert torch.equal(after, before.view(2, 4, 8).mean(1).flatten())


@pytest.mark.parametrize("name", ["llama", "llama_gqa"])
def test_converting_to_the_same_kv_head_count_is_refused(name, checkpoints, tmp_path):
    """A no-op conversion (issue 13) used to exit 0 with "0 tensors rewritten": it is refused and says why."""
    src = checkpoints[(name, True)]
    kv = json.loads((src / "config.json").read_text())["num_key_value_heads"]
    choices = "1, 2, 4" if kv == 8 else "1, 2"
    for grouping in ("adjacent", "similarity"):
        with pytest.raises(ConversionError, match=rf"already has {kv} KV heads, so --num-kv-heads {kv} would "
                                                  rf"change nothing; choose one of {choices}$"):
            convert_to_gqa(src, tmp_path / grouping, num_kv_heads=kv, grouping=grouping, progress=False)
        assert not (tmp_path / grouping).exists()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_head_permutation_preserves_the_model(name, checkpoints):
    """Permuting KV heads together with their query heads and o_proj columns (no pooling) is exact."""
    src = checkpoints[(name, False)]
    config = json.loads((src / "config.json").read_text())
    family = family_for(config)
    geometry = HeadGeometry.from_config(family, config)
    perm = torch.randperm(geometry.num_kv_heads, generator=torch.Generator().manual_seed(1)).tolist()
    assert perm != sorted(perm)

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(TOKENS).logits
        for tensor_name, param in model.state_dict().items():
            if (entry := family.classify(tensor_name)) is not None:
                new = convert_segments(param, entry.segments, geometry, geometry.num_kv_heads, "mean", kv_perm=perm)
                permuted_something = entry.segments and not torch.equal(new, param)
                assert permuted_something or not entry.segments
                param.copy_(new)
        permuted = model(TOKENS).logits
    torch.testing.assert_close(permuted, reference, rtol=1e-5, atol=1e-5)


def test_similarity_grouping_pools_the_chosen_groups(checkpoints, tmp_path):
    src = checkpoints[("qwen2", True)]  # has k/v biases: they follow the same permutation
    report = convert_to_gqa(src, tmp_path / "sim", num_kv_heads=2, grouping="similarity", progress=False)
    before, after = _tensors(src), _tensors(tmp_path / "sim")
    assert report.groups, "random heads should not happen to be grouped adjacently in every layer"
    for layer, groups in report.groups.items():
        for param in ("weight", "bias"):
            k = before[f"{layer}.k_proj.{param}"].unflatten(0, (8, 8))
            expected = torch.stack([k[g].mean(0) for g in groups]).flatten(0, 1)
            assert torch.equal(after[f"{layer}.k_proj.{param}"], expected)
    assert _logits(tmp_path / "sim").isfinite().all()


def test_similarity_grouping_beats_adjacent_on_its_objective():
    features = [torch.randn(16, 40, dtype=torch.float64), torch.randn(16, 40, dtype=torch.float64)]
    cost = pairwise_cost(features)
    groups = similarity_groups(cost, num_groups=4)
    assert sorted(h for g in groups for h in g) == list(range(16)) and {len(g) for g in groups} == {4}
    adjacent = [list(range(i, i + 4)) for i in range(0, 16, 4)]
    assert grouping_cost(cost, groups) < grouping_cost(cost, adjacent)
    # Heads built as 4 noisy copies of 4 prototypes: the grouping must recover the prototypes.
    prototypes = torch.randn(4, 40, dtype=torch.float64)
    order = torch.randperm(16)
    copies = prototypes.repeat_interleave(4, 0)[order] + 0.01 * torch.randn(16, 40, dtype=torch.float64)
    recovered = similarity_groups(pairwise_cost([copies]), 4)
    assert sorted(sorted(order[g].div(4, rounding_mode="floor").tolist()) for g in recovered) == [
        [i] * 4 for i in range(4)
    ]


def test_similarity_with_calibration_text(checkpoints, tmp_path):
    src = checkpoints[("phi3", True)]
    text = "the quick brown fox jumps over the lazy dog " * 8
    report = convert_to_gqa(
        src, tmp_path / "cal", num_kv_heads=2, grouping="similarity", calibration_text=text, progress=False
    )
    assert {len(g) for groups in report.groups.values() for g in groups} <= {4}
    assert _logits(tmp_path / "cal").isfinite().all()


@pytest.mark.parametrize("method", ["first", "random"])
def test_member_methods_keep_one_source_head(method, checkpoints, tmp_path):
    src = checkpoints[("llama", False)]
    convert_to_gqa(src, tmp_path / method, num_kv_heads=2, method=method, seed=3, progress=False)
    name = "model.layers.0.self_attn.v_proj.weight"
    groups = _tensors(src)[name].unflatten(0, (2, 4, 8))
    out = _tensors(tmp_path / method)[name].unflatten(0, (2, 8))
    picks = [next(i for i in range(4) if torch.equal(out[g], groups[g, i])) for g in range(2)]
    if method == "first":
        assert picks == [0, 0]


def test_verify_reports_logit_difference_and_perplexity(checkpoints, tmp_path):
    src = checkpoints[("llama", True)]
    ids = text_token_ids(src, None, SMALL["vocab_size"], 256)
    same = verify_conversion(src, src, ids)
    assert same.max_abs_logit_diff == 0 and same.perplexity_src == same.perplexity_dst
    pooled = convert_to_gqa(src, tmp_path / "mqa", num_kv_heads=1, verify=True, progress=False).verify
    assert pooled.max_abs_logit_diff > 0 and pooled.attn_implementation == _attn()
    assert pooled.num_tokens > 100 and pooled.perplexity_dst > 1


def test_dry_run_writes_nothing(checkpoints, tmp_path):
    report = convert_to_gqa(checkpoints[("gemma", True)], tmp_path / "x", num_kv_heads=4, dry_run=True)
    assert not (tmp_path / "x").exists()
    k = next(c for c in report.changes if c.name.endswith("k_proj.weight"))
    assert k.shape_before == (8 * 16, 64) and k.shape_after == (4 * 16, 64)
    assert report.total_bytes_after < report.total_bytes_before


def test_bin_checkpoints_need_allow_bin(checkpoints, tmp_path):
    src = tmp_path / "bin"
    single = checkpoints[("qwen2", False)]
    shutil.copytree(single, src, ignore=shutil.ignore_patterns("*.safetensors"))
    state = _tensors(single)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="allow-bin"):
        convert_to_gqa(src, tmp_path / "out", num_kv_heads=2)
    assert not (tmp_path / "out").exists()
    convert_to_gqa(src, tmp_path / "out", num_kv_heads=2, allow_bin=True, progress=False)
    assert torch.equal(_logits(tmp_path / "out"), _logits(tmp_path / "out"))
    reference = tmp_path / "ref"
    convert_to_gqa(single, reference, num_kv_heads=2, progress=False)
    assert _tensors(tmp_path / "out").keys() == _tensors(reference).keys()
    assert all(torch.equal(_tensors(tmp_path / "out")[k], v) for k, v in _tensors(reference).items())


def _corrupt(src: Path, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    if how == "missing shard":
        next(bad.glob("model-*.safetensors")).unlink()
    elif how == "shape":
        config["head_dim"] = 4
    elif how == "corrupt shard":
        next(bad.glob("model-*.safetensors")).write_bytes(b"not a safetensors file")
    elif how == "index":
        index_path = bad / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        index["weight_map"]["model.layers.9.self_attn.k_proj.weight"] = min(index["weight_map"].values())
        index_path.write_text(json.dumps(index))
    elif how == "family":
        config["model_type"] = "gpt2"
    elif how == "dtype":
        shard = bad / json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"][
            "model.layers.0.self_attn.k_proj.weight"
        ]
        tensors = _tensors_of_file(shard)
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"].to(
            torch.int8
        )
        save_file(tensors, shard, metadata={"format": "pt"})
    (bad / "config.json").write_text(json.dumps(config))
    return bad


def _tensors_of_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize(
    "how, kv, match",
    [
        (None, 3, "does not divide the 8 attention heads; choose one of 1, 2, 4"),
        (None, 16, "more than the checkpoint's 8 KV heads"),
        (None, 0, ">= 1"),
        ("missing shard", 2, "missing shard"),
        ("corrupt shard", 2, "not a readable safetensors file"),
        ("index", 2, "missing from their shard: model.layers.9.self_attn.k_proj.weight"),
        ("shape", 2, "shape mismatch"),
        ("family", 2, "unsupported model_type 'gpt2'; supported: gemma, gemma2"),
        ("dtype", 2, "unsupported dtype torch.int8"),
    ],
)
def test_bad_inputs_raise_and_leave_nothing(how, kv, match, checkpoints, tmp_path):
    src = checkpoints[("llama", True)]
    if how is not None:
        src = _corrupt(src, tmp_path, how)
    before = set(tmp_path.iterdir())
    with pytest.raises(ConversionError, match=match):
        convert_to_gqa(src, tmp_path / "out", num_kv_heads=kv, progress=False)
    assert set(tmp_path.iterdir()) == before


def test_destination_rules(checkpoints, tmp_path):
    src = checkpoints[("llama", False)]
    with pytest.raises(ConversionError, match="is the source"):
        convert_to_gqa(src, src, num_kv_heads=2)
    with pytest.raises(ConversionError, match="inside the source"):
        convert_to_gqa(src, src / "sub", num_kv_heads=2)
    dst = tmp_path / "exists"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="--overwrite"):
        convert_to_gqa(src, dst, num_kv_heads=2)
    assert (dst / "keep.txt").exists()
    convert_to_gqa(src, dst, num_kv_heads=2, overwrite=True, progress=False)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_failure_while_writing_leaves_no_partial_output(checkpoints, tmp_path, monkeypatch):
    calls = []

    def failing_write(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(conversion_api, "write_shard", failing_write)
    with pytest.raises(ConversionError, match="disk full; nothing was written"):
        convert_to_gqa(checkpoints[("llama", True)], tmp_path / "out", num_kv_heads=2, progress=False)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "hf_attn_plugin.conversion", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_cli(checkpoints, tmp_path):
    assert "examples:" in (help_run := _cli("--help")).stdout and help_run.returncode == 0

    src = checkpoints[("qwen2", True)]
    dry = _cli(str(src), str(tmp_path / "dry"), "--num-kv-heads", "4", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "model.layers.0.self_attn.k_bias" not in dry.stdout
    assert "model.layers.0.self_attn.k_proj.bias: [64] -> [32] float32" in dry.stdout
    assert not (tmp_path / "dry").exists()

    bad = _cli(str(src), str(tmp_path / "bad"), "--num-kv-heads", "3", "--quiet")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "convert-to-gqa: error: --num-kv-heads 3 does not divide the 8 attention heads; choose one of 1, 2, 4"
    )
    assert not (tmp_path / "bad").exists()


def test_cli_choices_match_the_library():
    """The CLI repeats the library's choices so that --help needs no torch; they must not drift apart."""
    from hf_attn_plugin.conversion.api import GROUPINGS
    from hf_attn_plugin.conversion.families import supported_model_types
    from hf_attn_plugin.conversion.pooling import POOL_METHODS
    from hf_attn_plugin_cli import convert_to_gqa as cli

    assert cli.METHODS == POOL_METHODS and cli.GROUPINGS == GROUPINGS
    listed = cli.EPILOG.split("Supported model types: ")[1].split("\n(docs")[0].replace("\n", " ")
    assert sorted(listed.split(", ")) == supported_model_types()


def test_conversion_imports_nothing_from_kernels():
    import ast

    package = Path(__file__).resolve().parents[1] / "hf_attn_plugin" / "conversion"
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any("kernels" in name for name in names), f"{source.name} imports {names}"
