"""`python -m hxgwd` and the console script; the PyInstaller entry imports `main` from here."""

import sys


def main(argv: list[str] | None = None) -> int:
    from hxgwd.cli import main as cli_main

    return cli_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
