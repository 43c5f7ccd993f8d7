"""A trained run loaded for inference: its config, tokenizer, model and latest params, from --workdir alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_jax import decode, sharding, workdir as workdir_lib
from llm_jax.checkpoint import open_for_reading
from llm_jax.models import build_model
from llm_jax.train.state import abstract_params


@dataclass
class Run:
  cfg: Any
  tokenizer: Any
  model: Any
  params: Any
  mesh: Any
  rules: Any
  step: int


def load_run(workdir: str) -> Run:
  cfg = workdir_lib.load_config(workdir)
  tok = workdir_lib.load_tokenizer(workdir, cfg)
  ckpt, step = open_for_reading(workdir)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh.rules)
  model = build_model(cfg.model)
  try:
    params = ckpt.restore_params(step, abstract_params(model, mesh, rules))
  finally:
    ckpt.close()
  return Run(cfg, tok, model, params, mesh, rules, step)


def generate_text(workdir: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
                  top_p: float, seed: int) -> str:
  run = load_run(workdir)
  ids = run.tokenizer.encode(prompt)
  if run.cfg.data.add_bos:
    ids = [run.tokenizer.bos_id] + ids
  sampling = decode.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                   max_new_tokens=max_new_tokens, seed=seed)
  [new_ids] = decode.generate(run.model, run.params, [ids], sampling, eos_id=run.tokenizer.eos_id)
  return run.tokenizer.decode(new_ids)
