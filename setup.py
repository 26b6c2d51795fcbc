"""fastdino: a throughput-first DINO trainer. See README.md."""

from setuptools import find_packages, setup

setup(
    name="fastdino",
    version="0.1.0",
    description="Throughput-first self-supervised ViT pretraining (DINO) with Triton kernels",
    python_requires=">=3.10",
    # kernels/ is installed as fastdino.kernels, never as a top-level `kernels` (that name is Hugging Face's, a
    # transformers dependency); fastdino/kernels/__init__.py finds the folder in a checkout (see its docstring).
    packages=find_packages(include=["fastdino", "fastdino.*"]),
    package_dir={"fastdino.kernels": "kernels"},
    install_requires=[
        "torch>=2.5",
        "torchvision>=0.20",
        "matplotlib>=3.5",  # PNG figures (reports/plots.py, Agg): curves, phase bars, attention and SiT grids
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "safetensors",  # fastdino export --format timm|hf writes, and every reader takes, .safetensors weights
    ],
    extras_require={
        # timm (local-dir: loading), transformers 5 (AutoImageProcessor backends): the exports are loaded back by
        # the real libraries in tests/test_interop_*.py, and model.arch=timm/<name> is tested;
        # transformers 5.x brings Hugging Face's `kernels` package, which tests/test_packaging.py needs
        "dev": ["pytest", "ruff", "timm>=1.0.16", "transformers>=5"],
        "tensorboard": ["tensorboard"],  # the training log also as TensorBoard events (<train.output_dir>/tb/)
        "gpu": ["nvidia-ml-py"],  # pynvml: GPU telemetry in the training log, benchmarks and profile
        "dali": ["nvidia-dali-cuda130"],  # data.backend=dali: decode and multi-crop on the GPU
        "deepspeed": ["deepspeed>=0.19"],  # train.engine=deepspeed: ZeRO stage 1 / 2
        "timm": ["timm>=1.0"],  # model.arch=timm/<name>: any timm backbone
    },
    entry_points={"console_scripts": ["fastdino=fastdino.cli:main"]},
)
