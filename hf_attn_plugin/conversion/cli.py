"""``convert-to-gqa`` command line. Exit status: 0 success, 2 bad usage or input, 1 unexpected error."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Sequence

from .api import GROUPINGS, convert_to_gqa
from .errors import ConversionError
from .families import supported_model_types
from .pooling import POOL_METHODS

EXAMPLE = """\
example:
  convert-to-gqa ./llama-mha ./llama-gqa8 --num-kv-heads 8 --verify
  convert-to-gqa ./llama-mha ./llama-gqa8 --num-kv-heads 8 --grouping similarity \\
      --calibration-text corpus.txt --dry-run

supported model_type values: {types}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert-to-gqa",
        description=(
            "Convert a local Hugging Face checkpoint to grouped-query attention by pooling its key/value heads "
            "(GQA paper: mean-pool, then uptrain). Streams shard by shard; the output is written to a temporary "
            "directory next to DST and renamed into place only when complete."
        ),
        epilog=EXAMPLE.format(types=", ".join(supported_model_types())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", type=Path, help="source checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", type=Path, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--num-kv-heads", "-g", type=int, required=True, metavar="G",
                        help="new number of KV heads; must divide the query and current KV head counts (1 = MQA)")
    parser.add_argument("--method", choices=POOL_METHODS, default="mean",
                        help="mean-pool each group (default), or keep its first / a random member head")
    parser.add_argument("--grouping", choices=GROUPINGS, default="adjacent",
                        help="pool adjacent heads (default) or regroup the most similar heads first")
    parser.add_argument("--calibration-text", type=Path, metavar="FILE",
                        help="with --grouping similarity: compare heads by their K/V activations on this text")
    parser.add_argument("--seed", type=int, default=0, help="seed for --method random (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (tensors, shapes, bytes); write nothing")
    parser.add_argument("--verify", action="store_true",
                        help="load source and output with transformers; report logit difference and perplexity")
    parser.add_argument("--verify-text", type=Path, metavar="FILE", help="text for --verify (default: built-in sample)")
    parser.add_argument("--allow-bin", action="store_true",
                        help="accept pickled pytorch_model*.bin weights (torch.load weights_only=True)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def _read_text(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConversionError(f"cannot read {path}: {err.strerror}") from err


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = convert_to_gqa(
            args.src,
            args.dst,
            num_kv_heads=args.num_kv_heads,
            method=args.method,
            grouping=args.grouping,
            overwrite=args.overwrite,
            dry_run=args.dry_run,
            calibration_text=_read_text(args.calibration_text),
            seed=args.seed,
            allow_bin=args.allow_bin,
            verify=args.verify,
            verify_text=_read_text(args.verify_text),
            progress=not args.quiet,
        )
    except ConversionError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - the CLI boundary: report, then exit 1 as documented
        traceback.print_exc()
        print(f"{parser.prog}: unexpected error (this is a bug; please report it with the trace above)", file=sys.stderr)
        return 1
    print(report.summary(tensors=args.dry_run))
    return 0
