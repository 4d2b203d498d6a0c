"""The command line: `python -m rlrun.report <run or sweep dir> [...] [-o out]`."""

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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
