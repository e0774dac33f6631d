"""Offline assets: the embedded target really works, the corpora and eval prompts ship with packages."""

import torch

from fastdraft.assets import humaneval_problems, iter_stdlib_code_files, iter_stdlib_prose, resolve_model_path
from fastdraft.checkpoint import load_model
from fastdraft.tokenizer import load_tokenizer


def test_embedded_target_is_smollm2_and_answers_a_question(smollm2_dir):
    assert resolve_model_path("embedded:smollm2-135m-instruct") == smollm2_dir
    model, tok = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.vocab_size) == ("llama", 30, 49152)
    assert "im_start" in tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_offline_corpora_and_eval_prompts_are_available():
    code_files = list(iter_stdlib_code_files())
    assert len(code_files) > 300 and all(p.suffix == ".py" and "test" not in p.parts for p in code_files)
    prose = []
    for doc in iter_stdlib_prose():
        prose.append(doc)
        if len(prose) == 200:
            break
    assert len(prose) == 200 and all(isinstance(d, str) and d.strip() for d in prose)
    problems = humaneval_problems()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and "def has_close_elements(" in problems[0]["prompt"]
