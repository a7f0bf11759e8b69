"""The mask function registered for ``"plugin"`` and the translation of masks into segments.

transformers builds the attention mask once per forward pass, through the mask function registered
under the model's attention implementation, and hands the result to every layer. Our kernels never
need a dense ``[B, 1, Sq, Sk]`` mask: causality, windows and softcaps come from the call's kwargs, so
the mask function only has to say which key slots hold real tokens, and where packed documents start. It
returns

* ``None`` when every key slot is a real token (no padding) and nothing is packed, except with a static cache,
  whose mask stays a tensor so that its compiled decode step sees the same kwargs at every step;
* a boolean ``[B, Sk]`` key mask: ``True`` for real tokens, ``False`` for padding and for
  static-cache slots that have not been written yet; or
* an int32 ``[B, S]`` document index per token (0, 1, ... in each row) when transformers detected
  sequences packed into one row (see :func:`packed_documents`).

:func:`segments_from_key_mask` turns that mask into the kernels' segments (see
:mod:`hf_attn_plugin.reference`) with a handful of small tensor ops and no host synchronisation.
"""

from __future__ import annotations

import torch
from transformers import masking_utils

from .compat import is_compiling

__all__ = [
    "plugin_mask", "packed_documents", "segments_from_key_mask", "segments_from_documents", "segments_from_cu_seqlens",
]


def plugin_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: a ``[B, kv_length]`` key mask, or ``None``.

    Key slot ``j`` holds absolute position ``kv_offset + j``. A slot is real when the user's 2-D mask
    marks that position (missing columns count as absent) and when it has been written: positions
    ``>= q_offset + q_length`` are the empty tail of a static cache.
    """
    device = attention_mask.device if attention_mask is not None else device
    # Slots past the newest query may be unwritten (a static cache's tail): only then is "written" computed (a
    # dynamic cache's decode step skips those tensor ops).
    tail = isinstance(q_offset, torch.Tensor) or q_offset + q_length < kv_offset + kv_length
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            return attention_mask  # a custom 4-D mask: the attention function refuses it with a clear error
        user = attention_mask.to(dtype=torch.bool, device=device)
        missing = kv_offset + kv_length - user.shape[-1]
        if missing > 0:
            user = torch.nn.functional.pad(user, (0, missing))
        key_mask = user[:, kv_offset : kv_offset + kv_length]
        if tail:
            key_mask = key_mask & _written(kv_length, kv_offset, q_offset + q_length, device)
    elif tail:
        key_mask = _written(kv_length, kv_offset, q_offset + q_length, device).expand(batch_size, kv_length)
    elif mask_function is not None and q_length == kv_length > 1 and mask_function not in _UNPACKED:
        return packed_documents(mask_function, batch_size, q_length, q_offset, kv_offset, device)
    else:
        return None

    if not is_compiling():
        # A static cache keeps its key mask even once every slot is written (its last step): the mask is a kwarg of
        # the compiled decode step, and None in its place would recompile that step (dynamo guards on the kwargs).
        if not tail and bool(key_mask.all()):
            return None
        _check_contiguous(key_mask)
    return key_mask


def _written(kv_length: int, kv_offset: int, end: int | torch.Tensor, device) -> torch.Tensor:
    """``[kv_length]`` bool: key slot ``j`` (absolute position ``kv_offset + j``) lies before ``end``."""
    return torch.arange(kv_offset, kv_offset + kv_length, device=device) < end


def _check_contiguous(key_mask: torch.Tensor) -> None:
    """Real tokens must form one run per row (left or right padding): segments cannot express holes."""
    start, end = _run_bounds(key_mask)
    holes = key_mask.sum(-1) != (end - start)
    if bool(holes.any()):
        raise NotImplementedError(
            "attn_implementation='plugin' supports left or right padding (one run of real tokens per row); "
            "this attention_mask has holes inside a row. Use attn_implementation='eager' or 'sdpa' for such masks."
        )


def _run_bounds(key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First real slot and one past the last real slot of each row (0, 0 for an empty row)."""
    length = key_mask.shape[-1]
    any_real = key_mask.any(-1)
    as_int = key_mask.to(torch.int32)
    start = torch.argmax(as_int, dim=-1)
    end = length - torch.argmax(as_int.flip(-1), dim=-1)
    zero = torch.zeros_like(start)
    return torch.where(any_real, start, zero), torch.where(any_real, end, zero)


def segments_from_key_mask(key_mask: torch.Tensor, seqlen_q: int) -> torch.Tensor:
    """Segments ``[B, 5]`` for a padded batch described by a ``[B, Sk]`` key mask.

    Without a cache (``Sq == Sk``) query ``i`` is key ``i``. With a cache the queries are the newest
    tokens: the last ``Sq`` real slots of the row, so query ``i`` is key ``end - Sq + i``.
    """
    batch, seqlen_k = key_mask.shape
    k_start, k_end = _run_bounds(key_mask)
    q_base = torch.zeros_like(k_end) if seqlen_q == seqlen_k else k_end - seqlen_q
    q_start = (k_start - q_base).clamp(0, seqlen_q)
    q_end = (k_end - q_base).clamp(0, seqlen_q)
    rows = torch.arange(batch, device=key_mask.device)
    return torch.stack([rows, q_start, q_end, k_start, k_end], dim=1).to(torch.int32)


def segments_from_cu_seqlens(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """Segments for sequences packed into batch row 0 (flash-attention style cumulative lengths)."""
    cu_q = cu_seqlens_q.to(torch.int32)
    cu_k = cu_seqlens_k.to(torch.int32)
    rows = torch.zeros_like(cu_q[1:])
    return torch.stack([rows, cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]], dim=1)


# transformers' plain mask functions: nothing packed, no need to look (saves a synchronisation).
_UNPACKED = tuple(f for f in (getattr(masking_utils, "causal_mask_function", None),
                              getattr(masking_utils, "bidirectional_mask_function", None)) if f is not None)


def packed_documents(mask_function, batch: int, length: int, q_offset: int, kv_offset: int, device):
    """transformers' own packing decision, read off the mask function it built: int32 ``[B, S]`` document
    indices, or ``None`` when nothing is packed.

    When transformers detects packed sequences from ``position_ids`` (its rule, which differs between
    releases and depends on the call: only without a 2-D mask and without a cache; in 5.x every position that
    does not continue the previous one, ``p[t] != p[t-1] + 1`` (restarts, gaps, repeats), at any batch size),
    it ANDs a "same document" function into ``mask_function``. Token ``t`` starts a document exactly when
    query ``t`` may not see key ``t - 1``, so evaluating that one diagonal mirrors every release's rule without
    restating it. (A sliding window of 1 also hides key ``t - 1``: one-token documents compute the same.)

    Needs the number of documents on the host: one synchronisation per mask, i.e. per forward pass. Under
    ``torch.compile`` packed rows are refused (a device-side assert): pass ``cu_seq_lens_q/k`` there
    (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``).
    """
    t = torch.arange(1, length, device=device)
    rows = torch.arange(batch, device=device)[:, None]
    head = torch.zeros((), dtype=torch.long, device=device)
    sees_previous = mask_function(rows, head, (t + q_offset)[None], (t - 1 + kv_offset)[None])
    starts = ~torch.as_tensor(sees_previous, dtype=torch.bool, device=device).expand(batch, length - 1)
    if is_compiling():
        torch._assert_async(
            ~starts.any(), "packed sequences (position_ids restarts) under torch.compile need cu_seq_lens_q/k kwargs"
        )
        return None
    if not bool(starts.any()):
        return None
    documents = torch.zeros(batch, length, dtype=torch.int32, device=device)
    documents[:, 1:] = starts.cumsum(-1)
    return documents


def segments_from_documents(documents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Segments and the longest document for int32 ``[B, S]`` document indices (:func:`packed_documents`).

    Reads the number of documents on the host (one synchronisation; the attention function memoises the
    result across layers).
    """
    batch, seqlen = documents.shape
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    row, begin = starts.nonzero(as_tuple=True)
    flat_begin = row * seqlen + begin
    flat_end = torch.cat([flat_begin[1:], flat_begin.new_tensor([batch * seqlen])])
    end = torch.minimum(flat_end, (row + 1) * seqlen) - row * seqlen
    segments = torch.stack([row, begin, end, begin, end], dim=1).to(torch.int32)
    return segments, int((end - begin).max())
