"""`python -m pipeline COMMAND ...`: the pipeline's command line.

    synth OUT_DIR      write synthetic videos, images, multi-image sets, annotations and cards
    run RECIPE         run a recipe's stages (not yet available: the runner is being built)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

from pipeline.data.synthetic import SynthSettings, generate


def _synth(args: argparse.Namespace) -> int:
    settings = SynthSettings(**{f.name: getattr(args, f.name) for f in fields(SynthSettings)})
    if settings.size % 2:
        print(f"--size must be even (H.264 4:2:0), got {settings.size}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    counts = generate(args.out_dir, settings)
    summary = ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in counts.items())
    print(f"wrote {summary} to {args.out_dir} in {time.perf_counter() - start:.1f}s (cards in {args.out_dir}/cards)")
    return 0


def _not_yet(args: argparse.Namespace) -> int:
    print(f"demo not yet available: `{args.command}` needs the pipeline runner and its stages, which are still "
          "being built. Usable today: `python -m pipeline synth OUT_DIR` and the `ppllava` model package "
          "(see README.md).", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="PPLLaVA training pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write synthetic training data (moving coloured shapes)")
    synth.add_argument("out_dir", help="output directory (created)")
    defaults = SynthSettings()
    for field in fields(SynthSettings):
        synth.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=int,
                           default=getattr(defaults, field.name), help=f"default {getattr(defaults, field.name)}")
    synth.set_defaults(handler=_synth)
    for name in ("run", "validate", "status"):
        command = commands.add_parser(name, help="not yet available")
        command.add_argument("rest", nargs=argparse.REMAINDER)
        command.set_defaults(handler=_not_yet)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
