"""The `[data]` section: sources, preparation, tokenizer, loading."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.fields import F


@dataclass
class DataConfig:
    # -- sources and mixtures (issue 16; config/mixture_checks.py validates) ----------
    source: str | list[str] = F(
        "python-stdlib", "'python-stdlib' (built-in text corpus), 'digits' (scikit-learn "
        "images), or a file / directory / glob: UTF-8 text files (one document each), "
        "JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet, or a datasets.save_to_disk "
        "directory; or a list of text sources (TOML array; on the command line "
        "--data.source='[\"a/*.jsonl\", \"b\"]'), prepared together as one corpus.",
        path=True)
    mixture: list[dict] = F([], "Text sources trained on in fixed proportions instead of "
                            "data.source: [{source = \"a\", weight = 0.7}, {source = "
                            "\"b\", weight = 0.3}] (optional name = \"...\" for the "
                            "metrics; default: the source's base name). Each source is "
                            "prepared (cached) on its own with one shared tokenizer; "
                            "samples are drawn per source in those proportions "
                            "(data/mixture.py), and metrics carry tokens_by_source and "
                            "loss_by_source.", path=True)
    text_key: str = F("text", "The field of a JSONL / Parquet / saved-dataset record that "
                      "holds its text.")
    prepared_dir: str = F("data/prepared", "Where prepared datasets are cached, keyed by "
                          "a hash of the inputs and settings.", path=True)
    vocab_size: int = F(4096, "BPE vocabulary size trained on the train split.",
                        ge=260, le=65536 * 64)
    tokenizer: str = F("", "A tokenizer.json to encode with instead of training a BPE "
                       "(set from init.from / distill.teacher so ids mean the same).",
                       path=True)
    val_fraction: float = F(0.05, "Fraction of documents in the validation split.",
                            ge=0.0, lt=1.0)
    test_fraction: float = F(0.05, "Fraction of documents in the test split.", ge=0.0, lt=1.0)
    min_chars: int = F(32, "Documents shorter than this (after cleaning) are dropped.", ge=0)
    max_files: int = F(0, "Read at most this many files (sorted by path); 0 = all.", ge=0)
    filters: list[str] = F([], "Quality filters after cleaning, in this order, datatrove's "
                           "own steps with their default thresholds: any of "
                           "gopher_repetition, gopher_quality, c4, fineweb_quality.")
    filter_args: dict = F({}, "Per filter, arguments of its datatrove class that replace "
                          "the defaults, as a TOML table: [data.filter_args.gopher_quality] "
                          "min_doc_words = 20.")
    dedup: str = F("exact", "'exact' (content hash: identical documents) or 'minhash' "
                   "(datatrove's MinHash stages: near-duplicates too).",
                   choices=("exact", "minhash"))
    minhash_ngrams: int = F(5, "MinHash: words per shingle (datatrove's n_grams).",
                            ge=1, le=64)
    minhash_buckets: int = F(14, "MinHash: LSH bands (datatrove's num_buckets); more "
                             "find less similar pairs.", ge=1, le=256)
    minhash_hashes_per_bucket: int = F(8, "MinHash: hashes per band; more find only "
                                       "more similar pairs.", ge=1, le=64)
    prep_workers: int = F(2, "Worker processes (datatrove tasks at once) that read, clean "
                          "and tokenize during preparation.", ge=1)
    # The executor block (data/executors.py): where the datatrove pipeline runs.
    executor: str = F("local", "How the preparation pipeline runs: 'local' (datatrove's "
                      "local executor, data.prep_workers processes), 'ray' (an existing Ray "
                      "cluster at data.ray_address) or 'slurm' (sbatch job arrays; "
                      "data.prepared_dir must be on a filesystem the nodes share).",
                      choices=("local", "ray", "slurm"))
    ray_address: str = F("auto", "data.executor=ray: the cluster's address, host:port of "
                         "its head (`ray start --head --port=PORT`), or 'auto' for the "
                         "cluster running on this machine / $RAY_ADDRESS.")
    ray_cpus_per_task: int = F(1, "data.executor=ray: CPUs Ray reserves for each task.",
                               ge=1)
    slurm_partition: str = F("", "data.executor=slurm: the partition the job arrays go to; "
                             "'' = the cluster's default partition.")
    slurm_time: str = F("01:00:00", "data.executor=slurm: the time limit of each task "
                        "(sbatch --time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS).")
    slurm_cpus_per_task: int = F(1, "data.executor=slurm: CPUs of each array task "
                                 "(sbatch --cpus-per-task).", ge=1)
    slurm_mem_per_cpu_gb: int = F(2, "data.executor=slurm: memory per CPU in GB "
                                  "(sbatch --mem-per-cpu).", ge=1)
    slurm_qos: str = F("", "data.executor=slurm: sbatch --qos; '' = the cluster's default.")
    tokenizer_sample_bytes: int = F(256 << 20, "The BPE tokenizer trains on about this many "
                                    "bytes of the train split (a deterministic sample; all "
                                    "of it when smaller).", ge=1)
    loader_workers: int = F(0, "Background threads prefetching batches; 0 = in the loop.",
                            ge=0)
    shuffle: bool = F(True, "Shuffle samples with a seeded, world-size-independent order.")
    document_masking: bool = F(False, "Text models: documents packed into a window (each "
                               "ended by the end-of-text token) do not attend to each other, "
                               "and position ids restart at every document (models/"
                               "documents.py); off = attention and positions run across "
                               "the whole window, as GPT-2 trained.")
    # Chat SFT (data/chat.py, data/chat_prepare.py, data/chat_windows.py): one block.
    format: str = F("text", "'text': documents of raw text (next-token training on every "
                    "token); 'chat': JSONL records of a messages list (role / content), "
                    "rendered with the model's chat template.", choices=("text", "chat"))
    messages_key: str = F("messages", "data.format='chat': the field of a JSONL record "
                          "that holds its list of {role, content} messages.")
    chat_template: str = F("", "data.format='chat': a Jinja chat template file to render "
                           "conversations with; empty = the chat_template of the HF "
                           "tokenizer directory data.tokenizer lies in (from init.from).",
                           path=True)
    train_on: str = F("assistant", "data.format='chat': the tokens the loss covers: the "
                      "assistant messages (their content and end-of-turn token) or every "
                      "token of the conversation.", choices=("assistant", "all"))
    chat_packing: str = F("pack", "data.format='chat': 'pack' whole conversations, in "
                          "order, into seq_len windows (with data.document_masking they "
                          "do not attend to each other), or 'pad' one conversation per "
                          "window; a conversation longer than a window is cut.",
                          choices=("pack", "pad"))
    assignment: str = F("block", "How a rank takes its part of each global batch: a "
                        "contiguous block or every world-size-th sample.",
                        choices=("block", "strided"))
