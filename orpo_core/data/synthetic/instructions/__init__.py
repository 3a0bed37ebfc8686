"""Verifiable instructions (IFEval-style): the verifiers and the seeded preference-data generator.

* :mod:`orpo_core.data.synthetic.instructions.verifiers`  one class per instruction id (argument validation),
  ``check(response) -> bool`` and the wording from lm-eval's IFEval checkers (``json_key`` is ours);
  shared by the data generator and the evaluation.
* :mod:`orpo_core.data.synthetic.instructions.checks`     lm-eval's 25 IFEval checkers, offline and seeded.
* :mod:`orpo_core.data.synthetic.instructions.requests`   IFEval-like requests for the on-policy stage;
  :mod:`~orpo_core.data.synthetic.instructions.repair` (minimal repairs) and
  :mod:`~orpo_core.data.synthetic.instructions.decontaminate` (13-gram overlap with a benchmark).
* :mod:`orpo_core.data.synthetic.instructions.generator`  seeded (prompt, chosen, rejected) rows whose chosen
  follows every constraint and rejected breaks one; a held-out split by (constraints, topic).
* :mod:`orpo_core.data.synthetic.instructions.bank`       the topics and facts the responses are made of.
"""

from orpo_core.data.synthetic.instructions import verifiers as _verifiers
from orpo_core.data.synthetic.instructions.generator import generate_instructions, heldout_keys, row_key
from orpo_core.data.synthetic.instructions.verifiers import *  # noqa: F403 - the verifiers' public names

__all__ = [*_verifiers.__all__, "generate_instructions", "heldout_keys", "row_key"]
