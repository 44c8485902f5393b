from pathlib import Path

from setuptools import setup

setup(
    name="vicinity_attn",
    version="0.1.0",
    description="Fused Triton kernels and a linear PyTorch backend for vicinity attention (Vicinity Vision Transformer)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ ships inside the package: a top-level "kernels" would clash with other projects.
    packages=["vicinity_attn", "vicinity_attn.backends", "vicinity_attn.layers", "vicinity_attn.tools",
              "vicinity_attn.kernels", "vicinity_attn.kernels.vicinity", "vicinity_attn.kernels.knn"],
    package_dir={"vicinity_attn": "vicinity_attn", "vicinity_attn.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "matplotlib"],  # the bench and gpu_check tests write plots
        "bench": ["matplotlib", "pytest-benchmark"],
    },
)
