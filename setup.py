from setuptools import find_packages, setup

setup(
    name="mora_dist",
    version="0.1.0",
    description="MoRA and ReMoRA for distributed LLM pretraining with DeepSpeed and megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mora_dist", "mora_dist.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",  # .ci/floors runs the unit tests on 0.16.0; DP-resharded resume needs 0.19
        "megatron-core>=0.16",
        "transformers>=4.57.6",  # the last 4.x line, tested by .ci/floors (4.45-4.56 lack `dtype=`)
        "datasets>=3.0",  # .ci/floors tests 3.0.0
        "tensorboard>=2.15",
        "safetensors>=0.4",
        # pydantic validates the launcher's JSON config; deepspeed already requires it.
        "pydantic>=2.0",
    ],
    extras_require={
        # tokenizers trains the tiny BPE used by tests and the tiny config; matplotlib draws the result plots.
        # accelerate: transformers.Trainer needs it (tests of the Trainer callback adapter).
        # peft: the serving exports are proven by loading them with the real PeftModel (library code never imports it).
        # import-linter: CI checks the layer order of the package (pyproject.toml [tool.importlinter]).
        # pytest-xdist: the integration tests are mostly process start-up and gloo waits, so two pytest workers on
        # two cores finish the suite in about 70 % of the time (one test file per worker: module fixtures once).
        "test": ["pytest>=7", "tokenizers>=0.15", "matplotlib>=3.7", "accelerate>=1.1", "peft>=0.21",
                 "import-linter>=2.17", "pytest-xdist>=3.5"],
    },
)
