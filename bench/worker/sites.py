"""One LoRA site's base and training steps per mode, each in a child process of its own.

A child loads the saved base in one mode (fp32, bf16, NF4), reads its
footprint (transformers' ``get_memory_footprint``), adds LoRA r=16 adapters on
every linear projection, and runs a few AdamW steps on random tokens, with or
without gradient checkpointing. On the CPU it reports peak RSS (VmHWM) and
step time; on CUDA ``torch.cuda.max_memory_allocated``, tokens/s and model
FLOPs utilisation. A child per mode, so no mode's peak hides another's.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.worker.models import ALL_LINEAR, load_base, with_lora

# Dense bf16 peak of the GPUs this may meet (vendor figures, without sparsity), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 * 1.048576
    return 0.0


def run_site(
    directory: Path, mode: str, checkpointing: bool, device: str, batch: int, seq: int, steps: int
) -> dict[str, Any]:
    """Load, adapt, train ``steps`` steps; what it cost."""
    import torch

    torch.manual_seed(0)
    base = load_base(directory, mode, device)
    footprint = base.get_memory_footprint()
    model = with_lora(base, ALL_LINEAR, checkpointing=checkpointing)
    if device == "cpu" or mode != "nf4":
        model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    # From the config: a 4-bit base packs two values into each element it reports.
    base_params = (
        model.num_parameters(only_trainable=False) if mode != "nf4" else _config_params(model.config)
    )
    base_params -= sum(p.numel() for p in params) if mode != "nf4" else 0
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    out: dict[str, Any] = {
        "mode": mode,
        "checkpointing": checkpointing,
        "footprint_mb": footprint / 1e6,
        "adapter_params": sum(p.numel() for p in params),
        "base_params": base_params,
        "step_s": step_s,
        "tokens_per_s": batch * seq / step_s,
    }
    if device == "cuda":
        out["max_allocated_mb"] = torch.cuda.max_memory_allocated() / 1e6
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
        # A frozen base costs 2N FLOPs a token forward and 2N backward (input gradients, no weight
        # gradients); recomputation under checkpointing is not model FLOPs.
        out["device"] = name
        out["mfu"] = 4 * base_params * out["tokens_per_s"] / (peak * 1e12) if peak else None
    else:
        out["peak_rss_mb"] = _vm_hwm_mb()
    return out


def _config_params(config: Any) -> int:
    from bench.worker.models import Shape

    shape = Shape(
        "",
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        config.vocab_size,
    )
    return shape.params


def in_child(
    directory: Path, mode: str, checkpointing: bool, device: str, batch: int, seq: int, steps: int
) -> dict[str, Any]:
    """``run_site`` in a fresh interpreter."""
    args = [str(directory), mode, str(int(checkpointing)), device, str(batch), str(seq), str(steps)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.worker.sites", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} (checkpointing {checkpointing}) failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    d, m, c, dev, b, s, n = sys.argv[1:8]
    print(json.dumps(run_site(Path(d), m, c == "1", dev, int(b), int(s), int(n))))
