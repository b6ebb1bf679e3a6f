"""Command line of the pip package: `python -m modeling_deepseek_v4 demo` (also the `dsv4` console script)."""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 for Hugging Face transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build, save, reload and generate with a built-in tiny DeepSeek-V4")
    demo.add_argument("--output-dir", help="keep the saved model here (default: a temporary folder)")
    demo.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per prompt (default 16)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # Tiny ops stall with 2 threads on small CPUs; the demo model is tiny.
    torch.set_num_threads(1)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.output_dir, args.new_tokens, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
