"""The parts of conversion that run the model with transformers: calibration statistics and ``--verify``.

These load whole models (unlike the streaming converter) and are only used when asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .errors import ConversionError

# Used when the user gives no text. Any fixed prose works: it only has to be the same on every run.
SAMPLE_TEXT = (
    "Grouped-query attention shares each key and value head among a group of query heads. It keeps most of "
    "the quality of multi-head attention while the key-value cache shrinks by the group size, which makes "
    "decoding faster because generation is limited by memory bandwidth. A multi-head checkpoint can be "
    "converted by averaging the key and value projections of the heads in each group, after which a short "
    "period of additional training recovers the small loss in quality. The river wound through the valley, "
    "past the mill and the old stone bridge, and the children counted the boats that drifted toward the sea."
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def attention_implementation() -> str:
    """``"plugin"`` when hf_attn_plugin has registered it with transformers, else ``"eager"``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return "plugin" if "plugin" in ALL_ATTENTION_FUNCTIONS else "eager"


def text_token_ids(
    model_dir: Path, text: str | None, vocab_size: int, max_tokens: int, what: str = "verify text (--verify-text)"
) -> torch.Tensor:
    """Token ids of ``text`` (or the built-in sample): the checkpoint's tokenizer if it ships one, otherwise
    the text's UTF-8 bytes folded into the vocabulary (deterministic, so runs stay comparable)."""
    text = SAMPLE_TEXT if text is None else text
    if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt").input_ids[0]
    else:
        ids = torch.tensor([b % vocab_size for b in text.encode()], dtype=torch.long)
    if ids.numel() < 2:
        raise ConversionError(f"the {what} is shorter than two tokens; give a longer text (a few sentences)")
    return ids[:max_tokens]


def load_model(path: Path, attn_implementation: str = "eager") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    return model.eval()


def input_second_moments(
    src: Path, modules: Iterable[str], text: str, vocab_size: int, max_tokens: int = 512
) -> dict[str, torch.Tensor]:
    """E[x~ x~^T] of the input x~ = [x, 1] of each named module over the calibration text.

    Feeding these to :func:`~.pooling.head_features` turns weight distances into distances between the heads'
    actual K/V activations on that text, which is what pooling distorts.
    """
    model = load_model(src)
    ids = text_token_ids(src, text, vocab_size, max_tokens, what="calibration text (--calibration-text)")
    moments: dict[str, torch.Tensor] = {}

    def accumulate(name: str):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            moments[name] = moments.get(name, 0) + x.T @ x / x.shape[0]

        return hook

    handles = []
    for name in modules:
        try:
            handles.append(model.get_submodule(name).register_forward_pre_hook(accumulate(name)))
        except AttributeError as err:
            raise ConversionError(f"calibration: the loaded model has no module {name!r}") from err
    try:
        with torch.no_grad():
            model(ids[None])
    finally:
        for handle in handles:
            handle.remove()
    return moments


@dataclass(frozen=True)
class VerifyResult:
    attn_implementation: str
    num_tokens: int
    max_abs_logit_diff: float
    perplexity_src: float
    perplexity_dst: float

    def summary(self) -> str:
        return (
            f"verify ({self.attn_implementation}, {self.num_tokens} tokens): max |logit diff| "
            f"{self.max_abs_logit_diff:.4g}, perplexity {self.perplexity_src:.4g} -> {self.perplexity_dst:.4g}"
        )


def _logits(path: Path, ids: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    model = load_model(path, attn_implementation)
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item())


def verify_conversion(src: Path, dst: Path, ids: torch.Tensor, progress: bool = False) -> VerifyResult:
    """Run source and converted model on the same token ids; one model is in memory at a time.

    ``ids`` come from :func:`text_token_ids`, computed before the output is written so that a bad text is
    reported before any work is done.
    """
    from tqdm.auto import tqdm

    impl = attention_implementation()
    with tqdm(total=2, desc="verifying", unit="model", disable=not progress) as bar:
        logits = []
        for path in (src, dst):
            logits.append(_logits(path, ids, impl))
            bar.update()
    before, after = logits
    return VerifyResult(
        attn_implementation=impl,
        num_tokens=ids.numel(),
        max_abs_logit_diff=(before - after).abs().max().item(),
        perplexity_src=perplexity(before, ids),
        perplexity_dst=perplexity(after, ids),
    )
