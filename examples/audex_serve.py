"""``audex-serve``: see :mod:`audex.cli.serve` (``python examples/audex_serve.py --help`` lists the config groups)."""

from audex.cli.serve import main

if __name__ == "__main__":
    main()
