"""What the tiny models' training shares: the learning-rate schedule, the EMA, the JSON and sharded-safetensors
writers of the Hub layout, and a wall-clock training loop that logs as it goes."""

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Schedule:
    learning_rate: float
    warmup_steps: int
    final_fraction: float  # the cosine decay ends at this fraction of the learning rate
    ema_decay: float

    def lr(self, step: int, progress: float) -> float:
        """Linear warmup, then a cosine decay over the fraction `progress` of the wall-clock budget."""
        warmup = min(1.0, (step + 1) / self.warmup_steps)
        cosine = self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.learning_rate * warmup * cosine


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    decay = min(decay, (1 + step) / (10 + step))  # average from the start, not from a random init
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)


LOSS_SMOOTHING = 0.98  # the printed training loss is an exponential moving average
LOG_EVERY_S = 60.0


def train_for(minutes: float, model: torch.nn.Module, ema: torch.nn.Module, schedule: Schedule,
              loss_of_batch: Callable[[torch.nn.Module], torch.Tensor],
              held_out_loss: Callable[[torch.nn.Module], float], batch_size: int) -> dict:
    """AdamW (no weight decay) steps on `loss_of_batch(model)` until `minutes` have passed; logs every minute;
    returns the training record (steps, images, minutes, smoothed loss, the EMA's held-out loss)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.learning_rate, weight_decay=0.0)
    budget, start, last_log = minutes * 60, time.monotonic(), 0.0
    step, smoothed = 0, None
    while (elapsed := time.monotonic() - start) < budget:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(step, elapsed / budget)
        loss = loss_of_batch(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, step, schedule.ema_decay)
        step += 1
        smoothed = loss.item() if smoothed is None else LOSS_SMOOTHING * smoothed + (1 - LOSS_SMOOTHING) * loss.item()
        if elapsed - last_log >= LOG_EVERY_S:
            last_log = elapsed
            print(f"step {step:6d}  images {step * batch_size:8d}  loss {smoothed:.4f}  "
                  f"ema held-out {held_out_loss(ema):.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"{elapsed / 60:5.1f} min", flush=True)
    stats = {"steps": step, "images": step * batch_size, "minutes": (time.monotonic() - start) / 60,
             "loss": smoothed, "held_out": held_out_loss(ema), "params": sum(p.numel() for p in model.parameters())}
    print(f"done: {stats['steps']} steps, {stats['images']} images, {stats['minutes']:.1f} min, "
          f"loss {stats['loss']:.4f}, EMA held-out loss {stats['held_out']:.4f}", flush=True)
    return stats


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def save_sharded(sd: dict[str, torch.Tensor], folder: Path, stem: str, shards: int) -> None:
    """`stem-0000i-of-0000n.safetensors` files holding about equal bytes in key order, plus
    `stem.safetensors.index.json` (total_size, weight_map), as transformers and diffusers write them."""
    keys = list(sd)
    total = sum(sd[k].numel() * sd[k].element_size() for k in keys)
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for k in keys:
        groups[min(shards - 1, done * shards // total)].append(k)
        done += sd[k].numel() * sd[k].element_size()
    assert all(groups), f"{len(keys)} tensors cannot fill {shards} shards"
    weight_map = {}
    folder.mkdir(parents=True, exist_ok=True)
    for i, group in enumerate(groups, start=1):
        name = f"{stem}-{i:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in group}, folder / name, metadata={"format": "pt"})
        weight_map |= {k: name for k in group}
    write_json(folder / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total},
                                                           "weight_map": dict(sorted(weight_map.items()))})
