"""``audex-export``: see :mod:`audex.cli.export` (``python examples/audex_export.py --help`` lists the config groups)."""

from audex.cli.export import main

if __name__ == "__main__":
    main()
