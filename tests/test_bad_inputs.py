"""Every `llm-jax` command given bad input: missing, empty, wrong-type and out-of-range arguments, nonexistent
paths and garbage files. Each case must exit 2 (a user mistake) with exactly one line on stderr, no
traceback, and change nothing on disk: a sandbox holding a run, garbage files and the current directory is
snapshotted (paths, sizes, mtimes, hashes) before and after.

The table is keyed by command and checked against `llm_jax.commands.NAMES`: a new command fails
`test_every_command_has_a_sweep` until it has cases of every kind. Cases run in-process through
`llm_jax.cli.main` (stderr captured); a few that need a real process (standard input, the exit path of
the interpreter) run as subprocesses.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, TINY
from llm_jax import cli, commands
from random_run import write_encoder_workdir, write_workdir

KINDS = ('missing', 'empty', 'wrong_type', 'out_of_range', 'nonexistent', 'garbage')

# {name} is a path in the sandbox (see `sandbox` below), {tok} a good tokenizer outside it, {recipe} the
# tiny recipe, {busy_port} a port something else listens on.
CASES = {
    'train': [
        ('missing', []),
        ('empty', ['--workdir=']),
        ('wrong_type', ['--workdir={new}', '--config.train.steps=many']),
        ('wrong_type', ['--workdir={binary}']),
        ('wrong_type', ['--workdir={new}', '--nope']),
        ('out_of_range', ['--workdir={new}', '--config.train.steps=-5']),
        ('out_of_range', ['--workdir={new}', '--config.mesh.data=3']),
        ('out_of_range', ['--workdir={new}', '--config.model.vocab_size=100']),
        ('nonexistent', ['--workdir={new}', '--config={missing}/recipe.py']),
        ('nonexistent', ['--workdir={new}', '--config.train.no_such_key=1']),
        ('nonexistent', ['--workdir={new}', '--config.data.tokenizer={missing}/t.model']),
        ('nonexistent', ['--workdir={new}', '--config.data.tokenizer={tok}', '--config.data.source={missing}/*.txt']),
        # A resumed run with a typo in an override: its config.json must survive for eval and generate.
        ('nonexistent', ['--workdir={run}', '--config.data.source={missing}/*.txt']),
        ('garbage', ['--workdir={new}', '--config={garbage_py}']),
        ('garbage', ['--workdir={new}', '--config={binary}']),
        ('garbage', ['--workdir={new}', '--config.data.tokenizer={binary}']),
        ('garbage', ['--workdir={new}', '--config.data.tokenizer={tok}', '--config.data.source={binary_txt}']),
        ('garbage', ['--workdir={bad_config}']),
        ('garbage', ['--workdir={bad_checkpoint}']),
    ],
    'eval': [
        ('missing', []),
        ('empty', ['--workdir=']),
        ('empty', ['--workdir={run}', '--data=']),
        ('wrong_type', ['--workdir={run}', '--max_tokens=lots']),
        ('wrong_type', ['--workdir={binary}']),
        ('wrong_type', ['--workdir={run}', '--config.train.steps=3']),
        ('out_of_range', ['--workdir={run}', '--max_tokens=0']),
        ('out_of_range', ['--workdir={run}', '--batch_size=-1']),
        ('nonexistent', ['--workdir={missing}']),
        ('nonexistent', ['--workdir={run}', '--task={missing}.jsonl']),
        ('nonexistent', ['--workdir={run}', '--data={missing}/*.txt']),
        ('nonexistent', ['--workdir={run}', '--output={missing}/out.json']),
        ('garbage', ['--workdir={empty}']),
        ('garbage', ['--workdir={bad_config}']),
        ('garbage', ['--workdir={bad_tokenizer}']),
        ('garbage', ['--workdir={bad_checkpoint}']),
        ('garbage', ['--workdir={run}', '--task={binary}']),
        ('garbage', ['--workdir={run}', '--task={bad_jsonl}']),
    ],
    'generate': [
        ('missing', []),
        ('empty', ['--workdir=', '--prompt=hi']),
        ('empty', ['--workdir={run}', '--prompt=']),
        ('wrong_type', ['--workdir={run}', '--prompt=hi', '--max_new_tokens=x']),
        ('wrong_type', ['--workdir={run}', '--prompt=hi', '--temperature=hot']),
        ('out_of_range', ['--workdir={run}', '--prompt=hi', '--top_p=1.5']),
        ('out_of_range', ['--workdir={run}', '--prompt=hi', '--temperature=-1']),
        ('out_of_range', ['--workdir={run}', '--prompt=hi', '--num_samples=0']),
        ('out_of_range', ['--workdir={run}', '--prompt=hi', '--max_new_tokens=100000']),
        ('out_of_range', ['--workdir={run}', '--prompt=hi', '--num_beams=2', '--num_samples=3']),
        ('nonexistent', ['--workdir={missing}', '--prompt=hi']),
        ('nonexistent', ['--workdir={run}', '--prompts_file={missing}']),
        ('nonexistent', ['--workdir={run}', '--prompt=hi', '--output={missing}/out.jsonl']),
        ('garbage', ['--workdir={run}', '--prompts_file={binary}']),
        ('garbage', ['--workdir={run}', '--prompts_file={bad_jsonl}']),
        ('garbage', ['--workdir={bad_config}', '--prompt=hi']),
        ('garbage', ['--workdir={bad_tokenizer}', '--prompt=hi']),
        ('garbage', ['--workdir={bad_checkpoint}', '--prompt=hi', '--max_new_tokens=4']),
        ('out_of_range', ['--workdir={run}', '--prompt=hi', '--retrieve={idx}', '--retrieve_k=0']),
        ('nonexistent', ['--workdir={run}', '--prompt=hi', '--retrieve={missing}']),
        ('wrong_type', ['--workdir={run}', '--prompt=hi', '--retrieve={enc}']),  # a run, not an index
        ('garbage', ['--workdir={run}', '--prompt=hi', '--retrieve={bad_index}']),
        # The index's embedder directory now holds another model: its vectors would not compare.
        ('garbage', ['--workdir={run}', '--prompt=hi', '--max_new_tokens=2', '--retrieve={idx_stale}']),
    ],
    'serve': [
        ('missing', []),
        ('empty', ['--workdir=']),
        ('wrong_type', ['--workdir={run}', '--port=http']),
        ('wrong_type', ['--workdir={run}', '--batch_wait_ms=soon']),
        ('out_of_range', ['--workdir={run}', '--port=70000']),
        ('out_of_range', ['--workdir={run}', '--max_batch=0']),
        ('out_of_range', ['--workdir={run}', '--batch_wait_ms=-1']),
        ('nonexistent', ['--workdir={missing}']),
        ('nonexistent', ['--workdir={run}', '--host=no-such-host.invalid', '--port=0']),
        ('garbage', ['--workdir={bad_config}']),
        ('garbage', ['--workdir={bad_checkpoint}']),
        ('garbage', ['--workdir={run}', '--host=127.0.0.1', '--port={busy_port}']),
        ('nonexistent', ['--workdir={run}', '--retrieve={missing}']),
        ('out_of_range', ['--workdir={run}', '--retrieve={idx}', '--retrieve_k=0']),
    ],
    'prepare': [
        ('missing', []),
        ('empty', ['--output=']),
        ('wrong_type', ['--output={new}', '--config.data.seq_len=long']),
        ('wrong_type', ['--output={new}', '--config={recipe}', '--name=3d']),
        ('out_of_range', ['--output={new}', '--config.data.seq_len=1']),
        ('out_of_range', ['--output={new}', '--name=Bad Name']),
        ('nonexistent', ['--output={new}', '--config={missing}.py']),
        ('nonexistent', ['--output={new}', '--config.data.tokenizer={tok}', '--config.data.source={missing}/*.txt']),
        ('garbage', ['--output={new}', '--config={garbage_py}']),
        ('garbage', ['--output={new}', '--config.data.tokenizer={binary}']),
        ('garbage', ['--output={new}', '--config.data.tokenizer={tok}', '--config.data.source={binary_txt}']),
    ],
    'plot': [
        ('missing', []),
        ('empty', ['--workdir=']),
        ('empty', ['--workdir={metrics_run}', '--out=']),
        ('wrong_type', ['--workdir={binary}']),
        ('wrong_type', ['--workdir={metrics_run}', '--config.train.steps=1']),
        ('nonexistent', ['--workdir={missing}']),
        ('nonexistent', ['--workdir={metrics_run}', '--workdir={missing}']),
        ('nonexistent', ['--workdir={metrics_run}', '--out={missing}/loss.png']),
        ('garbage', ['--workdir={empty}']),
        ('garbage', ['--workdir={bad_metrics}']),
    ],
    'plan': [
        ('missing', ['--mesh']),
        ('missing', ['--num_processes=2']),  # multi-host flags come together
        ('empty', ['--mesh=']),
        ('empty', ['--config=']),
        ('empty', ['--device_memory=']),
        ('wrong_type', ['--devices=two']),
        ('wrong_type', ['--mesh=fsdp=two']),
        ('wrong_type', ['--config.train.steps=many']),
        ('wrong_type', ['--distributed_timeout=soon']),
        ('out_of_range', ['--devices=0']),
        ('out_of_range', ['--devices=4096']),
        ('out_of_range', ['--top=0']),
        ('out_of_range', ['--mesh=fsdp=3']),
        ('out_of_range', ['--device_memory=-1GiB']),
        ('out_of_range', ['--distributed_timeout=0']),
        ('out_of_range', ['--coordinator_address=127.0.0.1:1', '--num_processes=2', '--process_id=5']),
        ('nonexistent', ['--config={missing}.py']),
        ('nonexistent', ['--config.train.no_such_key=1']),
        ('nonexistent', ['--device_kind=z80']),
        ('nonexistent', ['--mesh=pipeline=2']),
        ('garbage', ['--config={garbage_py}']),
        ('garbage', ['--config={binary}']),
        ('garbage', ['--mesh=;;;']),
        ('garbage', ['--device_memory=lots']),
    ],
    'convert': [
        ('missing', []),
        ('missing', ['from-hf', '--output={new}']),
        ('missing', ['from-hf', '{hf}']),
        ('missing', ['to-hf', '--output={new}']),
        ('missing', ['to-hf', '--workdir={run}']),
        ('empty', ['from-hf', '', '--output={new}']),
        ('empty', ['from-hf', '{hf}', '--output=']),
        ('empty', ['to-hf', '--workdir=', '--output={new}']),
        ('empty', ['to-hf', '--workdir={run}', '--output=']),
        ('wrong_type', ['from-hf', '{binary}', '--output={new}']),
        ('wrong_type', ['from-hf', '{hf}', '--output={binary}']),
        ('wrong_type', ['from-hf', '{hf}', '--output={new}', '--config.data.seq_len=long']),
        ('wrong_type', ['to-hf', '--workdir={binary}', '--output={new}']),
        ('wrong_type', ['to-hf', '--workdir={run}', '--output={new}', '--config.model.num_layers=3']),
        ('wrong_type', ['sideways', '{hf}']),
        ('out_of_range', ['from-hf', '{hf}', '--output={new}', '--config.data.seq_len=-4']),
        ('out_of_range', ['from-hf', '{hf}', '--output={new}', '--config.mesh.data=3']),
        ('out_of_range', ['from-hf', '{hf}', '--output={run}']),  # a non-empty output is never overwritten
        ('out_of_range', ['to-hf', '--workdir={run}', '--output={hf}']),
        ('out_of_range', ['to-hf', '--workdir={run}', '--output={run}']),
        ('nonexistent', ['from-hf', '{missing}', '--output={new}']),
        # A failure leaves none of the directories it would have made.
        ('nonexistent', ['from-hf', '{hf_no_weights}', '--output={missing}/deeper/out']),
        ('nonexistent', ['to-hf', '--workdir={bad_checkpoint}', '--output={missing}/deeper/out']),
        ('nonexistent', ['from-hf', '{hf}', '--output={new}', '--config.model.no_such_key=1']),
        ('nonexistent', ['to-hf', '--workdir={missing}', '--output={new}']),
        ('garbage', ['from-hf', '{empty}', '--output={new}']),
        ('garbage', ['from-hf', '{run}', '--output={new}']),  # an llm-jax workdir is not a transformers directory
        ('garbage', ['from-hf', '{hf_bad_config}', '--output={new}']),
        ('garbage', ['from-hf', '{hf_bad_weights}', '--output={new}']),
        ('garbage', ['from-hf', '{hf_no_weights}', '--output={new}']),
        ('garbage', ['to-hf', '--workdir={empty}', '--output={new}']),
        ('garbage', ['to-hf', '--workdir={bad_config}', '--output={new}']),
        ('garbage', ['to-hf', '--workdir={bad_checkpoint}', '--output={new}']),
    ],
    'chat': [
        ('missing', []),
        ('empty', ['--workdir=']),
        ('wrong_type', ['--workdir={run}', '--temperature=hot']),
        ('wrong_type', ['--workdir={binary}']),
        ('wrong_type', ['--workdir={run}', '--config.train.steps=3']),
        ('wrong_type', ['--workdir={run}']),  # pretrained, no chat template: fine-tune it first
        ('out_of_range', ['--workdir={run}', '--max_new_tokens=0']),
        ('out_of_range', ['--workdir={run}', '--top_p=1.5']),
        ('nonexistent', ['--workdir={missing}']),
        ('garbage', ['--workdir={empty}']),
        ('garbage', ['--workdir={bad_config}']),
        ('nonexistent', ['--workdir={run}', '--retrieve={missing}']),
    ],
    'export': [
        ('missing', []),
        ('missing', ['--workdir={run}', '--merge-lora']),
        ('missing', ['--workdir={run}', '--output={new}']),  # --merge-lora is the only export there is
        ('empty', ['--workdir=', '--output={new}', '--merge-lora']),
        ('empty', ['--workdir={run}', '--output=', '--merge-lora']),
        ('wrong_type', ['--workdir={binary}', '--output={new}', '--merge-lora']),
        ('wrong_type', ['--workdir={run}', '--output={new}', '--merge-lora']),  # no adapters to merge
        ('wrong_type', ['--workdir={run}', '--output={new}', '--merge-lora', '--config.model.lora.rank=4']),
        ('out_of_range', ['--workdir={run}', '--output={run}', '--merge-lora']),  # never overwrites
        ('nonexistent', ['--workdir={missing}', '--output={new}', '--merge-lora']),
        ('nonexistent', ['--workdir={run}', '--output={missing}/deeper/out', '--merge-lora']),
        ('garbage', ['--workdir={empty}', '--output={new}', '--merge-lora']),
        ('garbage', ['--workdir={bad_config}', '--output={new}', '--merge-lora']),
    ],
    'recipes': [
        ('empty', ['']),
        ('wrong_type', ['--nope']),
        ('wrong_type', ['tiny', 'llama_1b']),
        ('wrong_type', ['tiny', '--config.train.steps=3']),
        ('nonexistent', ['nope']),
        ('nonexistent', ['{missing}/recipe.py']),
        ('garbage', ['{garbage_py}']),
        ('garbage', ['{binary}']),
        ('garbage', ['{empty}']),
    ],
    'embed': [
        ('missing', []),
        ('empty', ['--workdir=', '--text=hi']),
        ('empty', ['--workdir={enc}', '--text=']),
        ('wrong_type', ['--workdir={enc}', '--text=hi', '--batch_size=many']),
        ('wrong_type', ['--workdir={run}', '--text=hi']),  # a decoder given as the embedder
        ('wrong_type', ['--workdir={enc}', '--text=hi', '--output={new}.npy']),
        ('out_of_range', ['--workdir={enc}', '--text=hi', '--batch_size=0']),
        ('nonexistent', ['--workdir={missing}', '--text=hi']),
        ('nonexistent', ['--workdir={enc}', '--input={missing}']),
        ('nonexistent', ['--workdir={enc}', '--text=hi', '--output={missing}/e.jsonl']),
        ('garbage', ['--workdir={enc}', '--input={binary}']),
        ('garbage', ['--workdir={enc}', '--input={bad_jsonl}']),
        ('garbage', ['--workdir={bad_config}', '--text=hi']),
    ],
    'index': [
        ('missing', []),
        ('missing', ['--embedder={enc}', '--data={docs_glob}']),
        ('empty', ['--embedder=', '--data={docs_glob}', '--output={new}']),
        ('empty', ['--embedder={enc}', '--data=', '--output={new}']),
        ('wrong_type', ['--embedder={run}', '--data={docs_glob}', '--output={new}']),  # a decoder as the embedder
        ('wrong_type', ['--embedder={enc}', '--data={docs_glob}', '--output={new}', '--passage_tokens=many']),
        ('wrong_type', ['--embedder={enc}', '--data={docs_glob}', '--output={idx}']),  # an index: --append it
        ('out_of_range', ['--embedder={enc}', '--data={docs_glob}', '--output={new}', '--passage_tokens=0']),
        ('out_of_range', ['--embedder={enc}', '--data={docs_glob}', '--output={new}', '--passage_tokens=16',
                          '--overlap=16']),
        ('out_of_range', ['--embedder={enc}', '--data={docs_glob}', '--output={new}', '--passage_tokens=100000']),
        # An index built by another embedder is never extended with this one.
        ('out_of_range', ['--embedder={enc2}', '--data={docs_glob}', '--output={idx}', '--append']),
        ('nonexistent', ['--embedder={missing}', '--data={docs_glob}', '--output={new}']),
        ('nonexistent', ['--embedder={enc}', '--data={missing}/*.txt', '--output={new}']),
        ('nonexistent', ['--embedder={enc}', '--data={docs_glob}', '--output={missing}', '--append']),
        ('garbage', ['--embedder={enc}', '--data={binary_txt}', '--output={new}']),
        ('garbage', ['--embedder={enc}', '--data={docs_glob}', '--output={bad_index}', '--append']),
        ('garbage', ['--embedder={bad_config}', '--data={docs_glob}', '--output={new}']),
    ],
}
# Kinds a command has nothing to give, and why.
NOT_APPLICABLE = {
    'plot': {'out_of_range': 'plot has no numeric flags'},
    'recipes': {'missing': 'recipes needs no argument (without one it lists them all)',
                'out_of_range': 'recipes has no numeric flags'},
}
TOP_LEVEL = [[], ['nope'], ['--nope']]


def test_every_command_has_a_sweep():
  assert set(CASES) == set(commands.NAMES), 'every command in llm_jax.commands.NAMES needs sweep cases here'
  for name, cases in CASES.items():
    kinds = {kind for kind, _ in cases} | set(NOT_APPLICABLE.get(name, {}))
    assert kinds >= set(KINDS), f'{name}: no cases of kind {sorted(set(KINDS) - kinds)}'


@pytest.fixture(scope='module')
def sandbox(tmp_path_factory, tokenizer_path):
  """A run (config, tokenizer, one checkpoint), damaged copies of it, garbage files, an empty directory."""
  root = tmp_path_factory.mktemp('sandbox')
  run = write_workdir(str(root / 'run'), tokenizer_path)
  (root / 'empty').mkdir()
  (root / 'cwd').mkdir()  # the commands run here: anything written relative to it shows
  (root / 'binary.bin').write_bytes(bytes(range(256)) * 16)
  (root / 'binary_txt').mkdir()
  (root / 'binary_txt' / 'doc.txt').write_bytes(b'\x00\x01\xff' * 400)
  (root / 'garbage.py').write_text('def get_config(:\n')
  (root / 'bad.jsonl').write_text('{"prompt": "a good line"}\n{not json\n')
  shutil.copytree(run, root / 'bad_config')
  (root / 'bad_config' / 'config.json').write_text('{"model": {"num_layers": ')
  shutil.copytree(run, root / 'bad_tokenizer')
  (root / 'bad_tokenizer' / 'tokenizer.model').write_bytes(b'\x0a\xffnot a sentencepiece model')
  shutil.copytree(run, root / 'bad_checkpoint')
  for dirpath, _, names in os.walk(root / 'bad_checkpoint' / 'checkpoints'):
    for name in names:
      if name == '_METADATA':
        with open(os.path.join(dirpath, name), 'w') as f:
          f.write('{"truncated": ')
  (root / 'metrics_run').mkdir()
  (root / 'metrics_run' / 'metrics.jsonl').write_text(
      json.dumps({'step': 1, 'split': 'train', 'loss': 5.0, 'tokens_per_sec': 10.0}) + '\n')
  # A transformers directory written by `convert to-hf` from the run, and damaged copies of it.
  from llm_jax import convert
  convert.to_hf(run, str(root / 'hf'))
  shutil.copytree(root / 'hf', root / 'hf_bad_config')
  (root / 'hf_bad_config' / 'config.json').write_text('{"model_type": "llama", "hidden_size": ')
  shutil.copytree(root / 'hf', root / 'hf_bad_weights')
  weights = root / 'hf_bad_weights' / 'model.safetensors'
  weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
  shutil.copytree(root / 'hf', root / 'hf_no_weights')
  (root / 'hf_no_weights' / 'model.safetensors').unlink()
  (root / 'bad_metrics').mkdir()
  (root / 'bad_metrics' / 'metrics.jsonl').write_text('not json\nat all\n')
  # Retrieval: two encoder runs (different weights), a folder of documents, an index built by the first,
  # a copy of it whose embedder directory now holds the second model, and a damaged index.
  from llm_jax.infer import inference
  from llm_jax.retrieval import build
  write_encoder_workdir(str(root / 'enc'), tokenizer_path)
  write_encoder_workdir(str(root / 'enc2'), tokenizer_path, ('seed', '1'))
  (root / 'docs').mkdir()
  (root / 'docs' / 'a.txt').write_text('Volcanoes erupt when magma rises.\n')
  (root / 'docs' / 'b.txt').write_text('Bread rises when yeast ferments.\n')
  build.build(inference.load_run(str(root / 'enc')), str(root / 'docs' / '*.txt'), str(root / 'idx'), say=print)
  shutil.copytree(root / 'idx', root / 'idx_stale')
  meta = json.loads((root / 'idx_stale' / 'index.json').read_text())
  meta['embedder']['workdir'] = str(root / 'enc2')
  (root / 'idx_stale' / 'index.json').write_text(json.dumps(meta))
  shutil.copytree(root / 'idx', root / 'bad_index')
  (root / 'bad_index' / 'index.json').write_text('{"format": ')
  return root


@pytest.fixture(scope='module')
def busy_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    s.listen(1)
    yield s.getsockname()[1]


def _snapshot(root):
  """{relative path: (kind, size, mtime, content hash)} of everything under root, directories included."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      st = os.lstat(path)
      digest = None
      if os.path.isfile(path):
        with open(path, 'rb') as f:
          digest = hashlib.sha1(f.read()).hexdigest()
      out[os.path.relpath(path, root)] = (os.path.isdir(path), st.st_size if digest else None, st.st_mtime_ns,
                                          digest)
  return out


def _fill(argv, sandbox, tokenizer_path, busy_port):
  names = {p.name: str(p) for p in sandbox.iterdir()}
  names.update(new=str(sandbox / 'new'), missing=str(sandbox / 'missing'), tok=tokenizer_path, recipe=TINY,
               binary=str(sandbox / 'binary.bin'), garbage_py=str(sandbox / 'garbage.py'),
               bad_jsonl=str(sandbox / 'bad.jsonl'), binary_txt=str(sandbox / 'binary_txt' / '*.txt'),
               busy_port=busy_port, not_utf8='\udcff\udcfe', docs_glob=str(sandbox / 'docs' / '*.txt'))
  return [a.format(**names) for a in argv]


def _check(rc, err, before, after):
  lines = err.splitlines()
  assert rc == 2, (rc, err)  # a user mistake, not a crash (1) or a success (0)
  assert len(lines) == 1 and lines[0].startswith('llm-jax: error: ') and 'Traceback' not in err, err
  changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
  assert not changed, f'changed on disk: {sorted(changed)}'


@pytest.mark.parametrize('command,kind,argv', [(c, k, a) for c, cases in CASES.items() for k, a in cases] +
                         [('', 'top_level', a) for a in TOP_LEVEL],
                         ids=lambda x: x if isinstance(x, str) else ' '.join(x) or '(none)')
def test_bad_input_is_one_line_and_changes_nothing(command, kind, argv, sandbox, tokenizer_path, busy_port,
                                                    capsys, monkeypatch):
  argv = ([command] if command else []) + _fill(argv, sandbox, tokenizer_path, busy_port)
  monkeypatch.chdir(sandbox / 'cwd')
  before = _snapshot(sandbox)
  capsys.readouterr()
  rc = cli.main(argv)
  err = capsys.readouterr().err
  _check(rc, err, before, _snapshot(sandbox))


# A few through real processes: what the shell sees, standard input included.
SUBPROCESS_CASES = [
    (['train', '--workdir={new}', '--config={binary}'], b''),
    (['prepare', '--output='], b''),
    (['generate', '--workdir={run}', '--max_new_tokens=4'], b'\xff\xfe not UTF-8 \x80\n'),
    (['generate', '--workdir={run}', '--max_new_tokens=4'], b'\n  \n'),
    (['generate', '--workdir={run}', '--max_new_tokens=4', '--prompt={not_utf8}'], b''),
    (['eval', '--workdir={bad_checkpoint}'], b''),
]


@pytest.mark.parametrize('argv,stdin', SUBPROCESS_CASES, ids=lambda x: ' '.join(x) if isinstance(x, list) else '')
def test_bad_input_from_the_shell(argv, stdin, sandbox, tokenizer_path, busy_port):
  # Arguments that are not UTF-8 reach Python as lone surrogates; os.fsencode gives back the raw bytes.
  argv = [os.fsencode(a) for a in _fill(argv, sandbox, tokenizer_path, busy_port)]
  before = _snapshot(sandbox)
  res = subprocess.run([sys.executable, '-m', 'llm_jax.cli', *argv], cwd=sandbox / 'cwd', input=stdin,
                       capture_output=True, timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})
  _check(res.returncode, res.stderr.decode('utf-8', 'replace'), before, _snapshot(sandbox))
