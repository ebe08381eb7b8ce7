"""Training objectives: what the step asks for the loss of a batch.

Supervised fine-tuning takes the token cross-entropy. The preference objectives score whole
responses by their summed token log-probs log pi(y|x) (`TrainableModel.sequence_logps`; chosen
and rejected of B pairs are the 2B sequences of one forward) and, for DPO, IPO and KTO, compare
them with a reference model's, log pi_ref(y|x) (`Reference`). Each loss is written from its
paper; the tests check them against the formulas and against TRL's.

Every objective returns this micro-batch's share of the step's loss (its summed per-item loss /
the step's item count: tokens for SFT, pairs for pair objectives, rows for KTO) and metric sums
with their counts, which the step adds up over micro-batches and processes before dividing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from finetune import data as data_lib
from finetune.config import DpoLossType, ObjectiveConfig, ObjectiveName
from finetune.lora import FSDP_WRAPPED
from finetune.models import TrainableModel

Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (sum over items, item count)


class Objective(Protocol):
    def targets(self, micro_batches: list[dict]) -> int:
        """How many items the step's loss is normalized by, over all its micro-batches."""

    def loss(self, model, batch: dict, device: torch.device, packed_boundaries: bool,
             num_items: int) -> tuple[torch.Tensor, Metrics]:
        """This micro-batch's share of the step's loss (its summed loss / `num_items`), and its metrics."""


class SupervisedFineTuning:
    """Next-token cross-entropy on the trained tokens (labels != IGNORE_INDEX)."""

    def targets(self, micro_batches: list[dict]) -> int:
        # Labels that some position predicts: the first label of a row has no position before it.
        return sum(int((mb["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum()) for mb in micro_batches)

    def loss(self, model: TrainableModel, batch: dict, device: torch.device, packed_boundaries: bool,
             num_items: int) -> tuple[torch.Tensor, Metrics]:
        return model(**data_lib.model_inputs(batch, device, packed_boundaries), num_items_in_batch=num_items).loss, {}


def add_metrics(totals: dict[str, torch.Tensor], metrics: Metrics) -> None:
    """Add a micro-batch's (sum, count) metrics into `totals`: name -> float64 [sum, count]."""
    for name, (value, count) in metrics.items():
        pair = torch.stack([value.detach().double(), count.detach().double()])
        totals[name] = totals[name] + pair if name in totals else pair


def metric_means(names: list[str], totals: torch.Tensor) -> dict[str, float]:
    """(len(names), 2) [sum, count] rows -> each metric's mean (those with nothing counted are left out)."""
    return {name: value / count for name, (value, count) in zip(names, totals.tolist()) if count}


# The losses, from the papers, on per-sequence log-probs. Each returns per-item losses (B,).


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
               reference_rejected: torch.Tensor, beta: float, loss_type: DpoLossType,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """h = beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))), summed log-probs.

    sigmoid: -(1 - e) log s(h) - e log s(-h)     (Rafailov et al. 2023; e: Mitchell's conservative DPO)
    hinge:   max(0, 1 - h)                        (SLiC-HF, Zhao et al. 2023)
    ipo:     (h / beta - 1 / (2 beta))^2          (Azar et al. 2023, eq. 17; beta is their tau); the
             caller passes per-token mean log-probs, the form the IPO authors' results use (TRL's note)
    robust:  ((1 - e)(-log s(h)) - e(-log s(-h))) / (1 - 2e)   (Chowdhury et al. 2024, eq. 8)
    """
    log_ratio = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    h = beta * log_ratio
    e = label_smoothing
    if loss_type is DpoLossType.sigmoid:
        return -(1 - e) * F.logsigmoid(h) - e * F.logsigmoid(-h)
    if loss_type is DpoLossType.hinge:
        return torch.relu(1 - h)
    if loss_type is DpoLossType.ipo:
        return (log_ratio - 1 / (2 * beta)) ** 2
    return (-(1 - e) * F.logsigmoid(h) + e * F.logsigmoid(-h)) / (1 - 2 * e)


def simpo_losses(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """-log s(beta * mean log pi(y_w) - beta * mean log pi(y_l) - gamma)   (Meng et al. 2024, eq. 6),
    mean: per token of the response; label smoothing as for DPO's sigmoid."""
    h = beta * (chosen_mean - rejected_mean) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def orpo_losses(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, orpo_lambda: float) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """(losses, log odds ratios): -mean log pi(y_w) - lambda log s(log odds(y_w) - log odds(y_l)),
    odds(y) = P(y) / (1 - P(y)) with P(y) = exp(mean token log-prob)   (Hong et al. 2024, eqs. 2-7)."""
    # log odds = log P - log(1 - P), with log(1 - P) = log(-expm1(log P)): exact near P = 1.
    log_odds = (chosen_mean - rejected_mean) - (torch.log(-torch.expm1(chosen_mean))
                                                - torch.log(-torch.expm1(rejected_mean)))
    return -chosen_mean - orpo_lambda * F.logsigmoid(log_odds), log_odds


def kto_losses(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
               beta: float, desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """r = log pi(y|x) - log pi_ref(y|x), z0 = the (detached) KL estimate   (Ethayarajh et al. 2024, eq. 8):
    desirable: lambda_D (1 - s(beta (r - z0))), undesirable: lambda_U (1 - s(beta (z0 - r)))."""
    r = policy - reference
    return torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))


# The reference model.


@dataclass
class Reference:
    """The reference model's log-probs: the same base with the adapter off, or, when the run started
    from an adapter (model.adapter), that adapter's weights copied into the trainable ones for the
    forward and the trained ones back after it; either way no second copy of the base.

    `starting_adapter`: the starting adapter as this process holds its weights (`Reference.starting_from`):
    whole, or under FSDP this process's shard of each, which FSDP gathers in the forward as it gathers
    the trained ones. `table`: precomputed (chosen, rejected) log-probs of every training pair, looked
    up by `pair_index` instead of computed.
    """

    starting_adapter: dict[str, torch.Tensor] | None = None
    table: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def starting_from(cls, model: nn.Module) -> Reference:
        """The adapter `model` holds now (this process's shards of it, once FSDP has wrapped it) as the reference."""
        return cls({name: weight.detach().clone() for name, weight in trainable_weights(model).items()})

    def logps(self, model, inputs: dict, batch: dict) -> torch.Tensor:
        """(2B,) for a pair batch: chosen then rejected, like the policy's."""
        if self.table is not None:
            index = batch["pair_index"].long()
            chosen, rejected = self.table
            return torch.cat([chosen[index], rejected[index]]).to(inputs["input_ids"].device)
        return self.computed(model, inputs)

    @torch.no_grad()
    def computed(self, model, inputs: dict) -> torch.Tensor:
        with self.active(model):
            return model(**inputs, per_sequence_logps=True).logps

    @contextlib.contextmanager
    def active(self, model):
        """The reference in place of the policy; evaluation mode, so LoRA dropout never perturbs it."""
        was_training = model.training
        model.eval()
        try:
            if self.starting_adapter is None:
                with unwrapped(model).adapter_disabled():
                    yield
            else:
                # In place: the optimizer, and FSDP's flat parameters under use_orig_params, hold these tensors.
                weights = trainable_weights(model)
                trained = {name: weight.detach().clone() for name, weight in weights.items()}
                copy_weights(weights, self.starting_adapter)
                try:
                    yield
                finally:
                    copy_weights(weights, trained)
        finally:
            model.train(was_training)


def unwrapped(model: nn.Module) -> TrainableModel:
    """The model inside a DDP or FSDP wrapper (its forward is still the one to call: the wrappers
    prepare gradient reduction and gather shards there)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, (DistributedDataParallel, FullyShardedDataParallel)) else model


def trainable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable (LoRA) weights as this process holds them, by parameter name (FSDP's marker
    dropped): whole, or under FSDP (use_orig_params) views of this process's shard of each, flat,
    and empty where its shard holds none of a weight."""
    return {name.replace(FSDP_WRAPPED, ""): weight for name, weight in unwrapped(model).named_parameters()
            if weight.requires_grad}


@torch.no_grad()
def copy_weights(weights: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for name, weight in weights.items():
        # copy_ would broadcast a shard into a whole weight of another shape without a word.
        if weight.shape != values[name].shape:
            raise RuntimeError(f"{name}: the reference holds shape {tuple(values[name].shape)}, the model "
                               f"{tuple(weight.shape)}: the model was sharded otherwise than when it was taken.")
        weight.copy_(values[name])


def sequence_inputs(batch: dict, device: torch.device, packed_boundaries: bool) -> dict:
    """The forward's keyword arguments for per-sequence log-probs, on `device`."""
    keys = ("input_ids", "attention_mask", "labels", "position_ids", *(("cu_seqlens",) if packed_boundaries else ()))
    return {key: batch[key].to(device, non_blocking=True) for key in keys if key in batch}


# The preference objectives.


class PairPreference:
    """DPO, IPO, ORPO and SimPO on micro-batches of B pairs (2B sequences: chosen, then rejected)."""

    def __init__(self, cfg: ObjectiveConfig, reference: Reference | None = None):
        self.cfg = cfg
        self.loss_type = DpoLossType.ipo if cfg.name is ObjectiveName.ipo else cfg.loss_type
        self.reference = reference if cfg.needs_reference else None

    def targets(self, micro_batches: list[dict]) -> int:
        return sum(len(mb["pair_index"]) for mb in micro_batches)

    def loss(self, model, batch: dict, device: torch.device, packed_boundaries: bool,
             num_items: int) -> tuple[torch.Tensor, Metrics]:
        inputs = sequence_inputs(batch, device, packed_boundaries)
        reference = self.reference.logps(model, inputs, batch) if self.reference else None
        policy = model(**inputs, per_sequence_logps=True)
        losses, metrics = self.pair_losses(policy.logps, policy.token_counts, reference)
        return losses.sum() / num_items, metrics

    def pair_losses(self, logps: torch.Tensor, counts: torch.Tensor,
                    reference: torch.Tensor | None) -> tuple[torch.Tensor, Metrics]:
        """logps, counts, reference (2B,): chosen then rejected -> per-pair losses (B,) and metrics."""
        cfg, B = self.cfg, logps.shape[0] // 2
        chosen, rejected = logps[:B], logps[B:]
        mean = logps / counts.clamp(min=1)
        chosen_mean, rejected_mean = mean[:B], mean[B:]
        extra = {}
        if cfg.name in (ObjectiveName.dpo, ObjectiveName.ipo):
            reference_chosen, reference_rejected = reference[:B], reference[B:]
            scale = counts.clamp(min=1) if self.loss_type is DpoLossType.ipo else torch.ones_like(logps)
            losses = dpo_losses(chosen / scale[:B], rejected / scale[B:], reference_chosen / scale[:B],
                                reference_rejected / scale[B:], cfg.beta, self.loss_type, cfg.label_smoothing)
            chosen_rewards = cfg.beta * (chosen - reference_chosen).detach()
            rejected_rewards = cfg.beta * (rejected - reference_rejected).detach()
        elif cfg.name is ObjectiveName.simpo:
            losses = simpo_losses(chosen_mean, rejected_mean, cfg.beta, cfg.gamma, cfg.label_smoothing)
            chosen_rewards, rejected_rewards = cfg.beta * chosen_mean.detach(), cfg.beta * rejected_mean.detach()
        else:
            losses, log_odds = orpo_losses(chosen_mean, rejected_mean, cfg.orpo_lambda)
            chosen_rewards, rejected_rewards = cfg.beta * chosen_mean.detach(), cfg.beta * rejected_mean.detach()
            extra = {"nll": -chosen_mean.detach(), "log_odds_ratio": log_odds.detach()}
        per_pair = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen.detach(),
            "logps/rejected": rejected.detach(),
            **extra,
        }
        count = torch.tensor(float(B), device=logps.device)
        return losses, {name: (values.sum(), count) for name, values in per_pair.items()}


class KahnemanTversky:
    """KTO on micro-batches of B rows (prompt + completion, `kto_label`), with the mismatched rows
    `kl_*` (prompt i, completion i + 1) for the KL estimate z0 = max(0, mean(log pi - log pi_ref)),
    not differentiated (the paper's choice).

    The mean runs over the KL rows of the micro-batches that train side by side: with several
    processes, every process's micro-batch at the same place in the step. Their log-ratio sums and
    row counts are added up across processes (TRL averages the processes' means, which weighs a
    process's rows by how few it has), so every process uses the same z0 and W processes compute
    what one computes on a micro-batch holding all their rows and KL rows. KL rows pair completions
    within a micro-batch, so a micro-batch of one row has none; z0 = 0 when none of those
    micro-batches has any (micro-batches of one row everywhere).
    """

    def __init__(self, cfg: ObjectiveConfig, reference: Reference,
                 sum_across_processes: Callable[[torch.Tensor], torch.Tensor] | None = None):
        # None: one process, or evaluation, where every process runs every micro-batch itself.
        self.cfg, self.reference, self.sum_across_processes = cfg, reference, sum_across_processes

    def targets(self, micro_batches: list[dict]) -> int:
        return sum(len(mb["pair_index"]) for mb in micro_batches)

    def loss(self, model, batch: dict, device: torch.device, packed_boundaries: bool,
             num_items: int) -> tuple[torch.Tensor, Metrics]:
        cfg = self.cfg
        inputs = sequence_inputs(batch, device, packed_boundaries)
        reference = self.reference.computed(model, inputs)
        kl = self.kl_estimate(model, batch, inputs, device, packed_boundaries)
        policy = model(**inputs, per_sequence_logps=True).logps
        desirable = batch["kto_label"].to(device).bool()
        losses = kto_losses(policy, reference, desirable, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        rewards = cfg.beta * (policy - reference).detach()
        undesirable = ~desirable
        metrics = {
            "rewards/chosen": ((rewards * desirable).sum(), desirable.sum().float()),
            "rewards/rejected": ((rewards * undesirable).sum(), undesirable.sum().float()),
            "logps/chosen": ((policy.detach() * desirable).sum(), desirable.sum().float()),
            "logps/rejected": ((policy.detach() * undesirable).sum(), undesirable.sum().float()),
            "kl": (kl, torch.ones((), device=device)),
        }
        return losses.sum() / num_items, metrics

    @torch.no_grad()
    def kl_estimate(self, model, batch: dict, inputs: dict, device: torch.device,
                    packed_boundaries: bool) -> torch.Tensor:
        """z0 over this micro-batch's KL rows and, with several processes, theirs alike."""
        kl_rows = {key.removeprefix("kl_"): value for key, value in batch.items() if key.startswith("kl_")}
        if kl_rows:
            kl_inputs = sequence_inputs(kl_rows, device, packed_boundaries)
        elif self.sum_across_processes is not None:
            # FSDP gathers each layer's shards in every forward, so a process that skipped the two
            # forwards below while another ran them would leave it waiting. Its stand-in, one token
            # with no label, has log-probs 0 under both models: a log-ratio of 0, and no row counted.
            first = inputs["input_ids"][:1, :1]
            kl_inputs = {"input_ids": first, "labels": torch.full_like(first, data_lib.IGNORE_INDEX)}
        else:
            return torch.zeros((), device=device)
        log_ratios = model(**kl_inputs, per_sequence_logps=True).logps - self.reference.computed(model, kl_inputs)
        rows = log_ratios.numel() if kl_rows else 0
        totals = torch.stack([log_ratios.sum(), log_ratios.new_tensor(float(rows))])  # [sum, row count]
        if self.sum_across_processes is not None:
            totals = self.sum_across_processes(totals)
        # No row counted anywhere leaves a sum of 0 as well: z0 = 0 / 1.
        return (totals[0] / totals[1].clamp(min=1)).clamp(min=0)


def build_objective(cfg: ObjectiveConfig, reference: Reference | None = None,
                    sum_across_processes: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Objective:
    """The objective `cfg` names; `reference` for those that compare with one (DPO, IPO, KTO);
    `sum_across_processes` (a tensor summed over the processes training a step together) where
    the processes' micro-batches share a statistic (KTO's KL estimate)."""
    if cfg.name is ObjectiveName.sft:
        return SupervisedFineTuning()
    if cfg.name is ObjectiveName.kto:
        return KahnemanTversky(cfg, reference or Reference(), sum_across_processes)
    return PairPreference(cfg, reference or Reference())
