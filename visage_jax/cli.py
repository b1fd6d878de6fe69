"""`visage-jax <command> --flags`: absl flags -> plain arguments -> one library call.

Commands: generate, convert, landscape, export-directions, bench, finetune.
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
  """Converts a HF directory or GGUF file once into an orbax directory that loads fast."""
  from visage_jax import checkpoints

  if not FLAGS.out:
    raise app.UsageError("convert needs --out=DIR.")
  path, cfg, params, tok = _load(FLAGS.model, FLAGS.dtype)
  checkpoints.save_converted(FLAGS.out, cfg, params, tok, source=path)
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


COMMANDS = {"generate": cmd_generate, "convert": cmd_convert, "landscape": cmd_landscape,
            "export-directions": cmd_export_directions, "bench": cmd_bench, "finetune": cmd_finetune}


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    names = ", ".join(COMMANDS)
    sys.stderr.write(f"usage: visage-jax <command> [--flags]\ncommands: {names}\n")
    sys.exit(2)
  command = COMMANDS[argv[1]]

  def run(_):
    command()

  app.run(run, argv=[f"{argv[0]} {argv[1]}"] + argv[2:])


if __name__ == "__main__":
  main()
