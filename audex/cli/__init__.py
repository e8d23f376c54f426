"""Audex's command-line entry points, one Hydra style (NeMo's ``hydra_runner``; the commands that build no model use
:mod:`audex.cli.light_runner`, the same runner without importing ``nemo.core``) over the package's own configs.

Each module's ``main`` is a console script (``audex-train``, ``audex-train-chain``, ``audex-infer``, ``audex-eval``,
...) and is what ``examples/audex_*.py`` call; configs come from ``audex/conf`` (package data), so the commands
work from any directory once Audex is installed. ``--help`` lists the config groups; any key is overridable as
``key=value``; ``--config-name=NAME`` picks another primary config of ``audex/conf``.
"""
