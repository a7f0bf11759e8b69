"""``convert-to-gqa`` command line (the converter itself is :func:`hf_attn_plugin.conversion.convert_to_gqa`).

Exit status: 0 success, 2 bad usage, bad input or an environment problem such as a full disk (one line on
stderr, nothing written), 1 unexpected error (a bug: traceback), 130 interrupted (nothing written).
Only the standard library is imported until the arguments are parsed and checked.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Sequence

PROG = "convert-to-gqa"
# The library's choices (hf_attn_plugin.conversion.pooling.POOL_METHODS and api.GROUPINGS), repeated here so
# that --help needs no torch; tests/test_conversion.py checks that they agree.
METHODS = ("mean", "first", "random")
GROUPINGS = ("adjacent", "similarity")

DESCRIPTION = """\
Convert a local Hugging Face checkpoint (multi-head attention, or GQA with more KV heads than you want) to
grouped-query attention by pooling its key/value heads, as in the GQA paper: mean-pool each group of K/V
heads, then uptrain briefly (examples/uptrain_gqa.py). Only the tensors that hold K/V heads change.

The conversion streams shard by shard (memory about one shard) and writes DST through a work directory
beside it that is renamed into place only when complete: on any error nothing is written.
DST gets the converted safetensors (and index), config.json with the new KV head count, and these files of
SRC if present: generation_config.json, tokenizer files, chat templates, README.md and licence files.
Other files (notes, other weight formats such as a stale pytorch_model.bin, folders) are not copied.
A Hugging Face cache snapshot (.../models--org--name/snapshots/<revision>) works as SRC.
"""

EPILOG = """\
examples:
  # see what would change (tensors, shapes, sizes) without writing anything
  convert-to-gqa ./llama-mha ./llama-gqa8 --num-kv-heads 8 --dry-run

  # convert, then compare source and converted logits / perplexity on a sample text
  convert-to-gqa ./llama-mha ./llama-gqa8 --num-kv-heads 8 --verify

  # group the most similar heads before pooling, judged on your own text; then verify on held-out text
  convert-to-gqa ./llama-mha ./llama-gqa4 -g 4 --grouping similarity \\
      --calibration-text train_sample.txt --verify --verify-text held_out.txt

  # multi-query attention (one KV head), replacing an earlier output
  convert-to-gqa ./llama-mha ./llama-mqa -g 1 --overwrite

--num-kv-heads must divide the attention heads and the current KV heads and be smaller than the current
count. Supported model types: llama, mistral, mixtral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, olmo2
(docs/conversion.md). The same tool: python -m hf_attn_plugin.conversion.

exit status: 0 done; 2 bad arguments, bad input or a write failure (one line on stderr, nothing written);
1 unexpected error (a bug: please report the traceback).
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path, help="source checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", type=Path, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--num-kv-heads", "-g", type=_positive_int, required=True, metavar="G",
                        help="new number of KV heads: fewer than now, dividing the attention and KV heads (1 = MQA)")
    parser.add_argument("--method", choices=METHODS, default="mean",
                        help="mean-pool each group (default, the paper's best), or keep its first / a random head")
    parser.add_argument("--grouping", choices=GROUPINGS, default="adjacent",
                        help="pool adjacent heads (default) or first regroup the most similar heads")
    parser.add_argument("--calibration-text", type=Path, metavar="FILE",
                        help="with --grouping similarity: compare heads by their K/V activations on this text")
    parser.add_argument("--seed", type=int, default=0, help="seed for --method random (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (tensors, shapes, bytes); write nothing")
    parser.add_argument("--verify", action="store_true",
                        help="before DST is put in place, run source and output with transformers and report the "
                             "largest logit difference and both perplexities (loads one whole model at a time)")
    parser.add_argument("--verify-text", type=Path, metavar="FILE",
                        help="text for --verify (default: a built-in English sample)")
    parser.add_argument("--allow-bin", action="store_true",
                        help="accept pickled pytorch_model*.bin weights (torch.load weights_only=True); "
                             "the output is safetensors")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def _check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.calibration_text is not None and args.grouping != "similarity":
        parser.error("--calibration-text is only used with --grouping similarity")
    if args.verify_text is not None and not args.verify:
        parser.error("--verify-text is only used with --verify")
    if args.verify and args.dry_run:
        parser.error("--verify needs a written output and --dry-run writes nothing: drop one of them")


def _read_text(path: Path | None, option: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _UsageError(f"{option} {path} is not UTF-8 text") from None
    except OSError as err:
        raise _UsageError(f"cannot read {option} {path}: {err.strerror or err}") from None


class _UsageError(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_combinations(parser, args)
    try:
        calibration_text = _read_text(args.calibration_text, "--calibration-text")
        verify_text = _read_text(args.verify_text, "--verify-text")
    except _UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logger = logging.getLogger("hf_attn_plugin.conversion")
    logger.addHandler(handler)
    logger.propagate = False

    # The heavy imports (torch, transformers), only now that the arguments are known to be usable.
    from hf_attn_plugin.conversion import ConversionError, convert_to_gqa

    try:
        report = convert_to_gqa(
            args.src,
            args.dst,
            num_kv_heads=args.num_kv_heads,
            method=args.method,
            grouping=args.grouping,
            overwrite=args.overwrite,
            dry_run=args.dry_run,
            calibration_text=calibration_text,
            seed=args.seed,
            allow_bin=args.allow_bin,
            verify=args.verify,
            verify_text=verify_text,
            progress=not args.quiet,
        )
    except ConversionError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the CLI boundary: report, then exit 1 as documented
        traceback.print_exc()
        print(f"{PROG}: unexpected error (this is a bug; please report it with the trace above)", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    print(report.summary(tensors=args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
