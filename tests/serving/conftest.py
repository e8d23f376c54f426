"""The Triton tests need ``tritonclient`` (the ``export`` extra, installed by ``scripts/setup_env.sh``); without it
they are not collected, and pytest says so."""

import importlib.util

TRITON_TESTS = ["test_triton_repo.py", "test_triton_serve.py", "test_triton_ensemble.py", "test_serving_cli.py",
                "test_llm_api_triton.py"]

if importlib.util.find_spec("tritonclient") is None:
    collect_ignore = TRITON_TESTS
    print(f"tests/serving: tritonclient is not installed (pip install -e .[export]); not collected: {TRITON_TESTS}")
