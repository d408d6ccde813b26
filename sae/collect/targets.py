"""A second site captured in the same forward pass as the first: a transcoder's target (`--target-site`).

The input site's capture never stops the forward; the target's does, once every layer's target is taken, so
the pass still ends right after the deepest point it needs. A target that comes *before* its input in the
forward (so the stop would cut the input off) is refused in one line after the first batch.
"""
from __future__ import annotations

from contextlib import contextmanager

from sae.errors import UserError
from sae.lm import capture, site_point, site_width


def check_target_site(loaded, site: str, target_site: str | None, layers) -> None:
    """Refuse a target site that is the input site, out of range, or of another width than the input."""
    if target_site is None:
        return
    if target_site == site:
        raise UserError(f"--target-site must differ from --site (both are {site})")
    for layer in layers:
        site_point(loaded.model, target_site, layer)          # validates the site and the layer range
    d_in, d_out = site_width(loaded, site, layers), site_width(loaded, target_site, layers)
    if d_in != d_out:
        raise UserError(f"--target-site {target_site} is {d_out} wide and --site {site} {d_in}: a transcoder "
                        f"here needs both the same width")


@contextmanager
def capture_sites(model, site: str, target_site: str | None, layers):
    """Yield (captured, captured_targets): dicts {layer: [batch, seq, d]} each forward fills; the second is
    None without a target site. Run the forward through sae.lm.run_until_captured, then call
    check_complete(captured, layers, ...)."""
    if target_site is None:
        with capture(model, site, layers, stop=True) as captured:
            yield captured, None
        return
    with capture(model, site, layers, stop=False) as captured, \
            capture(model, target_site, layers, stop=True) as captured_targets:
        yield captured, captured_targets


def check_complete(captured: dict, layers, site: str, target_site: str | None) -> None:
    """After a forward: every input layer was taken (a target that comes first would have stopped it)."""
    missing = [layer for layer in layers if layer not in captured]
    if target_site is not None and missing:
        raise UserError(f"--target-site {target_site} comes before --site {site} in the forward pass (layer "
                        f"{missing[0]}): the target must be computed after the input (e.g. mlp_in -> mlp_out)")
