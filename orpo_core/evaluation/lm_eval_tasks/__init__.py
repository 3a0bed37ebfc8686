"""Offline lm-evaluation-harness task configs (templates) and their helper functions.

The ``*.yaml`` files here are templates: ``__ORPO_EVAL_DATA__`` is replaced with
the absolute data folder (``eval.tasks_dir``) when
:func:`orpo_core.evaluation.harness.write_local_task_configs` copies them into a
temporary include folder for ``lm_eval.tasks.TaskManager(include_path=...)``.
Their prompt logic (``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice``,
metrics, version) is copied from the upstream lm-eval 0.4 task YAMLs named in each
file, with ``dataset_path: json`` and local ``data_files`` instead of a Hub dataset.
"""
