"""The `peftlab` command line. Every command has --help.

User mistakes print one line (`error: ...`) on stderr and exit with code 2.
Progress and tables go to stderr; `run` and `eval` end with one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import click
from peftlab.shared.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peftlab")
def cli():
    """peftlab: parameter-efficient fine-tuning pipelines across domains."""


@cli.command("list")
@click.argument("what", required=False, type=click.Choice(["pipelines", "methods", "backbones", "cards", "tasks"]))
def list_command(what):
    """List pipelines, methods, backbones, tasks or data cards (all by default)."""
    from peftlab.pipelines import config as cfg
    from peftlab.shared import methods
    from peftlab.shared.cards import read_card
    from peftlab.shared.tasks import list_tasks

    sections = [what] if what else ["pipelines", "tasks", "methods", "backbones", "cards"]
    for section in sections:
        if len(sections) > 1:
            click.echo(f"# {section}")
        if section == "pipelines":
            for name in cfg.list_pipelines():
                recipe = cfg.read_recipe(name)
                demo = recipe.get("demo", {})
                # --demo trains what the tiny backbone can learn, which is not always the recipe's method
                demo_method = demo.get("method", {}).get("name", recipe["method"]["name"])
                click.echo(f"{name:28s} task={recipe['task']['name']} backbone={recipe['backbone']['name']} "
                           f"method={recipe['method']['name']} (--demo: {demo_method} on "
                           f"{demo.get('backbone', {}).get('name', recipe['backbone']['name'])})")
        elif section == "methods":
            for name in methods.list_methods():
                spec = methods.get_method(name)
                flags = ("mergeable" if spec.mergeable else "not mergeable") + (", peft" if spec.peft_backed else "")
                click.echo(f"{name:18s} {spec.description} [{flags}]")
                for option, default, help_text in methods.options_help(spec):
                    click.echo(f"    {option}={default!r}  {help_text}")
        elif section == "backbones":
            for task in list_tasks():
                click.echo(f"{task.name:28s} {', '.join(task.backbones())}")
        elif section == "tasks":
            for task in list_tasks():
                click.echo(f"{task.name:28s} {task.description}")
        elif section == "cards":
            root = cfg.PACKAGE_ROOT / "data_cards"
            for path in sorted(root.glob("*.md")):
                card = read_card(path)
                click.echo(f"{str(Path('data_cards') / path.name):44s} task={card.task} format={card.format}")


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("pipeline", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--demo", is_flag=True, help="Use the pipeline's embedded demo data and tiny backbone (with --data: the "
                                           "random-init tiny backbone on that card's data; add --backbone for a real one).")
@click.option("--method", help="PEFT method (see `peftlab list methods`).")
@click.option("--backbone", help="Backbone name, local path, or tiny.")
@click.option("--data", help="Data card path.")
@click.option("--out", type=click.Path(file_okay=False), help="The run directory (default runs/<pipeline>/<time>-<method>/).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A run.yaml to repeat (key=value still apply).")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue an unfinished run directory from checkpoints/last.")
@click.option("--num-processes", default=1, show_default=True, type=click.IntRange(min=1),
              help="Train with DDP in this many processes on this machine (gloo on CPU, one GPU each); "
                   "train.batch_size stays the global batch.")
def run(pipeline, overrides, demo, method, backbone, data, out, config_file, resume, num_processes):
    """Train and evaluate PIPELINE; KEY=VALUE overrides any config key (e.g. train.max_steps=20)."""
    if pipeline and "=" in pipeline:
        overrides, pipeline = (pipeline, *overrides), None
    if resume:  # the run's own run.yaml decides; anything else given would be silently ignored
        given = [*([pipeline] if pipeline else []), *overrides, *(["--demo"] if demo else [])]
        given += [flag for flag, value in (("--method", method), ("--backbone", backbone), ("--data", data),
                                           ("--out", out), ("--config", config_file)) if value]
        if given:
            raise UserError(f"--resume {resume}: continues the run as its run.yaml says and takes no other settings "
                            f"(got {' '.join(given)}); drop them, or start a new run with them")
    if num_processes > 1 and "WORLD_SIZE" not in os.environ:  # not yet under a launcher: become one
        from peftlab.pipelines.launch import launch

        argv = ["run", *([pipeline] if pipeline else []), *overrides, *(["--demo"] if demo else [])]
        for flag, value in (("--method", method), ("--backbone", backbone), ("--data", data), ("--out", out),
                            ("--config", config_file), ("--resume", resume)):
            argv += [flag, value] if value else []
        raise click.exceptions.Exit(launch(argv, num_processes))
    from peftlab.pipelines import runner

    if resume:
        run_dir = runner.resume(resume)
    else:
        config = runner.build_config(pipeline, config_file=config_file, demo=demo, method=method,
                                     backbone=backbone, data=data, overrides=list(overrides))
        run_dir = runner.run(config, out=out)
    if runner.launcher_rank() != 0:  # the main process reports for the run
        return
    from peftlab.shared import io

    results = io.read_json(run_dir / "metrics.json")
    runner.log(f"run directory: {run_dir}")
    click.echo(runner.metrics_line(run_dir, results))


@cli.command("eval")
@click.argument("run_dir", type=click.Path())
@click.option("--data", help="Evaluate on another card (same task and labels).")
@click.option("--split", default="test", show_default=True)
@click.option("--predictions", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write each example's prediction and true label (JSONL), as training does in predictions/.")
@click.option("--force", is_flag=True, help="Use the adapter even if the backbone weights differ from training.")
def eval_command(run_dir, data, split, predictions, force):
    """Evaluate a finished run on a split; prints the metrics as one JSON line."""
    from peftlab.pipelines.predictor import Predictor

    predictor = Predictor(run_dir, force=force)  # the backbone loads once the split and data are known good
    results = predictor.evaluate(split=split, card=data, predictions_file=predictions)
    click.echo(json.dumps({"run_dir": str(run_dir), split: results}))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False), help="JSONL file (default: stdout).")
@click.option("--split", help="With a data card: predict this split only (default: every split, each line naming its own).")
@click.option("--force", is_flag=True, help="Use the adapter even if the backbone weights differ from training.")
def predict(run_dir, inputs, out, split, force):
    """Predict with a finished run on the task's natural files (PPI: a FASTA and a pairs
    TSV; tables read with the run card's column names) or on a data card of the task."""
    from peftlab.pipelines.predictor import Predictor
    from peftlab.shared import io

    rows = Predictor(run_dir, force=force).predict(list(inputs), split=split)  # inputs are read before the backbone loads
    if out:
        io.write_jsonl(out, rows)
        click.echo(f"{len(rows)} predictions -> {out}", err=True)
    else:
        for row in rows:
            click.echo(json.dumps(row))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), help="Directory for the merged run.")
@click.option("--export", "export_dir", type=click.Path(file_okay=False),
              help="Write the merged backbone in its own library's format (fair-esm, timm, transformers), loadable "
                   "without peftlab (the task head stays in the run); with --out too, both.")
def merge(run_dir, out, export_dir):
    """Fold a mergeable adapter into the backbone weights; writes a run directory with method `full`."""
    from peftlab.pipelines.predictor import check_merge_request, load
    from peftlab.shared import io

    if not out and not export_dir:
        raise UserError("merge needs --out DIR (a merged run), --export DIR (the merged backbone), or both")
    if (Path(run_dir) / "meta.json").is_file():  # refused before the backbone loads (seconds to minutes)
        check_merge_request(Path(run_dir), io.read_json(Path(run_dir) / "meta.json"), out=out, export=export_dir)
    predictor = load(run_dir)
    written = [predictor.merge(out)] if out else []
    if export_dir:
        try:
            written.append(predictor.export(export_dir))
        except BaseException:  # all or nothing: a failed export takes the merged run with it
            for directory in written:
                shutil.rmtree(directory, ignore_errors=True)
            raise
    for directory in written:
        click.echo(str(directory))
    if predictor.meta.get("precision") == "bf16" and predictor.meta["method"]["name"] != "full":
        click.echo("note: the run computes in bf16, which rounds the merged weights as one: scores can move by "
                   "about 1e-2 against the adapter's (README: merge); `peftlab eval` the merged run for its figures",
                   err=True)


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=1), help="Examples batched together at most.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(min=0), help="How long a batch waits for more requests.")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's choice; 1 is best on a busy machine).")
@click.option("--force", is_flag=True, help="Use adapters even if the backbone weights differ from training.")
def serve(run_dirs, host, port, max_batch, max_wait_ms, threads, force):
    """Serve runs over HTTP/JSON; each backbone is loaded once. RUN_DIR or NAME=RUN_DIR.

    GET /health, GET /adapters, POST /predict/NAME with the task's JSON input form.
    """
    from peftlab.pipelines.serve import serve as serve_runs

    if threads:
        import torch

        torch.set_num_threads(threads)
    serve_runs(list(run_dirs), host=host, port=port, force=force, max_batch=max_batch, max_wait_ms=max_wait_ms)


@cli.group()
def card():
    """Validate or create data cards."""


@card.command("validate")
@click.argument("path", type=click.Path())
@click.argument("overrides", nargs=-1)
def card_validate(path, overrides):
    """Check a card against its task's schema and read its records as training would;
    task.KEY=VALUE options that change reading (e.g. task.multi_label=true) apply."""
    from peftlab.pipelines import config as cfg
    from peftlab.pipelines import runner
    from peftlab.shared.cards import read_card
    from peftlab.shared.tasks import get_task

    header = read_card(cfg.resolve_card_path(path))  # a shipped card by its listed path, from anywhere
    task = get_task(header.task)
    given = cfg.apply_overrides({}, list(overrides))
    if set(given) - {"task"} or "name" in given.get("task", {}):
        raise UserError(f"card validate takes task options only (task.KEY=VALUE), got {' '.join(overrides)}")
    # the options a run starts from (the recipe's, e.g. its crop), then the ones given
    options = cfg.build_task_options(task, runner.build_config(task.name, overrides=list(overrides)).task_options)
    loaded = runner.load_card(path, task)
    dataset = task.read(loaded, options)
    runner.evaluated_splits(list(dataset.splits), loaded, dataset, announce=False)  # an empty split, said why
    counts = {split: len(examples) for split, examples in dataset.splits.items()}
    notes = runner.dataset_notes(dataset, training=True)
    if "test" not in dataset.splits and "train" in dataset.splits:
        notes.append("the card gives no test split: a run then needs eval.splits=[validation]; give it one (a file, "
                     "a ratio, or with fold_by, test: [VALUES])")
    if loaded.format != "demo":
        notes += [f"the card gives no {key} (`{key}:`): say where the data comes from and on what terms it may be "
                  f"used, so that runs on it can be shared" for key in ("license", "source") if not getattr(loaded, key)]
    click.echo(json.dumps({"card": str(loaded.card_path), "task": task.name, "labels": dataset.labels, "splits": counts,
                           "counted_as": runner.split_units(task, counts), "notes": notes}))


@card.command("new")
@click.argument("names", nargs=-1, required=True, metavar="[DOMAIN] TASK")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the card here (default: stdout).")
def card_new(names, out):
    """Print (or write) a card template for TASK (`peftlab list tasks`); a DOMAIN before it is checked."""
    from peftlab.shared import io
    from peftlab.shared.tasks import get_task, list_tasks

    known = list_tasks()
    if len(names) > 2 or (len(names) == 2 and names[0] in {task.name for task in known}):  # `card new TASK my.md`
        raise UserError(f"card new takes TASK (or DOMAIN TASK), got {' '.join(names)}; the card goes to --out FILE")
    *domain, task_name = names
    of_domain = [task.name for task in known if task.domain == task_name]
    if of_domain:
        raise UserError(f"{task_name} is a domain; name one of its tasks: peftlab card new {' | '.join(of_domain)}")
    task = get_task(task_name)
    if domain and task.domain != domain[0]:
        raise UserError(f"task {task_name!r} belongs to domain {task.domain!r}, not {domain[0]!r}")
    template = task.card_template().rstrip("\n") + "\n"  # a text file ends its last line
    # where the format is chosen, the way to read any other
    template = re.sub(r"^(format: .*)$", r"\1\n# another format: set format to its name, add `loader: my_loader:read` (README, "
                      r"'A format no domain reads')", template, count=1, flags=re.MULTILINE)
    if out:
        if Path(out).exists():
            raise UserError(f"{out} exists; choose another --out")
        io.write_text(out, template)
        click.echo(f"wrote {out}; fill it in, then: peftlab card validate {out}", err=True)
    else:
        click.echo(template, nl=False)


@cli.command("bench")
@click.argument("pipeline")
@click.argument("overrides", nargs=-1)
@click.option("--methods", required=True, help="Comma-separated PEFT methods, e.g. lora,dora,bitfit (see `peftlab list methods`).")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(min=1), help="Seeds per method: train.seed = base seed + 0..N-1.")
@click.option("--demo", is_flag=True, help="Use the pipeline's embedded demo data and tiny backbone (with --data: the "
                                           "random-init tiny backbone on that card's data; add --backbone for a real one).")
@click.option("--backbone", help="Backbone name, local path, or tiny (the same for every method).")
@click.option("--data", help="Data card path (the same for every method).")
@click.option("--out", type=click.Path(file_okay=False), help="The sweep directory (default bench/<pipeline>/<time>/); an existing one is resumed.")
@click.option("--no-full", is_flag=True, help="Leave out the full fine-tuning reference row.")
@click.option("--columns", help="Metric columns of the table, in order (default: the primary metric, then every scalar metric the runs report).")
@click.option("--in-process", is_flag=True, help="Run the cells in this process: no per-cell start-up, but no per-cell peak memory, and a crash ends the sweep.")
@click.option("--folds", help="KEY=V1,V2,...: one run per value of the card's splits.KEY, averaged in the table "
                              "(test=1,2,3,4,5 with splits.fold_by: leave one session out; seed=0,1,2: three random splits).")
def bench_command(pipeline, overrides, methods, seeds, demo, backbone, data, out, no_full, columns, in_process, folds):
    """Train and evaluate each method x seed (x fold) on the same data, backbone and budget; writes results.jsonl, table.md/.csv and pareto.png."""
    from peftlab.pipelines.bench import planned_cells, run_sweep

    sweep = run_sweep(pipeline, methods, seeds=seeds, demo=demo, data=data, backbone=backbone, out=out,
                      full=not no_full, overrides=list(overrides), columns=columns, isolate=not in_process, folds=folds)
    out_dir = sweep.out
    from peftlab.shared import io

    click.echo((out_dir / "table.md").read_text(encoding="utf-8"), err=True)
    click.echo(json.dumps({"out": str(out_dir), "results": str(out_dir / "results.jsonl"),
                           "table": str(out_dir / "table.md"), "pareto": str(out_dir / "pareto.png")}))
    # only this command's cells decide its exit status: an earlier run's failed cell that it
    # does not retry (its method dropped from --methods) is in the reports and a note, not an error
    planned = planned_cells(sweep)
    rows = [row for row in io.read_jsonl(out_dir / "results.jsonl") if row["cell"] in planned]
    failed = [row["cell"] for row in rows if row["status"] == "failed"]
    if failed:  # a script sees an incomplete comparison; the reports of the other cells stand
        click.echo(f"error: {len(failed)} of {len(rows)} cells failed ({', '.join(failed)}); their errors are in "
                   f"{out_dir / 'table.md'} and {out_dir / 'logs'}; the same command retries them", err=True)
        raise click.exceptions.Exit(1)


def _reports_errors() -> bool:
    """Under a launcher, only the main process prints a mistake (every process meets it)."""
    if "RANK" not in os.environ:
        return True
    from peftlab.shared.training import launcher_rank

    return launcher_rank() == 0


def _close_progress_bars() -> None:
    """Progress bars a mistake interrupted end their line first, so that the error is a line
    of its own (not `train:   0%| ... error: ...`)."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


def main(argv=None) -> int:
    try:
        code = cli.main(args=argv, prog_name="peftlab", standalone_mode=False)
    except UserError as error:
        _close_progress_bars()
        if _reports_errors():
            click.echo(f"error: {error}", err=True)
        return 2
    except click.exceptions.Abort as error:  # click's form of Ctrl-C
        interrupt = error.__context__
        if not getattr(interrupt, "said", False):  # a run has said it, with how to resume
            click.echo("interrupted" if isinstance(interrupt, KeyboardInterrupt) else "aborted", err=True)
        return 130
    except click.ClickException as error:
        # one line, like every other mistake: the message and where the help is
        context = getattr(error, "ctx", None)
        hint = f" (see `{context.command_path} --help`)" if context is not None else ""
        click.echo(f"error: {error.format_message()}{hint}", err=True)
        return 2
    return code if isinstance(code, int) else 0  # a command's click.exceptions.Exit(code)


if __name__ == "__main__":
    sys.exit(main())
