"""`visage-jax <command> --flags`: absl flags -> plain arguments -> one library call.

Commands: generate, convert, landscape, trajectory, judge, report, export-directions, bench, finetune, experiments,
sweep, plan, compare (RUN_A RUN_B as positional arguments), cosine, walls, classify.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from visage_jax import errors

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "", "HF directory, .gguf file or converted directory; "
                    "empty = the embedded SmolLM2-135M-Instruct GGUF.")
flags.DEFINE_multi_string("prompt", [], "A prompt to answer (repeatable).")
flags.DEFINE_integer("max_new_tokens", 64, "Greedy tokens to generate per prompt.")
flags.DEFINE_string("system_prompt", "default",
                    "default (the model's own) | none | llama2 | aoa | any custom text.")
flags.DEFINE_string("template", "auto", "auto (tokenizer chat template) | llama2 | vicuna | "
                    "mistral | llama3 | raw.")
flags.DEFINE_bool("no_chat_template", False, "Tokenize the prompt as raw text with the "
                  "tokenizer's default special tokens.")
flags.DEFINE_string("dtype", "float32", "Param and compute dtype: float32 | bfloat16.")
flags.DEFINE_string("out", "", "Output path (convert: the converted directory; "
                    "export-directions: the .safetensors file; walls: the directory).")
flags.DEFINE_string("workdir", "", "Run directory (landscape, export-directions, report: a run or a sweep).")
flags.DEFINE_string("name", "llamaguard", "judge: the judge's name (RUN/judges/NAME.jsonl, "
                    "landscape.json judges.NAME).")
flags.DEFINE_string("finetune", "", "trajectory: a `visage-jax finetune` workdir (train.trajectory_every > 0).")
flags.DEFINE_list("checkpoints", [], "trajectory: checkpoints in training order, P1,P2,...; the last is theta_final.")
flags.DEFINE_string("judge_format", "llamaguard", "judge: the judge's format, llamaguard | wildguard "
                    "(allenai/wildguard's three answers; default --max_new_tokens 32, else 10).")
flags.DEFINE_bool("overwrite", False, "landscape: discard a run with a different config in --workdir.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_bool("debug", False, "Show the traceback of a user error (also VISAGE_JAX_DEBUG=1).")
flags.DEFINE_string("mesh", "", "plan: data,model mesh shape, e.g. 1,8 (default: the config's mesh.shape).")
flags.DEFINE_string("accelerator", "", "plan: h100 | h200 | a100 | tpu_v4 | tpu_v5e | tpu_v5p, "
                    "comma-separated (default: all, and the pods of pods.PODS when no --mesh).")
flags.DEFINE_integer("prompt_len", 256, "plan: padded prompt length (a generous bound for AdvBench "
                     "goals with a long system prompt).")
flags.DEFINE_bool("paired", None, "compare: demand a paired comparison (--nopaired: independent "
                  "resamples); default: paired when both runs share prompts and directions.")
flags.DEFINE_integer("resamples", 1000, "compare: bootstrap resamples.")
flags.DEFINE_integer("seed", 0, "compare: seed of the bootstrap resamples.")
flags.DEFINE_string("judge", "", "classify: the refusal judge, prefix | keywords (default: prefix, "
                    "over-refusal's).")
flags.DEFINE_string("input", "", "classify: a CSV or JSONL file of completions.")
flags.DEFINE_string("column", "completion", "classify: the column (CSV) or field (JSONL) holding "
                    "the completions.")
flags.DEFINE_string("prompt_column", "", "classify: the column of the requests, e.g. prompt (every "
                    "row must have it; for judges that read the request).")
config_flags.DEFINE_config_file("config", None, "An experiment config: configs/<name>.py[:arg].",
                                lock_config=True)


def cmd_generate() -> None:
  """One JSON line per prompt: {"prompt", "generation"} (greedy)."""
  from visage_jax import decode, prompts
  from visage_jax.checkpoints import loader
  from visage_jax.runs import pipeline

  if not FLAGS.prompt:
    raise errors.UserError("generate needs at least one --prompt=TEXT.")
  path = FLAGS.model or loader.default_model_path()
  logging.info("loading %s", path)
  m = pipeline.load_model(path, FLAGS.dtype)
  cfg, params, tok = m.cfg, m.params, m.tokenizer
  if FLAGS.no_chat_template:
    ids = [tok(p)["input_ids"] for p in FLAGS.prompt]
  else:
    texts = [prompts.format_prompt(p, tok, FLAGS.template, FLAGS.system_prompt) for p in FLAGS.prompt]
    ids = prompts.tokenize_prompts(texts, tok, FLAGS.template)
  outs = decode.generate(params, cfg, ids, max_new_tokens=FLAGS.max_new_tokens,
                         eos_ids=m.eos_ids, pad_id=decode.pad_id_of(tok))
  for p, out in zip(FLAGS.prompt, outs):
    print(json.dumps({"prompt": p, "generation": tok.decode(out, skip_special_tokens=True)}),
          flush=True)


def cmd_convert() -> None:
  """Converts a HF directory or GGUF file once into an orbax directory that loads fast, streaming
  one params leaf at a time (peak host memory: `loader.convert`)."""
  from visage_jax.checkpoints import loader

  if not FLAGS.out:
    raise errors.UserError("convert needs --out=DIR.")
  path = FLAGS.model or loader.default_model_path()
  logging.info("converting %s", path)
  local = loader.resolve(path)
  loader.convert(local, FLAGS.out, FLAGS.dtype, loader.load_tokenizer(local))
  print(json.dumps({"converted": FLAGS.out, "source": path, "dtype": FLAGS.dtype}))


def cmd_landscape() -> None:
  """Runs or resumes a landscape; prints its summary as one JSON line."""
  from visage_jax.runs import landscape

  if FLAGS.config is None or not FLAGS.workdir:
    raise errors.UserError("landscape needs --config=configs/<name>.py and --workdir=DIR.")
  record = landscape.run(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite,
                         progress=FLAGS.progress)
  print(json.dumps(record.headline()))
  sys.stderr.write(landscape.summary_text(record, FLAGS.workdir))


def cmd_trajectory() -> None:
  """A fine-tuning trajectory on its landscape plane; prints the run summary as one JSON line."""
  from visage_jax.runs import landscape, trajectory

  if FLAGS.config is None or not FLAGS.workdir or bool(FLAGS.finetune) == bool(FLAGS.checkpoints):
    raise errors.UserError("trajectory needs --config=configs/<name>.py, --workdir=DIR and one of "
                           "--finetune=FT_WORKDIR or --checkpoints=P1,P2,...")
  record = trajectory.run(FLAGS.config, FLAGS.workdir, finetune_dir=FLAGS.finetune,
                          checkpoints=tuple(FLAGS.checkpoints), overwrite=FLAGS.overwrite, progress=FLAGS.progress)
  print(json.dumps(dict(record.headline(), trajectory=record.section("trajectory"))))
  sys.stderr.write(landscape.summary_text(record, FLAGS.workdir))


def cmd_judge() -> None:
  """Judges every generation of a run with a Llama Guard- or WildGuard-format model; prints judges[NAME]."""
  from visage_jax.runs import judging

  if not FLAGS.workdir or not FLAGS.model:
    raise errors.UserError("judge needs --workdir=RUN and --model=JUDGE (a Llama Guard or WildGuard checkpoint).")
  new = FLAGS.max_new_tokens if FLAGS["max_new_tokens"].present else None   # None: the format's default
  summary = judging.run(FLAGS.workdir, FLAGS.model, name=FLAGS.name, max_new_tokens=new,
                        dtype=FLAGS.dtype, progress=FLAGS.progress, judge_format=FLAGS.judge_format)
  print(json.dumps(dict(name=FLAGS.name, **summary)))


def cmd_report() -> None:
  """Rebuilds report.md and the figures of a run, or of a sweep and its finished runs, from their files."""
  from visage_jax.reports import markdown

  print(json.dumps({"written": markdown.rebuild_workdir(FLAGS.workdir)}))


def cmd_export_directions() -> None:
  """A run's directions as float32 safetensors keyed '<index>/<HF tensor name>'."""
  import shutil

  from visage_jax import rundir

  src = os.path.join(FLAGS.workdir, "directions.safetensors")
  if not FLAGS.workdir or not FLAGS.out:
    raise errors.UserError("export-directions needs --workdir=DIR and --out=FILE.safetensors.")
  if not os.path.exists(src):
    raise errors.UserError(f"{src}: not found; run `visage-jax landscape` in {FLAGS.workdir} first "
                           "(with landscape.save_directions=True).")
  with rundir.atomic(FLAGS.out) as tmp:
    shutil.copyfile(src, tmp)
  print(json.dumps({"exported": FLAGS.out, "from": src}))


def cmd_bench() -> None:
  """Times the reference method and our modes side by side; writes --out JSON. bench.kind=protocol
  (configs/bench_gpu.py): the paper's protocol on one accelerator, progress on stderr."""
  from visage_jax.runs import bench, bench_protocol

  if FLAGS.config is None or not FLAGS.out:
    raise errors.UserError("bench needs --config=configs/<name>.py and --out=FILE.json.")
  if FLAGS.config.bench.get("kind") == "protocol":
    report = bench_protocol.run(FLAGS.config, FLAGS.out, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(bench_protocol.summary(report))
    return
  report = bench.run(FLAGS.config, FLAGS.out, log=lambda m: logging.info("%s", m))
  print(bench.table(report))


def cmd_finetune() -> None:
  """Fine-tunes (full or LoRA) with optax; resumable; prints the run summary as one JSON line."""
  from visage_jax.runs import finetune

  if FLAGS.config is None or not FLAGS.workdir:
    raise errors.UserError("finetune needs --config=configs/<name>.py and --workdir=DIR.")
  summary = finetune.run(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
  print(json.dumps(summary))


def cmd_experiments() -> None:
  """The paper's findings at small scale (configs/experiments/); --out writes EXPERIMENTS.md."""
  from visage_jax.experiments import findings

  if FLAGS.config is None or not FLAGS.workdir:
    raise errors.UserError("experiments needs --config=configs/experiments/<name>.py and --workdir=DIR "
                         "(--out=EXPERIMENTS.md to write the report).")
  FLAGS.config.unlock()
  FLAGS.config.progress = FLAGS.progress
  results = findings.run(FLAGS.config, FLAGS.workdir, FLAGS.out)
  print(json.dumps({n: dict(checks=r["checks"]) for n, r in results.items()}))


def cmd_sweep() -> None:
  """Runs or resumes every landscape of a sweep; prints sweep.md; exit 1 if a run failed."""
  from visage_jax.runs import sweep

  if FLAGS.config is None or not FLAGS.workdir:
    raise errors.UserError("sweep needs --config=configs/<sweep>.py and --workdir=DIR.")
  rows = sweep.run(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite, progress=FLAGS.progress)
  print(sweep.summary_markdown(rows, FLAGS.workdir), end="")
  failed = [r["run"] for r in rows if r["status"] == "failed"]
  if failed:
    sys.stderr.write(f"{len(failed)} of {len(rows)} runs failed ({', '.join(failed)}); "
                     f"errors in {FLAGS.workdir}/sweep.md\n")
    sys.exit(1)


def cmd_compare(runs: list[str]) -> None:
  """VISAGE of run A minus run B with a bootstrap interval and p-value; --out writes the JSON."""
  from visage_jax import rundir
  from visage_jax.analysis import compare

  if len(runs) != 2:
    raise errors.UserError(f"compare needs two run directories, RUN_A RUN_B; got {len(runs)}: {runs}.")
  report = compare.compare(runs[0], runs[1], resamples=FLAGS.resamples, seed=FLAGS.seed, paired=FLAGS.paired)
  if FLAGS.out:
    rundir.write_atomic(FLAGS.out, json.dumps(report, indent=1))
  print(compare.table(report), end="")


def cmd_cosine(sources: list[str]) -> None:
  """The cosine matrix of the directions of runs (workdirs) or directions.safetensors files."""
  from visage_jax.directions import cosine

  if not sources:
    raise errors.UserError("cosine needs at least one run workdir or directions.safetensors file: A [B ...].")
  labels, cos = cosine.cosine_matrix(sources)
  if FLAGS.out:
    from visage_jax import rundir
    rundir.write_atomic(FLAGS.out, json.dumps(dict(labels=labels, cosine=[
        [None if v != v else float(v) for v in row] for row in cos]), indent=1))
  print(cosine.table(labels, cos), end="")


def cmd_walls(runs: list[str]) -> None:
  """walls.png and walls.md in --out: a census's safe fraction per radius, other 1D runs' walls."""
  from visage_jax.reports import walls

  print(json.dumps({"written": walls.write(runs, FLAGS.out)}))


def cmd_classify() -> None:
  """One JSON line per row of --input: {"index", "refusal", "judge", ...what the judge matched}."""
  from visage_jax import prompts, rundir
  from visage_jax.measures import refusal_judge

  name = FLAGS.judge or refusal_judge.DEFAULT_JUDGE
  judge = refusal_judge.judge(name)
  if not FLAGS.input or not FLAGS.out:
    raise errors.UserError("classify needs --input=FILE (.csv or .jsonl) and --out=FILE.jsonl.")
  columns = (FLAGS.column,) + ((FLAGS.prompt_column,) if FLAGS.prompt_column else ())
  rows = prompts.read_table(FLAGS.input, columns)
  verdicts = []
  for i, row in enumerate(rows):
    v = judge(row[FLAGS.column])
    verdicts.append(dict(index=i, refusal=v.pop("refusal"), judge=name, **v))
  rundir.write_atomic(FLAGS.out, "".join(json.dumps(v) + "\n" for v in verdicts))
  print(json.dumps({"judge": name, "rows": len(rows), "refusals": sum(v["refusal"] for v in verdicts),
                    "out": FLAGS.out}))


def _plan_models(c, dtype: str) -> list[tuple[str, object]]:
  """--model (a known name or a checkpoint), else the config's model, else every known model."""
  import os

  from visage_jax import planner
  from visage_jax.checkpoints import hub, loader

  if FLAGS.model:
    if FLAGS.model in planner.MODELS:
      return [(planner.MODELS[FLAGS.model][0], planner.known_model(FLAGS.model, dtype))]
    return [(FLAGS.model, loader.load_config(loader.resolve(FLAGS.model, weights=False), dtype))]
  if c is None:
    return [(label, planner.known_model(name, dtype)) for name, (label, _) in planner.MODELS.items()]
  config_name = os.path.basename(config_flags.get_config_filename(FLAGS["config"]))
  known = [(label, name) for name, (label, _) in planner.MODELS.items()
           if config_name.startswith(name)]  # configs/llama2_7b_chat.py -> llama2_7b
  path = c.model.path
  if path and not (known and hub.looks_like_hub_id(path) and not os.path.exists(path)):
    return [(path, loader.load_config(loader.resolve(path, weights=False), dtype))]
  if known:  # a paper config's hub id: its known architecture, no hub needed to plan
    return [(known[0][0], planner.known_model(known[0][1], dtype))]
  path = loader.default_model_path()
  return [(os.path.basename(path), loader.load_config(path, dtype))]


def cmd_plan() -> None:
  """Bytes per device and the batch that fits, per model and accelerator: size a pod first."""
  from visage_jax import planner

  c = FLAGS.config
  if c is not None and "base" in c:  # a sweep config: plan its base landscape
    c = c.base
  dtype = FLAGS.dtype if FLAGS["dtype"].present else (c.model.dtype if c is not None else "bfloat16")
  new = FLAGS.max_new_tokens if FLAGS["max_new_tokens"].present else (
      c.decode.max_new_tokens if c is not None else 512)
  try:
    mesh = tuple(int(s) for s in FLAGS.mesh.split(",")) if FLAGS.mesh else (
        tuple(c.mesh.shape) if c is not None else (1, 1))
  except ValueError:
    raise errors.UserError(f"--mesh={FLAGS.mesh!r}: expected data,model, e.g. 1,8.") from None
  if -1 in mesh:
    raise errors.UserError(f"mesh.shape {mesh} depends on the devices at run time; "
                         "give the pod's shape with --mesh=data,model.")
  ls = c.landscape if c is not None else None
  mode = c.engine.mode if c is not None and c.engine.mode in planner.MODES else "fused"
  kw = dict(prompt_len=FLAGS.prompt_len, max_new_tokens=new, mode=mode,
            n_directions=ls.num_directions if ls else 1,
            n_components=2 if ls and ls.vis_type.startswith("2D") else 1)
  names = FLAGS.accelerator.split(",") if FLAGS.accelerator else list(planner.ACCELERATORS)
  accels = [planner.accelerator(n.strip()) for n in names]
  rows = []
  for label, cfg in _plan_models(c, dtype):
    for acc in accels:
      r = planner.plan(cfg, acc.memory_bytes, mesh, **kw)
      r.update(model=label, accelerator=acc.name,
               min_model=planner.min_model_shards(cfg, acc.memory_bytes, **kw))
      rows.append(r)
  print(f"{dtype}, {mode}, {kw['n_directions']} direction(s) x {kw['n_components']} component(s), "
        f"prompt {kw['prompt_len']} + {new} new tokens; slots share {planner.HEADROOM:.0%} of the "
        f"memory left after params and directions (at most {planner.MAX_SLOTS}); "
        "batch = slots/device x data")
  print(planner.table(rows))
  if not FLAGS.mesh and not FLAGS.accelerator:
    _plan_pods(c, dtype, {k: v for k, v in kw.items() if k != "mode"})


def _plan_pods(c, dtype: str, kw: dict) -> None:
  """Every pod of pods.PODS on its fastest mesh, for the config's landscape or the paper's 1D one."""
  from visage_jax import pods
  from visage_jax.directions import grid

  protocol = dict(n_points=pods.PAPER_1D["n_points"], n_prompts=pods.PAPER_1D["n_prompts"])
  if c is not None:
    xs, ys = grid.grid_coords(c.landscape.vis_type, c.landscape.steps, c.landscape.multiplier,
                              c.landscape.get("extra_steps", 0))
    protocol = dict(n_points=len(grid.grid_points(xs, ys)), n_prompts=c.prompts.limit)
  print("\n" + pods.pods_text(_plan_models(c, dtype), protocol, **kw))


COMMANDS = {"generate": cmd_generate, "convert": cmd_convert, "landscape": cmd_landscape,
            "trajectory": cmd_trajectory,
            "judge": cmd_judge, "report": cmd_report,
            "export-directions": cmd_export_directions, "bench": cmd_bench, "finetune": cmd_finetune,
            "experiments": cmd_experiments, "sweep": cmd_sweep, "plan": cmd_plan, "compare": cmd_compare,
            "cosine": cmd_cosine, "walls": cmd_walls, "classify": cmd_classify}


# Commands that take positional arguments (the rest of argv after the flags).
POSITIONAL_COMMANDS = ("compare", "cosine", "walls")


# Commands that join a multi-process run when their config's `distributed` section asks.
DISTRIBUTED_COMMANDS = ("landscape", "trajectory", "sweep", "bench", "finetune", "experiments")


# Errors of the user's files and paths, besides errors.UserError: reported in one line too.
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def fail(message: str) -> None:
  """One line on stderr, exit status 2: how every user error ends a command."""
  sys.stderr.write(f"visage-jax: error: {' '.join(str(message).split())}\n")
  sys.exit(2)


def _debug(argv) -> bool:
  return os.environ.get("VISAGE_JAX_DEBUG", "") not in ("", "0") or any(
      a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in argv)


def _last_line(text: str) -> str:
  """The exception line at the end of a message that embeds a traceback."""
  lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
  return lines[-1] if lines else ""


def _flag_error(e: Exception, argv) -> str:
  """absl/ml_collections parse failures, rephrased to name the flag or config field."""
  if isinstance(e, (AttributeError, KeyError)):  # --config.<field> that the config lacks
    chain, text = e, str(e)
    while chain is not None:  # ml_collections wraps its KeyError("'name'\nDid you mean ...")
      if isinstance(chain, KeyError) and chain.args and isinstance(chain.args[0], str):
        text = chain.args[0] if "Did you mean" in chain.args[0] or text == str(e) else text
      chain = chain.__context__
    name = text.split("\n")[0].strip("'\"")
    hint = next((l for l in str(text).splitlines() if l.startswith("Did you mean")), "")
    given = [a.split("=")[0] for a in argv if a.startswith("--config.")
             and name in a.split("=")[0].split(".")]
    field = given[0][2:] if given else name
    return f"{field}: not a field of the config{' (' + hint.rstrip('?') + '?)' if hint else ''}."
  message = str(e)
  if "Traceback" in message:  # config_flags embeds the config file's own traceback
    error = _last_line(message)
    message = f"{message.split(': Error whilst')[0]}: {error.split(': ', 1)[-1]}"
  return message


def _parse_flags(argv):
  """absl's parser, with a bad or misspelled flag or config field as a one-line user error."""
  try:
    rest = FLAGS(argv)
    if any(a.startswith("--config=") for a in argv):
      FLAGS.config.keys  # noqa: B018  a config file that failed to load raises on attribute access
    return rest
  except (flags.Error, AttributeError, KeyError) as e:
    if _debug(argv):
      raise
    fail(_flag_error(e, argv))
  except OSError as e:  # the config file itself could not be loaded
    if _debug(argv):
      raise
    cause = e.__cause__ or e
    fail(f"--config={FLAGS['config'].config_filename}: cannot load it ({_last_line(cause)}).")


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    names = ", ".join(COMMANDS)
    sys.stderr.write(f"usage: visage-jax <command> [--flags]\ncommands: {names}\n")
    sys.exit(2)
  command = COMMANDS[argv[1]]

  def run(rest):
    if not FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # stderr holds progress bars, errors and summaries
    try:
      if argv[1] in DISTRIBUTED_COMMANDS and FLAGS.config is not None:
        from visage_jax import distributed
        distributed.initialize(FLAGS.config.get("distributed"))  # before any JAX computation
      command(rest[1:]) if argv[1] in POSITIONAL_COMMANDS else command()
    except (errors.UserError, *_USER_OS_ERRORS) as e:
      if FLAGS.debug or _debug(argv):
        raise
      fail(str(e) if isinstance(e, errors.UserError) or not e.filename
           else f"{e.filename}: {e.strerror or e}")

  app.run(run, argv=[f"{argv[0]} {argv[1]}"] + argv[2:], flags_parser=_parse_flags)


if __name__ == "__main__":
  main()
