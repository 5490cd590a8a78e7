"""Offline text for activation statistics: Python's own documentation prose, and small
labelled concept sentences.

Methods such as *top-activating contexts* (Geva et al., 2021) or *semi-NMF of MLP
activations* (Shafran et al., 2025) need many tokens of ordinary text. No text corpus
ships with the book's dependencies, but every Python installation carries
``pydoc_data.topics``: the reference manual's topic pages that ``help("if")`` prints,
about 65k words of English prose. :func:`pydoc_passages` cleans it (drops headings,
grammar rules and code samples, joins wrapped lines) and returns one passage per prose
paragraph; :func:`pack` turns texts into equal-length token windows for batched forward
passes.

Provenance and licence (``PYDOC_SOURCE``, ``PYDOC_LICENSE``): the text is the
Python documentation, Copyright Python Software Foundation, distributed with CPython
under the PSF License Agreement (Python documentation is under that licence; its code
examples under the Zero-Clause BSD licence).

:func:`concept_sentences` builds short labelled sentences from templates and small word
lists written for this book (days, months, colours, numbers, animals, family members,
body parts, countries), for concept-detection and steering experiments where a label is
needed. They are synthetic: a concept here is a word list, not a human annotation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

__all__ = [
    "PYDOC_SOURCE", "PYDOC_LICENSE", "Passage", "pydoc_passages", "pack",
    "docstring_passages", "package_source",
    "CONCEPTS", "TEMPLATES", "concept_sentences", "concept_batch",
]

PYDOC_SOURCE = ("Python's reference-manual topics (module pydoc_data.topics of the running "
                "Python, the text that help('if') prints)")
PYDOC_LICENSE = ("Python documentation, Copyright Python Software Foundation; PSF License "
                 "Agreement (code examples: Zero-Clause BSD)")


@dataclass(frozen=True)
class Passage:
    """One prose paragraph of the Python documentation and the topic it comes from."""

    topic: str
    text: str


_RULE = re.compile(r"^[\*=\-~^\"'`#+]{3,}\s*$")


def _is_prose(paragraph: str, min_words: int) -> bool:
    words = paragraph.split()
    if len(words) < min_words:
        return False
    letters = sum(c.isalpha() for c in paragraph)
    if letters < 0.6 * len(paragraph.replace(" ", "")):
        return False  # grammar rules, tables, code
    if "::=" in paragraph or ">>>" in paragraph:
        return False
    return True


def clean_topic(text: str, *, min_words: int = 12) -> list[str]:
    """The prose paragraphs of one ``pydoc_data.topics`` page.

    Headings (and their underlines), indented blocks (code samples, grammar, tables)
    and short fragments are dropped; wrapped lines are joined with single spaces.
    """
    paragraphs, current = [], []
    lines = text.splitlines() + [""]
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if _RULE.match(nxt.strip()) and line.strip() and not current:
            continue  # a heading: its underline follows
        if _RULE.match(line.strip()):
            continue
        if not line.strip() or line.startswith((" ", "\t")):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(line.strip())
    return [p for p in paragraphs if _is_prose(p, min_words)]


def pydoc_passages(*, min_words: int = 12, topics: Iterable[str] | None = None) -> list[Passage]:
    """Every prose paragraph of ``pydoc_data.topics``, in the module's (sorted) topic order.

    Deterministic for a given Python version: the text is part of the interpreter's
    standard library (see ``PYDOC_SOURCE`` and ``PYDOC_LICENSE``).
    """
    from pydoc_data.topics import topics as pages

    names = sorted(pages) if topics is None else list(topics)
    return [Passage(name, p) for name in names for p in clean_topic(pages[name], min_words=min_words)]


def pack(encode: Callable[[str], Sequence[int]], texts: Iterable[str], seq_len: int = 64, *,
         max_tokens: int | None = None, separator: Sequence[int] = (), prefix: Sequence[int] = ()) -> torch.Tensor:
    """Concatenate the token ids of ``texts`` (with ``separator`` ids between them) and cut
    them into windows of ``seq_len`` tokens: a ``[n_windows, seq_len]`` LongTensor.

    ``encode`` maps a text to ids (e.g. ``lambda t: tok(t, add_special_tokens=False)
    ["input_ids"]``). ``prefix`` ids start every window and the text fills the rest: pass
    the tokenizer's own start of a text (``tok("")["input_ids"]``: Gemma's BOS, nothing
    for SmolLM2) so that each window looks like a document to the model. Windows need no
    padding, so a batch of them is one dense forward pass; the incomplete tail is
    dropped. ``max_tokens`` caps the total (rounded down to whole windows).
    """
    prefix = [int(i) for i in prefix]
    body = seq_len - len(prefix)
    if body < 2:
        raise ValueError(f"seq_len={seq_len} leaves {body} text tokens per window after the "
                         f"{len(prefix)}-token prefix; need at least 2")
    ids: list[int] = []
    n_max = None if max_tokens is None else max_tokens // seq_len
    for text in texts:
        if ids and separator:
            ids.extend(separator)
        ids.extend(int(i) for i in encode(text))
        if n_max is not None and len(ids) >= n_max * body:
            break
    n = len(ids) // body if n_max is None else min(len(ids) // body, n_max)
    if n == 0:
        raise ValueError(f"the texts have {len(ids)} tokens, fewer than one window of {body}")
    windows = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n, -1), windows], 1)


# --- docstrings of installed packages ---------------------------------------------------
def package_source(package: str) -> str:
    """Where :func:`docstring_passages` text comes from: the distribution, its version and
    its licence as its installed metadata declares it (``License-Expression``, ``License``
    or a ``License ::`` classifier)."""
    from importlib import metadata

    dists = metadata.packages_distributions().get(package) or [package]
    meta = metadata.metadata(dists[0])
    licence = meta.get("License-Expression") or (meta.get("License") or "").strip().splitlines()
    licence = licence if isinstance(licence, str) else (licence[0] if licence else "")
    if not licence or len(licence) > 80:
        classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
        licence = ", ".join(classifiers) or licence[:80] or "licence not declared in its metadata"
    return f"{meta['Name']} {meta['Version']} ({licence})"


def _docstrings(tree) -> Iterable[tuple[str, str]]:
    """(qualified name, docstring) of a module and its classes and functions, in source order."""
    import ast

    stack = [("", tree)]
    while stack:
        prefix, node = stack.pop(0)
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield prefix or "<module>", doc
        children = [n for n in ast.iter_child_nodes(node)
                    if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        stack[:0] = [(f"{prefix}.{n.name}".lstrip("."), n) for n in children]


def _package_passages(package: str, min_words: int) -> Iterable[Passage]:
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(package)
    if spec is None or not (spec.submodule_search_locations or spec.origin):
        raise ValueError(f"Package {package!r} is not installed here; pick one that is.")
    roots = [Path(p) for p in spec.submodule_search_locations or []] or [Path(spec.origin)]
    for path in sorted(f for r in roots for f in ([r] if r.is_file() else r.rglob("*.py"))):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(path.relative_to(roots[0].parent).with_suffix("").parts)
        for name, doc in _docstrings(tree):
            for paragraph in clean_topic(doc, min_words=min_words):
                yield Passage(f"{module}:{name}", paragraph)


def docstring_passages(packages: Sequence[str] = ("transformers", "torch"), *, min_words: int = 12,
                       max_words: int | None = None) -> list[Passage]:
    """Prose paragraphs of the docstrings of installed ``packages``, read with ``ast``
    (nothing is imported or executed).

    Files are visited in sorted path order, and each file's docstrings in source order, so
    the result is deterministic for given package versions. Paragraphs are cleaned like the
    pydoc topics (``clean_topic``: indented blocks such as parameter descriptions and
    examples, section headings and short fragments are dropped). ``topic`` is
    ``module:qualified.name``. Takes at most about ``max_words`` words from each package.
    Record the text's origin with :func:`package_source`.
    """
    out: list[Passage] = []
    for package in packages:
        words = 0
        for passage in _package_passages(package, min_words):
            if max_words is not None and words >= max_words:
                break
            out.append(passage)
            words += len(passage.text.split())
    return out


# --- labelled concept sentences ------------------------------------------------------------
CONCEPTS: dict[str, list[str]] = {
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "month": ["January", "February", "March", "April", "June", "July", "August", "September",
              "October", "November", "December"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"],
    "number": ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"],
    "animal": ["dog", "cat", "horse", "cow", "lion", "tiger", "rabbit", "sheep", "wolf", "bear"],
    "family": ["mother", "father", "sister", "brother", "aunt", "uncle", "grandmother", "cousin",
               "son", "daughter"],
    "body": ["hand", "foot", "head", "arm", "leg", "knee", "shoulder", "finger", "nose", "ear"],
    "country": ["France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Brazil",
                "Canada", "Egypt"],
}
"""Concept word lists (written for this book). Each word is one token after a space in
common BPE vocabularies, but callers should not rely on it."""

TEMPLATES: dict[str, list[str]] = {
    "day": ["The meeting was moved to {w} morning.", "We always go swimming on {w}.",
            "The shop is closed every {w} afternoon.", "She said the parcel would arrive on {w}."],
    "month": ["The festival takes place every year in {w}.", "Their daughter was born in {w}.",
              "The weather in {w} is usually mild.", "The report is due at the end of {w}."],
    "colour": ["He painted the old fence {w}.", "She wore a long {w} dress to the party.",
               "The car in front of us was {w}.", "They chose {w} curtains for the kitchen."],
    "number": ["There were {w} apples left in the basket.", "The child counted to {w} and stopped.",
               "We waited for {w} hours at the station.", "The recipe needs {w} eggs."],
    "animal": ["In the field we saw a {w} sleeping.", "The children fed the {w} at the farm.",
               "A {w} was standing near the river.", "The story is about a brave little {w}."],
    "family": ["I visited my {w} last weekend.", "Her {w} lives in a small village.",
               "The letter was written by his {w}.", "We cooked dinner with my {w}."],
    "body": ["He hurt his {w} while playing football.", "The doctor looked at her {w} carefully.",
             "My {w} has been aching all day.", "She raised her {w} to ask a question."],
    "country": ["Last summer we travelled to {w}.", "The ambassador returned from {w} yesterday.",
                "Many tourists visit {w} every year.", "The company opened an office in {w}."],
}
"""Sentence templates per concept; ``{w}`` is replaced by a word of that concept."""


def concept_sentences(*, seed: int = 0, concepts: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """Every (concept, word, sentence) from :data:`TEMPLATES` x :data:`CONCEPTS`, shuffled
    with ``seed``. Capitalises a sentence-initial word."""
    names = list(CONCEPTS) if concepts is None else list(concepts)
    out = []
    for c in names:
        for template in TEMPLATES[c]:
            for w in CONCEPTS[c]:
                s = template.format(w=w)
                out.append((c, w, s[0].upper() + s[1:]))
    random.Random(seed).shuffle(out)
    return out


def concept_batch(tokenizer, items: Sequence[tuple[str, str, str]]) -> tuple[dict, list[list[str | None]]]:
    """Tokenise (concept, word, sentence) items as one left-padded batch, and label every
    token: the concept's name on the tokens of its word, ``None`` elsewhere (one list per
    sentence, real tokens only, in order).

    Sentences start the way the tokenizer starts a text (``tokenizer("")``: Gemma's BOS,
    nothing for SmolLM2); those start tokens are labelled ``None``.
    """
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    start_ids = list(tokenizer("")["input_ids"])
    labels, rows = [], []
    for concept, word, sentence in items:
        start = sentence.index(word)
        a, b, n = len(enc(sentence[:start].rstrip())), len(enc(sentence[: start + len(word)])), len(enc(sentence))
        row: list[str | None] = [None] * n
        for j in range(a, min(b, n)):
            row[j] = concept
        labels.append([None] * len(start_ids) + row)
        rows.append(start_ids + list(enc(sentence)))
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}, labels
