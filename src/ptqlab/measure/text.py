"""The evaluation text for perplexity and KL divergence: WikiText-2 test, or a labelled offline fallback.

WikiText-2 (raw, test split) comes from the Hugging Face Hub, its documents joined by "\\n\\n" as in the
standard protocol. Where the hub is unreachable and the dataset is not cached, ptqlab uses real English
text that ships with every CPython: the Python Language Reference topics of `pydoc_data` (PSF licence).
The report names the text used; the protocol (windows, scoring) stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptqlab.data import hub_reachable
from ptqlab.errors import PtqlabError

WIKITEXT = ("wikitext", "wikitext-2-raw-v1", "test")


@dataclass(frozen=True)
class EvalText:
    name: str
    """Short label for tables: `wikitext-2`, `python-docs (offline fallback)`, or a file name."""
    text: str
    source: str
    """Where it came from, with licence where known."""
    fallback: bool = False
    """True when the requested text could not be had and another was used (the report says so)."""


def _wikitext2() -> str | None:
    try:
        import datasets
        import huggingface_hub.constants
    except ImportError:
        return None
    # datasets reads its offline switch at import time: flip the module constants, not the environment.
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    attempts = [True] + ([False] if hub_reachable() else [])  # the local cache first, then the hub
    try:
        for offline in attempts:
            datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = offline
            try:
                test = datasets.load_dataset(*WIKITEXT[:2], split=WIKITEXT[2])
                return "\n\n".join(test["text"])
            except Exception:  # noqa: BLE001 - any failure means: not available here
                continue
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
    return None


def python_docs_text() -> str:
    """The Python Language Reference sections that CPython ships for pydoc, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def check_eval_text(name: str) -> None:
    """Before any work: a --ppl-text file that exists and is UTF-8 text (the built-in texts are read when measured)."""
    if name not in ("wikitext-2", "python-docs"):
        load_eval_text(name)


def load_eval_text(name: str = "wikitext-2") -> EvalText:
    """`wikitext-2` (with the offline fallback), `python-docs`, or a path to a UTF-8 .txt file."""
    if name == "wikitext-2":
        text = _wikitext2()
        if text is not None:
            return EvalText("wikitext-2", text, "Hugging Face dataset wikitext/wikitext-2-raw-v1, test split (CC BY-SA)")
        docs = load_eval_text("python-docs")
        return EvalText("python-docs (offline fallback)", docs.text,
                        "WikiText-2 unreachable (no hub, not cached); used " + docs.source, fallback=True)
    if name == "python-docs":
        return EvalText("python-docs", python_docs_text(),
                        "Python Language Reference topics shipped with CPython (pydoc_data.topics, PSF licence)")
    path = Path(name)
    if not path.is_file():
        raise PtqlabError(f"--ppl-text {name!r}: use wikitext-2, python-docs, or the path of a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PtqlabError(f"--ppl-text {name!r}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
                          "give a plain-text file, or wikitext-2 or python-docs") from None
    return EvalText(path.name, text, f"local file {path.resolve()}")
