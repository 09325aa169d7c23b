"""Data: sources (FineWeb-Edu, local files, a generated multi-hop corpus) -> packed token blocks on Ray Data."""

from mythos_platform.data.multihop import Problem, corpus_documents, generate_problems, render
from mythos_platform.data.packing import pack_documents, tokenize_and_pack
from mythos_platform.data.pipeline import build_datasets
from mythos_platform.data.sources import DataSourceError

__all__ = [
    "Problem",
    "generate_problems",
    "render",
    "corpus_documents",
    "pack_documents",
    "tokenize_and_pack",
    "build_datasets",
    "DataSourceError",
]
