"""medadapt: adapt a small reasoning LLM to medicine and measure which adaptation works."""

__version__ = "0.1.0"
