"""`python -m deltakern ...`: the `deltakern` command (see deltakern.cli)."""

from deltakern.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
