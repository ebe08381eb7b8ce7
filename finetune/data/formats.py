"""One row of each data format -> the text to tokenize and the character spans to train on.

Chat spans are found by rendering the conversation incrementally, never by searching for
strings: an assistant turn starts where the rendering of the conversation before it, plus the
generation prompt, ends, and stops where the rendering through that turn ends. Every partial
rendering must be a prefix of the whole, which is checked; templates that rewrite earlier turns
(some drop old reasoning, some move the system prompt) are refused with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2

from finetune.config import DataFormat, LossOn
from finetune.data.samples import DataError

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speakers; the datasets that write "user"/"assistant"/"tool" there mean our roles.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system",
                  "user": "user", "assistant": "assistant", "tool": "tool"}

# ChatML, plus the tokenizer's EOS after each assistant turn when EOS is not <|im_end|>: a base
# model without a chat template stops generating at its EOS, so it must learn to emit it.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' and eos_token and eos_token != '<|im_end|>' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_CHAT_TEMPLATES = {"chatml": CHATML}


def chat_template_for(tokenizer, configured: str | None) -> str:
    """`configured` (a built-in name or a Jinja string), else the tokenizer's own, else ChatML."""
    if configured is None:
        return tokenizer.get_chat_template() if tokenizer.chat_template else CHATML
    if configured in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[configured]
    if "{{" in configured or "{%" in configured:
        return configured
    raise DataError(f"data.chat_template={configured!r} is neither a built-in template "
                    f"({', '.join(BUILTIN_CHAT_TEMPLATES)}) nor a Jinja template string.")


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character ranges whose tokens are trained
    # Chat turns: a trained span stops at its last EOS; what a template adds after the
    # end-of-turn token (a newline) is not something the model must learn to emit.
    stop_at_eos: bool
    # Templateless formats: the tokenizer adds its BOS and the pipeline appends a trained EOS,
    # which the chat formats get from their template instead.
    plain: bool


def render_row(row: dict, data_format: DataFormat, loss_on: LossOn, tokenizer, template: str,
               where: str) -> tuple[Rendered, list[dict]]:
    """The row rendered for training, and the conversation it holds ([] for the templateless formats)."""
    if data_format is DataFormat.messages:
        messages = checked_messages(row["messages"], where)
        return render_chat(messages, loss_on, tokenizer, template, where), messages
    if data_format is DataFormat.instruction:
        messages = instruction_messages(row, where)
        return render_chat(messages, loss_on, tokenizer, template, where), messages
    if data_format is DataFormat.prompt_completion:
        prompt, completion = _string(row, "prompt", where), _string(row, "completion", where)
        trained_from = len(prompt) if loss_on in (LossOn.assistant, LossOn.last_assistant) else 0
        return Rendered(prompt + completion, [(trained_from, len(prompt) + len(completion))], False, True), []
    text = _string(row, "text", where)
    return Rendered(text, [(0, len(text))], False, True), []


def checked_messages(messages: object, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, "
                        f"got {type(messages).__name__}.")
    return [_checked_message(message, index, where) for index, message in enumerate(messages)]


def _checked_message(message: object, index: int, where: str) -> dict:
    if not isinstance(message, dict):
        raise DataError(f"{where}: message {index} must be an object with 'role' and 'content', "
                        f"got {type(message).__name__}.")
    # Arrow stores a column of messages as one struct type, filling keys a message lacks with
    # null; dropping them gives the template the message as it was written.
    message = {key: value for key, value in message.items() if value is not None}
    if "role" not in message and "from" in message:
        message = _from_sharegpt(message, index, where)
    if "role" not in message:
        raise DataError(f"{where}: message {index} has no 'role'; found keys {sorted(message)}. Messages are "
                        "{role, content} objects, or ShareGPT's {from, value}.")
    if message["role"] not in ROLES:
        raise DataError(f"{where}: message {index} has unknown role {message['role']!r}; expected one of {ROLES}.")
    if isinstance(message.get("content"), list):
        message["content"] = _text_of_parts(message["content"], index, message["role"], where)
    content_optional = "tool_calls" in message
    if not isinstance(message.get("content"), str) and not (content_optional and "content" not in message):
        raise DataError(f"{where}: message {index} ({message['role']}) needs a string 'content', "
                        f"got {type(message.get('content')).__name__}.")
    return message


def _from_sharegpt(message: dict, index: int, where: str) -> dict:
    speaker, value = message.pop("from"), message.pop("value", None)
    if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
        raise DataError(f"{where}: message {index} has unknown ShareGPT speaker 'from': {speaker!r}; expected one "
                        f"of {tuple(SHAREGPT_ROLES)}. Rename the speaker in the data or leave the message out.")
    if not isinstance(value, str):
        raise DataError(f"{where}: message {index} ({speaker}) needs a string 'value', got {type(value).__name__}.")
    return {**message, "role": SHAREGPT_ROLES[speaker], "content": value}


def _text_of_parts(parts: list, index: int, role: str, where: str) -> str:
    """OpenAI-style content parts as one string, for templates that expect string content."""
    texts = []
    for number, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":
            raise DataError(
                f"{where}: message {index} ({role}), content part {number} is of type {kind!r}; only 'text' "
                "parts can be trained on, as this trainer trains language models on text. Leave such parts (and "
                "the rows that need them) out of the data, or give the content as a string.")
        if not isinstance(part.get("text"), str):
            raise DataError(f"{where}: message {index} ({role}), content part {number} (text) needs a string "
                            f"'text', got {type(part.get('text')).__name__}.")
        texts.append(part["text"])
    # vLLM's OpenAI server joins text parts with a newline before a string-content template sees
    # them, so a model trained on the same join is served the text it learned from.
    return "\n".join(texts)


def instruction_messages(row: dict, where: str) -> list[dict]:
    """An alpaca row as a user/assistant exchange: instruction, then the input (if any) after a blank line."""
    instruction, output = _string(row, "instruction", where), _string(row, "output", where)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{where}: 'input' must be a string or empty, got {type(extra).__name__}.")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _string(row: dict, column: str, where: str) -> str:
    value = row[column]
    if not isinstance(value, str):
        raise DataError(f"{where}: column '{column}' must hold a string, got {type(value).__name__}.")
    return value


def render_chat(messages: list[dict], loss_on: LossOn, tokenizer, template: str, where: str) -> Rendered:
    renderings: dict[tuple[int, bool], str] = {}

    def render(count: int, add_generation_prompt: bool = False) -> str:
        """The first `count` messages rendered, each prefix once (the whole conversation is
        also the rendering through its last turn)."""
        if not count and not add_generation_prompt:
            return ""
        if (count, add_generation_prompt) not in renderings:
            try:
                renderings[count, add_generation_prompt] = tokenizer.apply_chat_template(
                    messages[:count], chat_template=template, tokenize=False,
                    add_generation_prompt=add_generation_prompt)
            except (jinja2.TemplateError, TypeError) as error:  # a template raising, or adding str to None
                raise DataError(f"{where}: the chat template rejects this conversation: {error}") from None
        return renderings[count, add_generation_prompt]

    text = render(len(messages))
    if loss_on is LossOn.everything:
        return Rendered(text, [(0, len(text))], False, False)
    spans = []
    for index in _trained_turns(messages, loss_on):
        start = render(index) if loss_on is LossOn.all_turns else render(index, add_generation_prompt=True)
        through = render(index + 1)
        if not (text.startswith(start) and text.startswith(through)):
            raise DataError(
                f"{where}: the chat template does not render conversations incrementally (the first {index + 1} "
                "messages render to text that is not a prefix of the whole conversation), so turns cannot be "
                "located by position. Pass a template that appends turns, e.g. data.chat_template=chatml, or "
                "train on every token with data.loss_on=everything."
            )
        spans.append((len(start), len(through)))
    return Rendered(text, spans, True, False)


def _trained_turns(messages: list[dict], loss_on: LossOn) -> list[int]:
    if loss_on is LossOn.all_turns:
        return list(range(len(messages)))
    # An assistant turn that opens the conversation answers nothing, and there is no generation
    # prompt to start it from (templates cannot render an empty conversation): it stays context.
    assistant_turns = [index for index, message in enumerate(messages) if message["role"] == "assistant" and index]
    return assistant_turns[-1:] if loss_on is LossOn.last_assistant else assistant_turns
