"""Storage accounting for a (partly) quantized model: what ``loraforge info`` prints."""

from __future__ import annotations

from torch import nn

from loraforge.quant import kernels
from loraforge.quant.base import QuantLinear


def quant_summary(model: nn.Module) -> dict:
    """Count a model's storage and parameters.

    Returns a dict:

    - ``quantized_layers``: number of ``QuantLinear`` layers; ``formats``: layers per format name;
    - ``quantized_params``: elements of their dense weights;
    - ``quantized_bytes``: bytes of their stored weights (packed codes plus every quantization constant:
      absmax, or its 8-bit codes, nested absmax and offset; biases and the shared code tables not counted);
    - ``bits_per_param``: ``8 * quantized_bytes / quantized_params`` (None without quantized layers);
      NF4 with double quantization at block size 64 gives 4 + 8/64 + 32/(64*256) + 32/n ≈ 4.127;
    - ``total_bytes``: bytes of every parameter and buffer of the model, each storage counted once
      (tied weights are not counted twice);
    - ``compute_dtypes``: quantized layers per matmul dtype (``float32`` where bf16 was asked for on a device
      without bf16 units: ``quantize_model.resolve_compute_dtype`` falls back);
    - ``matmul_paths``: quantized layers per matmul path (``kernels.describe``: torch's int4 kernel for
      decode-size inputs where the format maps, tiled dequantize-and-matmul otherwise);
    - ``params``: logical parameter count, dense parameters plus ``quantized_params``;
    - ``trainable_params``: elements of parameters with ``requires_grad``.
    """
    formats: dict[str, int] = {}
    compute_dtypes: dict[str, int] = {}
    paths: dict[str, int] = {}
    quantized_params = quantized_bytes = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            weight = module.qweight
            formats[weight.format] = formats.get(weight.format, 0) + 1
            dtype = str(module.compute_dtype).removeprefix("torch.")
            compute_dtypes[dtype] = compute_dtypes.get(dtype, 0) + 1
            path = kernels.describe(weight, module.compute_dtype)
            paths[path] = paths.get(path, 0) + 1
            quantized_params += weight.shape[0] * weight.shape[1]
            quantized_bytes += weight.nbytes
    parameters = list(model.parameters())
    storages = {}
    for tensor in [*parameters, *model.buffers()]:
        storages[tensor.untyped_storage().data_ptr(), tensor.device] = tensor.untyped_storage().nbytes()
    return {
        "quantized_layers": sum(formats.values()),
        "formats": formats,
        "compute_dtypes": compute_dtypes,
        "matmul_paths": paths,
        "quantized_params": quantized_params,
        "quantized_bytes": quantized_bytes,
        "bits_per_param": 8 * quantized_bytes / quantized_params if quantized_params else None,
        "total_bytes": sum(storages.values()),
        "params": sum(p.numel() for p in parameters) + quantized_params,
        "trainable_params": sum(p.numel() for p in parameters if p.requires_grad),
    }
