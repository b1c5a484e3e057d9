"""`python -m xtl`: the `xtl` command line."""

from xtl.cli import main

if __name__ == "__main__":
    main()
