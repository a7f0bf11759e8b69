"""The mask function registered for ``"plugin"`` and the translation of masks into segments.

transformers builds the attention mask once per forward pass, through the mask function registered
under the model's attention implementation, and hands the result to every layer. Our kernels never
need a dense ``[B, 1, Sq, Sk]`` mask: causality, windows and softcaps come from the call's kwargs, so
the mask function only has to say which key slots hold real tokens. It returns

* ``None`` when every key slot is a real token (no padding, no empty static-cache slots), or
* a boolean ``[B, Sk]`` key mask: ``True`` for real tokens, ``False`` for padding and for
  static-cache slots that have not been written yet.

:func:`segments_from_key_mask` turns that mask into the kernels' segments (see
:mod:`hf_attn_plugin.reference`) with a handful of small tensor ops and no host synchronisation.
"""

from __future__ import annotations

import torch

from .compat import is_compiling

__all__ = ["plugin_mask", "segments_from_key_mask", "segments_from_position_ids", "segments_from_cu_seqlens"]


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
    columns = torch.arange(kv_length, device=device) + kv_offset
    written = columns < (q_offset + q_length)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            return attention_mask  # a custom 4-D mask: the attention function refuses it with a clear error
        user = attention_mask.to(dtype=torch.bool, device=device)
        padded = torch.nn.functional.pad(user, (0, max(0, kv_offset + kv_length - user.shape[-1])))
        key_mask = padded[:, kv_offset : kv_offset + kv_length] & written
    elif isinstance(q_offset, torch.Tensor) or q_offset + q_length < kv_offset + kv_length:
        key_mask = written.expand(batch_size, kv_length)
    else:
        return None

    if not is_compiling():
        if bool(key_mask.all()):
            return None
        _check_contiguous(key_mask)
    return key_mask


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


def segments_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """Packed documents from ``position_ids`` restarts, as ``(segments, max_seqlen)``; ``None`` if unpacked.

    A document starts wherever the position does not continue the previous one (``p[t] != p[t-1] + 1``).
    This needs the number of documents on the host: one synchronisation per forward pass (the
    attention function memoises the result across layers). Under ``torch.compile`` pass
    ``cu_seq_lens_q/k`` instead (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``).
    """
    batch, seqlen = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if is_compiling():
        torch._assert_async(
            ~starts[:, 1:].any(),
            "packed sequences (position_ids restarts) under torch.compile need cu_seq_lens_q/k kwargs",
        )
        return None
    if not bool(starts[:, 1:].any()):
        return None
    row, begin = starts.nonzero(as_tuple=True)
    flat_begin = row * seqlen + begin
    flat_end = torch.cat([flat_begin[1:], flat_begin.new_tensor([batch * seqlen])])
    end = torch.minimum(flat_end, (row + 1) * seqlen) - row * seqlen
    segments = torch.stack([row, begin, end, begin, end], dim=1).to(torch.int32)
    return segments, int((end - begin).max())
