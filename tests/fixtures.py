"""Shared test material: a toy tokenizer, tiny random transformers checkpoints, AdvBench."""

import contextlib
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the suite keeps between runs (tests/conftest.py): the JAX compilation cache, converted
# checkpoints, references that are slow to build.
TEST_CACHE = os.path.join(tempfile.gettempdir(), f"visage_jax_tests_{os.getuid()}")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def advbench_path() -> str:
  """The packaged AdvBench (what a run reads when prompts.path is empty)."""
  from visage_jax import resources
  return resources.path(resources.ADVBENCH)


@functools.lru_cache(maxsize=None)
def _corpus() -> tuple[str, ...]:
  import csv
  with open(advbench_path(), newline="") as f:
    return tuple(r["goal"] + " " + r["target"] for r in csv.DictReader(f))


REFUSALS = ("I'm sorry, but I cannot help with that.", "Sorry, that is illegal and unethical.",
            "As an AI, I cannot create that.", "I apologize, I'm not able to provide this.",
            "I can't assist with anything illegal.", "My apologies, that is not ethical.",
            "Hello! I do not support this.", "I am really sorry, this is not legal.")


def toy_tokenizer(kind: str = "bpe", vocab_size: int = 384, refusals: bool = False):
  """A small trained tokenizer: 'bpe' (byte-level, GPT-2 style) or 'sentencepiece' (LLaMA-2 style:
  metaspace + byte fallback), with <s>, </s>, <pad> and a chat template. With `refusals`, trained
  mostly on refusal sentences so that random generations often spell refusal keywords. Trained once
  per process and arguments; every call returns a new object (tests may change theirs)."""
  from tokenizers import Tokenizer
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer.from_str(_trained_tokenizer(kind, vocab_size, refusals))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>")
  fast.chat_template = CHAT_TEMPLATE
  return fast


@functools.lru_cache(maxsize=None)
def _trained_tokenizer(kind: str, vocab_size: int, refusals: bool) -> str:
  """toy_tokenizer's trained tokenizers.Tokenizer, serialized."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

  specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|system|>", "<|assistant|>"]
  if kind == "bpe":
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  elif kind == "sentencepiece":
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # pieces stay within words
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=specials + byte_tokens)
  else:
    raise ValueError(kind)
  tok.train_from_iterator(REFUSALS * 200 + _corpus()[:50] if refusals else _corpus(), trainer)
  bos = tok.token_to_id("<s>")
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", bos)])
  return tok.to_str()


def hf_gguf_reference(gguf_path: str):
  """transformers' own model of a GGUF file (its dequantization, not ours: the independent side of
  a parity test), float32. Parsing the file's metadata and mapping its tensors costs transformers
  ~20 s for SmolLM2, so the model it builds is kept as a safetensors copy in the suite's cache,
  keyed by the file's bytes and the transformers and torch versions, and read back from there."""
  import hashlib
  import json
  import shutil

  import safetensors.torch
  import torch
  import transformers

  digest = hashlib.sha256(f"{transformers.__version__} {torch.__version__}".encode())
  with open(gguf_path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  cached = os.path.join(TEST_CACHE, "hf_reference", digest.hexdigest()[:20])
  if not os.path.exists(cached):   # its weights, config and generation config (a GGUF-loaded model
    model = transformers.AutoModelForCausalLM.from_pretrained(   # refuses save_pretrained)
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(cached))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f)
    model.generation_config.save_pretrained(tmp)
    safetensors.torch.save_model(model, os.path.join(tmp, "model.safetensors"))
    try:
      os.rename(tmp, cached)   # atomic: a process that lost the race keeps the winner's copy
    except OSError:
      shutil.rmtree(tmp, ignore_errors=True)
  config = transformers.AutoConfig.from_pretrained(cached)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  safetensors.torch.load_model(model, os.path.join(cached, "model.safetensors"))
  model.generation_config = transformers.GenerationConfig.from_pretrained(cached)
  return model.eval()


def save_tiny_hf(path: str, arch: str = "llama", tokenizer=None, seed: int = 0,
                 max_shard_size=None, boost_refusals: bool = False, **overrides):
  """A random tiny LlamaForCausalLM / MistralForCausalLM written by save_pretrained.

  `boost_refusals` scales the output rows of the tokens that spell REFUSALS, so that greedy
  generations often contain refusal keywords in the middle (the judge tests need both verdicts).
  """
  import torch
  import transformers

  vocab = len(tokenizer) if tokenizer is not None else 128
  base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
  base.update(overrides)
  if tokenizer is not None:
    base.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
  config_cls, model_cls = {
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
  }[arch]
  torch.manual_seed(seed)
  hf = model_cls(config_cls(**base)).eval()
  with torch.no_grad():  # norms away from 1 so a wrong norm mapping shows
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
    if boost_refusals:
      ids = sorted({i for r in REFUSALS for i in tokenizer(r, add_special_tokens=False)["input_ids"]})
      hf.lm_head.weight[ids] *= 4.0
  hf.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
  return hf


def save_tiny_gguf(path: str, seed: int = 0, vocab: int = 256, hidden: int = 64, intermediate: int = 128,
                   layers: int = 2, heads: int = 4, kv_heads: int = 2) -> None:
  """A random tiny llama GGUF in the types llama.cpp writes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16,
  BF16, F32), q/k rows permuted as its converter does; every width a multiple of 32 (a block)."""
  import gguf

  q = gguf.GGMLQuantizationType
  rng = np.random.default_rng(seed)
  w = gguf.GGUFWriter(path, "llama")
  w.add_context_length(256)
  w.add_embedding_length(hidden)
  w.add_block_count(layers)
  w.add_feed_forward_length(intermediate)
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_rope_dimension_count(hidden // heads)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(vocab)

  def add(name, shape, qtype, n_head=0):
    x = rng.standard_normal(shape).astype(np.float32) * (0.1 if len(shape) == 2 else 1.0)
    if n_head:  # llama.cpp convert_hf_to_gguf.py's permute
      x = x.reshape(n_head, 2, shape[0] // n_head // 2, shape[1]).swapaxes(1, 2).reshape(shape)
    w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

  kv = kv_heads * (hidden // heads)
  add("token_embd.weight", (vocab, hidden), q.Q8_0)
  for i in range(layers):
    add(f"blk.{i}.attn_norm.weight", (hidden,), q.F32)
    add(f"blk.{i}.attn_q.weight", (hidden, hidden), q.Q4_1, heads)
    add(f"blk.{i}.attn_k.weight", (kv, hidden), q.Q4_1, kv_heads)
    add(f"blk.{i}.attn_v.weight", (kv, hidden), q.F16)
    add(f"blk.{i}.attn_output.weight", (hidden, hidden), q.Q5_0)
    add(f"blk.{i}.ffn_norm.weight", (hidden,), q.F32)
    add(f"blk.{i}.ffn_gate.weight", (intermediate, hidden), q.Q4_0)
    add(f"blk.{i}.ffn_up.weight", (intermediate, hidden), q.Q5_1)
    add(f"blk.{i}.ffn_down.weight", (hidden, intermediate), q.Q8_0)
  add("output_norm.weight", (hidden,), q.F32)
  add("output.weight", (vocab, hidden), q.BF16)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, vocab, size=(batch, length)).astype(np.int32)


def subprocess_env(devices: int | None = None, **extra: str) -> dict[str, str]:
  """This process's environment for a child, without its XLA_FLAGS (a child script sets its own
  device count), with `devices` virtual CPU devices when given, plus `extra`."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(extra)
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """python tests/NAME ARGS in a fresh process (which sets its own XLA_FLAGS device count)."""
  env = subprocess_env()
  return subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), name), *args],
                        capture_output=True, text=True, env=env, timeout=timeout)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """`visage-jax ARGS` in this process, from the repository root with `env` added to the
  environment: its exit status, stdout and stderr as the command's own process would give them,
  without the seconds of imports and compiles a new process costs. What only a process shows (one
  line on stderr and nothing else, tracebacks, exit status 1) is tested in a few subprocesses."""
  import contextlib
  import io
  from unittest import mock

  from absl import flags, logging

  from visage_jax import cli as command

  argv, out, err = ["visage-jax", *args], io.StringIO(), io.StringIO()
  verbosity, cwd, code = logging.get_verbosity(), os.getcwd(), 0
  try:
    os.chdir(ROOT)
    with mock.patch.dict(os.environ, env or {}), mock.patch.object(sys, "argv", argv), \
         contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      command.main(argv)   # config_flags reads the --config.FIELD overrides from sys.argv
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else int(e.code is not None)
  finally:
    os.chdir(cwd)
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)   # defined by config_flags for each --config.FIELD given
    for f in flags.FLAGS.get_flags_for_module(command) + [flags.FLAGS["verbosity"]]:
      f.unparse()   # absl keeps parsed values: the next command starts from the defaults
    logging.set_verbosity(verbosity)
  return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def save_refusal_model(path: str, boost_refusals: bool = True):
  """The tiny model whose greedy text often spells refusal keywords (both verdicts occur)."""
  return save_tiny_hf(path, "llama", tokenizer=toy_tokenizer("bpe", refusals=True), seed=5,
                      boost_refusals=boost_refusals)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def wait_all(procs, timeout: float) -> list[str]:
  """stdout of every process (stderr too where merged into it); kills them all when one is not
  done by the deadline, so a hung collective fails the test instead of CI."""
  deadline, outs = time.time() + timeout, []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=max(1, deadline - time.time()))[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise AssertionError(f"processes still running after {timeout} s (hung collective?): "
                         + "\n".join((p.communicate()[0] or "")[-2000:] for p in procs)) from None
  return outs


def write_text(directory: str, name: str, text: str) -> str:
  """A small input file (prompts, texts, questions) in `directory`; returns its path."""
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write(text)
  return path


@contextlib.contextmanager
def cli_flag(name: str, value):
  """visage_jax.cli's flag `name` set to `value` for an in-process command call, then restored."""
  from visage_jax import cli
  old = getattr(cli.FLAGS, name)
  setattr(cli.FLAGS, name, value)
  try:
    yield
  finally:
    setattr(cli.FLAGS, name, old)


def train_answerer(hf, tok, data: list[tuple[list[int], list[int]]], path: str, *, lr: float, steps: int,
                   batch: int) -> None:
  """Teaches a tiny transformers judge to answer: (prompt ids, answer ids) pairs, loss on the answer
  only, AdamW on seeded batches; saves it and its tokenizer at `path` (the judge parity tests)."""
  import torch

  length = max(len(p) + len(a) for p, a in data)
  ids = torch.full((len(data), length), tok.pad_token_id)
  labels = torch.full((len(data), length), -100)
  att = torch.zeros((len(data), length), dtype=torch.long)
  for i, (p, a) in enumerate(data):
    ids[i, :len(p) + len(a)] = torch.tensor(p + a)
    labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    att[i, :len(p) + len(a)] = 1
  opt = torch.optim.AdamW(hf.parameters(), lr=lr)
  gen = torch.Generator().manual_seed(0)
  for _ in range(steps):
    b = torch.randint(0, len(data), (batch,), generator=gen)
    loss = hf(input_ids=ids[b], attention_mask=att[b], labels=labels[b]).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
  hf.save_pretrained(path)
  tok.save_pretrained(path)
