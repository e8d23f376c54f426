"""``audex-params``: see :mod:`audex.cli.params` (``python examples/audex_params.py --help`` lists the config groups)."""

from audex.cli.params import main

if __name__ == "__main__":
    main()
