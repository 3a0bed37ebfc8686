"""Model card (README.md) for a model trained with ORPO.

The card has the Hub's YAML metadata block (built with
:class:`huggingface_hub.ModelCardData`: ``base_model``, ``datasets``, ``tags``
including ``orpo``, ``license``, ``library_name: transformers`` and a
``model-index`` with one :class:`huggingface_hub.EvalResult` per metric of the
trained model) followed by a Markdown body: what was trained and how, the
recipe as YAML with secrets stripped, a hyper-parameter table, a metrics table
(trained vs base with deltas and 95 % confidence intervals where the
evaluation reported them), a usage snippet and the ORPO citation.

Metrics are read from the evaluation stage's ``eval.json`` with
:func:`extract_metrics`, which accepts the layouts the evaluation report may use
(model-major ``results[model][metric]`` or metric-major
``results[metric][model]``, values as plain numbers or ``{"value": .., "ci": ..}``
dicts, nested sections flattened with ``/``).

No Prefect imports here; nothing in this module ever sees a token.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .config import Recipe

ORPO_PAPER = "https://arxiv.org/abs/2403.07691"
ORPO_BIBTEX = """@article{hong2024orpo,
  title   = {ORPO: Monolithic Preference Optimization without Reference Model},
  author  = {Hong, Jiwoo and Lee, Noah and Thorne, James},
  journal = {arXiv preprint arXiv:2403.07691},
  year    = {2024}
}"""

# labels the evaluation report may use for the trained model / the base model
TRAINED_LABELS = ("trained", "model", "orpo", "final", "finetuned", "fine-tuned", "policy")
BASE_LABELS = ("base", "base_model", "reference")
_SKIP_LABELS = ("delta", "deltas", "diff", "difference")
_VALUE_KEYS = ("value", "mean", "estimate", "score", "point")
_CI_KEYS = (("ci_low", "ci_high"), ("ci_lower", "ci_upper"), ("low", "high"), ("lower", "upper"))

_SECRET_KEY = re.compile(
    r"(^|[_\-.])(token|secret|passw(or)?d|api[_-]?key|apikey|credentials?|authorization|auth)($|[_\-.])", re.I
)
_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")
REDACTED = "<redacted>"


# --------------------------------------------------------------------------- secrets
def strip_secrets(obj: Any, secrets: Iterable[str] = ()) -> Any:
    """Return a deep copy of ``obj`` without secrets.

    Mapping keys that name a credential (``token``, ``hf_token``, ``secret``,
    ``password``, ``api_key``, ``credentials``, ``authorization``, ``auth`` as a
    ``_``/``-``/``.``-separated word; ``tokenizer`` or ``max_tokens`` are kept) are dropped; string values
    that look like Hugging Face tokens (``hf_`` + 16 or more alphanumerics) or
    contain one of ``secrets`` (exact strings, e.g. the token in use) are
    replaced by ``"<redacted>"``.
    """
    secret_list = [s for s in secrets if s]
    if isinstance(obj, Mapping):
        return {k: strip_secrets(v, secret_list) for k, v in obj.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(obj, (list, tuple)):
        return [strip_secrets(v, secret_list) for v in obj]
    if isinstance(obj, str):
        if _TOKEN_VALUE.search(obj) or any(s in obj for s in secret_list):
            return REDACTED
        return obj
    return obj


def recipe_yaml(recipe: Recipe, secrets: Iterable[str] = ()) -> str:
    """The fully resolved recipe as YAML, secrets stripped (see :func:`strip_secrets`)."""
    return yaml.safe_dump(strip_secrets(recipe.to_dict(), secrets), sort_keys=False)


# --------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class MetricValue:
    """One reported number: ``value`` with an optional 95 % CI ``(low, high)`` and sample count ``n``."""

    value: float
    ci: tuple[float, float] | None = None
    n: int | None = None


def _as_number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _as_metric(node: Any) -> MetricValue | None:
    """A number, or a dict holding a value key (``value``/``mean``/...) and optional CI / n."""
    v = _as_number(node)
    if v is not None:
        return MetricValue(v)
    if not isinstance(node, Mapping):
        return None
    value = next((_as_number(node[k]) for k in _VALUE_KEYS if k in node and _as_number(node[k]) is not None), None)
    if value is None:
        return None
    ci = None
    raw_ci = next((node[k] for k in ("ci", "ci95", "confidence_interval") if k in node), None)
    if isinstance(raw_ci, (list, tuple)) and len(raw_ci) == 2 and all(_as_number(c) is not None for c in raw_ci):
        ci = (float(raw_ci[0]), float(raw_ci[1]))
    for src in (raw_ci, node):
        if ci is not None or not isinstance(src, Mapping):
            continue
        for lo, hi in _CI_KEYS:
            if _as_number(src.get(lo)) is not None and _as_number(src.get(hi)) is not None:
                ci = (float(src[lo]), float(src[hi]))
                break
    n = node.get("n")
    return MetricValue(value, ci, int(n) if isinstance(n, int) and not isinstance(n, bool) else None)


def _flatten(node: Any, prefix: str, out: dict[str, MetricValue]) -> None:
    m = _as_metric(node)
    if m is not None:
        if prefix:
            out[prefix] = m
        return
    if isinstance(node, Mapping):
        for k, v in node.items():
            _flatten(v, f"{prefix}/{k}" if prefix else str(k), out)


def _looks_like_metric(key: str) -> bool:
    return "/" in key


def extract_metrics(eval_data: Mapping[str, Any]) -> dict[str, dict[str, MetricValue]]:
    """Per-model metrics from an ``eval.json`` dict: ``{model_label: {metric: MetricValue}}``.

    Reads ``eval_data["results"]`` (or the dict itself when it has no
    ``results``), completed with the CIs and counts of ``eval_data["metrics"]``
    (``{label: {metric: {"value", "n", "ci95"}}}``, as written by
    :func:`orpo_core.evaluation.run_evaluation`). Model-major (``results[model][metric]``) and metric-major
    (``results[metric][model]``, detected by ``/`` in the top-level keys) are
    both accepted; nested sections are joined with ``/`` (``lm_eval`` →
    ``hellaswag`` → ``acc`` gives ``lm_eval/hellaswag/acc``). Labels such as
    ``delta`` are skipped. Non-finite and non-numeric values are ignored.
    """
    out = _extract(eval_data.get("results", eval_data) if isinstance(eval_data, Mapping) else {})
    details = eval_data.get("metrics") if isinstance(eval_data, Mapping) else None
    if isinstance(details, Mapping) and details is not eval_data.get("results"):
        # orpo_core.evaluation writes plain values in "results" and {value, n, ci95} in "metrics"
        for label, detailed in _extract(details).items():
            for name, m in detailed.items():
                cur = out.get(label, {}).get(name)
                if cur is None or (math.isclose(cur.value, m.value, rel_tol=1e-9, abs_tol=1e-12)):
                    out.setdefault(label, {})[name] = m
    return out


def _extract(results: Any) -> dict[str, dict[str, MetricValue]]:
    if not isinstance(results, Mapping):
        return {}
    out: dict[str, dict[str, MetricValue]] = {}
    keys = [str(k) for k in results]
    if keys and sum(_looks_like_metric(k) for k in keys) > len(keys) / 2:
        for metric, per_model in results.items():
            if isinstance(per_model, Mapping) and _as_metric(per_model) is None:
                for label, node in per_model.items():
                    if str(label).lower() in _SKIP_LABELS:
                        continue
                    m = _as_metric(node)
                    if m is not None:
                        out.setdefault(str(label), {})[str(metric)] = m
            else:
                m = _as_metric(per_model)
                if m is not None:
                    out.setdefault("trained", {})[str(metric)] = m
        return out
    for label, node in results.items():
        if str(label).lower() in _SKIP_LABELS or not isinstance(node, Mapping):
            continue
        flat: dict[str, MetricValue] = {}
        _flatten(node, "", flat)
        if flat:
            out[str(label)] = flat
    return out


def pick_label(metrics: Mapping[str, Any], which: str = "trained") -> str | None:
    """The label of the trained (``which="trained"``) or base model among ``metrics``' keys."""
    labels = list(metrics)
    lowered = {label.lower(): label for label in labels}
    if which == "base":
        return next((lowered[b] for b in BASE_LABELS if b in lowered), None)
    hit = next((lowered[t] for t in TRAINED_LABELS if t in lowered), None)
    if hit is not None:
        return hit
    return next((label for label in labels if label.lower() not in BASE_LABELS), None)


def metric_value(eval_data: Mapping[str, Any], metric: str, which: str = "trained") -> float | None:
    """The value of ``metric`` (e.g. ``preference/accuracy``) for the trained or base model, or None."""
    metrics = extract_metrics(eval_data)
    label = pick_label(metrics, which)
    if label is None:
        return None
    m = metrics[label].get(metric)
    return None if m is None else m.value


# --------------------------------------------------------------------------- card
def _is_hub_id(s: str | None) -> bool:
    if not s or s.startswith((".", "/", "~")) or Path(s).exists():
        return False
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", s))


def hub_datasets(recipe: Recipe) -> list[str]:
    """Hub dataset ids among the recipe's sources (local files and synthetic sets are not Hub datasets)."""
    out = []
    for s in recipe.data.sources:
        if s.path and _is_hub_id(s.path) and s.path not in out:
            out.append(s.path)
    return out


def base_model_origin(recipe: Recipe) -> dict[str, Any] | None:
    """Provenance of a GGUF base model (packaged short name, ``.gguf`` file, folder +
    ``gguf_file``): :func:`orpo_core.model_sources.source_origin`; None otherwise."""
    from .model_sources import source_origin

    m = recipe.model
    if m is None or m.is_tiny or (_is_hub_id(m.name_or_path) and not m.gguf_file):
        return None
    return source_origin(m)


def base_model_id(recipe: Recipe) -> str | None:
    """The base model's Hub id: the recipe's Hub id, or for a GGUF the Hub model it was
    made from (``base_model`` of its origin); None for a tiny / local base model."""
    if recipe.model is None or recipe.model.is_tiny:
        return None
    if _is_hub_id(recipe.model.name_or_path) and not recipe.model.gguf_file:
        return recipe.model.name_or_path
    origin = base_model_origin(recipe)
    return origin.get("base_model") if origin else None


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "–"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3e}"
    return f"{x:.{digits}f}"


def hyperparameter_rows(recipe: Recipe) -> list[tuple[str, str]]:
    """(name, value) rows of the hyper-parameters that define the run."""
    t, o, p, d = recipe.train, recipe.orpo, recipe.peft, recipe.data
    rows = [
        ("objective", "ORPO: L = alpha * L_SFT + beta * L_OR (Hong et al. 2024, eq. 6)"),
        ("orpo.beta (paper's lambda)", str(o.beta)),
        ("orpo.alpha (NLL weight)", str(o.alpha)),
        ("NLL on prompt tokens", str(o.nll_on_prompt)),
        ("learning rate", str(t.learning_rate)),
        ("lr scheduler", t.lr_scheduler_type),
        ("warmup", f"ratio {t.warmup_ratio}, steps {t.warmup_steps}"),
        ("epochs / max steps", f"{t.num_train_epochs} / {t.max_steps}"),
        ("per-device batch (pairs)", str(t.per_device_train_batch_size)),
        ("gradient accumulation", str(t.gradient_accumulation_steps)),
        ("effective batch per device (pairs)", str(t.per_device_train_batch_size * t.gradient_accumulation_steps)),
        ("optimizer", t.optim),
        ("weight decay", str(t.weight_decay)),
        ("max grad norm", str(t.max_grad_norm)),
        ("precision", t.precision),
        ("max length / max prompt length", f"{d.max_length} / {d.max_prompt_length}"),
        ("fine-tuning", p.method),
        ("seed", str(t.seed if t.seed is not None else recipe.seed)),
    ]
    if p.method != "none":
        targets = p.target_modules if isinstance(p.target_modules, str) else ", ".join(p.target_modules)
        rows.append(("LoRA r / alpha / dropout", f"{p.r} / {p.lora_alpha} / {p.lora_dropout}"))
        rows.append(("LoRA target modules", targets))
        if p.method == "qlora":
            rows.append(("4-bit quantization", f"{p.bnb_4bit_quant_type}, double quant {p.bnb_4bit_use_double_quant}"))
    return rows


def metrics_table(eval_data: Mapping[str, Any] | None) -> str:
    """Markdown table: metric | trained | base | delta (trained − base), with 95 % CIs when reported."""
    if not eval_data:
        return "_No evaluation results were available when this card was written._\n"
    metrics = extract_metrics(eval_data)
    trained = pick_label(metrics, "trained")
    base = pick_label(metrics, "base")
    if trained is None:
        return "_No evaluation results were available when this card was written._\n"
    lines = ["| metric | trained | base | delta |", "|---|---|---|---|"]
    for name, m in metrics[trained].items():
        b = metrics[base].get(name) if base else None
        cell = _fmt(m.value) + (f" [{_fmt(m.ci[0])}, {_fmt(m.ci[1])}]" if m.ci else "")
        bcell = "–" if b is None else _fmt(b.value) + (f" [{_fmt(b.ci[0])}, {_fmt(b.ci[1])}]" if b.ci else "")
        delta = "–" if b is None else f"{m.value - b.value:+.4f}"
        lines.append(f"| `{name}` | {cell} | {bcell} | {delta} |")
    note = "\nValues in brackets are bootstrap 95 % confidence intervals." if any(
        m.ci for m in metrics[trained].values()
    ) else ""
    return "\n".join(lines) + "\n" + note + "\n"


def _eval_results(recipe: Recipe, eval_data: Mapping[str, Any] | None, model_name: str) -> list:
    from huggingface_hub import EvalResult

    if not eval_data:
        return []
    metrics = extract_metrics(eval_data)
    label = pick_label(metrics, "trained")
    if label is None:
        return []
    datasets = hub_datasets(recipe)
    pref_dataset = datasets[0] if datasets else "local-preference-pairs"
    out = []
    for name, m in metrics[label].items():
        if name.startswith("lm_eval/"):
            parts = name.split("/")
            task = parts[1] if len(parts) > 1 else "lm_eval"
            out.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=task,
                    dataset_name=task,
                    metric_type="/".join(parts[2:]) or name,
                    metric_value=round(m.value, 6),
                    metric_name=name,
                )
            )
        elif name.startswith("perplexity/corpus"):
            corpus = Path(recipe.eval.corpus).name if recipe.eval.corpus else "corpus"
            out.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type="text-corpus",
                    dataset_name=corpus,
                    metric_type="perplexity",
                    metric_value=round(m.value, 6),
                    metric_name=name,
                )
            )
        else:
            out.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=pref_dataset,
                    dataset_name="held-out preference pairs",
                    dataset_split="test",
                    metric_type=name,
                    metric_value=round(m.value, 6),
                    metric_name=name,
                )
            )
    return out


def ollama_template(chat_template: str, *, bos_token: str | None, eos_token: str | None) -> tuple[str, bool]:
    """A single-turn Ollama ``Modelfile`` ``TEMPLATE`` (Go template) made by rendering ``chat_template``.

    The chat template is rendered (sandboxed Jinja, as transformers) for a system message
    ``{{ .System }}`` and a user message ``{{ .Prompt }}`` with the generation prompt; the
    placeholders survive as Ollama's variables and ``{{ .Response }}`` + ``eos_token`` closes
    the turn. Templates that refuse a system message (Mistral, Gemma) are rendered with the user
    message only.

    Returns:
        ``(template, has_system)``: substituting ``.System`` / ``.Prompt`` in the template gives
        exactly ``apply_chat_template([system, user], add_generation_prompt=True)`` (or the
        user-only rendering when ``has_system`` is False), followed by the answer and eos.
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    tpl = env.from_string(chat_template)
    extra = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
    user = {"role": "user", "content": "{{ .Prompt }}"}
    try:
        text = tpl.render(messages=[{"role": "system", "content": "{{ .System }}"}, user], add_generation_prompt=True, **extra)
        has_system = "{{ .System }}" in text
    except ValueError:
        text, has_system = tpl.render(messages=[user], add_generation_prompt=True, **extra), False
    return text + "{{ .Response }}" + (eos_token or ""), has_system


def gguf_section(gguf_files: Iterable[Mapping[str, Any]], repo: str, chat_template: str | None, bos_token: str | None, eos_token: str | None) -> str:
    """The model card's GGUF section: one table row per file (file, type, size in MB, sha256
    prefix) and usage snippets for llama.cpp's CLI and an Ollama ``Modelfile`` whose
    ``TEMPLATE`` is :func:`ollama_template` of the model's chat template ("" without files)."""
    files = list(gguf_files)
    if not files:
        return ""
    rows = "\n".join(
        f"| `{f['file']}` | {str(f['quantization']).upper()} | {f['size'] / 1e6:.1f} MB | `{str(f.get('sha256', ''))[:16]}` |" for f in files
    )
    first = files[-1]["file"]
    modelfile = f"FROM ./{first}\n"
    if chat_template:
        tpl, _ = ollama_template(chat_template, bos_token=bos_token, eos_token=eos_token)
        modelfile += f'TEMPLATE """{tpl}"""\n'
    if eos_token:
        modelfile += f'PARAMETER stop "{eos_token}"\n'
    return f"""
## GGUF files (llama.cpp, Ollama)

Exported with llama.cpp's `gguf` package (`orpo export RECIPE --gguf ...`); each file carries the
tokenizer, the chat template (`tokenizer.chat_template`), the base model and the training recipe.

| file | type | size | sha256 |
|---|---|---:|---|
{rows}

llama.cpp (the chat template is read from the file):

```bash
llama-cli -m {first} -cnv -p "You are a helpful assistant."
# or straight from the Hub
llama-cli -hf {repo}:{str(files[-1]['quantization']).upper()} -cnv
```

Ollama `Modelfile` (then `ollama create {repo.split('/')[-1].lower()} -f Modelfile && ollama run {repo.split('/')[-1].lower()}`):

```
{modelfile.rstrip()}
```
"""


def build_model_card(
    recipe: Recipe,
    eval_data: Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    train_metrics: Mapping[str, Any] | None = None,
    adapter_only: bool = False,
    has_curves: bool = False,
    secrets: Iterable[str] = (),
    gguf_files: Iterable[Mapping[str, Any]] = (),
    chat_template: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
):
    """Build the :class:`huggingface_hub.ModelCard` of a trained model.

    Args:
        recipe: the run's recipe (its YAML is embedded with secrets stripped).
        eval_data: parsed ``eval.json`` (None: card without metrics).
        repo_id: target repo (``namespace/name``); used as the model name and in
            the usage snippet. Default: ``recipe.hub.repo_id`` or the run name.
        train_metrics: parsed ``train/metrics.json`` (final train / eval loss etc.).
        adapter_only: the folder holds a LoRA adapter instead of full weights.
        has_curves: a ``training_curves.png`` is shipped next to the card.
        secrets: exact strings that must never appear (redacted if found).
        gguf_files: exported GGUF files shipped next to the card (:func:`orpo_core.gguf_export.export_gguf`
            results: ``file``, ``quantization``, ``size``, ``sha256``): listed with usage snippets
            (:func:`gguf_section`); ``gguf`` is added to the tags.
        chat_template, bos_token, eos_token: the tokenizer's, for the Ollama ``Modelfile``.

    Returns:
        ``ModelCard`` whose ``str()`` is the README.md text (YAML front matter + body).
    """
    from huggingface_hub import ModelCard, ModelCardData

    repo = repo_id or recipe.hub.repo_id or recipe.run_name
    model_name = repo.split("/")[-1]
    base = base_model_id(recipe)
    datasets = hub_datasets(recipe)
    extra_tags = ["peft", recipe.peft.method] if recipe.peft.method != "none" else []
    gguf_files = list(gguf_files)
    if gguf_files:
        extra_tags.append("gguf")
    tags = list(dict.fromkeys(["orpo", *recipe.hub.tags, *extra_tags]))
    data = ModelCardData(
        base_model=base,
        datasets=datasets or None,
        tags=tags,
        license=recipe.hub.license,
        library_name="peft" if adapter_only else "transformers",
        pipeline_tag="text-generation",
        model_name=model_name,
        eval_results=_eval_results(recipe, eval_data, model_name) or None,
    )

    model_desc = (
        f"[`{base}`](https://huggingface.co/{base})"
        if base
        else f"`{recipe.model.name_or_path if recipe.model else 'unknown'}` (not a Hub model)"
    )
    origin = base_model_origin(recipe)
    if origin:
        model_desc += (
            f" (from the GGUF `{origin.get('file')}`, sha256 `{str(origin.get('sha256', ''))[:16]}`, "
            f"quantization {origin.get('quantization') or 'unknown'} dequantized to {origin.get('dtype', 'float32')})"
        )
    sources = []
    for s in recipe.data.sources:
        if s.synthetic is not None:
            sources.append(
                f"- synthetic `{s.synthetic.task}` preference pairs ({s.synthetic.n_rows} rows, generated by `orpo_core.synthetic`)"
            )
        elif s.path and _is_hub_id(s.path):
            rev = f" @ `{s.revision}`" if s.revision else ""
            sources.append(f"- [`{s.path}`](https://huggingface.co/datasets/{s.path}){rev}, split `{s.split}`")
        else:
            sources.append(f"- local file `{Path(s.path or '').name}` (format `{s.format}`)")

    hp = "\n".join(["| hyper-parameter | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in hyperparameter_rows(recipe)])
    train_lines = ""
    if train_metrics:
        rows = [
            (k, _as_number(v))
            for k, v in train_metrics.items()
            if _as_number(v) is not None and not k.endswith(("runtime", "per_second", "flos"))
        ]
        if rows:
            train_lines = (
                "\n### Final training metrics\n\n| metric | value |\n|---|---|\n"
                + "\n".join(f"| `{k}` | {_fmt(v)} |" for k, v in rows)
                + "\n"
            )
    curves = "\n![training curves](training_curves.png)\n" if has_curves else ""
    load = (
        f'from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained("{repo}")'
        if adapter_only
        else f'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{repo}")'
    )
    body = f"""
# {model_name}

This model is {model_desc} aligned with **ORPO** (Odds Ratio Preference Optimization,
[Hong et al. 2024]({ORPO_PAPER})): a single-stage objective that adds an odds-ratio
preference term to the supervised NLL loss, with no reference model
(total loss = alpha · NLL(chosen) + beta · mean(−log σ(log odds(chosen) − log odds(rejected)))).
{"It is a LoRA adapter; load it on top of the base model." if adapter_only else ""}

## Training data

{chr(10).join(sources)}

## Hyper-parameters

{hp}
{train_lines}
## Evaluation

Preference metrics are measured on held-out pairs: accuracy is the share of pairs whose
chosen response has a higher length-normalised log-probability than the rejected one,
margin is beta · (log p(chosen) − log p(rejected)) as in TRL, log-odds as in the ORPO loss.

{metrics_table(eval_data)}{curves}
## Usage

```python
{load}
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{repo}")
messages = [{{"role": "user", "content": "What is 4 + 3?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
{gguf_section(gguf_files, repo, chat_template, bos_token, eos_token)}
## Training recipe

The complete recipe this model was trained with (`orpo run <recipe.yaml>`; secrets removed):

```yaml
{recipe_yaml(recipe, secrets).rstrip()}
```

## Citation

```bibtex
{ORPO_BIBTEX}
```
"""
    content = f"---\n{data.to_yaml()}\n---\n{body}"
    for secret in secrets:
        if secret:
            content = content.replace(secret, REDACTED)
    return ModelCard(content)


def render_model_card(recipe: Recipe, eval_data: Mapping[str, Any] | None = None, **kwargs: Any) -> str:
    """README.md text of :func:`build_model_card` (same arguments)."""
    return str(build_model_card(recipe, eval_data, **kwargs))


# --------------------------------------------------------------------------- UI rendering
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.S)
_LOCAL_IMAGE = re.compile(r"!\[([^\]]*)\]\((?!https?://|data:)([^)\s]+)\)")
_UI_META_KEYS = ("base_model", "datasets", "license", "library_name", "pipeline_tag", "tags")


def card_for_ui(card: str) -> str:
    """The model card as plain markdown for a UI that does not read Hub metadata (Prefect's
    markdown artifact): the YAML front matter becomes a small ``| field | value |`` table
    (base model, datasets, license, library, pipeline tag, tags; the model-index duplicates the
    metrics table of the body and is left out), and images with a relative path, which such a
    UI cannot load, become a line naming the file.

    Args:
        card: README.md text (front matter optional).

    Returns:
        Markdown without front matter and without relative image links.
    """
    meta: dict[str, Any] = {}
    m = _FRONT_MATTER.match(card)
    body = card
    if m:
        try:
            loaded = yaml.safe_load(m.group(1))
            meta = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            meta = {}
        body = card[m.end():]
    body = _LOCAL_IMAGE.sub(lambda im: f"*{im.group(1) or 'image'}: `{im.group(2)}` in the model folder*", body)
    rows = []
    for key in _UI_META_KEYS:
        value = meta.get(key)
        if value in (None, "", []):
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(f"`{v}`" for v in value)
        else:
            value = f"`{value}`"
        rows.append(f"| {key.replace('_', ' ')} | {value} |")
    if not rows:
        return body.lstrip("\n")
    table = "\n".join(["| field | value |", "|---|---|", *rows])
    # put the metadata right under the card's title when it starts with one
    lines = body.lstrip("\n").split("\n", 1)
    if lines[0].startswith("# "):
        return f"{lines[0]}\n\n{table}\n" + (lines[1] if len(lines) > 1 else "")
    return f"{table}\n\n{body.lstrip()}"
