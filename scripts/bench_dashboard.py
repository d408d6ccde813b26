"""How long the dashboard's feature page takes to render for a run with 16,384 latents.

Builds a synthetic run whose RUN/analysis/ tables follow docs/DESIGN.md (20 top examples and 25
interval samples of ±10 tokens per latent), then renders the feature page with Streamlit's AppTest:
once cold (tables read from disk) and then warm (tables cached, as every later page view) for a
spread of features. The quality bar is a warm render under one second.

    python scripts/bench_dashboard.py                     # full size (16,384 latents)
    python scripts/bench_dashboard.py --features 1024 --repeats 3     # quick smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))    # dashboard_sample: the tests' synthetic run folders


class Session:
    """One simulated browser session (AppTest); each view() is one page load, like following a link."""

    def __init__(self, app_path: str):
        from streamlit.testing.v1 import AppTest
        self.at = AppTest.from_file(app_path, default_timeout=120)

    def view(self, feature: int, page: str = "feature") -> tuple[float, float]:
        """(seconds the app script took to build the page, seconds for the whole AppTest run)."""
        self.at.query_params["page"] = page
        self.at.query_params["feature"] = str(feature)
        start = time.perf_counter()
        self.at.run()
        total = time.perf_counter() - start
        if self.at.exception or self.at.error:
            raise SystemExit(f"the page failed: {[e.value for e in self.at.exception] or [e.value for e in self.at.error]}")
        if page == "feature" and self.at.title[0].value != f"Feature {feature}":
            raise SystemExit(f"wrong page: {self.at.title[0].value}")
        return self.at.session_state["render_seconds"], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=16384, help="latents in the synthetic run (default 16384)")
    parser.add_argument("--top", type=int, default=20, help="top examples per latent")
    parser.add_argument("--radius", type=int, default=10, help="context tokens either side")
    parser.add_argument("--repeats", type=int, default=10, help="warm renders (different features)")
    parser.add_argument("--out", default=None, help="where to write the run (default: a temporary folder)")
    args = parser.parse_args()

    import torch
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    from dashboard_sample import write_analysis

    workdir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_dashboard_"))
    run = workdir / "run"
    start = time.perf_counter()
    write_analysis(run, args.features, n_top=args.top, radius=args.radius, injections=False)
    (run / "config.json").write_text(f'{{"variant": "topk", "d_in": 576, "d_sae": {args.features}, '
                                     '"layer": 6, "site": "resid_post", "model": "synthetic"}')
    build = time.perf_counter() - start
    sizes = {p.name: p.stat().st_size / 2**20 for p in (run / "analysis").iterdir()}

    os.environ["SAE_DASHBOARD_RUNS"] = str(run)
    app = str(ROOT / "dashboard" / "app.py")
    session = Session(app)
    cold, cold_total = session.view(0)
    step = max(1, args.features // (args.repeats + 1))
    views = [session.view((i + 1) * step % args.features) for i in range(args.repeats)]
    warm, warm_total = [v[0] for v in views], [v[1] for v in views]
    list_view = session.view(0, page="features")[0]
    latent_rows = latent_pages(session, run, args.features)
    from roofline import square_matmul_gflops
    gflops = square_matmul_gflops(1024)

    print(f"\nsae dashboard: feature page render time ({args.features:,} latents, {args.top} top examples "
          f"of {2 * args.radius + 1} tokens each; Streamlit AppTest, server side)")
    print(f"{'figure':<44}{'value':>14}")
    print("-" * 58)
    rows = [
        ("analysis tables written (s)", f"{build:.2f}"),
        ("analysis tables on disk (MiB)", f"{sum(sizes.values()):.1f}"),
        ("feature page, cold: first view (s)", f"{cold:.3f}"),
        (f"feature page, warm: median of {len(warm)} (s)", f"{statistics.median(warm):.3f}"),
        ("feature page, warm: worst (s)", f"{max(warm):.3f}"),
        ("  same, incl. AppTest overhead, median (s)", f"{statistics.median(warm_total):.3f}"),
        ("feature list page, tables cached (s)", f"{list_view:.3f}"),
        ("bar: warm feature page < 1 s", "PASS" if max(warm) < 1.0 else "FAIL"),
        *latent_rows,
        ("machine roofline: fp32 matmul (GFLOP/s)", f"{gflops:.1f}"),
        ("torch threads", f"{torch.get_num_threads()}"),
    ]
    for name, value in rows:
        print(f"{name:<44}{value:>14}")
    print(f"\nrun folder: {run}")


# (page, widget values set before the view, shown name): the pages of issue 21, warm (second view, tables cached)
LATENT_PAGES = (("search", {"search_mode": "Explanation text", "search_text": "market goal"}, "search: explanation text"),
                ("search", {"search_mode": "Token", "search_token": "market"}, "search: token"),
                ("map", {}, "feature map"), ("anomalies", {}, "poorly reconstructed"),
                ("similar", {}, "similar contexts"), ("interpolate", {}, "interpolate (form; model not run)"),
                ("feature", {}, "feature page with explanation"))


def latent_pages(session: Session, run: Path, n_features: int) -> list[tuple[str, str]]:
    """Warm render times of the search, map and latent-space pages over synthetic tables (tests/latent_sample)."""
    from latent_sample import write_latent_tables
    write_latent_tables(run, n_features)
    rows, worst = [], 0.0
    for page, state, name in LATENT_PAGES:
        times = []
        for _ in range(2):
            for key, value in state.items():
                session.at.session_state[key] = value
            times.append(session.view(1, page=page)[0])
        worst = max(worst, times[-1])
        rows.append((f"{name}, warm (s)", f"{times[-1]:.3f}"))
    rows.append(("bar: every new page warm < 1 s", "PASS" if worst < 1.0 else "FAIL"))
    return rows


if __name__ == "__main__":
    main()
