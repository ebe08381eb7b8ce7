"""The adapter directory: what adapter_format writes, it reads back, and peft loads as the same adapter."""

import json

import pytest
import torch

from finetune.adapter_format import (QUANT_FILE, AdapterError, QuantRecord, lora_key, read_adapter, read_config,
                                     write_adapter)
from finetune.config import Dtype, QuantConfig, QuantStorage, QuantType
from finetune.quant import BLOCKSIZE

TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=101)
R, ALPHA = 4, 12.0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(path)
    return path


def lora_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random LoRA pairs (B non-zero, unlike a fresh adapter's) on q_proj (32 -> 32) and v_proj (32 -> 16)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(TINY_LLAMA["num_hidden_layers"]):
        for module, out_features in (("q_proj", 32), ("v_proj", 16)):
            name = f"model.layers.{layer}.self_attn.{module}"
            tensors[lora_key(name, "lora_A")] = torch.randn(R, 32, generator=generator)
            tensors[lora_key(name, "lora_B")] = torch.randn(out_features, R, generator=generator)
    return tensors


def write(directory, base, use_rslora=False, seed=0) -> dict[str, torch.Tensor]:
    import peft

    tensors = lora_tensors(seed)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], use_rslora=use_rslora,
                             task_type="CAUSAL_LM", base_model_name_or_path=str(base))
    write_adapter(directory, config, tensors)
    return tensors


@pytest.mark.parametrize("use_rslora", [False, True])
def test_what_is_written_reads_back_the_same(base, tmp_path, use_rslora):
    tensors = write(tmp_path / "adapter", base, use_rslora)
    adapter = read_adapter(tmp_path / "adapter")
    assert adapter.config == read_config(tmp_path / "adapter")
    assert adapter.config["r"] == R and adapter.config["base_model_name_or_path"] == str(base)
    assert adapter.replacements == {}
    assert sorted(adapter.lora) == sorted({key.removeprefix("base_model.model.").rsplit(".", 2)[0] for key in tensors})
    for module, lora in adapter.lora.items():
        assert torch.equal(lora.A, tensors[lora_key(module, "lora_A")])
        assert torch.equal(lora.B, tensors[lora_key(module, "lora_B")])
        assert lora.scaling == (ALPHA / R ** 0.5 if use_rslora else ALPHA / R) and lora.magnitude is None


def test_peft_loads_the_written_adapter_as_the_same_weights(base, tmp_path):
    """peft, the independent reference: its model equals the base with W + s·B·A in each adapted layer."""
    import peft
    from transformers import AutoModelForCausalLM

    tensors = write(tmp_path / "adapter", base, use_rslora=True)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    loaded = peft.get_peft_model_state_dict(model)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[key], tensors[key]) for key in tensors)

    merged = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        for module, lora in read_adapter(tmp_path / "adapter").lora.items():
            merged.get_submodule(module).weight += lora.scaling * lora.B @ lora.A
        ids = torch.randint(TINY_LLAMA["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
        expected, got = merged(input_ids=ids).logits, model(input_ids=ids).logits
    assert (got - AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits).abs().max() > 1e-2  # it acts
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "adapter_model.safetensors").unlink(), "needs adapter_config.json and adapter_model.safetensors"),
    (lambda d: _edit_config(d, peft_type="IA3"), "holds a IA3 adapter"),
    (lambda d: _edit_config(d, r=8), "gives model.layers.0.self_attn.q_proj rank 8, but its lora_A has rank 4"),
    (lambda d: _edit_tensors(d, lambda t: t.pop(lora_key("model.layers.1.self_attn.v_proj", "lora_B"))),
     "incomplete LoRA pair for model.layers.1.self_attn.v_proj"),
    (lambda d: _edit_tensors(d, lambda t: t.update({"model.lm_head.weight": torch.zeros(1)})),
     "unexpected tensor 'model.lm_head.weight'"),
])
def test_broken_adapters_are_refused_saying_why(base, tmp_path, change, message):
    write(tmp_path / "adapter", base)
    change(tmp_path / "adapter")
    with pytest.raises(AdapterError, match=message):
        read_adapter(tmp_path / "adapter")


def test_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter(tmp_path / "nowhere")


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, directory / "adapter_model.safetensors")


# ----------------------------------------------------------------------------- the quantization record


def test_an_adapter_without_a_record_gets_the_usual_qlora_settings(tmp_path):
    record = QuantRecord.read(tmp_path)
    assert record == QuantRecord() and record.blocksize == BLOCKSIZE
    assert (record.bnb_4bit_quant_type, record.bnb_4bit_use_double_quant, record.torch_dtype,
            record.bnb_4bit_compute_dtype) == (QuantType.nf4, True, Dtype.bfloat16, Dtype.bfloat16)


def test_the_record_of_a_run_is_written_and_read_back(tmp_path):
    quant = QuantConfig(bnb_4bit_quant_type=QuantType.fp4, bnb_4bit_use_double_quant=False,
                        bnb_4bit_quant_storage=QuantStorage.bfloat16)
    record = QuantRecord.from_config(quant, torch.float32)  # a device without bf16 computed in float32
    record.write(tmp_path)
    assert QuantRecord.read(tmp_path) == record
    # The file trainers have always written: these keys, in this order, plain JSON values.
    assert list(json.loads((tmp_path / QUANT_FILE).read_text()).items()) == [
        ("load_in_4bit", True), ("bnb_4bit_quant_type", "fp4"), ("bnb_4bit_use_double_quant", False),
        ("bnb_4bit_compute_dtype", "float32"), ("bnb_4bit_quant_storage", "bfloat16"), ("blocksize", BLOCKSIZE),
        ("torch_dtype", "bfloat16")]


def test_a_partial_record_takes_the_defaults_for_what_it_lacks(tmp_path):
    (tmp_path / QUANT_FILE).write_text(json.dumps({"torch_dtype": "torch.float16", "future_setting": 1}))
    assert QuantRecord.read(tmp_path) == QuantRecord(torch_dtype=Dtype.float16)


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"bnb_4bit_quant_type": "int4"}', r"bnb_4bit_quant_type 'int4' is not one of \['nf4', 'fp4'\]"),
    ('{"torch_dtype": "float8"}', "torch_dtype 'float8' is not one of"),
    ('{"blocksize": 48}', "blocksize 48 is not one bitsandbytes supports"),
    ('{"bnb_4bit_use_double_quant": "yes"}', "bnb_4bit_use_double_quant must be true or false"),
])
def test_a_malformed_record_is_refused_saying_what_is_wrong(tmp_path, text, message):
    (tmp_path / QUANT_FILE).write_text(text)
    with pytest.raises(AdapterError, match=message):
        QuantRecord.read(tmp_path)
