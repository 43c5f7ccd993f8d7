"""A checkpoint's own chat template (tokenizer_config.json's `chat_template`): rendered to the same ids as
`transformers`' apply_chat_template on the same tokenizer files (a Llama-3-style and a ChatML-style template),
the SFT loss on the assistant's tokens only, and the template's refusals as skipped records / 400s."""

import json

import numpy as np
import pytest
import transformers

import hf_tokenizers
from conftest import tiny_config
from llm_jax.data import chat, objectives, tokenizer as tokenizer_lib
from llm_jax.data.chat_template import TemplateError
from llm_jax.data.files import Record, Skipped

# The template Meta ships with Llama 3 Instruct.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# ChatML as Qwen2 writes it: a default system message, and a refusal of a conversation that opens with a reply.
CHATML = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('the conversation must start with the "
          "user') }}{% endif %}{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
STYLES = {
    'llama3': (LLAMA3, ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
                        '<|eot_id|>'], {'bos_token': '<|begin_of_text|>', 'eos_token': '<|end_of_text|>'}),
    'chatml': (CHATML, ['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
               {'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>', 'bos_token': None}),
}
CONVERSATIONS = [
    [('user', 'Hello! How are you?'), ('assistant', 'Fine, thanks.  And you?')],
    [('system', 'You answer in French.'), ('user', 'What is a café?'), ('assistant', 'Un café est… 🙂'),
     ('user', 'def f(x):\n    return x**2'), ('assistant', "C'est une fonction:\n\tf(x) = x²")],
    [('user', '   spaces   around   '), ('assistant', '\n\nnew lines first')],
]


def make_chat_tokenizer(directory: str, style: str) -> str:
  source, specials, config = STYLES[style]
  tok = hf_tokenizers.train_byte_level_bpe(hf_tokenizers.varied_lines())
  tok.add_special_tokens(specials)
  hf_tokenizers.save(tok, directory, {'chat_template': source, **config})
  return directory


@pytest.fixture(scope='module', params=sorted(STYLES))
def styled(request, tmp_path_factory):
  directory = make_chat_tokenizer(str(tmp_path_factory.mktemp(request.param)), request.param)
  tok = tokenizer_lib.load(directory)
  template = chat.template_for(tiny_config(('data.objective', 'sft')).data, tok)
  return request.param, directory, tok, template


def _ids(out):
  return list(out['input_ids'] if isinstance(out, dict) or hasattr(out, 'keys') else out)


def test_the_rendered_ids_equal_transformers_apply_chat_template(styled):
  style, directory, tok, template = styled
  assert not template.builtin
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  for conv in CONVERSATIONS:
    msgs = [{'role': r, 'content': c} for r, c in conv]
    want = _ids(theirs.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False))
    assert template.render(conv)[0] == want
    want = _ids(theirs.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True))
    assert template.prompt(conv[:-1]) == want
  end = {'llama3': '<|eot_id|>', 'chatml': '<|im_end|>'}[style]
  assert template.stop_ids[0] == tok.token_to_id(end)


def test_the_loss_covers_the_assistants_tokens_only(styled):
  style, _, tok, template = styled
  end = template.stop_ids[0]
  for conv in CONVERSATIONS:
    ids, trained = template.render(conv)
    runs, current = [], []
    for i, t in zip(ids, trained):
      if t:
        current.append(i)
      elif current:
        runs.append(current)
        current = []
    if current:
      runs.append(current)
    replies = [c for r, c in conv if r == 'assistant']
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
      assert end in run[-2:]  # the model learns to stop
      text = tok.decode(run).strip()
      assert text == reply.strip(), (style, text, reply)


def test_sft_records_render_with_the_checkpoints_template(styled):
  style, _, tok, template = styled
  cfg = tiny_config(('data.objective', 'sft'), ('data.seq_len', '128'))
  sft = objectives.for_config(cfg.data, tok)
  assert sft.template.stop_ids == template.stop_ids
  rec = Record('data.jsonl:1', {'messages': [{'role': r, 'content': c} for r, c in CONVERSATIONS[0]]})
  out = sft.from_record(rec)
  ids, trained = template.render(CONVERSATIONS[0])
  np.testing.assert_array_equal(out['inputs'], ids[:-1])
  np.testing.assert_array_equal(out['loss_mask'], trained[1:])
  assert max(ids) < tok.vocab_size  # no marker ids past the vocabulary: the template's tokens are the tokenizer's
  assert objectives.reserved_ids(cfg.data, tok) == 0
  if style == 'chatml':  # raise_exception: the record is skipped with the template's words
    bad = sft.from_record(Record('data.jsonl:2', {'messages': [{'role': 'assistant', 'content': 'hi'},
                                                               {'role': 'user', 'content': 'x'},
                                                               {'role': 'assistant', 'content': 'y'}]}))
    assert isinstance(bad, Skipped) and bad.kind == 'template' and 'must start with the user' in bad.reason


def test_a_template_that_rewrites_earlier_turns_is_reported(tmp_path):
  directory = make_chat_tokenizer(str(tmp_path / 'tok'), 'chatml')
  with open(tmp_path / 'tok' / 'tokenizer_config.json') as f:
    config = json.load(f)
  # Past replies are written without their content once the conversation goes on (like templates that drop
  # earlier reasoning): the reply of the first turn is not where the prefix rendering puts it.
  config['chat_template'] = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                             "{{ '<|im_start|>assistant\n<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m['role'] + "
                             "'\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
                             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
  with open(tmp_path / 'tok' / 'tokenizer_config.json', 'w') as f:
    json.dump(config, f)
  tok = tokenizer_lib.load(directory)
  template = chat.template_for(tiny_config(('data.objective', 'sft')).data, tok)
  with pytest.raises(TemplateError, match='renders message 1 differently'):
    template.render(CONVERSATIONS[1][1:])


def test_a_broken_template_is_one_line(tmp_path):
  from llm_jax.errors import UserError
  directory = make_chat_tokenizer(str(tmp_path / 'tok'), 'chatml')
  path = tmp_path / 'tok' / 'tokenizer_config.json'
  config = json.loads(path.read_text())
  config['chat_template'] = '{% for m in messages %}{{ m.content }'
  path.write_text(json.dumps(config))
  tok = tokenizer_lib.load(directory)
  with pytest.raises(UserError, match='chat_template: line 1'):
    chat.template_for(tiny_config(('data.objective', 'sft')).data, tok)


def test_served_chat_completions_render_with_the_checkpoints_template(styled):
  from llm_jax.serve import openai_api
  style, _, tok, template = styled
  msgs = [{'role': 'user', 'content': 'What is a café?'}]
  parsed = openai_api.parse({'messages': msgs, 'max_tokens': 4}, chat=True, template=template)
  assert parsed.prompts == [template.prompt([('user', 'What is a café?')])]
  assert parsed.sampling.stop_tokens == template.stop_ids and tok.eos_id in template.stop_ids
  if style == 'chatml':  # the template's raise_exception is the client's 400, in its words
    with pytest.raises(openai_api.ApiError, match='must start with the user'):
      openai_api.parse({'messages': [{'role': 'assistant', 'content': 'hi'}]}, chat=True, template=template)
