"""A run on disk: the work directory's files (workdir.py), orbax checkpoints (checkpoint.py) and their files
on disk (checkpoint_files.py: manifest, incomplete saves, damaged steps), init_from (finetune.py: params of a
pretrained run, grown vocabulary) and LoRA's params (lora.py: adapters vs the frozen base, merging)."""
