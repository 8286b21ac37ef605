"""Atomic writes: the final file appears whole or not at all, with the mode a new file gets."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys

import pytest
from peftlab.pipelines import config
from peftlab.shared import io
from peftlab.shared.methods.registry import build_options, get_method


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        io.write_json(tmp_path / "runs" / "meta.json", {"a": 1})
        io.save_tensors(tmp_path / "runs" / "adapter.safetensors", {})
    finally:
        os.umask(previous)
    for name in ("meta.json", "adapter.safetensors"):  # mkstemp's 0600 made runs unreadable to a server or colleague
        assert stat.S_IMODE((tmp_path / "runs" / name).stat().st_mode) == mode
    assert os.umask(previous) == previous  # the umask is left as it was


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    with pytest.raises(RuntimeError), io.atomic_path(tmp_path / "metrics.json") as temporary:
        temporary.write_text("{half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_yaml_reads_numbers_and_booleans_as_yaml_1_2_does_in_configs_overrides_and_method_options(tmp_path):
    # PyYAML's YAML 1.1 keeps `1e-3` as text; configs and overrides read it as YAML 1.2 does
    assert io.load_yaml("a: 1e-3\nb: 12\nc: -2E+4\nd: 1e\ne: [3.0e-4, 1_000]") == \
        {"a": 0.001, "b": 12, "c": -20000.0, "d": "1e", "e": [0.0003, 1000]}
    # and only true/false are booleans (YAML 1.1 read `task.feature_cache=off` as False)
    assert io.load_yaml("a: off\nb: yes\nc: true\nd: FALSE\ne: [on, No]") == \
        {"a": "off", "b": "yes", "c": True, "d": False, "e": ["on", "No"]}
    # integers are decimal whatever their zeros (YAML 1.1 read the fold 010 as octal 8, 1:30 as 90)
    assert io.load_yaml("a: [010, 05, -007, +3, 0o17, 0x1F, 1:30, 0]") == {"a": [10, 5, -7, 3, 15, 31, "1:30", 0]}
    overrides = config.apply_overrides({}, ["method.dropout=1e-1", "train.lr=3e-4", "task.name=x1e3"])
    assert overrides == {"method": {"dropout": 0.1}, "train": {"lr": 0.0003}, "task": {"name": "x1e3"}}
    assert build_options(get_method("lora"), overrides["method"]).dropout == 0.1
    (tmp_path / "run.yaml").write_text("pipeline: protein-ppi\nmethod: {name: lora, alpha: 3.2e1}\n")
    assert config.read_config_file(tmp_path / "run.yaml")["method"]["alpha"] == 32.0


def test_python_overrides_keep_their_values_and_a_mapping_merges_into_its_section():
    from peftlab.pipelines import api, runner

    # from Python a string is that string (YAML read "#tag" as null, "007" as 7, "a: b" as a mapping)
    given = {"backbone.name": "#tag", "task.name": "007", "method.target_modules": ["a: b"], "train": {"epochs": 1}}
    texts = [f"{key}={api._yaml_value(value)}" for key, value in given.items()]
    applied = config.apply_overrides({"train": {"epochs": 5, "batch_size": 16}}, texts)
    assert applied == {"backbone": {"name": "#tag"}, "task": {"name": "007"}, "method": {"target_modules": ["a: b"]},
                       "train": {"epochs": 1, "batch_size": 16}}
    # the demo's own batch size, rate and patience stay when one train setting is given as a section
    demo = runner.build_config("protein-classify", demo=True)
    merged = runner.build_config("protein-classify", demo=True, overrides=["train={epochs: 1}"])
    assert merged.train.epochs == 1
    assert merged.train.model_dump(exclude={"epochs"}) == demo.train.model_dump(exclude={"epochs"})


def test_what_runs_say_goes_through_the_peftlab_logger_which_python_users_can_quiet(capsys):
    import logging

    from peftlab.pipelines import runner

    runner.log("said")
    assert capsys.readouterr().err == "said\n"  # the message alone, on the stderr of the moment
    logger = logging.getLogger("peftlab")
    logger.setLevel(logging.WARNING)
    try:
        runner.log("quiet")
        assert capsys.readouterr().err == ""
    finally:
        logger.setLevel(logging.INFO)


def test_a_level_set_right_after_import_peftlab_is_kept_when_the_runner_loads():
    """`import peftlab` does not load the runner; loading it later (peftlab.load, peftlab.run)
    set the logger back to INFO."""
    script = ("import logging, peftlab; logging.getLogger('peftlab').setLevel(logging.WARNING); "
              "from peftlab.pipelines import runner; runner.log('said'); print(logging.getLogger('peftlab').level)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(logging.WARNING) and "said" not in done.stderr
    loud = subprocess.run([sys.executable, "-c", script.replace("logging.getLogger('peftlab').setLevel(logging.WARNING); ", "")],
                          capture_output=True, text=True, check=True)
    assert loud.stdout.strip() == str(logging.INFO) and loud.stderr == "said\n"
