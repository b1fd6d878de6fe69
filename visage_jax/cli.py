"""`visage-jax <command> --flags`: absl flags -> plain arguments -> one library call.

Commands: generate, convert, landscape, export-directions, bench, finetune, experiments, sweep, plan.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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
                    "export-directions: the .safetensors file).")
flags.DEFINE_string("workdir", "", "Run directory (landscape, export-directions).")
flags.DEFINE_bool("overwrite", False, "landscape: discard a run with a different config in --workdir.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_string("mesh", "", "plan: data,model mesh shape, e.g. 1,8 (default: the config's mesh.shape).")
flags.DEFINE_string("accelerator", "", "plan: h100 | h200 | a100 | tpu_v4 | tpu_v5e | tpu_v5p, "
                    "comma-separated (default: all).")
flags.DEFINE_integer("prompt_len", 256, "plan: padded prompt length (a generous bound for AdvBench "
                     "goals with a long system prompt).")
config_flags.DEFINE_config_file("config", None, "An experiment config: configs/<name>.py[:arg].",
                                lock_config=True)


def _load(path: str, dtype: str):
  from visage_jax import checkpoints

  path = path or checkpoints.default_model_path()
  logging.info("loading %s", path)
  cfg, params = checkpoints.load_params(path, dtype)
  return path, cfg, params, checkpoints.load_tokenizer(path)


def cmd_generate() -> None:
  """One JSON line per prompt: {"prompt", "generation"} (greedy)."""
  from visage_jax import decode, prompts

  if not FLAGS.prompt:
    raise app.UsageError("generate needs at least one --prompt=TEXT.")
  _, cfg, params, tok = _load(FLAGS.model, FLAGS.dtype)
  if FLAGS.no_chat_template:
    ids = [tok(p)["input_ids"] for p in FLAGS.prompt]
  else:
    texts = [prompts.format_prompt(p, tok, FLAGS.template, FLAGS.system_prompt) for p in FLAGS.prompt]
    ids = prompts.tokenize_prompts(texts, tok, FLAGS.template)
  outs = decode.generate(params, cfg, ids, max_new_tokens=FLAGS.max_new_tokens,
                         eos_ids=decode.eos_ids_of(tok), pad_id=decode.pad_id_of(tok))
  for p, out in zip(FLAGS.prompt, outs):
    print(json.dumps({"prompt": p, "generation": tok.decode(out, skip_special_tokens=True)}),
          flush=True)


def cmd_convert() -> None:
  """Converts a HF directory or GGUF file once into an orbax directory that loads fast, streaming
  one params leaf at a time (peak host memory: `checkpoints.convert`)."""
  from visage_jax import checkpoints

  if not FLAGS.out:
    raise app.UsageError("convert needs --out=DIR.")
  path = FLAGS.model or checkpoints.default_model_path()
  logging.info("converting %s", path)
  checkpoints.convert(path, FLAGS.out, FLAGS.dtype, checkpoints.load_tokenizer(path))
  print(json.dumps({"converted": FLAGS.out, "source": path, "dtype": FLAGS.dtype}))


def cmd_landscape() -> None:
  """Runs or resumes a landscape; prints its summary as one JSON line."""
  from visage_jax import landscape

  if FLAGS.config is None or not FLAGS.workdir:
    raise app.UsageError("landscape needs --config=configs/<name>.py and --workdir=DIR.")
  result = landscape.run(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite,
                         progress=FLAGS.progress)
  keys = ("vis_type", "coords_x", "coords_y", "asr", "visage", "n_prompts", "complete",
          "decode_seconds", "tokens_per_second")
  print(json.dumps({k: result.get(k) for k in keys}))


def cmd_export_directions() -> None:
  """A run's directions as float32 safetensors keyed '<index>/<HF tensor name>'."""
  import os
  import shutil

  src = os.path.join(FLAGS.workdir, "directions.safetensors")
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("export-directions needs --workdir=DIR and --out=FILE.safetensors.")
  if not os.path.exists(src):
    raise app.UsageError(f"{src}: not found; run `visage-jax landscape` in {FLAGS.workdir} first.")
  tmp = FLAGS.out + ".tmp"
  shutil.copyfile(src, tmp)
  os.replace(tmp, FLAGS.out)
  print(json.dumps({"exported": FLAGS.out, "from": src}))


def cmd_bench() -> None:
  """Times the reference method and our modes side by side; writes --out JSON."""
  from visage_jax import bench

  if FLAGS.config is None or not FLAGS.out:
    raise app.UsageError("bench needs --config=configs/<name>.py and --out=FILE.json.")
  report = bench.run(FLAGS.config, FLAGS.out, log=lambda m: logging.info("%s", m))
  print(bench.table(report))


def cmd_finetune() -> None:
  """Fine-tunes (full or LoRA) with optax; resumable; prints the run summary as one JSON line."""
  from visage_jax import finetune

  if FLAGS.config is None or not FLAGS.workdir:
    raise app.UsageError("finetune needs --config=configs/<name>.py and --workdir=DIR.")
  summary = finetune.run(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
  print(json.dumps(summary))


def cmd_experiments() -> None:
  """The paper's findings at small scale (configs/experiments/); --out writes EXPERIMENTS.md."""
  from visage_jax import experiments

  if FLAGS.config is None or not FLAGS.workdir:
    raise app.UsageError("experiments needs --config=configs/experiments/<name>.py and --workdir=DIR "
                         "(--out=EXPERIMENTS.md to write the report).")
  FLAGS.config.unlock()
  FLAGS.config.progress = FLAGS.progress
  results = experiments.run(FLAGS.config, FLAGS.workdir, FLAGS.out)
  print(json.dumps({n: dict(checks=r["checks"]) for n, r in results.items()}))


def cmd_sweep() -> None:
  """Runs or resumes every landscape of a sweep; prints sweep.md; exit 1 if a run failed."""
  from visage_jax import sweep

  if FLAGS.config is None or not FLAGS.workdir:
    raise app.UsageError("sweep needs --config=configs/<sweep>.py and --workdir=DIR.")
  rows = sweep.run(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite, progress=FLAGS.progress)
  print(sweep.summary_markdown(rows, FLAGS.workdir), end="")
  failed = [r["run"] for r in rows if r["status"] == "failed"]
  if failed:
    sys.stderr.write(f"{len(failed)} of {len(rows)} runs failed ({', '.join(failed)}); "
                     f"errors in {FLAGS.workdir}/sweep.md\n")
    sys.exit(1)


def _plan_models(c, dtype: str) -> list[tuple[str, object]]:
  """--model (a known name or a checkpoint), else the config's model, else every known model."""
  import os

  from visage_jax import checkpoints, planner

  if FLAGS.model:
    if FLAGS.model in planner.MODELS:
      return [(planner.MODELS[FLAGS.model][0], planner.known_model(FLAGS.model, dtype))]
    return [(FLAGS.model, checkpoints.load_config(FLAGS.model, dtype))]
  if c is None:
    return [(label, planner.known_model(name, dtype)) for name, (label, _) in planner.MODELS.items()]
  if c.model.path:
    return [(c.model.path, checkpoints.load_config(c.model.path, dtype))]
  config_name = os.path.basename(config_flags.get_config_filename(FLAGS["config"]))
  for name, (label, _) in planner.MODELS.items():
    if config_name.startswith(name):   # configs/llama2_7b_chat.py -> llama2_7b
      return [(label, planner.known_model(name, dtype))]
  path = checkpoints.default_model_path()
  return [(os.path.basename(path), checkpoints.load_config(path, dtype))]


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
    raise app.UsageError(f"--mesh={FLAGS.mesh!r}: expected data,model, e.g. 1,8.") from None
  if -1 in mesh:
    raise app.UsageError(f"mesh.shape {mesh} depends on the devices at run time; "
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


COMMANDS = {"generate": cmd_generate, "convert": cmd_convert, "landscape": cmd_landscape,
            "export-directions": cmd_export_directions, "bench": cmd_bench, "finetune": cmd_finetune,
            "experiments": cmd_experiments, "sweep": cmd_sweep, "plan": cmd_plan}


# Commands that join a multi-process run when their config's `distributed` section asks.
DISTRIBUTED_COMMANDS = ("landscape", "sweep", "bench", "finetune")


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    names = ", ".join(COMMANDS)
    sys.stderr.write(f"usage: visage-jax <command> [--flags]\ncommands: {names}\n")
    sys.exit(2)
  command = COMMANDS[argv[1]]

  def run(_):
    if argv[1] in DISTRIBUTED_COMMANDS and FLAGS.config is not None:
      from visage_jax import distributed
      distributed.initialize(FLAGS.config.get("distributed"))  # before any JAX computation
    command()

  app.run(run, argv=[f"{argv[0]} {argv[1]}"] + argv[2:])


if __name__ == "__main__":
  main()
