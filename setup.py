"""Audex: one decoder-only LLM that hears and speaks (NeMo-style framework).

Install torch first (``pip install torch==2.13.0``: a newer torch would pull a multi-GB CUDA build), then
``pip install -e .`` (or ``pip install -e .[dev]`` for tests).
"""

import os
import sysconfig

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop
from setuptools.command.editable_wheel import editable_wheel

PTH = "audex-nemo.pth"


class BuildPyWithPth(build_py):
    """Ships ``audex-nemo.pth`` at the top of site-packages (registers Audex with NeMo's allow-list)."""

    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))


class EditableWheelWithPth(editable_wheel):
    """``pip install -e .`` (PEP 660): add ``audex-nemo.pth`` beside setuptools' own editable ``.pth``."""

    def _select_strategy(self, name, tag, build_lib):
        strategy = super()._select_strategy(name, tag, build_lib)

        class _WithPth:
            def __enter__(self):
                strategy.__enter__()
                return self

            def __exit__(self, *exc):
                return strategy.__exit__(*exc)

            def __call__(self, wheel, files, mapping):
                strategy(wheel, files, mapping)
                with open(PTH) as f:
                    wheel.writestr(PTH, f.read())

        return _WithPth()


class DevelopWithPth(develop):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(sysconfig.get_paths()["purelib"], PTH))


setup(
    name="audex",
    version="0.1.0",
    description="Train, evaluate and deploy one decoder-only LLM that hears and speaks",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["audex", "audex.*"]) + ["audex.assets"],
    py_modules=["audex_nemo_hook"],
    package_data={"audex": ["assets/*.txt", "eval/reference_tables/*", "conf/*.yaml", "conf/**/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch==2.13.0",
        "nemo-toolkit[common]==3.0.0",
        "lhotse==1.33.0",
        "datasets>=4,<6",               # scripts/prepare_hf_dataset.py (Lhotse's CutSet.from_huggingface_dataset)
        "braceexpand",                  # NeMo's sharded-manifest notation (audex.data.nemo_manifest)
        "transformers>=5.0,<6",
        "accelerate",                  # transformers' sharded loading (DistributedConfig: TP, FSDP, EP)
        "hydra-core>=1.3,<=1.3.2",
        "omegaconf>=2.3,<=2.3.0",
        "lightning>=2.4",
        "safetensors",
        "soundfile",
        "jiwer",
        "sacrebleu",
        "whisper-normalizer",
        "tqdm",
        "urllib3",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "hypothesis", "ruff", "onnx", "onnxruntime"],
        # nvidia-pytriton (the Triton server binary) is installed with --no-deps by scripts/setup_env.sh: its
        # numpy<2 pin would downgrade the whole environment
        "export": ["onnx", "onnxruntime", "tritonclient[all]"],
        # the TensorRT-LLM release the deployment code is written and checked against (audex/export/executor_blocks.py
        # TRTLLM_VERSION); CUDA hosts only, never installed by scripts/setup_env.sh
        "trtllm": ["tensorrt_llm==1.2.0rc2"],
        # engine megatron (model.backbone.engine: megatron); written and tested against 0.16.1, the newest release
        # for Python 3.11 (later ones need Python >= 3.12); audex/parallel/megatron_specs.py gates the version
        "megatron": ["megatron-core>=0.16.1,<0.17"],
    },
    entry_points={
        "console_scripts": [
            "audex-train=audex.cli.train:main",
            "audex-train-chain=audex.cli.train_chain:main",
            "audex-infer=audex.cli.infer:main",
            "audex-eval=audex.cli.eval:main",
            "audex-params=audex.cli.params:main",
            "audex-plan-parallelism=audex.cli.plan_parallelism:main",
            "audex-export=audex.cli.export:main",
            "audex-export-trtllm=audex.cli.export:main",  # the 0.1 name of audex-export, kept for existing scripts
            "audex-triton-repo=audex.cli.triton_repo:main",
            "audex-serve=audex.cli.serve:main",
            "audex-client=audex.cli.client:main",
        ]
    },
    cmdclass={"build_py": BuildPyWithPth, "develop": DevelopWithPth, "editable_wheel": EditableWheelWithPth},
)
