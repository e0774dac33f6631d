"""Devices for the training loop: CPU (gloo), CUDA (nccl, bf16 autocast), Intel Gaudi (HPU, hccl).

The driver builds the Ray objects (`ScalingConfig`, `TorchConfig`) from the recipe's `compute` section in
one place (`scaling_for`, `torch_config_for`) and checks, before anything starts, that the cluster has the
devices the recipe asks for (`check_available`). Inside a worker, `worker_device` and `autocast` give the
device and precision. Gaudi goes through Habana's PyTorch bridge (`habana_frameworks.torch`), imported
lazily: it cannot be installed here, so it fails with a clear message where absent.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from fastdraft.config import ComputeConfig
from fastdraft.errors import FastdraftError, MissingDependencyError

# torch.distributed process-group backend per device.
DIST_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "hpu": "hccl"}

# Peak dense bf16 FLOP/s for an MFU estimate, by a substring of the device name (vendor datasheets).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
                   "Gaudi2": 432e12, "Gaudi3": 1835e12}


def scaling_for(compute: ComputeConfig):
    """The `ScalingConfig` for a compute section: fractional CPUs per worker, 1 GPU or 1 HPU per worker."""
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": compute.cpus_per_worker}
    if compute.device == "cuda":
        resources["GPU"] = compute.gpus_per_worker or 1
    elif compute.device == "hpu":
        resources["HPU"] = 1
    return ScalingConfig(num_workers=compute.num_workers, use_gpu=compute.device == "cuda",
                         resources_per_worker=resources)


def torch_config_for(compute: ComputeConfig):
    """The `TorchConfig` (process-group backend) for a compute section."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend=DIST_BACKENDS[compute.device])


def import_habana():
    """Habana's PyTorch bridge (registers the `hpu` device), or a MissingDependencyError saying how to get it."""
    try:
        import habana_frameworks.torch.core as htcore
    except ImportError as exc:
        raise MissingDependencyError(
            f"training on Intel Gaudi (device: hpu) needs Habana's PyTorch bridge 'habana_frameworks.torch', which is "
            f"not installed here ({exc}). It is not on PyPI: run in Intel's Gaudi PyTorch image "
            f"(vault.habana.ai/gaudi-docker/...; cluster/rayjob-pretrain-gaudi.yaml uses one) and "
            f"pip install -e '.[gaudi]' there (see README, 'Optional stacks')."
        ) from None
    return htcore


def mark_step(device: torch.device) -> None:
    """Gaudi's lazy mode (PT_HPU_LAZY_MODE=1) runs the graph it has accumulated only at `mark_step()`: called
    after backward and after the optimizer step, as Habana's training guide places it. It costs nothing in
    Gaudi's eager mode, and is a no-op on other devices."""
    if device.type == "hpu":
        import_habana().mark_step()


def check_available(compute: ComputeConfig, cluster_resources: dict | None = None) -> None:
    """Refuse, before training starts, a device the cluster does not have (instead of hanging unscheduled).

    Args:
        compute: the recipe's compute section.
        cluster_resources: `ray.cluster_resources()`; read from the running cluster when None.
    """
    if compute.device == "cpu":
        return
    if compute.device == "hpu":
        import_habana()
    if cluster_resources is None:
        import ray

        cluster_resources = ray.cluster_resources()
    key = {"cuda": "GPU", "hpu": "HPU"}[compute.device]
    have = cluster_resources.get(key, 0)
    per_worker = (compute.gpus_per_worker or 1) if key == "GPU" else 1
    need = max(compute.num_workers, 1) * per_worker
    if have < need:
        raise FastdraftError(
            f"compute.device is '{compute.device}' but the Ray cluster has {have:g} {key} resources and "
            f"{max(compute.num_workers, 1)} workers need {need:g}; set compute.device: cpu, or add {key} nodes "
            f"(cluster/ has GPU and Gaudi worker groups)"
        )


def worker_device(compute: ComputeConfig) -> torch.device:
    """This worker's device (called inside the training function)."""
    if compute.device == "cuda":
        import ray.train.torch

        if not torch.cuda.is_available():
            raise FastdraftError("compute.device is 'cuda' but this worker sees no CUDA device")
        return ray.train.torch.get_device()
    if compute.device == "hpu":
        import_habana()
        return torch.device("hpu")
    return torch.device("cpu")


@contextlib.contextmanager
def autocast(compute: ComputeConfig, device: torch.device) -> Iterator[None]:
    """bf16 autocast when `precision: bf16` (weights and optimizer state stay fp32); fp32 otherwise."""
    if compute.precision != "bf16":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a known accelerator (for MFU), None for CPUs and unknown devices."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "hpu":
        name = "Gaudi3" if "3" in str(getattr(torch, "hpu").get_device_name()) else "Gaudi2"
    else:
        return None
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
