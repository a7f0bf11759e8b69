"""CPU smoke test of the uptraining recipe: tiny MHA Llama -> convert_to_gqa -> Trainer through "plugin".

On CPU the plugin runs its pure-PyTorch reference path (forward + backward), so this exercises the same
integration (packed sequences from DataCollatorWithFlattening, GQA heads) that the Triton kernels serve on GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_attn_plugin.conversion import convert_to_gqa

from .helpers import load_file

ug = load_file("examples/uptrain_gqa.py")


@pytest.fixture(scope="module")
def data():
    files = ug.stdlib_files()
    assert files, "no standard-library sources found"
    files = files[::max(1, len(files) // 60)][:60]  # a spread-out slice, deterministic
    train_files, val_files = files[:-6], files[-6:]
    train_docs, val_docs = ug.read_documents(train_files), ug.read_documents(val_files)
    tok = ug.train_tokenizer(train_docs, vocab_size=384, max_chars=400_000)
    train = ug.tokenize_documents(tok, train_docs, seq_len=64)
    val = ug.tokenize_documents(tok, val_docs, seq_len=64)[:24]
    return tok, train, val


def test_convert_and_uptrain(tmp_path, data):
    tok, train, val = data
    torch.set_num_threads(2)
    model = ug.build_llama(len(tok), hidden=64, layers=2, heads=8, intermediate=128, max_positions=128, seed=0)
    # a few steps of "pretraining" so the conversion starts from a model that has learned something
    ug.train(model, train, ug.make_training_args(str(tmp_path / "pre"), 15, lr=3e-3, batch_size=8, logging_steps=5))
    src, dst = tmp_path / "mha", tmp_path / "gqa2"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    report = convert_to_gqa(src, dst, num_kv_heads=2, method="mean", progress=False)
    assert report.num_kv_heads == 2

    gqa = ug.load_model(dst)
    assert gqa.config.num_key_value_heads == 2 and gqa.config._attn_implementation == "plugin"
    assert gqa.model.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 64)
    out = tmp_path / "up"
    res = ug.uptrain(gqa, train, val, str(out), max_steps=20, tokenizer=tok, lr=2e-3, batch_size=8,
                     logging_steps=2, eval_batch_size=24)
    losses = res["losses"]
    assert len(losses) >= 5 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert res["ppl_after"] < res["ppl_before"], (res["ppl_before"], res["ppl_after"])

    again = ug.load_model(out)
    assert again.config.num_key_value_heads == 2
    ref = ug.evaluate_perplexity(again, val, batch_size=24)["ppl"]
    assert ref == pytest.approx(res["ppl_after"], rel=1e-4)
    assert len(type(tok).from_pretrained(out)) == len(tok)


def test_chunking_and_split():
    assert ug.chunk_token_ids(list(range(100)), 40, min_len=16) == [list(range(40)), list(range(40, 80)),
                                                                      list(range(80, 100))]
    assert ug.chunk_token_ids(list(range(90)), 40, min_len=16) == [list(range(40)), list(range(40, 80))]
    files = [f"/x/a{i}.py" for i in range(200)]
    tr, va = ug.split_files(files, 5.0)
    assert sorted(tr + va) == sorted(files) and 0 < len(va) < 30
    assert ug.split_files(files, 5.0) == (tr, va)
