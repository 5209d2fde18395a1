"""Predicted training-FLOPs ratio vs measured step-time ratio as timm coarse groups are frozen.

Checks that `training_flops_per_sample` ranks freeze depths by real cost. Configurations are
timed round-robin in one process, so drift from other load hits them alike; only ratios are
reported. Run: `python benchmarks/bench_freeze_cost.py` (< 2 min on 2 cores).
"""

from __future__ import annotations

import statistics
import time

import timm
import torch

from transferlab.transfer.compute import forward_flops, layer_costs, training_flops_per_sample

CASES = [("resnet18", 64, 32), ("test_resnet", 32, 64)]  # model, image px, batch
WARMUP, MIN_REPS, MAX_REPS, SECONDS_PER_CASE = 2, 3, 200, 20.0


def _set_frozen(model: torch.nn.Module, frozen: set[str]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)


def bench(name: str, size: int, batch: int) -> list[str]:
    model = timm.create_model(name, pretrained=False).train()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, model.num_classes, (batch,))
    costs = layer_costs(model, x)
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    groups = [groups[i] for i in sorted(groups)]
    labels = ["+".join(dict.fromkeys(n.split(".")[0] for n in g)) for g in groups]

    frozen_sets, predicted, optimizers = [], [], []
    for k in range(len(groups)):  # the last group (head) stays trainable
        frozen = {n for g in groups[:k] for n in g}
        _set_frozen(model, frozen)
        frozen_sets.append(frozen)
        predicted.append(training_flops_per_sample(model, costs))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizers.append(torch.optim.SGD(trainable, lr=1e-3, momentum=0.9))

    def round_robin() -> list[float]:
        out = []
        for frozen, opt in zip(frozen_sets, optimizers):
            _set_frozen(model, frozen)
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            out.append(time.perf_counter() - start)
        return out

    for _ in range(WARMUP):
        round_robin()
    times, deadline = [], time.perf_counter() + SECONDS_PER_CASE  # tiny models get more rounds
    while len(times) < MIN_REPS or (len(times) < MAX_REPS and time.perf_counter() < deadline):
        times.append(round_robin())
    reps = len(times)
    medians = [statistics.median(t) for t in zip(*times)]
    rows = []
    for k in range(len(groups)):
        pred, meas = predicted[k] / predicted[0], medians[k] / medians[0]
        frozen_label = ", ".join(labels[:k]) or "none"
        rows.append(
            f"| {name} | {size} | {k} | {frozen_label} | {predicted[k] / forward_flops(costs):.2f} "
            f"| {pred:.2f} | {meas:.2f} | {meas / pred:.2f} | {reps} |"
        )
    return rows


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(
        "| model | px | k | frozen groups | train/fwd FLOPs | predicted ratio | measured ratio "
        "| measured/predicted | rounds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case in CASES:
        print("\n".join(bench(*case)))
    print(
        "\nratio = cost at freeze depth k / cost at k=0 (full fine-tune); measured = median of "
        f"fwd+bwd+SGD steps over round-robin rounds (~{SECONDS_PER_CASE:.0f} s per model after "
        f"{WARMUP} warmup), torch threads = 2."
    )


if __name__ == "__main__":
    main()
