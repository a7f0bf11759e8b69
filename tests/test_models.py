"""Model-level equivalence: every supported family under "plugin" against "eager" on tiny random configs."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import DataCollatorWithFlattening

import hf_attn_plugin  # noqa: F401  (registers "plugin")

from .models import DECODERS, make_pair

FAMILIES = sorted(DECODERS)
ATOL = 2e-5


def _right_padded_batch(vocab: int, lengths=(12, 9, 5)):
    seqlen = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), seqlen))
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_logits_match_eager(family):
    ours, eager = make_pair(DECODERS[family]())
    ids, mask = _right_padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        want = eager(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_match_eager(family):
    ours, eager = make_pair(DECODERS[family]())
    ours.train()
    eager.train()
    ids, mask = _right_padded_batch(ours.config.vocab_size)
    labels = ids.masked_fill(mask == 0, -100)
    loss_ours = ours(ids, attention_mask=mask, labels=labels).loss
    loss_eager = eager(ids, attention_mask=mask, labels=labels).loss
    loss_ours.backward()
    loss_eager.backward()
    torch.testing.assert_close(loss_ours, loss_eager, atol=ATOL, rtol=1e-5)
    eager_params = dict(eager.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        q = eager_params[name]
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-3, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked > 10


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_greedy_generate_is_token_identical(family, cache):
    ours, eager = make_pair(DECODERS[family]())
    lengths = (7, 3, 5)
    seqlen = max(lengths)
    ids = torch.randint(1, ours.config.vocab_size, (len(lengths), seqlen))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, seqlen - n :] = 1
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, cache_implementation=cache, pad_token_id=0)
    got = ours.generate(ids, **kwargs)
    want = eager.generate(ids, **kwargs)
    assert got.shape == want.shape
    assert torch.equal(got, want)


def _packed_features(vocab: int, lengths=(5, 8, 3)):
    return [{"input_ids": torch.randint(1, vocab, (n,)).tolist()} for n in lengths]


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sequences_do_not_attend_across_documents(family, flash_kwargs):
    ours, eager = make_pair(DECODERS[family]())
    features = _packed_features(ours.config.vocab_size)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(features, return_tensors="pt")
    batch.pop("labels")
    if flash_kwargs:
        assert "cu_seq_lens_q" in batch
    with torch.no_grad():  # no cache: transformers packs by position_ids only then (the plugin follows it)
        packed = ours(**batch, use_cache=False).logits[0]
        separate = torch.cat([eager(torch.tensor([f["input_ids"]])).logits[0] for f in features])
        if family == "gpt_oss" and not flash_kwargs:  # transformers builds its masks without position_ids: unpacked
            separate = eager(**batch, use_cache=False).logits[0]
    torch.testing.assert_close(packed, separate, atol=ATOL, rtol=1e-4)


def _bert_config(**overrides):
    values = dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
    )
    values.update(overrides)
    return transformers.BertConfig(**values)


def test_bert_encoder_bidirectional_with_padding():
    ours, eager = make_pair(_bert_config(), auto_class=transformers.AutoModel)
    ids, mask = _right_padded_batch(128)
    ours.train()
    eager.train()
    got = ours(ids, attention_mask=mask).last_hidden_state
    want = eager(ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=1e-4)
    (got[valid] ** 2).mean().backward()
    (want[valid] ** 2).mean().backward()
    eager_params = dict(eager.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, eager_params[name].grad, atol=1e-5, rtol=1e-3)


def test_attention_dropout_in_training():
    """BERT's default attention dropout (0.1) in training: applied (outputs differ from eval), reproduced by
    torch.manual_seed, gradients flow; in eval it is off and the model matches eager."""
    ours, eager = make_pair(_bert_config(attention_probs_dropout_prob=0.1), auto_class=transformers.AutoModel)
    ids, mask = _right_padded_batch(128)
    valid = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).last_hidden_state[valid],
                                   eager(ids, attention_mask=mask).last_hidden_state[valid], atol=ATOL, rtol=1e-4)
        evaluated = ours(ids, attention_mask=mask).last_hidden_state
    ours.train()
    torch.manual_seed(3)
    first = ours(ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(3)
    again = ours(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - evaluated)[valid].abs().max() > 1e-3
    (first[valid] ** 2).mean().backward()
    grads = [p.grad for p in ours.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_output_attentions_is_refused_with_a_clear_error():
    ours, _ = make_pair(DECODERS["llama"]())
    ids, mask = _right_padded_batch(ours.config.vocab_size)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        ours(ids, attention_mask=mask, output_attentions=True)


def test_mask_with_holes_is_refused():
    ours, _ = make_pair(DECODERS["llama"]())
    ids, mask = _right_padded_batch(ours.config.vocab_size)
    mask[0, 3] = 0
    with pytest.raises(NotImplementedError, match="holes"):
        ours(ids, attention_mask=mask)


def test_all_entry_points_select_plugin(tmp_path):
    config = DECODERS["llama"]()
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config))
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="plugin")
    assert loaded.config._attn_implementation == "plugin"
    model.set_attn_implementation("plugin")
    assert model.config._attn_implementation == "plugin"
    ids = torch.randint(1, config.vocab_size, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_register_is_idempotent():
    from hf_attn_plugin.integration import is_registered, register

    assert register() == "plugin"
    assert register() == "plugin"
    assert is_registered()
    with pytest.raises(ValueError, match="special handling"):
        register("my_flash")


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss", "qwen2"])
def test_triton_kernels_inside_models_match_eager(family, monkeypatch):
    """The same model checks through the Triton kernels (interpreter on CPU, fp32): padded batch, grads, packing."""
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    config = DECODERS[family]()
    config.head_dim = 64  # the smallest head_dim the kernels support
    ours, eager = make_pair(config)
    ours.train()
    eager.train()
    ids, mask = _right_padded_batch(ours.config.vocab_size)
    labels = ids.masked_fill(mask == 0, -100)
    got = ours(ids, attention_mask=mask, labels=labels)
    want = eager(ids, attention_mask=mask, labels=labels)
    valid = mask.bool()
    torch.testing.assert_close(got.logits[valid], want.logits[valid], atol=1e-4, rtol=1e-4)
    got.loss.backward()
    want.loss.backward()
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(
        dict(ours.named_parameters())[name].grad, dict(eager.named_parameters())[name].grad, atol=1e-4, rtol=1e-3
    )
    features = _packed_features(ours.config.vocab_size)
    batch = DataCollatorWithFlattening()(features, return_tensors="pt")
    batch.pop("labels")
    with torch.no_grad():  # no cache: transformers packs by position_ids only then (the plugin follows it)
        packed = ours(**batch, use_cache=False).logits[0]
        separate = torch.cat([eager(torch.tensor([f["input_ids"]])).logits[0] for f in features])
        if family == "gpt_oss":  # transformers builds its masks without position_ids: unpacked
            separate = eager(**batch, use_cache=False).logits[0]
    torch.testing.assert_close(packed, separate, atol=1e-4, rtol=1e-4)


def test_autocast_runs_attention_in_the_autocast_dtype(monkeypatch):
    """Trainer(bf16=True) autocasts: RoPE hands us fp32 q/k beside bf16 v; the op must run in bf16, not fp32."""
    from hf_attn_plugin import ops

    seen = []
    original = ops.attention_trusted  # what the integration calls

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(ops, "attention_trusted", spy)
    ours, _ = make_pair(DECODERS["llama"]())
    ids = torch.randint(1, ours.config.vocab_size, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours(ids)
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), seen
