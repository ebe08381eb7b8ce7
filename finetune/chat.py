"""finetune-chat: talk to a trained adapter (or a merged model) in the terminal.

    finetune-chat adapter=outputs/run/adapter [system="..."] [temperature=0.7 ...]
    python -m finetune.chat model=merged/

Each reply streams as it is generated, rendered with the chat template the adapter was trained
with (saved beside it), and the conversation so far goes with every turn. /reset forgets it,
/exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from finetune.config import options_from_args
from finetune.errors import UserError
from finetune.sampling import Sampling


@dataclass
class ChatConfig:
    adapter: Optional[str] = None
    """Adapter directory of a run (its base is loaded and quantized as in training)."""
    model: Optional[str] = None
    """Or a merged model directory (HF safetensors, as finetune-merge writes it)."""
    system: Optional[str] = None
    """System prompt, kept at the top of the conversation."""
    temperature: float = 0.7
    """0 picks the most likely token every time (greedy)."""
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: Optional[int] = None
    """Makes sampled replies repeatable."""
    device: str = "auto"
    """auto (a GPU if there is one), cpu or cuda."""
    impl: str = "auto"
    """Model path for an adapter: auto (native wherever it applies), native or hf."""


USAGE = """\
usage: finetune-chat adapter=PATH | model=PATH [key=value ...]

options (default first):
  adapter=PATH                 a run's adapter directory (base loaded as in training)
  model=PATH                   or a merged model directory
  system="..."                 system prompt
  temperature=0.7  top_p=0.9  top_k=0  repetition_penalty=1.0  max_new_tokens=256  seed=N
  device=auto|cpu|cuda  impl=auto|native|hf

in the chat: /reset forgets the conversation, /exit or Ctrl-D quits
"""


def parse_args(argv: list[str]) -> tuple[ChatConfig, Sampling]:
    """`key=value` arguments -> the checked ChatConfig and the Sampling it asks for."""
    config = options_from_args(ChatConfig, argv, " (finetune-chat --help lists the options)")
    if (config.adapter is None) == (config.model is None):
        raise UserError("give exactly one of adapter=PATH (a run's adapter) or model=PATH (a merged model)")
    key, path = ("adapter", config.adapter) if config.adapter is not None else ("model", config.model)
    if not Path(path).expanduser().is_dir():
        # Said before main imports bitsandbytes and the model code, which take seconds.
        raise UserError(f"{key}={path}: the directory does not exist")
    try:
        sampling = Sampling(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                            top_k=config.top_k, top_p=config.top_p, repetition_penalty=config.repetition_penalty,
                            seed=config.seed)
    except ValueError as error:
        raise UserError(str(error)) from None
    return config, sampling


def chat(config: ChatConfig, sampling: Sampling, read=input, write=sys.stdout.write) -> None:
    """The conversation loop: `read(prompt)` gives the user's lines, `write` shows the replies."""
    import finetune
    from finetune.generation import stream_reply

    path = config.adapter if config.adapter is not None else config.model
    model, tokenizer = finetune.load(path, device=config.device, impl=config.impl)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer saved in {path} has no chat template to render a conversation with")
    start = [{"role": "system", "content": config.system}] if config.system else []
    history = list(start)
    write(f"chatting with {path}. /reset forgets the conversation, /exit or Ctrl-D quits.\n")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            write("\n")
            return
        if line == "/exit":
            return
        if line == "/reset":
            history = list(start)
            write("(conversation cleared)\n")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        for piece in stream_reply(model, tokenizer, history, sampling):
            write(piece)
            sys.stdout.flush()
            reply += piece
        write("\n")
        history.append({"role": "assistant", "content": reply.strip()})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help", "help") for arg in argv):
        print(USAGE)
        return 0
    from finetune.cli import quiet_libraries
    from finetune.hub_code import keep_hub_code_out

    try:
        config, sampling = parse_args(argv)
        keep_hub_code_out()
        quiet_libraries()
        chat(config, sampling)
    except UserError as error:
        print(f"finetune-chat: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
