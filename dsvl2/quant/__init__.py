"""Weight-only int8 and int4 quantization: the scheme (scheme.py), the quantized linear layer (linear.py), the
kernels that multiply by quantized weights (kernels.py), memory estimates (memory.py) and `dsvl2 quantize`
(cli.py)."""
