"""The `mhr` command line: suite, train, adapt, zeroshot, eval, plot, demo, export-task.

Other packages add commands through the "mhr.commands" entry-point group (name = a function that typer
can turn into a command), loaded by `main`; this module imports none of them.
Bad input (a file, a field, a task, a setting) ends with one line on stderr and exit status 2.
Commands import their implementation when they run: transformers takes seconds to import, and
`mhr --help` should not wait for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer

import mhr
from training import distributed
from training import suite as suite_module
from training.config import TrainConfig, TrainConfigError, resolve_device
from training.data import DataError
from training.remote import REMOTE_SETTINGS, RemoteError, Server, adapt_remote
from training.superni import read_data

app = typer.Typer(help="Train, adapt and evaluate Multi-Head Adapter Routing (MHR) bundles.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
PLUGIN_GROUP = "mhr.commands"
USER_ERRORS = (DataError, TrainConfigError, mhr.BundleError, mhr.ConfigError, mhr.InjectionError, OSError,
               RemoteError)
DEFAULT = TrainConfig()
PromptStyle = Enum("PromptStyle", {style: style for style in suite_module.PROMPT_STYLES}, type=str)


def _opt(help: str, field: str):
    """An optional setting; left out, the TrainConfig (file or default) value applies, shown in --help.

    The option's own default is None ("not given"), so --help shows the TrainConfig value instead."""
    value = getattr(DEFAULT, field)
    shown = ",".join(value) if isinstance(value, list) else "none" if value is None else value
    return typer.Option(help=f"{help} (default: {shown})", show_default=False)


def _none(help: str, absent: str = "none"):
    """An option without a value unless given; --help says what applies when it is left out."""
    return typer.Option(help=f"{help} (default: {absent})", show_default=False)


# Settings shared by every training command; None means "not given on the command line".
Config = Annotated[Path | None, _none("JSON file of TrainConfig fields; options below override it")]
Steps = Annotated[int | None, _opt("optimizer steps", "steps")]
BatchSize = Annotated[int | None, _opt("examples per micro-batch", "batch_size")]
GradAccum = Annotated[int | None, _opt("micro-batches per optimizer step", "grad_accum")]
Lr = Annotated[float | None, _opt("learning rate of adapter weights", "lr")]
LogitsLr = Annotated[float | None, _opt("learning rate of routing logits", "logits_lr")]
Warmup = Annotated[int | None, _opt("linear warmup steps", "warmup_steps")]
Schedule = Annotated[str | None, _opt("constant | linear | cosine decay after warmup", "schedule")]
WeightDecay = Annotated[float | None, _opt("AdamW weight decay of adapter weights", "weight_decay")]
MaxGradNorm = Annotated[float | None, _opt("gradient clipping norm, 0 = off", "max_grad_norm")]
Seed = Annotated[int | None, _opt("random seed", "seed")]
Dtype = Annotated[str | None, _opt("fp32 | bf16 (autocast)", "dtype")]
Device = Annotated[str | None, _opt("auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps; "
                                    "under torchrun a CUDA device is one GPU per process", "device")]
MaxLength = Annotated[int | None, _opt("tokens per example", "max_length")]
SaveEvery = Annotated[int | None, _opt("steps between checkpoints, 0 = never", "save_every")]
CheckpointDir = Annotated[str | None, _opt("checkpoint directory; a run resumes from its latest checkpoint",
                                           "checkpoint_dir")]
Quiet = Annotated[bool, typer.Option("--quiet", help="no progress bars (default: off)", show_default=False)]
DATA_HELP = ("JSONL of {task, input, target} records, a Super-NaturalInstructions task file (.json), a "
             "directory of them, or a split file of task names (splits/default/test_tasks.txt)")
MaxPerTask = Annotated[int | None, _none("use the first N instances of each task", "all")]
Backbone = Annotated[str | None, typer.Option(
    "--model", show_default=False,
    help="load the backbone from here (same model, moved) (default: the path the bundle records)")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn an error caused by the user's input into one line on stderr and exit status 2."""
    try:
        yield
    except USER_ERRORS as e:
        first, *rest = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        typer.echo(f"error: {' '.join([first, '; '.join(rest)]).strip()}", err=True)
        raise typer.Exit(2) from None


@contextmanager
def progress_bars(shown: bool) -> Iterator[None]:
    """Hide transformers' own progress bars too (loading and writing weights, downloads) unless `shown`:
    --quiet means no bars at all. Restored afterwards, as the switch is global to the process."""
    if shown:
        yield
        return
    from transformers.utils import logging as hf_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def make_config(config_file: Path | None, **options) -> TrainConfig:
    """TrainConfig from the file (if any), overridden by the options that were given."""
    given = {k: v for k, v in options.items() if v is not None}
    return TrainConfig.from_file(config_file, **given) if config_file else TrainConfig(**given)


@app.command()
def suite(out: Annotated[Path, typer.Option(help="directory for the JSONL files")],
          n_train: Annotated[int, typer.Option(help="instances per training task")] = 64,
          n_test: Annotated[int, typer.Option(help="test instances per task")] = 32,
          n_shots: Annotated[int, typer.Option(help="pool of few-shot instances per held-out task")] = 64,
          seed: Annotated[int, typer.Option(help="generator seed")] = 0,
          prompts: Annotated[PromptStyle, typer.Option(help="plain: the same prompt for every task, only the "
                                                            "adapter knows it; named: prompts spell the chain out")
                             ] = PromptStyle.plain) -> None:
    """Write the task suite: train/test files of the training tasks, heldout-train/heldout-test files of the
    held-out tasks and validation-train/validation-test files of the validation tasks (new functions built
    from the same skills)."""
    with user_errors():
        paths = suite_module.write_suite(out, n_train, n_test, n_shots, seed, style=prompts.value)
    typer.echo(f"skills: {', '.join(suite_module.SKILLS)}")
    typer.echo(f"{len(suite_module.TRAIN_TASKS)} training tasks; "
               f"validation: {', '.join(suite_module.VALIDATION_TASKS)}")
    typer.echo(f"held out: {', '.join(suite_module.HELD_OUT_TASKS)}")
    for name, path in paths.items():
        typer.echo(f"{name:16s} {path}")


@app.command()
def train(model: Annotated[str, typer.Option(help="backbone: local directory or hub id")],
          data: Annotated[Path, typer.Option(help=DATA_HELP)],
          out: Annotated[Path, typer.Option(help="bundle directory to write")],
          method: Annotated[str | None, _opt("lora (shared) | poly (h=1) | mhr", "method")] = None,
          skills: Annotated[int | None, _opt("K, skills in the inventory", "skills")] = None,
          heads: Annotated[int | None, _opt("h, heads per skill (mhr)", "heads")] = None,
          rank: Annotated[int | None, _opt("LoRA rank", "rank")] = None,
          alpha: Annotated[float | None, _opt("LoRA alpha (scaling alpha/rank)", "alpha")] = None,
          target_modules: Annotated[str | None, _opt("comma-separated linear layer names to adapt",
                                                     "target_modules")] = None,
          relaxed_routing: Annotated[bool | None, typer.Option(
              "--relaxed-routing/--sigmoid-routing", show_default=False,
              help="training routing weights: relaxed-Bernoulli samples or plain sigmoid "
                   "(default: relaxed-routing)")] = None,
          eval_data: Annotated[Path | None, _none("data (as --data) whose loss is shown every --eval-every")] = None,
          max_per_task: MaxPerTask = None,
          eval_every: Annotated[int | None, _opt("steps between eval losses", "eval_every")] = None,
          config: Config = None, steps: Steps = None, batch_size: BatchSize = None, grad_accum: GradAccum = None,
          lr: Lr = None, logits_lr: LogitsLr = None, warmup_steps: Warmup = None, schedule: Schedule = None,
          weight_decay: WeightDecay = None, max_grad_norm: MaxGradNorm = None, seed: Seed = None,
          dtype: Dtype = None, device: Device = None, max_length: MaxLength = None, save_every: SaveEvery = None,
          checkpoint_dir: CheckpointDir = None, quiet: Quiet = False) -> None:
    """Multi-task pre-training of a skill inventory; writes a bundle with one routed task per data task.

    Under `torchrun --nproc-per-node N -m training train ...` N processes share each batch (--batch-size
    is per process); on CUDA each process uses its own GPU (cuda:LOCAL_RANK) and they exchange over nccl."""
    from training.pretrain import pretrain
    with user_errors(), progress_bars(not quiet):
        cfg = make_config(config, method=method, skills=skills, heads=heads, rank=rank, alpha=alpha,
                          target_modules=target_modules.split(",") if target_modules else None,
                          relaxed_routing=relaxed_routing,
                          eval_every=eval_every, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                          logits_lr=logits_lr, warmup_steps=warmup_steps, schedule=schedule,
                          weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, dtype=dtype,
                          device=device, max_length=max_length, save_every=save_every, checkpoint_dir=checkpoint_dir)
        world = distributed.setup(cfg.torch_device)
        examples = read_data(data, max_per_task=max_per_task)
        evals = read_data(eval_data, known_tasks={ex.task for ex in examples}) if eval_data else None
        bundle, result = pretrain(model, examples, cfg, out, data_name=str(data), eval_examples=evals,
                                  progress=not quiet, world=world)
    distributed.teardown(world)
    if world.is_main:
        typer.echo(f"bundle {out}: {len(bundle.tasks)} tasks, K={bundle.config.n_skills} "
                   f"h={bundle.config.n_heads} r={bundle.config.rank}; {result.summary()}")


@app.command()
def adapt(data: Annotated[Path, typer.Option(help="the new task's records: " + DATA_HELP)],
          task: Annotated[str, typer.Option(help="name of the new task (every record must have it)")],
          bundle: Annotated[Path | None, _none("bundle directory; the task is added to it (or give --server)")] = None,
          server: Annotated[str | None, _none(
              "URL of a running server (http://host:port): it trains the task on the backbone it serves and "
              "deploys it; this command follows the job until the task is live (Ctrl-C cancels it)")] = None,
          admin_key: Annotated[str | None, typer.Option(envvar="MHR_ADMIN_KEY", show_default=False,
                                                        show_envvar=False, help="the server's admin key (env "
                                                        "MHR_ADMIN_KEY) (default: none)")] = None,
          method: Annotated[str, typer.Option(help="mhr | mhr-z | mhr-mu | poly | lora")] = "mhr-z",
          shots: Annotated[int | None, _none("use the first N records", "all")] = None,
          replace: Annotated[bool, typer.Option(help="overwrite the task if the bundle has it")] = False,
          config: Config = None, steps: Steps = None, batch_size: BatchSize = None, grad_accum: GradAccum = None,
          lr: Lr = None, logits_lr: LogitsLr = None, warmup_steps: Warmup = None, schedule: Schedule = None,
          weight_decay: WeightDecay = None, max_grad_norm: MaxGradNorm = None, seed: Seed = None,
          dtype: Dtype = None, device: Device = None, max_length: MaxLength = None, save_every: SaveEvery = None,
          checkpoint_dir: CheckpointDir = None, model: Backbone = None, quiet: Quiet = False) -> None:
    """Few-shot adaptation of a new task from a bundle's inventory: here (--bundle), or by a running server
    (--server) with the same settings and the same result."""
    with user_errors(), progress_bars(not quiet):
        if (bundle is None) == (server is None):
            raise TrainConfigError("give exactly one of --bundle (adapt here) and --server (adapt on a server)")
        local_only = {"--dtype": dtype, "--device": device, "--max-length": max_length, "--save-every": save_every,
                      "--checkpoint-dir": checkpoint_dir, "--model": model}
        if server is not None and (given := [name for name, value in local_only.items() if value is not None]):
            raise TrainConfigError(f"{', '.join(given)} apply to adapting here: the server trains on its own "
                                   "backbone, device and context")
        cfg = make_config(config, method=method, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                          logits_lr=logits_lr, warmup_steps=warmup_steps, schedule=schedule,
                          weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, dtype=dtype,
                          device=device, max_length=max_length, save_every=save_every, checkpoint_dir=checkpoint_dir)
        examples = read_data(data, known_tasks={task})[:shots]
        if server is not None:
            job = adapt_remote(Server(server, admin_key), task, examples,
                               {k: getattr(cfg, k) for k in REMOTE_SETTINGS}, replace=replace, progress=not quiet)
            typer.echo(f"task {task!r} is live on {server} (revision {job['revision']}; {cfg.method}, "
                       f"{len(examples)} shots, {job['step']} steps, final loss {job['loss']:.4f})")
            return
        from training.adapt import adapt as run_adapt
        result = run_adapt(bundle, examples, task, cfg, data_name=str(data), replace=replace, backbone=model,
                           progress=not quiet)
    typer.echo(f"task {task!r} added to {bundle} ({cfg.method}, {len(examples)} shots, {result.summary()})")


@app.command()
def zeroshot(bundle: Annotated[Path, typer.Option(help="bundle directory; its zero-shot adapter is replaced")],
             data: Annotated[Path, typer.Option(help="the multi-task training records: " + DATA_HELP)],
             validation_data: Annotated[Path | None, _none(
                 "records of tasks the bundle was not trained on: the extra steps are early-stopped on them and "
                 "the best of backbone alone, plain average and trained average is stored")] = None,
             eval_every: Annotated[int | None, _none("steps between validation scores", "steps / 10")] = None,
             max_per_task: MaxPerTask = None, config: Config = None, steps: Steps = None,
             batch_size: BatchSize = None,
             grad_accum: GradAccum = None, lr: Lr = None, warmup_steps: Warmup = None, schedule: Schedule = None,
             weight_decay: WeightDecay = None, max_grad_norm: MaxGradNorm = None, seed: Seed = None,
             dtype: Dtype = None, device: Device = None, max_length: MaxLength = None,
             save_every: SaveEvery = None, checkpoint_dir: CheckpointDir = None, model: Backbone = None,
             quiet: Quiet = False) -> None:
    """Zero-shot MHR-mu: train the average of the skills on all tasks and store it as the zero-shot adapter."""
    from training.zeroshot import zeroshot as run_zeroshot
    with user_errors(), progress_bars(not quiet):
        cfg = make_config(config, method="mhr-mu", steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                          lr=lr, warmup_steps=warmup_steps, schedule=schedule, weight_decay=weight_decay,
                          max_grad_norm=max_grad_norm, seed=seed, dtype=dtype, device=device,
                          max_length=max_length, save_every=save_every, checkpoint_dir=checkpoint_dir)
        validation = read_data(validation_data) if validation_data else None
        result = run_zeroshot(bundle, read_data(data, max_per_task=max_per_task), cfg, data_name=str(data),
                              validation=validation, eval_every=eval_every or max(1, cfg.steps // 10),
                              backbone=model, progress=not quiet)
    typer.echo(f"zero-shot adapter of {bundle} trained: {result.summary()}")
    if validation_data:
        chosen = mhr.Bundle.load(bundle).training["zero_shot"]
        typer.echo("validation exact match: " + ", ".join(
            f"{name} {score['exact_match']:.3f}" for name, score in chosen["candidates"].items())
            + f"; stored: {chosen['selected']}")


@app.command(name="eval")
def evaluate(bundle: Annotated[Path, typer.Option(help="bundle directory")],
             data: Annotated[Path, typer.Option(help="test records: " + DATA_HELP)],
             max_per_task: MaxPerTask = None,
             task: Annotated[list[str] | None, _none("only this task (repeatable)", "every task in the data")] = None,
             zero_shot: Annotated[bool, typer.Option(help="serve every task with the zero-shot adapter")] = False,
             out: Annotated[Path | None, _none("write the report as JSON here", "none, the table only")] = None,
             max_new_tokens: Annotated[int, typer.Option(help="generation length limit")] = 32,
             batch_size: Annotated[int, typer.Option(help="prompts per generate call")] = 16,
             device: Device = None, model: Backbone = None) -> None:
    """Exact match and ROUGE-L (generation) or accuracy (records with choices), per task and averaged."""
    from training.evaluate import evaluate_bundle, format_table, write_report
    with user_errors():
        torch_device = resolve_device(device or DEFAULT.device)
        examples = read_data(data, max_per_task=max_per_task)
        if task:
            examples = [ex for ex in examples if ex.task in task]
            if not examples:
                raise DataError(f"{data}: no records of task(s) {task}")
        report = evaluate_bundle(bundle, examples, zero_shot=zero_shot, backbone=model, device=torch_device,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
        if out:
            write_report(report, out)
    typer.echo(format_table(report))


@app.command()
def plot(bundle: Annotated[Path, typer.Option(help="bundle directory")],
         out: Annotated[Path, typer.Option(help="PNG file to write")] = Path("routing.png")) -> None:
    """Heatmaps of the learned routing (tasks x skills per head, averaged over layers) and task similarity."""
    from training.plot import plot_routing
    with user_errors():
        path = plot_routing(mhr.Bundle.load(bundle), out)
    typer.echo(f"routing of {bundle} drawn in {path}")


@app.command()
def demo(cache_dir: Annotated[Path, typer.Option(help="where the demo build is cached")] = Path(".cache/mhr-demo"),
         rebuild: Annotated[bool, typer.Option(help="build again even when the cache is current")] = False,
         reset: Annotated[bool, typer.Option(help="serve a fresh copy of the bundle: drops the tasks deployed to "
                                                  "the served copy")] = False,
         quiet: Quiet = False) -> None:
    """The embedded demo: an MHR bundle of some of the task suite's tasks on the shipped backbone (which never saw
    them) and its zero-shot adapter, built locally on first use (about two minutes on 2 CPU cores) and cached.

    Prints exact match per task and the command that serves a copy of the bundle. That copy is kept from one
    run to the next with the tasks deployed to it, until --reset or a rebuild."""
    from training import demo as demo_module
    with user_errors(), progress_bars(not quiet):
        build = demo_module.build(cache_dir, force=rebuild, progress=not quiet, log=typer.echo)
        serving, fresh = demo_module.serving_copy(build, reset=reset)
    typer.echo(demo_module.summary(build))
    typer.echo(f"served copy of the bundle: {serving} "
               f"({'fresh from the build' if fresh else 'kept, with the tasks deployed to it; --reset to drop them'})")
    typer.echo(f"serve it: mhr serve --bundle {serving} --model {build.backbone} "
               f"--admin-key {demo_module.DEMO_ADMIN_KEY}")


@app.command(name="export-task")
def export_task(bundle: Annotated[Path, typer.Option(help="bundle directory")],
                task: Annotated[str, typer.Option(help="the task to export")],
                out: Annotated[Path, typer.Option(help="safetensors file to write")]) -> None:
    """Write one task as the server's admin upload: routing logits (h x K) per module for a routed task,
    `<module>.lora_A` / `<module>.lora_B` for a dense one (upload it with `?alpha=` as printed)."""
    from mhr.files import safetensors_bytes, write_atomic
    with user_errors():
        loaded = mhr.Bundle.load(bundle)
        try:
            kind = loaded.task(task).kind
        except KeyError as e:
            raise mhr.BundleError(f"{bundle}: {e.args[0]}") from None
        if kind is mhr.TaskKind.ROUTED:
            tensors = {m: t.contiguous() for m, t in loaded.routing_logits(task).items()}
            hint = "routed task: POST it to /admin/tasks/{task}"
        else:
            lora = loaded.task_lora(task)
            tensors = {f"{m}.lora_{ab}": t.contiguous() for m in lora.modules
                       for ab, t in (("A", lora.A[m]), ("B", lora.B[m]))}
            hint = f"dense task: POST it to /admin/tasks/{task}?alpha={lora.alpha:g}"
        write_atomic(out, safetensors_bytes(tensors))
    typer.echo(f"{out}: {len(tensors)} tensors; {hint.format(task=task)}")


def main() -> None:
    """Entry point of the `mhr` script: the commands above plus those other installed packages provide."""
    for entry in entry_points(group=PLUGIN_GROUP):
        app.command(name=entry.name)(entry.load())
    app()
