"""`dsv4-convert`: official DeepSeek-V4 checkpoints <-> this plugin's Hugging Face folders. The arguments are parsed in
`dsv4_cli.py` (usage there, and no torch import for `--help`); this module runs the parsed command."""

from __future__ import annotations

import json
import sys

from .checkpoint import ConversionError
from .to_official import convert_plugin_to_official
from .to_plugin import convert_official_to_plugin
from .transcode import transcode_experts_to_fp8
from .verify import verify_folder


def run(args) -> int:
    """Run a parsed `dsv4-convert` command (see `dsv4_cli.convert_parser`); returns the exit code."""
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


def main(argv: list[str] | None = None) -> int:
    from dsv4_cli import convert_main

    return convert_main(argv)


if __name__ == "__main__":
    sys.exit(main())
