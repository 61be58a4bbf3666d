#!/usr/bin/env python
"""Entry point: knn_eval (not yet implemented; see the project's open issues)."""
import sys


def main() -> int:
    print("knn_eval.py: not yet implemented", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
