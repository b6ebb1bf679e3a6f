"""`dsv4-convert`: official DeepSeek-V4 checkpoints <-> this plugin's Hugging Face folders. The arguments are parsed in
`dsv4_cli.py` (usage there, and no torch import for `--help`); this module runs the parsed command."""

from __future__ import annotations

import json
import signal
import sys

from .checkpoint import ConversionError, ConversionInterrupted
from .to_official import convert_plugin_to_official
from .to_plugin import convert_official_to_plugin
from .transcode import transcode_experts_to_fp8
from .verify import verify_folder


def run(args) -> int:
    """Run a parsed `dsv4-convert` command (see `dsv4_cli.convert_parser`); returns the exit code: 0, 2 for a bad
    input or a failed write (one `dsv4-convert: error:` line, no traceback), 130 when interrupted."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        report = _run(args)
    except ConversionInterrupted as exc:
        print(f"dsv4-convert: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before anything was written (validation, planning)
        print("dsv4-convert: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except ConversionError as exc:
        print(f"dsv4-convert: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # reading the source: permissions, a vanished file, an I/O error
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dsv4-convert: error: {where}{exc.strerror or exc}; nothing was written.", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    if report is not None:
        print(report)
    return 0


def _terminate(signum, frame):
    """SIGTERM ends a conversion like Ctrl-C: cleanly, keeping finished shards for --resume."""
    raise KeyboardInterrupt


def _run(args):
    if args.command == "verify":
        print(json.dumps(verify_folder(args.folder, args.source, args.samples), indent=2))
        return None
    common = dict(shard_size=args.shard_size, dry_run=args.dry_run, resume=args.resume, progress=not args.no_progress)
    if args.command == "to-hf":
        return convert_official_to_plugin(args.src, args.dst, dtype=args.dtype, **common)
    if args.command == "to-official":
        return convert_plugin_to_official(args.src, args.dst, expert_dtype=args.expert_dtype, **common)
    return transcode_experts_to_fp8(args.src, args.dst, **common)


def main(argv: list[str] | None = None) -> int:
    from dsv4_cli import convert_main

    return convert_main(argv)


if __name__ == "__main__":
    sys.exit(main())
