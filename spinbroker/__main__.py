"""`python -m spinbroker`: the same as the `spinbroker` command."""

from spinbroker.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
