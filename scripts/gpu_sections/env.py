"""The env section: torch / CUDA / cuDNN and library versions, the CPU and GPU, TF32 and SDPA
switches, the models built."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from gpu_sections.context import Context
from gpu_sections.report import Report


def section_env(ctx: Context, report: Report, deadline: float) -> None:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    env = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "transformers": version("transformers"), "segment_anything": version("segment-anything"),
        "timm": version("timm"), "kernels": version("kernels"),  # transformers' hub kernels
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
               "torch threads",
        "tf32_default": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                         "cudnn": torch.backends.cudnn.allow_tf32},
        "sdpa_enabled": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                         "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                         "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                         "math": torch.backends.cuda.math_sdp_enabled()},
    }
    report.add("env", "torch / CUDA / cuDNN",
               f"torch {env['torch']}, CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}")
    report.add("env", "libraries", f"python {env['python']}, transformers {env['transformers']}, "
               f"segment-anything {env['segment_anything']}, timm {env['timm']}, "
               f"kernels {env['kernels']} (transformers' hub kernels)")
    report.add("env", "CPU", env["cpu"])
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        free, total = torch.cuda.mem_get_info(ctx.device)
        env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "total_bytes": total, "free_bytes_after_loading": free,
                      "allocated_bytes_after_loading": torch.cuda.memory_allocated(ctx.device)}
        report.add("env", "GPU", f"{props.name} (sm_{props.major}{props.minor}), "
                   f"{total / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free after loading "
                   f"({torch.cuda.memory_allocated(ctx.device) / 2**30:.1f} GiB allocated)")
    else:
        report.skip("env", "GPU", "no CUDA device (cpu run)")
    report.add("env", "TF32 default (matmul / cudnn)",
               f"{env['tf32_default']['matmul']} / {env['tf32_default']['cudnn']}")
    report.add("env", "SDPA backends enabled", ", ".join(
        f"{name} {on}" for name, on in env["sdpa_enabled"].items()))
    report.add("env", "models", f"detector {'tiny' if ctx.args.tiny else 'SwinT-OGC'}, SAM "
               f"{'tiny' if ctx.args.tiny else ctx.args.sam_variant}, image "
               f"{ctx.image.shape[0]}x{ctx.image.shape[1]}, detector input "
               f"{tuple(ctx.pixels.shape[2:])}, built in {report.data['build_seconds']:.0f} s")
    report.data["env"] = env
