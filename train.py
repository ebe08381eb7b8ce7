"""Fine-tune a 4-bit base model with LoRA: `python train.py [recipe=NAME] [key=value ...]`."""

from finetune.cli import main

if __name__ == "__main__":
    main()
