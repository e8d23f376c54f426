"""``audex-client``: see :mod:`audex.cli.client` (``python examples/audex_client.py --help`` lists the config groups)."""

from audex.cli.client import main

if __name__ == "__main__":
    main()
