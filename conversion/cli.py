"""`dsv4-convert`: official DeepSeek-V4 checkpoints <-> this plugin's Hugging Face folders.

    dsv4-convert to-hf SRC DST [--dtype bf16|fp32|keep]       official FP8/FP4 -> plugin folder
    dsv4-convert to-official SRC DST [--expert-dtype fp4|fp8]  plugin folder -> official layout
    dsv4-convert fp4-to-fp8 SRC DST                            official FP4 experts -> lossless FP8 experts
    dsv4-convert verify DST [--source SRC]                     completeness + sampled exactness
Common flags: --shard-size 5GB, --dry-run (print the plan, write nothing), --resume (continue an interrupted run).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from .checkpoint import ConversionError
from .to_official import convert_plugin_to_official
from .to_plugin import convert_official_to_plugin
from .transcode import transcode_experts_to_fp8
from .verify import verify_folder

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 5GB, 500MB or 2GiB.")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source folder")
    p.add_argument("dst", help="destination folder (must not exist)")
    p.add_argument("--shard-size", type=parse_size, default=5 * 10**9, help="max output shard size (default 5GB)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (tensors, bytes, shards), write nothing")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run, keeping verified shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dsv4-convert", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="official checkpoint -> plugin folder")
    _common(to_hf)
    to_hf.add_argument("--dtype", choices=["bf16", "fp32", "keep"], default="bf16")
    to_off = sub.add_parser("to-official", help="plugin folder -> official layout")
    _common(to_off)
    to_off.add_argument("--expert-dtype", choices=["fp4", "fp8"], default="fp4")
    fp8 = sub.add_parser("fp4-to-fp8", help="official FP4 experts -> lossless FP8 experts")
    _common(fp8)
    ver = sub.add_parser("verify", help="check a converted plugin folder")
    ver.add_argument("folder")
    ver.add_argument("--source", help="the official folder it came from (sampled exactness check)")
    ver.add_argument("--samples", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            print(json.dumps(verify_folder(args.folder, args.source, args.samples), indent=2))
            return 0
        common = dict(
            shard_size=args.shard_size, dry_run=args.dry_run, resume=args.resume, progress=not args.no_progress
        )
        if args.command == "to-hf":
            report = convert_official_to_plugin(args.src, args.dst, dtype=args.dtype, **common)
        elif args.command == "to-official":
            report = convert_plugin_to_official(args.src, args.dst, expert_dtype=args.expert_dtype, **common)
        else:
            report = transcode_experts_to_fp8(args.src, args.dst, **common)
    except ConversionError as exc:
        print(f"dsv4-convert: error: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
