"""Command lines of the pip package, kept outside `modeling_deepseek_v4` so that `--help` and argument errors answer
at once: importing the package imports torch and transformers (it registers the model with the Auto classes), so
the commands import it only to run.

    dsv4 demo | card ...                  (also `python -m modeling_deepseek_v4`)
    dsv4-convert to-hf | to-official | fp4-to-fp8 | verify ...   (also `python -m modeling_deepseek_v4.conversion.cli`)
"""

from __future__ import annotations

import argparse
import re
import sys

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

CONVERT_DOC = """official DeepSeek-V4 checkpoints <-> this plugin's Hugging Face folders.

    dsv4-convert to-hf SRC DST [--dtype bf16|fp32|keep]       official FP8/FP4 -> plugin folder
    dsv4-convert to-official SRC DST [--expert-dtype fp4|fp8]  plugin folder -> official layout
    dsv4-convert fp4-to-fp8 SRC DST                            official FP4 experts -> lossless FP8 experts
    dsv4-convert verify DST [--source SRC]                     completeness + sampled exactness
Common flags: --shard-size 5GB, --dry-run (print the plan, write nothing), --resume (continue an interrupted run)."""


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `2GiB`, ... -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 5GB, 500MB or 2GiB.")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def dsv4_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 for Hugging Face transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build, save, reload and generate with a built-in tiny DeepSeek-V4")
    demo.add_argument("--output-dir", help="keep the saved model here (default: a temporary folder)")
    demo.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per prompt (default 16)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random tiny model and prompts (default 0)")
    card = sub.add_parser("card", help="render README.md (a model card) for a model or adapter folder")
    card.add_argument("folder", help="a saved model or adapter folder")
    card.add_argument("--output", help="where to write (default FOLDER/README.md)")
    card.add_argument("--license", help="license identifier for the card metadata (e.g. mit)")
    card.add_argument("--base-model", help="base model repo id (adapters and fine-tunes)")
    card.add_argument("--dataset", action="append", dest="datasets", help="training dataset id (repeatable)")
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source folder")
    p.add_argument("dst", help="destination folder (must not exist)")
    p.add_argument("--shard-size", type=parse_size, default=5 * 10**9, help="max output shard size (default 5GB)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (tensors, bytes, shards), write nothing")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run, keeping verified shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv4-convert", description=CONVERT_DOC, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="official checkpoint -> plugin folder")
    _common(to_hf)
    to_hf.add_argument(
        "--dtype", choices=["bf16", "fp32", "keep"], default="bf16", help="bf16 (exact), fp32, or keep FP8/FP4 bytes"
    )
    to_off = sub.add_parser("to-official", help="plugin folder -> official layout")
    _common(to_off)
    to_off.add_argument(
        "--expert-dtype", choices=["fp4", "fp8"], default="fp4", help="routed experts as FP4 (as released) or FP8"
    )
    fp8 = sub.add_parser("fp4-to-fp8", help="official FP4 experts -> lossless FP8 experts")
    _common(fp8)
    ver = sub.add_parser("verify", help="check a converted plugin folder")
    ver.add_argument("folder", help="the converted plugin folder")
    ver.add_argument("--source", help="the official folder it came from (sampled exactness check)")
    ver.add_argument("--samples", type=int, default=8, help="tensors compared with --source (default 8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`dsv4`: parse, then import the package and run."""
    args = dsv4_parser().parse_args(argv)
    from modeling_deepseek_v4.__main__ import run

    return run(args)


def convert_main(argv: list[str] | None = None) -> int:
    """`dsv4-convert`: parse, then import the converter and run."""
    args = convert_parser().parse_args(argv)
    from modeling_deepseek_v4.conversion.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
