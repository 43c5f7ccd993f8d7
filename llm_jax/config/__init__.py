"""The config, the one source of truth of a run: its schema with defaults (schema.py), loading a recipe and
command-line overrides (load.py), validation that names the key (validate.py), and the JSON a workdir keeps
(io.py). Library code takes the slice it needs (`cfg.model`, `cfg.data`), never the whole config."""

from llm_jax.config.io import from_json_file, model_differences, to_json, write_json_atomic
from llm_jax.config.load import apply_override, check_schema, load, load_recipe, parse_value
from llm_jax.config.schema import default_config
from llm_jax.config.validate import validate

__all__ = ['apply_override', 'check_schema', 'default_config', 'from_json_file', 'load', 'load_recipe',
           'model_differences', 'parse_value', 'to_json', 'validate', 'write_json_atomic']
