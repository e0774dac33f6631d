"""Synthetic target/draft pairs with a known acceptance, to measure engine efficiency in isolation.

An "agreeing pair" (issue 7): a target whose upper layers are identity (their attention output and
MLP down projections are zero, so they add nothing to the residual stream) and a draft made of the
target's first layers with the same embeddings, final norm and head. Both compute the same function,
so acceptance is ~100% (up to rounding) while the target still reads all of its weights every pass:
what is left between measured speedup and the memory-bound bound is the engine's own overhead.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel


def agreeing_pair(vocab_size: int = 8192, hidden: int = 768, layers: int = 12, draft_layers: int = 1,
                  heads: int = 12, kv_heads: int = 4, intermediate: int = 2048, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedModel]:
    """(target, draft): random Llama weights, the target's layers >= `draft_layers` made identity.

    The defaults give a ~92M target and a ~13M draft (c ~ 0.15), like the issue's measured pair.
    """
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=intermediate, tie_word_embeddings=True,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    target = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for layer in target.model.layers[draft_layers:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    draft = truncated_copy(target, draft_layers)
    return target, draft


def truncated_copy(model: PreTrainedModel, layers: int) -> PreTrainedModel:
    """A model of the same config with only the first `layers` decoder layers (weights copied)."""
    data = {**model.config.to_dict(), "num_hidden_layers": layers}
    if data.get("layer_types"):  # per-layer attention kinds (Qwen2/3 sliding windows): the first `layers` of them
        data["layer_types"] = data["layer_types"][:layers]
    cfg = model.config.__class__.from_dict(data)
    small = AutoModelForCausalLM.from_config(cfg, dtype=model.dtype).eval()
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    missing, unexpected = small.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # only the tied head may be absent from the state
        raise ValueError(f"truncated copy mismatch: missing {missing}, unexpected {unexpected}")
    small.tie_weights()
    return small.to(next(model.parameters()).device)


def disagreeing_copy(draft: PreTrainedModel) -> PreTrainedModel:
    """The same draft with its final norm negated: same size and speed, logits flipped, so its greedy
    proposals (almost) never match the target's: the worst case a bad draft can cost."""
    bad = truncated_copy(draft, draft.config.num_hidden_layers)
    with torch.no_grad():
        bad.model.norm.weight.neg_()
    return bad
