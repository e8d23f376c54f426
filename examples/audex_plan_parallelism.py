"""``audex-plan-parallelism``: see :mod:`audex.cli.plan_parallelism` (``--help`` lists the config groups)."""

from audex.cli.plan_parallelism import main

if __name__ == "__main__":
    main()
