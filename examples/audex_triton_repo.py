"""``audex-triton-repo``: see :mod:`audex.cli.triton_repo` (``python examples/audex_triton_repo.py --help`` lists the config groups)."""

from audex.cli.triton_repo import main

if __name__ == "__main__":
    main()
