"""sae explain on a planted world: a word-level store where three latents fire exactly on three groups of
trigger words (animals, colours, fruits), an SAE whose weights say so, and `sae analyze` run on it.
Scorers are checked against hand-computed values, the embedding scorer against the planted truth, and the
whole command against a tiny real language model, in process and behind a real HTTP server."""
from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sae.errors import UserError

GROUPS = {"animals": ["dog", "cat", "horse", "cow", "sheep"],
          "colours": ["red", "blue", "green", "yellow", "purple"],
          "fruits": ["apple", "banana", "cherry", "grape", "lemon"]}
FILLER = ("the a of and in to said report market government today year people city new week plan "
          "minister team company state public local told first last").split()
TRUE = {0: "animals such as dog, cat, horse, cow and sheep",
        1: "colour words such as red, blue, green, yellow and purple",
        2: "fruits such as apple, banana, cherry, grape and lemon"}
D, D_SAE, CONTEXT = 16, 8, 17


def word_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = FILLER + [w for group in GROUPS.values() for w in group] + ["print", "def", "return", "x", "=", "(", ")"]
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>"] + ["Ġ" + w for w in words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def documents(n_docs=240, seed=0, kind="news"):
    """Word lists: filler with, in most documents, one or two trigger words of one group; kind="code" gives
    documents of another kind (code-like words only), for the anomaly test."""
    rng = np.random.default_rng(seed)
    code = ["print", "def", "return", "x", "=", "(", ")"]
    docs = []
    for i in range(n_docs):
        if kind == "code":
            docs.append([code[j] for j in rng.integers(0, len(code), CONTEXT - 1)])
            continue
        words = [FILLER[j] for j in rng.integers(0, len(FILLER), CONTEXT - 1)]
        group = list(GROUPS.values())[i % 3]
        for _ in range(int(rng.integers(0, 3))):
            words[int(rng.integers(0, len(words)))] = group[int(rng.integers(0, len(group)))]
        docs.append(words)
    return docs


def write_world_store(path, tokenizer, docs, seed=0, token_vectors=None):
    """One window per document (BOS at 0, not stored). Activation = a fixed vector per word (zero on the
    first three dimensions) plus 3 on dimension g for a word of trigger group g."""
    from sae.files import write_json
    from sae.store import shard_name, write_shard
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    if token_vectors is None:
        token_vectors = torch.randn(vocab, D, generator=torch.Generator().manual_seed(1)) * 0.5
        token_vectors[:, :3] = 0
    group_of = {tokenizer.convert_tokens_to_ids("Ġ" + w): g for g, ws in enumerate(GROUPS.values()) for w in ws}
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(["Ġ" + w for w in d]) for d in docs])
    window_index = torch.arange(len(docs)).repeat_interleave(CONTEXT - 1)
    position = torch.arange(1, CONTEXT).repeat(len(docs)).to(torch.int32)
    token_ids = ids[window_index, position.long()]
    x = token_vectors[token_ids] + 0.05 * torch.randn(len(token_ids), D, generator=gen)
    for token, g in group_of.items():
        x[token_ids == token, g] += 3.0
    path.mkdir(parents=True, exist_ok=True)
    write_shard(path / shard_name(0), {"activations.0": x.float(), "token_ids": token_ids.to(torch.int32),
                                        "window_tokens": ids.to(torch.int32), "window_index": window_index,
                                        "position": position, "doc_id": window_index.clone()})
    write_json(path / "manifest.json", {
        "model": str(path.parent / "tok"), "layers": [0], "site": "resid_post", "d_model": D,
        "n_tokens": len(token_ids), "context_size": CONTEXT, "dataset": "planted", "dtype": "float32",
        "shards": [shard_name(0)], "shard_rows": [len(token_ids)], "held_out": {"rule": "x", "modulus": 20}})
    from sae.store import ActivationStore
    return ActivationStore(path), token_vectors


def planted_sae():
    """Latent g < 3 reads dimension g (fires only on trigger group g); latents 3-7 read filler dimensions."""
    from sae import variants
    model = variants.create("relu", d_in=D, d_sae=D_SAE)
    with torch.no_grad():
        model.W_enc.zero_()
        model.b_dec.zero_()
        for j in range(D_SAE):
            model.W_enc[j, j] = 1.0
        model.b_enc.copy_(torch.tensor([-1.5] * 3 + [-0.2] * (D_SAE - 3)))
        model.W_dec.copy_(model.W_enc.T)
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def build_world(root):
    """ROOT/tok (the word tokenizer), ROOT/store, ROOT/run with the planted SAE, analysed."""
    from sae.analyze.pipeline import AnalyzeOptions, analyze
    from sae.runs import save_run
    tokenizer = word_tokenizer(root / "tok")
    store, _ = write_world_store(root / "store", tokenizer, documents())
    save_run(planted_sae(), root / "run", {"layer": 0, "site": "resid_post", "model": str(root / "tok")})
    analyze(root / "run", store, options=AnalyzeOptions(with_model=False, n_top=20), log=None)
    return root


@pytest.fixture(scope="module")
def tiny_judge():
    from conftest import build_tiny_lm
    from sae.explain.explainers import LocalLM
    return LocalLM("tiny-llama", loaded=build_tiny_lm("llama"), batch_size=64)


SMALL = dict(radius=4, n_explain_top=3, n_explain_interval=1, n_score=4)   # short prompts for the tiny model


def options(**kw):
    from sae.explain.contexts import ContextOptions
    from sae.explain.pipeline import ExplainOptions
    return ExplainOptions(batch_features=1, max_new_tokens=6, contexts=ContextOptions(**SMALL), **kw)


def source_for(world, **kw):
    from sae.explain.contexts import ContextOptions, ContextSource
    from sae.runs import load
    from sae.store import ActivationStore
    from sae.lm import load_tokenizer
    store = ActivationStore(world / "store")
    return ContextSource(world / "run" / "analysis", store, 0, load(world / "run"), ContextOptions(**kw),
                         tokenizer=load_tokenizer(str(world / "tok")))


# ---- contexts --------------------------------------------------------------------------------------------
def test_explaining_and_scoring_contexts_never_share_a_window(world):
    source = source_for(world)
    for feature in range(3):
        contexts = source.build(feature)
        assert contexts.explain and contexts.score
        shown = {c.window for c in contexts.explain}
        assert not shown & {c.window for c in contexts.score}
        assert not {c.id for c in contexts.explain} & {c.id for c in contexts.score}
        words = set(GROUPS[list(GROUPS)[feature]])
        for c in contexts.explain + contexts.score:
            firing = {c.tokens[i].strip() for i in c.firing()}
            assert firing <= words                 # a planted latent fires on its own trigger words only
            assert c.activating == bool(words & {t.strip() for t in c.tokens})   # silent ones hold no trigger
        kinds = {c.kind for c in contexts.score}
        assert {"top", "random"} <= kinds and sum(c.activating for c in contexts.score) == \
            sum(not c.activating for c in contexts.score)


# ---- scorers against hand-computed values ------------------------------------------------------------------
class WordJudge:
    """The test's own judge: says yes when a given word is in the prompt's text line (or marked)."""
    name = "word-judge"

    def __init__(self, word):
        self.word = word

    def yes_no(self, prompts):
        texts = [p[-1]["content"].split("Text: ")[1].split("\n")[0] + " " for p in prompts]
        return [f"<<{self.word}" in t if "<<" in t else f" {self.word} " in t for t in texts]


def test_detection_and_fuzzing_equal_hand_computed_values():
    from sae.explain.contexts import Context
    from sae.explain.scorers import balanced_accuracy, detection_items, fuzzing_items
    contexts = [Context("a", "a", [" the", " dog", " ran"], [0, 2.0, 0], "top"),
                Context("b", "b", [" a", " cat", " sat"], [0, 1.0, 0], "top"),
                Context("c", "c", [" the", " dog", " sat"], [0, 0, 0], "random"),    # says dog, silent
                Context("d", "d", [" a", " cow", " sat"], [0, 0, 0], "random")]
    prompts, truth = detection_items("dogs", contexts)
    answers = WordJudge("dog").yes_no(prompts)
    assert truth == [True, True, False, False] and answers == [True, False, True, False]
    # recall on activating 1/2, on silent 1/2
    assert balanced_accuracy(truth, answers) == pytest.approx(0.5)
    prompts, truth = fuzzing_items("dogs", contexts, seed=3)
    assert truth == [True, False, True, False]            # two activating contexts, marked right then wrong
    assert "Text:  the <<dog>> ran" in prompts[0][-1]["content"]
    answers = WordJudge("dog").yes_no(prompts)
    assert answers == [True, False, False, False]
    assert balanced_accuracy(truth, answers) == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert math.isnan(balanced_accuracy([True, True], [True, False]))      # one class: nothing to tell apart


@pytest.mark.parametrize("family,attention", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
def test_packed_yes_no_margins_equal_each_prompt_run_alone(family, attention):
    """Prompts with a common start are packed into one row under a block mask; each margin must equal the
    margin of that prompt run alone through the model (the test's own forward and log-softmax)."""
    from conftest import build_tiny_lm
    from sae.explain.explainers import LocalLM, _as_text, shared_prefix_groups
    loaded = build_tiny_lm(family)
    loaded.model.config._attn_implementation = attention
    judge = LocalLM("tiny", loaded=loaded)
    gen = np.random.default_rng(0)
    words = ["the", "dog", "ran", "cat", "sat", "on", "a", "mat"]
    texts = [" ".join(gen.choice(words, size=gen.integers(2, 7))) for _ in range(11)]
    questions = ([[{"role": "user", "content": f"Pattern: dogs. Text: {t}"}] for t in texts] +
                 [[{"role": "user", "content": f"Pattern: cats on mats. Marked: {t}"}] for t in texts] +
                 [[{"role": "user", "content": "x"}]])         # short prompts: every one fits the 256 positions
    ids = [judge.tokenizer(_as_text(judge.tokenizer, q), add_special_tokens=False)["input_ids"] for q in questions]
    assert max(map(len, ids)) < 256
    assert len(list(shared_prefix_groups(ids))) <= 8              # packing happens: 23 prompts in a few rows
    margins = judge.yes_no(questions, tokens_per_pass=150)       # several forward passes of packed rows
    yes, no = (torch.tensor(judge.answer_ids[w]) for w in ("Yes", "No"))
    with torch.no_grad():
        for question, margin in zip(questions, margins):
            ids = judge.tokenizer(_as_text(judge.tokenizer, question), add_special_tokens=False,
                                  return_tensors="pt")["input_ids"]
            logp = loaded.model(input_ids=ids).logits[0, -1].log_softmax(-1)
            assert margin == pytest.approx(float(logp[yes].logsumexp(-1) - logp[no].logsumexp(-1)), abs=1e-4)


def test_shared_prefix_groups_cover_every_prompt_once_with_a_true_common_start():
    from sae.explain.explainers import shared_prefix_groups
    gen = np.random.default_rng(1)
    heads = [gen.integers(0, 50, size=20).tolist() for _ in range(3)]
    ids = [heads[k // 10] + gen.integers(0, 50, size=gen.integers(1, 6)).tolist() for k in range(30)] + [[7]]
    groups = list(shared_prefix_groups(ids, most=8))
    assert [i for a, b, _ in groups for i in range(a, b)] == list(range(len(ids)))
    for a, b, shared in groups:
        assert b - a <= 8 and all(ids[i][:shared] == ids[a][:shared] and len(ids[i]) > shared for i in range(a, b))
        if b - a > 1:
            assert shared >= 20                     # the whole common head is shared


def test_a_local_judges_margins_are_calibrated_to_the_number_of_true_yes():
    """A judge that leans Yes on everything (as SmolLM2-135M does) scores chance on its raw answers; its
    margins still rank the items, and the calibrated answers say Yes to the n_yes most Yes-leaning."""
    from sae.explain.scorers import balanced_accuracy, judged
    truth = [True, True, True, False, False, False]
    margins = [3.0, 2.5, 1.0, 2.0, 0.5, 0.1]                       # all > 0: raw answers all Yes
    assert balanced_accuracy(truth, [m > 0 for m in margins]) == pytest.approx(0.5)
    said = judged(margins, n_yes=3)
    assert said == [True, True, False, True, False, False]
    assert balanced_accuracy(truth, said) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert judged([True, False, True], n_yes=1) == [True, False, True]           # booleans are kept as given


def test_embedding_scorer_ranks_the_true_explanation(world):
    from sae.explain.scorers import Embedder, embedding_scores
    source = source_for(world)
    contexts = source.build(0).score
    scores = embedding_scores(Embedder.shared("cpu"), [(TRUE[0], contexts), (TRUE[1], contexts)])
    assert scores[0] >= 0.85, scores
    assert scores[1] <= 0.6, scores


# ---- the whole command -----------------------------------------------------------------------------------------
def test_explain_writes_rows_with_scores_and_controls_and_resumes(world, tiny_judge):
    from sae.explain.pipeline import explain
    path = world / "run" / "analysis" / "explanations.parquet"
    summary = explain(world / "run", world / "store", options(features="0,1", force=True), judge=tiny_judge, log=None)
    assert summary["n_new"] == 2
    table = pq.read_table(path).to_pylist()
    assert [row["feature"] for row in table] == [0, 1]
    for row in table:
        assert row["explainer"] == "tiny-llama" and row["control_feature"] in (0, 1)
        assert row["control_feature"] != row["feature"]
        for key in ("detection", "fuzzing", "embedding", "detection_control", "fuzzing_control",
                    "embedding_control"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0
        assert row["embedding"] is not None and row["detection"] is not None
        assert not set(row["explain_contexts"]) & set(row["score_contexts"])
    # resumable: a second run keeps both rows and only adds the new feature
    before = {row["feature"]: row["explanation"] for row in table}
    summary = explain(world / "run", world / "store", options(features="0,1,2", scorers=("detection",)),
                      judge=tiny_judge, log=None)
    assert summary["n_new"] == 1 and summary["n_explained"] == 3
    after = {row["feature"]: row["explanation"] for row in pq.read_table(path).to_pylist()}
    assert {f: after[f] for f in before} == before


def test_killed_explain_keeps_the_features_done(world, tiny_judge):
    """A kill after the first batch: the file holds that batch (written whole, atomically) and nothing else."""
    from sae.explain.pipeline import explain

    class Dies(type(tiny_judge)):
        calls = 0

        def generate(self, prompts, max_new_tokens=32):
            Dies.calls += 1
            if Dies.calls == 2:
                raise KeyboardInterrupt         # as a kill between batches
            return super().generate(prompts, max_new_tokens)

    judge = Dies.__new__(Dies)
    judge.__dict__.update(tiny_judge.__dict__)
    with pytest.raises(KeyboardInterrupt):
        explain(world / "run", world / "store", options(features="0,1,2", force=True, scorers=("detection",)),
                judge=judge, log=None)
    rows = pq.read_table(world / "run" / "analysis" / "explanations.parquet").to_pylist()
    assert len(rows) == 1
    assert not list((world / "run" / "analysis").glob(".explanations.parquet.tmp*"))


# ---- a real OpenAI-compatible server with a real (tiny) model behind it -------------------------------------------
def serve(judge):
    """/v1/chat/completions answered by the tiny model's greedy generation, on a free port."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not self.path.endswith("/v1/chat/completions"):
                self.send_error(404)
                return
            text = judge.generate([body["messages"]], int(body.get("max_tokens") or 8))[0]
            payload = json.dumps({"object": "chat.completion", "model": body["model"], "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_explain_through_an_openai_compatible_server_then_unreachable(world, tiny_judge, capsys):
    from sae.cli import main
    server = serve(tiny_judge)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    common = ["explain", "--run", str(world / "run"), "--activations", str(world / "store"), "--explainer-url", url,
              "--explainer-model", "tiny", "--scorers", "detection,fuzzing", "--batch-size", "1", "--context", "4",
              "--examples", "3", "--score-examples", "4"]
    with pytest.raises(SystemExit) as done:
        main(common + ["--features", "1,2", "--force"])
    assert done.value.code == 0
    rows = pq.read_table(world / "run" / "analysis" / "explanations.parquet").to_pylist()
    assert [r["feature"] for r in rows] == [1, 2] and rows[0]["explainer"] == f"tiny @ {url}"
    assert rows[0]["detection"] is not None and rows[0]["embedding"] is None
    server.shutdown()
    server.server_close()
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(common + ["--features", "0,1,2"])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1
    assert url + "/chat/completions" in err and "2 features explained so far are kept" in err
    assert [r["feature"] for r in pq.read_table(world / "run" / "analysis" / "explanations.parquet").to_pylist()] == [1, 2]


# ---- bad input -----------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line(world, tmp_path, capsys):
    from sae.cli import main
    from sae.runs import save_run
    save_run(planted_sae(), tmp_path / "fresh", {"layer": 0, "site": "resid_post", "model": str(world / "tok")})
    cases = [(["--run", str(tmp_path / "fresh")], "has not been analysed"),
             (["--run", str(world / "run"), "--features", "3,99"], "out of range: 99"),
             (["--run", str(world / "run"), "--features", "2", "--explainer-model", "x"], "--explainer-url"),
             (["--run", str(world / "run"), "--features", "2", "--explainer-url", "ftp://x"], "http://")]
    for args, expected in cases:
        with pytest.raises(SystemExit) as done:
            main(["explain", "--activations", str(world / "store"), *args])
        err = capsys.readouterr().err.strip()
        assert done.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err


def test_an_explainer_that_cannot_generate_is_refused(tiny_lm):
    from sae.explain.explainers import LocalLM
    with pytest.raises(UserError, match="cannot generate"):
        LocalLM("tiny-bert", loaded=tiny_lm("bert"))


def test_choose_features():
    from sae.explain.pipeline import choose_features
    density = np.array([0.1, 0.0, 0.5, 0.2])
    assert choose_features("2", density) == [2, 3]
    assert choose_features("all", density) == [0, 2, 3]
    assert choose_features("3,0", density) == [3, 0]
    with pytest.raises(UserError, match="out of range: 4"):
        choose_features("0,4", density)


def test_default_scorers_drop_the_yes_no_scorers_only_for_the_embedded_judge():
    from sae.explain.pipeline import ALL_SCORERS, ExplainOptions, default_scorers
    assert default_scorers(ExplainOptions()) == ("embedding",)
    assert default_scorers(ExplainOptions(explainer="Qwen/Qwen2.5-1.5B-Instruct")) == ALL_SCORERS
    assert default_scorers(ExplainOptions(explainer_url="http://localhost:8000/v1", explainer_model="m")) == ALL_SCORERS


def test_explanations_lose_the_small_models_preamble():
    from sae.explain.prompts import parse_explanation
    assert parse_explanation("have in common that they are all about the French star") == "about the French star"
    assert parse_explanation("Explanation: sports teams\nmore") == "sports teams"
    assert parse_explanation("They all share the word bank") == "share the word bank"
    assert parse_explanation("have a common thread of <<federal budget>> and **cuts**") == "federal budget and cuts"
