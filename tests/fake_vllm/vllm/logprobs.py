from dataclasses import dataclass


@dataclass
class Logprob:
    """As vLLM's `vllm.logprobs.Logprob` (a dataclass: Ray's vLLM stage turns it into a dict with `asdict`)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None
