"""streamq: streaming GPTQ quantization of DeepSeek-V3-style Mixture-of-Experts checkpoints."""

from streamq.errors import StreamqError

__all__ = ["StreamqError"]
__version__ = "0.1.0"
