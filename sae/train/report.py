"""What `sae train` prints: the progress bar's figures and the summary when a run ends."""
from __future__ import annotations


def _fmt(value, spec=".4g") -> str:
    return "—" if value is None else format(value, spec)


def progress_postfix(m: dict) -> str:
    parts = [f"loss {_fmt(m['loss'])}", f"FVU {_fmt(m['fvu'], '.3f')}"]
    if m.get("l0") is not None:
        parts += [f"L0 {_fmt(m['l0'], '.1f')}", f"dead {_fmt(m['dead_fraction'], '.1%')}"]
    return ", ".join(parts + [f"{m['tokens_per_s']:,.0f} tok/s"])


def format_summary(s: dict) -> str:
    train, held = s.get("train") or {}, s.get("held_out") or {}
    if s.get("tokens_this_run") == 0:       # --resume of a finished run: nothing was trained now
        lines = [f"{s['run_dir']} is already complete: {s['steps']} steps, {s['tokens']:,} tokens, trained "
                 f"before; nothing to do (to train longer, give a larger --tokens to a new run)"]
        if held:
            lines.append(f"  held-out ({held['rows']:,} tokens): FVU {_fmt(held['fvu'], '.4f')}, "
                         f"L0 {_fmt(held['l0'], '.1f')}, dead {_fmt(held['dead_fraction'], '.2%')}")
        return "\n".join(lines)
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
