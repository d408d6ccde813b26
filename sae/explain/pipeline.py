"""`sae explain`: explain the chosen features of an analysed run and score each explanation, with controls.

    from sae.explain import explain, ExplainOptions
    summary = explain(RUN, STORE, ExplainOptions(features="64"))     # writes RUN/analysis/explanations.parquet

Per batch of features: build each feature's contexts (sae.explain.contexts), ask the explainer for an
explanation of each (one batched generation), then score every explanation on its own held-out contexts
and, as the control, on the held-out contexts of a randomly paired other feature (one batch of yes/no
questions, one batch of embeddings). The batch's rows are then written (sae.explain.writer).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from sae.errors import UserError
from sae.explain import prompts, scorers
from sae.explain.contexts import ContextOptions, ContextSource
from sae.explain.writer import FILE, SCORES, ExplanationWriter
from sae.progress import progress_bar

ALL_SCORERS = SCORES


@dataclass
class ExplainOptions:
    features: str = "64"              # N (the N densest) | all | a comma-separated list of ids
    explainer: str = "smollm2"        # in-process causal LM: smollm2, a Hugging Face id or a folder
    explainer_url: str | None = None  # or an OpenAI-compatible endpoint (…/v1) ...
    explainer_model: str | None = None  # ... and the model name it serves
    key_env: str = "OPENAI_API_KEY"   # environment variable holding the endpoint's key
    scorers: tuple | None = None      # None: all three, or embedding only with the embedded judge (default_scorers)
    batch_features: int = 16          # features per batch (one generation, one write)
    lm_batch_size: int = 16           # prompts per forward pass of a local explainer
    max_new_tokens: int = 24
    device: str = "cpu"
    model_dtype: str = "auto"
    seed: int = 0
    force: bool = False
    allow_incomplete: bool = False
    contexts: ContextOptions = field(default_factory=ContextOptions)


def choose_features(spec: str, density: np.ndarray) -> list[int]:
    """--features: 'all' (every feature that fired), N (the N densest), or a comma-separated list of ids."""
    n = len(density)
    text = str(spec).strip().lower()
    if text == "all":
        return [int(f) for f in np.nonzero(density > 0)[0]]
    if "," not in text and text.isdigit():
        count = int(text)
        if count < 1:
            raise UserError(f"--features {spec}: give at least 1")
        order = np.argsort(-density, kind="stable")
        return sorted(int(f) for f in order[:count] if density[f] > 0)
    try:
        chosen = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--features takes N, all, or a comma-separated list of feature ids (got {spec!r})") from None
    bad = [f for f in chosen if not 0 <= f < n]
    if bad or not chosen:
        named = ", ".join(map(str, bad)) if bad else repr(spec)
        raise UserError(f"--features names latents out of range: {named} "
                        f"(this run has features 0-{n - 1})")
    return list(dict.fromkeys(chosen))


def _partners(chosen: list[int], alive: list[int], seed: int) -> dict[int, int]:
    """Random pairing for the controls: each feature gets another (a derangement of the chosen ones)."""
    gen = np.random.default_rng(seed)
    if len(chosen) >= 2:
        shuffled = [chosen[i] for i in gen.permutation(len(chosen))]
        return {f: shuffled[(i + 1) % len(shuffled)] for i, f in enumerate(shuffled)}
    others = [f for f in alive if f not in chosen]
    return {f: int(gen.choice(others)) for f in chosen} if others else {}


def _analysis_dir(run_dir: Path) -> Path:
    analysis = run_dir / "analysis"
    for name in ("features.parquet", "top_examples.parquet"):
        if not (analysis / name).is_file():
            raise UserError(f"{run_dir} has not been analysed ({analysis / name} is missing): run "
                            f"`sae analyze --run {run_dir} --activations STORE` first")
    return analysis


def explain(run_dir, store, options: ExplainOptions | None = None, layer=None, judge=None, log=print) -> dict:
    """Explain and score the chosen features; returns a summary (means of scores and controls, timings).
    `judge` replaces the explainer (any object with name, generate() and yes_no())."""
    from sae.analyze.extras import try_load_tokenizer
    from sae.analyze.pipeline import _layer_folder
    from sae.devices import resolve
    from sae.files import FolderLock
    from sae.runs import check_run_store, load, read_config
    from sae.store import ActivationStore

    options = options or ExplainOptions()
    chose_scorers = options.scorers is None
    if chose_scorers:
        options = replace(options, scorers=default_scorers(options) if judge is None else ALL_SCORERS)
    unknown = set(options.scorers) - set(ALL_SCORERS)
    if unknown or not options.scorers:
        raise UserError(f"--scorers takes some of {', '.join(ALL_SCORERS)} (got {', '.join(options.scorers)})")
    if judge is None and options.explainer_model and not options.explainer_url:
        raise UserError("--explainer-model names the model of an endpoint: give --explainer-url too")
    if judge is None and options.explainer_url:
        from sae.explain.explainers import ChatEndpoint
        ChatEndpoint(options.explainer_url, options.explainer_model)      # a bad URL or a missing name: one line
    run_dir = _layer_folder(Path(run_dir), layer)
    analysis = _analysis_dir(run_dir)
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    config = read_config(run_dir)
    layer = check_run_store(config, store, layer, options.allow_incomplete)
    table = pq.read_table(analysis / "features.parquet", columns=["feature", "density"])
    density = np.zeros(int(max(table.column("feature").to_pylist(), default=-1)) + 1)
    density[table.column("feature").to_numpy()] = table.column("density").to_numpy()
    chosen = choose_features(options.features, density)
    alive = [int(f) for f in np.nonzero(density > 0)[0]]
    with FolderLock(analysis, "sae explain", name=".explanations.sae-lock"):
        device = resolve(options.device)
        name = judge.name if judge is not None else explainer_name(options)
        writer = ExplanationWriter(analysis / FILE, name, force=options.force)
        todo = [f for f in chosen if f not in writer.done]
        started, skipped = time.perf_counter(), []
        if not todo:
            return _summary(writer, chosen, todo, skipped, name, started, options.scorers)
        if chose_scorers and options.scorers != ALL_SCORERS:
            log("note: the embedded 135M judge answers yes/no questions at chance (detection 0.517 against its "
                "control 0.513 on 256 features), so only the embedding scorer runs; --scorers "
                "detection,fuzzing,embedding runs all three")
        explainer = judge or _explainer(options, device)
        sae_model = load(run_dir).to(device).eval()
        threshold = config.get("fire_threshold")
        tokenizer, why = try_load_tokenizer(store.manifest.get("model"))
        if tokenizer is None:
            log(f"note: tokens of random contexts are shown as ids: {why}")
        source = ContextSource(analysis, store, layer, sae_model, options.contexts, tokenizer=tokenizer,
                               threshold=0.0 if threshold is None else float(threshold),
                               signed=bool(getattr(sae_model, "signed_codes", False)), device=device)
        embedder = scorers.Embedder.shared(str(device)) if "embedding" in options.scorers else None
        partners = _partners(chosen, alive, options.seed)
        with progress_bar(total=len(todo), desc="explain", unit="feature") as bar:
            for i in range(0, len(todo), options.batch_features):
                batch = todo[i:i + options.batch_features]
                try:
                    rows, empty = _explain_batch(batch, source, partners, explainer, embedder, options)
                except UserError as error:
                    raise UserError(f"{error} ({len(writer.done)} features explained so far are kept in "
                                    f"{writer.path}; run again to go on)") from None
                writer.add(rows)
                skipped += empty
                bar.update(len(batch))
    if skipped:
        log(f"note: {len(skipped)} features have no activating contexts and were not explained")
    return _summary(writer, chosen, todo, skipped, name, started, options.scorers)


def default_scorers(options: ExplainOptions) -> tuple:
    """All three scorers, except with the embedded SmolLM2-135M as the judge: its yes/no answers carry no
    signal (docs/benchmarks.md: detection and fuzzing at their random-pairing controls on 256 features), so
    only the embedding scorer runs unless --scorers asks for more."""
    embedded = not options.explainer_url and options.explainer.lower() in ("smollm2", "smollm2-135m-instruct")
    return ("embedding",) if embedded else ALL_SCORERS


def explainer_name(options: ExplainOptions) -> str:
    """What the explainer column says: the endpoint's model @ its URL, or the local model's name."""
    return f"{options.explainer_model} @ {options.explainer_url}" if options.explainer_url else options.explainer


def _summary(writer, chosen, todo, skipped, name, started, used=ALL_SCORERS) -> dict:
    rows = [row for row in writer.rows if int(row["feature"]) in set(chosen)]
    summary = {"n_explained": len(rows), "n_new": len(todo) - len(skipped), "explainer": name,
               "seconds": round(time.perf_counter() - started, 2), "path": str(writer.path),
               "scorers": ",".join(used)}
    for name in SCORES:
        for key in (name, f"{name}_control"):
            values = [row[key] for row in rows if row[key] is not None and not math.isnan(row[key])]
            summary[f"mean_{key}"] = float(np.mean(values)) if values else None
    return summary


def _explainer(options: ExplainOptions, device):
    from sae.explain.explainers import make_explainer
    from sae.lm.loading import cpu_has_fast_bf16, parse_model_dtype
    dtype = parse_model_dtype(options.model_dtype, str(device))
    if options.model_dtype == "auto" and device.type == "cpu" and cpu_has_fast_bf16():
        dtype = torch.bfloat16         # a judge needs no fp32: bf16 runs about 3x faster on AMX/AVX512-BF16 CPUs
    return make_explainer(options.explainer, options.explainer_url, options.explainer_model, device=device,
                          dtype=dtype, batch_size=options.lm_batch_size,
                          key_env=options.key_env)


def _explain_batch(batch, source, partners, explainer, embedder, options):
    """Rows for one batch of features (and the features with nothing to explain)."""
    cache: dict[int, object] = {}

    def contexts_of(feature):
        if feature not in cache:
            cache[feature] = source.build(feature)
        return cache[feature]

    ready = [f for f in batch if contexts_of(f).explain]
    empty = [f for f in batch if f not in ready]
    texts = explainer.generate([prompts.explain_prompt(contexts_of(f).explain) for f in ready],
                               options.max_new_tokens) if ready else []
    explanations = {f: prompts.parse_explanation(t) or "(no explanation)" for f, t in zip(ready, texts)}
    controls = {f: contexts_of(partners[f]).score if f in partners else [] for f in ready}
    # every yes/no question of the batch at once: (feature, scorer, own or control) -> slice of the answers
    questions, truths, spans = [], [], {}
    for f in ready:   # own and control questions of one scorer run together: they share the explanation
        for name in ("detection", "fuzzing"):
            if name not in options.scorers:
                continue
            for which, contexts in (("own", contexts_of(f).score), ("control", controls[f])):
                if name == "detection":
                    items, truth = scorers.detection_items(explanations[f], contexts)
                else:
                    items, truth = scorers.fuzzing_items(explanations[f], contexts, seed=options.seed + f)
                spans[(f, name, which)] = (len(questions), len(questions) + len(items))
                questions += items
                truths += truth
    answers = explainer.yes_no(questions) if questions else []
    embedded = {}
    if embedder is not None and ready:
        pairs = [(explanations[f], contexts) for f in ready for contexts in (contexts_of(f).score, controls[f])]
        values = scorers.embedding_scores(embedder, pairs)
        embedded = {(f, which): values[2 * k + j] for k, f in enumerate(ready) for j, which in
                    enumerate(("own", "control"))}
    rows = []
    for f in ready:
        own = contexts_of(f)
        row = {"feature": f, "explanation": explanations[f], "explainer": explainer.name,
               "control_feature": partners.get(f), "explain_contexts": [c.id for c in own.explain],
               "score_contexts": [c.id for c in own.score], "score_activating": [c.activating for c in own.score],
               "control_contexts": [c.id for c in controls[f]]}
        for name in SCORES:
            for which, key in (("own", name), ("control", f"{name}_control")):
                if name == "embedding":
                    value = embedded.get((f, which))
                elif (f, name, which) in spans:
                    lo, hi = spans[(f, name, which)]
                    said = scorers.judged(answers[lo:hi], n_yes=sum(truths[lo:hi]))
                    value = scorers.balanced_accuracy(truths[lo:hi], said)
                else:
                    value = None
                row[key] = None if value is None or math.isnan(value) else float(value)
        rows.append(row)
    return rows, empty
