"""One row of each data format -> the text to tokenize and the character spans to train on (for
preference data: the prompt's text and each response's).

Chat spans are found by rendering the conversation incrementally, never by searching for
strings: an assistant turn starts where the rendering of the conversation before it, plus the
generation prompt, ends, and stops where the rendering through that turn ends. Every partial
rendering must be a prefix of the whole, which is checked; templates that rewrite earlier turns
(some drop old reasoning, some move the system prompt) are refused with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2

from finetune.config import DataConfig, DataFormat, LossOn
from finetune.data.samples import DataError

# Formats rendered with the chat template.
CHAT_FORMATS = (DataFormat.messages, DataFormat.instruction, DataFormat.preference, DataFormat.kto)
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


def uses_chat(data: DataConfig) -> bool:
    """Whether any of the data is rendered with a chat template."""
    formats = [source.format or data.format for source in data.sources] or [data.format]
    return data.path == "demo" or any(data_format in CHAT_FORMATS for data_format in formats)


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


def checked_messages(messages: object, where: str, column: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{column}' must be a non-empty list of {{role, content}} objects, "
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
            renderings[count, add_generation_prompt] = apply_template(
                messages[:count], tokenizer, template, where, add_generation_prompt)
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


def apply_template(messages: list[dict], tokenizer, template: str, where: str, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except (jinja2.TemplateError, TypeError) as error:  # a template raising, or adding str to None
        raise DataError(f"{where}: the chat template rejects this conversation: {error}") from None


@dataclass
class RenderedPair:
    """A preference row as text: the prompt through the generation prompt, and what follows it."""

    prompt: str
    chosen: str  # KTO: the completion
    rejected: str  # "" for KTO rows
    label: bool | None  # KTO: is the completion desirable; None for pairs
    messages: list[dict]  # the prompt conversation


def render_preference_row(row: dict, data_format: DataFormat, tokenizer, template: str, where: str) -> RenderedPair:
    """A {prompt, chosen, rejected} row, a conversation pair, or a KTO {prompt, completion, label} row.

    A prompt string becomes a user message, a response string the assistant's answer; message-list
    responses render turn by turn after the prompt. Chosen and rejected message lists that open with
    a turn before the answer are whole conversations, split into prompt and answers without reading
    a 'prompt' column (datasets such as UltraFeedback keep the prompt in both, and in a column too).
    Each response is the text the whole conversation renders to after the prompt's rendering with
    the generation prompt, which must be a prefix of it (as for SFT's trained spans).
    """
    if data_format is DataFormat.kto:
        if row["prompt"] is None:
            raise DataError(f"{where}: column 'prompt' is empty; KTO rows need a prompt, a completion and a label.")
        prompt = _prompt_messages(row["prompt"], where)
        label = row["label"]
        if not isinstance(label, bool):
            raise DataError(f"{where}: column 'label' must be true (a desirable completion) or false (an undesirable "
                            f"one), got {type(label).__name__} {label!r}.")
        responses = [_response_messages(row["completion"], "completion", where)]
    elif row.get("prompt") is None or all(_opens_a_conversation(row[column]) for column in ("chosen", "rejected")):
        label = None
        prompt, *responses = _split_conversation_pair(row["chosen"], row["rejected"], tokenizer, template, where)
    else:
        label = None
        prompt = _prompt_messages(row["prompt"], where)
        responses = [_response_messages(row[column], column, where) for column in ("chosen", "rejected")]
    prompt_text = apply_template(prompt, tokenizer, template, where, add_generation_prompt=True)
    texts = [_response_text(prompt, response, prompt_text, tokenizer, template, where) for response in responses]
    return RenderedPair(prompt_text, texts[0], texts[1] if len(texts) > 1 else "", label, prompt)


def _opens_a_conversation(response: object) -> bool:
    first = response[0] if isinstance(response, list) and response else None
    return isinstance(first, dict) and first.get("role", SHAREGPT_ROLES.get(first.get("from"))) != "assistant"


def _prompt_messages(prompt: object, where: str) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return checked_messages(prompt, where, "prompt")
    raise DataError(f"{where}: column 'prompt' must hold a string or a list of {{role, content}} messages, "
                    f"got {type(prompt).__name__}.")


def _response_messages(response: object, column: str, where: str) -> list[dict]:
    if isinstance(response, str):
        messages = [{"role": "assistant", "content": response}]
    elif isinstance(response, list):
        messages = checked_messages(response, where, column)
        if messages[0]["role"] != "assistant":
            raise DataError(f"{where}: '{column}' must begin with an assistant message, got role "
                            f"{messages[0]['role']!r}; earlier turns belong in 'prompt'.")
    else:
        raise DataError(f"{where}: column '{column}' must hold a string or a list of {{role, content}} messages, "
                        f"got {type(response).__name__}.")
    if not any((message.get("content") or "").strip() for message in messages):
        raise DataError(f"{where}: '{column}' is empty; every row needs a non-empty response there. Fill it in "
                        "or leave the row out.")
    return messages


def _split_conversation_pair(chosen: object, rejected: object, tokenizer, template: str,
                             where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen response, rejected response) of two whole conversations.

    The prompt is everything before the last assistant turn, which both conversations must render
    identically: prefixes are compared as the chat template renders them, message by message, so a
    common start of the two answers' text never counts as prompt.
    """
    for column, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list):
            raise DataError(f"{where}: without a 'prompt' column, '{column}' must be a whole conversation (a list of "
                            f"{{role, content}} messages), got {type(value).__name__}. Pass the prompt in a column "
                            "(data.columns.prompt=...) to pair string answers.")
    conversations = [checked_messages(chosen, where, "chosen"), checked_messages(rejected, where, "rejected")]
    last_turns = []
    for column, messages in zip(("chosen", "rejected"), conversations):
        assistant = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        if not assistant or not assistant[-1]:
            raise DataError(f"{where}: without a 'prompt' column, '{column}' must be a whole conversation: turns "
                            "before an assistant answer, then the answer. Pass the prompt in a 'prompt' column "
                            "(data.columns.prompt) or add the turns that lead to the answer.")
        last_turns.append(assistant[-1])
    shared = 0
    shortest = min(len(messages) for messages in conversations)
    while shared < shortest and len({apply_template(messages[:shared + 1], tokenizer, template, where, False)
                                     for messages in conversations}) == 1:
        shared += 1
    if shared < max(last_turns) or last_turns[0] != last_turns[1]:
        what = "share no prefix" if shared == 0 else f"render differently from message {shared}"
        raise DataError(
            f"{where}: chosen and rejected {what}, before their last assistant turns (messages {last_turns[0]} and "
            f"{last_turns[1]}); a conversation pair must repeat the same turns and differ only in the final "
            "answer. Give differing histories their own rows, or pass a 'prompt' column.")
    prompt = conversations[0][:last_turns[0]]
    return prompt, conversations[0][last_turns[0]:], conversations[1][last_turns[1]:]


def _response_text(prompt: list[dict], response: list[dict], prompt_text: str, tokenizer, template: str,
                   where: str) -> str:
    whole = apply_template(prompt + response, tokenizer, template, where, add_generation_prompt=False)
    if not whole.startswith(prompt_text):
        raise DataError(
            f"{where}: the chat template does not render conversations incrementally (the prompt with its "
            "generation prompt renders to text that is not a prefix of the prompt followed by the answer), so "
            "the answer cannot be located. Pass a template that appends turns, e.g. data.chat_template=chatml.")
    return whole[len(prompt_text):]
