"""Fine-tune a 4-bit base model with LoRA: `python train.py [recipe=NAME] [key=value ...]`."""

from finetune.entry import check_dependencies

if __name__ == "__main__":
    # Hub code is kept out by the CLI itself, right before the recipe imports bitsandbytes: a bad
    # override fails at compose time, seconds before that import would have finished.
    check_dependencies("python train.py")

    from finetune.cli import main

    main()
