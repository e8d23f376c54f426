"""``audex-train``: see :mod:`audex.cli.train` (``python examples/audex_train.py --help`` lists the config groups)."""

from audex.cli.train import main

if __name__ == "__main__":
    main()
