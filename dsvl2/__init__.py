"""dsvl2: DeepSeek-VL2 in plain PyTorch."""

__version__ = "0.1.0"
