"""Merge a LoRA adapter into its base model: python scripts/merge_adapter.py adapter=PATH output=PATH

Options and details: `python scripts/merge_adapter.py --help` and finetune/merge.py.
"""

import sys

from finetune.merge import main

if __name__ == "__main__":
    sys.exit(main())
