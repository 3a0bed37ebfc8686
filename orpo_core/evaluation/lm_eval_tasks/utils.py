"""Document processing for the offline lm-eval tasks (imported by the task YAMLs via
``!function orpo_core.evaluation.lm_eval_tasks.utils.<name>``).

Copied from lm-eval 0.4.13 (``lm_eval/tasks/hellaswag/utils.py``,
``lm_eval/tasks/winogrande/preprocess_winogrande.py``) and adapted to the field
names of the files in ``shared/data/eval`` (see its README).
"""

from __future__ import annotations

import re


def _hellaswag_preprocess(text: str) -> str:
    # lm_eval/tasks/hellaswag/utils.py::preprocess (verbatim)
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag_ctx(doc: dict) -> str:
    """Upstream builds ``ctx_a + " " + ctx_b.capitalize()``. The local file only has the
    joined ``ctx`` (ctx_a + " " + ctx_b, ctx_b not capitalised); when ctx_a/ctx_b are
    absent the fragment after the last ". " is taken as ctx_b and its first letter
    upper-cased (ctx_b is a lower-case sentence start such as "the boy"; when ctx_b is
    empty the last fragment is a sentence of ctx_a that already starts upper-case)."""
    if "ctx_a" in doc and "ctx_b" in doc:
        return doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    ctx = doc["ctx"]
    cut = ctx.rfind(". ")
    head, tail = (ctx[: cut + 2], ctx[cut + 2 :]) if cut >= 0 else ("", ctx)
    if tail[:1].islower():
        tail = tail[0].upper() + tail[1:]
    return head + tail


def hellaswag_process_docs(dataset):
    """lm_eval/tasks/hellaswag/utils.py::process_docs with the joined ``ctx`` field."""

    def _process_doc(doc):
        return {
            "query": _hellaswag_preprocess(doc["activity_label"] + ": " + _hellaswag_ctx(doc)),
            "choices": [_hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


def winogrande_doc_to_text(doc):
    """lm_eval/tasks/winogrande/preprocess_winogrande.py::doc_to_text (partial evaluation:
    returns the index of the correct context)."""
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[str(doc["answer"])]


def winogrande_doc_to_target(doc):
    """The sentence after the blank (scored continuation)."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    """The sentence up to the blank with each option filled in (the contexts)."""
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]


def boolq_process_docs(dataset):
    """Adds super_glue's ``label`` (1 = true, 0 = false) from BoolQ's boolean ``answer``."""

    def _process_doc(doc):
        return {"label": int(bool(doc["answer"]))}

    return dataset.map(_process_doc)
