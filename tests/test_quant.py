"""NF4 storage: quantize-on-load gives bit for bit the weights bnb.nn.Linear4bit holds on the generic path."""

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch

from finetune.lora import linear_layers
from finetune.quant import QuantizedWeight, dequantize_bnb
from test_native import checkpoints, generic_model, native_model, run_config  # noqa: F401 (fixture)


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float32"])
def test_quantize_on_load_equals_linear4bit_bit_for_bit(torch_dtype, checkpoints):
    model_dir = checkpoints("qwen2")
    generic = generic_model(model_dir, run_config(model_dir, impl="hf", torch_dtype=torch_dtype))
    model = native_model(model_dir, run_config(model_dir, torch_dtype=torch_dtype))
    expected = {name.removeprefix("base_model.model.").removesuffix(".base_layer"): module
                for name, module in generic.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    layers = linear_layers(model)
    assert sorted(layers) == sorted(expected) and len(layers) == 14
    for name, layer in layers.items():
        reference = expected[name].weight
        assert torch.equal(layer.weight.packed, reference.data), name
        assert layer.weight.dtype == getattr(torch, torch_dtype)
        weight = dequantize_bnb(layer.weight)
        assert torch.equal(weight, bnb_functional.dequantize_4bit(reference.data, reference.quant_state)), name
        if expected[name].bias is not None:
            assert torch.equal(layer.bias, expected[name].bias.to(torch.float32)), name


def test_every_quant_state_tensor_is_a_buffer_that_moves_with_the_module():
    weight = QuantizedWeight.quantize(torch.randn(32, 128))
    assert {"packed", "absmax", "code", "offset", "nested_absmax", "nested_code"} == set(weight.state_dict())
    state = weight.to("meta").quant_state()
    assert all(t.is_meta for t in (weight.packed, state.absmax, state.code, state.offset, state.state2.absmax,
                                   state.state2.code))


def test_storage_follows_the_quant_settings():
    weight = torch.randn(16, 64)
    fp4 = QuantizedWeight.quantize(weight, quant_type="fp4", double_quant=False)
    assert fp4.quant_type == "fp4" and not fp4.nested and fp4.absmax.dtype == torch.float32
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="fp4")
    assert torch.equal(dequantize_bnb(fp4), bnb_functional.dequantize_4bit(packed, state, quant_type="fp4"))


@pytest.mark.parametrize("shape", [(7, 9), (64, 64), (300, 257), (1, 1), (129, 513)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_an_empty_weight_has_the_layout_bitsandbytes_gives(shape, quant_type, double_quant):
    # FSDP's processes but the first build their weights empty and receive the values by broadcast,
    # which needs every buffer's shape and dtype to match the quantized one's. (300, 257): absmax
    # blocks not a multiple of 64, nested blocks not of 256; (7, 9): an odd count of codes.
    def layout(weight):
        buffers = {name: (tuple(b.shape), b.dtype) for name, b in weight.named_buffers()}
        return buffers, (weight.shape, weight.dtype, weight.blocksize, weight.quant_type, weight.nested,
                         getattr(weight, "nested_blocksize", None))

    quantized = QuantizedWeight.quantize(torch.randn(*shape, dtype=torch.bfloat16), quant_type, double_quant)
    empty = QuantizedWeight.empty(shape, torch.bfloat16, quant_type, double_quant)
    assert all(b.is_meta for b in empty.buffers())
    assert layout(empty) == layout(quantized)
