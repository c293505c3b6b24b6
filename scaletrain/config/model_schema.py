"""The `[model]` section: the architecture of every family (GPT, llama, MoE, vision)."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.fields import F


@dataclass
class ModelConfig:
    name: str = F("gpt", "Model family from the registry: 'gpt' (GPT-2), 'llama' (Llama 3 / "
                  "Qwen 2.5 / Qwen 3 / Mistral decoders), 'mlp' or 'cnn' (images).",
                  choices=("gpt", "llama", "mlp", "cnn"))
    n_layer: int = F(4, "Text models: number of transformer blocks.", ge=1)
    n_head: int = F(4, "Text models: attention (query) heads per block; GPT: must divide "
                    "d_model.", ge=1)
    d_model: int = F(128, "Text models: residual stream width.", ge=1)
    d_ff: int = F(0, "Text models: MLP hidden width; 0 means 4 * d_model (GPT) or Llama's "
                  "8/3 * d_model rounded up to a multiple of 64 (llama).", ge=0)
    seq_len: int = F(128, "Text models: context length in tokens.", ge=1)
    vocab_size: int = F(0, "Text models: vocabulary size; 0 takes the prepared tokenizer's.",
                        ge=0)
    dropout: float = F(0.0, "Dropout probability (GPT: embeddings, attention, residual).",
                       ge=0.0, lt=1.0)
    bias: bool = F(True, "GPT: biases in linear layers and LayerNorms (GPT-2 has them).")
    init_std: float = F(0.02, "Std of the normal initialisation of weights.", gt=0.0)
    loss_chunks: int = F(-1, "Text models: compute the output head and cross-entropy over "
                         "this many chunks of the micro-batch's tokens (models/"
                         "chunked_loss.py: each chunk's gradients made in the forward; "
                         "under TP its logits recomputed in the backward), so only "
                         "1/loss_chunks of the (tokens x vocabulary) logits exist at once; "
                         "0 = the whole micro-batch at once; -1 (auto) = 8 chunks when a "
                         "micro-batch's fp32 logits reach 32 MiB and the chunked head "
                         "holds at most half the bytes, without TP or train.compile, else "
                         "0 (models/loss_chunks_auto.py). Same loss and gradients either "
                         "way; at most model.seq_len.", ge=-1)
    n_kv_head: int = F(0, "llama: key/value heads (grouped-query attention); 0 means n_head; "
                       "n_head must be a multiple.", ge=0)
    head_dim: int = F(0, "llama: features per attention head; 0 means d_model / n_head.",
                      ge=0)
    norm_eps: float = F(1e-5, "llama: epsilon of the RMSNorms.", gt=0.0, lt=1.0)
    rope_theta: float = F(10000.0, "llama: base of the rotary position embedding's "
                          "frequencies (Llama 3: 500000).", gt=0.0)
    rope_scaling: str = F("none", "llama: rotary frequency scaling: 'none' or 'llama3' "
                          "(Llama 3.1's, with the rope_factor / rope_*_freq_factor / "
                          "rope_original_seq_len fields).", choices=("none", "llama3"))
    rope_factor: float = F(8.0, "llama: rope_scaling='llama3' slow-down of long wavelengths.",
                           ge=1.0)
    rope_low_freq_factor: float = F(1.0, "llama: rope_scaling='llama3' low-frequency factor.",
                                    gt=0.0)
    rope_high_freq_factor: float = F(4.0, "llama: rope_scaling='llama3' high-frequency "
                                     "factor (> rope_low_freq_factor).", gt=0.0)
    rope_original_seq_len: int = F(8192, "llama: rope_scaling='llama3' original context "
                                   "length.", ge=1)
    qkv_bias: bool = F(False, "llama: biases on the q/k/v projections (Qwen2 has them).")
    qk_norm: bool = F(False, "llama: RMSNorm over each head of q and k (Qwen3 has it).")
    tie_embeddings: bool = F(False, "llama: the output head shares the token embedding "
                             "(small Qwen / SmolLM models; Llama 3 8B does not).")
    hf_architecture: str = F("", "llama: the Hugging Face class the weights came from "
                             "(LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                             "MistralForCausalLM), which `export --format hf` writes; set "
                             "by init.from of an HF directory; empty: from the flags.")
    moe_experts: int = F(0, "llama: routed experts per mixture-of-experts layer; 0 = a "
                         "dense model (every moe_* field then stays at its default).", ge=0)
    moe_top_k: int = F(2, "llama MoE: experts each token is routed to (<= moe_experts).",
                       ge=1)
    moe_d_ff: int = F(0, "llama MoE: hidden width of each expert's SwiGLU; 0 = model.d_ff "
                      "(the Llama rule if that is 0).", ge=0)
    moe_shared_experts: int = F(0, "llama MoE: always-on experts of width moe_d_ff beside "
                                "the routed ones (DeepSeek / Qwen-MoE style).", ge=0)
    moe_every: int = F(1, "llama MoE: block i >= moe_first_dense is an MoE block when "
                       "(i + 1) % moe_every == 0 (Qwen-MoE's decoder_sparse_step).", ge=1)
    moe_first_dense: int = F(0, "llama MoE: the first this many blocks keep a dense MLP "
                             "(DeepSeek's first_k_dense_replace).", ge=0)
    moe_router: str = F("softmax", "llama MoE: 'softmax' top-k (Mixtral, Qwen3-MoE) or "
                        "'sigmoid_bias' (DeepSeek-V3: sigmoid scores, top-k chosen with a "
                        "per-expert bias moved toward balance after every step).",
                        choices=("softmax", "sigmoid_bias"))
    moe_norm_topk_prob: bool = F(True, "llama MoE: renormalise the chosen experts' weights "
                                 "to sum to one (Mixtral always; Qwen3-MoE norm_topk_prob).")
    moe_aux_loss: float = F(0.0, "llama MoE: coefficient of the load-balancing loss "
                            "(Switch / Mixtral form E * sum_e f_e * P_e, per sequence); "
                            "0 = off.", ge=0.0)
    moe_z_loss: float = F(0.0, "llama MoE: coefficient of the router z-loss "
                          "(logsumexp(logits)^2 per token, ST-MoE); 0 = off.", ge=0.0)
    moe_capacity_factor: float = F(0.0, "llama MoE: 0 = no token is ever dropped; > 0 = each "
                                   "expert takes at most ceil(factor * tokens * top_k / "
                                   "experts) per layer call and the overflow is dropped and "
                                   "counted (metrics.jsonl moe_dropped).")
    moe_bias_update_rate: float = F(0.001, "llama MoE, moe_router='sigmoid_bias': step of "
                                    "the per-expert bias after each optimizer step "
                                    "(DeepSeek-V3's gamma).", ge=0.0)
    hidden: int = F(256, "MLP: hidden width.", ge=1)
    channels: int = F(32, "CNN: channels of the residual blocks.", ge=1)
    n_blocks: int = F(2, "CNN: number of residual blocks.", ge=1)
    weight_norm: bool = F(False, "Weight normalisation (w = g * v / ||v||, Salimans & "
                          "Kingma 2016) on every linear layer not tied to an embedding.")
