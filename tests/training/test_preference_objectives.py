"""Preference objectives against their papers' formulas (written out here, independently of
finetune/training/objective.py), on plain log-probs and on tiny models of both paths in fp32."""

import math

import pytest
import torch
from test_native import (checkpoints, generic_model, native_model, random_ids, randomize_lora_B,  # noqa: F401
                         relative_error)
from test_sequence_logps import logps_from_logits, padded_pairs

from finetune.config import ConfigError, DpoLossType, ObjectiveConfig, ObjectiveName
from finetune.data import PreferencePair, collate_kto, collate_kto_packed
from finetune.training.objective import (KahnemanTversky, PairPreference, Reference, build_objective, dpo_losses,
                                         kto_losses, orpo_losses, sequence_inputs, simpo_losses)

CPU = torch.device("cpu")


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---- the papers' formulas, one pair at a time, in plain Python floats ----

def paper_dpo(pc, pr, rc, rr, beta, loss_type, eps=0.0):
    # Rafailov et al. 2023 eq. 7; hinge: SLiC (Zhao et al. 2023); IPO: Azar et al. 2023 eq. 17 (tau = beta);
    # conservative DPO (Mitchell 2023); robust DPO: Chowdhury et al. 2024 eq. 8.
    h = math.log(math.exp(pc) / math.exp(rc)) - math.log(math.exp(pr) / math.exp(rr))
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return ((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)


def paper_simpo(pc, nc, pr, nr, beta, gamma):
    # Meng et al. 2024 eq. 6: -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma).
    return -log_sigmoid(beta / nc * pc - beta / nr * pr - gamma)


def paper_orpo(pc, nc, pr, nr, lam):
    # Hong et al. 2024 eqs. 2-7: P = exp(mean log-prob); odds = P / (1 - P); L = L_SFT + lambda L_OR.
    p_w, p_l = math.exp(pc / nc), math.exp(pr / nr)
    odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
    return -pc / nc - lam * log_sigmoid(math.log(odds_ratio))


def paper_kto(policy, reference, desirable, z0, beta, w_d, w_u):
    # Ethayarajh et al. 2024 eq. 8: L = lambda_y - v(x, y), v = lambda_D s(beta (r - z0)) or lambda_U s(beta (z0 - r)).
    r = policy - reference
    sigma = 1 / (1 + math.exp(-(beta * (r - z0) if desirable else beta * (z0 - r))))
    return (w_d - w_d * sigma) if desirable else (w_u - w_u * sigma)


def random_logps(n=6, seed=0, scale=8.0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * scale + 0.1) for _ in range(4)]


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0),
                                            ("robust", 0.0), ("robust", 0.2)])
def test_dpo_losses_equal_the_papers(loss_type, eps):
    pc, pr, rc, rr = random_logps()
    got = dpo_losses(pc, pr, rc, rr, 0.3, DpoLossType(loss_type), eps)
    want = [paper_dpo(*(t[i].item() for t in (pc, pr, rc, rr)), 0.3, loss_type, eps) for i in range(6)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_simpo_orpo_and_kto_losses_equal_the_papers():
    pc, pr, rc, rr = random_logps(seed=1)
    nc, nr = torch.tensor([3, 7, 1, 4, 9, 2.0], dtype=torch.float64), torch.tensor([5, 2, 6, 1, 3, 8.0],
                                                                                  dtype=torch.float64)
    got = simpo_losses(pc / nc, pr / nr, 2.0, 1.0)
    want = [paper_simpo(pc[i].item(), nc[i].item(), pr[i].item(), nr[i].item(), 2.0, 1.0) for i in range(6)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    got, _ = orpo_losses(pc / nc, pr / nr, 0.25)
    want = [paper_orpo(pc[i].item(), nc[i].item(), pr[i].item(), nr[i].item(), 0.25) for i in range(6)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    desirable = torch.tensor([True, False, True, True, False, False])
    got = kto_losses(pc, rc, desirable, torch.tensor(0.7, dtype=torch.float64), 0.5, 1.5, 0.8)
    want = [paper_kto(pc[i].item(), rc[i].item(), bool(desirable[i]), 0.7, 0.5, 1.5, 0.8) for i in range(6)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("name", ["dpo-sigmoid", "dpo-hinge", "dpo-ipo", "dpo-robust", "simpo", "orpo", "kto"])
def test_gradients_pass_gradcheck(name):
    pc, pr, rc, rr = (t.requires_grad_() for t in random_logps(n=4, seed=2, scale=3.0))
    counts = torch.tensor([2.0, 5.0, 3.0, 4.0], dtype=torch.float64)
    if name.startswith("dpo"):
        loss_type = DpoLossType(name.split("-")[1])
        # Away from the hinge's kink: h = beta * log-ratio differences are well inside (-inf, 1) or above.
        def fn(a, b):
            return dpo_losses(a, b, rc.detach(), rr.detach(), 0.1, loss_type, 0.1 if name == "dpo-robust" else 0.0)
    elif name == "simpo":
        def fn(a, b):
            return simpo_losses(a / counts, b / counts, 2.0, 0.5, 0.1)
    elif name == "orpo":
        def fn(a, b):
            return orpo_losses(a / counts, b / counts, 0.3)[0]
    else:
        desirable = torch.tensor([True, False, True, False])

        def fn(a, b):
            return kto_losses(a, b, desirable, torch.tensor(0.2, dtype=torch.float64), 0.4, 1.0, 1.3)
    assert torch.autograd.gradcheck(fn, (pc, pr))


def pair_batch():
    batch = padded_pairs()  # chosen rows 0, 1; rejected rows 2, 3
    batch["pair_index"] = torch.tensor([0, 1])
    return batch


def config(name: str, **kwargs) -> ObjectiveConfig:
    return ObjectiveConfig(name=ObjectiveName(name), **kwargs)


@pytest.mark.parametrize("impl", ["native", "hf"])
@pytest.mark.parametrize("setting", [("dpo", {}), ("dpo", {"loss_type": DpoLossType.hinge}),
                                     ("ipo", {"loss_type": DpoLossType.ipo}),
                                     ("dpo", {"loss_type": DpoLossType.robust, "label_smoothing": 0.1}),
                                     ("simpo", {"beta": 2.0, "gamma": 0.5}), ("orpo", {"orpo_lambda": 0.2})])
def test_objective_on_a_tiny_model_equals_the_paper_on_its_logits(impl, setting, checkpoints):
    """The whole objective (policy and reference forwards, the split into chosen and rejected,
    normalization by pairs) against the formulas on log-probs taken from full logits."""
    name, kwargs = setting
    model_dir = checkpoints("llama")
    model = native_model(model_dir) if impl == "native" else generic_model(model_dir)
    randomize_lora_B(model, seed=7)
    cfg = config(name, **kwargs)
    batch = pair_batch()
    loss, metrics = build_objective(cfg, Reference()).loss(model.train(), batch, CPU, False, num_items=5)
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        policy, counts = logps_from_logits(model.eval()(**inputs).logits, batch["labels"])
        with model.adapter_disabled():
            reference, _ = logps_from_logits(model(**inputs).logits, batch["labels"])
    p, r, n = policy.tolist(), reference.tolist(), counts.tolist()
    want = []
    for i in range(2):
        c, j = i, i + 2
        if name == "ipo":  # on per-token mean log-probs, as the IPO authors' experiments (TRL's note)
            want.append(paper_dpo(p[c] / n[c], p[j] / n[j], r[c] / n[c], r[j] / n[j], cfg.beta, "ipo"))
        elif name == "dpo":
            want.append(paper_dpo(p[c], p[j], r[c], r[j], cfg.beta, cfg.loss_type.value, cfg.label_smoothing))
        elif name == "simpo":
            want.append(paper_simpo(p[c], n[c], p[j], n[j], cfg.beta, cfg.gamma))
        else:
            want.append(paper_orpo(p[c], n[c], p[j], n[j], cfg.orpo_lambda))
    torch.testing.assert_close(loss.item(), sum(want) / 5, rtol=1e-4, atol=1e-5)
    accuracy, count = metrics["rewards/accuracy"]
    assert count.item() == 2 and 0 <= accuracy.item() <= 2
    if name == "dpo":
        margins = sum(cfg.beta * ((p[i] - r[i]) - (p[i + 2] - r[i + 2])) for i in range(2))
        torch.testing.assert_close(metrics["rewards/margins"][0].item(), margins, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["native", "hf"])
def test_kto_on_a_tiny_model_equals_the_paper(impl, checkpoints):
    model_dir = checkpoints("llama")
    model = native_model(model_dir) if impl == "native" else generic_model(model_dir)
    randomize_lora_B(model, seed=8)
    pairs = padded_pairs()
    batch = {key: value[:2] for key, value in pairs.items()}  # two completions (rows 0, 1)
    batch.update(kto_label=torch.tensor([True, False]), pair_index=torch.tensor([0, 1]),
                 **{f"kl_{key}": value[2:] for key, value in pairs.items()})  # two other prompt/completion rows
    cfg = config("kto", beta=0.5, desirable_weight=1.2, undesirable_weight=0.9)
    loss, metrics = KahnemanTversky(cfg, Reference()).loss(model.train(), batch, CPU, False, num_items=2)

    def logps(rows, adapter):
        with torch.no_grad(), (model.adapter_disabled() if not adapter else torch.enable_grad()):
            logits = model.eval()(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
            return logps_from_logits(logits, rows["labels"])[0].tolist()

    kl_rows = {key: value[2:] for key, value in pairs.items()}
    policy, reference = logps(batch, True), logps(batch, False)
    z0 = max(0.0, sum(a - b for a, b in zip(logps(kl_rows, True), logps(kl_rows, False))) / 2)
    want = [paper_kto(policy[i], reference[i], i == 0, z0, 0.5, 1.2, 0.9) for i in range(2)]
    torch.testing.assert_close(loss.item(), sum(want) / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["kl"][0].item(), z0, rtol=1e-4, atol=1e-5)


# KTO rows (prompt, completion lengths; desirable on even rows) whose KL rows are cut to MAX_SEQ_LEN:
# row 0's prompt (5) with row 1's completion (7) keeps 5 of its tokens.
KTO_LENGTHS = [(5, 4), (3, 7), (4, 2), (6, 4), (2, 3)]
KTO_ROWS = [PreferencePair(random_ids(1, p, seed=70 + i)[0].tolist(), random_ids(1, c, seed=80 + i)[0].tolist(), [],
                           i % 2 == 0, [], i) for i, (p, c) in enumerate(KTO_LENGTHS)]
MAX_SEQ_LEN = 10
KTO = ObjectiveConfig(name=ObjectiveName.kto, beta=0.5, desirable_weight=1.2, undesirable_weight=0.9)


def kto_model(model_dir, impl: str):
    """A policy and its reference, the adapter it started from (larger weights): the reference's
    sharper next-token distributions give these random tokens lower log-probs than the policy's, so
    the KL rows' mean log-ratio is positive and z0 is not clamped to 0."""
    torch.manual_seed(0)  # LoRA A's initialization: the same model in every process that builds it
    model = native_model(model_dir) if impl == "native" else generic_model(model_dir)
    randomize_lora_B(model, seed=0, std=0.5)
    reference = Reference.starting_from(model)  # the adapter as it is before B moves on
    randomize_lora_B(model, seed=100)
    return model, reference


def lora_gradients(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("impl", ["native", "hf"])
def test_packed_kto_gives_the_padded_log_probs_loss_and_gradients(impl, checkpoints):
    model, reference = kto_model(checkpoints("llama"), impl)
    objective = KahnemanTversky(KTO, reference)
    results = []
    for batch in (collate_kto(KTO_ROWS, 0, MAX_SEQ_LEN), collate_kto_packed(KTO_ROWS, MAX_SEQ_LEN)):
        kl_rows = {key.removeprefix("kl_"): value for key, value in batch.items() if key.startswith("kl_")}
        with torch.no_grad():  # one log-prob per completion and per KL row, from one forward each
            logps = [model.eval()(**sequence_inputs(rows, CPU, model.takes_packed_boundaries), per_sequence_logps=True)
                     for rows in (batch, kl_rows)]
        model.train().zero_grad()
        loss, metrics = objective.loss(model, batch, CPU, model.takes_packed_boundaries, num_items=len(KTO_ROWS))
        loss.backward()
        results.append((logps, loss.detach(), metrics["kl"][0], lora_gradients(model)))
    (padded_logps, padded_loss, padded_kl, padded_grads), (packed_logps, packed_loss, packed_kl, packed_grads) = results
    for padded, packed in zip(padded_logps, packed_logps):
        assert padded.logps.shape == (len(KTO_ROWS),) and torch.equal(padded.token_counts, packed.token_counts)
        torch.testing.assert_close(packed.logps, padded.logps, rtol=1e-5, atol=1e-4)
    assert padded_logps[1].token_counts.tolist() == [5, 2, 4, 3, 4]  # the KL rows' completions, row 0's cut
    assert padded_kl > 0.1  # the KL rows count
    torch.testing.assert_close(packed_kl, padded_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        assert relative_error(packed_grads[name], grad) <= 1e-4, name


@pytest.mark.parametrize("impl", ["native", "hf"])
@pytest.mark.parametrize("loss_type", list(DpoLossType))
def test_dpo_with_large_beta_on_identical_pairs_gives_zero_gradient(impl, loss_type, checkpoints):
    model_dir = checkpoints("llama")
    model = native_model(model_dir) if impl == "native" else generic_model(model_dir)
    randomize_lora_B(model, seed=9)

    def largest_gradient(batch, beta):
        model.zero_grad()
        loss, _ = PairPreference(config("dpo", beta=beta, loss_type=loss_type), Reference()).loss(
            model.train(), batch, CPU, False, num_items=2)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        return max(g.abs().max().item() for g in grads)

    distinct = largest_gradient(pair_batch(), beta=1.0)
    identical = pair_batch()
    for key in ("input_ids", "attention_mask", "labels"):
        identical[key] = torch.cat([identical[key][:2], identical[key][:2]])  # rejected = chosen
    beta = 1e4
    # Chosen and rejected cancel exactly in the math; in fp32 the two rows' backward passes round
    # apart by ~1e-7 of their size, which the loss scales by beta: far below one distinct pair's.
    assert largest_gradient(identical, beta) / beta <= 1e-5 * distinct


@pytest.mark.parametrize("impl", ["native", "hf"])
def test_a_starting_adapter_is_the_reference_and_is_swapped_back_exactly(impl, checkpoints):
    model = native_model(checkpoints("llama")) if impl == "native" else generic_model(checkpoints("llama"))
    randomize_lora_B(model, seed=10)
    starting = {k: v.detach().clone() for k, v in model.adapter_state().items()}
    reference = Reference.starting_from(model)
    randomize_lora_B(model, seed=11)  # the adapter has trained on since
    trained = {k: v.detach().clone() for k, v in model.adapter_state().items()}
    batch = pair_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    reference = reference.computed(model.train(), inputs)
    assert model.training
    assert all(torch.equal(v, trained[k]) for k, v in model.adapter_state().items())
    with torch.no_grad():
        now = model(**inputs, per_sequence_logps=True).logps
        model.load_adapter_state(starting)
        expected = model(**inputs, per_sequence_logps=True).logps
    torch.testing.assert_close(reference, expected, rtol=0, atol=0)
    assert (now - expected).abs().max() > 1e-3


def test_objective_config_rules():
    for cfg, message in [
        (config("dpo", beta=0.0), "objective.beta must be positive"),
        (config("ipo", loss_type=DpoLossType.hinge), "objective=ipo is DPO with loss_type=ipo"),
        (config("dpo", loss_type=DpoLossType.hinge, label_smoothing=0.1), "label_smoothing"),
        (config("dpo", label_smoothing=0.5), r"\[0, 0.5\)"),
        (config("orpo", precompute_reference=True), "has no reference model"),
        (config("kto", precompute_reference=True), "KL estimate"),
        (config("kto", undesirable_weight=0.0), "objective.undesirable_weight must be positive"),
    ]:
        with pytest.raises(ConfigError, match=message):
            cfg.validate()
    with pytest.raises(ConfigError, match="objective=dpo trains on data.format=preference"):
        config("dpo").validate_data({"messages"})
    with pytest.raises(ConfigError, match="objective=kto trains on data.format=kto"):
        config("kto").validate_data({"preference"})
    with pytest.raises(ConfigError, match="objective=sft cannot train"):
        config("sft").validate_data({"preference"})
    config("simpo").validate_data({"preference"})
    config("sft").validate_data({"messages", "text"})


class _TrlStub:
    """What TRL's DPOTrainer._compute_loss reads of its trainer, around log-probs we give it."""

    def __init__(self, loss_type: str, beta: float, label_smoothing: float, token_logps: torch.Tensor):
        from collections import defaultdict
        from types import SimpleNamespace

        outputs = SimpleNamespace(log_probs=token_logps, entropy=torch.zeros_like(token_logps),
                                  mean_logits=torch.zeros_like(token_logps),
                                  is_top1=torch.zeros_like(token_logps, dtype=torch.bool))
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(device=CPU, gather=lambda t: t, gather_for_metrics=lambda t: t)
        self.aux_loss_enabled, self.ld_alpha, self.precompute_ref_logps, self.use_weighting = False, None, True, False
        self.f_divergence_type, self.loss_types, self.loss_weights = "reverse_kl", [loss_type], [1.0]
        self.beta, self.label_smoothing = beta, label_smoothing
        self._metrics, self._total_train_tokens, self._tp_size = defaultdict(lambda: defaultdict(list)), 0, 1
        self.policy = lambda **kwargs: outputs


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_dpo_losses_equal_trls_on_the_same_log_probs(loss_type, eps):
    """TRL's DPOTrainer loss (its _compute_loss, trl 1.15 and 1.16) on per-token log-probs we hand it, against
    PairPreference.pair_losses on the same log-probs summed per sequence."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    B, T = 3, 9
    g = torch.Generator().manual_seed(4)
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for row, (start, end) in enumerate([(2, 9), (4, 7), (3, 9), (2, 5), (5, 9), (3, 8)]):
        completion[row, start:end] = 1
    token_logps = -torch.rand(2 * B, T - 1, generator=g) * 3 * completion[:, 1:]  # (2B, T - 1), 0 off the completion
    reference = -torch.rand(2 * B, generator=g) * 10
    stub = _TrlStub(loss_type, 0.2, eps, token_logps)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": completion, "ref_chosen_logps": reference[:B], "ref_rejected_logps": reference[B:]}
    trl_loss = trl_dpo.DPOTrainer._compute_loss(stub, stub.policy, inputs, return_outputs=False)
    name = "ipo" if loss_type == "ipo" else "dpo"
    ours = PairPreference(config(name, beta=0.2, loss_type=DpoLossType(loss_type), label_smoothing=eps), Reference())
    losses, metrics = ours.pair_losses(token_logps.sum(-1), completion.sum(-1), reference)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-5, atol=1e-6)
    for name, trl_name in [("rewards/chosen", "rewards/chosen"), ("rewards/margins", "rewards/margins"),
                           ("rewards/accuracy", "rewards/accuracies"), ("logps/chosen", "logps/chosen")]:
        value, count = metrics[name]
        assert (value / count).item() == pytest.approx(stub._metrics["train"][trl_name][0], rel=1e-5, abs=1e-6)
