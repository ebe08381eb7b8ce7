"""Merge a LoRA adapter into its base model: python scripts/merge_adapter.py adapter=PATH output=PATH

Options and details: `python scripts/merge_adapter.py --help` and finetune/export/merge.py.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout runs without an install
    from finetune.entry import start

    start("python scripts/merge_adapter.py")
    from finetune.export.merge import main

    sys.exit(main())
