"""QLoRA fine-tuning: a 4-bit NF4 base, LoRA adapters, Hydra recipes.

    import finetune
    result = finetune.train(recipe="demo", overrides=["train.max_steps=50"])
    model, tokenizer = finetune.load(result.adapter_dir)
    print(finetune.generate(model, tokenizer, "Where does the frog live?"))
"""

from finetune.api import generate, load, train

__all__ = ["generate", "load", "train"]
