"""`python -m pipeline ...` — the pipeline's command line.

Only a placeholder until the SFT issue lands the runner: it says so instead of pretending.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(
        "demo not yet available: the pipeline runner and its stages are still being built "
        f"(asked for: {' '.join(argv) or 'nothing'}). The model package `ppllava` is usable today; "
        "see README.md.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
