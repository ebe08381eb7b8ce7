"""Evaluation of a trainable model: held-out loss, greedy answers, exact match, and how figures read."""

from __future__ import annotations

import math

import torch

from finetune import data as data_lib
from finetune.generation import chat_replies
from finetune.sampling import Sampling
from finetune.models import TrainableModel
from finetune.training.objective import Objective, add_metrics, metric_means


@torch.no_grad()
def evaluate_loss(model: TrainableModel, samples, micro_batch_size: int, pad_id: int, device: torch.device) -> dict:
    """Token-averaged loss over every trainable token of the eval set, and its perplexity."""
    model.eval()
    total_loss, total_targets = 0.0, 0
    for batch in data_lib.eval_batches(samples, micro_batch_size, pad_id):
        targets = int((batch["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum())
        batch = {k: v.to(device) for k, v in batch.items()}
        # num_items_in_batch=1 makes the model return the summed (not averaged) token loss.
        total_loss += model(**batch, num_items_in_batch=1).loss.item()
        total_targets += targets
    eval_loss = total_loss / total_targets
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}


@torch.no_grad()
def evaluate_objective(model, objective: Objective, batches, device: torch.device, packed_boundaries: bool) -> dict:
    """A preference objective's loss and metrics over the whole eval split (every pair, or KTO row,
    weighs the same), as eval_loss and eval_<metric>."""
    model.eval()
    total_loss, items, sums = 0.0, 0, {}
    for batch in batches:
        # num_items=1: the micro-batch's summed per-item loss.
        loss, metrics = objective.loss(model, batch, device, packed_boundaries, 1)
        total_loss += loss.item()
        items += objective.targets([batch])
        add_metrics(sums, metrics)
    names = sorted(sums)
    means = metric_means(names, torch.stack([sums[name] for name in names])) if names else {}
    return {"eval_loss": total_loss / items, **{f"eval_{name}": value for name, value in means.items()}}


def preference_wins(model: TrainableModel, tokenizer, pairs, max_new_tokens: int, batch_size: int) -> dict:
    """Greedy answers to the pairs' prompts (batched, KV-cached): the share that is the chosen
    response, and the rejected one."""
    answers = chat_replies(model, tokenizer, [pair.messages for pair in pairs], Sampling(max_new_tokens=max_new_tokens),
                           batch_size)
    chosen = sum(answer == tokenizer.decode(pair.chosen_ids, skip_special_tokens=True).strip()
                 for answer, pair in zip(answers, pairs))
    rejected = sum(answer == tokenizer.decode(pair.rejected_ids, skip_special_tokens=True).strip()
                   for answer, pair in zip(answers, pairs))
    return {"chosen_wins": chosen / len(pairs), "rejected_wins": rejected / len(pairs)}


def generate_answer(model: TrainableModel, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """Greedy answer to a conversation, rendered with the chat template as in training."""
    return chat_replies(model, tokenizer, [messages], Sampling(max_new_tokens=max_new_tokens))[0]


def exact_match(model: TrainableModel, tokenizer, samples, max_new_tokens: int, batch_size: int) -> float:
    """Share of prompts whose greedy answer equals the reference last assistant turn exactly.

    The prompts are answered `batch_size` at a time (left-padded, KV-cached).
    """
    answers = chat_replies(model, tokenizer, [s.messages[:-1] for s in samples],
                           Sampling(max_new_tokens=max_new_tokens), batch_size)
    hits = sum(answer == s.messages[-1]["content"].strip() for answer, s in zip(answers, samples))
    return hits / len(samples)


def format_metrics(metrics: dict, before: dict | None = None) -> str:
    """`loss 1.75, ...`, or with `before` each figure beside where it started: `loss 1.75 (from 6.21), ...`."""
    shown = [("loss", "eval_loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
             ("exact match", "exact_match", "{:.1%}"), ("reward accuracy", "eval_rewards/accuracy", "{:.1%}"),
             ("margin", "eval_rewards/margins", "{:.3f}"), ("chosen answers", "chosen_wins", "{:.1%}"),
             ("rejected answers", "rejected_wins", "{:.1%}")]
    parts = []
    for label, key, style in shown:
        if key in metrics:
            start = f" (from {style.format(before[key])})" if before and key in before else ""
            parts.append(f"{label} {style.format(metrics[key])}{start}")
    return ", ".join(parts)
