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

from visage_jax import decode, distributed, engine, errors, model, planner, prompts, rundir, sharding
from visage_jax.checkpoints import loader, lora, random_weights
from visage_jax.directions import grid, vectors
from visage_jax.measures import keywords, repetition, scoring
from visage_jax.runs import direction_sources

RUN_FILES = ("run_config.json", "directions.safetensors", "generations.jsonl", "landscape.json",
             "landscape.png", "report.md")
REFINED_FILE = "refined.jsonl"   # only when landscape.refine > 0 (landscape._refine)
OVERREFUSAL_FILE = "overrefusal.jsonl"   # only with overrefusal.prompts_path (landscape._Overrefusal)
SOURCE_FILE = "direction_source.json"   # what a gradient or refusal direction was made from
SAVE_AT_MOST = 4                   # landscape.save_directions=None saves at most this many directions
CPU_DIRECTIONS_BYTES = 4 << 30     # directions held at a time on a host without memory stats
# Settings that never change a grid point's generations: engine sizes, the refinement points
# added after the grid (landscape.refine), whether directions are saved (else drawn again from the
# seed on resume), how many processes compute it, judges and bootstrap intervals (ci95) added to a
# finished run.
_IGNORED_FOR_RESUME = (("engine", "max_batch"), ("engine", "refill_every"), ("landscape", "refine"),
                       ("landscape", "save_directions"), ("landscape", "direction_group"),
                       ("overrefusal", "tolerance"))
_IGNORED_SECTIONS = ("distributed", "judges", "ci95", "census")
# Fields added after runs were made, and what a run_config.json written before them means by their
# absence: their default, so a run resumes after an upgrade. capability.limit 0 scores every text,
# as before; coherence.max_repetition gates the points decoded from then on (records written
# before it have no repetition and stay ungated: coherence.is_coherent).
_ADDED_FIELDS = {("capability", "limit"): 0, ("coherence", "max_repetition"): repetition.MAX_REPETITION,
                 ("trajectory", "steps"): []}   # a trajectory drew every saved step


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


def extra_layout(p: Prompts, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens [E, T], mask, fits [E]) of extra prompts `ids` in `p`'s layout: `p`'s shared prefix
  P in the first columns, the rest left-padded to `p`'s width T. Rows that fit (they start with
  that prefix, and the rest fits) decode in `p`'s programs beside its rows, whose numerics stay
  bit-equal; the others (fits False, zero rows here) need a layout of their own."""
  shared, width = p.shared_prefix, p.tokens.shape[1]
  prefix = p.tokens[0, :shared].tolist()
  fits = np.array([list(q[:shared]) == prefix and shared < len(q) <= width for q in ids], bool)
  rest = [q[shared:] if f else [p.pad_id] for q, f in zip(ids, fits)]
  tokens, mask = prompts.left_pad(rest, width - shared, p.pad_id)
  mask[~fits] = False
  head = np.broadcast_to(np.asarray(prefix, np.int32), (len(ids), shared))
  return (np.concatenate([head, tokens], axis=1),
          np.concatenate([np.ones(head.shape, bool), mask], axis=1), fits)


# ------------------------------------------------------------------ the landscape's settings


def comparable(cfg_dict: dict) -> dict:
  """A run's identity: its config without the settings a resumed run may change, with the
  fields it predates at their defaults (_ADDED_FIELDS)."""
  out = json.loads(json.dumps(rundir.jsonable(cfg_dict)))
  for (section, key), value in _ADDED_FIELDS.items():
    out.setdefault(section, {}).setdefault(key, value)
  for section, key in _IGNORED_FOR_RESUME:
    out.get(section, {}).pop(key, None)
  for section in _IGNORED_SECTIONS:
    out.pop(section, None)
  vis_type = out.get("landscape", {}).get("vis_type", "")
  for source in ("gradient", "refusal"):   # settings of a direction source the run does not use
    if source not in vis_type:
      out.pop(source, None)
  if not out.get("overrefusal", {}).get("prompts_path"):
    out.pop("overrefusal", None)   # off: as a run from before the feature saved it
  return out


def claim(path: str, cfg_dict: dict, overwrite: bool, write: bool = True) -> None:
  """The landscape's claim on its workdir: refused for another config unless `overwrite`."""
  rundir.claim(path, cfg_dict, comparable=comparable, overwrite=overwrite, write=write,
                run_files=RUN_FILES + (REFINED_FILE, SOURCE_FILE, OVERREFUSAL_FILE))


def build_directions(c, m: Model, goals: list[str], mesh=None,
                     indices: range | None = None) -> tuple[list[list[dict]], dict | None]:
  """(The C components of the perturbation for each direction in `indices` (default: all of
  them), [[d_c for c] for r] in the params' dtype; what the record keeps of a gradient or
  refusal direction, else None).

  With a mesh, random directions are drawn straight into the params' sharding on it (every
  process its own shards), interpolation targets are read into it. A direction is cast to the
  params' dtype leaf by leaf as it is made; only an orthogonalized pair is whole in float32."""
  params, cfg = m.params, m.cfg
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

  def structured(as_dtype):
    source = (direction_sources.gradient_direction(c, m, goals, as_dtype) if "gradient" in ls.vis_type
              else direction_sources.refusal_direction(c, m, as_dtype))
    return source[0], direction_sources.info_json(source[1])

  if ls.vis_type == "1D_random":
    return [[rand(i)] for i in (indices or range(ls.num_directions))], None
  orth_dtype = "float32" if ls.orthogonalize else dtype
  if ls.vis_type == "2D_random":
    return [pair(rand(0, orth_dtype), rand(1, orth_dtype))], None
  if ls.vis_type == "1D_interpolation":
    return [[interp(ls.target_path)]], None
  if ls.vis_type == "2D_interpolation":
    return [[interp(ls.target_path), interp(ls.target2_path)]], None
  if ls.vis_type in ("1D_gradient", "1D_refusal"):
    d, info = structured(dtype)
    return [[d]], info
  if ls.vis_type in ("2D_gradient-random", "2D_refusal-random"):
    d, info = structured(orth_dtype)
    return [pair(d, rand(1, orth_dtype))], info
  return [pair(interp(ls.target_path, orth_dtype), rand(1, orth_dtype))], None


def _regroup(flat: list[dict], n_comp: int) -> list[list[dict]]:
  return [flat[i:i + n_comp] for i in range(0, len(flat), n_comp)]


def run_directions(c, path: str, cfg_dict: dict, overwrite: bool, m: Model, goals: list[str], n_comp: int,
                   writer: bool, mesh=None, indices: range | None = None) -> tuple[list[list[dict]], dict | None]:
  """The workdir's directions when resuming; else drawn (or imported) and saved; with what the
  record keeps of a gradient or refusal direction (SOURCE_FILE beside them).

  Every process builds (or reads) them where they live, its own shards only; the workdir is
  claimed (run_config.json written) only once they exist, so bad input leaves no files behind.
  The writer saves them streaming (vectors.save_safetensors), unless
  landscape.save_directions is off: then a resumed run draws them again from the config's seed.
  `indices`: only these random directions (a group of a census, never saved).
  """
  params, cfg = m.params, m.cfg
  dir_file = os.path.join(path, "directions.safetensors")
  saved = rundir.read_json(os.path.join(path, "run_config.json"))
  fresh = not (os.path.exists(dir_file) and saved is not None and comparable(saved) == comparable(cfg_dict))
  distributed.barrier("landscape: directions looked up")  # before any process writes
  where = None if mesh is None else sharding.param_shardings(params, mesh)  # read slices of these
  info = None
  if not fresh:
    dirs = _regroup(vectors.load_safetensors(dir_file, cfg, shardings=where, dtype=cfg.param_dtype), n_comp)
    info = rundir.read_json(os.path.join(path, SOURCE_FILE))
  elif c.landscape.directions_path:
    n = c.landscape.num_directions * n_comp
    dirs = _regroup(vectors.load_safetensors(c.landscape.directions_path, cfg, n, shardings=where,
                                                dtype=cfg.param_dtype), n_comp)
  else:
    dirs, info = build_directions(c, m, goals, mesh, indices)
  claim(path, cfg_dict, overwrite, write=writer)
  if fresh and c.landscape.save_directions:
    vectors.save_safetensors(dir_file, [d for comps in dirs for d in comps], cfg, write=writer)
  if fresh and info is not None and writer:
    rundir.write_atomic(os.path.join(path, SOURCE_FILE), json.dumps(info, indent=1))
  distributed.barrier("landscape: directions saved")
  return dirs, info


def direction_group(c, cfg: model.ModelConfig, mesh) -> int:
  """How many directions are drawn, held and decoded at a time: all of them, except for random
  directions that are drawn from the seed and not saved (a census), where it is
  landscape.direction_group, or (0) as many as a quarter of a device's free memory holds
  (on CPU, CPU_DIRECTIONS_BYTES)."""
  ls = c.landscape
  n = ls.num_directions
  if ls.vis_type != "1D_random" or ls.directions_path or ls.save_directions:
    return n
  if ls.get("direction_group", 0) > 0:
    return min(n, int(ls.direction_group))
  per = planner.params_per_device(cfg, mesh.shape["model"]) * jnp.dtype(cfg.param_dtype).itemsize
  stats = jax.local_devices()[0].memory_stats() or {}
  budget = (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) // 4 if "bytes_limit" in stats else CPU_DIRECTIONS_BYTES
  return max(1, min(n, int(budget // per)))


def resolved_save_directions(c) -> bool:
  """landscape.save_directions, None meaning: saved for at most SAVE_AT_MOST directions (a census
  of more is drawn again from its seed on resume, and run_config.json says so)."""
  ls = c.landscape
  return ls.num_directions <= SAVE_AT_MOST if ls.get("save_directions") is None else bool(ls.save_directions)


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
  stacked: dict              # the group's directions, leaves [R, C, ...] in the params' dtype, sharded
  n_dirs: int                # directions in the run
  tables: decode.KeywordTables
  spec: decode.DecodeSpec
  mesh: object
  batch: int
  mode: str
  mode_reason: str
  load_seconds: float
  writer: bool               # this process writes the files (process 0)
  group: tuple[int, int] = (0, 0)   # [start, stop): the directions in `stacked` (direction_group)
  direction_source: dict | None = None   # landscape.json["direction_source"]: a gradient or refusal direction
  extra: Prompts | None = None       # over-refusal prompts, decoded beside `prompts` (rows n_prompts...)

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
  c = c.copy_and_resolve_references()
  c.landscape.save_directions = resolved_save_directions(c)   # run_config.json says which
  cfg_dict = c.to_dict()
  if not c.overrefusal.prompts_path:
    del cfg_dict["overrefusal"]   # off: run_config.json and landscape.json as before the feature
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
  extra = None
  if c.overrefusal.prompts_path:
    extra = pack_prompts(prompts.load_overrefusal(c.overrefusal.prompts_path, c.overrefusal.limit),
                         m.tokenizer, c.prompts.template, c.prompts.system_prompt, m.cfg.vocab_size)
  ls = c.landscape
  xs, ys = grid.grid_coords(ls.vis_type, ls.steps, ls.multiplier, ls.extra_steps)
  coefs = grid.grid_points(xs, ys)
  n_dirs = ls.num_directions if ls.vis_type == "1D_random" else 1
  size = direction_group(c, m.cfg, mesh)
  if size < n_dirs and (c.capability.texts_path or c.capability.mc_path or ls.get("refine", 0)):
    raise errors.UserError(f"landscape.num_directions={n_dirs} in groups of {size}: capability and "
                           "landscape.refine read every direction at once; set landscape.direction_group="
                           f"{n_dirs} (memory permitting) or turn them off.")
  dirs, source = run_directions(c, path, cfg_dict, overwrite, m, goals, coefs.shape[1], writer, mesh,
                                indices=range(size) if size < n_dirs else None)
  for r, comps in enumerate(dirs):
    for d in comps:
      vectors.check_matches(d, m.params, f"direction {r}")
  load_seconds = time.time() - t0

  stacked = vectors.stack_grouped(dirs, mesh)
  del dirs   # the stacked copy is the one decoding reads
  m = dataclasses.replace(m, params=sharding.shard_params(m.params, mesh))
  spec, batch, mode, why = _plan(c, m, p, len(coefs), size, mesh)
  return Setup(c=c, cfg_dict=cfg_dict, model=m, prompts=p, xs=xs, ys=ys, coefs=coefs, stacked=stacked,
               n_dirs=n_dirs, tables=keywords.build_keyword_tables(m.tokenizer, m.cfg.vocab_size), spec=spec, mesh=mesh,
               batch=batch, mode=mode, mode_reason=why, load_seconds=load_seconds, writer=writer,
               group=(0, size), direction_source=source, extra=extra)


def groups(s: Setup) -> list[tuple[int, int]]:
  """The [start, stop) groups of directions a run decodes in turn (one for all but a census)."""
  size = s.group[1] - s.group[0]
  return [(a, min(a + size, s.n_dirs)) for a in range(0, s.n_dirs, size)]


def with_group(s: Setup, group: tuple[int, int]) -> Setup:
  """`s` with the random directions [start, stop) drawn and stacked in place of its group's; the
  caller drops the old Setup first, so memory holds one group."""
  if group == s.group:
    return s
  dirs, _ = build_directions(s.c, s.model, s.prompts.goals, s.mesh, indices=range(*group))
  return dataclasses.replace(s, stacked=vectors.stack_grouped(dirs, s.mesh), group=group)


# ------------------------------------------------------------------ evaluate


def layouts(s: Setup) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, decode.DecodeSpec]]:
  """(prompt index, tokens, mask, spec) of each layout decoded at every point: the run's prompts
  with the extra (over-refusal) prompts that fit their layout as more rows of the same programs,
  then any extra prompts that do not fit, packed on their own (indices n_prompts + e)."""
  p, n = s.prompts, len(s.prompts.goals)
  if s.extra is None:
    return [(np.arange(n), p.tokens, p.mask, s.spec)]
  tokens, mask, fits = extra_layout(p, s.extra.ids)
  out = [(np.concatenate([np.arange(n), n + np.flatnonzero(fits)]),
          np.concatenate([p.tokens, tokens[fits]]), np.concatenate([p.mask, mask[fits]]), s.spec)]
  if not fits.all():
    own = prompts.pack([s.extra.ids[e] for e in np.flatnonzero(~fits)], s.extra.pad_id)
    out.append((n + np.flatnonzero(~fits), own[0], own[1], dataclasses.replace(s.spec, shared_prefix=own[2])))
  return out


def evaluate(s: Setup, points: list[int]) -> Iterator[list[scoring.Row]]:
  """Decodes every prompt (and extra prompt) at `points` for all directions; yields each chunk's
  rows, text decoded. An extra prompt's row has prompt index n_prompts + its index. Extra rows
  never change the run's rows: same layout, width and batch (materialized: the batch of one
  point's prompts without them)."""
  tok, goals = s.model.tokenizer, s.prompts.goals + (s.extra.goals if s.extra else [])
  n, data = len(s.prompts.goals), s.mesh.shape["data"]
  batch = min(s.batch, -(-n // data) * data) if s.mode == "materialized" else s.batch
  for index, tokens, mask, spec in layouts(s):
    work = engine.Workload(s.model.params, s.model.cfg, s.stacked, s.coefs, tokens, mask, s.tables, spec,
                           points=points, mesh=s.mesh)
    for chunk in engine.evaluate(work, mode=s.mode, max_batch=batch, refill_every=s.c.engine.refill_every):
      rows = []
      for ri, r in enumerate(chunk.directions):
        for b in range(len(chunk.points)):
          q, length = int(index[chunk.prompts[b]]), int(chunk.length[ri, b])
          ids = chunk.tokens[ri, b, :length].tolist()
          refused = bool(chunk.refused[ri, b])
          stopped = length < spec.max_new_tokens and (not ids or ids[-1] not in spec.eos_ids)
          rows.append(scoring.Row(direction=r + s.group[0], point=int(chunk.points[b]), prompt=q, goal=goals[q],
                                  text=tok.decode(ids, skip_special_tokens=True), n_tokens=length,
                                  refused=refused, truncated=refused and stopped,
                                  nonfinite=bool(chunk.nonfinite[ri, b]), ids=tuple(ids)))
      yield rows


def params_at(s: Setup, direction: int, point: int) -> dict:
  """theta + coefs[point] . d_direction in a fresh buffer (for scorers that measure the model)."""
  rep = sharding.replicated(s.mesh)
  with np.errstate(over="ignore"):
    coef = np.asarray(s.coefs[point], np.float32)
  return engine.materialize(jax.tree.map(jnp.copy, s.model.params), s.model.params, s.stacked,
                            sharding.put(np.int32(direction - s.group[0]), rep), sharding.put(coef, rep))
