"""The `edgeshard` command line: argparse and printing only; nothing imports this package."""
