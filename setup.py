from setuptools import find_packages, setup

setup(
    name="ofa-scale",
    version="0.1.0",
    description="Pretrain and finetune OFA at cluster scale (DeepSpeed, megatron-core, webdataset)",
    packages=find_packages(include=["ofa_scale", "ofa_scale.*"]),
    python_requires=">=3.10",
    # Versions are pinned in requirements/*.txt; here only what the package needs to import.
    install_requires=["torch", "numpy", "pillow", "pyyaml", "webdataset", "tokenizers", "sentencepiece",
                      "safetensors", "pyarrow"],
    extras_require={"train": ["deepspeed", "megatron-core", "mlflow"], "demo": ["gradio"]},
    entry_points={
        "console_scripts": [
            "ofa-preprocess=ofa_scale.cli.preprocess:main",
            "ofa-convert=ofa_scale.cli.convert_ckpt:main",
            "ofa-train=ofa_scale.train:main",
            "ofa-plan=ofa_scale.parallel.planner_cli:main",
            "ofa-eval=ofa_scale.cli.evaluate:main",
            "ofa-predict=ofa_scale.predict.cli:main",
            "ofa-demo=ofa_scale.demo.cli:main",
        ]
    },
)
