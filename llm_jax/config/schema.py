"""The schema: every key the project reads, with its default of the right type.

Recipes (shipped in llm_jax/recipes/, or a user's own file) start from `default_config()` and change values, never add keys, so an override or a saved
`config.json` can always be checked key by key against it. Which values a key allows is not listed here: the
module that implements the key says (validate.py asks it).
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """Every key llm-jax reads, with its default. Recipes override values from here."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Fine-tuning: a pretrained workdir whose latest params start this run (step 0, new optimizer state, its
  # tokenizer); '' trains from scratch. Its model must match this one (model.vocab_size may grow to fit the
  # chat template's role markers; see run/finetune.py).
  c.init_from = ''

  c.model = ml_collections.ConfigDict()
  m = c.model
  # decoder (LLaMA, GPT-2) | encoder (BERT, masked LM) | encdec (T5, span corruption). The keys below
  # describe any of them; models/ reads them, the recipes in llm_jax/recipes/ set them per family.
  m.family = 'decoder'
  m.vocab_size = 4096  # the tokenizer is trained to this less the ids the objective reserves (mask, sentinels)
  m.num_layers = 4  # encdec: of the encoder
  m.num_decoder_layers = 0  # encdec: of the decoder (0: num_layers)
  m.embed_dim = 256
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 64
  m.mlp_dim = 704
  m.norm_type = 'rms'  # rms (LLaMA, T5) | layer (GPT-2, BERT: mean removed, plus a bias with use_bias)
  m.norm_position = 'pre'  # pre: norm the input of each sublayer | post (BERT): norm after each residual add
  m.norm_eps = 1e-5
  m.mlp_activation = 'silu'  # silu | gelu (exact erf) | gelu_tanh (GPT-2's "gelu_new") | relu
  m.mlp_gated = True  # act(x W_gate) * (x W_up) (SwiGLU, GEGLU), else act(x W_up)
  m.use_bias = False  # biases on every projection and layer norm (GPT-2, BERT)
  m.position_type = 'rope'  # rope | learned (a table added to the embeddings) | relative (T5's buckets)
  m.rope_theta = 10000.0
  m.max_positions = 1024  # learned: rows of the position table, at least data.seq_len
  m.relative_buckets = 32  # relative: buckets of the per-head bias (half per direction when bidirectional)
  m.relative_max_distance = 128  # relative: distances from here on share the last bucket
  m.scale_attention = True  # logits / sqrt(head_dim); T5 folds that into its initialisation instead
  # Layouts of the decoder beyond LLaMA's (convert/ sets them from a checkpoint's config.json):
  # Rotary frequencies rescaled for long context: none | llama3 (Llama 3.1's smooth interpolation between
  # the original and `factor`-times slower frequencies by wavelength) | linear (every frequency / factor).
  m.rope_scaling = ml_collections.ConfigDict()
  m.rope_scaling.type = 'none'
  m.rope_scaling.factor = 1.0
  m.rope_scaling.low_freq_factor = 1.0  # llama3: wavelengths above original_max_positions / this are scaled
  m.rope_scaling.high_freq_factor = 4.0  # llama3: ... below original_max_positions / this are kept
  m.rope_scaling.original_max_positions = 8192  # llama3: the context length the model was trained at
  m.qkv_bias = False  # biases on the query, key and value projections alone (Qwen2)
  m.qk_norm = False  # RMSNorm over each head's queries and keys before rotary (Qwen3)
  m.sliding_window = 0  # a query sees only the keys less than this many positions back (Mistral; 0: all)
  m.global_every = 0  # with sliding_window: every global_every-th layer sees all keys (Gemma 2: 2; 0: none)
  m.query_scale = 0  # attention logits / sqrt(query_scale); 0: head_dim (Gemma 2's query_pre_attn_scalar)
  m.attn_logit_softcap = 0.0  # attention logits -> cap * tanh(logits / cap) (Gemma 2; 0: off)
  m.final_logit_softcap = 0.0  # output logits likewise (Gemma 2; 0: off)
  m.norm_offset = False  # norm gains stored as w - 1: the norm multiplies by (1 + w) (Gemma)
  m.embed_scale = False  # input embeddings times sqrt(embed_dim) (Gemma)
  m.post_norms = False  # also norm each sublayer's output before its residual add (Gemma 2's four norms)
  m.type_vocab_size = 0  # encoder: BERT's token-type table (type 0 is used; kept for checkpoint round trips)
  m.decoder_start_id = 0  # encdec: the first decoder input of every target (T5 starts from pad, 0)
  m.tie_embeddings = False  # encdec: T5's rule, a tied output layer sees hidden states * embed_dim ** -0.5
  m.init_std = 0.02
  m.dropout_rate = 0.0
  # Precision: 'auto' computes in bfloat16 on GPU/TPU and float32 on CPU (where bfloat16 matmuls are slower).
  m.dtype = 'auto'  # compute dtype of activations and matmuls: auto | float32 | bfloat16 | float16
  m.param_dtype = 'float32'  # master weights (what the optimizer updates and checkpoints hold)
  m.logits_dtype = 'float32'  # dtype of the output logits; the loss upcasts to float32 either way
  m.scan_layers = True
  # Attention kernel of training, evaluation and prefill (models/attention_kernels.py); decode steps use XLA.
  # auto: splash on TPU; on GPU (bfloat16/float16) the Pallas flash kernel, else cuDNN; XLA elsewhere and
  # wherever the kernel cannot run (T5's relative bias, context parallelism). Named kernels never fall back.
  m.attention_impl = 'auto'  # auto | xla | cudnn | splash (TPU) | pallas_gpu (GPU)
  # Tile sizes of the Pallas kernels (splash, pallas_gpu), multiples of 128; 0: the kernel's default (splash
  # 512 x 512 for v4/v5e/v5p/v6e, pallas_gpu JAX's 128 x 128). Rows are padded to whole tiles.
  m.attention_block_q = 0
  m.attention_block_kv = 0
  m.remat = 'none'  # none | full | dots_no_batch | save_attention (see models/decoder.py)
  # LoRA (Hu et al. 2021): low-rank adapters x A B * alpha / rank on the named projections; with rank > 0
  # only the adapters train (needs init_from) and checkpoints hold only them (see run/lora.py).
  m.lora = ml_collections.ConfigDict()
  m.lora.rank = 0  # 0: off
  m.lora.alpha = 16.0
  m.lora.targets = ('q', 'v')  # of q k v o (attention) and gate up down (MLP)

  c.data = ml_collections.ConfigDict()
  d = c.data
  d.source = 'builtin'  # 'builtin', a glob of .txt/.jsonl(.gz) files, or 'tfds:NAME' / 'tfds:DIR'
  d.mixture = ()  # ((source, weight), ...): when set, these sources mixed by weight replace data.source
  d.text_field = 'text'  # the field read from .jsonl records and TFDS examples
  d.txt_mode = 'file'  # .txt files: 'file' (one document each) or 'blocks' (split at blank lines)
  d.max_doc_chars = 1_000_000  # longer documents are cut into pieces of this size (bytes for .txt)
  d.tfds_data_dir = ''  # where tfds:NAME datasets are prepared; '' is tfds' default
  d.tfds_train_split = 'train'
  d.tfds_heldout_split = ''  # '' takes the first of heldout / validation / test the dataset has
  d.shards = 8  # logical data shards: fixed for a run, a multiple of the process count, divides batch_size
  d.workers = 0  # worker processes that read and tokenize (0: in the training process)
  # Documents read ahead per shard. 16 keeps the text path's tokenizing threads busy, and a prepared source's
  # cheap reads are not slowed by grain scanning a longer buffer at every element (BENCHMARKS.md, input pipeline).
  d.prefetch = 16
  d.heldout_percent = 5  # share held out: documents chosen by a hash of their name, or with too few
  # documents for that the last heldout_percent% of each by position (data/splitting.py)
  d.heldout_source = ''  # a source of its own for the held-out split ('' splits data.source); when set,
  # every document of data.source trains
  d.encoding = 'utf-8'  # of .txt and .jsonl files (e.g. latin-1)
  d.decode_errors = 'strict'  # strict: a file that is not valid in data.encoding is skipped and reported;
  # replace: bad bytes become U+FFFD and the file is kept; ignore: they are dropped
  d.tokenizer = ''  # a sentencepiece .model, a tokenizer.json or a directory; '' trains a sentencepiece one
  d.tokenizer_train_chars = 20_000_000  # text the tokenizer is trained on, at most
  d.seq_len = 256
  d.batch_size = 16  # global, over all processes
  d.add_bos = True
  d.add_eos = True
  # The objective turns each document into features before packing (data/objectives.py); it must fit
  # model.family: causal <-> decoder, mlm <-> encoder, span <-> encdec.
  d.objective = 'causal'  # causal | mlm | span
  d.mask_rate = 0.15  # mlm: share of each document's tokens that are predicted
  d.mask_random_rate = 0.1  # mlm: of the predicted tokens, share replaced by a random token
  d.mask_keep_rate = 0.1  # mlm: ... and share left as they are; the rest become the mask token
  d.whole_word_masking = False  # mlm: choose whole words (all their pieces) instead of single tokens
  d.noise_density = 0.15  # span: share of tokens replaced by sentinels in the input, predicted as targets
  d.mean_span_length = 3.0  # span: mean length of a corrupted span
  d.num_sentinels = 100  # span: sentinel ids reserved after the tokenizer's pieces (T5's extra_ids)
  d.target_len = 64  # span: decoder row length (data.seq_len is the encoder's)
  # sft / dpo: the chat template. Each message is <|role|> content <|end|>; the markers are ids appended
  # after the tokenizer's pieces (one per role, then <|end|>). The last role is the model's own voice: the
  # only one trained on and the one `llm-jax chat` generates; {prompt, response} records are the last two.
  d.chat_roles = ('system', 'user', 'assistant')
  d.dpo_beta = 0.1  # dpo: the strength of the KL tie to the reference model (Rafailov et al. 2023)

  c.train = ml_collections.ConfigDict()
  t = c.train
  t.steps = 1000
  t.optimizer = 'adamw'  # adamw | adafactor | lion | muon (see train/optim.py)
  t.learning_rate = 3e-3  # peak
  t.schedule = 'cosine'  # after linear warmup: cosine | linear | constant | rsqrt | wsd
  t.warmup_steps = 100
  t.min_lr_ratio = 0.1  # cosine, linear and wsd decay to learning_rate * min_lr_ratio
  t.decay_fraction = 0.2  # wsd: the share of all steps spent in the final decay
  t.weight_decay = 0.1  # decoupled; never on norms or biases
  t.decay_embeddings = True  # whether weight decay also applies to embedding tables
  t.beta1 = 0.9  # adamw and lion
  t.beta2 = 0.95  # adamw and lion
  t.muon_beta = 0.95  # muon: the momentum of the matrices it orthogonalises (Nesterov)
  t.eps = 1e-8  # adamw
  t.grad_clip = 1.0  # global-norm clipping; 0 disables it
  t.opt_state_dtype = 'float32'  # dtype the optimizer's moments are stored in: float32 | bfloat16
  t.microbatches = 1  # gradient accumulation: the batch is split into this many sequential microbatches
  t.z_loss = 0.0  # weight of the PaLM auxiliary loss z_loss * log(Z)^2 on the softmax normaliser
  t.label_smoothing = 0.0  # share of the target mass spread uniformly over the vocabulary
  t.loss_chunk = 0  # >0: cross-entropy over chunks of this many positions, never all logits at once
  t.skip_nonfinite = False  # skip (and count) updates whose loss or gradient is NaN/inf instead of stopping
  t.log_every = 10
  t.tensorboard = True  # also write TensorBoard event files under WORKDIR/tensorboard/
  t.wandb_project = ''  # non-empty: also log to this Weights & Biases project (needs `pip install wandb`)
  t.profile_steps = ()  # (first, last): JAX profiler trace of those steps into WORKDIR/tensorboard/
  t.checkpoint_every = 200
  t.keep_checkpoints = 3

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 200  # held-out loss during training every this many steps (0: never)
  c.eval.batches = 4  # batches of held-out data for that loss
  c.eval.max_tokens = 400_000  # `llm-jax eval` reads whole held-out documents up to this many tokens

  c.mesh = ml_collections.ConfigDict()
  # Devices per axis within one slice (TPU ICI) or node (NVLink); one axis may be -1: the devices left over.
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.sequence = 1  # context parallelism: every row's positions split over this many devices
  c.mesh.tensor = 1
  # Multi-slice / multi-node (DCN): the data or fsdp axis spans this many slices or nodes, each holding the
  # mesh above. Only these two: their collectives run once per step or per layer, which DCN can carry.
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  c.mesh.preset = 'fsdp_tp'  # logical-axis rules: dp | fsdp | fsdp_tp (sharding.RULE_PRESETS)
  c.mesh.rules = ()  # extra (logical_axis, mesh_axes) rules, tried before the preset's
  return c
