"""A Llama-family model as a GGUF file that llama.cpp loads (`-md draft.gguf`) and transformers reads back (`gguf_file=`).

    write_gguf(model, tokenizer_dir, "draft.gguf", "q8_0")

What is written, under llama.cpp's names (gguf-py's constants and tensor-name map, which llama.cpp's own
converter uses):

- the `llama` architecture's hyper-parameters (`llama.block_count`, `llama.attention.head_count_kv`, ...);
- the tokenizer as llama.cpp's byte-level BPE (`tokenizer.ggml.model = gpt2`): every id's token text up to the
  model's vocabulary size (ids the tokenizer lacks are `[PAD<id>]`, type UNUSED), token types (special added
  tokens CONTROL, other added tokens USER_DEFINED, the rest NORMAL), the merges, bos/eos/unk/pad ids and the chat
  template (gguf-py's SpecialVocab reads those from the tokenizer folder), add_bos/add_eos as the tokenizer
  behaves (llama.cpp's speculative decoding requires the draft's to equal the target's), and `tokenizer.ggml.pre`,
  the pre-tokenizer llama.cpp applies to text, recognised from `tokenizer.json` (see `llama_cpp_pre_tokenizer`);
- the weights: `token_embd`, `blk.N.attn_q` ..., `output_norm`, and `output` only for an untied output layer
  (llama.cpp and transformers tie the two when `output.weight` is absent). llama.cpp stores the rows of Q and K
  permuted from Hugging Face's rotate-half rotary layout to its interleaved one (`permute_for_llama_cpp`;
  transformers' GGUF loader undoes it). One-dimensional tensors (the norms) stay float32 whatever the weights; the
  matrices are f32, f16 or q8_0 (blocks of 32 int8 values with one f16 scale, gguf-py's reference quantizer);
  a matrix whose rows are not a multiple of 32 long cannot be q8_0 and is written f16, as llama.cpp's converter does.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel

from fastdraft.errors import FastdraftError

GGUF_WEIGHTS = ("f32", "f16", "q8_0")
GGUF_ARCHITECTURE = "llama"


def check_gguf_config(config) -> None:
    """Refuse what the `llama` GGUF architecture as written here cannot hold (other families, biases, rope scaling)."""
    problems = []
    if config.model_type != "llama":
        problems.append(f"model type {config.model_type!r} (only 'llama', e.g. SmolLM2)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            problems.append(f"{flag}=True")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope type {rope['rope_type']!r}")
    if problems:
        raise FastdraftError(f"--format gguf writes plain Llama drafts; this one has {', '.join(problems)}: export "
                             f"--format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Q or K projection rows [heads * head_dim, in] from Hugging Face's rotary layout (each head's dimensions
    rotated as two halves) to llama.cpp's (rotated as adjacent pairs): within each head, row i of the first half
    and row i of the second half become rows 2i and 2i+1."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _tokenizer_json(tokenizer_dir: Path) -> dict:
    file = tokenizer_dir / "tokenizer.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _pre_tokenizer_steps(tokenizer_json: dict) -> list[dict]:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []


def check_gguf_tokenizer(tokenizer_dir: Path) -> None:
    """Refuse a tokenizer that llama.cpp's byte-level BPE (`tokenizer.ggml.model = gpt2`) does not describe."""
    data = _tokenizer_json(tokenizer_dir)
    kind = (data.get("model") or {}).get("type")
    byte_level = any(s.get("type") == "ByteLevel" for s in _pre_tokenizer_steps(data))
    if kind != "BPE" or not byte_level:
        raise FastdraftError(f"--format gguf writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2's); the "
                             f"tokenizer in {tokenizer_dir} is {kind or 'not a tokenizer.json'}"
                             f"{'' if byte_level else ' without a ByteLevel pre-tokenizer'}")


def llama_cpp_pre_tokenizer(tokenizer_dir: Path) -> str:
    """llama.cpp's name for the pre-tokenizer in `tokenizer.json`: `gpt-2` for plain byte-level splitting, `smollm` for
    digits split one by one before it (SmolLM/SmolLM2's original tokenizer), else `default` (llama.cpp's generic
    splitting, which may cut text differently). Speculative decoding hands the draft token ids, never text, so this
    only matters when the draft file is used on its own."""
    kinds = [(s.get("type"), s.get("individual_digits")) for s in _pre_tokenizer_steps(_tokenizer_json(tokenizer_dir))]
    if kinds == [("ByteLevel", None)]:
        return "gpt-2"  # llama.cpp refuses a name it does not know (such as "gpt2") when it loads the file
    if kinds == [("Digits", True), ("ByteLevel", None)]:
        return "smollm"
    return "default"


def vocabulary(tokenizer_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text (as the tokenizer spells it: byte-level symbols) and llama.cpp token type, for ids
    0..vocab_size-1."""
    from fastdraft.tokenizer import load_tokenizer

    token_type = gguf.TokenType
    tok = load_tokenizer(tokenizer_dir)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(token_type.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(token_type.NORMAL if i not in added else
                         token_type.CONTROL if added[i].special else token_type.USER_DEFINED)
    return tokens, [int(t) for t in types]


def adds_special_tokens(tokenizer_dir: Path) -> dict[str, bool]:
    """Whether the tokenizer puts BOS before / EOS after a text it encodes, as it actually does (tokenizer_config
    often does not say): written explicitly, because llama.cpp's default depends on the pre-tokenizer and its
    speculative decoding refuses a draft whose add_bos/add_eos differ from the target's."""
    from fastdraft.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    plain, added = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    return {"bos": tok.bos_token_id is not None and added[:1] == [tok.bos_token_id] and plain[:1] != added[:1],
            "eos": tok.eos_token_id is not None and added[-1:] == [tok.eos_token_id] and plain[-1:] != added[-1:]}


def encode_tensor(weight: torch.Tensor, weights: str) -> tuple[np.ndarray, object | None]:
    """(data, raw GGML type or None) of one tensor as GGUFWriter.add_tensor takes it."""
    data = weight.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or weights == "f32":
        return data, None
    if weights == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def write_gguf(model: PreTrainedModel, tokenizer_dir: Path, path: Path, weights: str, name: str = "fastdraft draft") -> Path:
    """Write `model` (a Llama, full-vocabulary output layer) with the tokenizer in `tokenizer_dir` to `path`."""
    from fastdraft.models import head_token_ids

    if head_token_ids(model) is not None:
        raise ValueError("write_gguf needs a full-vocabulary output layer: pass fastdraft.export.full_vocab_head(model)")
    if weights not in GGUF_WEIGHTS:
        raise FastdraftError(f"--weights {weights} is not available for --format gguf (choose {', '.join(GGUF_WEIGHTS)})")
    config = model.config
    check_gguf_config(config)
    check_gguf_tokenizer(tokenizer_dir)
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), GGUF_ARCHITECTURE)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) * heads != config.hidden_size:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[weights])
    if weights == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = vocabulary(tokenizer_dir, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(llama_cpp_pre_tokenizer(tokenizer_dir))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=config.vocab_size)
    if not special.merges:
        raise FastdraftError(f"{tokenizer_dir}: no BPE merges found (tokenizer.json or merges.txt)")
    special.add_special_token = adds_special_tokens(tokenizer_dir)
    special.add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    for hf_name, weight in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # no output.weight: llama.cpp and transformers use token_embd
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise FastdraftError(f"--format gguf: no llama.cpp name for the tensor {hf_name}")
        if base.endswith("self_attn.q_proj"):
            weight = permute_for_llama_cpp(weight, heads)
        elif base.endswith("self_attn.k_proj"):
            weight = permute_for_llama_cpp(weight, kv_heads)
        data, raw_dtype = encode_tensor(weight, weights)
        writer.add_tensor(f"{gguf_name}.{suffix}", data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_summary(path: Path) -> dict:
    """What a GGUF file holds, read back with gguf's own reader: architecture, shape, tokenizer, tensor types."""
    reader = gguf.GGUFReader(path)

    def field(key: str):
        return reader.fields[key].contents() if key in reader.fields else None

    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return {"file": path.name, "bytes": path.stat().st_size, "architecture": field("general.architecture"),
            "block_count": field(f"{GGUF_ARCHITECTURE}.block_count"), "vocab_size": field(f"{GGUF_ARCHITECTURE}.vocab_size"),
            "tokenizer": field("tokenizer.ggml.model"), "tokenizer_pre": field("tokenizer.ggml.pre"),
            "tokens": len(reader.fields["tokenizer.ggml.tokens"].data), "tensors": len(reader.tensors),
            "tensor_types": types, "tied_output": all(t.name != "output.weight" for t in reader.tensors)}
