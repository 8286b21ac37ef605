"""Run configuration: a recipe YAML, then `key=value` overrides, validated.

    pipeline: protein-ppi
    task: {name: protein-ppi, max_length: 1022}
    backbone: {name: esm2_t33_650M_UR50D}
    method: {name: lora, r: 8, alpha: 32, dropout: 0.1}
    data: {card: data_cards/dscript-ecoli.md, limit: {train: 2000}}
    train: {epochs: 10, batch_size: 8, lr: 1.0e-3, ...}
    eval: {splits: [validation, test], primary_metric: aupr}

`task:` and `method:` sections take the options of the chosen task and method; the
other sections are fixed schemas. Unknown keys fail and list the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Annotated, Any

import peftlab
import yaml
from peftlab.shared import io
from peftlab.shared.errors import UserError, did_you_mean
from peftlab.shared.methods.registry import check_option_types
from peftlab.shared.training import TrainConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError

RECIPES = Path(__file__).parent / "recipes"
PACKAGE_ROOT = Path(peftlab.__file__).parent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackboneConfig(_Strict):
    name: str = Field(description="official name, local path, or tiny")


class DataConfig(_Strict):
    card: str = Field(description="path of the data card")
    limit: dict[str, Annotated[int, Field(ge=1)]] | None = Field(None, description="at most this many examples per split (seeded, stratified)")
    splits: dict[str, Any] | None = Field(None, description="keys that replace the card's `splits:` ones for this run "
                                          "(data.splits.test=[2]: another fold; data.splits.seed=1: another random split)")


class EvalConfig(_Strict):
    splits: list[str] = ["validation", "test"]
    primary_metric: str | None = None
    metrics: list[str] | None = None


class RunConfig(_Strict):
    pipeline: str
    task: dict[str, Any]
    backbone: BackboneConfig
    method: dict[str, Any]
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    demo: dict[str, Any] | None = Field(None, description="overrides `--demo` applies (recipes only)")

    @property
    def method_name(self) -> str:
        return self.method["name"]

    @property
    def method_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.items() if k != "name"}

    @property
    def task_name(self) -> str:
        return self.task["name"]

    @property
    def task_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.task.items() if k != "name"}


def list_pipelines() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def read_recipe(pipeline: str) -> dict:
    """The pipeline's recipe; the cards it names are the package's own (a `data_cards/`
    folder in the working directory does not stand in for them)."""
    path = RECIPES / f"{pipeline}.yaml"
    if not path.is_file():
        raise UserError(f"unknown pipeline {pipeline!r}{did_you_mean(pipeline, list_pipelines())}")
    recipe = _load_yaml(path)
    for section in (recipe, recipe.get("demo") or {}):
        data = section.get("data") or {}
        if isinstance(data.get("card"), str) and (PACKAGE_ROOT / data["card"]).is_file():
            data["card"] = str(PACKAGE_ROOT / data["card"])
    return recipe


def _load_yaml(path: Path) -> dict:
    try:
        data = io.load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a run config is a YAML mapping (pipeline:, task:, backbone:, ...)")
    return data


def read_config_file(path) -> dict:
    """A run.yaml to repeat: a known pipeline, with that pipeline's task."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    data = _load_yaml(path)
    pipeline = data.get("pipeline")
    if pipeline not in list_pipelines():
        raise UserError(f"{path}: pipeline {pipeline!r} is not a pipeline{did_you_mean(str(pipeline), list_pipelines())}")
    recipe_task = read_recipe(pipeline)["task"]["name"]
    task = (data.get("task") or {}).get("name") if isinstance(data.get("task"), dict) else None
    if task is not None and task != recipe_task:
        raise UserError(f"{path}: pipeline {pipeline!r} runs task {recipe_task!r}, not {task!r}; fix `pipeline:` or `task.name`")
    return data


def merge(base: dict, update: dict) -> dict:
    result = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """`train.lr=3e-4 method.target_modules=[q,v]` -> nested updates (values parsed as YAML).
    A mapping merges into the section it names (`train={epochs: 1}` keeps the other train
    settings), as a config file's sections merge over the recipe's."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value (e.g. train.lr=3e-4)")
        try:
            value = io.load_yaml(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        _check_key(key)
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part!r} is not a section")
        current = node.get(parts[-1])
        node[parts[-1]] = merge(current, value) if isinstance(current, dict) and isinstance(value, dict) else value
    return config


_SECTIONS = {
    "backbone": BackboneConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
}


def _check_key(key: str) -> None:
    parts = key.split(".")
    top = parts[0]
    valid_top = list(RunConfig.model_fields)
    if top not in valid_top:
        raise UserError(f"unknown config key {key!r}; valid sections: {', '.join(valid_top)}")
    schema = _SECTIONS.get(top)
    if schema is not None and len(parts) > 1 and parts[1] not in schema.model_fields:
        raise UserError(f"unknown config key {key!r}; valid {top} keys: {', '.join(schema.model_fields)}")


def validate(config: dict, where: str = "config") -> RunConfig:
    try:
        run_config = RunConfig(**config)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            section = first["loc"][0] if len(first["loc"]) > 1 else None
            valid = list(_SECTIONS[section].model_fields if section in _SECTIONS else RunConfig.model_fields)
            raise UserError(f"{where}: unknown key {field!r}; valid keys: {', '.join(valid)}") from None
        if first["type"] == "missing":
            raise UserError(f"{where}: {field!r} is required") from None
        hint = "; give a number per split: data.limit.train=N (or data.limit={train: N, test: M})" \
            if field == "data.limit" else ""
        raise UserError(f"{where}: {field}: {first['msg']} (got {first.get('input')!r}){hint}") from None
    for section in ("task", "method"):
        if "name" not in getattr(run_config, section):
            raise UserError(f"{where}: {section}.name is required")
    return run_config


def build_task_options(task, options: dict):
    fields = {f.name for f in dataclasses.fields(task.options)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UserError(f"task {task.name!r} has no option {unknown[0]!r}; valid task options: {', '.join(sorted(fields))}")
    for option in dataclasses.fields(task.options):
        value = options.get(option.name)
        if option.type in ("str", str) and isinstance(value, dict | list):
            # YAML reads an unquoted `{diff}` or `[x]` as a mapping or list
            raise UserError(f"task.{option.name} is text, but the value was read as a YAML {type(value).__name__}; "
                            f"quote it: task.{option.name}='...' (in a shell: \"task.{option.name}='{{diff}} ...'\")")
    check_option_types(task.options, options, f"task {task.name!r}", "task")
    try:
        return task.options(**options)
    except (TypeError, ValueError) as error:
        raise UserError(f"task {task.name!r}: {error}") from None


def resolve_card_path(card: str) -> Path:
    """As given (relative to the working directory), else relative to the package."""
    path = Path(card).expanduser()
    if path.exists() or path.is_absolute():
        return path
    packaged = PACKAGE_ROOT / card
    return packaged if packaged.exists() else path


def to_yaml_dict(config: RunConfig) -> dict:
    data = config.model_dump(mode="json")
    data.pop("demo", None)
    return data
