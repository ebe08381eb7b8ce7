"""KTO's KL estimate across processes: two processes on the CPU (gloo), through the recipe's own
start_processes and train_step, compute the loss and gradients that the paper's formula gives on
all their rows at once, with z0 the mean over both processes' KL rows.

The processes hold different numbers of KL rows (3 and 2; 4 and none: a micro-batch of one row has
none), so a mean of the processes' means, or each process's own z0, would fail here. Under DDP
(wrap_for_processes) on both model paths; under torch's FSDP (as tests/training/fsdp_cpu_worker.py
drives it: accelerate runs FSDP on GPUs only) for the native path, where a process that skipped
the KL rows' forwards would leave the other waiting in its gathers.
"""

import contextlib
import os
import time

import pytest
import torch
import torch.multiprocessing
from test_distributed import free_port
from test_native import checkpoints, native_model, randomize_lora_B, relative_error, run_config  # noqa: F401
from test_preference_objectives import KTO, KTO_ROWS, MAX_SEQ_LEN, kto_model, lora_gradients
from test_sequence_logps import logps_from_logits

from finetune.data import collate_kto, collate_kto_packed
from finetune.lora import FSDP_WRAPPED
from finetune.training.objective import Reference, build_objective
from finetune.training.processes import start_processes, wrap_for_processes
from finetune.training.step import train_step

# Which of KTO_ROWS each of the two processes trains.
SPLITS = {"3+2": (slice(0, 3), slice(3, 5)), "4+1": (slice(0, 4), slice(4, 5))}
CASES = [("ddp", impl, split) for impl in ("native", "hf") for split in SPLITS] + [("fsdp", "native", "4+1")]
WAIT_S = 300  # both processes' whole run, on a loaded 2-core machine

pytestmark = pytest.mark.slow  # two processes start, each importing the stack and building three models


def fsdp_model(model_dir):
    """For FSDP, a policy with the adapter switched off as its reference (the starting adapter's swap
    under FSDP has tests of its own, in test_preference_training.py): these LoRA weights (seed 3)
    put the KL rows' mean log-ratio above 0 for the 4+1 split."""
    torch.manual_seed(0)
    model = native_model(model_dir)
    randomize_lora_B(model, seed=3)
    return model, Reference()


def policy_and_reference(engine: str, impl: str, model_dir):
    if engine == "fsdp":
        return fsdp_model(model_dir)
    return kto_model(model_dir, impl)


def train_one_step(rank: int, port: int, model_dir, out) -> None:
    """One of the two processes: every case's step on its share of the rows, with SGD at lr 1 (what
    the step subtracts from the adapter is its gradient), the adapter put back after each; the first
    process writes each case's loss, z0 and gradient."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    processes = start_processes(run_config(model_dir))
    results = {}
    for engine, impl in dict.fromkeys((engine, impl) for engine, impl, _ in CASES):
        model, reference = policy_and_reference(engine, impl, model_dir)
        before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
        if engine == "fsdp":  # the recipe's units: the native model names its own
            wrapped = FullyShardedDataParallel(model, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                               auto_wrap_policy=model.fsdp_wrap_policy(), use_orig_params=True,
                                               device_id=torch.device("cpu"))
            optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0)
        else:
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
            wrapped, optimizer = wrap_for_processes(processes, model, optimizer)
        objective = build_objective(KTO, reference, processes.accelerator.reduce)
        for split in (split for case in CASES if case[:2] == (engine, impl) for split in case[2:]):
            for packed in (False, True):
                step_batches = [collate_kto_packed(KTO_ROWS[share], MAX_SEQ_LEN) if packed
                                else collate_kto(KTO_ROWS[share], 0, MAX_SEQ_LEN) for share in SPLITS[split]]
                result = train_step(wrapped, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                                    objective, step_batches, processes, model.takes_packed_boundaries, 0.0)
                gradients = {}
                # Under FSDP each process holds a shard: gathered whole, and written back whole.
                with FullyShardedDataParallel.summon_full_params(wrapped, writeback=True) if engine == "fsdp" \
                        else contextlib.nullcontext(), torch.no_grad():
                    for wrapped_name, param in model.named_parameters():
                        name = wrapped_name.replace(FSDP_WRAPPED, "")
                        if name in before:
                            gradients[name] = before[name] - param
                            param.copy_(before[name])
                results[engine, impl, split, packed] = (result.loss, result.metrics["kl"], gradients)
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def two_processes(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("kto-two") / "results.pt"
    context = torch.multiprocessing.spawn(train_one_step, args=(free_port(), checkpoints("llama"), out), nprocs=2,
                                          join=False)
    # A process left waiting on a forward (or reduction) the other skipped would wait for good.
    deadline = time.monotonic() + WAIT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two processes did not finish in {WAIT_S} s: one is waiting for the other")
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_process(checkpoints):
    """(engine, impl) -> the same policy and reference in this process, built once."""
    models = {}

    def get(engine: str, impl: str):
        if (engine, impl) not in models:
            models[engine, impl] = policy_and_reference(engine, impl, checkpoints("llama"))
        model, reference = models[engine, impl]
        model.eval().zero_grad()  # no LoRA dropout here; the processes trained with none either
        return model, reference

    return get


def paper_loss(model, reference: Reference, shares) -> tuple[torch.Tensor, float, list[float]]:
    """Ethayarajh et al. 2024 eq. 8 on every row of both processes, from full logits, one sequence at a
    time; z0 = max(0, mean log-ratio over all KL rows: in each process's rows, prompt i with completion
    i + 1, cut to MAX_SEQ_LEN). Also each process's own mean KL log-ratio."""

    def logps(sequences):
        return torch.stack([logps_from_logits(model(input_ids=torch.tensor([prompt + completion])).logits,
                                              torch.tensor([[-100] * len(prompt) + completion]))[0][0]
                            for prompt, completion in sequences])

    kl_rows = []  # per process
    for share in shares:
        rows = KTO_ROWS[share]
        kl_rows.append([(row.prompt_ids, rows[(i + 1) % len(rows)].chosen_ids[:MAX_SEQ_LEN - len(row.prompt_ids)])
                        for i, row in enumerate(rows)] if len(rows) > 1 else [])
    completions = [(row.prompt_ids, row.chosen_ids) for row in KTO_ROWS]
    with torch.no_grad():
        with reference.active(model):
            reference_logps, kl_reference = logps(completions), [logps(rows) if rows else None for rows in kl_rows]
        log_ratios = [(logps(rows) - ref).tolist() if rows else [] for rows, ref in zip(kl_rows, kl_reference)]
    every = sum(log_ratios, [])
    z0 = max(0.0, sum(every) / len(every))
    r = logps(completions) - reference_logps
    desirable = torch.tensor([row.label for row in KTO_ROWS])
    losses = torch.where(desirable, KTO.desirable_weight * (1 - torch.sigmoid(KTO.beta * (r - z0))),
                         KTO.undesirable_weight * (1 - torch.sigmoid(KTO.beta * (z0 - r))))
    return losses.mean(), z0, [sum(ratios) / len(ratios) if ratios else 0.0 for ratios in log_ratios]


@pytest.mark.parametrize("engine, impl, split", CASES, ids=["-".join(case) for case in CASES])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_two_processes_take_z0_over_both_kl_rows_like_one_process_with_all_rows(engine, impl, split, packed,
                                                                                two_processes, one_process):
    model, reference = one_process(engine, impl)
    loss, z0, own = paper_loss(model, reference, SPLITS[split])
    assert z0 > 0.1 and any(abs(max(0.0, mean) - z0) > 0.05 for mean in own)  # each process's own z0 would fail
    assert abs(max(0.0, sum(own) / 2) - z0) > 0.02  # so would the mean of the processes' means
    loss.backward()
    expected = lora_gradients(model)
    got_loss, got_z0, gradients = two_processes[engine, impl, split, packed]
    assert got_loss == pytest.approx(loss.item(), abs=1e-5)
    assert got_z0 == pytest.approx(z0, abs=1e-5)
    assert gradients.keys() == expected.keys()
    for name, gradient in expected.items():
        assert relative_error(gradients[name], gradient) <= 1e-4, name
