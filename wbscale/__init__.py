"""wbscale: distributed training of white-box (CRATE) language models."""

__version__ = "0.1.0"
