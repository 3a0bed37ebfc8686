"""Prefect task: GGUF export of the trained model (``orpo_core.publish.gguf.export_run_model``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from orpo_core.io import json_safe

from .artifacts import artifact_key, table_artifact

from .options import cached_task_options, load_recipe_dict

from .stage import stage_run


@task(**cached_task_options("export"), description="Write the trained model as GGUF files for llama.cpp (f16, q8_0, ...).")
def export_task(recipe: dict[str, Any], model_dir: str, out_dir: str, quantizations: list[str]) -> dict[str, Any]:
    """Export ``model_dir`` (``<run>/train/model``) into ``out_dir`` (``<run>/export``), one GGUF per type.

    A LoRA / QLoRA adapter folder is merged into its base first. GGUF files of other types left
    in ``out_dir`` by an earlier export are removed, so the folder holds exactly this export.
    A table artifact lists file, type, size and sha256.

    Returns:
        ``{"stage": "export", "path": out_dir, "files": [{"path", "file", "quantization", "size",
        "sha256", ...}], "content_hash": ...}``. Cached on the model folder's content, the
        requested types, the recipe (embedded in the files) and the code version.

    Raises:
        orpo_core.publish.gguf.GGUFExportError: unsupported architecture / tokenizer / type, no
            model (not retried: a ValueError).
    """
    from orpo_core.publish.gguf import export_run_model, parse_quantizations

    r = load_recipe_dict(recipe)
    qs = parse_quantizations(quantizations)
    inputs = {"recipe": recipe, "model_dir": model_dir, "out_dir": out_dir, "quantizations": qs}
    with stage_run("export", inputs) as box:
        infos = export_run_model(r, Path(model_dir), Path(out_dir), qs, work_dir=r.out_dir)
        keep = {Path(i["path"]).name for i in infos}
        for stale in Path(out_dir).glob("*.gguf"):
            if stale.name not in keep:
                stale.unlink()
        box["result"] = {"stage": "export", "path": str(out_dir), "files": json_safe(infos)}
    rows = [{"file": i["file"], "quantization": i["quantization"], "size_mb": round(i["size"] / 1e6, 1), "sha256": i["sha256"][:16],
             "seconds": i["seconds"]} for i in infos]
    table_artifact(rows, artifact_key(r.run_name, "gguf-export"), f"GGUF files of {r.run_name}")
    return {**box["result"], "content_hash": box["content_hash"]}
