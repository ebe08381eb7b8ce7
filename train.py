"""Fine-tune a 4-bit base model with LoRA: `python train.py [recipe=NAME] [key=value ...]`."""

from finetune.entry import start

if __name__ == "__main__":
    start("python train.py")

    from finetune.cli import main

    main()
