"""``audex-eval``: see :mod:`audex.cli.eval` (``python examples/audex_eval.py --help`` lists the config groups)."""

from audex.cli.eval import main

if __name__ == "__main__":
    main()
