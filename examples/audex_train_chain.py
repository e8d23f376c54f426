"""``audex-train-chain``: see :mod:`audex.cli.train_chain` (``python examples/audex_train_chain.py --help`` lists the config groups)."""

from audex.cli.train_chain import main

if __name__ == "__main__":
    main()
