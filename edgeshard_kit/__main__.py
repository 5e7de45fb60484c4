"""`python -m edgeshard_kit` runs the `edgeshard` command line."""

from edgeshard_kit.cli.main import main

raise SystemExit(main())
