"""The command line: `python -m rlrun.report <run or sweep dir> [...] [-o out]`, or `--samples` (a token browser)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import rlrun.report as package
from rlrun.report.data import NotARun, resolve
from rlrun.report.render import report


def main(argv: list[str] | None = None) -> int:
    """Write a report per run or sweep given (one overlaying them all with `-o`); 2 if a path is not a run."""
    parser = argparse.ArgumentParser(prog="python -m rlrun.report", description=package.__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or sweep directories")
    parser.add_argument("-o", "--out", type=Path, help="overlay every run given into one report written here")
    parser.add_argument("--samples", action="store_true",
                        help="instead: a token browser of the rollouts still on disk, <run>/samples.html")
    parser.add_argument("--steps", help="with --samples: the steps to show, e.g. 10,20 (default: the newest on disk)")
    parser.add_argument("--max-rollouts", type=int, default=None, help="with --samples: rollouts per step (default 16)")
    args = parser.parse_args(argv)
    if not args.samples and (args.steps is not None or args.max_rollouts is not None):
        parser.error("--steps and --max-rollouts go with --samples")
    if args.samples:
        return _samples(parser, args)
    try:
        targets = resolve(args.paths)
        if args.out is not None:
            targets = [(args.out, [run for _, runs in targets for run in runs])]
        for target, run_dirs in targets:
            for path in report(target, run_dirs):
                print(path)
    except NotARun as exc:
        print(f"rlrun.report: {exc}", file=sys.stderr)
        return 2
    return 0


def _samples(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`--samples`: `<run>/samples.html` for each run given (each job of a sweep)."""
    from rlrun.report.samples import DEFAULT_MAX_ROLLOUTS, parse_steps, write_samples

    if args.out is not None:
        parser.error("--samples writes <run>/samples.html into each run; -o does not apply")
    if args.max_rollouts is not None and args.max_rollouts < 1:
        parser.error("--max-rollouts must be at least 1")
    try:
        steps = parse_steps(args.steps) if args.steps is not None else None
    except ValueError as exc:
        parser.error(str(exc))
    try:
        for _, run_dirs in resolve(args.paths):
            for run_dir in run_dirs:
                print(write_samples(run_dir, steps, args.max_rollouts or DEFAULT_MAX_ROLLOUTS))
    except NotARun as exc:
        print(f"rlrun.report: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
