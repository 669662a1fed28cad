from setuptools import setup

TOOL_TOPICS = ("common", "eval", "scoring", "diagnose", "bench", "stress", "sim", "deploy")

setup(
    name="headkv-vllm",
    version="0.1.0",
    description="HeadKV head-level KV-cache compression as a vLLM plugin",
    python_requires=">=3.10",
    packages=["headkv_vllm", "headkv_vllm.core", "headkv_vllm.engine", "headkv_vllm.method",
              "headkv_vllm.tools", *(f"headkv_vllm.tools.{topic}" for topic in TOOL_TOPICS),
              "headkv_vllm.kernels", "headkv_vllm.configs"],
    # kernels/ and configs/ (the shipped head-score files) are top-level folders installed
    # inside the package; the engine finds score files through headkv_vllm.configs.
    package_dir={"headkv_vllm.kernels": "kernels", "headkv_vllm.configs": "configs"},
    package_data={"headkv_vllm.configs": ["*.json"]},
    install_requires=["vllm==0.32.*"],
    extras_require={
        "convert": ["gguf>=0.17", "accelerate>=1.0"],
        # score-heads, eval-needle, eval-ruler (wonderwords: its word lists), bench and budgets --png
        "tools": ["matplotlib>=3.7", "tqdm>=4.60", "wonderwords>=2.2"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "openai>=1.0", "requests"],
    },
    entry_points={
        "vllm.general_plugins": ["headkv = headkv_vllm:register"],
        "vllm.stat_logger_plugins": ["headkv_metrics = headkv_vllm.engine.metrics:HeadKVStatLogger"],
        "console_scripts": ["headkv-vllm = headkv_vllm.cli:main"],
    },
)
