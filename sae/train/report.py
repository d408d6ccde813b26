"""What `sae train` reports when a run ends: held-out FVU, L0 and dead fraction, and the printed summary."""
from __future__ import annotations

import torch

from sae.variants.base import SAE


@torch.no_grad()
def held_out_scores(model: SAE, store, layer, rows: int = 16384, device="cpu") -> dict | None:
    """FVU, L0 and dead fraction of a model in raw units on up to `rows` held-out tokens of the store."""
    model.eval()
    err = total_sq = 0.0
    total = None
    n = 0
    fired = torch.zeros(model.d_sae, dtype=torch.bool, device=device)
    l0_sum = 0.0
    tau = model.fire_threshold
    for x in store.activations(layer, batch_size=4096, split="held_out"):
        x = x[: rows - n].to(device)  # [b, d_in]
        x_hat, fire_counts = model.reconstruct(x)  # [b, d_in], [d_sae] (None for signed codes)
        err += float((x - x_hat).double().pow(2).sum())
        total_sq += float(x.double().pow(2).sum())
        total = x.double().sum(0) if total is None else total + x.double().sum(0)
        if tau is not None:
            l0_sum += float(fire_counts.sum())
            fired |= fire_counts > 0
        n += x.shape[0]
        if n >= rows:
            break
    if n == 0:
        return None
    variance = total_sq - float(total.pow(2).sum()) / n
    return {"rows": n, "fvu": err / max(variance, 1e-12), "mse": err / (n * model.d_in),
            "l0": l0_sum / n if tau is not None else None,
            "dead_fraction": float((~fired).float().mean()) if tau is not None else None}


def _fmt(value, spec=".4g") -> str:
    return "—" if value is None else format(value, spec)


def progress_postfix(m: dict) -> str:
    parts = [f"loss {_fmt(m['loss'])}", f"FVU {_fmt(m['fvu'], '.3f')}"]
    if m.get("l0") is not None:
        parts += [f"L0 {_fmt(m['l0'], '.1f')}", f"dead {_fmt(m['dead_fraction'], '.1%')}"]
    return ", ".join(parts + [f"{m['tokens_per_s']:,.0f} tok/s"])


def format_summary(s: dict) -> str:
    train, held = s.get("train") or {}, s.get("held_out") or {}
    lines = [f"trained {s['variant']} (d_in {s['d_in']}, d_sae {s['d_sae']}, layer {s['layer']}): "
             f"{s['steps']} steps, {s['tokens']:,} tokens in {s['seconds']:.1f} s"
             + (f" ({s['tokens_per_s']:,.0f} tokens/s)" if s.get("tokens_per_s") else ""),
             f"  last training window: loss {_fmt(train.get('loss'))}, FVU {_fmt(train.get('fvu'), '.4f')}, "
             f"L0 {_fmt(train.get('l0'), '.1f')}, dead {_fmt(train.get('dead_fraction'), '.2%')}"]
    if held:
        lines.append(f"  held-out ({held['rows']:,} tokens): FVU {_fmt(held['fvu'], '.4f')}, "
                     f"L0 {_fmt(held['l0'], '.1f')}, dead {_fmt(held['dead_fraction'], '.2%')}")
    lines.append(f"  run folder: {s['run_dir']}")
    return "\n".join(lines)
