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
:func:`orpo_core.evaluation.results.extract_metrics`.

No Prefect imports here; nothing in this module ever sees a token.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from orpo_core.config import Recipe
from orpo_core.io import fmt_value
from orpo_core.evaluation.results import as_number, extract_metrics, pick_label

ORPO_PAPER = "https://arxiv.org/abs/2403.07691"
#: the card's body: a jinja2 template rendered by ``huggingface_hub.ModelCard.from_template``
CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
ORPO_BIBTEX = """@article{hong2024orpo,
  title   = {ORPO: Monolithic Preference Optimization without Reference Model},
  author  = {Hong, Jiwoo and Lee, Noah and Thorne, James},
  journal = {arXiv preprint arXiv:2403.07691},
  year    = {2024}
}"""

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
    ``gguf_file``): :func:`orpo_core.models.sources.source_origin`; None otherwise."""
    from orpo_core.models.sources import source_origin

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


def precision_text(setting: str, record: Mapping[str, Any] | None = None) -> str:
    """The model card's precision value: the recipe's ``train.precision`` or, from the
    ``precision`` record of ``train/metrics.json`` (see :func:`orpo_core.training.run.run_training`),
    the precision used and why, e.g. ``bf16 mixed precision (autocast, float32 master weights;
    auto: CPU has avx512_bf16/amx_bf16 (native bf16 dot products))``."""
    if not isinstance(record, Mapping) or not record.get("used"):
        return setting
    used = str(record["used"])
    reason = record.get("reason") or f"train.precision: {setting}"
    if record.get("autocast"):
        master = record.get("trainable_dtype") or "unknown"
        return f"{used} mixed precision (autocast, {master} master weights; {reason})"
    return f"{used} ({reason})"


def hyperparameter_rows(recipe: Recipe, precision: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """(name, value) rows of the hyper-parameters that define the run; ``precision``: the
    ``precision`` record of ``train/metrics.json`` (the precision actually used and why),
    else the recipe's setting is shown."""
    t, o, p, d = recipe.train, recipe.orpo, recipe.peft, recipe.data
    rows = [
        ("objective", "ORPO: L = alpha · L_SFT + beta · L_OR (Hong et al. 2024, eq. 6)"),
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
        ("precision", precision_text(t.precision, precision)),
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
    paired = {k: d for k, d in (eval_data.get("delta_details") or {}).items() if isinstance(d, Mapping)}
    lines = ["| metric | trained | base | delta |", "|---|---|---|---|"]
    for name, m in metrics[trained].items():
        b = metrics[base].get(name) if base else None
        cell = _fmt(m.value) + (f" [{_fmt(m.ci[0])}, {_fmt(m.ci[1])}]" if m.ci else "")
        bcell = "–" if b is None else _fmt(b.value) + (f" [{_fmt(b.ci[0])}, {_fmt(b.ci[1])}]" if b.ci else "")
        delta = "–" if b is None else f"{m.value - b.value:+.4f}"
        dci = (paired.get(name) or {}).get("ci95") if b is not None else None
        if dci:
            delta += f" [{_fmt(dci[0])}, {_fmt(dci[1])}]"
        lines.append(f"| `{name}` | {cell} | {bcell} | {delta} |")
    has_ci = any(m.ci for m in metrics[trained].values()) or any(d.get("ci95") for d in paired.values())
    note = ("\nValues in brackets are bootstrap 95 % confidence intervals (for the delta: paired, the same "
            "pairs / prompts resampled for both models).") if has_ci else ""
    return "\n".join(lines) + "\n" + note + "\n"


_NOT_METRICS = ("runtime", "per_second", "flos")
_FIRST = ("train_loss", "eval_loss")


def final_metric_rows(train_metrics: Mapping[str, Any] | None) -> list[tuple[str, float]]:
    """(name, value) rows of ``train/metrics.json`` for the card: the final ``train_loss`` and
    ``eval_loss`` first, then the other numbers of its ``train`` and ``eval`` sections and its
    top-level counts (``global_step``, ``num_train_pairs`` ...), each TRL name once; timings
    (``*_runtime``, ``*_per_second``) and ``total_flos`` left out. A flat dict works too.
    The card prints them with :func:`orpo_core.io.fmt_value` (counts such as ``178.0`` as ``178``)."""
    if not train_metrics:
        return []
    found: dict[str, float | int] = {}
    sections = [train_metrics.get(k) for k in ("train", "eval")]
    for src in [*(s for s in sections if isinstance(s, Mapping)), train_metrics]:
        for k, v in src.items():
            x = as_number(v)
            if x is None or str(k).endswith(_NOT_METRICS) or k in found:
                continue
            found[str(k)] = x
    order = [k for k in _FIRST if k in found] + [k for k in found if k not in _FIRST]
    return [(k, found[k]) for k in order]


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
    lm_tasks = ((eval_data.get("lm_eval") or {}).get("tasks") or {}) if isinstance(eval_data, Mapping) else {}
    lm_settings = ((eval_data.get("settings") or {}).get("lm_eval") or {}) if isinstance(eval_data, Mapping) else {}
    out = []
    for name, m in metrics[label].items():
        if name.startswith("lm_eval/"):
            parts = name.split("/")
            task = parts[1] if len(parts) > 1 else "lm_eval"
            info = lm_tasks.get(task) or {}
            if info.get("upstream") == "ifeval":
                out.append(EvalResult(**ifeval_result_fields(task, info, lm_settings), metric_type=parts[2].split(",")[0],
                                      metric_value=round(m.value, 6), metric_name=name))
                continue
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
        elif name.startswith("instructions/"):
            out.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="instruction following (verifiable constraints, IFEval rules)",
                    dataset_type="synthetic-instructions",
                    dataset_name="held-out generated instructions with verifiable constraints",
                    dataset_split="test",
                    metric_type=name.split("/", 1)[1],
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


def ifeval_result_fields(task: str, info: Mapping[str, Any], lm_settings: Mapping[str, Any]) -> dict[str, Any]:
    """The model-index fields (task, dataset) of an lm-eval IFEval task: Google's IFEval
    (``google/IFEval``, split ``train``, its only split) named with the subset the task reads
    (``ifeval_dev``: the development half, even positions) and how many prompts were evaluated.

    Args:
        task: the requested task name (``ifeval_dev``).
        info: ``eval.json["lm_eval"]["tasks"][task]`` (``subset``, ``n-samples``, ``version``, ``n-shot``).
        lm_settings: ``eval.json["settings"]["lm_eval"]`` (``limit``, ``chat_template``, ``max_gen_toks``).
    """
    subset = info.get("subset")
    n = (info.get("n-samples") or {}).get("effective")
    name = "Google IFEval" + (f" ({subset})" if subset else "")
    if n is not None:
        name += f", {n} prompts evaluated"
    args = {k: lm_settings.get(k) for k in ("limit", "chat_template", "max_gen_toks") if lm_settings.get(k) is not None}
    return {
        "task_type": "text-generation",
        "task_name": f"IFEval via lm-evaluation-harness (task {task}, version {info.get('version')}, {info.get('n-shot') or 0}-shot)",
        "dataset_type": "google/IFEval",
        "dataset_name": name,
        "dataset_split": "train",
        "dataset_args": args or None,
    }


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


def gguf_card_vars(gguf_files: Iterable[Mapping[str, Any]], repo: str, chat_template: str | None,
                   bos_token: str | None, eos_token: str | None) -> dict[str, str]:
    """What the card template's GGUF section shows ({} without files): one table row per file
    (file, type, size in MB, sha256 prefix), the file and type of the usage snippets (the last
    file), and an Ollama ``Modelfile`` whose ``TEMPLATE`` is :func:`ollama_template` of the
    model's chat template."""
    files = list(gguf_files)
    if not files:
        return {}
    rows = "\n".join(
        f"| `{f['file']}` | {str(f['quantization']).upper()} | {f['size'] / 1e6:.1f} MB | `{str(f.get('sha256', ''))[:16]}` |" for f in files
    )
    modelfile = f"FROM ./{files[-1]['file']}\n"
    if chat_template:
        tpl, _ = ollama_template(chat_template, bos_token=bos_token, eos_token=eos_token)
        modelfile += f'TEMPLATE """{tpl}"""\n'
    if eos_token:
        modelfile += f'PARAMETER stop "{eos_token}"\n'
    return {"gguf_rows": rows, "gguf_file": files[-1]["file"], "gguf_type": str(files[-1]["quantization"]).upper(),
            "ollama_name": repo.split("/")[-1].lower(), "modelfile": modelfile.rstrip()}


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
        gguf_files: exported GGUF files shipped next to the card (:func:`orpo_core.publish.gguf.export_gguf`
            results: ``file``, ``quantization``, ``size``, ``sha256``): listed with usage snippets
            (:func:`gguf_card_vars`); ``gguf`` is added to the tags.
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
                f"- synthetic `{s.synthetic.task}` preference pairs ({s.synthetic.n_rows} rows, generated by `orpo_core.data.synthetic.arithmetic`)"
            )
        elif s.path and _is_hub_id(s.path):
            rev = f" @ `{s.revision}`" if s.revision else ""
            sources.append(f"- [`{s.path}`](https://huggingface.co/datasets/{s.path}){rev}, split `{s.split}`")
        else:
            sources.append(f"- local file `{Path(s.path or '').name}` (format `{s.format}`)")

    hp = "\n".join(["| hyper-parameter | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in hyperparameter_rows(
        recipe, train_metrics.get("precision") if isinstance(train_metrics, Mapping) else None)])
    card = ModelCard.from_template(
        data,
        template_path=str(CARD_TEMPLATE),
        model_name=model_name,
        model_desc=model_desc,
        paper_url=ORPO_PAPER,
        adapter_only=adapter_only,
        sources="\n".join(sources),
        hyperparameters=hp,
        final_metrics="\n".join(f"| `{k}` | {fmt_value(v)} |" for k, v in final_metric_rows(train_metrics)),
        metrics_table=metrics_table(eval_data),
        has_curves=has_curves,
        repo=repo,
        recipe_yaml=recipe_yaml(recipe, secrets).rstrip(),
        bibtex=ORPO_BIBTEX,
        **gguf_card_vars(gguf_files, repo, chat_template, bos_token, eos_token),
    )
    content = str(card)

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


def card_for_ui(card: str, images: Mapping[str, str] | None = None) -> str:
    """The model card as plain markdown for a UI that does not read Hub metadata (Prefect's
    markdown artifact): the YAML front matter becomes a small ``| field | value |`` table
    (base model, datasets, license, library, pipeline tag, tags; the model-index duplicates the
    metrics table of the body and is left out), and images with a relative path, which such a
    UI cannot load, become a line naming the file unless ``images`` maps that path to a URI
    the UI can show (a ``data:image/png;base64,...`` URI: the image is embedded).

    Args:
        card: README.md text (front matter optional).
        images: relative image path (as written in the card) -> URI to show instead.

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
    def image(im: re.Match) -> str:
        uri = (images or {}).get(im.group(2))
        if uri:
            return f"![{im.group(1)}]({uri})"
        return f"*{im.group(1) or 'image'}: `{im.group(2)}` in the model folder*"

    body = _LOCAL_IMAGE.sub(image, body)
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
