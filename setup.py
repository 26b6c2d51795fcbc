"""fastdino: a throughput-first DINO trainer. See README.md."""

from setuptools import find_packages, setup

setup(
    name="fastdino",
    version="0.1.0",
    description="Throughput-first self-supervised ViT pretraining (DINO) with Triton kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["fastdino", "fastdino.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.5",
        "torchvision>=0.20",
        "matplotlib>=3.5",  # PNG figures: curves, phase bars, attention grids (fastdino/reports/plots.py)
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",  # reports/plots.py (Agg): SiT reconstruction grids
    ],
    extras_require={
        "dev": ["pytest", "ruff", "timm"],  # timm: tests of model.arch=timm/<name>
        "tensorboard": ["tensorboard"],
        "gpu": ["nvidia-ml-py"],  # pynvml: GPU telemetry in the training log, benchmarks and profile
        "dali": ["nvidia-dali-cuda130"],  # data.backend=dali: decode and multi-crop on the GPU
        "deepspeed": ["deepspeed>=0.19"],  # train.engine=deepspeed: ZeRO stage 1 / 2
        "timm": ["timm>=1.0"],  # model.arch=timm/<name>: any timm backbone
    },
    entry_points={"console_scripts": ["fastdino=fastdino.cli:main"]},
)
