"""The stages of a landscape run up to decoded rows: `prepare(config) -> Setup`, then `evaluate`.

prepare loads the model (+ LoRA) and tokenizer, packs the prompts, lays out the grid, builds (or,
resuming, reads back) the directions and claims the workdir, shards params and directions, and
chooses the decode spec, batch and engine mode. evaluate decodes grid points with the engine and
yields each chunk as rows of text for the scorers (scoring.py). bench, experiments, finetune and
the CLI use these stages (or `load_model`, `pack_prompts`) instead of assembling them again.
"""

import dataclasses
import json
import os
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from visage_jax import decode, distributed, engine, errors, model, prompts, rundir, sharding
from visage_jax.checkpoints import loader, lora, random_weights
from visage_jax.directions import grid, vectors
from visage_jax.measures import keywords, scoring

RUN_FILES = ("run_config.json", "directions.safetensors", "generations.jsonl", "landscape.json",
             "landscape.png", "report.md")
REFINED_FILE = "refined.jsonl"   # only when landscape.refine > 0 (landscape._refine)
# Settings that never change a grid point's generations: engine sizes, the refinement points
# added after the grid (landscape.refine), whether directions are saved (else drawn again from the
# seed on resume), how many processes compute it, judges and bootstrap intervals (ci95) added to a
# finished run.
_IGNORED_FOR_RESUME = (("engine", "max_batch"), ("engine", "refill_every"), ("landscape", "refine"),
                       ("landscape", "save_directions"))
_IGNORED_SECTIONS = ("distributed", "judges", "ci95")


# ------------------------------------------------------------------ stages any command uses


@dataclasses.dataclass(frozen=True)
class Model:
  path: str        # the checkpoint (resolved: the embedded SmolLM2 when none was given)
  local: str       # where it was read (`loader.resolve`: a hub snapshot, a GGUF file's converted copy)
  source: str      # path, "+ lora_path" when an adapter was merged
  cfg: model.ModelConfig
  params: dict
  tokenizer: object  # None for a random: model
  eos_ids: tuple[int, ...]  # `loader.eos_ids`; none for a random: model, which never ends a row


def load_model(path: str, dtype: str, lora_path: str = "", mesh=None, *, text: bool = True) -> Model:
  """The checkpoint at `path` ("" = embedded SmolLM2) with the LoRA at `lora_path` merged in;
  with a mesh, each leaf placed in its sharding there as it is read (every process its shards).
  `text=False`: the caller reads token ids only (bench), so a random: model (no tokenizer) loads."""
  path = path or loader.default_model_path()
  if text:
    random_weights.refuse_text(path)
  local = loader.resolve(path, dtype)   # the one lookup of the path (hub, GGUF cache)
  cfg, params = loader.load_params(local, dtype, shardings=mesh)
  if lora_path:
    adapter, alpha, rank = lora.load(lora_path, cfg)
    if mesh is not None:
      adapter = sharding.put(adapter, sharding.replicated(mesh))
    params = lora.merge(params, adapter, alpha, rank)
  tok = None if random_weights.is_random(path) else loader.load_tokenizer(local)
  return Model(path=path, local=local, source=f"{path} + {lora_path}" if lora_path else path, cfg=cfg,
               params=params, tokenizer=tok, eos_ids=() if tok is None else loader.eos_ids(local, tok))


@dataclasses.dataclass(frozen=True)
class Prompts:
  goals: list[str]
  ids: list[list[int]]   # chat-formatted and tokenized, unpadded
  tokens: np.ndarray     # prompts.pack of ids: [B, P + Ts]
  mask: np.ndarray       # [B, P + Ts]
  shared_prefix: int     # P
  pad_id: int


def pack_prompts(goals: list[str], tokenizer, template: str, system_prompt: str,
                 vocab_size: int = 0) -> Prompts:
  """Goals formatted with the chat template and system prompt, tokenized and packed; with no
  tokenizer (a random: model), stand-in ids of the texts' lengths below `vocab_size`, pad 0."""
  texts = [prompts.format_prompt(g, tokenizer, template, system_prompt) for g in goals]
  if tokenizer is None:
    ids, pad_id = prompts.stand_in_ids(texts, vocab_size), 0
  else:
    ids, pad_id = prompts.tokenize_prompts(texts, tokenizer, template), decode.pad_id_of(tokenizer)
  tokens, mask, shared_prefix = prompts.pack(ids, pad_id)
  return Prompts(goals=goals, ids=ids, tokens=tokens, mask=mask, shared_prefix=shared_prefix,
                 pad_id=pad_id)


# ------------------------------------------------------------------ the landscape's settings


def comparable(cfg_dict: dict) -> dict:
  """A run's identity: its config without the settings a resumed run may change."""
  out = json.loads(json.dumps(rundir.jsonable(cfg_dict)))
  for section, key in _IGNORED_FOR_RESUME:
    out.get(section, {}).pop(key, None)
  for section in _IGNORED_SECTIONS:
    out.pop(section, None)
  return out


def claim(path: str, cfg_dict: dict, overwrite: bool, write: bool = True) -> None:
  """The landscape's claim on its workdir: refused for another config unless `overwrite`."""
  rundir.claim(path, cfg_dict, comparable=comparable, overwrite=overwrite, write=write,
                run_files=RUN_FILES + (REFINED_FILE,))


def build_directions(c, params, cfg, mesh=None) -> list[list[dict]]:
  """The C components of the perturbation for each of R directions: [[d_c for c] for r], in the
  params' dtype.

  With a mesh, random directions are drawn straight into the params' sharding on it (every
  process its own shards), interpolation targets are read into it. A direction is cast to the
  params' dtype leaf by leaf as it is made; only an orthogonalized pair is whole in float32."""
  ls = c.landscape
  key = jax.random.key(ls.seed)
  blacklist = tuple(ls.blacklist)
  shardings = None if mesh is None else sharding.param_shardings(params, mesh)
  dtype = cfg.param_dtype

  def rand(i, as_dtype=dtype):
    return vectors.random_direction(jax.random.fold_in(key, i), params, cfg, norm=ls.norm,
                                       blacklist=blacklist, shardings=shardings, dtype=as_dtype)

  def interp(path, as_dtype=dtype):  # theta_B placed like theta_A: the difference is taken shard by shard
    _, other = loader.load_params(loader.resolve(path, cfg.param_dtype), cfg.param_dtype, shardings=shardings)
    vectors.check_matches(other, params, path)
    return vectors.interpolation_direction(params, other, as_dtype)

  def pair(d1, d2):  # orthogonalized in float32, as drawn
    d2 = vectors.orthogonalize(d2, d1) if ls.orthogonalize else d2
    return [vectors.cast(d1, dtype), vectors.cast(d2, dtype)]

  if ls.vis_type == "1D_random":
    return [[rand(i)] for i in range(ls.num_directions)]
  orth_dtype = "float32" if ls.orthogonalize else dtype
  if ls.vis_type == "2D_random":
    return [pair(rand(0, orth_dtype), rand(1, orth_dtype))]
  if ls.vis_type == "1D_interpolation":
    return [[interp(ls.target_path)]]
  if ls.vis_type == "2D_interpolation":
    return [[interp(ls.target_path), interp(ls.target2_path)]]
  return [pair(interp(ls.target_path, orth_dtype), rand(1, orth_dtype))]


def _regroup(flat: list[dict], n_comp: int) -> list[list[dict]]:
  return [flat[i:i + n_comp] for i in range(0, len(flat), n_comp)]


def run_directions(c, path: str, cfg_dict: dict, overwrite: bool, params, cfg, n_comp: int,
                   writer: bool, mesh=None) -> list[list[dict]]:
  """The workdir's directions when resuming; else drawn (or imported) and saved.

  Every process builds (or reads) them where they live, its own shards only; the workdir is
  claimed (run_config.json written) only once they exist, so bad input leaves no files behind.
  The writer saves them streaming (vectors.save_safetensors), unless
  landscape.save_directions is off: then a resumed run draws them again from the config's seed.
  """
  dir_file = os.path.join(path, "directions.safetensors")
  saved = rundir.read_json(os.path.join(path, "run_config.json"))
  fresh = not (os.path.exists(dir_file) and saved is not None and comparable(saved) == comparable(cfg_dict))
  distributed.barrier("landscape: directions looked up")  # before any process writes
  where = None if mesh is None else sharding.param_shardings(params, mesh)  # read slices of these
  if not fresh:
    dirs = _regroup(vectors.load_safetensors(dir_file, cfg, shardings=where, dtype=cfg.param_dtype), n_comp)
  elif c.landscape.directions_path:
    n = c.landscape.num_directions * n_comp
    dirs = _regroup(vectors.load_safetensors(c.landscape.directions_path, cfg, n, shardings=where,
                                                dtype=cfg.param_dtype), n_comp)
  else:
    dirs = build_directions(c, params, cfg, mesh)
  claim(path, cfg_dict, overwrite, write=writer)
  if fresh and c.landscape.get("save_directions", True):
    vectors.save_safetensors(dir_file, [d for comps in dirs for d in comps], cfg, write=writer)
  distributed.barrier("landscape: directions saved")
  return dirs


# ------------------------------------------------------------------ prepare


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a landscape's decoding and scoring read, built once by `prepare`."""
  c: object                  # the config
  cfg_dict: dict
  model: Model               # params sharded on the mesh
  prompts: Prompts
  xs: np.ndarray             # grid coordinates (grid.grid_coords)
  ys: np.ndarray | None
  coefs: np.ndarray          # [n_points, C]
  stacked: dict              # directions, leaves [R, C, ...] in the params' dtype, sharded
  n_dirs: int
  tables: decode.KeywordTables
  spec: decode.DecodeSpec
  mesh: object
  batch: int
  mode: str
  mode_reason: str
  load_seconds: float
  writer: bool               # this process writes the files (process 0)

  @property
  def n_points(self) -> int:
    return len(self.coefs)


def _plan(c, m: Model, p: Prompts, n_points: int, n_dirs: int, mesh) -> tuple:
  """-> (spec, batch, mode, reason): the decode settings and the engine's schedule."""
  spec = decode.DecodeSpec(max_new_tokens=c.decode.max_new_tokens, eos_ids=m.eos_ids,
                           pad_id=p.pad_id, stop_at_refusal=c.decode.stop_at_refusal,
                           shared_prefix=p.shared_prefix)
  batch = c.engine.max_batch or engine.choose_batch(
      m.cfg, n_points * len(p.goals), p.tokens.shape[1], spec, n_directions=n_dirs, mode="fused", mesh=mesh)
  mode, why = c.engine.mode, "set in the config"
  if mode == "auto":
    mode, why, fitted = engine.choose_mode(m.cfg, n_prompts=len(p.goals), n_directions=n_dirs, batch=batch,
                                           prompt_len=p.tokens.shape[1], spec=spec, mesh=mesh)
    batch = c.engine.max_batch or fitted
  return spec, batch, mode, why


def prepare(c, path: str, *, overwrite: bool = False, text: bool = True) -> Setup:
  """Everything before decoding, with the workdir `path` claimed (and its directions, resuming).

  Bad input (prompts, model, directions) fails before anything is written; the settings were
  checked by config_checks.validate. `text=False` (bench): the rows are read as token ids, never
  decoded to text, so a random: model is allowed."""
  cfg_dict = c.to_dict()
  goals = prompts.load_goals(c.prompts.path, c.prompts.limit)
  writer = distributed.is_writer()
  mesh = sharding.make_mesh(tuple(c.mesh.shape))
  claim(path, cfg_dict, overwrite, write=False)  # refuse early; write once inputs load

  t0 = time.time()
  m = load_model(c.model.path, c.model.dtype, c.model.lora_path, mesh=mesh, text=text)
  if c.landscape.directions_path and not os.path.exists(c.landscape.directions_path):
    raise errors.MissingFileError(f"landscape.directions_path {c.landscape.directions_path!r}: "
                                  "no such file (expected a safetensors file from export-directions).")
  p = pack_prompts(goals, m.tokenizer, c.prompts.template, c.prompts.system_prompt, m.cfg.vocab_size)
  ls = c.landscape
  xs, ys = grid.grid_coords(ls.vis_type, ls.steps, ls.multiplier, ls.extra_steps)
  coefs = grid.grid_points(xs, ys)
  dirs = run_directions(c, path, cfg_dict, overwrite, m.params, m.cfg, coefs.shape[1], writer, mesh)
  for r, comps in enumerate(dirs):
    for d in comps:
      vectors.check_matches(d, m.params, f"direction {r}")
  load_seconds = time.time() - t0

  stacked, n_dirs = vectors.stack_grouped(dirs, mesh), len(dirs)
  del dirs   # the stacked copy is the one decoding reads
  m = dataclasses.replace(m, params=sharding.shard_params(m.params, mesh))
  spec, batch, mode, why = _plan(c, m, p, len(coefs), n_dirs, mesh)
  return Setup(c=c, cfg_dict=cfg_dict, model=m, prompts=p, xs=xs, ys=ys, coefs=coefs, stacked=stacked,
               n_dirs=n_dirs, tables=keywords.build_keyword_tables(m.tokenizer, m.cfg.vocab_size), spec=spec, mesh=mesh,
               batch=batch, mode=mode, mode_reason=why, load_seconds=load_seconds, writer=writer)


# ------------------------------------------------------------------ evaluate


def evaluate(s: Setup, points: list[int]) -> Iterator[list[scoring.Row]]:
  """Decodes every prompt at `points` for all directions; yields each chunk's rows, text decoded."""
  spec, tok = s.spec, s.model.tokenizer
  work = engine.Workload(s.model.params, s.model.cfg, s.stacked, s.coefs, s.prompts.tokens,
                         s.prompts.mask, s.tables, spec, points=points, mesh=s.mesh)
  for chunk in engine.evaluate(work, mode=s.mode, max_batch=s.batch,
                               refill_every=s.c.engine.refill_every):
    rows = []
    for ri, r in enumerate(chunk.directions):
      for b in range(len(chunk.points)):
        q, n = int(chunk.prompts[b]), int(chunk.length[ri, b])
        ids = chunk.tokens[ri, b, :n].tolist()
        refused = bool(chunk.refused[ri, b])
        stopped = n < spec.max_new_tokens and (not ids or ids[-1] not in spec.eos_ids)
        rows.append(scoring.Row(direction=r, point=int(chunk.points[b]), prompt=q, goal=s.prompts.goals[q],
                                text=tok.decode(ids, skip_special_tokens=True), n_tokens=n,
                                refused=refused, truncated=refused and stopped,
                                nonfinite=bool(chunk.nonfinite[ri, b]), ids=tuple(ids)))
    yield rows


def params_at(s: Setup, direction: int, point: int) -> dict:
  """theta + coefs[point] . d_direction in a fresh buffer (for scorers that measure the model)."""
  rep = sharding.replicated(s.mesh)
  with np.errstate(over="ignore"):
    coef = np.asarray(s.coefs[point], np.float32)
  return engine.materialize(jax.tree.map(jnp.copy, s.model.params), s.model.params, s.stacked,
                            sharding.put(np.int32(direction), rep), sharding.put(coef, rep))
