"""How long `sae explain` takes and how its scores compare with the random-pairing control.

Explains --features features of an analysed run (resumable: features already in explanations.parquet are
kept unless --force), then prints the time per feature and, per scorer, the distribution of the scores
beside the controls (mean, quartiles, share of features whose score beats its control), with the machine
roofline. --plot PNG draws the score histograms against the controls.

    python scripts/bench_explain.py demo/topk demo/store --features 256 --force --plot docs/img/explain_scores.png
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("store")
    parser.add_argument("--features", default="256", help="N densest, all, or ids (default 256)")
    parser.add_argument("--explainer", default="smollm2")
    parser.add_argument("--scorers", default=None, help="default: the command's (all three; embedding only "
                        "with the embedded smollm2 judge)")
    parser.add_argument("--force", action="store_true", help="explain anew (time every feature)")
    parser.add_argument("--plot", default=None, help="write the score histograms to this PNG")
    args = parser.parse_args()

    import numpy as np  # noqa: F401 - used by the plot
    import pyarrow.parquet as pq
    import torch
    from roofline import square_matmul_gflops
    from sae.explain.pipeline import ExplainOptions, choose_features, explain

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    options = ExplainOptions(features=args.features, explainer=args.explainer, force=args.force,
                             scorers=tuple(args.scorers.split(",")) if args.scorers else None)
    start = time.perf_counter()
    summary = explain(args.run, args.store, options)
    total = time.perf_counter() - start
    table = pq.read_table(Path(args.run) / "analysis" / "explanations.parquet").to_pandas()
    density = pq.read_table(Path(args.run) / "analysis" / "features.parquet").column("density").to_numpy()
    table = table[table["feature"].isin(choose_features(args.features, density))]

    print(f"\nsae explain: {len(table)} features of {args.run}, explainer {summary['explainer']}, "
          f"scorers {summary.get('scorers', args.scorers)}")
    print(f"{'figure':<48}{'value':>12}")
    print("-" * 60)
    rows = [("features explained now", f"{summary['n_new']}"),
            ("wall time, whole command incl. loading (s)", f"{total:.1f}"),
            ("time per newly explained feature (s)", f"{summary['seconds'] / max(summary['n_new'], 1):.2f}")]
    for name in ("detection", "fuzzing", "embedding"):
        own, control = table[name].dropna(), table[f"{name}_control"].dropna()
        if not len(own):
            continue
        both = table[[name, f"{name}_control"]].dropna()
        rows += [(f"{name}: mean (median) of {len(own)}", f"{own.mean():.3f} ({own.median():.3f})"),
                 (f"{name}: quartiles", f"{own.quantile(0.25):.2f}–{own.quantile(0.75):.2f}"),
                 (f"{name}_control: mean (median)", f"{control.mean():.3f} ({control.median():.3f})"),
                 (f"{name}: share above its control", f"{(both[name] > both[f'{name}_control']).mean():.2f}")]
    rows += [("machine roofline: fp32 matmul (GFLOP/s)", f"{square_matmul_gflops(1024):.1f}"),
             ("torch threads", f"{torch.get_num_threads()}")]
    for name, value in rows:
        print(f"{name:<48}{value:>12}")
    print("examples:")
    for row in table.head(8).itertuples():
        print(f"  {row.feature:>6}  {row.explanation[:70]!r}  det {row.detection}  emb {row.embedding}")

    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = [n for n in ("detection", "fuzzing", "embedding") if table[n].notna().any()]
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
        bins = np.linspace(0, 1, 21)
        for ax, name in zip(axes[0], names):
            ax.hist(table[name].dropna(), bins=bins, alpha=0.7, label="explanation")
            ax.hist(table[f"{name}_control"].dropna(), bins=bins, alpha=0.5, label="random pairing")
            ax.set_title(name)
            ax.set_xlabel("score (chance 0.5)")
        axes[0][0].legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
