"""An engine-megatron training stage under torchrun, for tests/parallel/test_megatron_lightning.py::

    python -m torch.distributed.run --nproc_per_node 2 tests/parallel/megatron_lightning_run.py OUT OVERRIDES...

:mod:`lightning_run` (the same ``train_stage`` call and ``Recorder``) after the tests-only CPU shim for
megatron-core's CUDA-only helpers (:func:`megatron_cpu.install_cpu_shim`).
"""

import sys

from lightning_run import main
from megatron_cpu import install_cpu_shim

if __name__ == "__main__":
    install_cpu_shim()
    main(sys.argv[1:])
