"""Retrieval-augmented generation with our own encoder (configs/bert_base.py:tiny trained a few steps, the
tests' sentencepiece tokenizer): embeddings pool the real tokens as documented, the device search is exact,
an indexed folder's passages keep their places, and generate and the server put the expected passages into
the prompt and list them. The real all-MiniLM-L6-v2 is in test_retrieval_minilm.py."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import recipe_config
from llm_jax import cli, sharding
from llm_jax.infer import inference
from llm_jax.retrieval import context, embeddings, index as index_lib
from random_run import write_workdir

DOCS = {
    'volcano.txt': 'Volcanoes erupt when magma rises.\n',
    'bread.txt': 'Bake bread from flour, water and yeast.\n',
    'orbit.txt': 'A satellite orbits as gravity pulls it.\n',
    'chess.txt': 'The chess knight jumps in an L shape.\n',
}
LONG = ''.join(f'Line {i}: high tide at {i % 12 + 1}.\n' for i in range(15))


@pytest.fixture(scope='module')
def encoder(tmp_path_factory, tokenizer_path, small_corpus):
  """configs/bert_base.py:tiny trained for two steps on the small corpus."""
  from llm_jax.train import loop
  workdir = str(tmp_path_factory.mktemp('encoder') / 'run')
  loop.train(recipe_config('bert_base', ('data.tokenizer', tokenizer_path), ('data.source', small_corpus),
                           ('data.heldout_percent', '10'), ('train.steps', '2'), ('eval.every', '0')), workdir)
  return workdir


@pytest.fixture(scope='module')
def docs(tmp_path_factory):
  root = tmp_path_factory.mktemp('docs')
  for name, text in DOCS.items():
    (root / name).write_text(text)
  (root / 'tides.txt').write_text(LONG)
  return root


@pytest.fixture(scope='module')
def built_index(encoder, docs, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('indexes') / 'idx')
  assert cli.main(['index', f'--embedder={encoder}', f'--data={docs}/*.txt', f'--output={out}',
                   '--passage_tokens=48', '--overlap=12']) == 0
  return out


@pytest.fixture(scope='module')
def decoder(tmp_path_factory, tokenizer_path):
  return write_workdir(str(tmp_path_factory.mktemp('decoder') / 'run'), tokenizer_path, ('data.seq_len', '256'))


def _hidden(run, ids):
  x = run.model.apply({'params': run.params}, np.asarray([ids], np.int32), np.arange(len(ids))[None],
                      np.ones((1, len(ids)), np.int32), hidden_only=True)
  return np.asarray(x[0], np.float32)


def test_embeddings_are_normalised_means_of_the_real_tokens(encoder, tmp_path):
  run = inference.load_run(encoder)
  texts = ['short text', 'a much longer text that lands in a larger padded length than the first one does ' * 2]
  got = run.embed(texts)
  assert got.shape == (2, run.cfg.model.embed_dim) and got.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  e = embeddings.embedder(run)
  ids = e.ids(texts[0])
  assert ids[0] == run.tokenizer.bos_id and ids[-1] == run.tokenizer.eos_id  # as the encoder was trained
  want = _hidden(run, ids).mean(axis=0)
  np.testing.assert_allclose(got[0], want / np.linalg.norm(want), atol=1e-5)
  np.testing.assert_allclose(run.embed([texts[0]])[0], got[0], atol=1e-5)  # padding and batch change nothing
  assert np.abs(got[0] - got[1]).max() > 1e-3

  # A checkpoint whose sentence-transformers files ask for the CLS vector, unnormalised.
  cls_dir = str(tmp_path / 'cls')
  shutil.copytree(encoder, cls_dir)
  with open(os.path.join(cls_dir, 'modules.json'), 'w') as f:
    json.dump([{'idx': 0, 'name': '0', 'path': '', 'type': 'sentence_transformers.models.Transformer'},
               {'idx': 1, 'name': '1', 'path': '1_Pooling', 'type': 'sentence_transformers.models.Pooling'}], f)
  os.makedirs(os.path.join(cls_dir, '1_Pooling'))
  with open(os.path.join(cls_dir, '1_Pooling', 'config.json'), 'w') as f:
    json.dump({'word_embedding_dimension': 64, 'pooling_mode_cls_token': True, 'pooling_mode_mean_tokens': False}, f)
  with open(os.path.join(cls_dir, 'sentence_bert_config.json'), 'w') as f:
    json.dump({'max_seq_length': 8}, f)
  cls_run = inference.load_run(cls_dir)
  e = embeddings.embedder(cls_run)
  assert e.pooling.modes == ('cls',) and not e.pooling.normalize and e.pooling.max_len == 8
  assert len(e.ids(texts[1])) == 8  # cut at max_seq_length, EOS kept
  np.testing.assert_allclose(cls_run.embed(texts[1:])[0], _hidden(cls_run, e.ids(texts[1]))[0], atol=1e-5)


def test_embed_command_writes_the_vectors(encoder, tmp_path):
  out = str(tmp_path / 'e.safetensors')
  assert cli.main(['embed', f'--workdir={encoder}', '--text=volcanoes erupt', '--text=bread rises', f'--output={out}',
                   '--batch_size=1']) == 0
  from safetensors.numpy import load_file
  got = load_file(out)['embeddings']
  np.testing.assert_allclose(got, inference.load_run(encoder).embed(['volcanoes erupt', 'bread rises']), atol=1e-5)


def test_search_on_the_mesh_is_exact():
  from conftest import tiny_config
  mesh = sharding.make_mesh(tiny_config().mesh)
  assert mesh.size == 8
  rng = np.random.default_rng(0)
  vectors = rng.normal(size=(1003, 16)).astype(np.float32)  # not a multiple of the devices: padded rows lose
  queries = rng.normal(size=(3, 16)).astype(np.float32)
  searcher = index_lib.Searcher(vectors, mesh)
  scores, ids = searcher.search(queries, 7)
  want = np.argsort(-(queries @ vectors.T), axis=1)[:, :7]
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, want, axis=1), rtol=1e-5)
  scores, ids = index_lib.Searcher(vectors[:3], mesh).search(queries[:1], 10)  # k past the passages: all of them
  assert sorted(ids[0].tolist()) == [0, 1, 2]


def test_an_indexed_folder_keeps_sources_and_places(built_index, docs):
  idx = index_lib.load(built_index)
  by_source = {}
  for p in idx.passages:
    by_source.setdefault(os.path.basename(p.source), []).append(p)
  assert set(by_source) == set(DOCS) | {'tides.txt'}
  for name, text in DOCS.items():
    (p,) = by_source[name]  # short documents are one passage each
    assert p.text in (text, text.strip()) and (p.line, p.end_line) == (1, 1)
  tides = by_source['tides.txt']
  assert len(tides) > 3
  for a, b in zip(tides, tides[1:]):
    assert a.start < b.start < a.end  # neighbours overlap
  for a in tides:
    assert LONG[a.start:a.end] == a.text
    assert (a.line, a.end_line) == (LONG.count('\n', 0, a.start) + 1, LONG.count('\n', 0, a.end - 1) + 1)
  assert tides[0].start == 0 and tides[-1].end >= len(LONG) - 1  # the whole document is covered
  np.testing.assert_allclose(np.linalg.norm(idx.vectors, axis=1), 1.0, atol=1e-5)


def test_generate_with_retrieve_puts_the_nearest_passage_first(built_index, decoder, docs, capsys):
  question = DOCS['orbit.txt'].strip()
  capsys.readouterr()
  assert cli.main(['generate', f'--workdir={decoder}', f'--prompt={question}', f'--retrieve={built_index}',
                   '--retrieve_k=2', '--max_new_tokens=3', '--jsonl']) == 0
  (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert record['prompt'] == question
  first = record['passages'][0]
  assert os.path.basename(first['source']) == 'orbit.txt' and first['score'] > 0.999 and first['rank'] == 1
  assert len(record['passages']) == 2
  run = inference.load_run(decoder)
  assert record['prompt_tokens'] > len(run.tokenizer.encode(question)) + 10  # the passages went in


def test_append_adds_new_documents_once(encoder, built_index, tmp_path):
  idx = str(tmp_path / 'idx')
  shutil.copytree(built_index, idx)
  more = tmp_path / 'more'
  more.mkdir()
  (more / 'rain.txt').write_text('Rain falls from clouds.\n')
  before = len(index_lib.load(idx))
  for _ in range(2):
    assert cli.main(['index', f'--embedder={encoder}', f'--data={more}/*.txt', f'--output={idx}', '--append']) == 0
    assert len(index_lib.load(idx)) == before + 1
  assert sorted(os.listdir(idx)) == ['index.json', 'passages.3.jsonl', 'vectors.3.safetensors']  # old ones gone


def test_choose_trims_passages_to_the_budget():
  from llm_jax.retrieval.passages import Passage
  hits = [(0.9, Passage('a.txt', 0, 40, 1, 2, 'alpha ' * 20)), (0.8, Passage('b.txt', 0, 40, 3, 3, 'beta ' * 20))]
  count = len  # one token per character
  text, used = context.choose(hits, 'Q?', count, 10_000)
  assert [u['source'] for u in used] == ['a.txt', 'b.txt'] and text.endswith('\nQ?') and text.startswith('Context:\n')
  assert '[1] a.txt, lines 1-2\n' in text and '[2] b.txt, line 3\n' in text
  budget = len(context.render([(hits[0][1], hits[0][1].text)], 'Q?')) + 60
  text, used = context.choose(hits, 'Q?', count, budget)
  assert len(text) <= budget and [u['truncated'] for u in used] == [False, True]
  assert hits[1][1].text.startswith(used[1]['text']) and used[1]['text']
  assert context.choose(hits, 'Q?', count, 30) == ('Q?', [])  # not even the first passage's quarter fits
  assert context.choose(hits, 'Q' * 50, count, 30) == ('Q' * 50, [])  # the prompt alone is too long


def test_server_lists_the_passages_it_used(built_index, decoder):
  import asyncio
  from llm_jax.serve import service
  retriever = context.Retriever(built_index, k=1)
  app = service.App(inference.load_run(decoder), 'm', max_batch=2, retriever=retriever)

  def complete(body, chat):
    return asyncio.run(app.answer(*app.prepare(body, chat)))

  try:
    answer = complete({'prompt': DOCS['chess.txt'], 'max_tokens': 2}, chat=False)
    (used,) = answer['choices'][0]['passages']
    assert os.path.basename(used['source']) == 'chess.txt'
    assert answer['usage']['prompt_tokens'] > 40
    answer = complete({'messages': [{'role': 'user', 'content': 'hello'},
                                    {'role': 'assistant', 'content': 'hi'},
                                    {'role': 'user', 'content': DOCS['bread.txt']}], 'max_tokens': 2}, chat=True)
    assert os.path.basename(answer['choices'][0]['passages'][0]['source']) == 'bread.txt'
  finally:
    app.close()


def test_chat_with_retrieve_names_the_sources(built_index, tokenizer_path, tmp_path, monkeypatch, capsys):
  import io
  sft = write_workdir(str(tmp_path / 'sft'), tokenizer_path, ('data.objective', 'sft'), ('model.vocab_size', '516'),
                      ('data.seq_len', '256'))
  monkeypatch.setattr('sys.stdin', io.StringIO(DOCS['volcano.txt'] + DOCS['bread.txt']))
  capsys.readouterr()
  assert cli.main(['chat', f'--workdir={sft}', f'--retrieve={built_index}', '--retrieve_k=1',
                   '--max_new_tokens=2']) == 0
  out = capsys.readouterr()
  lines = out.err.splitlines()
  assert len(lines) == 2 and all(line.startswith('llm-jax: sources: [1] ') for line in lines), out.err
  assert 'volcano.txt' in lines[0] and 'bread.txt' in lines[1]
  assert len(out.out.splitlines()) == 2
