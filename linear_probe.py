#!/usr/bin/env python
"""Entry point: linear_probe (not yet implemented; see the project's open issues)."""
import sys


def main() -> int:
    print("linear_probe.py: not yet implemented", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
