"""Run in a subprocess with 8 virtual CPU devices (XLA_FLAGS set before jax is imported).

  python tests/multidevice_main.py MODEL_DIR PROMPTS OUT_DIR
writes OUT_DIR/summary.json: per mesh shape, the landscape's ASR, tokens and direction checksums.
"""

import hashlib
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
from visage_jax import sharding
from visage_jax.checkpoints import hf_tensors, loader
from visage_jax.directions import vectors
from visage_jax.runs import landscape


def main(model_dir, prompts_path, out_dir):
  assert jax.device_count() == 8, jax.devices()
  summary = {}
  cfg, params = loader.load_params(model_dir)
  runs = [((1, 1), "continuous"), ((8, 1), "continuous"), ((4, 2), "continuous"), ((2, 4), "fused"),
          ((4, 2), "materialized")]
  for shape, mode in runs:
    name = f"{shape[0]}x{shape[1]}-{mode}"
    mesh = sharding.make_mesh(shape)
    d = vectors.random_direction(jax.random.key(11), sharding.shard_params(params, mesh), cfg)
    d_host = hf_tensors.to_hf_tensors(d, cfg)
    c = landscape.default_config()
    c.model.path = model_dir
    c.prompts.update(path=prompts_path, limit=6)
    c.landscape.update(steps=2, multiplier=2.0, num_directions=2)
    c.decode.max_new_tokens = 8
    c.engine.max_batch = 8
    c.mesh.shape = shape
    c.engine.mode = mode
    w = os.path.join(out_dir, name)
    result = landscape.run(c, w, progress=False).to_json()
    with open(os.path.join(w, "generations.jsonl")) as f:
      gens = sorted((json.loads(l) for l in f), key=lambda l: (l["direction"], l["step"]))
    summary[name] = dict(asr=result["asr"], visage=result["visage"],
                         generations=[[o["generation"] for o in l["outputs"]] for l in gens],
                         direction_bytes={k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in d_host.items()},
                         mesh=result["mesh"]["shape"])
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f)


if __name__ == "__main__":
  main(*sys.argv[1:4])
