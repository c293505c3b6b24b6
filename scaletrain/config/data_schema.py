"""The `[data]` section: sources, preparation, tokenizer, loading."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.fields import F


@dataclass
class DataConfig:
    source: str = F("python-stdlib", "'python-stdlib' (built-in text corpus), 'digits' "
                    "(scikit-learn images), or a file / directory / glob: UTF-8 text files "
                    "(one document each), JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet, "
                    "or a datasets.save_to_disk directory.", path=True)
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
    executor: str = F("local", "How the preparation pipeline runs: 'local' (datatrove's "
                      "local executor, data.prep_workers processes).", choices=("local",))
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
    assignment: str = F("block", "How a rank takes its part of each global batch: a "
                        "contiguous block or every world-size-th sample.",
                        choices=("block", "strided"))
