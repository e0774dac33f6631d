"""The one definition of each speculative-decoding metric, used everywhere (training logs, eval, serving).

Other modules cite this docstring (`fastdraft.evaluation.metrics`) for what AR, tau, MBSU and c mean.

For one generation (or a sum over many): D drafted tokens, A of them accepted, F target forward
passes, N tokens emitted (accepted + the one correction/bonus token per pass).

    acceptance rate        AR   = A / D
    block efficiency       tau  = N / F                    (tokens per target pass; always state gamma)
    memory-bound speedup   MBSU = tau / (1 + gamma * c)    c = draft_params / target_params
                                                           (byte variant: c = draft bytes / target bytes)
    wall-clock speedup          = time(target alone) / time(speculative)

A ratio whose denominator is zero (no token drafted, no target pass, no time) is undefined and is
returned as `None` (shown as "n/a"), never as 0: a run that drafted nothing says nothing about the
draft, and reporting AR 0 would blame it.

The parameters of c are those a forward pass reads per token (`read_size`): every weight, except that an
input embedding table counts only where the output layer reads it. For the usual tied-embedding model that
is all its parameters, as in the paper. A draft whose output layer covers part of the vocabulary
(`fastdraft.models.SubsetHead`) reads only those rows of its table: the lookup of the input token reads one.
The bytes of c are those weights as stored: an int8 draft (`fastdraft.quantize`) reads a byte per weight and a
float32 scale per row, so its byte c is about a quarter of its parameter c.

Aggregates are ratios of sums (sum A / sum D over all sequences), not means of per-sequence ratios,
so long generations weigh in proportion to their tokens, as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fastdraft.speculative.types import SpecStats


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def acceptance_rate(accepted: int, drafted: int) -> float | None:
    """AR = A / D; None when nothing was drafted."""
    if accepted < 0 or drafted < 0 or accepted > drafted:
        raise ValueError(f"need 0 <= accepted <= drafted, got accepted={accepted}, drafted={drafted}")
    return _ratio(accepted, drafted)


def tau(emitted: int, target_passes: int) -> float | None:
    """tau = N / F (tokens emitted per target pass, bonus token included); None without passes."""
    if emitted < 0 or target_passes < 0:
        raise ValueError(f"need non-negative counts, got emitted={emitted}, target_passes={target_passes}")
    return _ratio(emitted, target_passes)


def mbsu(tau_value: float | None, gamma: float, cost_ratio: float) -> float | None:
    """MBSU = tau / (1 + gamma * c): the speedup if each forward pass costs its weights' memory traffic.

    Args:
        tau_value: block efficiency at this gamma (None propagates).
        gamma: draft tokens per step (the static gamma, or the mean D / F for a dynamic gamma).
        cost_ratio: c, draft size over target size (parameters, or bytes for quantized weights).
    """
    if gamma < 0 or cost_ratio < 0:
        raise ValueError(f"need gamma >= 0 and c >= 0, got gamma={gamma}, c={cost_ratio}")
    return None if tau_value is None else tau_value / (1.0 + gamma * cost_ratio)


def wall_clock_speedup(target_seconds: float, speculative_seconds: float) -> float | None:
    """time(target alone) / time(speculative), same prompts, max tokens and decoding settings."""
    return _ratio(target_seconds, speculative_seconds)


def expected_tau_iid(alpha: float, gamma: int) -> float:
    """Expected tau when every draft token is accepted independently with probability alpha.

    Leviathan et al. (2023): E[tokens per pass] = (1 - alpha^(gamma+1)) / (1 - alpha); gamma + 1 at alpha 1.
    Used as a reference next to the measured tau (per-position acceptance is not really i.i.d.).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return float(gamma + 1) if alpha == 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def per_position_acceptance(stats: SpecStats) -> list[float | None]:
    """Acceptance at each position of a block: accepted / drafted at position i (i = 0 is the first draft token)."""
    return [_ratio(a, d) for a, d in zip(stats.per_position_accepted, stats.per_position_drafted)]


def model_size(model: torch.nn.Module, weights: str = "float") -> tuple[int, int]:
    """(parameters, bytes) of a model's weights, each tied tensor counted once. `weights` "int8": its matrices as
    the engine stores an int8 draft (`fastdraft.quantize`: a byte per weight and a float32 scale per row)."""
    return _size(model, weights, unread_rows={})


def read_size(model: torch.nn.Module, weights: str = "float") -> tuple[int, int]:
    """(parameters, bytes) one forward pass reads per token: `model_size` less the input embedding rows that
    no output layer reads (the lookup reads one row) and the output rows a `SubsetHead` leaves out."""
    from fastdraft.models import SubsetHead

    if not hasattr(model, "get_input_embeddings"):
        return model_size(model, weights)
    table, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    head_rows = len(head.ids) if isinstance(head, SubsetHead) else None
    unread = {}  # storage key -> rows of that matrix no pass reads
    if head is not None and _key(head.weight) == _key(table):
        unread[_key(table)] = table.shape[0] - (head_rows or table.shape[0])
    else:
        unread[_key(table)] = table.shape[0]
        if head is not None and head_rows is not None:
            unread[_key(head.weight)] = head.weight.shape[0] - head_rows
    return _size(model, weights, unread)


def _key(tensor: torch.Tensor) -> int:
    """What tells two weights apart: their storage, or on the meta device (shapes only, see
    `checkpoint.load_shape`) the Parameter itself (tied weights are one Parameter)."""
    return id(tensor) if tensor.device.type == "meta" else tensor.data_ptr()


def _size(model: torch.nn.Module, weights: str, unread_rows: dict[int, int]) -> tuple[int, int]:
    seen: set[int] = set()
    params = nbytes = 0
    for tensor in model.parameters():
        if _key(tensor) in seen:
            continue
        seen.add(_key(tensor))
        if tensor.dim() == 2:
            rows = tensor.shape[0] - unread_rows.get(_key(tensor), 0)
            n = rows * tensor.shape[1]
            params += n
            nbytes += n + 4 * rows if weights == "int8" else n * tensor.element_size()
        else:
            params += tensor.numel()
            nbytes += tensor.numel() * tensor.element_size()
    return params, nbytes


@dataclass(frozen=True)
class CostRatio:
    """c of the MBSU formula for one draft/target pair, in parameters and in bytes."""

    params: float
    bytes: float

    @classmethod
    def of(cls, draft: torch.nn.Module, target: torch.nn.Module, draft_weights: str = "float") -> "CostRatio":
        """c of `draft` stored as `draft_weights` ("float" or "int8") against `target` in its own dtype."""
        dp, db = read_size(draft, draft_weights)
        tp, tb = read_size(target)
        return cls(params=dp / tp, bytes=db / tb)


def sum_stats(stats: Iterable[SpecStats]) -> SpecStats:
    """Aggregate counters of many generations (ratios of sums, see module docstring)."""
    total = SpecStats()
    for s in stats:
        total += s
    return total


def summarize(stats: SpecStats, gamma: float, cost: CostRatio | None = None) -> dict:
    """The metrics of aggregated counters as plain data: D, A, F, N, AR, tau, MBSU (both variants), per-position AR.

    `truncated` counts verified tokens dropped after a stop token or the token budget (N + truncated = A + L + F, L:
    proposals copied from the context and accepted, `lookup.py`; AR is the draft model's, A / D, copies apart).

    For a dynamic gamma pass the mean drafted tokens per pass (`mean_gamma(stats)`) as `gamma`.
    """
    t = tau(stats.emitted, stats.target_passes)
    out = {
        "gamma": gamma,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "target_passes": stats.target_passes,
        "emitted": stats.emitted,
        "truncated": stats.truncated,
        "acceptance_rate": acceptance_rate(stats.accepted, stats.drafted),
        "tau": t,
        "per_position_acceptance": per_position_acceptance(stats),
    }
    if stats.looked_up:
        out.update(looked_up=stats.looked_up, looked_up_accepted=stats.looked_up_accepted,
                   lookup_acceptance_rate=acceptance_rate(stats.looked_up_accepted, stats.looked_up))
    if cost is not None:
        out["mbsu"] = mbsu(t, gamma, cost.params)
        out["mbsu_bytes"] = mbsu(t, gamma, cost.bytes)
    return out


def mean_gamma(stats: SpecStats) -> float | None:
    """Mean draft tokens per target pass, D / F: the effective gamma of a dynamic-gamma run."""
    return _ratio(stats.drafted, stats.target_passes)


def format_metric(value: float | None, digits: int = 3) -> str:
    """A metric for tables: 'n/a' when undefined."""
    return "n/a" if value is None else f"{value:.{digits}f}"

