"""Prompts in the style of EleutherAI's delphi: examples with the activating tokens marked <<like this>>,
a request for a short explanation, and yes/no questions for the detection and fuzzing scorers.

Each prompt is a list of chat messages ({"role", "content"}); the explainers apply the chat template."""
from __future__ import annotations

SYSTEM = ("You are a meticulous AI researcher investigating patterns in language. You look at text excerpts "
          "in which some tokens are marked <<like this>> and say, in a few words, what the marked tokens have "
          "in common.")
JUDGE = "You judge whether a description of a text pattern fits a text. Answer with Yes or No only."
MAX_EXPLANATION = 160          # characters kept of an explanation


def clean(token: str) -> str:
    return token.replace("\n", "\\n")


def mark(tokens, marked) -> str:
    """The text with the tokens at the `marked` indices wrapped in << >> (adjacent ones joined)."""
    marked = set(marked)
    out, open_ = [], False
    for i, token in enumerate(tokens):
        token = clean(token)
        if i in marked and not open_:
            stripped = token.lstrip()
            out.append(token[: len(token) - len(stripped)] + "<<" + stripped)
            open_ = True
        elif i not in marked and open_:
            out.append(">>" + token)
            open_ = False
        else:
            out.append(token)
    if open_:
        out.append(">>")
    return "".join(out)


def plain(tokens) -> str:
    return "".join(clean(t) for t in tokens)


QUESTION = "What do the marked tokens have in common? Reply with one short phrase (at most ten words), no preamble."
# No worked example: with one (animals: dog, cat, ...) SmolLM2-135M copied its answer for every feature.


def explain_prompt(contexts) -> list[dict]:
    examples = "\n".join(f"Example {i + 1}: {mark(c.tokens, c.firing())}" for i, c in enumerate(contexts))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{examples}\n\n{QUESTION}"}]


# the question comes before the text, so that the prompts of one explanation share all but the text (one
# cached start, sae.explain.explainers.LocalLM.yes_no)
def detection_prompt(explanation: str, context) -> list[dict]:
    user = (f"Pattern: {explanation}\nDoes the text below contain this pattern? Answer Yes or No.\n"
            f"Text: {plain(context.tokens)}")
    return [{"role": "system", "content": JUDGE}, {"role": "user", "content": user}]


def fuzzing_prompt(explanation: str, context, marked) -> list[dict]:
    user = (f"Pattern: {explanation}\nAre the tokens marked <<like this>> in the text below instances of the "
            f"pattern? Answer Yes or No.\nText: {mark(context.tokens, marked)}")
    return [{"role": "system", "content": JUDGE}, {"role": "user", "content": user}]


PREAMBLES = ("explanation:", "answer:", "the marked tokens are", "the marked tokens", "have in common that",
             "have in common", "have a common thread in the context of", "have a common thread of being",
             "have a common thread of", "have a common thread in", "they are all", "they all", "they are")


def parse_explanation(text: str) -> str:
    """The first non-empty line, without a leading 'Explanation:' or quotes, cut to MAX_EXPLANATION chars."""
    for line in (text or "").splitlines():
        line = line.replace("<<", "").replace(">>", "").replace("**", "")     # marks copied from the examples
        line = line.strip().strip("\"'`*").strip()
        for prefix in PREAMBLES:      # in order: "... have in common that they are all X" -> "X"
            if line.lower().startswith(prefix):
                line = line[len(prefix):].strip(" :,")
        if line:
            return line[:MAX_EXPLANATION]
    return ""


def parse_yes_no(text: str) -> bool | None:
    """True for an answer that starts with yes, False for no, None for anything else."""
    word = (text or "").strip().strip("\"'`*.").lower()
    if word.startswith("yes"):
        return True
    if word.startswith("no"):
        return False
    return None
