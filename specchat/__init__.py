"""specchat: chat with a model larger than your memory, fast, through SpecExec speculative decoding."""

__version__ = "0.1.0"
