"""mrl: how far can Matryoshka embeddings be truncated before retrieval quality drops?"""

__version__ = "0.1.0"
