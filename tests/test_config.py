"""Recipe schema: every shipped recipe validates; typos and bad values fail with the key's path."""

from pathlib import Path

import pytest
import yaml

from orpo_core.config import RecipeError, apply_overrides, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def _minimal(**extra):
    d = {"model": {"name_or_path": "tiny"}, "data": {"sources": [{"synthetic": {"n_rows": 10}}]}}
    d.update(extra)
    return d


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.data.max_prompt_length < r.data.max_length
    assert r.model is not None


def test_required_recipes_exist():
    names = {p.name for p in RECIPES}
    for n in ["quickstart.yaml", "smollm3-3b-ultrafeedback.yaml", "orpo-dpo-mix-40k.yaml", "hh-rlhf-tiny.yaml"]:
        assert n in names
    assert any(load_recipe(p).peft.method == "qlora" for p in RECIPES)


def test_smollm3_recipe_matches_exercise():
    r = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "smollm3-3b-ultrafeedback.yaml")
    assert r.model.name_or_path == "HuggingFaceTB/SmolLM3-3B-Base"
    assert r.data.sources[0].path == "trl-lib/ultrafeedback_binarized"
    assert (r.orpo.beta, r.train.learning_rate, r.train.lr_scheduler_type) == (0.1, 8e-6, "linear")
    assert (r.data.max_length, r.data.max_prompt_length) == (1024, 512)
    assert r.train.per_device_train_batch_size * r.train.gradient_accumulation_steps == 16


@pytest.mark.parametrize(
    "patch, where",
    [
        ({"orpo": {"betta": 0.1}}, "orpo.betta: unknown key"),
        ({"orpo": {"beta": -0.1}}, "orpo.beta"),
        ({"train": {"learning_rate": 0}}, "train.learning_rate"),
        ({"train": {"learning_rate": -1e-5}}, "train.learning_rate"),
        ({"data": {"sources": [{"synthetic": {}}], "max_length": 128, "max_prompt_length": 128}}, "max_prompt_length (128) must be < max_length (128)"),
        ({"data": {"sources": []}}, "data.sources"),
        ({"peft": {"method": "prefix"}}, "peft.method"),
        ({"hub": {"repo_id": "not a repo id"}}, "hub.repo_id"),
        ({"orpo": {"alpha": 0, "beta": 0}}, "cannot both be 0"),
        ({"nonsense": 1}, "nonsense: unknown key"),
    ],
)
def test_bad_values_name_the_key(patch, where):
    d = _minimal()
    for k, v in patch.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict(d)
    assert where in str(ei.value)


def test_overrides_apply_and_parse_types(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(_minimal()))
    r = load_recipe(p, ["orpo.beta=0.25", "train.gradient_checkpointing=true", "data.sources.0.max_rows=7", "run_name=x"])
    assert r.orpo.beta == 0.25 and isinstance(r.orpo.beta, float)
    assert r.train.gradient_checkpointing is True
    assert r.data.sources[0].max_rows == 7
    assert r.out_dir == Path.cwd() / "runs" / "x"  # resolved against the working directory


def test_override_errors(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(_minimal()))
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(p, ["orpo.beta"])
    with pytest.raises(RecipeError, match="orpo.bta: unknown key"):
        load_recipe(p, ["orpo.bta=1"])
    with pytest.raises(RecipeError, match="list index"):
        apply_overrides(_minimal(), ["data.sources.5.max_rows=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="YAML syntax error"):
        load_recipe(bad)


def test_fields_hash_changes_only_with_the_stage_fields():
    from orpo_core.stages import fields_hash

    a = recipe_from_dict(_minimal())
    b = recipe_from_dict(_minimal(orpo={"beta": 0.2}))
    assert fields_hash(a, "prepare") == fields_hash(b, "prepare")
    assert fields_hash(a, "train") != fields_hash(b, "train")
    assert fields_hash(a, "evaluate") != fields_hash(b, "evaluate")  # evaluation reads orpo.beta
