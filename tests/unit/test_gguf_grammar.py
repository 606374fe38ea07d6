"""The one-token grammar check against llama.cpp's whole-vocabulary grammar, on the real
SmolLM2 model: greedy decoding gives the same tokens, token for token, including prompts that
pull the model away from JSON (where the best token is refused and the vocabulary is masked).
"""

from __future__ import annotations

import json

import pytest

from cascade.models.llm_files import locate_gguf
from cascade.runners.gguf_grammar import GreedyGrammar, grammar_sampling

pytestmark = pytest.mark.llm

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string"}, "rank": {"type": "integer"}},
          "required": ["city", "rank"]}
PROMPTS = (
    ("<|im_start|>user\nName a large city and its rank by size as JSON.<|im_end|>\n"
     "<|im_start|>assistant\n"),
    "Once upon a time, in a small village by the sea,",  # wants prose: refused tokens
    "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\nHello",
)


@pytest.fixture(scope="module")
def llama():  # type: ignore[no-untyped-def]
    from llama_cpp import Llama

    model = Llama(model_path=str(locate_gguf("smollm2-135m-instruct").path), n_ctx=512,
                  n_threads=1, verbose=False)
    yield model
    model.close()


def _greedy(llama, prompt: str, **sampling) -> list[int]:  # type: ignore[no-untyped-def]
    from llama_cpp import llama_cpp

    ids: list[int] = []
    tokens = llama.tokenize(prompt.encode(), add_bos=True, special=True)
    for token in llama.generate(tokens, temp=0.0, **sampling):
        if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token) or len(ids) >= 40:
            break
        ids.append(token)
    return ids


def test_greedy_tokens_are_the_chains_token_for_token(llama) -> None:  # type: ignore[no-untyped-def]
    from llama_cpp.llama_grammar import LlamaGrammar

    grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    steps = masked = 0
    for prompt in PROMPTS:
        chain = _greedy(llama, prompt, grammar=grammar)
        with grammar_sampling(grammar, 0.0, llama._model.vocab, llama.n_vocab()) as sampling:
            [checker] = sampling["logits_processor"]
            assert isinstance(checker, GreedyGrammar) and sampling["grammar"] is None
            checked = _greedy(llama, prompt, **sampling)
        assert checker._sampler is None  # freed on leaving the block
        assert checked == chain, prompt
        steps, masked = steps + checker.steps, masked + checker.masked_steps
        text = llama.detokenize(checked).decode()
        if len(checked) < 40:  # a whole answer: the grammar held
            assert set(json.loads(text)) == {"city", "rank"}
    assert 0 < masked < steps  # both paths ran: the one-token check and the whole mask


def test_sampling_at_a_temperature_keeps_the_chains_grammar() -> None:
    grammar = object()
    with grammar_sampling(grammar, 0.7, None, 10) as sampling:
        assert sampling == {"grammar": grammar}
    with grammar_sampling(None, 0.0, None, 10) as sampling:
        assert sampling == {"grammar": None}
