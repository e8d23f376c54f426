"""``audex-infer``: see :mod:`audex.cli.infer` (``python examples/audex_infer.py --help`` lists the config groups)."""

from audex.cli.infer import main

if __name__ == "__main__":
    main()
